"""BeamLoRAConfig: every knob of the method in one place, with paper defaults and fix-it validation."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

# The seven linear projections of a Llama-style decoder layer (docs/method.md section 7).
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Fields a resumed run must share with its checkpoint: the reset schedule, its decisions and the adapter's scale
# depend on them (checked by BeamController.load_state_dict; launch/train.py checks their flags before loading).
RESUME_FIELDS = ("r", "alpha", "tau", "interval", "p0", "t_end", "total_steps", "optimizer_state", "importance", "seed")

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
             f"r={_show(self.r)}: BeamLoRA needs at least 2 ranks per module to prune and refill; use r >= 2 (paper: 64).")
        need(_is_number(self.alpha) and self.alpha > 0,
             f"alpha={_show(self.alpha)}: must be a finite positive number (paper: 2 * r).")
        need(_is_number(self.dropout) and 0 <= self.dropout < 1, f"dropout={_show(self.dropout)}: must be in [0, 1).")
        need(_is_number(self.tau) and self.tau > 0,
             f"tau={_show(self.tau)}: the softmax temperature must be finite and > 0 (paper: 0.05, or 0.03 when lr < 1e-4).")
        need(_is_number(self.p0) and 0 < self.p0 <= 1,
             f"p0={_show(self.p0)}: the initial keep-fraction must be in (0, 1] (paper: 0.95; 1 disables pruning).")
        need(isinstance(self.optimizer_state, str) and self.optimizer_state in OPTIMIZER_STATE_MODES,
             f"optimizer_state={_show(self.optimizer_state)}: use one of {OPTIMIZER_STATE_MODES}.")
        need(isinstance(self.importance, str) and self.importance in IMPORTANCE_CRITERIA,
             f"importance={_show(self.importance)}: use one of {IMPORTANCE_CRITERIA}.")
        need(_is_int(self.seed) and -(1 << 63) <= self.seed < (1 << 64),
             f"seed={_show(self.seed)}: must be an integer that fits in 64 bits, as torch.manual_seed takes.")
        problems += _target_problems(self.target_modules)

        total_ok = _is_int(self.total_steps) and self.total_steps >= 1
        if self.total_steps is None:
            problems.append("total_steps is not set: give the number of optimizer steps of the whole run "
                            "(the reset schedule is defined relative to it).")
        elif not total_ok:
            problems.append(f"total_steps={_show(self.total_steps)}: must be a positive integer.")
        if not (_is_int(self.interval) and self.interval >= 2):
            problems.append(f"interval={_show(self.interval)}: the reset interval T must be an integer >= 2 "
                            "(the snapshot is taken T/2 steps before each reset; paper: 3000).")
        elif total_ok and self.interval > self.total_steps // 2:
            problems.append(
                f"interval={_show(self.interval)} is too long for total_steps={_show(self.total_steps)}: "
                f"a reset at step T needs T more steps after it, so no reset would ever happen. "
                + (f"Use interval <= {_show(self.total_steps // 2)}." if self.total_steps >= 4 else
                   "The shortest interval is 2, which needs total_steps >= 4: train for more steps."))
        if self.t_end is not None and not (_is_int(self.t_end) and self.t_end >= 1):
            problems.append(f"t_end={_show(self.t_end)}: must be a positive integer number of steps, or None for 2/3 of total_steps.")
        elif self.t_end is not None and total_ok and self.t_end > self.total_steps:
            problems.append(
                f"t_end={_show(self.t_end)} is past the end of the run (total_steps={_show(self.total_steps)}): the "
                "keep-fraction would never reach 1 and late resets would keep pruning. Use t_end <= total_steps, or "
                "leave it unset for 2/3 of total_steps (the paper's choice).")
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
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))  # rejects NaN, +-inf and ints too large for a float
    except OverflowError:
        return False


def _show(x) -> str:
    """repr() for messages; huge ints have no repr in Python >= 3.11 (int_max_str_digits)."""
    try:
        return repr(x)
    except ValueError:
        return f"<{type(x).__name__} too large to print>"


def _target_problems(target_modules) -> list:
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except (re.error, OverflowError, RecursionError) as e:  # huge repeat counts, deep nesting
            return [f"target_modules={_show(target_modules)} is not a valid regular expression: {e}."]
        return []
    try:
        names = list(target_modules)
    except TypeError:
        return [f"target_modules={_show(target_modules)}: give a list of module names or one regular expression string."]
    if not names or not all(isinstance(n, str) and n for n in names):
        return [f"target_modules={_show(target_modules)}: give a non-empty list of module name suffixes "
                f"(e.g. {list(LLAMA_PROJECTIONS[:2])}) or one regular expression string."]
    return []
