"""How the tests here launch their processes: launch/train.py (the command, the tiny run they share, its log) and
the workers that train several runs in one launch."""
import json
import os
import shutil

import torch

from beamlora_ds import testing

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")
# the tiny built-in model, 16 steps: snapshots at 2, 6, 10, 14; resets at 4, 8, 12; checkpoints every 3 steps and at 16
TINY = ["--model_name_or_path", "builtin-tiny", "--lora_r", "8", "--max_steps", "16", "--interval", "4",
        "--p0", "0.8", "--learning_rate", "3e-3", "--logging_steps", "1", "--save_steps", "3"]


def launch_train(out_dir, *args, nproc=2, timeout=300, env=None, launcher="spawn"):
    """launch/train.py --output_dir out_dir args... in `nproc` processes through beamlora_ds.testing.run, started as
    `deepspeed --num_gpus nproc` starts them (launcher "spawn", without its start-up) or by `deepspeed` itself
    (launcher "deepspeed": the command the README documents)."""
    command = testing.deepspeed_command if launcher == "deepspeed" else testing.spawn_command
    fresh = "--resume" not in args and not (os.path.isdir(out_dir) and os.listdir(out_dir))  # so is its retry
    return testing.run(command(TRAIN, ["--output_dir", out_dir, *args], nproc), timeout=timeout, cwd=ROOT, env=env,
                       before_retry=(lambda: shutil.rmtree(out_dir, ignore_errors=True)) if fresh else None)


def read_log(out_dir):
    """Every record of a run's log.jsonl, as written (a resumed run's redone steps included)."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def launch_runs(worker, folder, runs: dict, nproc: int, timeout: float) -> dict:
    """A test worker that trains several runs in one launch (`--runs spec.json --out results.pt`, rank 0 writes
    the results with torch.save): the spec written into `folder`, the launch, its exit code checked; the results."""
    spec, out = os.path.join(folder, f"runs{nproc}.json"), os.path.join(folder, f"results{nproc}.pt")
    with open(spec, "w") as f:
        json.dump(runs, f)
    proc = testing.run(testing.spawn_command(worker, ["--runs", spec, "--out", out], nproc), timeout=timeout,
                       cwd=folder)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=False)
