"""The reset records of a run's log.jsonl: how they are written, from launch/train.py or any training loop
(`log_reset`, process 0 only), and read back as of the run's final state (a resume supersedes what an interrupted
run logged after its checkpoint)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from ..backends.coordination import is_process_zero


def current_records(log_path: str) -> List[dict]:
    """The log's records as of the run's final state: a `resume` record at step s supersedes what the
    interrupted run logged after step s (those steps were redone from the checkpoint)."""
    records: List[dict] = []
    with open(log_path) as f:
        for line in f:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("type") == "resume":
                records = [r for r in records if r.get("step") is None or r["step"] <= record["step"]]
            records.append(record)
    return records


def read_resets(log_path: str) -> List[dict]:
    """The applied (not skipped) reset records, one per step: a step written twice (a controller's history
    written again after a resume) counts once, as last written."""
    by_step: Dict[int, dict] = {}
    for r in current_records(log_path):
        if r.get("type") == "reset":
            by_step[r["step"]] = r
    resets = sorted((r for r in by_step.values() if not r.get("skipped")), key=lambda r: r["step"])
    if not resets:
        raise ValueError(f"{log_path} has no reset records: the run ended before its first reset (interval steps).")
    return resets


def reset_log_record(record: dict) -> dict:
    """A BeamController reset record as log.jsonl holds it: `type: reset`, tuples as lists, anything else that
    JSON cannot hold as a string. The one encoding of `log_reset` and `RunLog.reset`."""
    if not isinstance(record, dict) or not {"step", "keep_fraction", "pruned"} <= set(record):
        raise ValueError(f"not a BeamLoRA reset record: {str(record)[:80]!r}; pass what BeamController.step() "
                         "returns at a reset, or an entry of beam.history.")
    encoded = json.dumps(record, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    return {"type": "reset", **json.loads(encoded)}


def is_log_writer() -> bool:
    """Whether this process writes the log: process 0 of an initialized torch.distributed group (DeepSpeed's
    included), or the only process. Every process holds the same reset records; one copy is enough."""
    return is_process_zero()


def log_reset(log_path: str, record: Optional[dict]) -> bool:
    """Append a reset record to `log_path` (a log.jsonl `beamlora-plot` reads) from your own training loop.

        record = beam.step(optimizer)
        log_reset("out/log.jsonl", record)       # None (no reset this step) writes nothing

    or after training: `for record in beam.history: log_reset(path, record)`. Only process 0 writes when
    torch.distributed is initialized, so every process may call it. Returns whether a line was written.
    """
    if record is None:
        return False
    line = json.dumps(reset_log_record(record))  # checked on every process, so all of them raise together
    if os.path.isdir(log_path):
        raise ValueError(f"{log_path} is a folder; pass the log file, e.g. {os.path.join(log_path, 'log.jsonl')}")
    if not is_log_writer():
        return False
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    with open(log_path, "a") as f:
        f.write(line + "\n")
    return True
