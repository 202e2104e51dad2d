"""BeamLoRALinear against stock peft LoRA (the oracle) and against the formula of docs/method.md section 1."""
import copy

import pytest
import torch
from torch import nn

from beamlora_ds import BeamLoRAConfig, BeamLoRALinear, apply
from beamlora_ds.method.layer import rank_weights
from helpers import tiny_llama

import peft


class OneProj(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 12)

    def forward(self, x):
        return self.proj(x)


def _peft_twin(model, r, alpha, targets):
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                                      target_modules=targets))


def _copy_into_peft(beam_model, peft_model):
    """Give peft's lora_A/lora_B exactly our A and B."""
    peft_params = dict(peft_model.named_parameters())
    copied = 0
    for name, p in beam_model.named_parameters():
        for ours, theirs in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight")):
            if name.endswith(ours):
                peft_params["base_model.model." + name[: -len(ours)] + theirs].data.copy_(p.data)
                copied += 1
    return copied


def test_zero_score_equals_stock_peft_lora_outputs_and_grads():
    torch.manual_seed(0)
    model = OneProj()
    twin = _peft_twin(model, r=4, alpha=8, targets=["proj"])
    apply(model, BeamLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["proj"], total_steps=100, interval=10))
    with torch.no_grad():
        model.proj.lora_B.normal_()  # B = 0 would hide any error in A, B or the scaling
    assert _copy_into_peft(model, twin) == 2
    x = torch.randn(5, 16)
    ours, theirs = model(x), twin(x)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours - theirs).abs().max()
    ours.square().sum().backward()
    theirs.square().sum().backward()
    lora = twin.base_model.model.proj
    assert torch.allclose(model.proj.lora_A.grad, lora.lora_A["default"].weight.grad, atol=1e-5)
    assert torch.allclose(model.proj.lora_B.grad, lora.lora_B["default"].weight.grad, atol=1e-5)


def test_tiny_llama_all_projections_match_peft_logits():
    model = tiny_llama()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    twin = _peft_twin(model, r=4, alpha=16, targets=targets)
    beam = apply(model, BeamLoRAConfig(r=4, alpha=16, dropout=0.0, total_steps=100, interval=10))
    assert len(beam.modules) == 7 * 2
    torch.manual_seed(1)
    with torch.no_grad():
        for m in beam.modules:
            m.lora_B.normal_(std=0.2)
    assert _copy_into_peft(model, twin) == 2 * 14
    ids = torch.randint(0, 64, (2, 9))
    ours, theirs = model(ids).logits, twin(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert not torch.allclose(ours, tiny_llama()(ids).logits, atol=1e-3)  # the adapter really contributes


def test_nonzero_score_follows_the_formula():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = BeamLoRALinear(base, r=4, alpha=8.0, tau=0.05)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_score.copy_(torch.tensor([0.1, -0.05, 0.0, 0.02]))
    x = torch.randn(3, 10)
    w = 4 * torch.softmax(layer.lora_score.double() / 0.05, dim=0)
    expected = (x.double() @ base.weight.double().T + base.bias.double()
                + (8.0 / 4) * ((x.double() @ layer.lora_A.double().T) * w) @ layer.lora_B.double().T)
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)


def test_rank_weights_sum_to_r_and_use_fp32_for_bf16_scores():
    score = torch.tensor([0.013, -0.02, 0.031, 0.0, 0.007, -0.011], dtype=torch.bfloat16)
    w = rank_weights(score, tau=0.03)
    assert w.dtype == torch.float32
    assert torch.allclose(w.sum(), torch.tensor(6.0), atol=1e-5)
    reference = 6 * torch.softmax(score.double() / 0.03, dim=0)
    assert torch.allclose(w.double(), reference, atol=1e-6)
    bf16_softmax = 6 * torch.softmax(score / 0.03, dim=0).double()
    assert (bf16_softmax - reference).abs().max() > (w.double() - reference).abs().max()


def test_dropout_hits_the_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = BeamLoRALinear(base, r=2, alpha=2.0, dropout=0.5).train()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), base(x))  # B = 0: whatever dropout does, the base path is untouched
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    assert torch.allclose(out, base(x) + (dropped @ layer.lora_A.T) @ layer.lora_B.T, atol=1e-6)


def test_score_is_trained_once_b_is_nonzero():
    layer = BeamLoRALinear(nn.Linear(6, 6), r=3, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(torch.randn(2, 6)).sum().backward()
    assert layer.lora_score.grad is not None and layer.lora_score.grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None


def test_bf16_base_creates_bf16_adapter_and_runs():
    layer = BeamLoRALinear(nn.Linear(8, 8).to(torch.bfloat16), r=2, alpha=4.0)
    assert layer.lora_A.dtype == torch.bfloat16
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_rank_larger_than_layer_is_refused():
    with pytest.raises(ValueError, match="exceeds min"):
        BeamLoRALinear(nn.Linear(4, 16), r=8, alpha=8)


def test_conv1d_base_follows_the_formula_with_its_transposed_weight():
    """A GPT-2 style transformers Conv1D stores its weight in x out and computes x W + b: the adapter keeps the
    nn.Linear shapes (A: r x in, B: out x r) and adds the same delta."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(7, 10)  # nf (out) = 7, nx (in) = 10: weight 10 x 7
    layer = BeamLoRALinear(base, r=4, alpha=8.0, tau=0.05)
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (10, 7, True)
    assert layer.lora_A.shape == (4, 10) and layer.lora_B.shape == (7, 4)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_score.copy_(torch.tensor([0.1, -0.05, 0.0, 0.02]))
    x = torch.randn(2, 3, 10)
    w = 4 * torch.softmax(layer.lora_score.double() / 0.05, dim=0)
    expected = (x.double() @ base.weight.double() + base.bias.double()
                + (8.0 / 4) * ((x.double() @ layer.lora_A.double().T) * w) @ layer.lora_B.double().T)
    assert torch.allclose(layer(x).double(), expected, atol=1e-5)
    assert not BeamLoRALinear(nn.Linear(10, 7), r=4, alpha=8.0).fan_in_fan_out


def test_rank_larger_than_a_conv1d_layer_is_refused():
    from transformers.pytorch_utils import Conv1D

    with pytest.raises(ValueError, match=r"exceeds min\(in_features=16, out_features=4\)"):
        BeamLoRALinear(Conv1D(4, 16), r=8, alpha=8)
