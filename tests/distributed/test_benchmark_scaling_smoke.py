"""benchmarks/reset_scaling.py --quick (1 and 2 real processes): every reset communicates exactly what the derived
formulas say, counted independently by DeepSpeed's own comms logger, and the cost model is fitted and extrapolated."""
import json
import os
import sys

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def projection_sums(hidden, intermediate, heads=8, kv_heads=4):
    """d_in + d_out of q, k, v, o, gate, up, down of the Llama reset_cost.py builds (8 heads, 4 KV heads)."""
    kv = kv_heads * hidden // heads
    return [2 * hidden, hidden + kv, hidden + kv, 2 * hidden] + [hidden + intermediate] * 3


def test_reset_scaling_quick(tmp_path):
    out = tmp_path / "reset_scaling.json"
    proc = testing.run([sys.executable, "benchmarks/reset_scaling.py", "--quick", "--json", out], timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert {r["world"] for r in rows} == {1, 2} and len(rows) == 12  # 2 worlds x 2 configurations x 3 resets
    for r in rows:
        sums = projection_sums(r["hidden"], r["intermediate"])
        assert r["adapter_elements"] == r["layers"] * r["r"] * sum(sums)
        assert r["modules"] == 7 * r["layers"]
        # S sums one (d_in + d_out) per pruned rank
        assert r["pruned"] * min(sums) <= r["pruned_din_plus_dout"] <= r["pruned"] * max(sums)
        assert r["bytes_logged"] == r["bytes"] == 4 * (r["modules"] * r["r"] + 3 * r["pruned_din_plus_dout"])
        assert r["collectives"] == (2 if r["pruned"] else 1)
    assert any(r["pruned"] == 0 for r in rows) and any(r["pruned"] > 10 for r in rows)
    assert all(result["checks"].values())

    model = result["model"]
    assert set(model["constants"]) == {"collectives", "ring_bytes", "modules", "modules_touched", "elements",
                                       "local_elements",
                                       "partition_elements"}
    assert all(v >= 0 for v in model["constants"].values()) and model["points"] == len(rows)
    assert all(r["model_s"] > 0 for r in rows)
    assert "Cost model" in proc.stdout and "Extrapolation: Llama-2-70B" in proc.stdout

    extra = result["extrapolation"]
    per_layer = 2 * (8192 + 8192) + 2 * (8192 + 1024) + 3 * (8192 + 28672)  # q, o; k, v (8 KV heads); MLP
    assert extra["modules"] == 560 and extra["adapter_elements"] == 80 * 64 * per_layer
    bound = extra["scenarios"]["every rank (the formula's bound)"]
    assert bound["bytes"] == 4 * (560 * 64 + 3 * 80 * 64 * per_layer)
    first = extra["scenarios"]["first reset (paper schedule, importance spread evenly)"]
    assert 0.04 < first["pruned_ranks"] / (560 * 64) < 0.06  # about 1 - p0 = 5% at the first reset
    assert len({s["bytes"] for s in extra["worlds"].values()}) == 1  # the bytes do not depend on the world size

