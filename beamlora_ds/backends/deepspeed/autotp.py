"""BeamLoRA on DeepSpeed AutoTP: the DeepSpeed side of tensor parallelism (docs/tensor_parallel.md).

    beam = beamlora_ds.apply(model, config)
    beamlora_ds.prepare_tensor_parallel(model, ds_config)     # before deepspeed.initialize, on every process
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)

AutoTP splits a Hugging Face model inside `deepspeed.initialize` when the config has
`"tensor_parallel": {"autotp_size": N}`, but it does not know adapters: it would replace a wrapper that has a
weight, or split lora_A along r. So before initialize we split the layers BeamLoRA wraps ourselves, with
DeepSpeed's own layers (`LinearLayer` column-parallel, `LinearAllreduce` row-parallel), the kind each gets from
the same plan AutoTP reads and the same partition sizes; mark them replaced so AutoTP leaves them alone; and
AutoTP splits everything else inside initialize. Which adapter factor is split, and the collectives, are in
backends/tensor_parallel.py. Facts about DeepSpeed this relies on: docs/platform.md#tensor-parallelism-autotp.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ...method.inject import find_beamlora_modules
from ...method.layer import COLUMN, ROW, BeamLoRALinear, is_4bit_linear
from ...method.score_table import score_parameters
from ..tensor_parallel import TensorParallelSplit, comm_device, gather_along
from .config import autotp_size
from .internals import hf_tp_plan, init_tensor_parallel_group, partition_sizes

# Projections that hold several logical matrices in one weight; their B slice would have to follow each part.
FUSED_PROJECTIONS = ("qkv_proj", "gate_up_proj", "c_attn", "query_key_value", "Wqkv", "w_pack", "W_pack")


def tensor_parallel_problem(tp: int, world_size: int, model_config=None, four_bit: bool = False,
                            dropout: float = 0.0, targets=()) -> Optional[str]:
    """Why this run cannot train with tensor parallelism `tp`, or None. Cheap: checked before any model loads."""
    if tp <= 1:
        return None
    if world_size % tp:
        return (f"tensor_parallel.autotp_size {tp} does not divide the number of processes {world_size}: each "
                f"data-parallel replica needs {tp} whole processes. Launch a multiple of {tp} processes.")
    if four_bit:
        return ("4-bit bases cannot be split for tensor parallelism (a packed NF4 weight cannot be sliced by "
                "rows or columns). Use a bf16 base with tensor parallelism, or 4-bit without it.")
    if dropout:
        return (f"LoRA dropout {dropout} is not supported under tensor parallelism: the processes of a group would "
                "draw different masks for the same replicated input. Set the dropout to 0.")
    fused = [t for t in targets if any(t == f or t.endswith("." + f) for f in FUSED_PROJECTIONS)]
    if fused:
        return (f"Fused projections {fused} are not supported under tensor parallelism (their adapter would have "
                "to be split part by part). Target the separate projections, or train without tensor parallelism.")
    if model_config is not None:
        heads = getattr(model_config, "num_attention_heads", None)
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        if kv_heads is not None and kv_heads < tp:
            return (f"autotp_size {tp} exceeds the model's {kv_heads} key-value heads: some processes would hold "
                    "empty attention slices (DeepSpeed's ZeRO-3 fails on them, and their adapters would be empty). "
                    f"Use autotp_size <= {kv_heads}.")
        if heads is not None and heads < tp:
            return f"autotp_size {tp} exceeds the model's {heads} attention heads. Use autotp_size <= {heads}."
    return None


def _partition_plan(model: nn.Module, ds_config: dict, tp: int):
    """DeepSpeed's own answer to "which layer is split how": the config's partition_config / preset, else the
    model's Hugging Face tp_plan, as deepspeed.initialize resolves them."""
    from deepspeed.module_inject.autotp_config import AutoTPConfig
    from deepspeed.module_inject.tp_plan_converter import TPPlanConverter
    from deepspeed.runtime.tensor_parallel.config import get_tensor_parallel_config

    tp_config = get_tensor_parallel_config(ds_config)
    plan = tp_config.get_partition_config_object()
    if plan is None:
        hf_plan = hf_tp_plan(model)
        if hf_plan:
            plan = AutoTPConfig(tp_size=tp, layer_specs=TPPlanConverter.convert(hf_plan))
    if plan is None:
        raise ValueError(f"{type(model).__name__} has no tensor-parallel plan (no Hugging Face base_model_tp_plan "
                         "and no tensor_parallel.partition_config or preset_model in the DeepSpeed config), so "
                         "BeamLoRA cannot tell which of its layers are column- or row-parallel. Add a "
                         "partition_config to the config's tensor_parallel section.")
    return tp_config, plan


