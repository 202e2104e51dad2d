"""DeepSpeed checkpoints that carry the BeamLoRA controller's state, so a resumed run continues exactly.

The controller's snapshot is per process under ZeRO (each keeps its own shard), so the state goes into one
file per data-parallel rank beside DeepSpeed's own files in the tag folder: `beamlora_state_rank{N}.pt`,
holding the controller's state_dict and this process's RNG states (dropout must repeat after a resume).
"""
from __future__ import annotations

import contextlib
import glob
import logging
import os
import random
import shutil
from typing import Optional, Tuple

import torch

from . import manifest, ranks, reshard
from .atomic import PARTIAL, fsync_tree, replace_dir, write_text_atomically
from .controller import BeamController
from .failpoints import fail_write_point, kill_point

logger = logging.getLogger(__name__)

STATE_FILE = "beamlora_state_rank{rank}.pt"
LAYOUT_WORDS = {"per_module": "in one parameter per module", "table": "in one (modules x r) table"}
SCORE_LAYOUT_CHANGED = (
    "Cannot resume from checkpoint {where!r}: it keeps the scores {saved}, this model keeps them {now} (a beamlora_ds "
    "from before the model-level score table wrote it, docs/fused_score_design.md), so DeepSpeed's optimizer state "
    "does not fit. Resume it with the beamlora_ds that wrote it, or export its adapter (beamlora-export reads both "
    "layouts) and start a new run from there.")


def check_score_layout(saved: Optional[dict], beam: BeamController, where: str) -> None:
    """Refuse (on every process; call it on all) a controller state whose scores were kept in another layout than
    `beam`'s: the optimizer state saved with it has another parameter list, which DeepSpeed and torch reject only
    with an unhelpful message, after the load has started. `saved` None (no state here) passes."""
    now = beam.score_layout
    ok = saved is None or saved.get("score_layout", "per_module") == now  # absent: written before the score table
    other = next(layout for layout in LAYOUT_WORDS if layout != now)  # two layouts: a mismatch is the other one
    ranks.all_ranks_or_raise(ok, SCORE_LAYOUT_CHANGED.format(where=where, saved=LAYOUT_WORDS[other],
                                                            now=LAYOUT_WORDS[now]), ValueError)


def validate_tag(tag: str) -> str:
    """`tag` when it can name a checkpoint folder beside `latest` and the `.partial` staging folders."""
    if tag in ("", "latest") or tag.startswith(".") or os.sep in tag or tag.endswith(PARTIAL):
        raise ValueError(f"checkpoint tag {tag!r}: use a plain folder name (not 'latest', not starting with '.', "
                         f"no '/', not ending in {PARTIAL!r}).")
    return tag


