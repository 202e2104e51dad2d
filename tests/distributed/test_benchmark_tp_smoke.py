"""benchmarks/tp_overhead.py --quick (its CI-sized form) runs end to end and writes both comparisons: beamlora against
the adapter-free base in one TP=2 launch, and BeamLoRA under TP=2 against ZeRO-3 in alternating launches. And what
they compare is the same thing: AutoTP split the bases of both TP engines, the base and BeamLoRA give the same loss
before any update (B = 0), and TP=2 and ZeRO-3 train the same run on the same global batch, step for step.
No timing is asserted: the numbers are for people, on a quiet machine.
"""
import json
import math
import os
import statistics
import sys

import pytest

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINEAR_LAYER = "deepspeed.module_inject.layers.LinearLayer"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp_overhead") / "tp_overhead.json"
    proc = testing.run([sys.executable, os.path.join(ROOT, "benchmarks", "tp_overhead.py"), "--quick", "--json", out],
                       timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f), proc.stdout


def test_beamlora_against_base_under_tp(quick):
    result, stdout = quick
    summary, raw = result["tp_pair"]["summary"], result["tp_pair"]["raw"]
    assert raw["tp"] == 2 and raw["replicas"] == 1 and raw["micro_batch_per_process"] == raw["global_batch"]
    assert set(summary["engines"]) == {"base", "beamlora"} and "TP=2 (ZeRO-1) |" in stdout
    for name, entry in summary["engines"].items():
        assert entry["median_step_s"] > 0 and entry["tokens_per_s"] > 0 and entry["losses_finite"], name
        assert all(math.isfinite(v) for v in raw["series"][name]["loss"]), name
        assert len(raw["series"][name]["step_s"]) == raw["steps"]
        # AutoTP split the base in both engines (ours through prepare_tensor_parallel, the rest in initialize)
        assert raw["engines"][name]["q_proj_base"]["class"] == LINEAR_LAYER, name
        assert raw["engines"][name]["row_parallel_layers"] > 0, name
    beamlora = summary["engines"]["beamlora"]
    assert beamlora["x_base"] == pytest.approx(beamlora["median_step_s"] / summary["engines"]["base"]["median_step_s"])
    assert beamlora["x_base_paired"] > 0
    # B = 0 before the first update: BeamLoRA is the base model, on the same batch
    assert summary["loss_step1_abs_diff"] <= 1e-5
    assert raw["resets"] and raw["resets"][0]["ranks_pruned"] > 0  # the controller ran under TP
    # every adapted layer adds its own all-reduce (forward for a row-parallel base, backward for a column one)
    calls = {name: c["all_reduce"]["calls"] for name, c in raw["collectives_per_step_rank0"].items()}
    assert calls["beamlora"] >= calls["base"] + raw["engines"]["beamlora"]["split_layers"] > calls["base"] > 0


def test_tp_against_zero3(quick):
    result, stdout = quick
    summary, launches = result["tp_vs_zero3"]["summary"], result["tp_vs_zero3"]["launches"]
    assert [lo["mode"] for lo in launches] == ["tp", "zero3"] * result["settings"]["rounds"]  # alternating launches
    assert set(summary["modes"]) == {"tp", "zero3"} and summary["tp_x_zero3"] > 0
    for lo in launches:
        raw = lo["raw"]
        assert raw["tokens_per_step"] == raw["global_batch"] * raw["seq_len"]
        assert raw["micro_batch_per_process"] * raw["replicas"] == raw["global_batch"]  # the same work per step
        assert all(math.isfinite(v) for v in raw["series"]["beamlora"]["loss"])
        assert (raw["engines"]["beamlora"]["q_proj_base"]["class"] == LINEAR_LAYER) == (lo["mode"] == "tp")
    tp = [statistics.median(lo["raw"]["series"]["beamlora"]["step_s"][t - 1] for t in range(lo["raw"]["warmup"] + 1,
                                                                                             lo["raw"]["steps"] + 1)
                            if t not in set(lo["raw"]["events"]["snapshot"]) | set(lo["raw"]["events"]["reset"]))
          for lo in launches if lo["mode"] == "tp"]
    assert summary["modes"]["tp"]["launch_medians"] == pytest.approx(tp)
    # the same run split two ways: the same losses step for step
    assert summary["loss_trajectory_max_abs_diff"] <= 1e-4
    assert "TP / ZeRO-3:" in stdout
    zero3 = next(lo["raw"]["collectives_per_step_rank0"]["beamlora"] for lo in launches if lo["mode"] == "zero3")
    assert zero3["all_gather_into_tensor"]["calls"] > 0  # ZeRO-3 gathers its parameters: the counting sees it
