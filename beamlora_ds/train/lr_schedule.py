"""The learning-rate schedule of launch/train.py (and the benchmarks that train as it does): linear warmup, then
cosine, linear or constant, as a LambdaLR factor."""
from __future__ import annotations

import math
from typing import Callable


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The factor of the peak learning rate at each optimizer step: warmup to 1 over `warmup` steps, then `kind`
    ("cosine" to 0, "linear" to 0, or "constant") over the rest of the `total` steps."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor
