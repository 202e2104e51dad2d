"""Crash points for the kill-and-resume tests: the process SIGKILLs itself at a named moment.

    BEAMLORA_DS_KILL_AT="reset@8:1"        process with RANK 1 dies in the reset of step 8
    BEAMLORA_DS_KILL_AT="checkpoint@9,adapter"   several points; no step: at any step; no rank: every process

Points: step (between backward and the optimizer step), snapshot, reset (weights half edited), checkpoint (one
process's files written, the others' not), latest (tag folder renamed, `latest` not yet moved), adapter (files
written, not yet renamed). Unset, it costs one environment lookup.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

ENV = "BEAMLORA_DS_KILL_AT"
POINTS = ("step", "snapshot", "reset", "checkpoint", "latest", "adapter")


def kill_point(point: str, step: Optional[int] = None) -> None:
    spec = os.environ.get(ENV)
    if spec and _matches(spec, point, step, os.environ.get("RANK", "0")):
        os.kill(os.getpid(), signal.SIGKILL)


def _matches(spec: str, point: str, step: Optional[int], rank: str) -> bool:
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, rest = item.partition("@")
        at, _, who = rest.partition(":")
        if where not in POINTS:
            raise ValueError(f"{ENV}={spec!r}: unknown point {where!r}; use one of {POINTS}.")
        if where == point and (not at or (step is not None and int(at) == step)) and (not who or who == rank):
            return True
    return False
