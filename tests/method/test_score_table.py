"""The model-level score table (beamlora_ds/method/score_table.py, docs/fused_score_design.md) against its oracle:
the same model with standalone BeamLoRALinear layers, each owning its score and computing its own softmax
(docs/method.md section 1). Outputs and gradients must agree, with and without gradient checkpointing and
accumulation."""
import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from beamlora_ds import BeamLoRAConfig, BeamLoRALinear, apply, find_beamlora_modules, optimizer_param_groups
from helpers import TwoLayerNet, tiny_llama


def cfg(**kw):
    return BeamLoRAConfig(**{"r": 4, "alpha": 8.0, "dropout": 0.0, "total_steps": 40, "interval": 8, **kw})


def trained_looking(model):
    """apply() with non-trivial A, B and scores, so every gradient is non-zero."""
    beam = apply(model, cfg())
    torch.manual_seed(1)
    with torch.no_grad():
        for m in beam.modules:
            m.lora_B.normal_(std=0.1)
        model.beamlora_scores.lora_score.normal_(std=0.05)
    return beam


def standalone_twin(model):
    """A copy of the applied model whose layers own their scores again (the layer as it is made on its own)."""
    twin = copy.deepcopy(model)
    for name, m in find_beamlora_modules(twin).items():
        layer = BeamLoRALinear(m.base_layer, r=m.r, alpha=m.alpha, tau=m.tau)
        with torch.no_grad():
            for key in ("lora_A", "lora_B", "lora_score"):
                getattr(layer, key).copy_(getattr(m, key))
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, layer)
    del twin.beamlora_scores
    return twin


def grads(model):
    """Per module: grads of A, B and its score row (from the table, or its own parameter)."""
    out = {}
    for name, m in find_beamlora_modules(model).items():
        score = m.score_parameter.grad
        out[name] = (m.lora_A.grad, m.lora_B.grad, score if m.score_row is None else score[m.score_row])
    return out


def assert_same_grads(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert x is not None and y is not None and x.abs().sum() > 0, name
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def llama_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_outputs_and_gradients_equal_per_module_scores():
    model = tiny_llama(layers=2).train()
    trained_looking(model)
    twin = standalone_twin(model)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    loss, twin_loss = llama_loss(model, ids), llama_loss(twin, ids)
    torch.testing.assert_close(loss, twin_loss, rtol=0, atol=0)
    loss.backward()
    twin_loss.backward()
    assert_same_grads(grads(model), grads(twin))


def softmaxes_per_step(model, ids) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llama_loss(model, ids).backward()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::_softmax")


def test_one_softmax_per_forward_and_one_score_parameter():
    model = tiny_llama(layers=2).train()
    beam = trained_looking(model)
    twin = standalone_twin(model)
    ids = torch.randint(0, 64, (2, 8))
    assert softmaxes_per_step(model, ids) == softmaxes_per_step(twin, ids) - len(beam.modules) + 1
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("lora_score")]
    assert trainable == ["beamlora_scores.lora_score"] and len(beam.modules) == 14


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_each_gradient_once(reentrant):
    model = tiny_llama(layers=3).train()
    trained_looking(model)
    twin = standalone_twin(model)
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5 name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()  # otherwise a re-entrant segment gives its parameters no gradient
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    llama_loss(model, ids).backward()
    llama_loss(twin, ids).backward()
    assert_same_grads(grads(model), grads(twin))


def test_accumulation_optimizer_steps_and_eval_forwards_see_current_scores():
    """Two micro-batches per step (a new graph each forward), an eval forward under no_grad between steps, and the
    scores changed in place by the optimizer: the table must recompute its rows each time."""
    torch.manual_seed(0)
    model = TwoLayerNet()
    trained_looking(model)
    twin = standalone_twin(model)
    opts = [torch.optim.AdamW(optimizer_param_groups(m), lr=1e-2) for m in (model, twin)]
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            for half in (x[:3], x[3:]):
                m(half).pow(2).mean().backward()
        assert_same_grads(grads(model), grads(twin))
        for opt in opts:
            opt.step()
        with torch.no_grad():
            torch.testing.assert_close(model(x), twin(x), rtol=1e-6, atol=1e-7)


def test_lora_score_reads_and_writes_the_modules_row():
    model = TwoLayerNet()
    beam = apply(model, cfg())
    second = beam.modules[1]
    assert second.score_parameter is model.beamlora_scores.lora_score and second.score_row == 1
    with torch.no_grad():
        second.lora_score.copy_(torch.tensor([0.1, 0.0, -0.1, 0.2]))
    assert torch.equal(model.beamlora_scores.lora_score[1], torch.tensor([0.1, 0.0, -0.1, 0.2]))
    assert torch.equal(model.beamlora_scores.lora_score[0], torch.zeros(4))
    assert "lora_score" not in dict(second.named_parameters())
    alone = BeamLoRALinear(torch.nn.Linear(6, 5), r=2, alpha=4.0)
    assert alone.score_row is None and alone.score_parameter is alone.lora_score
    assert sorted(n for n, _ in alone.named_parameters()) == ["base_layer.bias", "base_layer.weight", "lora_A",
                                                              "lora_B", "lora_score"]


def test_a_state_dict_with_per_module_scores_is_not_converted():
    """One layout: a state dict holding `<module>.lora_score` per module (layers made on their own) does not load
    into a model with the table; checkpoints of that layout are refused by their state version before this."""
    model = TwoLayerNet()
    apply(model, cfg())
    old = standalone_twin(model)
    with pytest.raises(RuntimeError, match="beamlora_scores.lora_score"):
        model.load_state_dict(old.state_dict(), strict=True)


def test_one_parameter_group_without_weight_decay():
    model = TwoLayerNet()
    apply(model, cfg())
    (only,) = optimizer_param_groups(model, 0.0)
    assert len(only["params"]) == 5 and only["weight_decay"] == 0.0
    decayed, kept = optimizer_param_groups(model, 0.1)
    assert kept["params"] == [model.beamlora_scores.lora_score] and decayed["weight_decay"] == 0.1


def test_attribute_name_taken_is_refused():
    model = TwoLayerNet()
    model.beamlora_scores = torch.nn.Identity()
    with pytest.raises(ValueError, match="already has an attribute 'beamlora_scores'"):
        apply(model, cfg())


def test_a_new_forward_sees_scores_written_through_data():
    """DeepSpeed writes updated working copies through `.data`, which no version counter sees: a module's second
    request (a new forward) must still recompute the rows."""
    torch.manual_seed(0)
    model = TwoLayerNet()
    trained_looking(model)
    x = torch.randn(4, 12)
    model(x).sum().backward()
    new = torch.randn(2, 4) * 0.1
    model.beamlora_scores.lora_score.data.copy_(new)
    twin = standalone_twin(model)
    torch.testing.assert_close(model(x), twin(x), rtol=0, atol=0)
