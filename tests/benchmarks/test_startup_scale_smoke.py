"""benchmarks/startup_scale.py: the --quick run on 2 processes (the ~10M Llama, bf16 and 4-bit under ZeRO-3, 4-bit
also with both processes loading at once: real launches) writes the expected JSON; and the start-up cost
model's arithmetic (benchmarks/startup_fit.py) against hand-computed values."""
import json
import math
import os
import sys

import pytest

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import startup_fit  # noqa: E402

B70 = 137_953_296_384  # Llama-2-70B in bf16: 2 x 68,976,648,192 parameters
NF4_70 = 36_362_993_664  # 68,451,041,280 linear weights x (0.5 + 1/64 + 1/4096) + 2 x 525,606,912 others
C70 = 1_086_259_200  # the constants alone: 68,451,041,280 x (1/64 + 1/4096)


@pytest.mark.slow  # three launches of 2 processes: about 30 s (the benchmark's 1-process points add nothing new)
def test_quick_run_writes_every_figure(tmp_path):
    out = tmp_path / "startup.json"
    proc = testing.run([sys.executable, "benchmarks/startup_scale.py", "--quick", "--nprocs", "2", "--json", str(out)],
                       timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "EXTRAPOLATED to Llama-2-70B" in proc.stdout
    result = json.loads(out.read_text())
    configurations = {(p["mode"], p["nproc"], p["at_once"]): p for p in result["points"]}
    assert sorted(configurations) == [("bf16", 2, 1), ("nf4", 2, 1), ("nf4", 2, 2)]
    for p in result["points"]:
        for key in ("load_s", "from_pretrained_s", "initialize_s", "first_step_s", "startup_s",
                    "node_peak_loading_above_baseline", "process_peak_loading_above_baseline",
                    "node_peak_above_baseline", "node_after_init_above_baseline"):
            assert p[key] > 0, (key, p)
        assert p["to_first_step_s"] > p["load_s"] and len(p["processes"]) == p["nproc"]
        assert 0 <= p["others_cpu_share"] <= 1
    in_turns = {r["rank"]: r["turns"] for r in configurations[("nf4", 2, 1)]["processes"]}
    assert [t[:2] for t in in_turns[1]] == [[0, 2]] and [t[:2] for t in in_turns[0]] == [[1, 2]]  # rank 0 last
    at_once = {r["rank"]: r["turns"] for r in configurations[("nf4", 2, 2)]["processes"]}
    assert [t[:2] for t in at_once[0]] == [t[:2] for t in at_once[1]] == [[0, 1]]  # turns:2, both in one turn
    assert result["speeds"]["disk_bytes_per_s"] > 0 and result["assumptions"]["nvme_bytes_per_s"] == 3e9
    assert set(result["fits"]) == {"bf16", "nf4"}
    for mode, rows in result["extrapolated_70b"].items():
        for row in rows:
            assert row["extrapolated"] is True and row["model"] == "Llama-2-70B" and row["nproc"] == 8
            assert row["load_s_disk_floor_cached"] > 0 and row["node_peak_loading_above_baselines_bytes"] > 0
            assert (row["load_s_at_this_machines_speed"] is None) == (row["at_once"] > 1)
            assert row["at_once"] > 1 or row["load_s_at_this_machines_speed"] > 0
    assert [row["at_once"] for row in result["extrapolated_70b"]["nf4"]] == [1, 2, 4, 8]
    assert [(k["size"], k["nproc"], k["at_once"]) for k in result["loaders_at_once"]] == [("tiny", 2, 2)]
    assert result["loaders_at_once"][0]["load_ratio"] > 0


def test_llama_sizes_match_the_published_counts():
    assert startup_fit.llama_counts(startup_fit.LLAMA2_70B) == {
        "linear": 80 * (2 * 8192 ** 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672), "other": 2 * 32000 * 8192 + 161 * 8192,
        "total": 68_976_648_192, "tensors": 80 * 9 + 3}  # 9 per layer, the final norm, embeddings and lm_head
    smollm = {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3, "vocab": 49152,
              "tied": True}
    assert startup_fit.llama_counts(smollm)["total"] == 134_515_008  # SmolLM2-135M's parameter count
    assert startup_fit.llama_counts(smollm)["tensors"] == 272  # tied: one embedding
    assert startup_fit.checkpoint_bytes(startup_fit.LLAMA2_70B) == B70
    assert startup_fit.model_bytes(startup_fit.LLAMA2_70B, "bf16") == B70
    assert startup_fit.model_bytes(startup_fit.LLAMA2_70B, "nf4") == NF4_70


def test_the_fit_recovers_a_known_model():
    """Points made from t = 0.4 + 0.01 T + 3e-9 B + (0.002 T + 1e-9 B) (turns - 1), p = 5e7 + 1.2 M and, from 2
    processes on, n = 1e8 + 1.5 M + P C fit back exactly."""
    points = []
    for size, (T, B, M, C) in {"a": (21, 2e7, 6e6, 1e5), "b": (272, 2.7e8, 9e7, 1e6), "c": (183, 9.6e8, 3e8, 6e6)
                               }.items():
        for nproc in (1, 2):
            points.append({"size": size, "mode": "nf4", "nproc": nproc, "tensors": T, "checkpoint_bytes": B,
                           "model_bytes": M, "constant_bytes": C,
                           "load_s": 0.4 + 0.01 * T + 3e-9 * B + (0.002 * T + 1e-9 * B) * (nproc - 1),
                           "node_peak_loading_above_baseline": (1e8 + 1.5 * M + nproc * C) if nproc > 1 else M,
                           "process_peak_loading_above_baseline": 5e7 + 1.2 * M})
    points.append(dict(points[-1], at_once=2, load_s=1e6))  # loaders at once: reported, never fitted
    fits = startup_fit.fit_mode(points)
    assert fits["points"] == 6 and fits["node_points"] == 3  # one process has no partitioning while it loads
    assert fits["time_full"] == pytest.approx([0.4, 0.01, 3e-9, 0.002, 1e-9], rel=1e-6)
    assert fits["node_memory"] == pytest.approx([1e8, 1.5], rel=1e-6)
    assert fits["process_memory"] == pytest.approx([5e7, 1.2], rel=1e-6)
    assert fits["residuals"][0]["node_peak_loading_above_baseline"] == [6e6, None]
    assert fits["residuals"][1]["node_peak_loading_above_baseline"] == pytest.approx([1.092e8, 1.092e8])
    bf16 = [dict(p, mode="bf16", constant_bytes=0.0, node_peak_loading_above_baseline=2e7 + 1.4 * p["model_bytes"]
                 + 3e7 * (p["nproc"] - 1)) for p in points[:6]]
    assert startup_fit.fit_mode(bf16)["node_memory"] == pytest.approx([2e7, 1.4, 3e7], rel=1e-6)


def test_the_70b_extrapolation_by_hand():
    fits = {"time_full": [0.5, 0.01, 2e-9, 0.002, 1e-9], "time_bytes_only": [0.5, 3e-9, 2e-9],
            "node_memory": [1e9, 1.25], "process_memory": [5e8, 0.8]}
    assumptions = {"nvme_bytes_per_s": 3e9, "page_cache_bytes_per_s": 10e9}
    one = startup_fit.extrapolate("nf4", fits, assumptions, nproc=8, at_once=1)
    assert one["extrapolated"] is True and one["turns"] == 8 and one["tensors"] == 723
    assert one["constant_bytes"] == pytest.approx(C70)
    assert one["load_s_at_this_machines_speed"] == pytest.approx(  # 0.5 + 7.23 + 275.9 + 10.1 + 965.7 = 1259.5 s
        0.5 + 0.01 * 723 + 2e-9 * B70 + (0.002 * 723 + 1e-9 * B70) * 7)
    assert one["load_s_at_this_machines_speed_bytes_only"] == pytest.approx(0.5 + 3e-9 * B70 + 2e-9 * B70 * 7)
    assert one["load_s_disk_floor_cached"] == pytest.approx(B70 / 3e9 + 7 * B70 / 10e9)  # 46.0 + 96.6 s
    assert one["load_s_disk_floor_uncached"] == pytest.approx(8 * B70 / 3e9)  # 367.9 s
    assert one["node_peak_loading_above_baselines_bytes"] == pytest.approx(1e9 + 1.25 * NF4_70 + 8 * C70)  # 55.2 GB
    assert one["process_peak_loading_above_baseline_bytes"] == pytest.approx(5e8 + 0.8 * NF4_70)  # 29.6 GB
    two = startup_fit.extrapolate("nf4", fits, assumptions, nproc=8, at_once=2)
    assert two["turns"] == 4 and two["load_s_at_this_machines_speed"] is None  # not modelled on this machine
    assert two["load_s_disk_floor_uncached"] == pytest.approx(4 * B70 / 3e9)
    assert two["node_peak_loading_above_baselines_bytes"] == pytest.approx(  # 59.2 + 6.5 GB: two loads at once
        2 * (5e8 + 0.8 * NF4_70) + 6 * C70)
    four = startup_fit.extrapolate("nf4", fits, assumptions, nproc=8, at_once=4)
    assert four["node_peak_loading_above_baselines_bytes"] == pytest.approx(4 * (5e8 + 0.8 * NF4_70) + 4 * C70)
    bf16 = startup_fit.extrapolate("bf16", dict(fits, node_memory=[1e9, 1.5, 2e8]), assumptions, nproc=8)
    assert bf16["turns"] == 1 and bf16["load_s_disk_floor_cached"] == pytest.approx(B70 / 3e9)  # rank 0 reads once
    assert bf16["load_s_at_this_machines_speed"] == pytest.approx(  # P - 1 = 7 more processes
        0.5 + 0.01 * 723 + 2e-9 * B70 + (0.002 * 723 + 1e-9 * B70) * 7)
    assert bf16["constant_bytes"] == 0 and bf16["node_peak_loading_above_baselines_bytes"] == pytest.approx(
        1e9 + 1.5 * B70 + 2e8 * 7)
    slow_cache = startup_fit.extrapolate("nf4", fits, dict(assumptions, page_cache_bytes_per_s=1e9), 8)
    assert slow_cache["load_s_disk_floor_cached"] == pytest.approx(8 * B70 / 3e9)  # never slower than the disk
    assert math.ceil(8 / 3) == startup_fit.turns(8, 3) == 3