def save_checkpoint(engine, beam: BeamController, save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[dict] = None) -> str:
    """`engine.save_checkpoint` plus this process's BeamLoRA state, all or nothing; returns the tag. Call on every
    process.

    Crash-safe: every process writes into `<tag>.partial`; once all have finished (DeepSpeed's closing barrier),
    the folder gets its manifest (sizes and checksums, manifest.py), is flushed to disk and renamed to `<tag>`, and
    only then does `latest` move to it. A process killed at any moment, or a write that fails (a full disk), leaves
    `latest` naming the previous complete checkpoint; the next save clears the leftovers.
    """
    tag = validate_tag(str(tag or f"global_step{engine.global_steps}"))
    beam.warn_if_step_count_differs(engine)  # a forgotten or extra beam.step() shows here, not silently later
    staging, step = tag + PARTIAL, engine.global_steps
    folder = os.path.join(save_dir, staging)
    owner = ranks.owns_folders(engine)
    if owner:  # leftovers of saves that were killed half-way, and converted copies of older checkpoints
        os.makedirs(save_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(save_dir), "*" + PARTIAL)):
            shutil.rmtree(stale, ignore_errors=True)
        reshard.remove_universal_copies(save_dir)
    ranks.barrier()
    failed: list = []  # this process's first failed write: OSError, or torch.save's RuntimeError on a full disk
    with _recorded(failed):
        os.makedirs(folder, exist_ok=True)
        fail_write_point("state", step)
        torch.save({"beamlora": beam.state_dict(), "rng": rng_state()}, os.path.join(folder, STATE_FILE.format(
            rank=ranks.rank())))
    kill_point("checkpoint", step)
    with _recorded(failed), _deepspeed_writes_recorded(engine, step, failed):
        # DeepSpeed's save ends in a barrier: after it, every process has written its part of the staging folder
        engine.save_checkpoint(save_dir, tag=staging, client_state=client_state or {}, save_latest=False)
    problem = ranks.first_problem(_said(failed))  # every process learns of a failure anywhere, none waits
    if problem is None:
        if owner:
            with _recorded(failed):
                fail_write_point("manifest", step)
                manifest.write_manifest(folder, tag, step, extra={"world_size": ranks.world_size(),
                                                                  "zero_stage": engine.zero_optimization_stage()})
                fsync_tree(folder)
                replace_dir(folder, os.path.join(save_dir, tag))
                kill_point("latest", step)
                fail_write_point("latest", step)
                write_text_atomically(os.path.join(save_dir, "latest"), tag)
        problem = ranks.first_problem(_said(failed))  # also the closing barrier
    if problem:  # a full disk, a quota, a vanished mount: say what is safe, free what we wrote
        if owner:
            shutil.rmtree(folder, ignore_errors=True)
        raise CheckpointWriteError(
            f"Could not write checkpoint {tag!r} (step {step}) to {save_dir!r}: {problem}. The previous checkpoint "
            f"and 'latest' ({read_latest(save_dir) or 'none yet'}) are untouched; free space or fix the file "
            "system, then continue with --resume.")
    return tag


@contextlib.contextmanager
def _recorded(failed: list):
    """Run a write; a failure is recorded (the first one) instead of raised, so that this process still meets
    the others in the next collective and they all raise together."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        failed.append(e)


def _said(failed: list) -> Optional[str]:
    return f"{failed[0]} (on process {ranks.rank()})" if failed else None


@contextlib.contextmanager
def _deepspeed_writes_recorded(engine, step: int, failed: list):
    """DeepSpeed's own file writes, recorded like ours: a failed one (and every later one) returns instead of
    raising, so DeepSpeed still reaches its barriers on this process. BEAMLORA_DS_FAIL_WRITE_AT's `deepspeed`
    point makes them fail here (the disk-full tests)."""
    checkpoint_engine = getattr(engine, "checkpoint_engine", None)
    if checkpoint_engine is None or not hasattr(checkpoint_engine, "save"):
        yield
        return
    original = checkpoint_engine.save

    def save(state_dict, path, *args, **kwargs):
        if not failed:
            with _recorded(failed):
                fail_write_point("deepspeed", step)
                return original(state_dict, path, *args, **kwargs)
        return None

    checkpoint_engine.save = save
    try:
        yield
    finally:
        del checkpoint_engine.save


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one and `latest` are intact."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files do not match its manifest (truncated, corrupted or missing)."""


def read_latest(load_dir: str) -> Optional[str]:
    """The tag `latest` names in `load_dir`, or None when there is no `latest`."""
    try:
        with open(os.path.join(load_dir, "latest")) as f:
            return f.read().strip()
    except OSError:
        return None


def load_checkpoint(engine, beam: BeamController, load_dir: str, tag: Optional[str] = None,
                    fallback: bool = False) -> Tuple[str, dict]:
    """`engine.load_checkpoint` plus the BeamLoRA state; returns (path, client_state). Call on every process.

    The checkpoint (`tag`, default the one `latest` names) is verified against its manifest first; a damaged one
    is refused naming the file, or with `fallback=True` (`--resume auto`) skipped, with a warning, for the newest
    intact one. Written by another number of processes, it is loaded through DeepSpeed's universal checkpoint and
    the BeamLoRA snapshot is cut again for this world size (reshard.py).
    """
    node_local = ranks.node_local_storage(engine)
    tag = _choose_tag(load_dir, tag, fallback, node_local)
    folder = os.path.join(load_dir, tag)
    every = ranks.all_values(_saved_world_size(folder, node_local))
    ranks.all_ranks_or_raise(len(set(every)) == 1, f"The processes see different checkpoints in {folder!r} (written by "
                             f"{sorted(set(every))} processes): point every node at the same run's folder.", ValueError)
    saved_world = every[0]
    ranks.all_ranks_or_raise(saved_world > 0, f"{folder} holds no {STATE_FILE.format(rank=0)}: the checkpoint {tag!r} "
                             "was not written by beamlora_ds.save_checkpoint.")
    if saved_world == ranks.world_size():
        state_path = os.path.join(folder, STATE_FILE.format(rank=ranks.rank()))
        ranks.all_ranks_or_raise(os.path.isfile(state_path), f"{state_path} is missing on some process: the "
                                 f"checkpoint {tag!r} was not written by beamlora_ds.save_checkpoint.")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        _check_fits(state["beamlora"], beam, tag)
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


