"""The BeamLoRA algorithm as pure functions on plain tensors (docs/method.md sections 2-4).

No state, no torch.distributed, no DeepSpeed: every function here gives the same answer on every process
for the same inputs, which is what lets all ranks of a job decide a reset without talking to each other.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import List, Sequence

import torch


# ----------------------------------------------------------------------------------------------- schedule
def keep_fraction(step: int, p0: float, t_end: int) -> float:
    """p(t) = 1 - (1 - p0) * (1 + cos(pi * min(t - 1, T_end) / T_end)) / 2: rises from p0 to 1 by T_end."""
    progress = min(step - 1, t_end) / t_end
    return 1.0 - (1.0 - p0) * (1.0 + math.cos(math.pi * progress)) / 2.0


def is_reset_step(step: int, interval: int, total_steps: int) -> bool:
    """Resets at T, 2T, ... while at least T steps remain before the end of training."""
    return step >= interval and step % interval == 0 and total_steps - step >= interval


def is_snapshot_step(step: int, interval: int, total_steps: int) -> bool:
    """The snapshot for the reset at kT is taken after step kT - T//2 (T/2, 3T/2, ... for even T)."""
    return is_reset_step(step + interval // 2, interval, total_steps)


# --------------------------------------------------------------------------------------------- importance
def score_importance(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """I_i = r * softmax(s / tau)_i per module; `logits` is (modules, r). Each row sums to r."""
    return logits.shape[-1] * torch.softmax(logits.double() / tau, dim=-1).float()


def norm_importance(a_row_sq: torch.Tensor, b_col_sq: torch.Tensor) -> torch.Tensor:
    """I_i = ||b_i|| * ||a_i||, normalised so each module's row sums to r (uniform where all are zero).

    Takes sums of squares, (modules, r), so that shard-local partial sums can be added up first. A NaN or
    +inf input makes its module's row non-finite (never silently uniform), so the reset is skipped.
    """
    raw = (a_row_sq.double().clamp_min(0).sqrt() * b_col_sq.double().clamp_min(0).sqrt())
    r = raw.shape[-1]
    total = raw.sum(dim=-1, keepdim=True)
    zero = total == 0  # NaN totals are not zero: they propagate instead of turning uniform
    normalised = torch.where(zero, torch.ones_like(raw), r * raw / torch.where(zero, torch.ones_like(total), total))
    return normalised.float()


# ---------------------------------------------------------------------------------------------- selection
def select_pruned(importance: torch.Tensor, keep: float) -> torch.Tensor:
    """Global top-p selection over all modules; returns a bool mask shaped like `importance` (modules, r).

    Sort all N*r importances descending (ties: lower flat index first), take the cumulative sum; the first
    position where it exceeds keep * N * r, and every position after it, is pruned. A module never loses all
    of its ranks: if it would, its most important rank is kept (so it has a source to refill from).
    NaN/Inf importances or keep raise ValueError: there is no meaningful ranking to prune by.
    """
    n_modules, r = importance.shape
    if not math.isfinite(keep) or not bool(torch.isfinite(importance).all()):
        raise ValueError(f"select_pruned needs finite importances and keep-fraction (keep={keep}); "
                         "a reset with NaN/Inf scores must be skipped, not planned")
    flat = importance.reshape(-1).double()
    pruned = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep >= 1.0:
        return pruned.view(n_modules, r)
    order = torch.sort(-flat, stable=True).indices  # descending; stable keeps lower index first on ties
    cumsum = torch.cumsum(flat[order], dim=0)
    over = (cumsum > keep * n_modules * r).nonzero()
    if over.numel() > 0:
        pruned[order[int(over[0]):]] = True
    pruned = pruned.view(n_modules, r)
    wiped = pruned.all(dim=1).nonzero().flatten()
    for m in wiped.tolist():
        pruned[m, _rank_order(importance[m])[0]] = False
    return pruned


def _rank_order(importance_row: torch.Tensor) -> torch.Tensor:
    """Rank indices by importance, descending, ties by lower index."""
    return torch.sort(-importance_row.double(), stable=True).indices


def reset_generator(seed: int, step: int, module_index: int) -> torch.Generator:
    """A generator that every process seeds identically from (seed, step, module), with no communication."""
    digest = hashlib.sha256(f"beamlora:{seed}:{step}:{module_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def pair_targets_with_sources(importance_row: torch.Tensor, pruned_row: torch.Tensor,
                              generator: torch.Generator) -> tuple:
    """For one module: pruned slots j (ascending) and the source rank each one copies.

    Sources are the k highest-importance *kept* ranks (cyclically reused if fewer than k are kept), paired
    with the targets through a random permutation drawn from `generator`.
    """
    targets = pruned_row.nonzero().flatten()
    k = targets.numel()
    kept_by_importance = [i for i in _rank_order(importance_row).tolist() if not bool(pruned_row[i])]
    if k == 0:
        return targets, targets.clone()
    if not kept_by_importance:
        raise ValueError("every rank of the module is pruned: no source to refill from")
    sources = torch.tensor([kept_by_importance[i % len(kept_by_importance)] for i in range(k)], dtype=torch.long)
    permutation = torch.randperm(k, generator=generator)
    return targets, sources[permutation]


def average_scores(logits: torch.Tensor, targets: Sequence[int], sources: Sequence[int]) -> torch.Tensor:
    """Both s_j and s_src become (s_j + s_src) / 2, pairs applied in ascending j on the then-current values."""
    out = logits.clone()
    for j, src in sorted(zip(_as_list(targets), _as_list(sources))):
        mean = (out[j] + out[src]) / 2
        out[j] = mean
        out[src] = mean
    return out


def _as_list(x) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


# ------------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class ModuleReset:
    """What one module does at a reset: slot targets[i] is refilled from rank sources[i]."""

    module_index: int
    targets: List[int]
    sources: List[int]


def plan_reset(importance: torch.Tensor, keep: float, seed: int, step: int) -> List[ModuleReset]:
    """The whole reset decision for all modules, (modules, r) importances in; only touched modules out."""
    pruned = select_pruned(importance, keep)
    plans = []
    for m in pruned.any(dim=1).nonzero().flatten().tolist():
        targets, sources = pair_targets_with_sources(importance[m], pruned[m], reset_generator(seed, step, m))
        plans.append(ModuleReset(m, targets.tolist(), sources.tolist()))
    return plans
