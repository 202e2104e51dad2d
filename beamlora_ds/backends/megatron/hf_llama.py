"""An exact converter between Hugging Face Llama-family models (Llama, Mistral, Qwen2) and megatron-core GPT models.

Megatron fuses q/k/v into `linear_qkv` and gate/up into `linear_fc1`, in orders of its own:
- `linear_qkv` rows hold, per query group, that group's q heads, then its k head, then its v head; tensor parallelism
  splits the fused rows into contiguous equal runs (whole groups while tp <= groups), rank after rank;
- `linear_fc1` rows are [gate_k | up_k] on each tensor-parallel rank k (megatron/core/transformer/mlp.py chunks the
  rank's own output in two), so the global rows are [gate_0 | up_0 | gate_1 | up_1 | ...];
- `linear_proj`, `linear_fc2` split their input columns; embeddings and the output layer split the vocabulary rows.
The forward maps build Megatron's per-rank state from an HF state dict; the reverse maps (`split_qkv_rows`,
`split_fc1_rows`, `hf_module_names`) export adapters trained on the fused layers as per-projection peft adapters.
Megatron is imported inside functions only: the row maps are plain torch.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
QKV_BIAS_MODEL_TYPES = ("qwen2",)  # q/k/v carry biases, o_proj and the MLP none: Megatron's add_qkv_bias

# Megatron module (the last part of its name) -> the HF modules it fuses, in the order of its rows.
HF_NAMES: Dict[str, Tuple[str, ...]] = {
    "linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "linear_proj": ("self_attn.o_proj",),
    "linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "linear_fc2": ("mlp.down_proj",),
}
MEGATRON_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp",
                   "linear_fc2": "mlp"}
_MODULE_NAME = re.compile(r"^(?:module\.)*decoder\.layers\.(\d+)\.(self_attention|mlp)\.(linear_\w+)$")


# ---------------------------------------------------------------------------------------------- the architecture
def head_dim(hf_config) -> int:
    """head_dim where the config states it (Llama, Mistral), else hidden_size / heads (Qwen2)."""
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def query_groups(hf_config) -> int:
    """The number of key/value heads (GQA groups); all heads when the config leaves it out."""
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def rope_theta(hf_config) -> float:
    """rope_theta from transformers 5's rope_parameters or an older config's rope_theta; refuses any rope scaling,
    which the GPT model's plain RotaryEmbedding would compute differently."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" or (scaling and scaling.get("rope_type", scaling.get("type")) != "default"):
        raise ValueError(f"rope_parameters/rope_scaling: rope type {rope_type if rope_type != 'default' else scaling}"
                         " has no exact Megatron equivalent here; only plain RoPE (rope_type 'default') converts")
    if getattr(hf_config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError("partial_rotary_factor: only full rotary embeddings convert")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def check_convertible(hf_config) -> None:
    """Refuse, naming the field, what the Megatron GPT model would not compute exactly as HF does."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type: {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act: {hf_config.hidden_act!r}; only 'silu' (SwiGLU) converts")
    for field in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, field, False):
            raise ValueError(f"{field}: biases on o_proj or the MLP do not convert (only Qwen2-style q/k/v biases)")
    if any(kind != "full_attention" for kind in getattr(hf_config, "layer_types", None) or ()):
        raise ValueError("layer_types: sliding-window layers do not convert (full attention only)")
    window = getattr(hf_config, "sliding_window", None)
    if (window is not None and getattr(hf_config, "use_sliding_window", True)
            and window < hf_config.max_position_embeddings):
        raise ValueError(f"sliding_window: a window of {window} < max_position_embeddings does not convert")
    if getattr(hf_config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError("pretraining_tp: only 1 converts")
    rope_theta(hf_config)


def transformer_config_kwargs(hf_config, tensor_parallel: int = 1, sequence_parallel: bool = False,
                              pipeline_parallel: int = 1, **overrides) -> dict:
    """The TransformerConfig keyword arguments of the same architecture, fp32 on the CPU unless `overrides` say
    otherwise (e.g. params_dtype=torch.bfloat16, bf16=True, use_cpu_initialization=False)."""
    check_convertible(hf_config)
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads, num_query_groups=query_groups(hf_config),
        kv_channels=head_dim(hf_config), ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        add_qkv_bias=hf_config.model_type in QKV_BIAS_MODEL_TYPES,
        hidden_dropout=0.0, attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        params_dtype=torch.float32, pipeline_dtype=torch.float32, bf16=False, use_cpu_initialization=True,
        tensor_model_parallel_size=tensor_parallel, sequence_parallel=sequence_parallel,
        pipeline_model_parallel_size=pipeline_parallel)
    kwargs.update(overrides)
    return kwargs


class RMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm, built as Megatron builds its norms. megatron-core 0.16.1's local spec uses WrappedTorchNorm,
    which asserts that sequence parallelism is off; this one allows it and marks its weight `sequence_parallel`,
    so that Megatron's finalize_model_grads all-reduces its gradient over the tensor-parallel ranks."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = config.sequence_parallel


def layer_spec(hf_config, config=None):
    """The decoder's spec: megatron's local (no Transformer Engine) layer spec with RMSNorm, every norm (the final
    one included) our RMSNorm. Its layer count is `config`'s for this pipeline stage, else all the layers."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm))
    layers = hf_config.num_hidden_layers if config is None else get_num_layers_to_build(config)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=RMSNorm)


