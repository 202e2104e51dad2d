"""Every private DeepSpeed name beamlora_ds relies on, and every DeepSpeed method it patches: here and nowhere else.

DeepSpeed has no public API for what BeamLoRA needs in a few places: which fp32 master fragment a ZeRO-1/2
parameter owns, which partition a ZeRO-3 parameter's shard is, re-linking the stage 1/2 moments after a load,
AutoTP's partition plan and group set-up, loading a universal checkpoint on request, and seeing DeepSpeed's own
checkpoint writes fail. Each is one function here, listed in docs/platform.md ("DeepSpeed internals we rely on")
with the versions it is tested against; tests/backends/test_deepspeed_internals.py fails loudly, naming the
function, when an installed DeepSpeed no longer has one.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
from typing import Callable, Iterator, Optional, Tuple

import torch


# --------------------------------------------------------------------------------------- ZeRO parameters
def in_zero_optimizer(param: torch.Tensor) -> bool:
    """Whether a ZeRO optimizer holds `param`: stage 1/2 set `_hp_mapping` on every parameter of its groups (None
    where this process holds no fragment of it), stage 3 attaches itself (`_z3_optimizer`). Reading such a
    parameter's fp32 master is a collective every process must enter, fragment or not."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "_z3_optimizer")


def taken_by_zero_optimizer(param: torch.Tensor) -> bool:
    """Whether deepspeed.initialize gave `param` to its ZeRO optimizer, as seen from any one of its processes: a stage
    1/2 fragment linked here, or the stage 3 optimizer attached (the misuse checks around apply() and step()). Its
    values then live in the engine, not in any torch optimizer; a ZeRO-3 model partitioned while it loads (zero.Init)
    is not taken yet."""
    return getattr(param, "_hp_mapping", None) is not None or hasattr(param, "_z3_optimizer")


def stage12_mapping(param: torch.Tensor):
    """The stage 1/2 link of `param` to its fp32 master fragment and moments (DeepSpeed's `tensor_fragment`, with
    `lp_fragment_address.start/.numel` and `get_hp_fragment(key)`), or None where this process holds none."""
    return getattr(param, "_hp_mapping", None)


def zero3_partition_rank(param: torch.Tensor) -> int:
    """Which partition of a ZeRO-3 parameter this process's shard (`ds_tensor`) is: its flat offset is this times
    the shard size (under MiCS and hpZ, not simply the global rank)."""
    return param._z3_optimizer._get_param_partition_rank(param)


def relink_stage12_moments(optimizer) -> None:
    """After engine.load_checkpoint, a stage 1/2 optimizer's parameter -> moment links point at the replaced state;
    DeepSpeed rebuilds them lazily only when asked through these two names (local and cheap)."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


# ------------------------------------------------------------------------------------------------ AutoTP
def hf_tp_plan(model) -> Optional[dict]:
    """The Hugging Face `base_model_tp_plan` AutoTP reads from a model when the config names no partition plan."""
    from deepspeed.runtime.tensor_parallel.config import _get_hf_tp_plan

    return _get_hf_tp_plan(model)


def init_tensor_parallel_group(tp: int) -> None:
    """Create DeepSpeed's tensor-parallel groups now (deepspeed.initialize reuses them), so that BeamLoRA's layers
    can be split, and their replicated adapters broadcast, before initialize."""
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp)


def partition_sizes(layer) -> Tuple[int, ...]:
    """How an AutoTP layer (LinearLayer, LinearAllreduce, a vocabulary-parallel head) split its dimension over its
    group: uneven for grouped-query attention, so not derivable from the shape alone."""
    return tuple(layer._partition_sizes)


# -------------------------------------------------------------------------------------------- pipeline
def pipeline_parallel_group(engine_or_module):
    """The process group of one process per stage of a PipelineEngine (its topology grid, `engine.grid`) or of a
    PipelineModule (`_grid`), or None for anything else or a one-stage pipeline."""
    grid = getattr(engine_or_module, "grid", None)
    if grid is None:
        grid = getattr(engine_or_module, "_grid", None)
    if not hasattr(grid, "get_pipe_parallel_group") or getattr(grid, "pipe_parallel_size", 1) <= 1:
        return None  # not a pipeline (a model may have an unrelated attribute `grid`), or one stage
    return grid.get_pipe_parallel_group()


def pipeline_layers(module) -> list:
    """The modules a PipelineModule loads one by one from their layer files (`forward_funcs`: its layers, a tied
    layer as the shared module itself, which is no direct child of the PipelineModule)."""
    return [f for f in getattr(module, "forward_funcs", []) if isinstance(f, torch.nn.Module)]


def pipeline_stage_of(module) -> Optional[int]:
    """The stage a PipelineModule builds on this process (`stage_id`), None for any other module."""
    return getattr(module, "stage_id", None) if hasattr(module, "_topo") else None


# ----------------------------------------------------------------------------------------- checkpoints
@contextlib.contextmanager
def universal_checkpoint_loading(engine) -> Iterator[None]:
    """While inside, engine.load_checkpoint reads DeepSpeed's universal checkpoint format. It is a config setting
    (`checkpoint.load_universal`) that DeepSpeed consults only while loading, so it is switched on for one load
    instead of asking users to put it in their config for one resume."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


@contextlib.contextmanager
def checkpoint_writes_wrapped(engine, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """While inside, every file engine.save_checkpoint writes goes through `wrap(save)` (save(state_dict, path,
    ...) is DeepSpeed's checkpoint engine's writer), so a failed write can be recorded instead of raised."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None or not hasattr(checkpoint_engine, "save"):
        yield
        return
    checkpoint_engine.save = wrap(checkpoint_engine.save)
    try:
        yield
    finally:
        del checkpoint_engine.save  # the class's method again


@contextlib.contextmanager
def base_left_out_of_checkpoints(engine) -> Iterator[None]:
    """While inside, engine.save_checkpoint(...) writes no tensor of the frozen base, whoever calls it (the HF Trainer
    calls it itself): `exclude_frozen_parameters=True` (no frozen parameter, no ZeRO-3 frozen fragment), and the
    module state cut to the trainable parameters (a 4-bit base's quantization constants are buffers-like entries
    of the state dict, not parameters, and DeepSpeed's flag keeps them)."""
    trainable = {name for name, p in engine.module.named_parameters(remove_duplicate=False) if p.requires_grad}
    module_state_dict = engine.module_state_dict

    def trainable_state(*args, **kwargs):
        state = module_state_dict(*args, **kwargs)
        if state is not None:  # a pipeline engine writes its layers itself and returns None
            for key in [k for k in state if k not in trainable]:
                del state[key]
        return state

    engine.save_checkpoint = functools.partial(type(engine).save_checkpoint, engine, exclude_frozen_parameters=True)
    engine.module_state_dict = trainable_state
    try:
        yield
    finally:
        del engine.save_checkpoint, engine.module_state_dict  # the class's methods again


def convert_to_universal_files(input_folder: str, output_folder: str) -> None:
    """DeepSpeed's `ds_to_universal` script, called in this process with one worker (adapter-sized state converts
    in seconds, and no process pool forks in a job's process)."""
    from deepspeed.checkpoint import ds_to_universal

    ds_to_universal.main(argparse.Namespace(
        input_folder=input_folder, output_folder=output_folder, num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
