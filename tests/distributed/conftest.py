"""Every test here starts real multi-process DeepSpeed jobs: all of them are `slow` (the quick tier is
`pytest -m "not slow"`). Also the uninterrupted launch/train.py runs that several files compare against."""
import os

import pytest

from train_runs import TINY, launch_train

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """uninterrupted_run(stage) -> (output folder, process): the TINY run that never stopped, once per stage and
    session. test_train_entry checks what it writes; stopped-and-resumed and killed-and-resumed runs must end
    equal to it."""
    runs = {}

    def get(stage):
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"uninterrupted{stage}")
            # ZeRO-3 by `deepspeed` itself, as the README's command runs it (every other launch starts its
            # processes the same way without DeepSpeed's launcher start-up)
            proc = launch_train(out, "--ds_config", f"ds_configs/zero{stage}.json", *TINY, "--eval_samples", "8",
                                launcher="deepspeed" if stage == 3 else "spawn")
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            runs[stage] = (out, proc)
        return runs[stage]

    return get
