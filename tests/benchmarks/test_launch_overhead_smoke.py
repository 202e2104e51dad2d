"""benchmarks/launch_overhead.py runs one spawn.py launch of its join-only worker (real DeepSpeed, 2 gloo processes),
prints its table and writes JSON; a launcher it does not know is refused before any launch."""
import json
import os
import sys

import pytest

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks", "launch_overhead.py")


@pytest.mark.slow  # one 2-process launch, about 5 s
def test_launch_overhead_quick(tmp_path):
    out = tmp_path / "launch.json"
    proc = testing.run([sys.executable, BENCH, "--quick", "--json", str(out)], timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["nproc"] == 2 and list(result["launchers"]) == ["spawn"]
    row = result["launchers"]["spawn"]
    assert len(row["runs_s"]) == 1 and 0 < row["median_s"] == row["min_s"] < 300
    assert row["ratio_to_deepspeed"] is None  # no baseline launched: no ratio made up
    assert "spawn" in proc.stdout and "x deepspeed" in proc.stdout


def test_an_unknown_launcher_is_refused():
    proc = testing.run([sys.executable, BENCH, "--launchers", "mpirun"], timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "unknown: ['mpirun']" in proc.stderr
