"""NaN/Inf never reaches a reset, and steps DeepSpeed skips are not BeamLoRA steps (issue 8, part 3).

Real single-process DeepSpeed engines (fault_worker.py). The oracle for "which steps were applied" is
DeepSpeed's own bookkeeping: engine.was_step_applied() and engine.skipped_steps.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import remove_shm_buffers  # noqa: E402

pytest.importorskip("deepspeed")
HERE = os.path.dirname(os.path.abspath(__file__))


def run_worker(tmp_path, *args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "faults.json"
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port}
    try:
        proc = subprocess.run([sys.executable, os.path.join(HERE, "fault_worker.py"), *args, "--out", str(out)],
                              capture_output=True, text=True, timeout=240, env=env)
    finally:
        remove_shm_buffers(port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def assert_counts_only_applied_steps(result, steps=24, interval=4):
    for s in result["steps"]:
        assert s["beam_step"] == s["global_steps"] - s["skipped_steps"], s
        assert (s["reset"] is not None) == (s["applied"] and s["beam_step"] % interval == 0 and s["beam_step"] < steps), s
    assert result["beam_step"] == steps
    assert [r["step"] for r in result["history"]] == list(range(interval, steps, interval))
    assert not any(r.get("skipped") for r in result["history"])
    assert result["adapters_finite"]


def test_fp16_overflow_and_nan_steps_are_not_counted(tmp_path):
    result = run_worker(tmp_path, "--dtype", "fp16", "--nan_at", "12")
    skipped = [s["engine_step"] for s in result["steps"] if not s["applied"]]
    assert 12 in skipped and len(skipped) >= 3, skipped  # the NaN step and loss-scale overflows
    assert_counts_only_applied_steps(result)


def test_zero3_skips_a_nan_step_and_beamlora_does_not_count_it(tmp_path):
    result = run_worker(tmp_path, "--dtype", "fp32", "--stage", "3", "--nan_at", "6")
    assert [s["engine_step"] for s in result["steps"] if not s["applied"]] == [6]
    assert_counts_only_applied_steps(result)


def test_a_nan_loss_that_reaches_the_weights_cancels_the_next_reset_and_training_goes_on(tmp_path):
    """ZeRO stage 0 with a torch optimizer applies the NaN update: the reset at 8 must not copy NaN ranks."""
    result = run_worker(tmp_path, "--dtype", "fp32", "--stage", "0", "--nan_at", "6")
    assert all(s["applied"] for s in result["steps"]) and result["beam_step"] == 24
    first = result["history"][0]
    assert first["step"] == 4 and not first.get("skipped") and first["pruned"]
    assert result["history"][1] == {"step": 8, "keep_fraction": result["history"][1]["keep_fraction"],
                                    "skipped": "non-finite loss at step 6", "pruned": [], "sources": []}
    assert all(r.get("skipped") for r in result["history"][1:])  # the weights stay NaN: every later reset skips
