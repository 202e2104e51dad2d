"""A run stopped between a snapshot and its reset resumes on another number of processes (same global batch: one
micro-batch each on 2 processes, or 2 accumulated on 1) and ends as the run that never stopped: the same pruned
ranks at the reset after the resume (its snapshot re-cut for the new fragments, checkpointing/reshard.py), the same
losses, the adapter within 1e-5. Both directions under ZeRO-2 and ZeRO-3 (through DeepSpeed's universal
checkpoint). The oracle is the uninterrupted 2-process run; the data order is defined by the global batch, so the
1-process run with accumulation 2 is the same run (tests/train/test_data.py). 2 -> 1 resumes that uninterrupted
run's own step-3 checkpoint (what a run killed after step 3 leaves; killed runs are tests/distributed/
test_kill_resume.py's); 1 -> 2 resumes a 1-process run stopped after step 3."""
import os
import shutil

import pytest
import torch

from beamlora_ds.checkpointing.layout import read_latest
from train_runs import launch_train

pytestmark = pytest.mark.slow

# 8 steps, snapshot at 2, reset at 4; a checkpoint at step 3 (inside the window), the resume from it
RUN = ["--model_name_or_path", "builtin-tiny", "--lora_r", "4", "--max_steps", "8", "--interval", "4", "--p0", "0.5",
       "--lora_dropout", "0", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_steps", "3"]
SPLITS = {2: 1, 1: 2}  # processes -> gradient accumulation: 8 examples per step either way


def adapter(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def launch(out_dir, nproc, config, *args, env=None):
    return launch_train(out_dir, *RUN, *config, "--gradient_accumulation_steps", str(SPLITS[nproc]), *args,
                        nproc=nproc, env=env)


def records(out_dir, kind):
    from beamlora_ds.telemetry.reset_log import current_records

    return {r["step"]: r for r in current_records(os.path.join(out_dir, "log.jsonl")) if r["type"] == kind}


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_on_another_number_of_processes_follows_the_uninterrupted_run(tmp_path, stage):
    config = ["--ds_config", f"ds_configs/zero{stage}.json"]
    full = str(tmp_path / "full")
    done = launch(full, 2, config)
    assert done.returncode == 0, done.stderr[-3000:]
    full_resets, full_train = records(full, "reset"), records(full, "train")
    assert sorted(full_resets) == [4] and full_resets[4]["pruned"]
    for before, after in ((2, 1), (1, 2)):
        part = str(tmp_path / f"{before}to{after}")
        stopped_after_3(full, part) if before == 2 else launch(part, 1, config, "--stop_after", "3")
        assert read_latest(os.path.join(part, "checkpoints")) == "global_step3"
        if before == 2 and stage == 2:  # not adapting the accumulation: another global batch, refused (once)
            refused = launch_train(part, *RUN, *config, "--resume", nproc=1)
            assert refused.returncode == 2, refused.stderr[-2000:]
            assert ("took 8 examples per step (4 per process x 1 accumulation x 2 processes), this launch would take "
                    "4 (4 x 1 x 1). To continue the same run, keep it with --gradient_accumulation_steps 2"
                    ) in refused.stderr
        resumed = launch(part, after, config, "--resume")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"of {before} processes on {after}" in resumed.stdout + resumed.stderr
        part_resets, part_train = records(part, "reset"), records(part, "train")
        assert part_resets[4]["pruned"] == full_resets[4]["pruned"], (before, after)  # the snapshot of step 2
        for step in range(1, 9):
            assert part_train[step]["loss"] == pytest.approx(full_train[step]["loss"], rel=1e-5), (before, step)
        expected, got = adapter(full), adapter(part)
        for name, value in expected.items():
            assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-7), (before, after, name)


def stopped_after_3(full, part):
    """`part` as the uninterrupted run `full` stood after its checkpoint of step 3: the same folder, `latest` at
    step 3, the later checkpoints and the adapter not written yet."""
    shutil.copytree(full, part)
    checkpoints = os.path.join(part, "checkpoints")
    for name in os.listdir(checkpoints):
        if name.startswith("global_step") and name != "global_step3":
            shutil.rmtree(os.path.join(checkpoints, name))
    shutil.rmtree(os.path.join(part, "adapter"))
    with open(os.path.join(checkpoints, "latest"), "w") as f:
        f.write("global_step3")
