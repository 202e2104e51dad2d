"""Merging the adapter into the base weights gives the BeamLoRA model's logits with plain layers, also from a
4-bit base (docs/method.md section 6)."""
import os

import pytest
import torch
from torch import nn

from beamlora_ds import find_beamlora_modules
from beamlora_ds.export.merge import merge_adapter, merged_linear, save_merged
from adapter_helpers import logits, trained_like
from helpers import tiny_llama




def test_merge_adapter_gives_the_same_logits_and_plain_layers(beam_model, ids):
    expected = logits(beam_model, ids)
    merged = merge_adapter(beam_model)
    assert merged is beam_model
    assert not find_beamlora_modules(merged)
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any("lora" in name for name, _ in merged.named_parameters())
    got = logits(merged, ids)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_save_merged_reloads_with_plain_transformers(beam_model, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    expected = logits(beam_model, ids)
    out = str(tmp_path / "merged")
    save_merged(beam_model, out)
    assert "adapter_config.json" not in os.listdir(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(reloaded, ids), expected, atol=1e-5)


def test_merge_refuses_a_model_without_adapter():
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_adapter(tiny_llama())


def test_merge_refuses_a_wrapped_model(beam_model):
    class DistributedDataParallel(nn.Module):  # stands in by name, as wrappers.is_model_wrapper checks
        def __init__(self, module):
            super().__init__()
            self.module = module

    with pytest.raises(TypeError, match="outside DeepSpeed/DDP"):
        merge_adapter(DistributedDataParallel(beam_model))
    assert find_beamlora_modules(beam_model)  # untouched


def test_merged_linear_refuses_an_update_of_another_shape():
    with pytest.raises(ValueError, match=r"base weight is \(4, 3\).*\(3, 4\)"):
        merged_linear(nn.Linear(3, 4), torch.zeros(3, 4), "q_proj")


def test_merging_a_4bit_base_gives_bf16_dequantized_plus_delta(ids, tmp_path, caplog):
    """NF4 base loaded like a QLoRA run. Its eval forward on a CPU with AVX512-BF16 repacks the 4-bit weights in
    place (that kernel's layout); the merge must still use the true dense weights, for every layer. Without that
    instruction set (some CI machines) nothing is repacked and the merge is checked on the plain layout."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # hidden 64: bitsandbytes' CPU repacking needs in_features >= its block size (64); 32 crashes inside bnb.
    # down_proj (in 128) has two blocks per row, where a wrong absmax layout shows.
    tiny_llama(seed=0, hidden=64).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                   bnb_4bit_compute_dtype=torch.float32))
    trained_like(model)
    expected_weights = {}
    for name, m in find_beamlora_modules(model).items():  # before any forward: nothing is repacked yet
        dense = bnbf.dequantize_4bit(m.base_layer.weight.data, m.base_layer.weight.quant_state).float()
        folded_A = m.rank_weights()[:, None] * m.lora_A.detach()
        expected_weights[name] = dense + m.scaling * (m.lora_B.detach() @ folded_A)
    expected = logits(model, ids)
    layer = model.model.layers[0].mlp.down_proj.base_layer
    repacks = getattr(layer, "support_avx512bf16_for_cpu", False)  # bitsandbytes' own test of this CPU
    assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False) == bool(repacks)

    out = str(tmp_path / "merged")
    with caplog.at_level("WARNING", logger="beamlora_ds.export.merge"):
        save_merged(model, out)
    assert "bf16, not 4-bit" in caplog.text
    for name, weight in expected_weights.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16
        # bf16 storage (2^-9 relative) and the bf16 absmax of the packed layout; a wrong layout is off by ~1e-2
        assert torch.allclose(merged.weight.float(), weight, atol=2e-3, rtol=1e-2), name

    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    got = logits(reloaded, ids).float()
    effect = (expected - logits(tiny_llama(seed=0, hidden=64), ids)).abs().max()
    # a bf16 model (weights and activations) vs NF4 + fp32 compute: measured gap 0.011, adapter effect 0.68
    assert (got - expected).abs().max() < 0.05 * effect, ((got - expected).abs().max(), effect)


def test_merging_a_4bit_gpt2_gives_conv1d_layers_that_reload(tmp_path):
    """transformers quantizes GPT-2's Conv1D layers into Linear4bit (weights transposed to out x in, the class kept
    in `source_cls`). The merged layers must be Conv1D again, or the saved model does not load as GPT-2; and the
    adapter of such a model says fan_in_fan_out=true, as for the unquantized base peft will load it on."""
    import transformers
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.pytorch_utils import Conv1D

    from beamlora_ds import BeamLoRAConfig, apply
    from beamlora_ds.export.adapter_format import shared_settings

    torch.manual_seed(0)  # n_embd 64: bitsandbytes' CPU repacking needs in_features >= its block size (64)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                   bnb_4bit_compute_dtype=torch.float32))
    beam = apply(model, BeamLoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"],
                                       total_steps=40, interval=8))
    with torch.no_grad():
        for m in beam.modules:
            m.lora_B.normal_(std=0.2)
    assert shared_settings(find_beamlora_modules(model))[4] is True  # fan_in_fan_out
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    expected = logits(model.eval(), ids)
    save_merged(model, str(tmp_path / "merged"))
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D and type(model.transformer.h[1].mlp.c_proj) is Conv1D
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    effect = (expected - logits(AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval(), ids)).abs().max()
    got = logits(reloaded, ids).float()
    # bf16 weights and activations against NF4 + fp32 compute: measured gap 0.006, adapter effect 0.94
    assert (got - expected).abs().max() < 0.05 * effect, ((got - expected).abs().max(), effect)
