"""BeamLoRA's tensors as DeepSpeed holds them outside a reset: whole fp32 values for export, and the ZeRO-3
persistence threshold that keeps the adapters resident."""
from __future__ import annotations

import logging
from typing import Dict, Sequence

import torch

from ...method.layer import BeamLoRALinear
from ...method.score_table import score_parameters
from .. import coordination
from .internals import in_zero_optimizer

logger = logging.getLogger(__name__)


def is_zero3_param(param: torch.Tensor) -> bool:
    """True for a ZeRO-3 parameter: each process holds only a shard (`numel() == 0` outside a gather)."""
    return hasattr(param, "ds_id")


def full_fp32_param(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter in fp32 on the CPU: the optimizer's fp32 master under ZeRO 1-3, else the tensor.

    Collective under ZeRO (call it on every process, same parameters in the same order): stage 1/2 all-reduce
    the master's fragments, stage 3 all-gathers the shards. Reading the master, not the possibly bf16 working
    copy, is what makes an exported adapter the trained one (docs/method.md section 6).
    """
    if is_zero3_param(param) and not (param.requires_grad and in_zero_optimizer(param)):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param]):
            return param.data.detach().float().cpu().clone()
    if in_zero_optimizer(param):  # ZeRO-1/2/3 (and DeepSpeed's bf16 optimizer): the fp32 master
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).detach().float().cpu().clone()
    return param.detach().float().cpu().clone()


def persistence_threshold_for(modules: Sequence[BeamLoRALinear]) -> int:
    """The smallest `stage3_param_persistence_threshold` that keeps every adapter tensor resident under ZeRO-3
    (the score table included: it is read by every module)."""
    scores = max(getattr(p, "ds_numel", p.numel()) for p in score_parameters(modules))
    return 1 + max(scores, max(max(m.r * m.in_features, m.out_features * m.r) for m in modules))


def warn_if_adapters_not_persistent(modules: Sequence[BeamLoRALinear]) -> None:
    """Partitioned adapter tensors are all-gathered by every forward and backward: say so, with the fix."""
    params = [p for m in modules for p in (m.lora_A, m.lora_B)] + score_parameters(modules)
    gathered = [p for p in params if not getattr(p, "ds_persist", True)]
    if gathered and coordination.is_process_zero():  # the same on every process: one line, not one per GPU
        elements = sum(p.ds_numel for p in params)
        logger.warning(
            "%d of %d BeamLoRA tensors are partitioned under ZeRO-3, so every forward and backward all-gathers them "
            "(hundreds of tiny collectives per step). Set zero_optimization.stage3_param_persistence_threshold >= %d "
            "to keep them resident, at %.1f MB per GPU (bf16).", len(gathered), len(params),
            persistence_threshold_for(modules), elements * 2 / 2**20)


def values_held_at(param: torch.Tensor, positions: Sequence[int]) -> Dict[int, float]:
    """The values of `param` at flat `positions` that this process holds, without any communication: all of them
    for a whole tensor; under ZeRO-3, those inside this process's shard (shard k of a parameter partitioned over
    its `ds_process_group` holds the flat positions [k s, (k + 1) s), s the shard size)."""
    if not is_zero3_param(param) or param.ds_tensor is None or param.numel() == param.ds_numel:
        flat = param.detach().reshape(-1)
        return {p: float(flat[p]) for p in positions if p < flat.numel()}
    import deepspeed.comm as dist

    shard = param.ds_tensor.detach().reshape(-1)
    start = dist.get_rank(group=param.ds_process_group) * param.ds_tensor.ds_numel
    return {p: float(shard[p - start]) for p in positions if start <= p < start + shard.numel() and p < param.ds_numel}
