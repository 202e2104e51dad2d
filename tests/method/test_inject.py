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
    assert len(trainable) == 2 * 14 + 1  # A and B per module, one (modules x r) score table
    assert model.beamlora_scores.lora_score.shape == (14, 4) and "beamlora_scores.lora_score" in trainable
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
    with pytest.raises(ValueError, match="matched no module.*q_proj") as e:
        apply(model, cfg(target_modules=["query_key_value"]))
    assert ("For llama models the recommended target names are q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,"
            "down_proj.") in str(e.value)
    assert not find_beamlora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_nothing_matching_in_a_plain_torch_model_lists_its_linear_layers_only():
    from helpers import TwoLayerNet

    with pytest.raises(ValueError) as e:
        apply(TwoLayerNet(), cfg(target_modules=["fc"]))
    assert "named like: ['q_proj', 'down_proj']." in str(e.value) and "recommended" not in str(e.value)


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


# None: the real SmolLM2-135M when installed (converted once, then loaded: about 45 s)
@pytest.mark.parametrize("name", ["builtin-tiny", pytest.param(None, marks=pytest.mark.slow)])
def test_meta_skeleton_check_refuses_what_apply_refuses_on_the_loaded_model(name):
    """train.py's pre-check (check_targets on a weightless skeleton) must agree with apply() on the real weights:
    the same refusals word for word, and the same layers accepted."""
    from beamlora_ds.loading import builtin, models
    from beamlora_ds.method.config import LLAMA_PROJECTIONS
    from beamlora_ds.method.inject import check_targets, matches_target

    path = models.model_path(builtin.resolve_builtin(name))
    skeleton = models.meta_skeleton(path)
    real = models.load_model(path, torch.float32, {})
    assert all(p.is_meta for p in skeleton.parameters())
    assert {n: p.shape for n, p in skeleton.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    smallest = min(min(m.in_features, m.out_features) for n, m in real.named_modules()
                   if isinstance(m, torch.nn.Linear) and matches_target(n, LLAMA_PROJECTIONS))
    refused = [cfg(target_modules=["query_key_value"]), cfg(target_modules=r"layers\.9+\.q_proj"),
               cfg(target_modules=["embed_tokens"]), cfg(r=smallest + 1, alpha=2.0 * smallest)]
    for config in refused:
        with pytest.raises((ValueError, TypeError)) as by_apply:
            apply(real, config)
        with pytest.raises(type(by_apply.value)) as by_skeleton:
            check_targets(skeleton, config)
        assert str(by_skeleton.value) == str(by_apply.value)
    accepted = cfg(r=smallest, alpha=2.0 * smallest)  # the largest r that fits every target
    names = [n for n, _ in check_targets(skeleton, accepted)]
    assert names == apply(real, accepted).module_names and len(names) == 7 * real.config.num_hidden_layers