def gpt_model_kwargs(hf_config, config=None) -> dict:
    """GPTModel's keyword arguments besides `config` (see `layer_spec` for `config`)."""
    check_convertible(hf_config)
    return dict(transformer_layer_spec=layer_spec(hf_config, config), vocab_size=hf_config.vocab_size,
                max_sequence_length=hf_config.max_position_embeddings, position_embedding_type="rope",
                rotary_percent=1.0, rotary_base=rope_theta(hf_config),
                share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)))


def build_gpt(hf_config, tensor_parallel: int = 1, sequence_parallel: bool = False, pre_process: bool = True,
              post_process: bool = True, **overrides):
    """A GPTModel of the HF architecture (on the CPU by default; its weights random until `load_hf_into_gpt`).
    The caller has called parallel_state.initialize_model_parallel with the same tensor-parallel size. Megatron's
    RoPE takes positions 0..s-1 whatever `position_ids` say (0.16.1 reads them for learned position embeddings
    only): packed or left-padded batches are not the HF model's."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    if parallel_state.get_tensor_model_parallel_world_size() != tensor_parallel:
        raise ValueError(f"tensor_parallel={tensor_parallel}, but initialize_model_parallel set up "
                         f"{parallel_state.get_tensor_model_parallel_world_size()}")
    kwargs = transformer_config_kwargs(hf_config, tensor_parallel, sequence_parallel,
                                       parallel_state.get_pipeline_model_parallel_world_size(), **overrides)
    config = TransformerConfig(**kwargs)
    return GPTModel(config=config, pre_process=pre_process, post_process=post_process,
                    **gpt_model_kwargs(hf_config, config))


# ---------------------------------------------------------------------------------------------- row maps
def fuse_qkv_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hf_config) -> torch.Tensor:
    """HF q/k/v rows (weights or biases) -> linear_qkv's full rows: per group, its q heads, k head, v head."""
    groups, dim = query_groups(hf_config), head_dim(hf_config)
    per_group = hf_config.num_attention_heads // groups
    rest = q.shape[1:]
    fused = torch.cat([q.reshape(groups, per_group * dim, *rest), k.reshape(groups, dim, *rest),
                       v.reshape(groups, dim, *rest)], dim=1)
    return fused.reshape(groups * (per_group + 2) * dim, *rest)


def split_qkv_rows(rows: torch.Tensor, hf_config) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear_qkv's full rows (the tensor-parallel slices in rank order; any trailing dims, e.g. a LoRA B) -> the
    q_proj, k_proj and v_proj rows in HF order."""
    groups, dim = query_groups(hf_config), head_dim(hf_config)
    per_group = hf_config.num_attention_heads // groups
    if rows.shape[0] != groups * (per_group + 2) * dim:
        raise ValueError(f"split_qkv_rows: {rows.shape[0]} rows, linear_qkv has {groups * (per_group + 2) * dim}")
    rest = rows.shape[1:]
    q, k, v = rows.reshape(groups, (per_group + 2) * dim, *rest).split([per_group * dim, dim, dim], dim=1)
    return (q.reshape(groups * per_group * dim, *rest), k.reshape(groups * dim, *rest),
            v.reshape(groups * dim, *rest))


def fuse_fc1_rows(gate: torch.Tensor, up: torch.Tensor, tp_size: int) -> List[torch.Tensor]:
    """HF gate_proj and up_proj rows -> linear_fc1's rows on each tensor-parallel rank, [gate_k | up_k]."""
    return [torch.cat([g, u]) for g, u in zip(split_even(gate, tp_size, "intermediate_size"),
                                              split_even(up, tp_size, "intermediate_size"))]


