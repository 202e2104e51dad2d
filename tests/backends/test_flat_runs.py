"""flat_runs: rows of A and columns of B cut to a fragment by interval arithmetic, against the obvious oracle
(every flat position listed in full and masked), over random shapes, slots and fragment boundaries."""
import random

import torch

from beamlora_ds.backends.flat_runs import Run, columns, gather_local, rows, scatter_local, total


def positions_of(runs):
    return torch.cat([run.start + run.stride * torch.arange(run.count) for run in runs])


def cases(n=300, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        height, width = rng.randint(1, 9), rng.randint(1, 9)
        numel = height * width
        lo = rng.randint(0, numel)
        hi = rng.randint(lo, numel + 3)  # the last ZeRO-3 partition is padded past the tensor's end
        slots = rng.sample(range(width if rng.random() < 0.5 else height), k=rng.randint(1, min(height, width)))
        runs = columns(slots, height, width) if rng.random() < 0.5 else rows(slots, width)
        yield numel, lo, hi, runs


def test_gather_matches_masking_every_position():
    for numel, lo, hi, runs in cases():
        if max(run.start + (run.count - 1) * run.stride for run in runs) >= numel:
            continue  # rows() of a column count: not a valid slot set for this shape
        full = torch.randn(numel)
        fragment = full[lo:min(hi, numel)].clone()
        positions = positions_of(runs)
        expected = torch.zeros(total(runs))
        mine = (positions >= lo) & (positions < lo + fragment.numel())
        expected[mine] = full[positions[mine]]
        got = torch.zeros(total(runs))
        gather_local(runs, fragment, lo, got)
        assert torch.equal(got, expected), (numel, lo, hi, runs)


def test_scatter_writes_exactly_the_held_positions():
    for numel, lo, hi, runs in cases(seed=1):
        if max(run.start + (run.count - 1) * run.stride for run in runs) >= numel:
            continue
        values = torch.randn(total(runs))
        fragment = torch.full((min(hi, numel) - lo,), float("nan"))
        expected = fragment.clone()
        positions = positions_of(runs)
        mine = (positions >= lo) & (positions < lo + fragment.numel())
        expected[positions[mine] - lo] = values[mine]
        scatter_local(runs, values, fragment, lo)
        assert torch.equal(torch.nan_to_num(fragment, 7.0), torch.nan_to_num(expected, 7.0)), (numel, lo, hi, runs)


def test_columns_are_strided_runs_and_clip_is_exact():
    run = columns([2], height=5, width=4)[0]  # positions 2, 6, 10, 14, 18
    assert run == Run(2, 5, 4)
    assert run.clip(7, 15) == (2, 4)      # 10 and 14
    assert run.clip(19, 40) == (5, 5)     # none
    assert run.clip(0, 3) == (0, 1)       # 2
