"""Crash points fire exactly where asked (the kill-and-resume test relies on it), and a resumed run's log reads
as its final state."""
import json
import os
import signal
import sys

import pytest

from beamlora_ds import testing
from beamlora_ds.testing.failpoints import _matches
from beamlora_ds.telemetry.reset_log import current_records


@pytest.mark.parametrize("spec, point, step, rank, fires", [
    ("reset@8", "reset", 8, "0", True),
    ("reset@8", "reset", 9, "0", False),
    ("reset@8", "snapshot", 8, "0", False),
    ("reset@8:1", "reset", 8, "0", False),
    ("reset@8:1", "reset", 8, "1", True),
    ("step@3,checkpoint@9:0", "checkpoint", 9, "0", True),
    ("adapter", "adapter", None, "1", True),
    ("adapter@:0", "adapter", None, "1", False),
    ("latest@12", "latest", None, "0", False),
])
def test_matches(spec, point, step, rank, fires):
    assert _matches(spec, point, step, rank) is fires


def test_unknown_point_is_an_error():
    with pytest.raises(ValueError, match="unknown point 'rest'"):
        _matches("rest@3", "reset", 3, "0")


def test_kill_point_really_sigkills():
    code = "from beamlora_ds.testing.failpoints import kill_point\nkill_point('step', 2)\nkill_point('step', 3)\nprint('alive')"
    env = {**os.environ, "BEAMLORA_DS_KILL_AT": "step@3", "RANK": "0"}
    proc = testing.run([sys.executable, "-c", code], timeout=60, env=env)
    assert proc.returncode == -signal.SIGKILL and "alive" not in proc.stdout


def test_current_records_drop_what_a_resume_redid(tmp_path):
    log = tmp_path / "log.jsonl"
    rows = [{"type": "train", "step": s, "loss": 10 - s} for s in range(1, 6)] + [{"type": "reset", "step": 4}]
    rows += [{"type": "resume", "step": 3}] + [{"type": "train", "step": s, "loss": 20 - s} for s in range(4, 7)]
    rows += [{"type": "reset", "step": 4}, {"type": "summary", "steps": 6}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = current_records(str(log))
    assert [(r["type"], r.get("step")) for r in records] == [
        ("train", 1), ("train", 2), ("train", 3), ("resume", 3), ("train", 4), ("train", 5), ("train", 6),
        ("reset", 4), ("summary", None)]
    assert [r["loss"] for r in records if r["type"] == "train"] == [9, 8, 7, 16, 15, 14]
