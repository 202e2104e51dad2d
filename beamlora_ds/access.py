"""The seam between the BeamLoRA algorithm and the training platform.

The controller only ever asks for: the score logits or the per-rank sums of squares of all modules (one
flat read), a snapshot of A, B and their optimizer moments, and in-place writes of whole rank rows of A,
columns of B, score logits and moments. `TorchAccess` does this for a plain torch optimizer; the DeepSpeed
implementation (partitioned, collective) lives in `zero_access.py` behind the same methods.

"Moments" are all per-parameter optimizer state tensors shaped like the parameter (Adam's exp_avg and
exp_avg_sq, AMSGrad's max_exp_avg_sq, SGD's momentum_buffer); scalars such as Adam's step are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .beam import ModuleReset
from .layer import BeamLoRALinear


@dataclass
class RankStats:
    """(modules, r) fp32 tensors: score logits; sum of squares of each A row and each B column (or None)."""

    logits: torch.Tensor
    a_row_sq: Optional[torch.Tensor] = None
    b_col_sq: Optional[torch.Tensor] = None


class PlatformAccess:
    """Interface every platform implements; all methods are called by every process in the same order."""

    modules: List[BeamLoRALinear]
    all_reduce_bytes: int = 0  # bytes this process has all-reduced so far (0 where there is no communication)

    def rank_stats(self, with_norms: bool) -> RankStats:
        """Score logits (and, if asked, per-rank sums of squares) of every module, identical on every process."""
        raise NotImplementedError

    def snapshot(self) -> dict:
        """This process's copy of A, B and their moments (only its own shard), on the host."""
        raise NotImplementedError

    def apply_reset(self, plans: Sequence[ModuleReset], new_logits: Dict[int, torch.Tensor], snapshot: dict,
                    inherit_moments: bool) -> None:
        """Refill targets from the snapshot's sources, write the new logits, optionally the moments."""
        raise NotImplementedError

    def zero_score_moments(self) -> None:
        raise NotImplementedError

    def all_processes_agree(self, checksum: float) -> bool:
        """True when every process computed the same checksum (debug check against silent desync)."""
        return True

    def score_weight_decays(self) -> List[Optional[float]]:
        """The weight decay the optimizer applies to each module's score (None where it cannot be told)."""
        return [None] * len(self.modules)


def is_deepspeed_engine(obj) -> bool:
    """True for a DeepSpeed engine (by class name, so that importing this module never imports DeepSpeed)."""
    return any(cls.__name__ == "DeepSpeedEngine" for cls in type(obj).__mro__)


def is_model_wrapper(obj) -> bool:
    """True for a DeepSpeed engine, DDP or DataParallel around a model (`.module`)."""
    names = {cls.__name__ for cls in type(obj).__mro__}
    return bool(names & {"DeepSpeedEngine", "DistributedDataParallel", "DataParallel"}) and hasattr(obj, "module")


def unwrap_model(model_or_engine) -> torch.nn.Module:
    """The user's model inside a DeepSpeed engine (or DDP): exported key names must not carry `module.`."""
    model = model_or_engine
    while is_model_wrapper(model):
        model = model.module
    return model


def is_deepspeed_optimizer(obj) -> bool:
    """A DeepSpeed wrapper optimizer (ZeRO, FP16/BF16, from `deepspeed.runtime`): what `engine.optimizer` is under
    ZeRO 1-3 or mixed precision. DeepSpeed's own torch optimizers (FusedAdam, DeepSpeedCPUAdam in `deepspeed.ops`)
    are plain optimizers: under ZeRO-0 fp32 the engine steps one directly."""
    return type(obj).__module__.startswith("deepspeed.runtime")


def taken_by_engine(param: torch.Tensor) -> bool:
    """True once deepspeed.initialize gave `param` to its ZeRO optimizer: stage 1/2 link an fp32 master
    (`_hp_mapping`), stage 3 attach the optimizer (`_z3_optimizer`). Its values then live in the engine, not in any
    torch optimizer. A ZeRO-3 model partitioned while it loads (zero.Init) has `ds_id` but neither of these."""
    return getattr(param, "_hp_mapping", None) is not None or hasattr(param, "_z3_optimizer")


PASS_THE_ENGINE = ("Pass the DeepSpeed engine itself, `beam.step(engine)`, after every `engine.step()`: BeamLoRA edits "
                   "the engine's fp32 master and Adam moments through it.")


def optimizer_steps(optimizer_or_engine, modules: Sequence[BeamLoRALinear]) -> Optional[int]:
    """How many optimizer updates the adapters have had, by the optimizer's own count (None when it keeps none).

    A DeepSpeed engine counts its steps and the ones it skipped (fp16 overflow, non-finite gradients); Adam-style
    torch optimizers keep a `step` per parameter. BeamController compares this with its own step count.
    """
    if is_deepspeed_engine(optimizer_or_engine):
        return int(optimizer_or_engine.global_steps) - int(getattr(optimizer_or_engine, "skipped_steps", 0))
    try:
        optimizer = unwrap_optimizer(optimizer_or_engine)
    except TypeError:
        return None
    steps = [optimizer.state.get(p, {}).get("step") for p in score_parameters(modules)]
    steps = [int(s) for s in steps if s is not None]
    return max(steps) if steps else None


def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """Accept wrappers that hold a torch optimizer in `.optimizer` (accelerate, HF)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"BeamController.step() got {type(optimizer).__name__}; pass the torch optimizer you call "
                        "step() on, or the DeepSpeed engine.")
    return optimizer


class TorchAccess(PlatformAccess):
    """Whole (unpartitioned) parameters and a plain torch optimizer in one process."""

    def __init__(self, modules: Sequence[BeamLoRALinear], optimizer):
        self.modules = list(modules)
        if is_deepspeed_optimizer(optimizer) or any(taken_by_engine(p) for m in self.modules
                                                     for _, p in _adapter_params(m)):
            raise TypeError(f"BeamController.step() got {type(optimizer).__name__}, but this model is trained by a "
                            f"DeepSpeed engine. {PASS_THE_ENGINE}")
        self.optimizer = unwrap_optimizer(optimizer)
        in_optimizer = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        missing = [name for m in self.modules for name, p in _adapter_params(m) if id(p) not in in_optimizer]
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


def _copy_rows(dst: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    dst[rows] = values.to(device=dst.device, dtype=dst.dtype)


def _copy_cols(dst: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> None:
    dst[:, cols] = values.to(device=dst.device, dtype=dst.dtype)


def _adapter_params(module: BeamLoRALinear):
    return [("lora_A", module.lora_A), ("lora_B", module.lora_B), ("lora_score", module.score_parameter)]


def score_parameters(modules: Sequence[BeamLoRALinear]) -> List[torch.nn.Parameter]:
    """The distinct parameters holding these modules' scores, in module order: one (modules x r) table after
    apply(), one (r,) parameter per module for layers made on their own."""
    seen: Dict[int, torch.nn.Parameter] = {}
    for module in modules:
        seen.setdefault(id(module.score_parameter), module.score_parameter)
    return list(seen.values())
