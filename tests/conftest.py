import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _remove_deepspeed_shm_buffers():
    """Every launch goes through beamlora_ds.testing.run, which removes its port's /dev/shm buffers; this sweeps up
    what a process started some other way left (buffers no live process maps, made during the session)."""
    start = time.time() - 1
    yield
    from beamlora_ds.testing.launcher import remove_shm_buffers

    remove_shm_buffers(since=start)


@pytest.fixture(scope="module")
def ids():
    """Fixed token ids for comparing logits (the export, adapter-format and merge tests)."""
    from adapter_helpers import fixed_ids

    return fixed_ids()


@pytest.fixture
def beam_model():
    """A tiny Llama with BeamLoRA on every projection that looks trained (nonzero B and scores)."""
    from adapter_helpers import trained_like
    from helpers import tiny_llama

    return trained_like(tiny_llama(seed=0))
