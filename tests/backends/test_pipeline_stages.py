"""What the pipeline support does in one process, without a process group: apply() on a DeepSpeed PipelineModule
stage (checked before it changes, a score table per pipeline layer, A seeded by name), loading a layer-by-layer
checkpoint without the frozen base (tied layers too), and recognising a pipeline without tripping on other models.
A stand-in carries the attributes DeepSpeed's PipelineModule has (pinned in test_deepspeed_internals.py); the real
PipelineEngine runs in tests/distributed/test_pipeline_engine.py."""
import pytest
import torch
from torch import nn

from beamlora_ds import BeamLoRAConfig, apply
from beamlora_ds.backends.deepspeed.internals import pipeline_parallel_group
from beamlora_ds.checkpointing.load import adapter_only_loads
from beamlora_ds.method.layer import layer_seed


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.q_proj(self.norm(x))


class PipelineStage(nn.Module):
    """Stage 1 of a PipelineModule: layers 2 and 3 of the whole list (children named by their index), a tied
    embedding shared with another stage (in `tied_modules`, listed in `forward_funcs` itself)."""

    def __init__(self):
        super().__init__()
        self._topo, self.stage_id = object(), 1
        self.tied_modules = nn.ModuleDict({"embed": nn.Embedding(16, 8)})
        self.add_module("2", Block())
        self.add_module("3", Block())
        self.forward_funcs = [self.tied_modules["embed"], getattr(self, "2"), getattr(self, "3")]


def config(**kw):
    return BeamLoRAConfig(**{**dict(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"], interval=2,
                                    total_steps=8, seed=5), **kw})


def test_a_stage_gets_a_score_table_per_layer_and_A_seeded_by_its_whole_model_name():
    stage = PipelineStage()
    beam = apply(stage, config())
    assert beam.module_names == ["2.q_proj", "3.q_proj"]
    for index in ("2", "3"):
        layer = getattr(stage, index)
        assert layer.beamlora_scores.lora_score.shape == (1, 2)  # saved in this layer's own file by DeepSpeed
        generator = torch.Generator().manual_seed(layer_seed(5, f"{index}.q_proj"))
        expected = torch.empty(2, 8)
        nn.init.kaiming_uniform_(expected, a=5 ** 0.5, generator=generator)
        assert torch.equal(layer.q_proj.lora_A, expected)
    assert not hasattr(stage, "beamlora_scores")


@pytest.mark.parametrize("targets, says", [(["k_proj"], "pipeline stage 1: target_modules=.* matched no module.*every "
                                                       "stage takes part"),
                                           (["embed"], "tied module")])
def test_a_stage_that_cannot_be_adapted_is_refused_before_it_changes(targets, says):
    stage = PipelineStage()
    before = {n: p.requires_grad for n, p in stage.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=says):
        apply(stage, config(target_modules=targets))
    assert {n: p.requires_grad for n, p in stage.named_parameters()} == before


def test_layer_files_without_the_frozen_base_load_strictly_tied_layers_included():
    """DeepSpeed loads each entry of forward_funcs with load_state_dict(strict=True): the tied embedding is the
    shared module itself (no child of the stage), and its frozen weight is in no file."""
    stage = PipelineStage()
    apply(stage, config())
    layer = getattr(stage, "2")
    trainable = {k: v for k, v in layer.state_dict().items() if "lora_" in k or "beamlora_scores" in k}
    with adapter_only_loads(stage):
        stage.tied_modules["embed"].load_state_dict({}, strict=True)
        layer.load_state_dict(trainable, strict=True)
        with pytest.raises(RuntimeError, match="lora_A"):  # a missing trainable tensor still fails
            layer.load_state_dict({k: v for k, v in trainable.items() if "lora_A" not in k}, strict=True)
    with pytest.raises(RuntimeError, match="weight"):  # outside, a strict load wants the base
        stage.tied_modules["embed"].load_state_dict({}, strict=True)


def test_a_model_with_an_unrelated_grid_attribute_is_no_pipeline():
    model = nn.Linear(2, 2)
    model.grid = torch.zeros(3)  # a tensor's truth value would be ambiguous
    assert pipeline_parallel_group(model) is None and pipeline_parallel_group(PipelineStage()) is None