def split_fc1_rows(rank_slices: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """linear_fc1's rows on each tensor-parallel rank (each [gate_k | up_k]) -> the gate_proj and up_proj rows."""
    halves = [s.chunk(2, dim=0) for s in rank_slices]
    if any(len(h) != 2 or h[0].shape != h[1].shape for h in halves):
        raise ValueError("split_fc1_rows: every rank's slice has an even number of rows, [gate_k | up_k]")
    return torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])


def split_even(tensor: torch.Tensor, parts: int, what: str, dim: int = 0) -> List[torch.Tensor]:
    """`tensor` in `parts` equal runs along `dim`; refuses, naming `what`, a size that does not divide."""
    if tensor.shape[dim] % parts:
        raise ValueError(f"{what}: {tensor.shape[dim]} does not divide into {parts} tensor-parallel parts")
    return list(tensor.chunk(parts, dim=dim))


def hf_module_names(megatron_module_name: str, layer_offset: int = 0) -> List[str]:
    """`[module.]decoder.layers.3.self_attention.linear_qkv` -> the HF modules it fuses, e.g.
    `model.layers.3.self_attn.q_proj`, ... (`layer_offset`: the pipeline stage's first layer, Megatron numbers
    each stage's layers from 0)."""
    match = _MODULE_NAME.match(megatron_module_name)
    if match is None or HF_NAMES.get(match.group(3)) is None or MEGATRON_PARENT[match.group(3)] != match.group(2):
        raise ValueError(f"hf_module_names: {megatron_module_name!r} is not one of Megatron's decoder linear "
                         f"layers ({sorted(HF_NAMES)})")
    layer = int(match.group(1)) + layer_offset
    return [f"model.layers.{layer}.{name}" for name in HF_NAMES[match.group(3)]]


