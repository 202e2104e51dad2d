"""Reading a DeepSpeed checkpoint folder offline (from_checkpoint.py): which tag, the controller state, the
refusals. Real ZeRO 0/2/3 checkpoints: tests/distributed/test_export_zero.py."""
import json
import os

import pytest
import torch

from beamlora_ds.export import from_checkpoint
from beamlora_ds.method.controller import STATE_VERSION
from beamlora_ds.export.from_checkpoint import controller_state, export_checkpoint, resolve_tag


def test_checkpoint_keys_are_found_with_or_without_a_module_prefix():
    weights = {"module.model.q_proj.lora_A": torch.ones(1), "model.v_proj.lora_A": torch.zeros(1)}
    assert from_checkpoint._lookup(weights, "model.q_proj.lora_A") is weights["module.model.q_proj.lora_A"]
    assert from_checkpoint._lookup(weights, "module.model.v_proj.lora_A") is weights["model.v_proj.lora_A"]
    assert from_checkpoint._lookup(weights, "model.k_proj.lora_A") is None


def test_resolve_tag_prefers_the_given_tag_then_latest(tmp_path):
    (tmp_path / "global_step4").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no 'latest' file; pass --tag, one of \['global_step4'\]"):
        resolve_tag(str(tmp_path), None)
    (tmp_path / "latest").write_text("global_step4\n")
    assert resolve_tag(str(tmp_path), None) == "global_step4"
    assert resolve_tag(str(tmp_path), "global_step2") == "global_step2"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_tag(str(tmp_path / "nowhere"), None)


def test_controller_state_needs_the_file_save_checkpoint_writes(tmp_path):
    with pytest.raises(FileNotFoundError, match="not written by beamlora_ds.save_checkpoint"):
        controller_state(str(tmp_path))
    state = {"version": STATE_VERSION, "config": {"r": 4}, "module_names": ["q"]}
    torch.save({"beamlora": state, "rng": {}}, tmp_path / from_checkpoint.CONTROLLER_STATE_FILE)
    assert controller_state(str(tmp_path))["module_names"] == ["q"]
    torch.save({"beamlora": dict(state, version=1), "rng": {}}, tmp_path / from_checkpoint.CONTROLLER_STATE_FILE)
    with pytest.raises(ValueError, match="version 1; this beamlora_ds reads version 2"):
        controller_state(str(tmp_path))
    torch.save({"something": 1}, tmp_path / from_checkpoint.CONTROLLER_STATE_FILE)
    with pytest.raises(ValueError, match="does not hold a BeamController state"):
        controller_state(str(tmp_path))


def test_export_checkpoint_refuses_before_reading_anything(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_checkpoint(str(tmp_path / "no_checkpoint"), str(out))
    with pytest.raises(ValueError, match="--merge needs --base_model"):
        export_checkpoint(str(tmp_path / "no_checkpoint"), str(tmp_path / "fresh"), merge=True)
    assert os.listdir(out) == ["mine.txt"] and not os.path.exists(tmp_path / "fresh")


def test_the_base_model_comes_from_the_run_beside_the_checkpoints(tmp_path):
    """launch/train.py writes run_args.json beside checkpoints/: an export without --base_model names that model."""
    from beamlora_ds.export.from_checkpoint import base_model_of_run

    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    assert base_model_of_run(str(checkpoints)) is None  # no run_args.json
    (tmp_path / "run" / "run_args.json").write_text(json.dumps({"model_name_or_path": "org/model-7b"}))
    assert base_model_of_run(str(checkpoints)) == "org/model-7b"
    assert base_model_of_run(str(checkpoints) + "/") == "org/model-7b"
    (tmp_path / "run" / "run_args.json").write_text(json.dumps({"model_name_or_path": None}))  # the built-in run
    assert base_model_of_run(str(checkpoints)) is None
    (tmp_path / "run" / "run_args.json").write_text("{not json")
    assert base_model_of_run(str(checkpoints)) is None


def test_fan_in_fan_out_comes_from_the_base_models_architecture(tmp_path, caplog):
    """The checkpoint holds A and B only, shaped alike for both layer types: the base model's config tells whether
    the wrapped layers are GPT-2 style Conv1D (peft's fan_in_fan_out) or nn.Linear."""
    import transformers
    from beamlora_ds.export.from_checkpoint import fan_in_fan_out_of_base

    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0,
                            eos_token_id=0).save_pretrained(tmp_path / "gpt2")
    transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=64).save_pretrained(tmp_path / "llama")
    gpt2 = str(tmp_path / "gpt2")
    assert fan_in_fan_out_of_base(gpt2, ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj"]) is True
    assert fan_in_fan_out_of_base(gpt2, ["transformer.h.0.attn.c_attn", "lm_head"]) is True  # peft fixes lm_head
    assert fan_in_fan_out_of_base(str(tmp_path / "llama"), ["model.layers.0.self_attn.q_proj"]) is False
    assert fan_in_fan_out_of_base(None, ["transformer.h.0.attn.c_attn"]) is False  # unknown base: nn.Linear
    assert fan_in_fan_out_of_base(str(tmp_path / "nowhere"), ["transformer.h.0.attn.c_attn"]) is False
    assert fan_in_fan_out_of_base(gpt2, ["transformer.h.7.attn.c_attn"]) is False  # not this base's module
    unknown = [r.message for r in caplog.records if r.name == from_checkpoint.__name__]
    assert len(unknown) == 2 and all("fan_in_fan_out=false" in m for m in unknown), unknown
