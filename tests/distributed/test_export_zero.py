"""Export from a real 2-process DeepSpeed run (CPU, gloo), against stock peft and transformers.

One launch trains the tiny Llama with BeamLoRA (a reset included) under ZeRO-3, then ZeRO-2, then ZeRO-0,
and for each stage calls save_adapter(engine, ...) and beamlora_ds.save_checkpoint(...). Here: the adapter
loads in stock peft and gives the logits the engine computed; `beamlora-export` on the checkpoint (no
distributed job) writes the very same files; --merge gives a plain model with the same logits.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import peft
from safetensors.torch import load_file  # noqa: E402

from beamlora_ds import testing  # noqa: E402
from beamlora_ds.export import cli as export_cli  # noqa: E402
import beamlora_ds  # noqa: E402
from beamlora_ds.checkpointing.base_identity import base_identity  # noqa: E402
from helpers import base_tensors_in_checkpoint, tiny_llama  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STAGES = (3, 2, 1, 0)
TIMEOUT_S = 240
R, TAU = 4, 0.05  # as in the worker
BEAMLORA = beamlora_ds.BeamLoRAConfig(r=R, alpha=8.0, total_steps=8, interval=4)  # wraps the base as the worker's
FIXED_IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))  # the worker's fixed input


def empty(folder):
    """What a first try wrote, removed (the folder stays: it is the launch's working directory)."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export"))
    cmd = testing.spawn_command(WORKER, ["--out_dir", out, "--stages", ",".join(map(str, STAGES))], nproc=2)
    proc = testing.run(cmd, timeout=TIMEOUT_S, cwd=out, before_retry=lambda: empty(out))  # a retry starts fresh
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = torch.load(os.path.join(out, "result.pt"), weights_only=False)
    assert result["world"] == 2
    return out, result


def logits(model):
    with torch.no_grad():
        return model.eval()(FIXED_IDS).logits.float()


def adapter_files(folder):
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    return config, load_file(os.path.join(folder, "adapter_model.safetensors")), \
        load_file(os.path.join(folder, "beamlora_state.safetensors"))


def test_zero3_adapter_loads_in_stock_peft_and_gives_the_engine_logits(run):
    out, result = run
    trained = result[3]
    assert len(trained["resets"]) == 1 and trained["resets"][0][1] > 0  # the run pruned and refilled under ZeRO-3
    scores = torch.stack([v for k, v in trained["weights"].items() if k.endswith("lora_score")])
    assert (R * torch.softmax(scores / TAU, dim=-1) - 1).abs().max() > 0.2  # folding changes A visibly

    loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=0), os.path.join(out, "adapter3"))
    got, expected = logits(loaded), trained["logits"]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (expected - logits(tiny_llama(seed=0))).abs().max() > 1e-2


