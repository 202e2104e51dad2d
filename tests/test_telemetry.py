"""Rank-allocation telemetry from a real controller run's reset records."""
import json
import sys

import pytest

from beamlora_ds import testing
from beamlora_ds.telemetry import allocation_matrix, plot_allocation, read_resets
from test_controller import make_run, train_step
from helpers import regression_batches


@pytest.fixture
def log_file(tmp_path):
    model, beam, opt = make_run(total_steps=40, interval=8)
    path = tmp_path / "log.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"type": "train", "step": 1, "loss": 1.0}) + "\n")
        for batch in regression_batches(40):
            train_step(model, opt, batch)
            record = beam.step(opt)
            if record is not None:
                f.write(json.dumps({"type": "reset", **record}) + "\n")
    return path, beam.history


def test_matrix_counts_the_pruned_ranks_of_each_module(log_file):
    path, history = log_file
    modules, steps, counts = allocation_matrix(read_resets(str(path)))
    assert steps == [8, 16, 24, 32] and modules == sorted(modules)
    for k, record in enumerate(history):
        for m, name in enumerate(modules):
            assert counts[m, k] == sum(1 for n, _ in record["pruned"] if n == name)
    assert counts.sum() == sum(len(r["pruned"]) for r in history) > 0


def test_png_is_written_and_a_log_without_resets_is_refused(log_file, tmp_path):
    path, _ = log_file
    out = tmp_path / "alloc.png"
    plot_allocation(str(path), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"type": "train", "step": 1}) + "\n")
    proc = testing.run([sys.executable, "-m", "beamlora_ds.telemetry", str(empty), str(tmp_path / "x.png")],
                       timeout=120)
    assert proc.returncode == 2 and "no reset records" in proc.stderr
