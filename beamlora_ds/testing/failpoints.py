"""Crash points for the kill-and-resume tests: the process SIGKILLs itself at a named moment; and failing writes
for the disk-full tests: a write raises OSError(ENOSPC) at a named moment.

    BEAMLORA_DS_KILL_AT="reset@8:1"        process with RANK 1 dies in the reset of step 8
    BEAMLORA_DS_KILL_AT="checkpoint@9,adapter"   several points; no step: at any step; no rank: every process

Points: step (between backward and the optimizer step), snapshot, reset (weights half edited), checkpoint (one
process's files written, the others' not), latest (tag folder renamed, `latest` not yet moved), adapter (files
written, not yet renamed). Unset, it costs one environment lookup.

    BEAMLORA_DS_FAIL_WRITE_AT="deepspeed@4:1"   process with RANK 1 finds the disk full while DeepSpeed writes its
                                                 files of the checkpoint of step 4

Write points (same syntax): state (our state file), deepspeed (DeepSpeed's files), manifest, latest.
"""
from __future__ import annotations

import errno
import os
import signal
from typing import Optional

ENV = "BEAMLORA_DS_KILL_AT"
POINTS = ("step", "snapshot", "reset", "checkpoint", "latest", "adapter")
FAIL_ENV = "BEAMLORA_DS_FAIL_WRITE_AT"
WRITE_POINTS = ("state", "deepspeed", "manifest", "latest")


def kill_point(point: str, step: Optional[int] = None) -> None:
    spec = os.environ.get(ENV)
    if spec and _matches(spec, point, step, os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def fail_write_point(point: str, step: Optional[int] = None) -> None:
    """Raise the OSError a full disk raises, where BEAMLORA_DS_FAIL_WRITE_AT asks."""
    spec = os.environ.get(FAIL_ENV)
    if spec and _matches(spec, point, step, os.environ.get("RANK", "0"), WRITE_POINTS, FAIL_ENV):
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {FAIL_ENV}={spec})")


def _matches(spec: str, point: str, step: Optional[int], rank: str, points=POINTS, env=ENV) -> bool:
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, rest = item.partition("@")
        at, _, who = rest.partition(":")
        if where not in points:
            raise ValueError(f"{env}={spec!r}: unknown point {where!r}; use one of {points}.")
        if where == point and (not at or (step is not None and int(at) == step)) and (not who or who == rank):
            return True
    return False
