"""save_adapter on a live model, against stock peft (the oracle): the folded adapter must load with no extra code
and give the BeamLoRA model's logits; bad input is refused before anything is written (docs/method.md section 6).
Under DeepSpeed: tests/distributed/test_export_zero.py."""
import json
import os

import pytest
import torch

from beamlora_ds import find_beamlora_modules
from beamlora_ds.export.live import save_adapter
from adapter_helpers import FILES, PROJECTIONS, load_in_peft, logits
from helpers import tiny_llama

import peft
import safetensors.torch as safetensors_torch



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


def test_refuses_a_tensor_that_does_not_fit_its_module(beam_model, tmp_path):
    """An ungathered ZeRO-3 shard is an empty tensor: writing it would give peft a broken adapter."""
    module = find_beamlora_modules(beam_model)["model.layers.1.mlp.down_proj"]
    module.lora_A.data = torch.empty(0)
    with pytest.raises(ValueError, match=r"down_proj.lora_A has shape \(0,\).*\(4, 64\)"):
        save_adapter(beam_model, str(tmp_path / "adapter"))
    assert os.listdir(tmp_path) == []


def test_the_engine_wrapper_is_looked_through(beam_model, tmp_path):
    """Key names must not carry a wrapper's `module.`: DDP/DeepSpeed-style wrappers are unwrapped first."""
    class DistributedDataParallel(torch.nn.Module):  # stands in by name, as wrappers.is_model_wrapper checks
        def __init__(self, module):
            super().__init__()
            self.module = module

    out = str(tmp_path / "adapter")
    save_adapter(DistributedDataParallel(beam_model), out)
    written = safetensors_torch.load_file(os.path.join(out, "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.model.layers.") for k in written)


def test_an_adapter_on_a_built_in_base_says_how_to_load_that_base(tmp_path):
    """builtin-tiny is no hub name: the adapter's README.md gives the code, and that code reproduces the logits."""
    import beamlora_ds

    torch.manual_seed(0)
    model, _ = beamlora_ds.load_builtin_model("builtin-tiny")
    beam = beamlora_ds.apply(model, beamlora_ds.BeamLoRAConfig(r=4, alpha=8, dropout=0.0, total_steps=10, interval=5))
    with torch.no_grad():
        for module in beam.modules:
            module.lora_B.normal_(0, 0.1)
    out = str(tmp_path / "adapter")
    save_adapter(model, out)
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    assert "base_model: builtin-tiny" in card and 'beamlora_ds.load_builtin_model("builtin-tiny")' in card
    code = card.split("```python\n")[1].split("```")[0].replace("path/to/this/folder", out)
    scope = {}
    exec(code, scope)  # the card's own lines, as a user pastes them
    ids = torch.tensor([[5, 9, 14, 3, 22]])
    assert torch.allclose(scope["model"].eval()(ids).logits, model.eval()(ids).logits, atol=1e-5)
