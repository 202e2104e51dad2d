"""Loading a 4-bit base under ZeRO-3 in turns (beamlora_ds/loading/staggered.py through load_4bit_model), 2 processes.

benchmarks/load_memory.py --quick runs the old way (every process at once) and the new one, each a real
`deepspeed` launch: the loads of the processes of the node (here: both) must not overlap in time in the new way
(and do overlap in the old one: the check can tell them apart), and the model after deepspeed.initialize,
gathered whole, and every process's quantization constants must be bit for bit those of the old way. An error
while one process loads must make every process raise together, well before the process-group timeout.
"""
import json
import os
import sys
import time

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def overlapping(processes):
    spans = sorted((p["load_started"], p["load_finished"]) for p in processes)
    return any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))


def test_loads_take_turns_and_give_the_same_model(tmp_path):
    out = tmp_path / "load_memory.json"
    proc = testing.run([sys.executable, "benchmarks/load_memory.py", "--quick", "--json", out], timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "node peak" in proc.stdout
    result = json.loads(out.read_text())
    runs = {run["mode"]: run for run in result["runs"]}
    together, turns = runs["together"]["processes"], runs["turns"]["processes"]
    assert sorted(p["rank"] for p in turns) == [0, 1] == sorted(p["rank"] for p in together)
    assert not overlapping(turns) and overlapping(together)
    first = min(turns, key=lambda p: p["load_started"])
    assert first["local_rank"] == 1  # local rank 0 (global rank 0, whose copy is kept) loads last
    assert result["same_weights"] is True
    assert len({p["digest"] for p in together + turns}) == 1  # every process gathers the same whole model
    assert len({p["quant_state_digest"] for p in together + turns}) == 1  # and holds the same constants
    assert result["node_peak_above_baseline_ratio"] > 0


def test_an_error_while_one_process_loads_reaches_every_process(tmp_path):
    """Rank 0 loads last (turn 2 of 2) from a folder that does not exist, after rank 1 loaded: both must raise
    LoadError naming rank 0, instead of rank 1 waiting in a collective until the 120 s timeout."""
    import load_memory

    model_dir = tmp_path / "model"
    load_memory.save_model(load_memory.parse(["--quick"]), str(model_dir))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    cmd = testing.spawn_command(os.path.join(ROOT, "benchmarks", "load_memory.py"),
                                    ["--worker", "--model_dir", model_dir, "--mode", "turns", "--out_dir", out_dir,
                                     "--fail_rank", "0"])
    started = time.time()
    proc = testing.run(cmd, timeout=110, cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert time.time() - started < 100
    for rank in (0, 1):
        assert f"[rank{rank}]: beamlora_ds.loading.staggered.LoadError: Loading " in output, output[-4000:]
    assert "failed on process(es) [0] (in turn 2 of 2)" in output
    assert "this process: OSError" in output or "this process: FileNotFoundError" in output, output[-4000:]
    assert not list(out_dir.glob("rank*.json"))  # nobody got past loading