def prepare_tensor_parallel(model: nn.Module, ds_config: dict) -> Dict[str, TensorParallelSplit]:
    """Split every BeamLoRA layer of `model` for the config's autotp_size (call it on every process, after
    apply() and before deepspeed.initialize; nothing to do without tensor parallelism). Returns each layer's
    split by name."""
    tp = autotp_size(ds_config)
    if tp <= 1:
        return {}
    from deepspeed.module_inject.autotp_config import PartitionType
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, set_autotp_mode
    from deepspeed.module_inject.tp_shard import AutoTPMeta
    from deepspeed.utils import groups

    modules = find_beamlora_modules(model)
    if not modules:
        raise ValueError("prepare_tensor_parallel() found no BeamLoRA layers: call beamlora_ds.apply() first.")
    init_tensor_parallel_group(tp)  # deepspeed.initialize reuses this group
    set_autotp_mode(training=True)
    group = groups.get_tensor_model_parallel_group()
    _same_adapters_on_the_group(model, modules, group, groups.get_tensor_model_parallel_src_rank())
    tp_config, plan = _partition_plan(model, ds_config, tp)
    meta = AutoTPMeta.from_model_config(getattr(model, "config", None), tp_config.tensor_parallel.tp_grain_size)
    model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "").lower()
    splits = {}
    for name, layer in modules.items():
        if is_4bit_linear(layer.base_layer):
            raise ValueError(f"{name} has a 4-bit base, which cannot be split for tensor parallelism.")
        spec = plan.find_matching_spec(name + ".weight", model_type)
        kind = {PartitionType.COLUMN: COLUMN, PartitionType.ROW: ROW}.get(getattr(spec, "partition_type", None))
        if kind is None:
            continue  # a layer the plan leaves whole stays replicated: the same on every process, as without TP
        if getattr(spec, "gather_output", False):
            raise ValueError(f"{name} is split with its output gathered (an output head); BeamLoRA supports "
                             "adapters on column- and row-parallel projections. Leave it out of target_modules.")
        base = (LinearLayer if kind == COLUMN else LinearAllreduce)(layer.base_layer, group, name=name,
                                                                      tp_meta=meta)
        base.replaced = True  # AutoTP skips what is already replaced
        split = TensorParallelSplit(kind, group, partition_sizes(base), base.tp_index)
        if min(split.sizes) == 0:
            raise ValueError(f"{name} would be split {split.sizes}: a process would hold an empty slice. Lower "
                             "autotp_size.")
        layer.split_for_tensor_parallel(split, base)
        mark_split_factor(getattr(layer, split.split_factor))
        layer.replaced = True
        splits[name] = split
    return splits


def mark_split_factor(param: nn.Parameter) -> None:
    """DeepSpeed's mark for a tensor-parallel slice: its gradient norm is summed over the group when gradients
    are clipped (an unmarked slice counts only on the group's first process, and clipping comes out wrong)."""
    from deepspeed.module_inject.layers import DS_TENSOR_MODEL_PARALLEL

    setattr(param, DS_TENSOR_MODEL_PARALLEL, True)


@torch.no_grad()
def _same_adapters_on_the_group(model, modules: Dict[str, BeamLoRALinear], group, src: int) -> None:
    """Replicated adapter tensors must start equal on every process of a group (DeepSpeed broadcasts only over
    data parallelism): send the group's first process's A, B and scores to the others before splitting."""
    import torch.distributed as dist

    tensors = [t for layer in modules.values() for t in (layer.lora_A, layer.lora_B)]
    tensors += score_parameters(list(modules.values()))
    device = comm_device(group)
    for t in tensors:
        buffer = t.data if t.device == device else t.data.to(device)
        dist.broadcast(buffer, src=src, group=group)
        if buffer is not t.data:
            t.data.copy_(buffer)


class GatherVocabShards:
    """A transformers logits processor for generation under a vocabulary-parallel output head (what AutoTP makes
    of a tied lm_head: each process computes the logits of its slice of the vocabulary). It all-gathers the
    slices, so greedy decoding picks the same token on every process of the group, from the whole vocabulary."""

    def __init__(self, head):
        self.group, self.sizes = head.mp_group, partition_sizes(head)

    def __call__(self, input_ids, scores):
        return gather_along(scores, self.sizes, -1, self.group)


def vocab_gathering_processors(model: nn.Module) -> list:
    """[GatherVocabShards] when the model's output head is vocabulary-parallel (logits per process are a slice),
    else [] (nothing to gather). Pass it to `generate(logits_processor=...)` (evaluate.exact_match does)."""
    heads = [m for m in model.modules() if getattr(m, "is_vocab_parallel_lm_head", False)]
    return [GatherVocabShards(heads[0])] if heads else []
