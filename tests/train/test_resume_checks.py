"""--resume on another number of processes: the global batch is what must stay (train/checks.check_resume_batch),
refused in seconds with the arithmetic; a run whose run_args.json does not record it (an earlier development
version wrote it) cannot be checked and is refused unless the user says so."""
import argparse
import json

import pytest

from beamlora_ds.train.checks import UsageError, check_resume_batch, global_batch_record


def config(micro, accumulation, processes):
    return {"train_batch_size": micro * accumulation * processes, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation}


def run_folder(tmp_path, record=True, processes=2):
    args = {"per_device_train_batch_size": 4}
    if record:
        args["global_batch"] = global_batch_record(config(4, 1, processes), processes)
    (tmp_path / "run_args.json").write_text(json.dumps(args))
    return argparse.Namespace(output_dir=str(tmp_path), resume="latest", allow_new_global_batch=False)


def test_another_split_of_the_same_global_batch_is_accepted(tmp_path):
    args = run_folder(tmp_path)
    check_resume_batch(args, config(4, 2, 1), replicas=1)
    check_resume_batch(args, config(2, 1, 4), replicas=4)


def test_another_global_batch_is_refused_with_the_arithmetic_and_the_fix(tmp_path):
    args = run_folder(tmp_path)
    with pytest.raises(UsageError, match=r"took 8 examples per step \(4 per process x 1 accumulation x 2 processes\), "
                                         r"this launch would take 4 \(4 x 1 x 1\)\. To continue the same run, keep it "
                                         r"with --gradient_accumulation_steps 2"):
        check_resume_batch(args, config(4, 1, 1), replicas=1)
    args.allow_new_global_batch = True
    check_resume_batch(args, config(4, 1, 1), replicas=1)


def test_a_run_without_the_record_is_refused_unless_the_user_says_so(tmp_path):
    args = run_folder(tmp_path, record=False)
    with pytest.raises(UsageError, match="no 'global_batch' record: an earlier development version.*"
                                         "--allow_new_global_batch"):
        check_resume_batch(args, config(4, 1, 2), replicas=2)
    args.allow_new_global_batch = True
    check_resume_batch(args, config(4, 2, 1), replicas=1)
