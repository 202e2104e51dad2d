"""benchmarks/reset_cost.py --quick runs under 2 processes and its byte count follows the formula."""
import json
import os

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_reset_cost_quick(tmp_path):
    out = tmp_path / "reset_cost.json"
    proc = testing.run(testing.spawn_command("benchmarks/reset_cost.py", ["--quick", "--json", out]), timeout=240,
                       cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "x median step" in proc.stdout
    assert len(result["reset_x_step"]) == 2 and len(result["snapshot_x_step"]) == 2
    assert result["modules_touched"][0] == result["modules"]  # p0 = 0.5: the first reset touches every module
    assert result["reset_all_reduce_bytes"] == result["reset_bytes_formula"]
