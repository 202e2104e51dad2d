"""NaN/Inf never reaches a reset, and steps DeepSpeed skips are not BeamLoRA steps (issue 8, part 3).

Real single-process DeepSpeed engines (fault_worker.py). The oracle for "which steps were applied" is
DeepSpeed's own bookkeeping: engine.was_step_applied() and engine.skipped_steps.
"""
import json
import os
import sys

import pytest

from beamlora_ds import testing

from deepspeed.accelerator import get_accelerator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# DeepSpeed refuses fp16 where its accelerator has none (a CPU without AVX512-FP16/AMX-FP16 for oneDNN)
FP16 = get_accelerator().is_fp16_supported()
RUNS = {**({"fp16": {"dtype": "fp16", "nan_at": [12]}} if FP16 else {}), "zero3": {"stage": 3, "nan_at": [6]},
        "stage0": {"stage": 0, "nan_at": [6]}}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """The runs below, one after another in one single-process DeepSpeed job."""
    folder = tmp_path_factory.mktemp("faults")
    (folder / "runs.json").write_text(json.dumps(RUNS))
    proc = testing.run([sys.executable, os.path.join(HERE, "fault_worker.py"), "--runs", folder / "runs.json",
                        "--out", folder / "faults.json"], timeout=240, env=testing.single_process_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((folder / "faults.json").read_text())


def assert_counts_only_applied_steps(result, steps=24, interval=4):
    for s in result["steps"]:
        assert s["beam_step"] == s["global_steps"] - s["skipped_steps"], s
        reset_due = s["applied"] and s["beam_step"] % interval == 0 and s["beam_step"] < steps
        assert (s["reset"] is not None) == reset_due, s
    assert result["beam_step"] == steps
    assert [r["step"] for r in result["history"]] == list(range(interval, steps, interval))
    assert not any(r.get("skipped") for r in result["history"])
    assert result["adapters_finite"]


@pytest.mark.skipif(not FP16, reason="DeepSpeed refuses fp16 on this CPU (no oneDNN fp16: AVX512-FP16/AMX-FP16)")
def test_fp16_overflow_and_nan_steps_are_not_counted(results):
    result = results["fp16"]
    skipped = [s["engine_step"] for s in result["steps"] if not s["applied"]]
    assert 12 in skipped and len(skipped) >= 3, skipped  # the NaN step and loss-scale overflows
    assert_counts_only_applied_steps(result)


def test_zero3_skips_a_nan_step_and_beamlora_does_not_count_it(results):
    result = results["zero3"]
    assert [s["engine_step"] for s in result["steps"] if not s["applied"]] == [6]
    assert_counts_only_applied_steps(result)


def test_a_nan_loss_that_reaches_the_weights_cancels_the_next_reset_and_training_goes_on(results):
    """ZeRO stage 0 with a torch optimizer applies the NaN update: the reset at 8 must not copy NaN ranks."""
    result = results["stage0"]
    assert all(s["applied"] for s in result["steps"]) and result["beam_step"] == 24
    first = result["history"][0]
    assert first["step"] == 4 and not first.get("skipped") and first["pruned"]
    assert result["history"][1] == {"step": 8, "keep_fraction": result["history"][1]["keep_fraction"],
                                    "skipped": "non-finite loss at step 6", "pruned": [], "sources": []}
    assert all(r.get("skipped") for r in result["history"][1:])  # the weights stay NaN: every later reset skips
