"""benchmarks/checkpoint_scale.py: its parameter counts and 70B extrapolation against hand-computed values, and
(slow) its --quick run: one real 2-process launch saving, verifying and converting checkpoints of the tiny model."""
import importlib.util
import json
import os
import sys

import pytest

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "checkpoint_scale.py")


def bench():
    spec = importlib.util.spec_from_file_location("checkpoint_scale", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llama_2_70b_counts_are_the_published_ones():
    counts = bench().llama_counts(bench().LLAMA_70B, 64)
    assert abs(counts["base_parameters"] - 68.98e9) < 0.01e9  # Llama-2-70B: 68,976,648,192 parameters
    # per layer, r (d_in + d_out): q, o 2 x 16384, k, v 2 x 9216, gate, up 2 x 36864, down 36864 = 161792
    assert counts["adapter_parameters"] == 80 * 64 * 161792 and counts["modules"] == 560


def test_the_extrapolation_follows_its_stated_rule():
    """Two models on a line: 10 bytes per adapter parameter plus 1000 per process, rates of 1e9 bytes/s."""
    rows = [{"stage": 3, "adapter_parameters": p, "adapter_only_bytes": 10 * p + 2000, "adapter_only_save_s":
             (10 * p + 2000) / 2 / 1e9, "with_base_bytes": 4e9, "with_base_verify_s": 2.0,
             "adapter_only_universal_s": (10 * p + 2000) / 1e9} for p in (1e6, 4e6)]
    e = bench().extrapolate(rows, 3)
    adapter_params = 80 * 64 * 161792
    assert e["bytes_per_adapter_parameter"] == pytest.approx(10) and e["per_process_fixed_bytes"] == pytest.approx(1000)
    assert e["adapter_only_bytes"] == pytest.approx(10 * adapter_params + 64 * 1000)
    assert e["adapter_only_save_s"] == pytest.approx(e["adapter_only_bytes"] / 64 / 1e9)
    assert e["with_base_bytes"] == pytest.approx(e["adapter_only_bytes"] + 2 * 68976648192)  # bf16 fragments
    assert e["with_base_save_s"] == pytest.approx((e["adapter_only_bytes"] + 2 * 68976648192) / 64 / 1e9)


@pytest.mark.slow  # one 2-process launch, about 30 s
def test_checkpoint_scale_quick(tmp_path):
    out = tmp_path / "scale.json"
    proc = testing.run([sys.executable, BENCH, "--quick", "--json", str(out)], timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["measured"]
    assert [(r["model"], r["stage"]) for r in rows] == [("tiny", 2), ("tiny", 3)]
    for r in rows:
        assert 0 < r["adapter_only_bytes"] < r["with_base_bytes"]
        assert 0 < r["adapter_only_universal_bytes"] and r["adapter_only_save_s"] > 0
    assert [e["stage"] for e in result["extrapolated_70b_64_processes"]] == [2, 3]
    assert "(extrapolated)" in proc.stdout
