"""benchmarks/score_path.py --quick runs, checks its fused and table variants against the library's per-module score
path, and writes JSON."""
import json
import os
import sys

import pytest

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow  # a benchmark run of about 10 s
def test_score_path_quick(tmp_path):
    out = tmp_path / "score_path.json"
    proc = testing.run([sys.executable, "benchmarks/score_path.py", "--quick", "--json", str(out)], timeout=300,
                       cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["fused_vs_plain_max_grad_diff"] <= 1e-5 and result["table_vs_plain_max_grad_diff"] <= 1e-5
    assert set(result["median_s"]) == {"none", "plain", "fused", "table"}
    ops = result["aten_ops_per_step"]
    assert ops["none"] < ops["table"] < ops["plain"]  # the table's per-module cost is only the row multiply
    settings = result["settings"]
    assert all(len(ts) == settings["repeats"] * settings["rounds"] for ts in result["times_s"].values())
    assert "plain" in proc.stdout and "per module us" in proc.stdout
