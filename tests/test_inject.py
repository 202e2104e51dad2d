"""apply(): which modules get wrapped, what stays trainable, and what is refused before anything changes."""
import pytest
import torch

from beamlora_ds import BeamLoRAConfig, BeamLoRALinear, apply, find_beamlora_modules
from helpers import tiny_llama


def cfg(**kw):
    return BeamLoRAConfig(**{"r": 4, "alpha": 8.0, "total_steps": 100, "interval": 10, **kw})


def test_default_targets_wrap_all_projections_and_freeze_the_rest():
    model = tiny_llama(layers=2)
    n_frozen = sum(p.numel() for p in model.parameters())
    beam = apply(model, cfg())
    assert len(beam.modules) == 14
    assert beam.module_names[0] == "model.layers.0.self_attn.q_proj"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[1] in ("lora_A", "lora_B", "lora_score") for n in trainable)
    assert len(trainable) == 3 * 14
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == n_frozen
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, BeamLoRALinear) and isinstance(q.base_layer, torch.nn.Linear)
    assert q.lora_A.shape == (4, 32) and q.lora_B.shape == (32, 4) and q.lora_score.shape == (4,)
    assert list(find_beamlora_modules(model)) == beam.module_names


def test_regex_targets_match_whole_names_like_peft():
    model = tiny_llama(layers=2)
    beam = apply(model, cfg(target_modules=r"model\.layers\.1\.self_attn\.(q|v)_proj"))
    assert beam.module_names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_nothing_matching_lists_what_exists_and_changes_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        apply(model, cfg(target_modules=["query_key_value"]))
    assert not find_beamlora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_non_linear_match_is_refused():
    with pytest.raises(TypeError, match="embed_tokens"):
        apply(tiny_llama(), cfg(target_modules=["embed_tokens"]))


def test_rank_above_layer_size_is_refused_before_changes():
    model = tiny_llama(hidden=32)
    with pytest.raises(ValueError, match="r=40"):
        apply(model, cfg(r=40, alpha=80.0))
    assert not find_beamlora_modules(model)


def test_invalid_config_is_refused_before_changes():
    model = tiny_llama()
    with pytest.raises(ValueError, match="tau"):
        apply(model, cfg(tau=0))
    assert not find_beamlora_modules(model)


def test_apply_twice_is_refused():
    model = tiny_llama()
    apply(model, cfg())
    with pytest.raises(ValueError, match="already"):
        apply(model, cfg())
