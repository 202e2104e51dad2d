"""What the controller needs from a training platform: the seam between the method and whoever holds the tensors.

The controller decides every reset with the pure functions of `algorithm.py` and touches parameters and optimizer
state only through a `PlatformAccess`: one flat read of the score logits (or per-rank sums of squares), a snapshot
of A, B and their optimizer moments, and in-place writes of whole rank rows of A, columns of B, score logits and
moments. The implementations live in `beamlora_ds/backends/` (a plain torch optimizer; DeepSpeed ZeRO 0-3), which
also answers the controller's questions before any access exists (`Platform`); another platform is another
implementation of these classes, and nothing in `method/` changes.

"Moments" are all per-parameter optimizer state tensors shaped like the parameter (Adam's exp_avg and exp_avg_sq,
AMSGrad's max_exp_avg_sq, SGD's momentum_buffer); scalars such as Adam's step are never touched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .algorithm import ModuleReset
from .layer import BeamLoRALinear
from .stages import Stages


@dataclass
class RankStats:
    """(modules, r) fp32 tensors: score logits; sum of squares of each A row and each B column (or None). Identical
    on every process: a factor split over processes (ZeRO shards, tensor-parallel slices) is summed up already."""

    logits: torch.Tensor
    a_row_sq: Optional[torch.Tensor] = None
    b_col_sq: Optional[torch.Tensor] = None


class PlatformAccess:
    """Interface every platform implements; all methods are called by every process in the same order."""

    modules: List[BeamLoRALinear]
    all_reduce_bytes: int = 0  # bytes this process has all-reduced so far (0 where there is no communication)
    # how to build this platform's optimizer without weight decay on the scores (the warning's fix)
    no_score_decay_fix: str = "Build it from beamlora_ds.optimizer_param_groups(model, weight_decay)."
    # the pipeline stages a reset spans (method/stages.py): rank_stats and apply_reset are about this process's
    # modules; the controller gathers every stage's stats through `stages` and plans for the whole model
    stages: Stages = Stages()

    def rank_stats(self, with_norms: bool) -> RankStats:
        """Score logits (and, if asked, per-rank sums of squares) of every module, identical on every process."""
        raise NotImplementedError

    def snapshot(self) -> dict:
        """This process's copy of A, B and their moments (only what it holds), on the host."""
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

    def step_applied(self) -> bool:
        """Whether the optimizer step just taken updated the weights (not a micro-step inside gradient
        accumulation, not an fp16 overflow the platform skipped)."""
        return True

    def optimizer_steps(self) -> Optional[int]:
        """How many updates the optimizer counted itself (None when it keeps no count)."""
        return None

    def is_process_zero(self) -> bool:
        """Whether this process speaks for all: every process decides the same reset, one log line is enough."""
        return True


class Platform:
    """What the controller asks the training platform before it has an access: the access itself for whatever
    `beam.step()` is given, and, for the misuse checks, the optimizer's own step count and which optimizer holds
    the scores. beamlora_ds.backends provides the one apply() hands the controller."""

    def access(self, modules: Sequence[BeamLoRALinear], optimizer_or_engine) -> PlatformAccess:
        """The seam for a torch optimizer or an engine (checked: every adapter parameter must be trained by it)."""
        raise NotImplementedError

    def optimizer_steps(self, optimizer_or_engine, modules: Sequence[BeamLoRALinear]) -> Optional[int]:
        """How many updates the optimizer or engine counted itself (None when it keeps no count); no checks."""
        raise NotImplementedError

    def process_place(self) -> dict:
        """{"rank", "world_size"} of this process in the job (a controller's state belongs to the process that wrote
        it)."""
        return {"rank": 0, "world_size": 1}

    def optimizer_holding(self, parameters) -> Optional[object]:
        """The one live optimizer that holds any of `parameters`, or None (none, or several)."""
        raise NotImplementedError
