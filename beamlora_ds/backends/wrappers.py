"""Recognising what training platforms wrap a model or an optimizer in, without importing them.

A DeepSpeed engine is recognised by its class name, a DeepSpeed optimizer by its module, DDP, DataParallel and
Megatron's wrappers by their class names; importing this module never imports DeepSpeed. Whether DeepSpeed took over a parameter is
read from its private attributes, by deepspeed/internals.py (taken_by_zero_optimizer).
"""
from __future__ import annotations

import torch


def is_deepspeed_engine(obj) -> bool:
    """True for a DeepSpeed engine (by class name, so that importing this module never imports DeepSpeed)."""
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(obj).__mro__)


def is_model_wrapper(obj) -> bool:
    """True for a DeepSpeed engine, DDP or DataParallel around a model (`.module`)."""
    names = {cls.__name__ for cls in type(obj).__mro__}
    wrappers = {"DeepSpeedEngine", "DistributedDataParallel", "DataParallel", "Float16Module"}  # the last: Megatron's
    return bool(names & wrappers) and hasattr(obj, "module")


def is_megatron_wrapper(obj) -> bool:
    """True for megatron-core's DistributedDataParallel or Float16Module around a model."""
    return any(cls.__module__.startswith(("megatron.core.distributed", "megatron.core.transformer.module"))
               for cls in type(obj).__mro__) and hasattr(obj, "module")


def unwrap_model(model_or_engine) -> torch.nn.Module:
    """The user's model inside a DeepSpeed engine (or DDP): exported key names must not carry `module.`."""
    model = model_or_engine
    while is_model_wrapper(model):
        model = model.module
    return model


def is_deepspeed_optimizer(obj) -> bool:
    """A DeepSpeed wrapper optimizer (ZeRO, FP16/BF16, from `deepspeed.runtime`): what `engine.optimizer` is under
    ZeRO 1-3 or mixed precision. DeepSpeed's own torch optimizers (FusedAdam, DeepSpeedCPUAdam in `deepspeed.ops`)
    are plain optimizers: under ZeRO-0 fp32 the engine steps one directly."""
    return type(obj).__module__.startswith("deepspeed.runtime")


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """Accept wrappers that hold a torch optimizer in `.optimizer` (accelerate, HF)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"BeamController.step() got {type(optimizer).__name__}; pass the torch optimizer you call "
                        "step() on, or the DeepSpeed engine.")
    return optimizer


PASS_THE_ENGINE = ("Pass the DeepSpeed engine itself, `beam.step(engine)`, after every `engine.step()`: BeamLoRA edits "
                   "the engine's fp32 master and Adam moments through it.")
