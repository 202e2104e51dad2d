"""Rank-allocation telemetry: writing reset records from any loop, reading them back, the layers x projections grid,
the top-N list and the `beamlora-plot` picture."""
import json
import os
import sys

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from beamlora_ds import testing
from beamlora_ds.train.run_log import RunLog
from beamlora_ds.telemetry.allocation import (ModuleSite, allocation_matrix, layer_grid, merge_orders, parse_module_name, short_labels, summary_lines, top_modules)
from beamlora_ds.telemetry.reset_log import is_log_writer, log_reset, read_resets
from beamlora_ds.telemetry.plot import main, plot_allocation
from helpers import make_run, train_step
from helpers import regression_batches

LLAMA = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj"]


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
    proc = testing.run([sys.executable, "-m", "beamlora_ds.telemetry.plot", str(empty), str(tmp_path / "x.png")],
                       timeout=120)
    assert proc.returncode == 2 and "no reset records" in proc.stderr


# ------------------------------------------------------------------------------------------- names
def test_module_names_parse_into_layer_and_projection():
    assert parse_module_name("model.layers.12.self_attn.q_proj") == ModuleSite("model.layers", 12, "self_attn.q_proj")
    assert parse_module_name("model.layers.3.mlp.down_proj") == ("model.layers", 3, "mlp.down_proj")
    assert parse_module_name("transformer.h.3.attn.c_proj") == ("transformer.h", 3, "attn.c_proj")
    assert parse_module_name("transformer.h.3.mlp.c_proj") == ("transformer.h", 3, "mlp.c_proj")
    # the layer is the first number: a T5 sub-layer or an expert number stays in the projection
    assert parse_module_name("encoder.block.2.layer.1.DenseReluDense.wi") == ("encoder.block", 2,
                                                                               "layer.1.DenseReluDense.wi")
    assert parse_module_name("model.layers.4.moe.experts.7.w1") == ("model.layers", 4, "moe.experts.7.w1")
    for no_layer in ("lm_head", "q_proj", "blocks3.fc", "head.2"):
        assert parse_module_name(no_layer) is None


def test_projection_labels_are_short_but_distinct():
    assert short_labels(LLAMA) == {p: p.split(".")[1] for p in LLAMA}
    gpt2 = short_labels(["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"])
    assert gpt2 == {"attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc",
                    "mlp.c_proj": "mlp.c_proj"}
    assert short_labels(["moe.experts.0.w1", "moe.experts.1.w1"]) == {"moe.experts.0.w1": "experts.0.w1",
                                                                      "moe.experts.1.w1": "experts.1.w1"}


def test_merged_order_respects_every_partial_sequence():
    order = merge_orders([["q", "v", "down"], ["k", "v", "o", "down"], ["q", "k"]])
    assert order == ["q", "k", "v", "o", "down"]


# ------------------------------------------------------------------------------------------- grid and list
def _llama(layer, projection):
    return f"model.layers.{layer}.{projection}"


HAND_RESETS = [  # each reset lists its modules in model order, as BeamController records them
    {"step": 10, "keep_fraction": 0.8, "pruned": [[_llama(0, "self_attn.q_proj"), 1], [_llama(0, "self_attn.q_proj"), 5],
                                                  [_llama(0, "mlp.down_proj"), 2], [_llama(2, "self_attn.v_proj"), 0],
                                                  ["lm_head", 3]]},
    {"step": 20, "keep_fraction": 0.9, "pruned": [[_llama(0, "self_attn.q_proj"), 4], [_llama(2, "self_attn.k_proj"), 7],
                                                  [_llama(2, "self_attn.v_proj"), 1], [_llama(2, "self_attn.v_proj"), 6]]},
]


def test_grid_holds_the_hand_counted_ranks_per_layer_and_projection():
    grid = layer_grid(HAND_RESETS)
    assert grid.rows == ["0", "1", "2"]  # layer 1 never moved: an empty row, the numbers stay contiguous
    assert sorted(grid.columns) == ["down_proj", "k_proj", "q_proj", "v_proj"]
    expected = {(0, "q_proj"): 3, (0, "down_proj"): 1, (2, "v_proj"): 3, (2, "k_proj"): 1}
    for i in range(3):
        for j, column in enumerate(grid.columns):
            assert grid.counts[i, j] == expected.get((i, column), 0), (i, column)
    assert grid.names[2][grid.columns.index("v_proj")] == "model.layers.2.self_attn.v_proj"
    assert grid.names[1] == [None] * 4
    assert grid.unplaced == [("lm_head", 1)]
    assert grid.counts.sum() + 1 == sum(len(r["pruned"]) for r in HAND_RESETS)


