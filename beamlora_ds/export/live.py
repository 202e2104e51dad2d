"""Export a trained BeamLoRA adapter from a live model or DeepSpeed engine as a stock PEFT LoRA adapter.

`save_adapter(model_or_engine, out_dir)` works under any ZeRO stage: call it on every process (the reads of
the fp32 master are collective), rank 0 alone writes. The score is folded into A (docs/method.md section 6;
the file format is in adapter_format.py).
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ..backends import coordination
from ..backends.deepspeed.internals import pipeline_parallel_group
from ..backends.deepspeed.zero_params import full_fp32_param
from ..backends.tensor_parallel import gather_split
from ..backends.wrappers import unwrap_model
from ..checkpointing.atomic import out_dir_problem
from ..method.controller import controller_of
from ..method.inject import find_beamlora_modules
from .adapter_format import (TENSOR_KEYS, AdapterState, base_model_name_of, shared_settings, target_modules_for,
                             task_type_of, write_adapter)
from .every_stage import every_stage, every_stage_targets, renamed

logger = logging.getLogger(__name__)

NO_MODULES = ("This model has no BeamLoRA modules, so there is no adapter to export. Pass the model that "
              "beamlora_ds.apply() wrapped (or its DeepSpeed engine).")


def save_adapter(model_or_engine, out_dir: str, base_model_name_or_path: Optional[str] = None,
                 overwrite: bool = False, rename: Optional[Callable[[str], str]] = None,
                 task_type: Optional[str] = None) -> str:
    """Write a stock peft LoRA adapter (score folded into A) plus our unfolded state into `out_dir`.

    Works on a plain model and on a DeepSpeed engine under any ZeRO stage, and on a PipelineEngine (every stage's
    modules in one adapter). In a multi-process job (DeepSpeed, or torch.distributed alone) call it on EVERY process
    (the gathers are collective); rank 0 alone writes, and every process returns only after the files are in place
    or raises when rank 0 could not write them. `rename`: each module's name in the model the adapter is for (a
    PipelineModule's `3.layer.self_attn.q_proj` -> `model.layers.2.self_attn.q_proj`); `task_type`: peft's (e.g.
    "CAUSAL_LM"), read from a transformers model when not given. Returns `out_dir`.
    """
    model = unwrap_model(model_or_engine)
    modules = find_beamlora_modules(model)
    if not modules:
        raise ValueError(NO_MODULES)
    warn_if_step_count_differs(model_or_engine if model_or_engine is not model else None, modules)
    writer = coordination.rank() == 0
    problem = out_dir_problem(out_dir, overwrite) if writer else None
    if not coordination.rank0_verdict(problem is None):
        raise FileExistsError(problem or f"Process 0 refused to write {out_dir!r} (see its error); nothing was "
                              "written.")
    state = adapter_state_from_model(model)
    group = pipeline_parallel_group(model_or_engine)
    targets = every_stage_targets(model, state.module_names, group)
    state, targets = renamed(every_stage(state, group), targets, rename)
    task_type = task_type or task_type_of(model)
    base = base_model_name_or_path or base_model_name_of(model)
    error = None
    if writer:
        try:
            write_adapter(state, out_dir, targets, task_type, base, overwrite)
            logger.info("Wrote a peft LoRA adapter (%d modules, r=%d, score folded into A) to %s",
                        len(state.module_names), state.r, out_dir)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = e
    if not coordination.rank0_verdict(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"Process 0 failed to write the adapter to {out_dir!r} (see its error).")
    return out_dir


def adapter_metadata(model_or_engine, state: Optional[AdapterState] = None):
    """(target_modules, task_type, base_model_name_or_path) for the adapter_config.json of this model's adapter."""
    model = unwrap_model(model_or_engine)
    names = state.module_names if state is not None else list(find_beamlora_modules(model))
    return target_modules_for(model, names), task_type_of(model), base_model_name_of(model)


def adapter_state_from_model(model: nn.Module) -> AdapterState:
    """Full fp32 A, B and score of every BeamLoRA module. Collective under ZeRO: call it on every process.

    Under DeepSpeed the values come from the fp32 master the optimizer holds (not the possibly bf16 working
    copy); ZeRO-3 gathers only these adapter tensors, in module order, the same calls on every rank.
    """
    modules = find_beamlora_modules(model)
    if not modules:
        raise ValueError(NO_MODULES)
    state = AdapterState(*shared_settings(modules))
    scores = {}  # each score parameter gathered once: a table holds every module's row
    for name, m in modules.items():
        expected = {"lora_A": (m.r, m.in_features), "lora_B": (m.out_features, m.r), "lora_score": (m.r,)}
        for key in TENSOR_KEYS:
            if key == "lora_score":
                tensor = _score_of(m, scores)
            else:
                tensor = full_fp32_param(getattr(m, key))
                if m.tensor_parallel is not None and key == m.tensor_parallel.split_factor:
                    tensor = gather_split(tensor, m.tensor_parallel)  # the slices of the tensor-parallel group
            _check_shape(f"{name}.{key}", tensor, expected[key])
            getattr(state, key)[name] = tensor
    return state


def _score_of(module, gathered: dict) -> torch.Tensor:
    """`module`'s fp32 score logits, from its score parameter's full fp32 value (collective the first time)."""
    param = module.score_parameter
    if id(param) not in gathered:
        gathered[id(param)] = full_fp32_param(param)
    whole = gathered[id(param)]
    return whole if module.score_row is None else whole[module.score_row].clone()


def _check_shape(what: str, tensor: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(tensor.shape)}, but the module needs {tuple(shape)}. A ZeRO-3 "
                         "shard that was not gathered looks like this (numel 0): pass the DeepSpeed engine (or call "
                         "save_adapter on every process) so the full tensors are gathered. Nothing was written.")


def warn_if_step_count_differs(engine, modules) -> None:
    """A forgotten or extra beam.step() is told at export, with the numbers (the `engine`'s count, or without one
    (a plain model) the optimizer the controller was stepped with, or the one holding the scores)."""
    beam = controller_of(next(iter(modules.values())))
    if beam is None:
        return
    problem = beam.step_count_problem(engine)
    if problem and coordination.is_process_zero():
        logger.warning("%s", problem)
