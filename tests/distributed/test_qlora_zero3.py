"""launch/train.py with a 4-bit NF4 base under ZeRO-3 in 2 processes against the same run in 1 process.

The 2-process run (micro-batch 4 per process) and the 1-process run (micro-batch 4 x gradient accumulation 2)
see the same 8 examples per optimizer step, split the same way (micro_batches() gives rank k of the 2-process run
what micro-step k gives the 1-process run), and average the same two per-micro-batch gradients. In fp32 (4-bit
compute fp32, no dropout) they must then agree up to reduction-order rounding: we measured losses equal to
3e-8 relative over 8 steps. The tolerance, 1e-5 relative, is 300 times that, and far below what a real
difference makes: different dropout masks alone moved the step-2 loss by 9e-4; a corrupted 4-bit weight or a
missed reset write moves it by more. The pruned ranks and their sources must be identical.

The eval before training runs the 4-bit model in eval mode without grad: on AVX512-BF16 CPUs that repacks the
weights in place unless quant.load_4bit_model turned it off, and the final save_checkpoint would then fail.
A run stopped and resumed (DeepSpeed checkpoint of a 4-bit model) must continue the same trajectory.
(The exported adapter loading into peft is checked in the export tests, not here.)
"""
import json
import os
import shutil
import socket
import subprocess

import pytest
from helpers import run_launch  # noqa: E402

pytest.importorskip("deepspeed")
pytest.importorskip("bitsandbytes")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "launch", "train.py")
ARGS = ["--model_name_or_path", "builtin-tiny", "--quantization", "nf4", "--ds_config", "ds_configs/qlora_zero3.json",
        "--lora_r", "8", "--lora_dropout", "0", "--max_steps", "6", "--interval", "2", "--p0", "0.8",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--eval_samples", "1", "--save_steps", "0",
        "--max_length", "48", "--per_device_train_batch_size", "4"]
_runs = {}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path_factory, nproc):
    if nproc not in _runs:
        out = tmp_path_factory.mktemp(f"qlora{nproc}")
        extra = [] if nproc == 2 else ["--gradient_accumulation_steps", "2"]
        cmd = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", str(nproc), "--master_port", str(_port()),
               TRAIN, "--output_dir", str(out), *ARGS, *extra]
        proc = run_launch(cmd, timeout=240, cwd=ROOT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(os.path.join(out, "log.jsonl")) as f:
            _runs[nproc] = (out, proc, [json.loads(line) for line in f])
    return _runs[nproc]


def test_qlora_zero3_two_processes_train_reset_and_checkpoint(tmp_path_factory):
    out, proc, log = run(tmp_path_factory, 2)
    text = proc.stdout + proc.stderr
    assert "Loaded builtin-tiny in 4-bit NF4 (double quantization): 14 linear layers quantized, compute fp32" in text
    assert "ZeRO-3 fp32 | 2 processes" in text
    assert [r["step"] for r in log if r["type"] == "train"] == list(range(1, 7))
    resets = [r for r in log if r["type"] == "reset"]
    assert [r["step"] for r in resets] == [2, 4] and len(resets[0]["pruned"]) > 0
    assert [r["when"] for r in log if r["type"] == "eval"] == ["before", "after"]
    assert os.path.isfile(os.path.join(out, "checkpoints", "global_step6", "beamlora_state_rank1.pt"))
    assert "done: 6 steps, 2 resets" in proc.stdout


def test_qlora_zero3_two_processes_match_one_process(tmp_path_factory):
    _, _, two = run(tmp_path_factory, 2)
    _, proc, one = run(tmp_path_factory, 1)
    assert "ZeRO-3 fp32 | 1 processes" in proc.stdout + proc.stderr
    losses = {r["step"]: r["loss"] for r in one if r["type"] == "train"}
    for r in (r for r in two if r["type"] == "train"):
        assert r["loss"] == pytest.approx(losses[r["step"]], rel=1e-5), r["step"]
    resets_two = [r for r in two if r["type"] == "reset"]
    resets_one = [r for r in one if r["type"] == "reset"]
    assert [(r["step"], r["pruned"], r["sources"]) for r in resets_two] == \
        [(r["step"], r["pruned"], r["sources"]) for r in resets_one]
    for a, b in zip(resets_two, resets_one):
        for name, values in a["importance_after"].items():
            assert values == pytest.approx(b["importance_after"][name], rel=1e-4, abs=1e-6), name


def test_qlora_zero3_stop_and_resume_continue_the_same_trajectory(tmp_path_factory):
    """A DeepSpeed checkpoint of a 4-bit model holds the Linear4bit quantization constants under keys a strict
    load_state_dict rejects; load_4bit_model makes them loadable. Stopping after step 3 (a snapshot step; the
    next reset is at 4) and resuming must give the uninterrupted run's losses and resets."""
    _, _, reference = run(tmp_path_factory, 2)
    out = tmp_path_factory.mktemp("qlora_resume")
    base = [shutil.which("deepspeed") or "deepspeed", "--num_gpus", "2"]
    args = [TRAIN, "--output_dir", str(out), *ARGS, "--eval_samples", "0"]
    first = subprocess.run([*base, "--master_port", str(_port()), *args, "--stop_after", "3"],
                           capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert first.returncode == 0 and "stopped after step 3" in first.stdout, first.stderr[-3000:]
    second = subprocess.run([*base, "--master_port", str(_port()), *args, "--resume"],
                            capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log if r["type"] == "train"] == list(range(1, 7))
    expected = {r["step"]: r["loss"] for r in reference if r["type"] == "train"}
    for r in (r for r in log if r["type"] == "train"):
        assert r["loss"] == pytest.approx(expected[r["step"]], rel=1e-5), r["step"]
    assert [(r["step"], r["pruned"]) for r in log if r["type"] == "reset"] == \
        [(r["step"], r["pruned"]) for r in reference if r["type"] == "reset"]