def _check_fits(saved: dict, beam: BeamController, tag: str) -> None:
    """What must match before DeepSpeed reads anything (the controller checks the rest when it loads its state)."""
    problem = beam.module_names_problem(saved)  # the same on every process of one run
    ranks.all_ranks_or_raise(problem is None, f"Checkpoint {tag!r}: {problem or 'other modules.'}", ValueError)
    check_score_layout(saved, beam, tag)
    problem = beam.tensor_parallel_problem(saved)  # the same on every process of one run
    ranks.all_ranks_or_raise(problem is None, f"Checkpoint {tag!r}: {problem or 'another tensor-parallel split.'}",
                             ValueError)


def _load_on_new_world_size(engine, beam, load_dir: str, tag: str, saved_world: int, node_local: bool) -> tuple:
    """Resume a checkpoint written by `saved_world` processes on this job's number (docs/training.md): DeepSpeed's
    state loaded; returns (path, client_state, the controller state with its snapshot re-cut, this process's RNG
    state or None)."""
    world, stage = ranks.world_size(), engine.zero_optimization_stage()
    why_not = ("its files are per tensor-parallel slice and DeepSpeed's universal checkpoint does not re-cut AutoTP"
               if beam.tensor_parallel_layout else
               "each node kept its own files (checkpoint.use_node_local_storage); copy the nodes' checkpoint folders "
               "into one shared folder first" if node_local else None)
    ranks.all_ranks_or_raise(why_not is None, f"Checkpoint {tag!r} was written by {saved_world} processes, this job "
                             f"has {world}, and it cannot be resumed on another number: {why_not}. Resume it on "
                             f"{saved_world} processes.", ValueError)
    states, problem = [], None
    try:  # on every process; a file that cannot be read must stop all of them, not strand the others
        states = reshard.load_states(os.path.join(load_dir, tag))
    except (OSError, RuntimeError) as e:
        problem = f"{type(e).__name__}: {e}"
    problem = ranks.first_problem(problem)
    if problem:
        raise CheckpointDamagedError(f"Cannot read the BeamLoRA state of checkpoint {tag!r}: {problem}")
    saved = states[0]["beamlora"]
    _check_fits(saved, beam, tag)
    if stage == 0:  # ZeRO-0 keeps whole tensors and one optimizer state: DeepSpeed loads it on any world size
        path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    else:
        path, client_state = reshard.load_universal(
            engine, reshard.convert_to_universal(load_dir, tag, ranks.owns_folders(engine)), tag)
    if saved["snapshot"] is not None and stage > 0:
        access = beam.platform(engine)  # the controller's own, so it warns about the engine once
        saved = dict(saved, snapshot=reshard.recut_snapshot([s["beamlora"]["snapshot"] for s in states],
                                                            access.snapshot_ranges(), access.data_parallel_size))
    logger.info("Resumed checkpoint %r of %d processes on %d (ZeRO-%d%s).", tag, saved_world, world, stage,
                ", through DeepSpeed's universal checkpoint" if stage else "")
    return path, client_state, saved, states[ranks.rank()]["rng"] if ranks.rank() < saved_world else None


