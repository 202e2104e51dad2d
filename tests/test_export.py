"""Export against stock peft (the oracle): the folded adapter must load with no extra code and give the
BeamLoRA model's logits; an unfolded one would not. Plus the refusals and merging (BEAMLORA.md section 6)."""
import json
import os

import pytest
import torch
from torch import nn

from beamlora_ds import BeamLoRAConfig, BeamLoRALinear, apply, find_beamlora_modules
from beamlora_ds import export
from beamlora_ds.export import load_state, merge_adapter, save_adapter, save_merged
from helpers import tiny_llama

peft = pytest.importorskip("peft")
safetensors_torch = pytest.importorskip("safetensors.torch")

PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
FILES = {"adapter_model.safetensors", "adapter_config.json", "beamlora_state.safetensors", "beamlora_state.json"}


def trained_like(model, r=4, alpha=8.0, tau=0.05, seed=1):
    """BeamLoRA on `model` with random nonzero B and scores (score = 0 would make folding a no-op)."""
    beam = apply(model, BeamLoRAConfig(r=r, alpha=alpha, tau=tau, dropout=0.0, total_steps=100, interval=10))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in beam.modules:
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
            m.lora_score.copy_(torch.randn(m.lora_score.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def beam_model():
    return trained_like(tiny_llama(seed=0))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def load_in_peft(adapter_dir):
    return peft.PeftModel.from_pretrained(tiny_llama(seed=0), adapter_dir).eval()


def test_stock_peft_loads_the_adapter_and_reproduces_the_logits(beam_model, ids, tmp_path):
    out = str(tmp_path / "adapter")
    assert save_adapter(beam_model, out) == out
    assert set(os.listdir(out)) == FILES and not [p for p in os.listdir(tmp_path) if p.startswith(".")]

    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 8, "CAUSAL_LM")
    assert config["target_modules"] == PROJECTIONS and config["bias"] == "none" and not config["use_rslora"]

    loaded = load_in_peft(out)
    assert isinstance(loaded, peft.PeftModelForCausalLM)
    written = safetensors_torch.load_file(os.path.join(out, "adapter_model.safetensors"))
    assert len(written) == 2 * 14 and all(k.startswith("base_model.model.model.layers.") for k in written)
    assert set(peft.get_peft_model_state_dict(loaded)) == set(written)  # every key landed, none ignored

    expected = logits(beam_model, ids)
    got = logits(loaded, ids)
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (expected - logits(tiny_llama(seed=0), ids)).abs().max() > 1e-2  # the adapter really contributes


def test_an_unfolded_adapter_would_give_another_model(beam_model, ids, tmp_path):
    """Why folding matters: the same A and B without diag(w) give visibly different logits in stock peft."""
    out = str(tmp_path / "adapter")
    save_adapter(beam_model, out)
    path = os.path.join(out, "adapter_model.safetensors")
    tensors = safetensors_torch.load_file(path)
    for name, m in find_beamlora_modules(beam_model).items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().clone()
    safetensors_torch.save_file(tensors, path)
    gap = (logits(load_in_peft(out), ids) - logits(beam_model, ids)).abs().max()
    assert gap > 1e-2, gap


def test_the_unfolded_state_is_saved_under_our_names_and_refolds(beam_model, tmp_path):
    out = str(tmp_path / "adapter")
    save_adapter(beam_model, out, base_model_name_or_path="my/base")
    state = load_state(out)
    assert (state.r, state.alpha, state.tau) == (4, 8.0, 0.05)
    modules = find_beamlora_modules(beam_model)
    assert state.module_names == list(modules)
    for name, m in modules.items():
        assert torch.equal(state.lora_score[name], m.lora_score.detach())
        assert torch.equal(state.lora_A[name], m.lora_A.detach())
    assert export.peft_tensors(state).keys() == safetensors_torch.load_file(f"{out}/adapter_model.safetensors").keys()
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == "my/base"


def test_folding_is_diag_w_times_A():
    A, B, score = torch.randn(3, 5), torch.randn(4, 3), torch.tensor([0.1, -0.05, 0.0])
    w = 3 * torch.softmax(score / 0.05, dim=0)
    folded_A, folded_B = export.fold(A, B, score, 0.05)
    assert torch.allclose(folded_A, torch.diag(w) @ A) and torch.equal(folded_B, B)
    x = torch.randn(7, 5)
    assert torch.allclose(x @ folded_A.T @ folded_B.T, ((x @ A.T) * w) @ B.T, atol=1e-6)


def test_refuses_a_model_without_beamlora_modules(tmp_path):
    with pytest.raises(ValueError, match="no BeamLoRA modules"):
        save_adapter(tiny_llama(), str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


def test_refuses_a_non_empty_out_dir_unless_overwrite(beam_model, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(beam_model, str(out))
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"

    save_adapter(beam_model, str(out), overwrite=True)  # replaces the folder as a whole
    assert set(os.listdir(out)) == FILES
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no temporary or old folders left behind


def test_an_empty_existing_out_dir_is_fine(beam_model, tmp_path):
    (tmp_path / "adapter").mkdir()
    save_adapter(beam_model, str(tmp_path / "adapter"))
    assert set(os.listdir(tmp_path / "adapter")) == FILES


def test_overwrite_refuses_a_folder_with_subfolders(beam_model, tmp_path):
    """A run folder (checkpoints/ inside) given by mistake must not be deleted by overwrite=True."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="holds folders"):
        save_adapter(beam_model, str(tmp_path / "run"), overwrite=True)
    assert os.listdir(tmp_path / "run") == ["checkpoints"]


def test_a_crash_while_writing_leaves_the_old_adapter_and_no_partial_one(beam_model, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    save_adapter(beam_model, str(out))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def crash(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_json", crash)  # after adapter_model.safetensors is written
    with torch.no_grad():
        find_beamlora_modules(beam_model)["model.layers.0.self_attn.q_proj"].lora_B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(beam_model, str(out), overwrite=True)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    with pytest.raises(OSError, match="disk full"):
        save_adapter(beam_model, str(tmp_path / "fresh"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_refuses_a_tensor_that_does_not_fit_its_module(beam_model, tmp_path):
    """An ungathered ZeRO-3 shard is an empty tensor: writing it would give peft a broken adapter."""
    module = find_beamlora_modules(beam_model)["model.layers.1.mlp.down_proj"]
    module.lora_A.data = torch.empty(0)
    with pytest.raises(ValueError, match=r"down_proj.lora_A has shape \(0,\).*\(4, 64\)"):
        save_adapter(beam_model, str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


def test_target_modules_fall_back_to_full_names_when_leaf_names_would_select_more(ids, tmp_path):
    model = tiny_llama(seed=0)
    apply(model, BeamLoRAConfig(r=4, alpha=8.0, dropout=0.0, total_steps=100, interval=10,
                                target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj"))
    with torch.no_grad():
        for m in find_beamlora_modules(model).values():
            m.lora_B.normal_(std=0.2)
            m.lora_score.normal_(std=0.05)
    out = str(tmp_path / "adapter")
    save_adapter(model.eval(), out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        targets = json.load(f)["target_modules"]
    assert targets == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    loaded = load_in_peft(out)
    assert len(peft.get_peft_model_state_dict(loaded)) == 4  # peft wrapped exactly these two, not layer 1's
    assert torch.allclose(logits(loaded, ids), logits(model, ids), atol=1e-5)


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


def test_merging_a_4bit_base_gives_bf16_dequantized_plus_delta(ids, tmp_path, caplog):
    """NF4 base loaded like a QLoRA run. Its eval forward on this CPU repacks the 4-bit weights in place
    (AVX512-BF16 kernel layout); the merge must still use the true dense weights, for every layer."""
    pytest.importorskip("bitsandbytes")
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
    assert getattr(model.model.layers[0].mlp.down_proj.base_layer.weight.quant_state, "packing_format_for_cpu", False)

    out = str(tmp_path / "merged")
    with caplog.at_level("WARNING", logger="beamlora_ds.export"):
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


def test_cli_merge_needs_a_base_model(capsys):
    with pytest.raises(SystemExit) as e:
        export.parse_args(["ckpt", "out", "--merge"])
    assert e.value.code == 2 and "--base_model" in capsys.readouterr().err


def test_cli_reports_a_missing_checkpoint(tmp_path, caplog):
    (tmp_path / "ckpt").mkdir()
    assert export.main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    assert "no 'latest' file" in caplog.text and not os.path.exists(tmp_path / "out")


def test_checkpoint_keys_are_found_with_or_without_a_module_prefix():
    weights = {"module.model.q_proj.lora_A": torch.ones(1), "model.v_proj.lora_A": torch.zeros(1)}
    assert export._lookup(weights, "model.q_proj.lora_A") is weights["module.model.q_proj.lora_A"]
    assert export._lookup(weights, "module.model.v_proj.lora_A") is weights["model.v_proj.lora_A"]
    assert export._lookup(weights, "model.k_proj.lora_A") is None
