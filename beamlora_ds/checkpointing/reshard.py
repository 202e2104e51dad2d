"""Resuming a checkpoint on another number of data-parallel processes (docs/training.md, "Resuming on a different
number of GPUs").

DeepSpeed's ZeRO files are cut for the world size that wrote them. DeepSpeed's own answer is the universal
checkpoint: `ds_to_universal` rewrites them once per parameter (fp32 master, Adam moments, step), and an engine of
any world size loads that (docs/platform.md). Ours is the BeamLoRA state: the controller's part is the same on
every process, and the snapshot (taken at T/2 for the reset at T) is one shard per process in the old fragments,
which `recut_snapshot` cuts again for the new ones. Nothing else of ours depends on the world size.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from typing import Dict, List, Sequence, Tuple

import torch

from ..backends import coordination
from ..backends.deepspeed.internals import convert_to_universal_files, universal_checkpoint_loading
from .atomic import PARTIAL, fsync_tree, replace_dir
from .layout import state_files

# <checkpoints>/.universal/<tag>: the converted copy, made once, beside the original (a hidden name: checkpoint tags
# cannot start with "." (layout.validate_tag), so it is never a user's checkpoint)
UNIVERSAL_DIR = ".universal"


def universal_folder(ckpt_dir: str, tag: str) -> str:
    return os.path.join(ckpt_dir, UNIVERSAL_DIR, tag)


def convert_to_universal(ckpt_dir: str, tag: str, owner: bool) -> str:
    """DeepSpeed's universal form of checkpoint `tag`, made by the owner process once (the others wait) and kept
    beside the original, which is never modified. Returns the folder to pass to engine.load_checkpoint as
    load_dir (the tag stays the same)."""
    target = universal_folder(ckpt_dir, tag)
    problem = None
    if owner and not os.path.isdir(target):
        staging, output = target + PARTIAL, io.StringIO()
        try:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # its progress output (prints, progress bars) goes into the error, if there is one, not the run's log
            with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
                convert_to_universal_files(os.path.join(ckpt_dir, tag), staging)
            fsync_tree(staging)
            replace_dir(staging, target)
        except Exception as e:  # DeepSpeed asserts, a full disk: every process must hear it, none may wait
            shutil.rmtree(staging, ignore_errors=True)
            problem = f"{type(e).__name__}: {e} (its output ended: {output.getvalue()[-500:]!r})"
    problem = coordination.first_problem(problem)  # also the barrier: the others wait for the conversion
    if problem:
        raise RuntimeError(f"DeepSpeed's universal-checkpoint conversion of {tag!r} (to resume it on another number "
                           f"of processes) failed: {problem}. Resume on the number of processes that wrote it.")
    return os.path.dirname(target)


def load_universal(engine, universal_dir: str, tag: str):
    """engine.load_checkpoint from DeepSpeed's universal form (switched on for this one load)."""
    with universal_checkpoint_loading(engine):
        return engine.load_checkpoint(universal_dir, tag=tag)


def recut_snapshot(shards: Sequence[dict], ranges: Sequence[Dict[str, Tuple[int, int]]], world_size: int) -> dict:
    """This process's snapshot for its new fragments, cut from the shards the old processes kept.

    `shards`: the old processes' snapshots (`ZeroAccess.snapshot()`: per module, per factor, a fragment's start,
    numel, fp32 master and moments in the parameter's flat coordinates; the fragments of one parameter are
    disjoint). `ranges`: per module, {"lora_A": (start, numel), "lora_B": ...} of this process now.
    """
    first = shards[0]
    if "world_size" not in first:  # a whole-tensor snapshot (ZeRO-0 or a torch optimizer): the same everywhere
        return first
    keys = list(first["moment_keys"])
    modules = []
    for m, wanted in enumerate(ranges):
        entry = {}
        for name, (start, numel) in wanted.items():
            pieces = [s["modules"][m][name] for s in shards]
            entry[name] = {"start": start, "numel": numel,
                           "master": _cut([(p["start"], p["master"]) for p in pieces], start, numel),
                           "moments": {k: _cut([(p["start"], p["moments"][k]) for p in pieces], start, numel)
                                       for k in keys}}
        modules.append(entry)
    return {"moment_keys": keys, "world_size": world_size, "modules": modules}


def _cut(pieces: Sequence[Tuple[int, torch.Tensor]], start: int, numel: int) -> torch.Tensor:
    """Positions [start, start + numel) of a flat vector held as disjoint (start, values) pieces."""
    out, covered = torch.zeros(numel, dtype=torch.float32), 0
    for piece_start, values in pieces:
        lo, hi = max(start, piece_start), min(start + numel, piece_start + values.numel())
        if lo < hi:
            out[lo - start: hi - start] = values[lo - piece_start: hi - piece_start]
            covered += hi - lo
    if covered != numel:
        raise RuntimeError(f"The checkpoint's snapshot shards cover {covered} of positions [{start}, {start + numel})"
                           " of a parameter: a shard is missing, or they were written by different runs.")
    return out


def load_states(folder: str) -> List[dict]:
    """Every old process's state file, memory-mapped: only the parts a re-cut reads come into memory."""
    return [torch.load(path, map_location="cpu", weights_only=False, mmap=True) for path in state_files(folder)]


def remove_universal_copies(ckpt_dir: str) -> None:
    """Drop the converted copies (caches of their originals, made by a resume on another world size): called when
    a newer checkpoint is published, so they do not pile up."""
    shutil.rmtree(os.path.join(ckpt_dir, UNIVERSAL_DIR), ignore_errors=True)
