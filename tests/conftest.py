import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


import time  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _remove_deepspeed_shm_buffers():
    """Launches not made through helpers.run_launch leak DeepSpeed's /dev/shm buffers too: drop them at the end."""
    start = time.time() - 1
    yield
    from helpers import remove_shm_buffers

    remove_shm_buffers(since=start)
