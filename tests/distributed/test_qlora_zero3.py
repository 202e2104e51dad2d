"""launch/train.py with a 4-bit NF4 base under ZeRO-3 in 2 processes against the same run in 1 process.

The 2-process run (micro-batch 4 per process) and the 1-process run (micro-batch 4 x gradient accumulation 2)
see the same 8 examples per optimizer step, split the same way (micro_batches() gives rank k of the 2-process run
what micro-step k gives the 1-process run), and average the same two per-micro-batch gradients. In fp32 (4-bit
compute fp32, no dropout) they must then agree up to reduction-order rounding: we measured losses equal to
3e-8 relative over 8 steps. The tolerance, 1e-5 relative, is 300 times that, and far below what a real
difference makes: different dropout masks alone moved the step-2 loss by 9e-4; a corrupted 4-bit weight or a
missed reset write moves it by more. The pruned ranks and their sources must be identical.

The eval before training runs the 4-bit model in eval mode without grad: on AVX512-BF16 CPUs that repacks the
weights in place unless load_4bit_model turned it off, and the final save_checkpoint would then fail.
The 2-process run is stopped after step 3 and resumed (a DeepSpeed checkpoint of a 4-bit model) and must still
match the 1-process run that never stopped: one comparison covers the split and the resume.
(The exported adapter loading into peft is checked in the export tests, not here.)
"""
import os

import pytest
import torch
from transformers import LlamaForCausalLM

from beamlora_ds.loading import builtin
from helpers import base_tensors_in_checkpoint
from train_runs import launch_train, read_log

ARGS = ["--model_name_or_path", "builtin-tiny", "--quantization", "nf4", "--ds_config", "ds_configs/qlora_zero3.json",
        "--lora_r", "8", "--lora_dropout", "0", "--max_steps", "6", "--interval", "2", "--p0", "0.8",
        "--learning_rate", "3e-3", "--logging_steps", "1", "--eval_samples", "1", "--save_steps", "0",
        "--max_length", "48", "--per_device_train_batch_size", "4"]


@pytest.fixture(scope="module")
def two_processes_stopped_and_resumed(tmp_path_factory):
    """The 2-process run, stopped after step 3 (a snapshot step; the next reset is at 4) and resumed: the folder and
    both launches' output."""
    out = tmp_path_factory.mktemp("qlora2")
    first = launch_train(out, *ARGS, "--stop_after", "3", timeout=240)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = launch_train(out, *ARGS, "--resume", timeout=240)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return out, first.stdout + first.stderr, second.stdout + second.stderr


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The same run in one process, micro-batch 4 x gradient accumulation 2, never stopped."""
    out = tmp_path_factory.mktemp("qlora1")
    proc = launch_train(out, *ARGS, "--gradient_accumulation_steps", "2", nproc=1, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read_log(out), proc.stdout + proc.stderr


def test_qlora_zero3_two_processes_train_stop_resume_reset_and_checkpoint(two_processes_stopped_and_resumed):
    """The stopped run resumes and finishes; its checkpoints hold no tensor of the 4-bit base: neither a weight
    (packed or whole) nor the Linear4bit quantization constants, which DeepSpeed's exclude_frozen_parameters alone
    keeps (the base is quantized again from its source on resume)."""
    out, first, second = two_processes_stopped_and_resumed
    assert "Loaded builtin-tiny in 4-bit NF4 (double quantization): 14 linear layers quantized, compute fp32" in first
    assert "ZeRO-3 fp32 | 2 processes" in first and "stopped after step 3" in first
    assert "in turns per node" in first  # bounded loading (docs/qlora.md, Loading at scale) is the default
    log = read_log(out)
    assert [r["step"] for r in log if r["type"] == "train"] == list(range(1, 7))  # 1-3, then 4-6 after the resume
    resets = [r for r in log if r["type"] == "reset"]
    assert [r["step"] for r in resets] == [2, 4] and len(resets[0]["pruned"]) > 0
    assert [r["when"] for r in log if r["type"] == "eval"] == ["before", "after"]
    assert os.path.isfile(os.path.join(out, "checkpoints", "global_step6", "beamlora_state_rank1.pt"))
    assert "done: 6 steps, 2 resets" in second
    base = LlamaForCausalLM(builtin.tiny_llama_config())
    for tag in ("global_step3", "global_step6"):
        folder = os.path.join(out, "checkpoints", tag)
        assert base_tensors_in_checkpoint(folder, base) == []
        for name in (n for n in os.listdir(folder) if n.endswith("model_states.pt")):
            module = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)["module"]
            assert module and all(key.endswith(("lora_A", "lora_B", "lora_score")) for key in module), sorted(module)


def test_qlora_zero3_two_processes_stopped_and_resumed_match_one_process(two_processes_stopped_and_resumed,
                                                                         one_process):
    out, _, _ = two_processes_stopped_and_resumed
    two = read_log(out)
    one, output = one_process
    assert "ZeRO-3 fp32 | 1 processes" in output
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
