"""BeamLoRAConfig: every knob of the method in one place, with paper defaults and fix-it validation."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

# The seven linear projections of a Llama-style decoder layer (BEAMLORA.md section 7).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

OPTIMIZER_STATE_MODES = ("inherit", "keep")
IMPORTANCE_CRITERIA = ("score", "norm")


class ConfigError(ValueError):
    """A setting that cannot work; the message says what to change."""


@dataclass
class BeamLoRAConfig:
    """Hyper-parameters of BeamLoRA. Defaults are the paper's reference run (LLaMA-2-7B, math).

    `total_steps` (optimizer steps of the whole run) has no sensible default and must be set: the
    reset schedule and the keep-fraction curve are defined relative to it.
    """

    r: int = 64
    alpha: float = 128.0
    dropout: float = 0.05
    tau: float = 0.05
    target_modules: Union[Sequence[str], str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    interval: int = 3000
    p0: float = 0.95
    t_end: Optional[int] = None  # None: two thirds of total_steps, as in the paper
    total_steps: Optional[int] = None
    optimizer_state: str = "inherit"
    importance: str = "score"
    seed: int = 0
    check_consistency: bool = False  # debug: verify all processes made the same reset decision

    @property
    def resolved_t_end(self) -> int:
        """T_end of the keep-fraction curve: explicit, else two thirds of the run (at least 1)."""
        if self.t_end is not None:
            return self.t_end
        return max(1, (2 * self.total_steps) // 3)

    def validate(self) -> "BeamLoRAConfig":
        """Raise ConfigError naming the field and the fix; return self so calls can chain."""
        problems = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        need(_is_int(self.r) and self.r >= 2,
             f"r={self.r!r}: BeamLoRA needs at least 2 ranks per module to prune and refill; use r >= 2 (paper: 64).")
        need(_is_number(self.alpha) and self.alpha > 0, f"alpha={self.alpha!r}: must be a positive number (paper: 2 * r).")
        need(_is_number(self.dropout) and 0 <= self.dropout < 1, f"dropout={self.dropout!r}: must be in [0, 1).")
        need(_is_number(self.tau) and self.tau > 0,
             f"tau={self.tau!r}: the softmax temperature must be > 0 (paper: 0.05, or 0.03 when lr < 1e-4).")
        need(_is_number(self.p0) and 0 < self.p0 <= 1,
             f"p0={self.p0!r}: the initial keep-fraction must be in (0, 1] (paper: 0.95; 1 disables pruning).")
        need(self.optimizer_state in OPTIMIZER_STATE_MODES,
             f"optimizer_state={self.optimizer_state!r}: use one of {OPTIMIZER_STATE_MODES}.")
        need(self.importance in IMPORTANCE_CRITERIA,
             f"importance={self.importance!r}: use one of {IMPORTANCE_CRITERIA}.")
        need(_is_int(self.seed), f"seed={self.seed!r}: must be an integer.")
        problems += _target_problems(self.target_modules)

        if self.total_steps is None:
            problems.append("total_steps is not set: give the number of optimizer steps of the whole run "
                            "(the reset schedule is defined relative to it).")
        elif not (_is_int(self.total_steps) and self.total_steps >= 1):
            problems.append(f"total_steps={self.total_steps!r}: must be a positive integer.")
        if not (_is_int(self.interval) and self.interval >= 2):
            problems.append(f"interval={self.interval!r}: the reset interval T must be an integer >= 2 "
                            "(the snapshot is taken T/2 steps before each reset; paper: 3000).")
        elif _is_int(self.total_steps) and self.total_steps >= 1 and self.interval > self.total_steps // 2:
            problems.append(
                f"interval={self.interval} is too long for total_steps={self.total_steps}: a reset at step T needs "
                f"T more steps after it, so no reset would ever happen. Use interval <= {self.total_steps // 2}.")
        if self.t_end is not None and not (_is_int(self.t_end) and self.t_end >= 1):
            problems.append(f"t_end={self.t_end!r}: must be a positive integer number of steps, or None for 2/3 of total_steps.")
        if problems:
            raise ConfigError("Invalid BeamLoRAConfig:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not isinstance(d["target_modules"], str):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BeamLoRAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"Unknown BeamLoRAConfig fields {unknown}; known fields are {sorted(known)}.")
        return cls(**d)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # x == x rejects NaN


def _target_problems(target_modules) -> list:
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            return [f"target_modules={target_modules!r} is not a valid regular expression: {e}."]
        return []
    try:
        names = list(target_modules)
    except TypeError:
        return [f"target_modules={target_modules!r}: give a list of module names or one regular expression string."]
    if not names or not all(isinstance(n, str) and n for n in names):
        return [f"target_modules={target_modules!r}: give a non-empty list of module name suffixes "
                f"(e.g. {list(LLAMA_PROJECTIONS[:2])}) or one regular expression string."]
    return []
