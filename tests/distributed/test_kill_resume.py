"""A run SIGKILLed at any moment, or stopped with --stop_after, resumes to exactly the run that was never killed
(issue 8).

One output folder per ZeRO stage (the ZeRO-2 one first stopped cleanly: --stop_after 2, exit 0, a checkpoint, the
next launch counts on from step 3) is killed again and again, each time at a different moment, and resumed with
--resume until the run finishes:
  - named crash points (beamlora_ds/testing/failpoints.py, the process SIGKILLs itself): in a step (between
    backward and the optimizer step), right after a snapshot, in a reset (weights half edited), in a checkpoint
    write (one process's files written, the other's not), between the checkpoint folder's rename and the `latest`
    update, and in the adapter write;
  - random moments: the whole launch (launcher and both workers) SIGKILLed from outside after a random delay, as a
    preempted node would be (seed printed; KILL_RANDOM=N tries N of them).
After each kill: every checkpoint folder that is not `*.partial` is complete and loadable, and `latest` names one.
At the end: the loss of every step (as the log stands after its resume records) and the final adapter equal the
uninterrupted run of the same seed (fp32, conftest.py's uninterrupted_run, shared with test_train_entry.py) within
1e-6.
"""
import glob
import json
import os
import random
import subprocess

import pytest
import torch

from train_runs import TINY, launch_train, read_log

STEPS = 16
# no evaluation here; the uninterrupted run it is compared with evaluates 8 questions, which changes no training
# state (greedy decoding draws no random numbers), so the losses and adapters must still agree exactly
RUN = [*TINY, "--eval_samples", "0"]
# (crash point, rank that dies): snapshots at 2, 6, 10, 14; resets at 4, 8, 12; checkpoints every 3 steps and at 16.
# STOP: a clean --stop_after 2 (checkpointed) before the first kill. Every crash point is exercised once, the points
# split between the two stages (a launch costs 5-10 s; the series are the suite's largest share), the clean stop
# and the final adapter write in one of them; RANDOM: the whole launch killed from outside at a random moment.
KILLS = {2: ["STOP", "step@5:1", "reset@8:1", "latest@12:0", "adapter"],
         3: ["snapshot@6:0", "checkpoint@9:1", "RANDOM"]}
# what `latest` names after each named kill: each left the checkpoint before it (a kill between a checkpoint's
# rename and its `latest` update leaves the previous one named)
LATEST_AFTER = {2: [2, 3, 6, 9], 3: [3, 6]}


def _launch(out_dir, stage, *extra, kill_at=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "BEAMLORA_DS_KILL_AT"}
    if kill_at:
        env["BEAMLORA_DS_KILL_AT"] = kill_at
    return launch_train(out_dir, "--ds_config", f"ds_configs/zero{stage}.json", *RUN, *extra, timeout=timeout,
                        env=env)


