"""DeepSpeed checkpoints that carry the BeamLoRA controller's state, so a resumed run continues exactly.

The controller's snapshot is per process under ZeRO (each keeps its own shard), so the state goes into one
file per data-parallel rank beside DeepSpeed's own files in the tag folder: `beamlora_state_rank{N}.pt`,
holding the controller's state_dict and this process's RNG states (dropout must repeat after a resume).
"""
from __future__ import annotations

import glob
import os
import random
import shutil
from typing import Optional, Tuple

import torch

from . import ranks
from .atomic import fsync_tree, replace_dir, write_text_atomically
from .controller import BeamController
from .failpoints import kill_point

STATE_FILE = "beamlora_state_rank{rank}.pt"
PARTIAL = ".partial"  # suffix of a checkpoint folder still being written
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
    if tag in ("", ".", "..", "latest") or os.sep in tag or tag.endswith(PARTIAL):
        raise ValueError(f"checkpoint tag {tag!r}: use a plain folder name (not 'latest', no '/', not ending in "
                         f"{PARTIAL!r}).")
    return tag


def save_checkpoint(engine, beam: BeamController, save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[dict] = None) -> str:
    """`engine.save_checkpoint` plus this process's BeamLoRA state, all or nothing; returns the tag. Call on every
    process.

    Crash-safe: every process writes into `<tag>.partial`; once all have finished (DeepSpeed's closing barrier),
    the folder is flushed to disk and renamed to `<tag>`, and only then does `latest` move to it. A process killed
    at any moment leaves `latest` naming the previous complete checkpoint; the next save clears the leftovers.
    """
    tag = validate_tag(str(tag or f"global_step{engine.global_steps}"))
    beam.warn_if_step_count_differs(engine)  # a forgotten or extra beam.step() shows here, not silently later
    staging = tag + PARTIAL
    folder = os.path.join(save_dir, staging)
    owner = ranks.owns_folders(engine)
    if owner:  # leftovers of saves that were killed half-way
        os.makedirs(save_dir, exist_ok=True)
        for stale in glob.glob(os.path.join(glob.escape(save_dir), "*" + PARTIAL)):
            shutil.rmtree(stale, ignore_errors=True)
    ranks.barrier()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, STATE_FILE.format(rank=ranks.rank()))
    torch.save({"beamlora": beam.state_dict(), "rng": rng_state()}, path)
    kill_point("checkpoint", engine.global_steps)
    # DeepSpeed's save ends in a barrier: after it, every process has written its part of the staging folder
    engine.save_checkpoint(save_dir, tag=staging, client_state=client_state or {}, save_latest=False)
    if owner:
        fsync_tree(folder)
        replace_dir(folder, os.path.join(save_dir, tag))
        kill_point("latest", engine.global_steps)
        write_text_atomically(os.path.join(save_dir, "latest"), tag)
    ranks.barrier()
    return tag


def load_checkpoint(engine, beam: BeamController, load_dir: str, tag: Optional[str] = None) -> Tuple[str, dict]:
    """`engine.load_checkpoint` plus the BeamLoRA state of this process; returns (path, client_state)."""
    if tag is None:
        latest = os.path.join(load_dir, "latest")
        ranks.all_ranks_or_raise(os.path.isfile(latest), f"No checkpoint to resume in {load_dir!r}: it has no "
                                 "'latest' file.")
        with open(latest) as f:
            tag = f.read().strip()
    ranks.all_ranks_or_raise(os.path.isdir(os.path.join(load_dir, tag)), f"{load_dir}/latest names {tag!r}, which "
                             "is not a folder there: the checkpoint was moved or deleted. Point --output_dir at the "
                             "run's folder.")
    state_path = os.path.join(load_dir, tag, STATE_FILE.format(rank=ranks.rank()))
    ranks.all_ranks_or_raise(os.path.isfile(state_path), f"{state_path} is missing on some process: the checkpoint "
                             f"{tag!r} was not written by beamlora_ds.save_checkpoint with this number of processes.")
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    check_score_layout(state["beamlora"], beam, tag)
    problem = beam.tensor_parallel_problem(state["beamlora"])  # the same on every process of one run
    ranks.all_ranks_or_raise(problem is None, f"Checkpoint {tag!r}: {problem or 'another tensor-parallel split.'}",
                             ValueError)
    path, client_state = engine.load_checkpoint(load_dir, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {tag!r} from {load_dir!r}.")
    beam.load_state_dict(state["beamlora"])
    set_rng_state(state["rng"])
    return path, client_state


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
