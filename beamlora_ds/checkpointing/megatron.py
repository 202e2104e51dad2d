"""Checkpoints of a BeamLoRA run on megatron-core that resume exactly, in the same parallel layout.

One file per process: the trainable parameters it holds (the adapter, its tensor-parallel slice), the fp32 main
values and optimizer state of the part it owns (a flat shard under the DistributedOptimizer, whole under the plain
one), the BeamLoRA controller's state and the random streams. The frozen base is not saved (it is loaded from its
source again, as under DeepSpeed). The folder is written under a temporary name and renamed into place by process 0
when every process has written its file; an existing folder is never overwritten. The learning-rate scheduler
(Megatron's `OptimizerParamScheduler`) is the loop's own: save its `state_dict()` beside (docs/megatron.md).
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, Optional

import torch

from ..backends import coordination
from ..backends.megatron import internals
from ..backends.megatron.layers import parallel_layout
from ..backends.wrappers import unwrap_model
from .atomic import fsync_tree, out_dir_problem
from .rng import rng_state, set_rng_state

FORMAT, VERSION = "beamlora_ds.megatron", 1


def process_file(folder: str) -> str:
    return os.path.join(folder, f"rank{coordination.rank():05d}.pt")


def save_megatron_checkpoint(folder: str, model, optimizer, beam, extra: Optional[dict] = None) -> str:
    """Write every process's part of the run to `folder` (collective: every process calls it); returns it.
    `extra`: anything else the loop needs back (its step, the scheduler's state_dict()), returned by the load."""
    problem = coordination.first_problem(out_dir_problem(folder, overwrite=False))
    if problem:
        raise FileExistsError(problem)
    partial = folder.rstrip(os.sep) + ".partial"
    if coordination.is_process_zero():
        shutil.rmtree(partial, ignore_errors=True)  # left by a writer that was killed
        os.makedirs(partial)
    coordination.barrier()
    state = {"format": FORMAT, "version": VERSION, "layout": parallel_layout(), "beam": beam.state_dict(),
             "rng": rng_state(), "extra": extra or {}, **trained_tensors(model, optimizer)}
    problem = None
    try:
        torch.save(state, process_file(partial))
    except OSError as error:
        problem = f"Could not write {process_file(partial)}: {error}"
    problem = coordination.first_problem(problem)
    if problem:
        raise OSError(problem)
    if coordination.is_process_zero():
        fsync_tree(partial)
        os.replace(partial, folder)
    coordination.barrier()
    return folder


def trained_tensors(model, optimizer) -> Dict[str, dict]:
    """{"params": this process's trainable tensors by name, "optimizer": by name, the main values and optimizer
    state of the part it owns}, host copies."""
    params, states = {}, {}
    for name, p in unwrap_model(model).named_parameters():
        if not p.requires_grad:
            continue
        params[name] = p.detach().cpu().clone()
        for inner in internals.inner_optimizers(optimizer):
            if internals.holds(inner, p):
                states[name] = {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                                for k, v in internals.main_and_state(inner, p).items()}
    return {"params": params, "optimizer": states}


def load_megatron_checkpoint(folder: str, model, optimizer, beam) -> dict:
    """Continue the run saved in `folder`: the same processes, the same layout, the same BeamLoRA settings (each
    refused on every process, before anything is written). Returns the `extra` it was saved with."""
    path = process_file(folder)
    coordination.all_ranks_or_raise(os.path.isfile(path), f"{path} is missing: {folder!r} is not a BeamLoRA Megatron "
                                    "checkpoint of a run with this many processes.")
    state = torch.load(path, map_location="cpu", weights_only=False)
    problem = None
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        problem = f"{path} is not a version-{VERSION} BeamLoRA Megatron checkpoint."
    elif state["layout"] != parallel_layout():
        problem = (f"{folder!r} was saved in the parallel layout {state['layout']}, this run is "
                   f"{parallel_layout()}; resume with the same tensor and data parallel sizes.")
    else:
        problem = beam.resume_problem(state["beam"])
    problem = coordination.first_problem(problem)
    if problem:
        raise ValueError(problem)
    restore_trained_tensors(model, optimizer, state)
    beam.load_state_dict(state["beam"])
    set_rng_state(state["rng"])
    return state["extra"]


@torch.no_grad()
def restore_trained_tensors(model, optimizer, state: dict) -> None:
    named = dict(unwrap_model(model).named_parameters())
    missing = sorted(set(state["params"]) - set(named))
    if missing:
        raise ValueError(f"The checkpoint holds parameters this model lacks: {missing[:3]}.")
    for name, values in state["params"].items():
        named[name].copy_(values.to(named[name].device, named[name].dtype))
    for name, saved in state["optimizer"].items():
        p = named[name]
        for inner in internals.inner_optimizers(optimizer):
            if internals.holds(inner, p):
                main = internals.main_param(inner, p)
                main.copy_(saved["param"].to(main.device, main.dtype))
                live = internals.state_of(inner, main, create=True)
                for key, value in saved.items():
                    if key != "param":
                        live[key] = value.to(main.device) if torch.is_tensor(value) else value