# ---------------------------------------------------------------------------------------------- the state
def megatron_state_from_hf(hf_state_dict: Dict[str, torch.Tensor], hf_config, tp_size: int = 1,
                           tp_rank: int = 0) -> Dict[str, torch.Tensor]:
    """The GPTModel state of tensor-parallel rank `tp_rank` (all layers, Megatron's names, global layer numbers);
    `output_layer.weight` only when the embeddings are not tied."""
    check_convertible(hf_config)

    def get(name):
        if name not in hf_state_dict:
            raise KeyError(f"megatron_state_from_hf: the HF state has no {name}")
        return hf_state_dict[name].detach()

    def column(t, what):  # output rows split
        return split_even(t, tp_size, what)[tp_rank].clone()

    def row(t, what):  # input columns split
        return split_even(t, tp_size, what, dim=1)[tp_rank].clone()

    state = {"embedding.word_embeddings.weight": column(get("model.embed_tokens.weight"), "vocab_size"),
             "decoder.final_layernorm.weight": get("model.norm.weight").clone()}
    if not getattr(hf_config, "tie_word_embeddings", False):
        state["output_layer.weight"] = column(get("lm_head.weight"), "vocab_size")
    qkv_rows = "linear_qkv rows (query groups x heads per group + 2 heads)"
    for i in range(hf_config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = [get(f"{src}self_attn.{p}_proj.weight") for p in "qkv"]
        state[dst + "self_attention.linear_qkv.weight"] = column(fuse_qkv_rows(*qkv, hf_config), qkv_rows)
        if hf_config.model_type in QKV_BIAS_MODEL_TYPES:
            qkv = [get(f"{src}self_attn.{p}_proj.bias") for p in "qkv"]
            state[dst + "self_attention.linear_qkv.bias"] = column(fuse_qkv_rows(*qkv, hf_config), qkv_rows)
        state[dst + "self_attention.linear_proj.weight"] = row(get(src + "self_attn.o_proj.weight"), "heads")
        fc1 = fuse_fc1_rows(get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight"), tp_size)
        state[dst + "mlp.linear_fc1.weight"] = fc1[tp_rank].clone()
        state[dst + "mlp.linear_fc2.weight"] = row(get(src + "mlp.down_proj.weight"), "intermediate_size")
        state[dst + "input_layernorm.weight"] = get(src + "input_layernorm.weight").clone()
        state[dst + "pre_mlp_layernorm.weight"] = get(src + "post_attention_layernorm.weight").clone()
    return state


def expected_names(gpt_model, state: Dict[str, torch.Tensor]) -> Dict[str, str]:
    """{the model's name: the converted state's name}: each stage's local layer i is global layer_number - 1, and a
    last stage that holds its own copy of tied embeddings takes the word embeddings."""
    names = {}
    for name in state:
        if name.startswith("decoder.layers."):
            continue
        names[name] = name
    for local, layer in enumerate(gpt_model.decoder.layers):
        prefix = f"decoder.layers.{layer.layer_number - 1}."
        for name in state:
            if name.startswith(prefix):
                names[f"decoder.layers.{local}.{name[len(prefix):]}"] = name
    if "output_layer.weight" not in state:
        names["output_layer.weight"] = "embedding.word_embeddings.weight"
    return names


def load_hf_into_gpt(gpt_model, hf_model_or_state, hf_config, tp_size: int = 1, tp_rank: int = 0) -> List[str]:
    """Copy an HF model's (or state dict's) weights into a built GPTModel (or one wrapped in `.module`s), strictly:
    every parameter and buffer of the model is filled (`_extra_state` entries aside) and every converted tensor
    that belongs to the model's pipeline stage is used. Returns the names filled."""
    while hasattr(gpt_model, "module") and not hasattr(gpt_model, "decoder"):
        gpt_model = gpt_model.module
    hf_state = (hf_model_or_state.state_dict() if isinstance(hf_model_or_state, torch.nn.Module)
                else hf_model_or_state)
    state = megatron_state_from_hf(hf_state, hf_config, tp_size, tp_rank)
    names = expected_names(gpt_model, state)
    targets = {n: t for n, t in gpt_model.state_dict(keep_vars=True).items() if not n.endswith("_extra_state")}
    unknown = sorted(n for n in targets if n not in names)
    if unknown:
        raise ValueError(f"load_hf_into_gpt: the converter has nothing for the model's {unknown}")
    used = {names[n] for n in targets}
    stage_layers = {f"decoder.layers.{layer.layer_number - 1}." for layer in gpt_model.decoder.layers}
    absent_ok = (("embedding.",) if not gpt_model.pre_process else ()) + (
        ("output_layer.", "decoder.final_layernorm.") if not gpt_model.post_process else ())
    left = sorted(n for n in state if n not in used and not n.startswith(absent_ok) and (
        not n.startswith("decoder.layers.") or n.startswith(tuple(stage_layers))))
    if left:
        raise ValueError(f"load_hf_into_gpt: the model has no place for {left}")
    with torch.no_grad():
        for name, target in targets.items():
            source = state[names[name]]
            if source.shape != target.shape:
                raise ValueError(f"load_hf_into_gpt: {name} is {tuple(target.shape)} in the model but "
                                 f"{tuple(source.shape)} converted for tp_size={tp_size}, tp_rank={tp_rank}: was the "
                                 "model built with that tensor-parallel size?")
            target.copy_(source)
    return sorted(targets)


def gpt_from_hf(hf_model, sequence_parallel: bool = False, **overrides):
    """The Megatron GPT of this tensor-parallel rank holding `hf_model`'s weights: `build_gpt` + `load_hf_into_gpt`
    in the layout `initialize_model_parallel` set up (overrides: TransformerConfig fields, e.g. params_dtype)."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    gpt = build_gpt(hf_model.config, tensor_parallel=tp, sequence_parallel=sequence_parallel, **overrides)
    load_hf_into_gpt(gpt, hf_model, hf_model.config, tp, parallel_state.get_tensor_model_parallel_rank())
    return gpt
