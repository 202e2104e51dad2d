"""How a BeamLoRALinear works on a tensor-parallel base: which factor is split, and the two collectives.

The rank dimension is never split (docs/tensor_parallel.md), so a rank stays whole on every process and a reset
copies rows and columns inside each process's shard exactly as without tensor parallelism:

    column-parallel base (output features split): A and score replicated, B split on out like the base's weight
        h = w * (A x)                 replicated [tokens, r]
        y_k = W_k x + s B_k h         each process its output slice; backward all-reduces dL/dh (copy_to_group)
    row-parallel base (input features split): A split on in like the base's weight, B and score replicated
        h = w * sum_k A_k x_k         forward all-reduces the partial products (reduce_from_group)
        y = sum_k W_k x_k + s B h     replicated, like the base's all-reduced output

Plain torch.distributed, shared by every backend with tensor parallelism; the DeepSpeed side that builds the split
bases is deepspeed/autotp.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
import torch.distributed as dist

from ..method.layer import COLUMN, ROW


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

    def copy_to_group(self, h: torch.Tensor) -> torch.Tensor:
        """Identity forward; the backward sums the gradient over the group (after a column base's replicated h)."""
        return copy_to_group(h, self.group)

    def reduce_from_group(self, h: torch.Tensor) -> torch.Tensor:
        """The sum over the group of each process's partial product (a row base's A_k x_k)."""
        return reduce_from_group(h, self.group)


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


def comm_device(group) -> torch.device:
    """Where a tensor must be for a collective on `group`: NCCL reduces only GPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def gather_along(local: torch.Tensor, sizes: Tuple[int, ...], dim: int, group) -> torch.Tensor:
    """The whole tensor from every process's slice along `dim` (collective over the group, uneven `sizes`
    allowed): each slice is padded to the largest, all-gathered, and cut back."""
    dim = dim % local.dim()
    padded_shape = list(local.shape)
    padded_shape[dim] = max(sizes)
    padded = local.new_zeros(padded_shape)
    padded.narrow(dim, 0, local.shape[dim]).copy_(local)
    padded = padded.to(comm_device(group))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    whole = torch.cat([part.narrow(dim, 0, size) for part, size in zip(parts, sizes)], dim=dim)
    return whole.to(local.device)


def gather_split(local: torch.Tensor, split: TensorParallelSplit) -> torch.Tensor:
    """The whole split factor (A or B) from every process's slice: for export."""
    return gather_along(local, split.sizes, split.split_dim, split.group)


@torch.no_grad()
def sum_split_norms(a_row_sq: torch.Tensor, b_col_sq: torch.Tensor, modules) -> None:
    """The norm criterion's squared row norms of A and column norms of B, (modules x r), read from this process's
    tensors: where the factor is split, each process holds only its slice's part of the sum, so those rows are
    summed over the tensor-parallel group (one all-reduce for all modules; the score criterion needs none, the
    score is replicated)."""
    split_rows = [(i, m.tensor_parallel) for i, m in enumerate(modules) if m.tensor_parallel is not None]
    if not split_rows:
        return
    groups = {id(split.group) for _, split in split_rows}
    if len(groups) != 1:
        raise ValueError("BeamLoRA modules split over different tensor-parallel groups; one group is supported.")
    group = split_rows[0][1].group
    parts = torch.stack([(a_row_sq if split.kind == ROW else b_col_sq)[i] for i, split in split_rows])
    parts = parts.to(comm_device(group))
    dist.all_reduce(parts, group=group)
    parts = parts.to(a_row_sq.device)
    for (i, split), part in zip(split_rows, parts):
        (a_row_sq if split.kind == ROW else b_col_sq)[i] = part
