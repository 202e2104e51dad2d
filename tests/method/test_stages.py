"""One reset over the whole model under pipeline parallelism (method/stages.py), in this process: the whole model's
order from every stage's names, the plans renumbered to a stage's own modules, and a controller on one stage that
plans with the other stage's scores (a stand-in for the pipeline gather; the real one runs in
tests/megatron/test_megatron_parallel.py)."""
import pytest
import torch
from torch import nn

from beamlora_ds import BeamLoRAConfig, apply
from beamlora_ds.backends import Backends
from beamlora_ds.method import algorithm
from beamlora_ds.method.algorithm import ModuleReset
from beamlora_ds.method.stages import Stages, WholeModel, layer_number, order_across_stages, whole_rows


def test_the_whole_model_is_ordered_by_layer_number_across_stages():
    # a virtual pipeline: stage 0 holds layers 0 and 2, stage 1 layers 1 and 3, and an output head after them
    stage0 = ["decoder.layers.0.linear_qkv", "decoder.layers.0.linear_fc1", "decoder.layers.2.linear_qkv"]
    stage1 = ["decoder.layers.1.linear_qkv", "decoder.layers.3.linear_qkv", "output_layer"]
    whole = order_across_stages([stage0, stage1], this_stage=1)
    assert whole.names == ["decoder.layers.0.linear_qkv", "decoder.layers.0.linear_fc1", "decoder.layers.1.linear_qkv",
                           "decoder.layers.2.linear_qkv", "decoder.layers.3.linear_qkv", "output_layer"]
    assert whole.local == [2, 4, 5]
    assert order_across_stages([stage0, stage1], this_stage=0).local == [0, 1, 3]
    assert layer_number("11.self_attn.q_proj") == 11  # a DeepSpeed PipelineModule's layer index


def test_stages_that_number_their_layers_from_zero_are_refused():
    with pytest.raises(ValueError, match="a stage numbers its layers from 0. Build each stage so its layers carry the "
                                         "whole model's numbers"):
        order_across_stages([["decoder.layers.0.linear_qkv"], ["decoder.layers.0.linear_qkv"]], 0)


def test_plans_and_rows_are_renumbered_to_this_stages_modules():
    whole = WholeModel(["a0", "b1", "c2", "d3"], local=[1, 3])
    plans = [ModuleReset(0, [1], [0]), ModuleReset(3, [2, 3], [0, 1])]
    assert whole.local_plans(plans) == [ModuleReset(1, [2, 3], [0, 1])]
    assert whole.local_rows({0: "x", 3: "y"}) == {1: "y"}
    rows = whole_rows(torch.ones(1, 2, 4), whole)
    assert rows[0, :, 0].tolist() == [0, 1, 0, 1]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.v(self.q(x))


class Stage(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block()])

    def forward(self, x):
        return self.layers[0](x)


class SecondStageElsewhere(Stages):
    """Stage 0 of two: the other stage holds `names` whose score logits are `logits` (what the gather brings)."""

    def __init__(self, names, logits):
        self.names, self.logits = names, logits

    def whole_model(self, names):
        return order_across_stages([list(names), self.names], 0)

    def gather(self, local, whole):
        rows = whole_rows(local, whole)
        rows[0, [i for i in range(len(whole.names)) if i not in whole.local]] = self.logits
        return rows


class OnTwoStages(Backends):
    def __init__(self, stages):
        self.stages = stages

    def access(self, modules, optimizer_or_engine):
        access = super().access(modules, optimizer_or_engine)
        access.stages = self.stages
        return access


def test_a_stage_prunes_by_the_whole_models_top_p_and_applies_only_its_own_part():
    """Stage 0's scores are flat; the other stage's are peaked. Over the whole model the peaked modules lose ranks
    and stage 0 loses few; a stage selecting among its own modules would prune another set."""
    torch.manual_seed(0)
    model = Stage()
    config = BeamLoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q", "v"], interval=2, p0=0.6,
                            total_steps=8, seed=1)
    beam = apply(model, config)
    remote_names = ["layers.1.q", "layers.1.v"]
    remote_logits = torch.tensor([[3.0, -2.0, -2.5, -3.0], [2.5, 0.0, -2.0, -3.0]])
    beam._platform = OnTwoStages(SecondStageElsewhere(remote_names, remote_logits))
    with torch.no_grad():
        model.beamlora_scores.lora_score.copy_(torch.tensor([[0.1, 0.0, 0.05, -0.1], [0.0, 0.02, 0.0, -0.02]]))
        for m in beam.modules:
            m.lora_B.normal_()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    local_logits = model.beamlora_scores.lora_score.detach().clone()
    before = {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in zip(beam.module_names, beam.modules)}
    for _ in range(2):
        model(torch.randn(2, 8)).sum().backward()
        optimizer.step()
        beam.step(optimizer)
    record = beam.history[-1]
    assert beam.whole_model.names == ["layers.0.q", "layers.0.v", "layers.1.q", "layers.1.v"]
    whole_logits = torch.cat([local_logits, remote_logits])
    importance = algorithm.score_importance(whole_logits, config.tau)
    keep = algorithm.keep_fraction(2, config.p0, config.resolved_t_end)
    expected = algorithm.plan_reset(importance, keep, config.seed, 2)
    names = beam.whole_model.names
    assert sorted(record["pruned"]) == sorted((names[p.module_index], j) for p in expected for j in p.targets)
    assert any(name in remote_names for name, _ in record["pruned"])  # the other stage's ranks count
    stage_only = algorithm.select_pruned(algorithm.score_importance(local_logits, config.tau), keep)
    assert sorted(record["pruned"]) != sorted((names[m], j) for m, j in stage_only.nonzero().tolist())
    for plan in expected:  # this stage refilled exactly its own modules' targets from their sources
        if plan.module_index >= 2:
            continue
        name = names[plan.module_index]
        module = beam.modules[plan.module_index]
        a, b = before[name]
        for j, source in zip(plan.targets, plan.sources):
            assert torch.equal(module.lora_A[j], a[source]) and torch.equal(module.lora_B[:, j], b[:, source])


def test_modules_in_two_numbered_containers_are_refused_under_a_pipeline():
    """Megatron's multi-token prediction layers (mtp.layers.K) come after the decoder in one process; by their
    numbers alone they would sort among the decoder's layers."""
    with pytest.raises(ValueError, match=r"more than one numbered container \(\['decoder.layers', 'mtp.layers'\]\)"):
        order_across_stages([["decoder.layers.0.linear_qkv"], ["decoder.layers.1.linear_qkv",
                                                               "mtp.layers.0.transformer_layer.linear_qkv"]], 0)
