"""How a BeamLoRALinear works on a tensor-parallel base: which factor is split, and the two collectives.

The rank dimension is never split (docs/tensor_parallel.md), so a rank stays whole on every process and a reset
copies rows and columns inside each process's shard exactly as without tensor parallelism:

    column-parallel base (output features split): A and score replicated, B split on out like the base's weight
        h = w * (A x)                 replicated [tokens, r]
        y_k = W_k x + s B_k h         each process its output slice; backward all-reduces dL/dh (copy_to_group)
    row-parallel base (input features split): A split on in like the base's weight, B and score replicated
        h = w * sum_k A_k x_k         forward all-reduces the partial products (reduce_from_group)
        y = sum_k W_k x_k + s B h     replicated, like the base's all-reduced output

Pure torch (torch.distributed); the DeepSpeed side that builds the split bases is beamlora_ds/autotp.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist

COLUMN, ROW = "column", "row"


@dataclass(frozen=True)
class TensorParallelSplit:
    """How one adapted layer is split over its tensor-parallel group: `kind` column or row, `sizes` the base's
    partition of its split dimension over the group (uneven for GQA), `index` this process's place in it."""
    kind: str
    group: object  # a torch.distributed ProcessGroup
    sizes: Tuple[int, ...]
    index: int

    def __post_init__(self):
        if self.kind not in (COLUMN, ROW):
            raise ValueError(f"kind must be {COLUMN!r} or {ROW!r}, not {self.kind!r}")

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def local_size(self) -> int:
        return self.sizes[self.index]

    @property
    def offset(self) -> int:
        """Where this process's slice starts in the unsplit dimension."""
        return sum(self.sizes[: self.index])

    @property
    def split_factor(self) -> str:
        """The adapter tensor that is split: B (out x r) on a column base, A (r x in) on a row base."""
        return "lora_B" if self.kind == COLUMN else "lora_A"

    @property
    def split_dim(self) -> int:
        """The dimension of `split_factor` that is split: B's rows (out), A's columns (in)."""
        return 0 if self.kind == COLUMN else 1


class _CopyToGroup(torch.autograd.Function):
    """Forward: identity. Backward: the sum of the gradient over the group (each process holds a part of it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()  # our own buffer: all_reduce writes in place
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    """Forward: the sum over the group of each process's partial product. Backward: identity (the gradient of a
    sum reaches every part unchanged)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        total = x.contiguous().clone()  # never reduce into the caller's tensor (or a view of it)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_group(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromGroup.apply(x, group)