@pytest.mark.parametrize("stage", STAGES)
def test_the_adapter_is_the_folded_fp32_master(run, stage):
    out, result = run
    config, folded, unfolded = adapter_files(os.path.join(out, f"adapter{stage}"))
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (R, 8, "CAUSAL_LM")
    assert config["base_model_name_or_path"] == os.path.join(out, "base")
    weights = result[stage]["weights"]
    names = sorted({k.rpartition(".")[0] for k in weights})
    assert len(names) == 14 and len(folded) == 28
    for name in names:
        A, B, score = (weights[f"{name}.{key}"] for key in ("lora_A", "lora_B", "lora_score"))
        w = R * torch.softmax(score / TAU, dim=0)
        assert torch.allclose(folded[f"base_model.model.{name}.lora_A.weight"], w[:, None] * A, rtol=0, atol=1e-7)
        assert torch.equal(folded[f"base_model.model.{name}.lora_B.weight"], B)
        for key in ("lora_A", "lora_B", "lora_score"):
            assert torch.equal(unfolded[f"{name}.{key}"], weights[f"{name}.{key}"])


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoints_hold_no_base_tensor_and_resume_on_the_base_they_trained(run, stage):
    """Walked tensor by tensor, no file of the checkpoint holds a weight of the frozen base (whole, or a ZeRO-3
    fragment); the same save with include_base=True does (so the walk can fail), and is larger. Loaded into a freshly
    built base it resumes every adapter tensor exactly; into another base (other weights, same architecture) it is
    refused on every process, naming both."""
    out, result = run
    base = tiny_llama(seed=0)
    assert base_tensors_in_checkpoint(os.path.join(out, f"ckpt{stage}"), base) == []
    assert base_tensors_in_checkpoint(os.path.join(out, f"full{stage}"), base)
    assert folder_bytes(os.path.join(out, f"full{stage}")) > folder_bytes(os.path.join(out, f"ckpt{stage}"))
    resumed, trained = result[stage]["resumed"], result[stage]["weights"]
    assert isinstance(resumed, dict), resumed
    assert all(torch.equal(resumed[k], trained[k]) for k in resumed) and len(resumed) == 28
    refused = result[stage]["other_base"]
    assert isinstance(refused, str) and "'tiny-seed0'" in refused and "'tiny-seed1'" in refused, refused
    # the fingerprint read through the engine (ZeRO-3: sampled from the shards) is the unwrapped base's
    beamlora_ds.apply(base, BEAMLORA)
    assert result[stage]["fingerprint"] == base_identity(base)["fingerprint"]


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(folder) for n in names)


def test_a_second_save_is_refused_on_every_process_without_hanging(run):
    _, result = run
    assert [result[stage]["refused_on"] for stage in STAGES] == [2] * len(STAGES)


def test_cli_subprocess_on_the_zero3_checkpoint_writes_the_same_adapter(run):
    out, _ = run
    target = os.path.join(out, "cli3")
    proc = subprocess.run([sys.executable, "-m", "beamlora_ds.export.cli", os.path.join(out, "ckpt3"), target,
                           "--base_model", os.path.join(out, "base")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_adapter(target, os.path.join(out, "adapter3"))


@pytest.mark.parametrize("stage", [2, 1, 0])
def test_cli_on_stage_2_1_and_0_checkpoints_writes_the_same_adapter(run, stage):
    out, _ = run
    target = os.path.join(out, f"cli{stage}")
    assert export_cli.main([os.path.join(out, f"ckpt{stage}"), target, "--tag", "global_step8",
                        "--base_model", os.path.join(out, "base")]) == 0
    assert_same_adapter(target, os.path.join(out, f"adapter{stage}"))


def assert_same_adapter(folder, reference):
    config, folded, unfolded = adapter_files(folder)
    ref_config, ref_folded, ref_unfolded = adapter_files(reference)
    assert config == ref_config
    for got, expected in ((folded, ref_folded), (unfolded, ref_unfolded)):
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_cli_refuses_an_existing_adapter_folder(run):
    out, _ = run
    target = os.path.join(out, "adapter3")
    before = sorted(os.listdir(target))
    assert export_cli.main([os.path.join(out, "ckpt3"), target]) == 2
    assert sorted(os.listdir(target)) == before
    missing = os.path.join(out, "never_written")
    assert export_cli.main([os.path.join(out, "ckpt3"), missing, "--tag", "global_step99"]) == 2
    assert not os.path.exists(missing)


def test_cli_merge_gives_a_plain_model_with_the_engine_logits(run):
    from transformers import AutoModelForCausalLM

    out, result = run
    target = os.path.join(out, "merged3")
    assert export_cli.main([os.path.join(out, "ckpt3"), target, "--merge", "--base_model",
                            os.path.join(out, "base")]) == 0
    assert "adapter_config.json" not in os.listdir(target)
    merged = AutoModelForCausalLM.from_pretrained(target)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    got, expected = logits(merged), result[3]["logits"]
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
