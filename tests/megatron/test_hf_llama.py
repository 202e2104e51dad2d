"""beamlora_ds.backends.megatron.hf_llama: the row maps on hand-computed examples (in this process: plain torch),
and Megatron GPT models built and loaded from HF models giving the HF logits (in launched processes: megatron's
CPU shims patch torch, so megatron never runs in the pytest process)."""
import ast
import os
from types import SimpleNamespace

import pytest
import torch

from beamlora_ds.backends.megatron import hf_llama
from beamlora_ds.backends.megatron.hf_llama import (HF_NAMES, fuse_fc1_rows, fuse_qkv_rows, hf_module_names,
                                                    megatron_state_from_hf, split_fc1_rows, split_qkv_rows,
                                                    transformer_config_kwargs)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_llama_worker.py")
MODELS = {"tiny_llama", "tied_mha_llama", "qwen2_qkv_bias"}  # the worker's architectures
TOLERANCE = 1e-5
# 4 query heads in 2 groups, head_dim 1: Megatron's rows are q0 q1 k0 v0 | q2 q3 k1 v1
GQA = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2, head_dim=1, hidden_size=4)


# ---------------------------------------------------------------------------------------------- row maps
def test_split_qkv_rows_takes_each_groups_q_heads_then_its_k_and_v_head():
    rows = torch.arange(8.0).reshape(8, 1).expand(8, 3)  # a LoRA B of rank 3: trailing dims travel along
    q, k, v = split_qkv_rows(rows, GQA)
    assert q[:, 0].tolist() == [0, 1, 4, 5] and k[:, 0].tolist() == [2, 6] and v[:, 0].tolist() == [3, 7]
    assert q.shape == (4, 3) and k.shape == (2, 3)
    assert torch.equal(fuse_qkv_rows(q, k, v, GQA), rows)


def test_split_qkv_rows_with_wider_heads_and_one_group_per_head():
    mha = SimpleNamespace(num_attention_heads=2, num_key_value_heads=2, head_dim=2, hidden_size=4)
    q, k, v = split_qkv_rows(torch.arange(12), mha)  # q0 q0 k0 k0 v0 v0 | q1 q1 k1 k1 v1 v1
    assert q.tolist() == [0, 1, 6, 7] and k.tolist() == [2, 3, 8, 9] and v.tolist() == [4, 5, 10, 11]
    with pytest.raises(ValueError, match="linear_qkv has 12"):
        split_qkv_rows(torch.arange(10), mha)


def test_split_fc1_rows_joins_each_ranks_gate_half_and_up_half():
    gate, up = split_fc1_rows([torch.tensor([0, 1, 10, 11]), torch.tensor([2, 3, 12, 13])])
    assert gate.tolist() == [0, 1, 2, 3] and up.tolist() == [10, 11, 12, 13]
    assert [s.tolist() for s in fuse_fc1_rows(gate, up, 2)] == [[0, 1, 10, 11], [2, 3, 12, 13]]
    with pytest.raises(ValueError, match="intermediate_size"):
        fuse_fc1_rows(torch.arange(3), torch.arange(3), 2)


def test_hf_module_names_of_megatron_linear_layers():
    assert hf_module_names("decoder.layers.3.self_attention.linear_qkv") == [
        "model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.self_attn.v_proj"]
    assert hf_module_names("module.module.decoder.layers.0.mlp.linear_fc1") == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert hf_module_names("module.decoder.layers.1.mlp.linear_fc2", layer_offset=4) == ["model.layers.5.mlp.down_proj"]
    assert hf_module_names("decoder.layers.12.self_attention.linear_proj") == ["model.layers.12.self_attn.o_proj"]
    assert HF_NAMES["linear_fc1"] == ("mlp.gate_proj", "mlp.up_proj")
    for name in ("decoder.layers.1.mlp.linear_qkv", "embedding.word_embeddings", "output_layer",
                 "decoder.layers.1.self_attention.linear_qkv.weight"):
        with pytest.raises(ValueError, match="not one of Megatron's decoder linear layers"):
            hf_module_names(name)


# ---------------------------------------------------------------------------------------------- the state
def tiny():
    from beamlora_ds.loading.builtin import tiny_llama

    return tiny_llama(torch.float32)