def test_grid_of_thirty_layers_in_model_order(tmp_path):
    counts = {(layer, p): 1 + (3 * layer + p) % 5 for layer in range(30) for p in range(7)}
    resets = [{"step": 10, "keep_fraction": 0.9,
               "pruned": [[_llama(layer, LLAMA[p]), j] for (layer, p), c in counts.items() for j in range(c)]}]
    grid = layer_grid(resets)
    assert grid.rows == [str(layer) for layer in range(30)]
    assert grid.columns == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert np.array_equal(grid.counts, np.array([[counts[layer, p] for p in range(7)] for layer in range(30)]))


def test_top_modules_most_copies_first_ties_in_model_order():
    assert top_modules(HAND_RESETS, 4) == [(_llama(0, "self_attn.q_proj"), 3), (_llama(2, "self_attn.v_proj"), 3),
                                           (_llama(0, "mlp.down_proj"), 1), (_llama(2, "self_attn.k_proj"), 1)]
    lines = summary_lines(HAND_RESETS, top=2)
    assert lines[:3] == ["most copies gained over 2 resets (steps 10-20):", f"3  {_llama(0, 'self_attn.q_proj')}",
                         f"3  {_llama(2, 'self_attn.v_proj')}"]
    assert lines[-2:] == ["1 modules without a layer number (not in the grid):", "1  lm_head"]


# ------------------------------------------------------------------------------------------- writing the log
def test_log_written_from_a_plain_loop_round_trips_and_matches_the_train_log(tmp_path):
    model, beam, opt = make_run(total_steps=40, interval=8)
    own = tmp_path / "own.jsonl"
    for batch in regression_batches(40):
        train_step(model, opt, batch)
        log_reset(str(own), beam.step(opt))  # None on steps without a reset: nothing written
    history = [json.loads(json.dumps(r)) for r in beam.history]
    assert [r["step"] for r in history] == [8, 16, 24, 32]
    assert [{k: v for k, v in r.items() if k != "type"} for r in read_resets(str(own))] == history
    run_log = RunLog(str(tmp_path), rank=0, total_steps=40, start_step=0)  # what launch/train.py writes
    for record in beam.history:
        run_log.reset(record)
    run_log.close()
    assert (tmp_path / "log.jsonl").read_text() == own.read_text()
    after = tmp_path / "after.jsonl"
    for _ in range(2):  # history written after training (twice: a reset step counts once)
        for record in beam.history:
            log_reset(str(after), record)
    assert read_resets(str(after)) == read_resets(str(own))


def test_log_reset_refuses_what_is_not_a_log_file_or_a_record(tmp_path):
    record = {"step": 4, "keep_fraction": 0.9, "pruned": [("q_proj", 1)], "sources": [("q_proj", 1, 0)]}
    with pytest.raises(ValueError, match="is a folder; pass the log file"):
        log_reset(str(tmp_path), record)
    with pytest.raises(ValueError, match="not a BeamLoRA reset record"):
        log_reset(str(tmp_path / "log.jsonl"), {"loss": 1.0})
    assert not os.path.exists(tmp_path / "log.jsonl")


def test_a_single_process_writes():
    assert not dist.is_initialized() and is_log_writer()


def _two_process_writer(rank, port, log_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        record = {"step": 8, "keep_fraction": 0.9, "pruned": [("q_proj", rank)], "sources": []}
        wrote = log_reset(log_path, record)
        dist.barrier()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"wrote": wrote, "writer": is_log_writer()}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_only_process_zero_writes_in_a_real_two_process_group(tmp_path):
    log_path = str(tmp_path / "log.jsonl")
    mp.spawn(_two_process_writer, args=(testing.free_port(), log_path, str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results == [{"wrote": True, "writer": True}, {"wrote": False, "writer": False}]
    assert [r["pruned"] for r in read_resets(log_path)] == [[["q_proj", 0]]]


# ------------------------------------------------------------------------------------------- the command
def test_command_writes_the_picture_and_prints_the_top_list(tmp_path, capsys):
    log_path, out = str(tmp_path / "log.jsonl"), tmp_path / "alloc.png"
    for k, step in enumerate((10, 20)):
        pruned = [(_llama(layer, p), j) for layer in range(30) for p in LLAMA
                  for j in range(1 + (layer + len(p) + k) % 3)] + [(_llama(17, "mlp.down_proj"), 7)] * 4
        log_reset(log_path, {"step": step, "keep_fraction": 0.8 + 0.1 * k, "pruned": pruned, "sources": []})
    main([log_path, str(out), "--top", "3"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20000
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "most copies gained over 2 resets (steps 10-20):"
    assert printed[1].split() == [str(sum(1 + (17 + 13 + k) % 3 for k in (0, 1)) + 8), _llama(17, "mlp.down_proj")]
    assert len(printed) == 5 and printed[-1] == f"wrote {out}"
