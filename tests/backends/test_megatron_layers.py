"""The Megatron backend's choices that need no process group, in this process: which layers it recognises (by
Megatron's attributes, never importing megatron), its refusals before anything changes, and the seeded A."""
import types

import pytest
import torch
from torch import nn

from beamlora_ds.backends.megatron.layers import check_megatron_targets, is_megatron_model, parallel_kind, whole_model_name
from beamlora_ds.method.layer import layer_seed
from beamlora_ds.method.config import BeamLoRAConfig
from beamlora_ds.method.layer import COLUMN, ROW


class Group:
    def size(self):
        return 1

    def rank(self):
        return 0


class Column(nn.Module):
    """The attributes of megatron's ColumnParallelLinear that the backend reads."""

    def __init__(self, d_in, d_out, gather_output=False):
        super().__init__()
        self.input_size, self.output_size, self.output_size_per_partition = d_in, d_out, d_out
        self.tp_group, self.gather_output, self.sequence_parallel = Group(), gather_output, False
        self.weight = nn.Parameter(torch.zeros(d_out, d_in))


class Row(Column):
    def __init__(self, d_in, d_out, input_is_parallel=True):
        super().__init__(d_in, d_out)
        del self.output_size_per_partition
        self.input_size_per_partition, self.input_is_parallel = d_in, input_is_parallel


class TELayerNormColumnParallelLinear(Column):
    """Where megatron keeps its Transformer Engine layers."""


TELayerNormColumnParallelLinear.__module__ = "megatron.core.extensions.transformer_engine"


def gpt(qkv=None, proj=None, **config):
    model = nn.Module()
    model.config = types.SimpleNamespace(**config)
    model.attn = nn.Module()
    model.attn.linear_qkv = qkv if qkv is not None else Column(16, 48)
    model.attn.linear_proj = proj if proj is not None else Row(16, 16)
    model.norm = nn.LayerNorm(16)
    return model


def config(**kw):
    settings = dict(r=4, alpha=8, dropout=0.0, target_modules=["linear_qkv", "linear_proj"], total_steps=10,
                    interval=2)
    return BeamLoRAConfig(**{**settings, **kw})


def test_megatron_layers_are_recognised_by_their_attributes():
    assert parallel_kind(Column(4, 8)) == COLUMN and parallel_kind(Row(4, 8)) == ROW
    assert parallel_kind(nn.Linear(4, 8)) is None
    assert is_megatron_model(gpt()) and not is_megatron_model(nn.Sequential(nn.Linear(2, 2)))
    assert [(name, kind) for name, _, _, kind in check_megatron_targets(gpt(), config())] == [
        ("attn.linear_qkv", COLUMN), ("attn.linear_proj", ROW)]


@pytest.mark.parametrize("model, says", [
    (gpt(context_parallel_size=2), "Context parallelism is not supported"),
    (gpt(qkv=Column(16, 48, gather_output=True)), "gather_output=True"),
    (gpt(proj=Row(16, 16, input_is_parallel=False)), "input_is_parallel=False"),
    (gpt(qkv=TELayerNormColumnParallelLinear(16, 48)), "Transformer Engine's TELayerNormColumnParallelLinear"),
    (gpt(qkv=Column(16, 2)), "r=4 is larger than the smaller dimension of attn.linear_qkv (16->2)"),
])
def test_what_the_backend_cannot_adapt_is_refused_before_anything_changes(model, says):
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises((ValueError, TypeError), match=says.replace("(", r"\(").replace(")", r"\)")):
        check_megatron_targets(model, config())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before


def test_a_target_that_is_no_parallel_linear_and_a_name_that_matches_nothing_are_refused():
    with pytest.raises(TypeError, match="norm .LayerNorm. is not one of megatron-core's"):
        check_megatron_targets(gpt(), config(target_modules=["norm"]))
    with pytest.raises(ValueError, match=r"named: \['linear_proj', 'linear_qkv'\]"):
        check_megatron_targets(gpt(), config(target_modules=["q_proj"]))


def test_the_seed_of_a_layers_A_ignores_wrapper_prefixes_and_differs_between_layers():
    name = "decoder.layers.0.self_attention.linear_qkv"
    assert layer_seed(3, name) == layer_seed(3, "module.module." + name)
    names = [f"decoder.layers.{i}.{kind}" for i in range(126) for kind in
             ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")]
    assert len({layer_seed(3, n) for n in names}) == len(names)  # Llama-3.1-405B's 126 layers: no two alike
    assert layer_seed(3, name) != layer_seed(4, name)


def stage_of_a_pipeline(first_layer: int):
    """A stage holding two layers numbered from 0 in the stage, as Megatron builds them; each TransformerLayer knows
    its whole-model number (`layer_number`, from 1)."""
    model = nn.Module()
    model.config = types.SimpleNamespace(pipeline_model_parallel_size=2)
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList()
    for i in range(2):
        layer = nn.Module()
        layer.layer_number = first_layer + i + 1
        layer.linear_qkv = Column(16, 48)
        model.decoder.layers.append(layer)
    return model


def test_a_pipeline_stage_names_match_and_seed_its_layers_by_the_whole_models_layer_numbers():
    second = stage_of_a_pipeline(first_layer=2)
    assert whole_model_name(second, "decoder.layers.1.linear_qkv") == "decoder.layers.3.linear_qkv"
    assert whole_model_name(second, "decoder.layers.1") == "decoder.layers.3"
    targets = check_megatron_targets(second, config(target_modules=r"decoder\.layers\.3\..*"))
    assert [(local, whole) for local, whole, _, _ in targets] == [("decoder.layers.1.linear_qkv",
                                                                   "decoder.layers.3.linear_qkv")]