def _saved_world_size(folder: str, node_local: bool) -> int:
    """From the manifest, else one state file per process; under node-local storage a node's folder holds only
    its own processes' files, so a checkpoint from before manifests is taken to be of this world size (the state
    file of each process is then checked)."""
    try:
        world = ((manifest.read_manifest(folder) or {}).get("extra") or {}).get("world_size")
    except manifest.ManifestError:
        world = None  # reported by the verification; here the files decide
    if world:
        return int(world)
    return ranks.world_size() if node_local else reshard.saved_world_size(folder)


def _choose_tag(load_dir: str, tag: Optional[str], fallback: bool, node_local: bool) -> str:
    """The tag to load, verified: `tag`, else the one `latest` names; damaged, refused or (fallback) replaced by
    the newest intact checkpoint."""
    if tag is None:
        latest = read_latest(load_dir)
        ranks.all_ranks_or_raise(latest is not None, f"No checkpoint to resume in {load_dir!r}: it has no "
                                 "'latest' file.")
        tag = _agreed_latest(load_dir, latest)
    ranks.all_ranks_or_raise(os.path.isdir(os.path.join(load_dir, tag)), f"{load_dir}/latest names {tag!r}, which "
                             "is not a folder there: the checkpoint was moved or deleted. Point --output_dir at the "
                             "run's folder.")
    problem = _verify_everywhere(os.path.join(load_dir, tag), node_local)
    if problem is None:
        return tag
    if not fallback:
        raise CheckpointDamagedError(problem)
    for candidate in _tags_every_process_has(load_dir):  # the same candidates, in the same order, everywhere
        if candidate != tag and _verify_everywhere(os.path.join(load_dir, candidate), node_local) is None:
            if ranks.is_process_zero():
                logger.warning("%s Resuming from %r instead, the newest intact checkpoint.", problem, candidate)
            return candidate
    raise CheckpointDamagedError(f"{problem} No other checkpoint in {load_dir!r} is intact.")


def _tags_every_process_has(load_dir: str) -> list:
    """Published checkpoints, newest first, that every process sees (with node-local storage each node lists its
    own folder)."""
    every = ranks.all_values(manifest.checkpoint_tags(load_dir))
    return [t for t in every[0] if all(t in tags for tags in every)]


def _agreed_latest(load_dir: str, latest: str) -> str:
    """One tag for every process. With node-local storage each node moves its own `latest`, and a node stopped
    between publishing and moving it leaves them different: then the newest checkpoint every node has."""
    every = ranks.all_values(latest)
    if len(set(every)) == 1:
        return latest
    shared = _tags_every_process_has(load_dir)
    if not shared:
        raise CheckpointDamagedError(f"The processes' 'latest' files name different checkpoints ({sorted(set(every))}"
                                     ") and no checkpoint is published on every node; resume is not possible.")
    if ranks.is_process_zero():
        logger.warning("The nodes' 'latest' files name different checkpoints (%s): a node stopped between publishing "
                       "a checkpoint and moving its 'latest'. Resuming from %r, the newest one every node has.",
                       sorted(set(every)), shared[0])
    return shared[0]


def _verify_everywhere(folder: str, node_local: bool) -> Optional[str]:
    """The folder checked against its manifest, each process hashing a share of the files; the first problem any
    process found, on every process (each process makes exactly one collective call, whatever it found). A
    checkpoint from before manifests passes, with a warning."""
    if node_local:  # each node checks the folder it sees
        part = (int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_SIZE", 0))
                or int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or 0)
        part = part if part[1] > part[0] else (0, 1)
    else:
        part = (ranks.rank(), ranks.world_size())
    unchecked = False
    try:
        unchecked = manifest.read_manifest(folder) is None
        problem = None if unchecked else manifest.verify(folder, part=part)
    except (manifest.ManifestError, OSError) as e:  # unreadable manifest, a permission error: a problem to share
        problem = f"Checkpoint {folder!r} cannot be checked: {e}"
    if unchecked and ranks.is_process_zero():
        logger.warning("Checkpoint %r has no manifest (written before beamlora_ds checked checkpoints): it is "
                       "loaded without an integrity check.", folder)
    return ranks.first_problem(problem)


def rng_state() -> dict:
    """Every random stream a training step may draw from (dropout above all), so a resume repeats them."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy

        state["numpy"] = numpy.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back the streams rng_state() saved (numpy and CUDA only where they were saved and are present)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
