"""reshard.py's pure parts: a snapshot's per-process shards cut again for another number of processes, and the
checkpoint's state files listed (the DeepSpeed side runs in tests/distributed/test_elastic_resume.py)."""
import os

import pytest
import torch

from beamlora_ds.checkpointing import layout, reshard


def shard(start, values, keys=("exp_avg", "exp_avg_sq")):
    """One old process's snapshot entry for one factor: master = values, each moment a multiple of it."""
    return {"start": start, "numel": len(values), "master": torch.tensor(values, dtype=torch.float32),
            "moments": {k: (i + 2) * torch.tensor(values, dtype=torch.float32) for i, k in enumerate(keys)}}


def old_snapshots(cuts, numel=10):
    """Processes holding [cuts[i], cuts[i+1]) of a flat 0..numel-1 (lora_A) and 100.. (lora_B) vector."""
    out = []
    for lo, hi in zip(cuts, cuts[1:]):
        out.append({"moment_keys": ["exp_avg", "exp_avg_sq"], "world_size": len(cuts) - 1,
                    "modules": [{"lora_A": shard(lo, list(range(lo, hi))),
                                 "lora_B": shard(lo, [100.0 + i for i in range(lo, hi)])}]})
    return out


@pytest.mark.parametrize("old_cuts, new_cuts", [([0, 5, 10], [0, 10]), ([0, 10], [0, 4, 8, 10]),
                                                ([0, 3, 3, 10], [0, 5, 10]), ([0, 5, 10], [0, 0, 10])])
def test_a_snapshot_is_cut_again_for_the_new_fragments(old_cuts, new_cuts):
    shards = old_snapshots(old_cuts)
    for lo, hi in zip(new_cuts, new_cuts[1:]):
        got = reshard.recut_snapshot(shards, [{"lora_A": (lo, hi - lo), "lora_B": (lo, hi - lo)}], len(new_cuts) - 1)
        assert got["world_size"] == len(new_cuts) - 1 and got["moment_keys"] == ["exp_avg", "exp_avg_sq"]
        a, b = got["modules"][0]["lora_A"], got["modules"][0]["lora_B"]
        assert (a["start"], a["numel"]) == (lo, hi - lo)
        assert a["master"].tolist() == list(range(lo, hi))
        assert b["master"].tolist() == [100.0 + i for i in range(lo, hi)]
        assert a["moments"]["exp_avg"].tolist() == [2.0 * i for i in range(lo, hi)]
        assert a["moments"]["exp_avg_sq"].tolist() == [3.0 * i for i in range(lo, hi)]


def test_a_missing_shard_is_an_error_not_zeros():
    shards = old_snapshots([0, 5, 10])[:1]  # the second process's file lost
    with pytest.raises(RuntimeError, match="cover 5 of positions \\[0, 10\\)"):
        reshard.recut_snapshot(shards, [{"lora_A": (0, 10), "lora_B": (0, 10)}], 1)


def test_a_whole_tensor_snapshot_is_the_same_everywhere():
    whole = {"modules": [{"A": torch.ones(2, 3), "B": torch.zeros(3, 2), "A_moments": {}, "B_moments": {}}]}
    assert reshard.recut_snapshot([whole, whole], [], 1) is whole


def test_state_files_are_listed_in_rank_order_and_a_gap_is_named(tmp_path):
    for rank in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9):
        (tmp_path / f"beamlora_state_rank{rank}.pt").write_bytes(b"")
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert [os.path.basename(p) for p in layout.state_files(str(tmp_path))] == \
        [f"beamlora_state_rank{rank}.pt" for rank in range(11)]
    (tmp_path / "beamlora_state_rank2.pt").unlink()
    with pytest.raises(FileNotFoundError, match="beamlora_state_rank2.pt is missing"):
        layout.state_files(str(tmp_path))
