"""benchmarks/overhead.py --quick and benchmarks/quality.py --quick (their CI-sized forms) run end to end and write
every field; and what they compare is the same thing: before training all methods give the base model's loss
(peft's adapter switch is the oracle), and LoRA through our module with the score frozen follows stock peft LoRA
step for step, so any time difference between them is the cost of code, not of different work.
No timing is asserted: the numbers are for people, on a quiet machine.
"""
import json
import os
import statistics
import sys

import pytest

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
METHODS = {"lora", "frozen", "beamlora"}


def run_quick(script, out):
    """The scripts launch their own `deepspeed --num_gpus 2` workers (through beamlora_ds.testing too)."""
    proc = testing.run([sys.executable, os.path.join(ROOT, "benchmarks", script), "--quick", "--json", out],
                       timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    with open(out) as f:
        return json.load(f), proc.stdout


@pytest.fixture(scope="module")
def overhead(tmp_path_factory):
    return run_quick("overhead.py", tmp_path_factory.mktemp("overhead") / "overhead.json")


@pytest.fixture(scope="module")
def quality(tmp_path_factory):
    return run_quick("quality.py", tmp_path_factory.mktemp("quality") / "quality.json")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_overhead_reports_every_method_with_resets_and_snapshots_in_the_timed_window(overhead, stage):
    result, stdout = overhead
    summary, raw = result["stages"][stage]["summary"], result["stages"][stage]["raw"]
    assert set(summary["methods"]) == METHODS and f"ZeRO-{stage[-1]} |" in stdout
    for entry in summary["methods"].values():
        assert entry["median_step_s"] > 0 and entry["x_lora"] > 0 and entry["x_lora_paired"] > 0
        assert entry["tokens_per_s"] > 0 and entry["median_forward_s"] > 0
    # the medians leave out the warm-up and the snapshot and reset steps: recomputed here from the raw series
    events = set(raw["events"]["snapshot"]) | set(raw["events"]["reset"])
    ordinary = [t for t in range(raw["warmup"] + 1, raw["steps"] + 1) if t not in events]
    median = {m: statistics.median(raw["series"][m]["step_s"][t - 1] for t in ordinary) for m in METHODS}
    for m in METHODS:
        assert summary["methods"][m]["median_step_s"] == pytest.approx(median[m])
        assert summary["methods"][m]["x_lora"] == pytest.approx(median[m] / median["lora"])
    assert len(summary["reset"]) >= 2 and len(summary["snapshot"]) >= 2
    assert summary["reset"][0]["ranks_pruned"] > 0  # the first reset really moved ranks
    assert all(e["controller_x_step"] > 0 for e in summary["reset"])
    assert raw["threads_per_process"] >= 1 and raw["world"] == 2
    # tokens per step are the non-pad tokens of both processes' micro-batches: at least one token per example
    assert all(t >= 2 * raw["micro_batch"] for t in raw["tokens_per_step"])
    assert summary["extra_state_bytes_per_process"]["snapshot"] == 3 * 4 * raw["adapter_elements"] // 2
    assert result["verdict"]["beamlora_x_lora"][stage] == pytest.approx(median["beamlora"] / median["lora"])
    assert summary["profile_growth_ms_per_step"], "--quick profiles a step of lora and beamlora"


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_overhead_methods_compute_the_same_function(overhead, stage):
    raw = overhead[0]["stages"][stage]["raw"]
    # B = 0 at init: every method is exactly the base model, whose loss peft's disable_adapter() gives
    base = raw["loss_at_init"]["base"]
    for m in METHODS:
        assert raw["loss_at_init"][m] == pytest.approx(base, abs=1e-6), m
    losses = {m: raw["series"][m]["loss"] for m in METHODS}
    # same init, batches and optimizer: our module with a frozen score is peft LoRA, step after step
    assert max(abs(a - b) for a, b in zip(losses["frozen"], losses["lora"])) <= 1e-5
    # while full BeamLoRA trains its score, so it leaves that trajectory (the test would see a vanilla arm)
    assert losses["beamlora"][0] == pytest.approx(losses["lora"][0], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(losses["beamlora"], losses["lora"])) > 1e-6


def test_quality_reports_every_seed_and_method(quality):
    result, stdout = quality
    runs = result["runs"]
    seeds = sorted({r["seed"] for r in runs})
    assert seeds == [0, 1, 2]
    for seed in seeds:
        mine = {r["method"]: r for r in runs if r["seed"] == seed}
        assert set(mine) == {"lora", "beamlora"}
        for r in mine.values():
            assert 0.0 <= r["exact_match"] <= 1.0 and r["eval_questions"] == result["settings"]["eval_samples"]
            assert len(r["losses"]) == result["settings"]["steps"]
        # paired comparison: same init and batches, so the first loss (before any update) is the same
        assert mine["beamlora"]["losses"][0] == pytest.approx(mine["lora"]["losses"][0], abs=1e-6)
        assert mine["beamlora"]["resets"] and mine["beamlora"]["resets"][0]["ranks_pruned"] > 0
        assert mine["lora"]["resets"] == []
        assert 0.0 <= mine["lora"]["exact_match_before"] <= 1.0  # the untrained model, on the same questions
    for method, entry in result["summary"]["methods"].items():
        scores = [r["exact_match"] for r in runs if r["method"] == method]
        assert entry["mean"] == pytest.approx(statistics.mean(scores))
        assert entry["std"] == pytest.approx(statistics.stdev(scores))
        assert (entry["min"], entry["max"], entry["n"]) == (min(scores), max(scores), len(seeds))
    assert "beamlora - lora:" in stdout
