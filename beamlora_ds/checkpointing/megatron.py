"""Checkpoints of a BeamLoRA run on megatron-core that resume exactly, in the same parallel layout.

One file per process: the trainable parameters it holds (the adapter, its tensor-parallel slice), the fp32 main
values and optimizer state of the part it owns (a flat shard under the DistributedOptimizer, whole under the plain
one) with the optimizer's group settings (FusedAdam keeps its step count there), the BeamLoRA controller's state,
and the random streams (Megatron's model-parallel RNG tracker included). The frozen base is not saved (it is loaded
from its source again, as under DeepSpeed). The folder is written under a temporary name and renamed into place by
process 0 when every process has written its file; an existing folder is never overwritten; a failure on any
process is raised on every process. The learning-rate scheduler (Megatron's `OptimizerParamScheduler`) is the
loop's own: pass its `state_dict()` in `extra` (docs/megatron.md).
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
    raise_on_all(FileExistsError, out_dir_problem(folder, overwrite=False))
    partial = folder.rstrip(os.sep) + ".partial"
    raise_on_all(OSError, attempt(lambda: prepare(partial)) if coordination.is_process_zero() else None)
    state = {"format": FORMAT, "version": VERSION, "layout": parallel_layout(), "beam": beam.state_dict(),
             "rng": rng_state(), "megatron_rng": megatron_rng_states(), "extra": extra or {},
             **trained_tensors(model, optimizer)}
    raise_on_all(OSError, attempt(lambda: torch.save(state, process_file(partial))))
    raise_on_all(OSError, attempt(lambda: publish(partial, folder)) if coordination.is_process_zero() else None)
    return folder


def prepare(partial: str) -> None:
    shutil.rmtree(partial, ignore_errors=True)  # left by a writer that was killed
    os.makedirs(partial)


def publish(partial: str, folder: str) -> None:
    fsync_tree(partial)
    os.replace(partial, folder)


def attempt(action) -> Optional[str]:
    """None when `action()` succeeded, else what went wrong (to be raised on every process)."""
    try:
        action()
    except OSError as error:
        return f"{type(error).__name__}: {error}"
    return None


def raise_on_all(error_type, problem: Optional[str]) -> None:
    """Raise the first process's problem on every process (a collective: every process calls it)."""
    problem = coordination.first_problem(problem)
    if problem:
        raise error_type(problem)


def trained_tensors(model, optimizer) -> Dict[str, object]:
    """This process's trainable tensors, the main values and optimizer state of the part it owns (host copies),
    with the ownership record and the optimizers' group settings."""
    inners = internals.inner_optimizers(optimizer)
    trained = trained_parameters(model)
    params = {name: p.detach().cpu().clone() for name, p in trained.items()}
    states = {name: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v
                     for k, v in internals.main_and_state(inner, p).items()}
              for name, p in trained.items() for inner in inners if internals.holds(inner, p)}
    return {"params": params, "optimizer": states, **ownership(trained, inners),
            "groups": [internals.group_settings(inner) for inner in inners]}


def trained_parameters(model) -> Dict[str, torch.nn.Parameter]:
    return {name: p for name, p in named_parameters(model).items() if p.requires_grad}


def named_parameters(model) -> Dict[str, torch.nn.Parameter]:
    """The parameters of the GPT, or of this process's virtual pipeline chunks (named `<chunk>.<name>`)."""
    if isinstance(model, (list, tuple)):
        return {f"{i}.{name}": p for i, chunk in enumerate(model) for name, p in named_parameters(chunk).items()}
    return dict(unwrap_model(model).named_parameters())


def ownership(trained: Dict[str, torch.nn.Parameter], inners) -> Dict[str, object]:
    """Which optimizers hold the trainable parameters, and which part of each this process owns: what a
    checkpoint's optimizer files must match to be restored (no tensor copied)."""
    return {"owned": {name: internals.owned_range(inner, p) for name, p in trained.items() for inner in inners
                      if internals.holds(inner, p)},
            "optimizers": [type(inner).__name__ for inner in inners]}


def megatron_rng_states():
    """Megatron's model-parallel RNG tracker (the dropout streams of tensor-parallel regions), where it has one."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    return tracker.get_states() if hasattr(tracker, "get_states") and torch.cuda.is_available() else None


def load_megatron_checkpoint(folder: str, model, optimizer, beam) -> dict:
    """Continue the run saved in `folder`: the same processes, layout, optimizer and BeamLoRA settings (each
    refused on every process, before anything is written). Returns the `extra` it was saved with."""
    path = process_file(folder)
    state, problem = None, None
    if not os.path.isfile(path):
        problem = (f"{path} is missing: {folder!r} is not a BeamLoRA Megatron checkpoint of a run with this many "
                   "processes.")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # noqa: BLE001 - any unreadable file is reported on every process
            problem = f"{path} cannot be read ({type(error).__name__}: {error})."
    if problem is None:
        problem = checkpoint_problem(state, folder, model, optimizer, beam)
    raise_on_all(ValueError, problem)
    restore_trained_tensors(model, optimizer, state)
    beam.load_state_dict(state["beam"])
    set_rng_state(state["rng"])
    if state["megatron_rng"] is not None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_rng"])
    return state["extra"]


def checkpoint_problem(state: dict, folder: str, model, optimizer, beam) -> Optional[str]:
    """Why this process cannot continue from `state`, or None."""
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        return f"{folder!r} does not hold a version-{VERSION} BeamLoRA Megatron checkpoint."
    if state["layout"] != parallel_layout():
        return (f"{folder!r} was saved in the parallel layout {state['layout']}, this run is {parallel_layout()}; "
                "resume with the same tensor, pipeline and data parallel sizes.")
    trained = trained_parameters(model)
    now = ownership(trained, internals.inner_optimizers(optimizer))
    if state["optimizers"] != now["optimizers"] or state["owned"] != now["owned"]:
        return (f"{folder!r} was saved with the optimizer(s) {state['optimizers']} owning other parts of the adapter "
                f"than this run's {now['optimizers']}: resume with the same optimizer settings "
                "(distributed or plain, the same DDP bucket and padding settings).")
    if set(state["params"]) != set(trained):
        differ = sorted(set(state["params"]) ^ set(trained))
        return f"{folder!r} holds other trainable parameters than this model: {differ[:3]}."
    return beam.resume_problem(state["beam"])


@torch.no_grad()
def restore_trained_tensors(model, optimizer, state: dict) -> None:
    named = named_parameters(model)
    for name, values in state["params"].items():
        named[name].copy_(values.to(named[name].device, named[name].dtype))
    inners = internals.inner_optimizers(optimizer)
    for inner, settings in zip(inners, state["groups"]):
        internals.set_group_settings(inner, settings)
    for name, saved in state["optimizer"].items():
        inner = next(i for i in inners if internals.holds(i, named[name]))
        main = internals.main_param(inner, named[name])
        main.copy_(saved["param"].to(main.device, main.dtype))
        live = internals.state_of(inner, main, create=True)
        for key, value in saved.items():
            if key != "param":  # Adam's step stays where torch keeps it (the host)
                live[key] = value.to(main.device) if torch.is_tensor(value) and key != "step" else value
