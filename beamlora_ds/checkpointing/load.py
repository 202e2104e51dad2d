"""load_checkpoint: a checkpoint written by save_checkpoint, verified, then loaded into the engine and the
controller, on the same or (ZeRO 1-3, through DeepSpeed's universal checkpoint) another number of processes."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional, Tuple

import torch

from ..method.controller import BeamController
from ..backends import coordination
from ..backends.deepspeed.internals import pipeline_layers
from ..backends.deepspeed.pipeline_module import is_pipeline_module
from ..backends.wrappers import unwrap_model
from . import manifest, reshard
from .base_identity import base_identity, identity_problem
from .folders import node_local_storage, owns_folders, reading_part
from .layout import STATE_FILE, CheckpointDamagedError, read_latest
from .rng import set_rng_state

logger = logging.getLogger(__name__)


def load_checkpoint(engine, beam: BeamController, load_dir: str, tag: Optional[str] = None,
                    fallback: bool = False) -> Tuple[str, dict]:
    """`engine.load_checkpoint` plus the BeamLoRA state; returns (path, client_state). Call on every process.

    The checkpoint (`tag`, default the one `latest` names) is verified against its manifest first; a damaged one
    is refused naming the file, or with `fallback=True` (`--resume auto`) skipped, with a warning, for the newest
    intact one. Written by another number of processes, it is loaded through DeepSpeed's universal checkpoint and
    the BeamLoRA snapshot is cut again for this world size (reshard.py).
    """
    node_local = node_local_storage(engine)
    tag = _choose_tag(load_dir, tag, fallback, node_local)
    folder = os.path.join(load_dir, tag)
    every = coordination.all_values(_saved_world_size(folder))
    coordination.all_ranks_or_raise(len(set(every)) == 1, f"The processes see different checkpoints in {folder!r} "
                                    f"(written by {sorted(set(every))} processes): point every node at the same "
                                    "run's folder.", ValueError)
    saved_world = every[0]
    coordination.all_ranks_or_raise(saved_world > 0, f"{folder} records no world size in its manifest: the "
                                    f"checkpoint {tag!r} was not written by beamlora_ds.save_checkpoint.")
    if saved_world == coordination.world_size():
        state_path = os.path.join(folder, STATE_FILE.format(rank=coordination.rank()))
        coordination.all_ranks_or_raise(os.path.isfile(state_path), f"{state_path} is missing on some process: the "
                                        f"checkpoint {tag!r} was not written by beamlora_ds.save_checkpoint.")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        _check_fits(state["beamlora"], beam, engine, folder, tag)
        with adapter_only_loads(engine):
            path, client_state = engine.load_checkpoint(load_dir, tag=tag)
        saved, rng = state["beamlora"], state["rng"]
    else:
        path, client_state, saved, rng = _load_on_new_world_size(engine, beam, load_dir, tag, saved_world, node_local)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag!r} from {load_dir!r}.")
    beam.load_state_dict(saved)
    if rng is not None:  # a process the old run did not have keeps its seeded streams
        set_rng_state(rng)
    return path, client_state


@contextlib.contextmanager
def adapter_only_loads(engine_or_model):
    """While inside, a strict load_state_dict of the model (of each layer of a PipelineModule) accepts a state
    without the frozen base (what save_checkpoint writes): see allow_adapter_only_state."""
    model = unwrap_model(engine_or_model)
    # a PipelineModule loads each of its layers from its own file (layer.load_state_dict, a tied layer's shared
    # module too): the hook on each of them
    loaded = list({id(m): m for m in pipeline_layers(model)}.values()) if is_pipeline_module(model) else [model]
    handles = [m.register_load_state_dict_post_hook(allow_adapter_only_state) for m in loaded]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def allow_adapter_only_state(model, incompatible_keys) -> None:
    """load_state_dict hook: a state dict that lacks only frozen parameters (and has every trainable one) is a
    complete BeamLoRA state (checkpoints leave the base out; it is loaded from its source), so those keys are not
    reported missing. A missing trainable key still is, and a strict load still fails on it. "Only some frozen
    keys": DeepSpeed leaves out each frozen tensor once, so a tied output embedding may stay in under its other name.
    """
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    missing = set(incompatible_keys.missing_keys)
    if missing and missing <= frozen:
        incompatible_keys.missing_keys.clear()


def _check_fits(saved: dict, beam: BeamController, engine, folder: str, tag: str) -> None:
    """Refuse, before DeepSpeed reads anything and on every process, a state this controller cannot continue
    (another state version, other modules, another tensor-parallel split, other BeamLoRA settings), then a
    checkpoint trained on another base than this run loaded (the manifest records its fingerprint:
    base_identity.py; a checkpoint that holds its base loads that one)."""
    problem = beam.resume_problem(saved)  # the same on every process of one run
    coordination.all_ranks_or_raise(problem is None, f"Checkpoint {tag!r}: {problem}", ValueError)
    current = base_identity(engine.module)  # on every process: a gather under ZeRO-3
    base = _recorded(folder).get("base")
    problem = None if base and base.get("included") else identity_problem(base, current, tag)
    coordination.all_ranks_or_raise(problem is None, problem or "", ValueError)


def _load_on_new_world_size(engine, beam, load_dir: str, tag: str, saved_world: int, node_local: bool) -> tuple:
    """Resume a checkpoint written by `saved_world` processes on this job's number (docs/training.md): DeepSpeed's
    state loaded; returns (path, client_state, the controller state with its snapshot re-cut, this process's RNG
    state or None)."""
    world, stage = coordination.world_size(), engine.zero_optimization_stage()
    why_not = ("its files are per tensor-parallel slice and DeepSpeed's universal checkpoint does not re-cut AutoTP"
               if beam.tensor_parallel_layout else
               "its files are per pipeline stage (a PipelineEngine's), and BeamLoRA re-cuts no pipeline"
               if is_pipeline_module(unwrap_model(engine)) else
               "each node kept its own files (checkpoint.use_node_local_storage); copy the nodes' checkpoint folders "
               "into one shared folder first" if node_local else None)
    coordination.all_ranks_or_raise(why_not is None, f"Checkpoint {tag!r} was written by {saved_world} processes, "
                                    f"this job has {world}, and it cannot be resumed on another number: {why_not}. "
                                    f"Resume it on {saved_world} processes.", ValueError)
    states, problem = [], None
    try:  # on every process; a file that cannot be read must stop all of them, not strand the others
        states = reshard.load_states(os.path.join(load_dir, tag))
    except (OSError, RuntimeError) as e:
        problem = f"{type(e).__name__}: {e}"
    problem = coordination.first_problem(problem)
    if problem:
        raise CheckpointDamagedError(f"Cannot read the BeamLoRA state of checkpoint {tag!r}: {problem}")
    saved = dict(states[0]["beamlora"], process=beam.process_place)  # its snapshot is cut again for this process
    _check_fits(saved, beam, engine, os.path.join(load_dir, tag), tag)
    if stage == 0:  # ZeRO-0 keeps whole tensors and one optimizer state: DeepSpeed loads it on any world size
        with adapter_only_loads(engine):
            path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    else:
        path, client_state = reshard.load_universal(
            engine, reshard.convert_to_universal(load_dir, tag, owns_folders(engine)), tag)
    if saved["snapshot"] is not None and stage > 0:
        access = beam.access_for(engine)  # the controller's own, so it warns about the engine once
        saved = dict(saved, snapshot=reshard.recut_snapshot([s["beamlora"]["snapshot"] for s in states],
                                                            access.snapshot_ranges(), access.data_parallel_size))
    logger.info("Resumed checkpoint %r of %d processes on %d (ZeRO-%d%s).", tag, saved_world, world, stage,
                ", through DeepSpeed's universal checkpoint" if stage else "")
    rank = coordination.rank()
    return path, client_state, saved, states[rank]["rng"] if rank < saved_world else None


def _recorded(folder: str) -> dict:
    """What the checkpoint's manifest records beside its files (world size, ZeRO stage, base); {} when it says
    nothing or cannot be read (_choose_tag has verified it; unreadable now, it changed under us)."""
    try:
        return dict((manifest.read_manifest(folder) or {}).get("extra") or {})
    except (manifest.ManifestError, TypeError, ValueError):
        return {}


def _saved_world_size(folder: str) -> int:
    """How many processes wrote the checkpoint, as its manifest records (0 when it does not say)."""
    try:
        return int(_recorded(folder).get("world_size") or 0)
    except (TypeError, ValueError):
        return 0


def _choose_tag(load_dir: str, tag: Optional[str], fallback: bool, node_local: bool) -> str:
    """The tag to load, verified: `tag`, else the one `latest` names; damaged, refused or (fallback) replaced by
    the newest intact checkpoint."""
    if tag is None:
        latest = read_latest(load_dir)
        coordination.all_ranks_or_raise(latest is not None, f"No checkpoint to resume in {load_dir!r}: it has no "
                                        "'latest' file.")
        tag = _agreed_latest(load_dir, latest)
    coordination.all_ranks_or_raise(os.path.isdir(os.path.join(load_dir, tag)), f"{load_dir}/latest names {tag!r}, "
                                    "which is not a folder there: the checkpoint was moved or deleted. Point "
                                    "--output_dir at the run's folder.")
    problem = _verify_everywhere(os.path.join(load_dir, tag), node_local)
    if problem is None:
        return tag
    if not fallback:
        raise CheckpointDamagedError(problem)
    for candidate in _tags_every_process_has(load_dir):  # the same candidates, in the same order, everywhere
        if candidate != tag and _verify_everywhere(os.path.join(load_dir, candidate), node_local) is None:
            if coordination.is_process_zero():
                logger.warning("%s Resuming from %r instead, the newest intact checkpoint.", problem, candidate)
            return candidate
    raise CheckpointDamagedError(f"{problem} No other checkpoint in {load_dir!r} is intact.")


def _tags_every_process_has(load_dir: str) -> list:
    """Published checkpoints, newest first, that every process sees (with node-local storage each node lists its
    own folder)."""
    every = coordination.all_values(manifest.checkpoint_tags(load_dir))
    return [t for t in every[0] if all(t in tags for tags in every)]


def _agreed_latest(load_dir: str, latest: str) -> str:
    """One tag for every process. With node-local storage each node moves its own `latest`, and a node stopped
    between publishing and moving it leaves them different: then the newest checkpoint every node has."""
    every = coordination.all_values(latest)
    if len(set(every)) == 1:
        return latest
    shared = _tags_every_process_has(load_dir)
    if not shared:
        raise CheckpointDamagedError(f"The processes' 'latest' files name different checkpoints ({sorted(set(every))}"
                                     ") and no checkpoint is published on every node; resume is not possible.")
    if coordination.is_process_zero():
        logger.warning("The nodes' 'latest' files name different checkpoints (%s): a node stopped between publishing "
                       "a checkpoint and moving its 'latest'. Resuming from %r, the newest one every node has.",
                       sorted(set(every)), shared[0])
    return shared[0]


def _verify_everywhere(folder: str, node_local: bool) -> Optional[str]:
    """The folder checked against its manifest, each process hashing a share of the files; the first problem any
    process found, on every process (each process makes exactly one collective call, whatever it found)."""
    part = reading_part(node_local)  # each node checks the folder it sees
    try:
        problem = manifest.verify(folder, part=part)
    except (manifest.ManifestError, OSError) as e:  # unreadable manifest, a permission error: a problem to share
        problem = f"Checkpoint {folder!r} cannot be checked: {e}"
    return coordination.first_problem(problem)
