"""The adapter files: folding the score into A, peft's names and config, our unfolded state, all-or-nothing writes
(docs/method.md section 6). Stock peft is the oracle."""
import json
import os

import pytest
import torch

from beamlora_ds import BeamLoRAConfig, apply, find_beamlora_modules
from beamlora_ds.export import adapter_format
from beamlora_ds.export.adapter_format import (AdapterState, fold, load_state, peft_tensors, target_modules_from_config, write_adapter)
from beamlora_ds.export.live import save_adapter
from adapter_helpers import load_in_peft, logits
from helpers import tiny_llama

import peft
import safetensors.torch as safetensors_torch



def test_folding_is_diag_w_times_A():
    A, B, score = torch.randn(3, 5), torch.randn(4, 3), torch.tensor([0.1, -0.05, 0.0])
    w = 3 * torch.softmax(score / 0.05, dim=0)
    folded_A, folded_B = fold(A, B, score, 0.05)
    assert torch.allclose(folded_A, torch.diag(w) @ A) and torch.equal(folded_B, B)
    x = torch.randn(7, 5)
    assert torch.allclose(x @ folded_A.T @ folded_B.T, ((x @ A.T) * w) @ B.T, atol=1e-6)


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
    assert peft_tensors(state).keys() == safetensors_torch.load_file(f"{out}/adapter_model.safetensors").keys()
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == "my/base"


def test_a_crash_while_writing_leaves_the_old_adapter_and_no_partial_one(beam_model, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    save_adapter(beam_model, str(out))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def crash(obj, path):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_format, "_write_json", crash)  # after adapter_model.safetensors is written
    with torch.no_grad():
        find_beamlora_modules(beam_model)["model.layers.0.self_attn.q_proj"].lora_B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(beam_model, str(out), overwrite=True)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    with pytest.raises(OSError, match="disk full"):
        save_adapter(beam_model, str(tmp_path / "fresh"))
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


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


def test_target_modules_from_config_keeps_a_regex_or_dotted_names_and_shortens_leaf_names():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.up_proj"]
    assert target_modules_from_config(["q_proj", "up_proj"], names) == ["q_proj", "up_proj"]
    assert target_modules_from_config(r".*\.q_proj", names) == r".*\.q_proj"
    assert target_modules_from_config(["model.layers.0.mlp.up_proj"], names) == ["model.layers.0.mlp.up_proj"]


def test_write_adapter_round_trips_through_load_state(tmp_path):
    """The offline path (no model at hand): write_adapter alone, then read it back exactly."""
    g = torch.Generator().manual_seed(0)
    state = AdapterState(r=2, alpha=4.0, tau=0.1, lora_A={"q": torch.randn(2, 3, generator=g)},
                         lora_B={"q": torch.randn(5, 2, generator=g)}, lora_score={"q": torch.randn(2, generator=g)})
    write_adapter(state, str(tmp_path / "a"), ["q"])
    back = load_state(str(tmp_path / "a"))
    assert (back.r, back.alpha, back.tau, back.dropout, back.module_names) == (2, 4.0, 0.1, 0.0, ["q"])
    for key in ("lora_A", "lora_B", "lora_score"):
        assert torch.equal(getattr(back, key)["q"], getattr(state, key)["q"])


def test_load_state_refuses_a_foreign_state_file(tmp_path):
    (tmp_path / "beamlora_state.json").write_text(json.dumps({"format": "something else", "version": 1}))
    with pytest.raises(ValueError, match="is not a BeamLoRA state file"):
        load_state(str(tmp_path))


def test_fan_in_fan_out_goes_into_both_configs_and_another_layout_is_refused(tmp_path):
    """peft's fan_in_fan_out (GPT-2 style Conv1D bases) is written to adapter_config.json and beamlora_state.json and
    read back; a state file without it (a development version before Conv1D support wrote it) or of another
    version is refused, naming the peft files that still load."""
    g = torch.Generator().manual_seed(0)
    state = AdapterState(r=2, alpha=4.0, tau=0.1, fan_in_fan_out=True,
                         lora_A={"c_attn": torch.randn(2, 3, generator=g)},
                         lora_B={"c_attn": torch.randn(5, 2, generator=g)}, lora_score={"c_attn": torch.zeros(2)})
    out = tmp_path / "a"
    write_adapter(state, str(out), ["c_attn"])
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    meta = json.loads((out / "beamlora_state.json").read_text())
    assert meta["fan_in_fan_out"] is True and load_state(str(out)).fan_in_fan_out is True
    for other in ({k: v for k, v in meta.items() if k != "fan_in_fan_out"}, dict(meta, version=2)):
        (out / "beamlora_state.json").write_text(json.dumps(other))
        with pytest.raises(ValueError, match="is not the layout this beamlora_ds reads.*adapter_model.safetensors"):
            load_state(str(out))


def test_renaming_a_pipelines_modules_keeps_tensors_and_leaf_targets():
    """save_adapter(..., rename=) / export_checkpoint(..., rename=): a PipelineModule's layer-list names become the
    HF model's; the leaf target names stay when every leaf is kept, else the full new names; a clash is refused."""
    import pytest
    import torch

    from beamlora_ds.export.adapter_format import AdapterState
    from beamlora_ds.export.every_stage import every_stage, renamed

    state = AdapterState(r=2, alpha=4, tau=0.05)
    for i, name in enumerate(["1.layer.self_attn.q_proj", "2.layer.self_attn.q_proj"]):
        state.lora_A[name], state.lora_B[name], state.lora_score[name] = (torch.full((2, 3), float(i)),
                                                                          torch.zeros(3, 2), torch.zeros(2))
    hf = lambda n: f"model.layers.{int(n.split('.')[0]) - 1}.{n.partition('.layer.')[2]}"  # noqa: E731
    out, targets = renamed(state, ["q_proj"], hf)
    assert out.module_names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert torch.equal(out.lora_A["model.layers.1.self_attn.q_proj"], state.lora_A["2.layer.self_attn.q_proj"])
    assert targets == ["q_proj"]
    _, targets = renamed(state, ["q_proj"], lambda n: n.replace("q_proj", "query"))
    assert targets == ["1.layer.self_attn.query", "2.layer.self_attn.query"]
    with pytest.raises(ValueError, match="same name"):
        renamed(state, ["q_proj"], lambda n: "x")
    assert every_stage(state, None) is state and renamed(state, ["q_proj"], None) == (state, ["q_proj"])
