"""What a checkpoint folder holds and what its parts are called.

    <save_dir>/latest                        the tag of the newest complete checkpoint
    <save_dir>/<tag>/                        DeepSpeed's files, one beamlora_state_rank{N}.pt per data-parallel
                                             process (the controller's state and that process's RNG states) and
                                             manifest.json (sizes and checksums of all of them)
    <save_dir>/<tag>.partial/                a checkpoint still being written (never loaded)
    <save_dir>/.universal/<tag>/             DeepSpeed's universal copy, made to resume on another world size
"""
from __future__ import annotations

import os
import re
from typing import List, Optional

from .atomic import PARTIAL

STATE_FILE = "beamlora_state_rank{rank}.pt"
STATE_PATTERN = re.compile(r"beamlora_state_rank(\d+)\.pt$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the previous one and `latest` are intact."""


class CheckpointDamagedError(ValueError):
    """A checkpoint's files do not match its manifest (truncated, corrupted or missing)."""


def validate_tag(tag: str) -> str:
    """`tag` when it can name a checkpoint folder beside `latest` and the `.partial` staging folders."""
    if tag in ("", "latest") or tag.startswith(".") or os.sep in tag or tag.endswith(PARTIAL):
        raise ValueError(f"checkpoint tag {tag!r}: use a plain folder name (not 'latest', not starting with '.', "
                         f"no '/', not ending in {PARTIAL!r}).")
    return tag


def read_latest(load_dir: str) -> Optional[str]:
    """The tag `latest` names in `load_dir`, or None when there is no `latest`."""
    try:
        with open(os.path.join(load_dir, "latest")) as f:
            return f.read().strip()
    except OSError:
        return None


def state_files(folder: str) -> List[str]:
    """The checkpoint's BeamLoRA state files in rank order; a gap (a lost file) is an error naming it."""
    found = sorted((int(STATE_PATTERN.match(n).group(1)), n) for n in os.listdir(folder) if STATE_PATTERN.match(n))
    for expected, (rank, name) in enumerate(found):
        if rank != expected:
            raise FileNotFoundError(f"{folder}: {STATE_FILE.format(rank=expected)} is missing (found {name}); the "
                                    "checkpoint is incomplete.")
    return [os.path.join(folder, name) for _, name in found]
