"""A run stopped between a snapshot and its reset resumes on another number of processes (same global batch: one
micro-batch each on 2 processes, or 2 accumulated on 1) and ends as the run that never stopped: the same pruned
ranks at the reset after the resume (its snapshot re-cut for the new fragments, reshard.py), the same losses, the
adapter within 1e-5. The oracle is the uninterrupted run on the first world size; 2 -> 1 under ZeRO-2 and 1 -> 2
under ZeRO-3 (both through DeepSpeed's universal checkpoint)."""
import os

import pytest
import torch

from train_runs import launch_train, read_log

pytestmark = pytest.mark.slow

# 8 steps, snapshot at 2, reset at 4 (and 6 / 8): stopped after step 3, the resume holds a snapshot from the old world
RUN = ["--model_name_or_path", "builtin-tiny", "--lora_r", "4", "--max_steps", "8", "--interval", "4", "--p0", "0.5",
       "--lora_dropout", "0", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_steps", "0"]


def adapter(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def run_ok(out_dir, nproc, *args):
    proc = launch_train(out_dir, *RUN, *args, nproc=nproc)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.parametrize("stage, before, after", [(2, (2, 1), (1, 2)), (3, (1, 2), (2, 1))],
                         ids=["zero2-2to1", "zero3-1to2"])
def test_resume_on_another_number_of_processes_follows_the_uninterrupted_run(tmp_path, stage, before, after):
    (n_before, accum_before), (n_after, accum_after) = before, after
    config = ["--ds_config", f"ds_configs/zero{stage}.json"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_ok(full, n_before, *config, "--gradient_accumulation_steps", str(accum_before))
    run_ok(part, n_before, *config, "--gradient_accumulation_steps", str(accum_before), "--stop_after", "3")
    # first without adapting the accumulation: another global batch, refused in seconds with the arithmetic
    refused = launch_train(part, *RUN, *config, "--gradient_accumulation_steps", str(accum_before), "--resume",
                           nproc=n_after)
    batch = 4 * accum_before * n_before
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert (f"took {batch} examples per step (4 per process x {accum_before} accumulation x {n_before} processes), "
            f"this launch would take {4 * accum_before * n_after} (4 x {accum_before} x {n_after})") in refused.stderr
    assert f"keep it with --gradient_accumulation_steps {accum_after}" in refused.stderr
    resumed = run_ok(part, n_after, *config, "--gradient_accumulation_steps", str(accum_after), "--resume")
    assert f"of {n_before} processes on {n_after}" in resumed.stdout + resumed.stderr

    def records(out_dir, kind):
        return {r["step"]: r for r in read_log(out_dir) if r["type"] == kind}

    full_resets, part_resets = records(full, "reset"), records(part, "reset")
    assert sorted(full_resets) == sorted(part_resets) == [4]
    for step, record in full_resets.items():  # the reset at 4 uses the snapshot of step 2, taken on the old world
        assert part_resets[step]["pruned"] == record["pruned"] and record["pruned"], step
    full_train, part_train = records(full, "train"), records(part, "train")
    for step in range(4, 9):
        assert part_train[step]["loss"] == pytest.approx(full_train[step]["loss"], rel=1e-5), step
    expected, got = adapter(full), adapter(part)
    for name, value in expected.items():
        assert torch.allclose(got[name], value, rtol=1e-5, atol=1e-7), name
