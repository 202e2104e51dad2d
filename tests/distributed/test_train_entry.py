"""launch/train.py end to end under `deepspeed --num_gpus 2` (tiny built-in model), and its refusals.

A run stopped with --stop_after and continued with --resume must log the same losses as the run that
never stopped (same seed, fp32), and keep counting steps where it left off.
"""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from helpers import run_launch  # noqa: E402

pytest.importorskip("deepspeed")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")
TINY = ["--model_name_or_path", "builtin-tiny", "--lora_r", "8", "--max_steps", "16", "--interval", "4",
        "--p0", "0.8", "--learning_rate", "3e-3", "--logging_steps", "1", "--eval_samples", "8", "--save_steps", "0"]
_runs = {}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir, *args, nproc=2, timeout=300):
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(nproc), "--master_port", str(_port()), TRAIN,
           "--output_dir", str(out_dir), *args]
    return run_launch(cmd, timeout=timeout, cwd=ROOT)


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def full_run(tmp_path_factory, stage):
    if stage not in _runs:
        out = tmp_path_factory.mktemp(f"full{stage}")
        proc = launch(out, "--ds_config", f"ds_configs/zero{stage}.json", *TINY)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _runs[stage] = (out, proc)
    return _runs[stage]


@pytest.mark.parametrize("stage", [2, 3])
def test_trains_resets_and_writes_everything(tmp_path_factory, stage):
    out, proc = full_run(tmp_path_factory, stage)
    log = read_log(out)
    losses = [r["loss"] for r in log if r["type"] == "train"]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    assert [r["step"] for r in log if r["type"] == "reset"] == [4, 8, 12]
    assert sum(len(r["pruned"]) for r in log if r["type"] == "reset") > 0
    assert [r["when"] for r in log if r["type"] == "eval"] == ["before", "after"]
    assert os.path.isfile(os.path.join(out, "checkpoints", "latest"))
    assert os.path.isfile(os.path.join(out, "checkpoints", "global_step16", "beamlora_state_rank1.pt"))
    assert sorted(os.listdir(os.path.join(out, "adapter")))[:2] == ["adapter_config.json", "adapter_model.safetensors"]
    assert "reset at step 4:" in proc.stdout and "done: 16 steps, 3 resets" in proc.stdout


@pytest.mark.parametrize("stage", [2, 3])
def test_stop_and_resume_continue_the_same_trajectory(tmp_path_factory, stage):
    reference, _ = full_run(tmp_path_factory, stage)
    out = tmp_path_factory.mktemp(f"resume{stage}")
    first = launch(out, "--ds_config", f"ds_configs/zero{stage}.json", *TINY, "--stop_after", "6")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "stopped after step 6" in first.stdout
    second = launch(out, "--ds_config", f"ds_configs/zero{stage}.json", *TINY, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    log = read_log(out)
    steps = [r["step"] for r in log if r["type"] == "train"]
    assert steps == list(range(1, 17))  # 1-6, then 7-16 after the resume
    expected = {r["step"]: r["loss"] for r in read_log(reference) if r["type"] == "train"}
    for r in log:
        if r["type"] == "train":
            assert r["loss"] == pytest.approx(expected[r["step"]], rel=1e-5, abs=1e-6), r["step"]
    assert [r["step"] for r in log if r["type"] == "reset"] == [4, 8, 12]


def test_local_checkpoint_is_partitioned_at_load_under_zero3(tmp_path):
    """A saved HF model folder loads under ZeRO-3 already partitioned (HfDeepSpeedConfig alive before
    from_pretrained), the path a 70B model takes; then trains and writes its adapter."""
    from beamlora_ds import models

    model_dir = tmp_path / "model"
    models.load_model(models.BUILTIN_TINY, __import__("torch").float32, {}).save_pretrained(model_dir)
    models.char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    proc = launch(out, "--ds_config", "ds_configs/zero3.json", "--model_name_or_path", str(model_dir),
                  "--lora_r", "8", "--max_steps", "8", "--interval", "4", "--logging_steps", "1",
                  "--max_length", "64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in (proc.stdout + proc.stderr).splitlines() if "loaded partitioned" in l)
    held, total = [int(x.replace(",", "")) for x in line.split("partitioned, ")[1].split(" parameters")[0]
                   .split(" of ")]
    assert 0 < held < total  # this process holds a shard, not the model
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")


def test_run_leaves_no_deepspeed_shm_buffers(tmp_path):
    """DeepSpeed's CPU comm op leaks a 64 MB /dev/shm file per process and run; train.py removes its own.
    (Launched without run_launch, which would clean up after it.)"""
    import glob

    from helpers import remove_shm_buffers

    port = _port()
    cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2", "--master_port", str(port), TRAIN,
           "--output_dir", str(tmp_path / "out"), "--ds_config", "ds_configs/zero2.json", *TINY[:4],
           "--max_steps", "4", "--interval", "2", "--eval_samples", "0"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    finally:
        remove_shm_buffers(port)
