"""Whole rows of A and columns of B as runs of flat positions, cut to one process's fragment by interval arithmetic.

ZeRO keeps each parameter flattened and gives every process one contiguous fragment [lo, hi) of it. A reset moves
whole rank slots: row s of A (r x d_in, row-major) is the contiguous run s*d_in, ..., s*d_in + d_in - 1; column s
of B (d_out x r) is the strided run s, s + r, ..., s + (d_out - 1) r. A fragment holds a contiguous part of a
contiguous run and an evenly strided part of a strided run, so each process finds, copies and writes its part with
slices whose cost is what it holds, not the run's length (docs/performance.md, "What a reset costs").

A list of runs has a flat value layout: run i's values follow run i-1's, `count` each, in run order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Tuple

import torch


@dataclass(frozen=True)
class Run:
    """Flat positions start, start + stride, ..., start + (count - 1) * stride."""

    start: int
    count: int
    stride: int = 1

    def clip(self, lo: int, hi: int) -> Tuple[int, int]:
        """The index range [k0, k1) of this run's positions that fall in [lo, hi) (k0 == k1 when none do)."""
        k0 = max(0, _ceil_div(lo - self.start, self.stride))
        k1 = min(self.count, _ceil_div(hi - self.start, self.stride))
        return k0, max(k0, k1)

    def positions(self, k0: int, k1: int, origin: int = 0) -> slice:
        """The slice of a flat tensor that starts at flat position `origin` holding this run's positions k0..k1-1."""
        first = self.start + k0 * self.stride - origin
        return slice(first, first + (k1 - k0 - 1) * self.stride + 1, self.stride)


def rows(indices: Iterable[int], width: int) -> List[Run]:
    """Whole rows `indices` of a row-major (rows x width) tensor, in the order given."""
    return [Run(int(i) * width, width, 1) for i in indices]


def columns(indices: Iterable[int], height: int, width: int) -> List[Run]:
    """Whole columns `indices` of a row-major (height x width) tensor, each top to bottom, in the order given."""
    return [Run(int(i), height, width) for i in indices]


def total(runs: List[Run]) -> int:
    return sum(run.count for run in runs)


def local_parts(runs: List[Run], lo: int, hi: int) -> Iterator[Tuple[slice, slice]]:
    """(slice of the runs' value layout, slice of the fragment [lo, hi) as a flat tensor) for every part of `runs`
    that falls in the fragment. Work and memory are proportional to the number of runs, never to their length."""
    base = 0
    for run in runs:
        k0, k1 = run.clip(lo, hi)
        if k1 > k0:
            yield slice(base + k0, base + k1), run.positions(k0, k1, origin=lo)
        base += run.count


def gather_local(runs: List[Run], fragment: torch.Tensor, lo: int, out: torch.Tensor) -> None:
    """Copy the fragment's (flat, starting at position lo) part of `runs` into `out` (the runs' value layout)."""
    for values, held in local_parts(runs, lo, lo + fragment.numel()):
        out[values] = fragment[held]


def scatter_local(runs: List[Run], values: torch.Tensor, fragment: torch.Tensor, lo: int) -> None:
    """Write the fragment's part of `runs` from `values` (the runs' value layout) into `fragment` (flat, at lo)."""
    for part, held in local_parts(runs, lo, lo + fragment.numel()):
        fragment[held] = values[part].to(fragment.device, fragment.dtype)


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)
