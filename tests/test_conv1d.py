"""GPT-2 style transformers Conv1D bases (weight stored in x out): wrapping, stock peft (fan_in_fan_out=True) as the
oracle for the forward pass, the exported adapter and the merge, a reset, the refusals, and the table of target
names per architecture checked against transformers' own modules (docs/architectures.md)."""
import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

from beamlora_ds import BeamLoRAConfig, BeamLoRALinear, apply, find_beamlora_modules, optimizer_param_groups
from beamlora_ds.export.live import save_adapter
from beamlora_ds.export.merge import merge_adapter

import peft
import transformers
from transformers.pytorch_utils import Conv1D  # noqa: E402

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def tiny_gpt2(seed=0, tied=True):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                     tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config).eval()


def cfg(targets=GPT2_TARGETS, **kw):
    return BeamLoRAConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": targets, "total_steps": 40,
                             "interval": 8, **kw})


def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def logits(model, token_ids):
    with torch.no_grad():
        return model(token_ids).logits


def trained_like(model, targets=GPT2_TARGETS, seed=1):
    """BeamLoRA on `model` (put in eval mode) with random nonzero B and scores (score = 0 would make folding a
    no-op); returns its controller."""
    beam = apply(model, cfg(targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in beam.modules:
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)
            m.lora_score.copy_(torch.randn(m.lora_score.shape, generator=g) * 0.05)
    model.eval()
    return beam


def train_steps(model, opt, steps, beam=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, 64, (4, 12), generator=g)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if beam is not None:
            beam.step(opt)
    return loss.item()


# ------------------------------------------------------------------------------------------------- wrapping
def test_conv1d_layers_are_wrapped_with_linear_shaped_adapters():
    model = tiny_gpt2()
    beam = apply(model, cfg())
    assert len(beam.modules) == 2 * 4  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, BeamLoRALinear) and type(c_attn.base_layer) is Conv1D and c_attn.fan_in_fan_out
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    assert c_attn.lora_A.shape == (4, 32) and c_attn.lora_B.shape == (96, 4)
    c_fc = model.transformer.h[1].mlp.c_fc
    assert c_fc.lora_A.shape == (4, 32) and c_fc.lora_B.shape == (128, 4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 8 + 1 and all(n.rsplit(".", 1)[1].startswith("lora_") for n in trainable)  # + score table


def test_zero_score_equals_stock_peft_fan_in_fan_out_lora():
    model = tiny_gpt2()
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=GPT2_TARGETS, fan_in_fan_out=True))
    beam = apply(model, cfg())
    peft_params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, m in zip(beam.module_names, beam.modules):
            m.lora_B.normal_()  # B = 0 would hide any error in A, B or the transposition
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(m.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(m.lora_B)
    token_ids = ids()
    ours, theirs = model(token_ids).logits, twin(token_ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    assert (ours - tiny_gpt2()(token_ids).logits).abs().max() > 1e-2  # the adapter really contributes
    ours.square().sum().backward()
    theirs.square().sum().backward()
    lora = twin.base_model.model.transformer.h[0].attn.c_attn
    ours_A = model.transformer.h[0].attn.c_attn.lora_A.grad
    assert torch.allclose(ours_A, lora.lora_A["default"].weight.grad, atol=1e-4)


def test_default_targets_on_gpt2_name_the_gpt2_layers_and_change_nothing():
    model = tiny_gpt2()
    with pytest.raises(ValueError) as e:
        apply(model, BeamLoRAConfig(r=4, alpha=8.0, total_steps=40, interval=8))  # the Llama names
    message = str(e.value)
    assert "named like: ['c_attn', 'c_proj', 'c_fc', 'lm_head']" in message
    assert "For gpt2 models the recommended target names are c_attn,c_proj,c_fc." in message
    assert not find_beamlora_modules(model) and all(p.requires_grad for p in model.parameters())


def test_a_non_linear_match_names_the_supported_types():
    with pytest.raises(TypeError, match=r"wte \(Embedding\).*") as e:
        apply(tiny_gpt2(), cfg(targets=["wte"]))
    assert "nn.Linear, transformers Conv1D" in str(e.value) and "Linear4bit" in str(e.value)


def test_rank_above_a_conv1d_layer_is_refused():
    with pytest.raises(ValueError, match=r"r=40 is larger .*c_attn \(32->96\)"):
        apply(tiny_gpt2(), cfg(r=40, alpha=80.0))


# ---------------------------------------------------------------------------------- export, merge, reset
def test_save_adapter_after_training_loads_in_stock_peft(tmp_path):
    model = tiny_gpt2()
    beam = apply(model, cfg())
    opt = torch.optim.AdamW(optimizer_param_groups(model), lr=1e-2)
    train_steps(model.train(), opt, 3)
    with torch.no_grad():
        for m in beam.modules:
            m.lora_score.copy_(torch.randn(4) * 0.05)
    expected = logits(model.eval(), ids())
    out = str(tmp_path / "adapter")
    save_adapter(model, out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["fan_in_fan_out"] is True and config["target_modules"] == sorted(GPT2_TARGETS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), out).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # the file already says the right thing
    got = logits(loaded, ids())
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert (expected - logits(tiny_gpt2(), ids())).abs().max() > 1e-2


def test_merge_adapter_puts_conv1d_back_with_the_same_logits():
    model = tiny_gpt2()
    trained_like(model)
    expected = logits(model, ids())
    merge_adapter(model)
    assert not find_beamlora_modules(model)
    assert type(model.transformer.h[0].attn.c_attn) is Conv1D and type(model.transformer.h[1].mlp.c_proj) is Conv1D
    got = logits(model, ids())
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_conv1d_and_linear_targets_together_export_and_merge(tmp_path):
    """GPT-2's Conv1D c_attn with its nn.Linear lm_head (untied, or merging would also change the embedding): one
    adapter_config.json says fan_in_fan_out=true, and peft's loader sets it per layer from the layer's type."""
    model = tiny_gpt2(tied=False)
    trained_like(model, targets=["c_attn", "lm_head"])
    expected = logits(model, ids())
    out = str(tmp_path / "adapter")
    save_adapter(model, out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        assert json.load(f)["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_gpt2(tied=False), out).eval()
    assert not loaded.base_model.model.lm_head.fan_in_fan_out
    assert loaded.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    assert torch.allclose(logits(loaded, ids()), expected, atol=1e-5)
    merge_adapter(model)
    assert type(model.lm_head) is nn.Linear and type(model.transformer.h[0].attn.c_attn) is Conv1D
    assert torch.allclose(logits(model, ids()), expected, atol=1e-5)


def test_a_reset_on_gpt2_refills_pruned_slots_from_the_snapshot():
    model = tiny_gpt2()
    beam = apply(model, cfg(p0=0.5, seed=0))
    opt = torch.optim.AdamW(optimizer_param_groups(model), lr=2e-2)
    model.train()
    train_steps(model, opt, 4, beam)  # the snapshot is taken at step 4 = interval / 2
    snap = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in zip(beam.module_names, beam.modules)}
    train_steps(model, opt, 3, beam, seed=1)
    assert not beam.history
    train_steps(model, opt, 1, beam, seed=2)  # step 8: the reset
    assert len(beam.history) == 1 and beam.history[0]["pruned"]
    modules = dict(zip(beam.module_names, beam.modules))
    for name, target, source in beam.history[0]["sources"]:
        assert torch.equal(modules[name].lora_A[target], snap[name][0][source])
        assert torch.equal(modules[name].lora_B[:, target], snap[name][1][:, source])
    loss = train_steps(model, opt, 2, beam, seed=3)
    assert torch.isfinite(torch.tensor(loss))


# ------------------------------------------------------------------------------------ targets per architecture
def test_recommended_targets_are_every_projection_of_each_architecture():
    """The table in targets.py against the installed transformers: built on the meta device from each
    architecture's default config, the wrappable layers (besides lm_head) are exactly the recommended names."""
    from beamlora_ds.method.layer import is_wrappable
    from beamlora_ds.method.targets import RECOMMENDED_TARGETS

    for model_type, names in RECOMMENDED_TARGETS.items():
        config = transformers.AutoConfig.for_model(model_type)
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, key):
                setattr(config, key, 1)
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            skeleton = transformers.AutoModelForCausalLM.from_config(config)
        found = {n.rpartition(".")[2] for n, m in skeleton.named_modules() if n and is_wrappable(m)}
        assert found - {"lm_head"} == set(names), model_type
        assert len(set(names)) == len(names), model_type



def test_beamlora_export_of_a_gpt2_checkpoint_says_fan_in_fan_out(tmp_path):
    """export_checkpoint on a GPT-2 run: the adapter_config.json it writes says fan_in_fan_out=true, learnt from the
    base named in the run's run_args.json, and stock peft loads it with the model's logits. The checkpoint folder
    is written here in DeepSpeed's ZeRO-0 layout (model states + our controller state); real DeepSpeed checkpoints
    are exported in tests/distributed/test_export_zero.py."""
    from beamlora_ds.export.from_checkpoint import CONTROLLER_STATE_FILE, export_checkpoint

    run = tmp_path / "run"
    tiny_gpt2().save_pretrained(run / "base")
    (run / "run_args.json").write_text(json.dumps({"model_name_or_path": str(run / "base")}))
    model = tiny_gpt2()
    beam = trained_like(model)
    tag = run / "checkpoints" / "global_step8"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("global_step8")
    torch.save({"module": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    torch.save({"beamlora": beam.state_dict(), "rng": {}}, tag / CONTROLLER_STATE_FILE)

    out = str(tmp_path / "adapter")
    export_checkpoint(str(run / "checkpoints"), out)
    with open(os.path.join(out, "adapter_config.json")) as f:
        config = json.load(f)
    assert config["fan_in_fan_out"] is True and config["base_model_name_or_path"] == str(run / "base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), out).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    assert torch.allclose(logits(loaded, ids()), logits(model, ids()), atol=1e-5)


def test_docs_list_the_recommended_targets_of_the_code():
    """docs/architectures.md shows the table of targets.py, row for row."""
    import re

    from beamlora_ds.method.targets import RECOMMENDED_TARGETS

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "architectures.md")
    with open(path) as f:
        section = f.read().split("## Target names per architecture")[1].split("\n## ")[0]
    documented = {}
    for line in section.splitlines():
        cells = line.split("|")
        if len(cells) == 4 and "`" in cells[1] and "`model_type`" not in cells[1]:
            names = tuple(re.findall(r"`([^`]+)`", cells[2]))
            documented.update({model_type: names for model_type in re.findall(r"`([^`]+)`", cells[1])})
    assert documented == RECOMMENDED_TARGETS
