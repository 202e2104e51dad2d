"""coordination.py (and checkpointing/folders.py's owner rule) in one process (no process group): rank 0 of a world of one, every agreement is its own verdict.
The multi-process behaviour (a refusal on rank 0 stops every process, no hang) is checked by
tests/distributed/test_export_zero.py and the kill-and-resume tests."""
import types

import pytest

from beamlora_ds.backends import coordination
from beamlora_ds.checkpointing.folders import owns_folders


def test_a_single_process_is_rank_0_of_one():
    assert coordination.rank() == 0 and coordination.world_size() == 1 and not coordination.is_distributed()
    coordination.barrier()  # a no-op, does not wait


def test_rank0_verdict_is_the_own_verdict():
    assert coordination.rank0_verdict(True) is True
    assert coordination.rank0_verdict(False) is False


def test_all_ranks_or_raise():
    coordination.all_ranks_or_raise(True, "unused")
    with pytest.raises(FileNotFoundError, match="missing here"):
        coordination.all_ranks_or_raise(False, "missing here")
    with pytest.raises(ValueError, match="bad"):
        coordination.all_ranks_or_raise(False, "bad", error=ValueError)


def test_the_only_process_owns_the_folders():
    engine = types.SimpleNamespace(local_rank=3, use_node_local_storage=lambda: True)
    assert owns_folders(engine)
