"""ranks.py in one process (no process group): rank 0 of a world of one, every agreement is its own verdict.
The multi-process behaviour (a refusal on rank 0 stops every process, no hang) is checked by
tests/distributed/test_export_zero.py and the kill-and-resume tests."""
import types

import pytest

from beamlora_ds import ranks


def test_a_single_process_is_rank_0_of_one():
    assert ranks.rank() == 0 and ranks.world_size() == 1 and not ranks.is_distributed()
    ranks.barrier()  # a no-op, does not wait


def test_rank0_verdict_is_the_own_verdict():
    assert ranks.rank0_verdict(True) is True
    assert ranks.rank0_verdict(False) is False


def test_all_ranks_or_raise():
    ranks.all_ranks_or_raise(True, "unused")
    with pytest.raises(FileNotFoundError, match="missing here"):
        ranks.all_ranks_or_raise(False, "missing here")
    with pytest.raises(ValueError, match="bad"):
        ranks.all_ranks_or_raise(False, "bad", error=ValueError)


def test_the_only_process_owns_the_folders():
    engine = types.SimpleNamespace(local_rank=3, use_node_local_storage=lambda: True)
    assert ranks.owns_folders(engine)
