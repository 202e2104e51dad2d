"""The platform seam for a plain torch optimizer: whole (unpartitioned) parameters, edited in place.

Also what DeepSpeed's ZeRO stage 0 in fp32 needs (its parameters are whole and it steps a plain torch optimizer)
and what plain DDP needs (every process holds the same whole tensors and applies the same edit).
"""
from __future__ import annotations

import gc
from typing import Dict, Optional, Sequence

import torch

from ..method.layer import BeamLoRALinear
from ..method.score_table import score_parameters
from ..method.seam import PlatformAccess, RankStats
from . import coordination
from .deepspeed.internals import taken_by_zero_optimizer
from .tensor_parallel import sum_split_norms
from .wrappers import PASS_THE_ENGINE, is_deepspeed_optimizer, unwrap_optimizer


class TorchAccess(PlatformAccess):
    """Whole (unpartitioned) parameters and a plain torch optimizer in one process."""

    def __init__(self, modules: Sequence[BeamLoRALinear], optimizer):
        self.modules = list(modules)
        if is_deepspeed_optimizer(optimizer) or any(taken_by_zero_optimizer(p) for m in self.modules
                                                     for _, p in adapter_parameters(m)):
            raise TypeError(f"BeamController.step() got {type(optimizer).__name__}, but this model is trained by a "
                            f"DeepSpeed engine. {PASS_THE_ENGINE}")
        self.optimizer = unwrap_optimizer(optimizer)
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [name for m in self.modules for name, p in adapter_parameters(m) if id(p) not in in_optimizer]
        if missing:
            raise ValueError(f"{len(missing)} BeamLoRA parameters are not in the optimizer (e.g. {missing[:3]}). "
                             "Build the optimizer from the trainable parameters after beamlora_ds.apply(), e.g. "
                             "AdamW(beamlora_ds.optimizer_param_groups(model)); with DeepSpeed, call apply() before "
                             "deepspeed.initialize.")

    def rank_stats(self, with_norms: bool) -> RankStats:
        stats = RankStats(torch.stack([m.lora_score.detach().float().cpu() for m in self.modules]))
        if with_norms:
            stats.a_row_sq = torch.stack([m.lora_A.detach().float().pow(2).sum(dim=1).cpu() for m in self.modules])
            stats.b_col_sq = torch.stack([m.lora_B.detach().float().pow(2).sum(dim=0).cpu() for m in self.modules])
            sum_split_norms(stats.a_row_sq, stats.b_col_sq, self.modules)  # tensor-parallel slices, if any
        return stats

    def _moments(self, p: torch.Tensor) -> Dict[str, torch.Tensor]:
        state = self.optimizer.state.get(p, {})
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == p.shape}

    def snapshot(self) -> dict:
        def host(t):
            return t.detach().to("cpu", copy=True)

        return {"modules": [{"A": host(m.lora_A), "B": host(m.lora_B),
                             "A_moments": {k: host(v) for k, v in self._moments(m.lora_A).items()},
                             "B_moments": {k: host(v) for k, v in self._moments(m.lora_B).items()}}
                            for m in self.modules]}

    @torch.no_grad()
    def apply_reset(self, plans, new_logits, snapshot, inherit_moments):
        for plan in plans:
            module, snap = self.modules[plan.module_index], snapshot["modules"][plan.module_index]
            targets = torch.tensor(plan.targets, device=module.lora_A.device)
            sources = torch.tensor(plan.sources)
            _copy_rows(module.lora_A, targets, snap["A"][sources])
            _copy_cols(module.lora_B, targets, snap["B"][:, sources])
            if inherit_moments:  # a moment the snapshot lacks (no optimizer step before it) inherits zeros
                for key, moment in self._moments(module.lora_A).items():
                    _copy_rows(moment, targets, snap["A_moments"].get(key, torch.zeros_like(snap["A"]))[sources])
                for key, moment in self._moments(module.lora_B).items():
                    _copy_cols(moment, targets, snap["B_moments"].get(key, torch.zeros_like(snap["B"]))[:, sources])
            module.lora_score.copy_(new_logits[plan.module_index].to(module.lora_score.dtype))

    @torch.no_grad()
    def zero_score_moments(self):
        for param in score_parameters(self.modules):  # every module's score: each whole parameter, table or own
            for moment in self._moments(param).values():
                moment.zero_()

    def score_weight_decays(self):
        decay = {id(p): group.get("weight_decay", 0.0) for group in self.optimizer.param_groups for p in group["params"]}
        return [decay.get(id(m.score_parameter)) for m in self.modules]

    def optimizer_steps(self) -> Optional[int]:
        return adam_steps(self.optimizer, self.modules)

    def is_process_zero(self) -> bool:
        return coordination.is_process_zero()


def adam_steps(optimizer, modules: Sequence[BeamLoRALinear]) -> Optional[int]:
    """The updates an Adam-style torch optimizer (or a wrapper holding one) gave the scores, by its own per-parameter
    `step`; None when it keeps no count or is no torch optimizer."""
    try:
        optimizer = unwrap_optimizer(optimizer)
    except TypeError:
        return None
    steps = [optimizer.state.get(p, {}).get("step") for p in score_parameters(modules)]
    steps = [int(s) for s in steps if s is not None]
    return max(steps) if steps else None


def optimizers_holding(parameters) -> list:
    """Live torch optimizers that hold any of `parameters` (one pass over the tracked objects, ~50 ms)."""
    ids = {id(p) for p in parameters}
    # issubclass(type(...)): isinstance would ask each object for __class__, and some deprecated torch objects warn
    return [obj for obj in gc.get_objects() if issubclass(type(obj), torch.optim.Optimizer)
            and any(id(p) in ids for group in obj.param_groups for p in group["params"])]


def _copy_rows(dst: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    dst[rows] = values.to(device=dst.device, dtype=dst.dtype)


def _copy_cols(dst: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
    dst[:, cols] = values.to(device=dst.device, dtype=dst.dtype)


def adapter_parameters(module: BeamLoRALinear):
    """(name, parameter) of what a module trains: A, B and the parameter holding its score."""
    return [("lora_A", module.lora_A), ("lora_B", module.lora_B), ("lora_score", module.score_parameter)]