def _launch_and_kill_after(out_dir, stage, delay, *extra):
    """A launch whose whole process group (launcher and both workers) is SIGKILLed after `delay` seconds."""
    try:
        _launch(out_dir, stage, *extra, timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        return True


def _records(out_dir):
    from beamlora_ds.telemetry.reset_log import current_records

    return current_records(os.path.join(out_dir, "log.jsonl"))


def _losses(out_dir):
    return {r["step"]: r["loss"] for r in _records(out_dir) if r["type"] == "train"}


def _adapter(out_dir):
    from safetensors.torch import load_file

    folder = os.path.join(out_dir, "adapter")
    return {name: load_file(os.path.join(folder, name)) for name in ("adapter_model.safetensors",
                                                                     "beamlora_state.safetensors")}


def _check_checkpoints(out_dir, expected_files):
    """Every published tag folder is complete and loads; `latest` names one of them."""
    ckpt = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(ckpt):
        return None
    tags = [d for d in os.listdir(ckpt) if os.path.isdir(os.path.join(ckpt, d)) and not d.endswith(".partial")]
    for tag in tags:
        files = set(os.listdir(os.path.join(ckpt, tag)))
        assert expected_files <= files, f"{tag} is incomplete: missing {sorted(expected_files - files)}"
        for name in files:
            if name.endswith(".pt"):
                torch.load(os.path.join(ckpt, tag, name), map_location="cpu", weights_only=False)
    if os.path.isfile(os.path.join(ckpt, "latest")):
        with open(os.path.join(ckpt, "latest")) as f:
            latest = f.read()
        assert latest in tags, f"latest names {latest!r}, not a complete checkpoint ({tags})"
        return int(latest.replace("global_step", ""))
    return None


def _stop_cleanly(out, stage):
    """--stop_after 2: exit 0 with a checkpoint, the log holding steps 1-2 (the next launch goes on from 3)."""
    proc = _launch(out, stage, "--stop_after", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stopped after step 2" in proc.stdout
    assert [r["step"] for r in read_log(out) if r["type"] == "train"] == [1, 2]


def _kill_again_and_again(out, stage, kills, expected_files, rng):
    """Each kill in turn (resuming from the second on); what `latest` names after each, and how many random kills
    landed before their launch ended by itself."""
    latest_steps, random_kills = [], 0
    for i, kill in enumerate(kills):
        resume = ["--resume"] if i > 0 else []
        had_adapter = os.path.exists(out / "adapter")  # only if a random kill came after the run had finished
        if kill == "STOP":
            _stop_cleanly(out, stage)
        elif kill == "RANDOM":  # anywhere from start-up to the last steps of what remains
            random_kills += _launch_and_kill_after(out, stage, rng.uniform(4.0, 25.0), *resume)
        else:
            proc = _launch(out, stage, *resume, kill_at=kill)
            output = proc.stdout + proc.stderr
            assert proc.returncode != 0 and "return code = -9" in output, f"no SIGKILL at {kill}:\n{output[-3000:]}"
        if i == 1 and kills[0] == "STOP":  # the launch after the clean stop counted on from step 3: none redone
            steps = [r["step"] for r in read_log(out) if r["type"] == "train"]
            assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3, steps
        latest_steps.append(_check_checkpoints(out, expected_files))
        if kill == "adapter":
            assert os.path.exists(out / "adapter") == had_adapter, "a killed adapter write published a folder"
    return latest_steps, random_kills


@pytest.mark.parametrize("stage", [2, 3])
def test_stopped_or_killed_anywhere_resumes_to_the_uninterrupted_run(uninterrupted_run, tmp_path, stage):
    reference, _ = uninterrupted_run(stage)
    expected_losses, expected_adapter = _losses(reference), _adapter(reference)
    assert sorted(expected_losses) == list(range(1, STEPS + 1))
    expected_files = {n for n in os.listdir(reference / "checkpoints" / f"global_step{STEPS}") if n.endswith(".pt")}
    assert {"beamlora_state_rank0.pt", "beamlora_state_rank1.pt"} <= expected_files

    seed = int(os.environ.get("KILL_SEED", random.randrange(10**6)))
    print(f"KILL_SEED={seed}")
    kills = list(KILLS[stage])
    if "RANDOM" in kills:  # KILL_RANDOM=N tries N random moments instead of one
        at = kills.index("RANDOM")
        kills[at:at + 1] = ["RANDOM"] * int(os.environ.get("KILL_RANDOM", "1"))
    out = tmp_path / "killed"
    latest_steps, random_kills = _kill_again_and_again(out, stage, kills, expected_files, random.Random(seed))
    print(f"stage {stage}: kills {kills}, latest after each {latest_steps}, random kills that landed {random_kills}")
    assert latest_steps[:len(LATEST_AFTER[stage])] == LATEST_AFTER[stage]
    proc = _launch(out, stage, "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    losses = _losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in expected_losses.items():
        assert abs(losses[step] - loss) <= 1e-6, (step, losses[step], loss)
    adapter = _adapter(out)
    for name, tensors in expected_adapter.items():
        assert tensors.keys() == adapter[name].keys()
        for key, value in tensors.items():
            assert torch.allclose(adapter[name][key], value, rtol=0, atol=1e-6), (name, key)
    assert [r["step"] for r in _records(out) if r["type"] == "reset"] == [4, 8, 12]
    assert not glob.glob(str(out / ".adapter.partial-*")) and not glob.glob(str(out / "checkpoints" / "*.partial"))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