def test_the_reverse_maps_undo_the_tensor_parallel_state():
    """Rank slices of linear_qkv / linear_fc1 joined in rank order, split back: HF's q/k/v and gate/up exactly."""
    model = tiny()
    hf, config = model.state_dict(), model.config
    ranks = [megatron_state_from_hf(hf, config, tp_size=2, tp_rank=r) for r in range(2)]
    for i in range(config.num_hidden_layers):
        qkv = torch.cat([s[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] for s in ranks])
        for got, p in zip(split_qkv_rows(qkv, config), "qkv"):
            assert torch.equal(got, hf[f"model.layers.{i}.self_attn.{p}_proj.weight"])
        gate, up = split_fc1_rows([s[f"decoder.layers.{i}.mlp.linear_fc1.weight"] for s in ranks])
        assert torch.equal(gate, hf[f"model.layers.{i}.mlp.gate_proj.weight"])
        assert torch.equal(up, hf[f"model.layers.{i}.mlp.up_proj.weight"])
        proj = torch.cat([s[f"decoder.layers.{i}.self_attention.linear_proj.weight"] for s in ranks], dim=1)
        assert torch.equal(proj, hf[f"model.layers.{i}.self_attn.o_proj.weight"])
    vocab = torch.cat([s["output_layer.weight"] for s in ranks])
    assert torch.equal(vocab, hf["lm_head.weight"])


def test_a_vocabulary_tensor_parallelism_cannot_split_is_refused():
    model = tiny()  # 80 tokens: 3 does not divide them
    with pytest.raises(ValueError, match="vocab_size: 80 does not divide into 3"):
        megatron_state_from_hf(model.state_dict(), model.config, tp_size=3, tp_rank=0)


def test_transformer_config_kwargs_of_the_tiny_llama():
    kwargs = transformer_config_kwargs(tiny().config, tensor_parallel=2, sequence_parallel=True, bf16=True)
    assert {k: kwargs[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                   "kv_channels", "ffn_hidden_size", "normalization", "add_qkv_bias",
                                   "tensor_model_parallel_size", "sequence_parallel", "params_dtype", "bf16")} == {
        "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 16,
        "ffn_hidden_size": 172, "normalization": "RMSNorm", "add_qkv_bias": False, "tensor_model_parallel_size": 2,
        "sequence_parallel": True, "params_dtype": torch.float32, "bf16": True}
    assert kwargs["activation_func"] is torch.nn.functional.silu and kwargs["gated_linear_unit"]


@pytest.mark.parametrize("change, field", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}), "rope_parameters"),
    (dict(model_type="gemma"), "model_type"),
    (dict(model_type="mistral", sliding_window=16), "sliding_window"),
])
def test_what_does_not_convert_exactly_is_refused_by_field(change, field):
    config = tiny().config
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=field):
        transformer_config_kwargs(config)


def test_the_converter_imports_megatron_inside_functions_only():
    """Importing it (and using the row maps) needs no megatron: no module-level megatron import."""
    with open(hf_llama.__file__) as f:
        tree = ast.parse(f.read())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in top if isinstance(n, ast.ImportFrom)]
    assert names and not [n for n in names if n.split(".")[0] == "megatron"]


# ---------------------------------------------------------------------------------------------- Megatron vs HF
def check_logits(result, nproc, sps):
    rows = result["results"]
    assert result["world"] == nproc and {(r["model"], r["sp"]) for r in rows} == {(m, s) for m in MODELS for s in sps}
    for r in rows:
        assert r["max_abs_diff"] <= TOLERANCE, r
        assert r["norms_marked"], r  # every norm weight says whether sequence parallelism all-reduces its gradient
    refused = result["refusals"]
    assert "model.layers.1.mlp.up_proj.weight" in refused["missing"]
    assert "tensor-parallel size" in refused["wrong_tp"]
    assert {"decoder.layers.1.input_layernorm.weight", "decoder.layers.1.pre_mlp_layernorm.weight",
            "decoder.final_layernorm.weight", "output_layer.weight"} <= set(refused["names"])


@pytest.mark.slow
def test_megatron_gives_the_hf_logits_in_one_process(launched):
    check_logits(launched(1)["hf"], 1, {False})  # the shared launches of conftest.py


@pytest.mark.slow
def test_megatron_gives_the_hf_logits_under_tensor_and_sequence_parallelism(launched):
    check_logits(launched(2)["hf"], 2, {False, True})
