"""trl's SFTTrainer with BeamLoRA attached, run as docs/trl.md shows it: examples/train_trl.py in 2 processes under
DeepSpeed ZeRO-2. One uninterrupted run resets at the right steps; a second run resumed from its checkpoint-3
(after the snapshot at 3, before the reset at 4) ends with the same adapter; stock peft loads that adapter on the
same base and reproduces the BeamLoRA model's logits and loss."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "distributed"))

from test_integration_examples import adapter_tensors, run_example  # noqa: E402

# 8 steps, interval 2: snapshots at 1, 3, 5, resets at 2, 4, 6; checkpoints at 3, 6 and the end
ARGS = ["--steps", 8, "--interval", 2, "--save_every", 3, "--deepspeed", os.path.join(ROOT, "ds_configs", "zero2.json")]
TEXTS = ["12+34=46", "7+80=87"]


@pytest.mark.slow
def test_sft_trainer_resets_resumes_exactly_and_exports_a_stock_peft_adapter(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    said = run_example("train_trl.py", full, ARGS)
    assert "resets at steps [2, 4, 6]" in said and "done: 8 steps, 3 resets" in said, said[-2000:]
    assert checkpoints(full) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    assert "model.safetensors" not in os.listdir(os.path.join(full, "checkpoint-3"))  # adapter-only

    resumed = run_example("train_trl.py", part, [*ARGS, "--resume", os.path.join(full, "checkpoint-3")])
    assert "resets at steps [2, 4, 6]" in resumed and "done: 8 steps, 3 resets" in resumed, resumed[-2000:]
    assert checkpoints(part) == ["checkpoint-6", "checkpoint-8"]  # it started at step 3, not from scratch
    expected, got = adapter_tensors(os.path.join(full, "adapter")), adapter_tensors(os.path.join(part, "adapter"))
    assert expected.keys() == got.keys() and len(expected) == 28  # A and B of 7 projections x 2 layers
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-6, worst

    beamlora, peft = beamlora_and_peft_models(os.path.join(full, "adapter"))
    ids = char_ids(TEXTS)
    with torch.no_grad():
        want, have = beamlora(input_ids=ids, labels=ids), peft(input_ids=ids, labels=ids)
        base = peft.get_base_model()
        with peft.disable_adapter():
            plain = base(input_ids=ids).logits
    assert (have.logits - want.logits).abs().max().item() <= 1e-5
    assert abs(have.loss.item() - want.loss.item()) <= 1e-5
    assert (have.logits - plain).abs().max().item() > 1e-3  # the adapter changes the model: not a vacuous match


def checkpoints(out):
    return sorted((n for n in os.listdir(out) if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def char_ids(texts):
    from beamlora_ds.loading.builtin import char_tokenizer

    return char_tokenizer()(texts, padding=True, return_tensors="pt")["input_ids"]


def beamlora_and_peft_models(adapter):
    """The BeamLoRA model holding the run's unfolded A, B and score (beamlora_state.*), and stock peft's model of
    the folded adapter (adapter_model.safetensors), each on a fresh copy of the example's base."""
    from peft import PeftModel

    import beamlora_ds
    from beamlora_ds.integrations.hf_trainer import load_adapter_into
    from beamlora_ds.loading.builtin import tiny_llama

    model = tiny_llama(torch.float32)
    beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=8, alpha=16, total_steps=8, interval=2))
    load_adapter_into(model, adapter)
    return model.eval(), PeftModel.from_pretrained(tiny_llama(torch.float32), adapter).eval()

