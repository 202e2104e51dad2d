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


@pytest.fixture
def entry_logging_undone(monkeypatch):
    """For launch/train.py run in this process: the logging set-up its configure_logging() makes (a root handler and
    level, quieter library loggers) undone afterwards, and a library logger that holds an earlier test's closed
    capture stream kept from printing a "--- Logging error ---" Traceback (in a fresh process that stream is the
    real stderr)."""
    import logging

    from beamlora_ds.train.run_log import NOISY_LOGGERS

    monkeypatch.setattr(logging, "raiseExceptions", False)
    root = logging.getLogger()
    root_level, root_handlers = root.level, set(root.handlers)
    levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    for handler in set(root.handlers) - root_handlers:
        if type(handler) is logging.StreamHandler:  # basicConfig's, when the root logger had no handler
            root.removeHandler(handler)
    root.setLevel(root_level)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


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
