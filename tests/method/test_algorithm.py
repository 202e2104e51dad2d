"""algorithm.py against values computed by hand from docs/method.md sections 2-4."""
import math

import pytest
import torch

from beamlora_ds.method import algorithm


# ----------------------------------------------------------------------------------------------- schedule
def test_keep_fraction_hand_values():
    assert algorithm.keep_fraction(1, p0=0.9, t_end=100) == pytest.approx(0.9)  # cos(0) = 1: starts at p0
    assert algorithm.keep_fraction(51, p0=0.9, t_end=100) == pytest.approx(0.95)  # halfway: 1 - 0.1 * 0.5
    assert algorithm.keep_fraction(101, p0=0.9, t_end=100) == pytest.approx(1.0)
    assert algorithm.keep_fraction(5000, p0=0.9, t_end=100) == pytest.approx(1.0)  # clamped after T_end
    # paper setting at the first reset: t = 3000, T_end = 24688 (about 0.9518)
    expected = 1 - 0.05 * (1 + math.cos(math.pi * 2999 / 24688)) / 2
    assert algorithm.keep_fraction(3000, p0=0.95, t_end=24688) == pytest.approx(expected)


def test_reset_and_snapshot_steps_hand_values():
    resets = [t for t in range(1, 36) if algorithm.is_reset_step(t, interval=10, total_steps=35)]
    snapshots = [t for t in range(1, 36) if algorithm.is_snapshot_step(t, interval=10, total_steps=35)]
    assert resets == [10, 20]  # 30 is too late: only 5 steps would remain
    assert snapshots == [5, 15]
    assert [t for t in range(1, 21) if algorithm.is_reset_step(t, 5, 20)] == [5, 10, 15]
    assert [t for t in range(1, 21) if algorithm.is_snapshot_step(t, 5, 20)] == [3, 8, 13]  # odd T: kT - T//2


# --------------------------------------------------------------------------------------------- importance
def test_score_importance_sums_to_r_and_is_uniform_at_zero():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.0, -0.1, 0.05]])
    imp = algorithm.score_importance(logits, tau=0.05)
    assert torch.allclose(imp[0], torch.ones(4))
    assert torch.allclose(imp.sum(dim=1), torch.tensor([4.0, 4.0]))
    e = torch.exp(torch.tensor([2.0, 0.0, -2.0, 1.0]))
    assert torch.allclose(imp[1], 4 * e / e.sum())


def test_norm_importance_hand_values():
    a_sq = torch.tensor([[4.0, 1.0], [0.0, 0.0]])
    b_sq = torch.tensor([[1.0, 9.0], [0.0, 0.0]])
    imp = algorithm.norm_importance(a_sq, b_sq)
    assert torch.allclose(imp[0], torch.tensor([0.8, 1.2]))  # raw [2, 3] -> 2 * [0.4, 0.6]
    assert torch.allclose(imp[1], torch.tensor([1.0, 1.0]))  # B = 0 (start of training): uniform


# ---------------------------------------------------------------------------------------------- selection
def test_uniform_scores_prune_ceil_of_one_minus_p_times_n_r():
    imp = torch.ones(4, 8)
    pruned = algorithm.select_pruned(imp, keep=0.95)  # threshold 30.4: positions 31 and 32 exceed it
    assert int(pruned.sum()) == math.ceil(0.05 * 32) == 2
    assert pruned[3, 6] and pruned[3, 7]  # ties: lower global index kept first, so the last ranks go
    assert int(algorithm.select_pruned(torch.ones(4, 25), keep=0.9).sum()) == 10  # 90 exactly: position 91 on
    assert int(algorithm.select_pruned(torch.ones(4, 25), keep=1.0).sum()) == 0


def test_peaked_module_loses_more():
    imp = torch.tensor([[3.9, 0.05, 0.03, 0.02], [1.0, 1.0, 1.0, 1.0]])
    pruned = algorithm.select_pruned(imp, keep=0.95)  # sorted cumsum 3.9 4.9 5.9 6.9 7.9 > 7.6 -> prune from there
    assert pruned.tolist() == [[False, True, True, True], [False, False, False, True]]


def test_a_module_is_never_pruned_entirely():
    imp = torch.cat([torch.full((1, 4), 1.0), torch.tensor([[40.0, 0.0, 0.0, 0.0]]).repeat(9, 1)]) * 1.0
    imp = imp / imp.sum(dim=1, keepdim=True) * 4
    pruned = algorithm.select_pruned(imp, keep=0.9)
    assert not pruned.all(dim=1).any()
    assert pruned[0].tolist() == [False, True, True, True]  # module 0 keeps its most important (first) rank


def test_sources_come_only_from_kept_ranks_when_k_exceeds_half():
    imp = torch.tensor([2.5, 1.0, 0.3, 0.2])
    pruned = torch.tensor([False, True, True, True])
    targets, sources = algorithm.pair_targets_with_sources(imp, pruned, algorithm.reset_generator(0, 10, 0))
    assert targets.tolist() == [1, 2, 3]
    assert sources.tolist() == [0, 0, 0]

    imp8 = torch.tensor([0.5, 3.0, 0.1, 2.0, 0.2, 1.5, 0.3, 0.4])
    pruned8 = torch.tensor([True, False, True, False, True, False, True, True])  # kept 1, 3, 5
    targets, sources = algorithm.pair_targets_with_sources(imp8, pruned8, algorithm.reset_generator(0, 10, 0))
    assert targets.tolist() == [0, 2, 4, 6, 7]
    assert sorted(sources.tolist()) == sorted([1, 3, 5, 1, 3])  # cyclic in importance order: 1, 3, 5, 1, 3
    assert not set(sources.tolist()) & set(targets.tolist())


def test_pairing_is_a_function_of_seed_step_and_module():
    imp = torch.arange(16, 0, -1).float() / 8.5
    pruned = torch.zeros(16, dtype=torch.bool)
    pruned[8:] = True

    def pairing(seed, step, module):
        return algorithm.pair_targets_with_sources(imp, pruned, algorithm.reset_generator(seed, step, module))[1].tolist()

    assert pairing(3, 100, 7) == pairing(3, 100, 7)
    others = {tuple(pairing(3, 100, 8)), tuple(pairing(3, 200, 7)), tuple(pairing(4, 100, 7))}
    assert len(others | {tuple(pairing(3, 100, 7))}) > 1  # 8! orderings: a change of any input reshuffles
    assert sorted(pairing(3, 100, 7)) == list(range(8))


def test_average_scores_applies_pairs_in_ascending_target_order():
    logits = torch.tensor([0.0, 2.0, 4.0, 6.0])
    # j=1: (2 + 0) / 2 = 1 -> s1 = s0 = 1;  j=2: (4 + 1) / 2 = 2.5 -> s2 = s0 = 2.5
    out = algorithm.average_scores(logits, targets=[2, 1], sources=[0, 0])
    assert out.tolist() == [2.5, 1.0, 2.5, 6.0]
    assert logits.tolist() == [0.0, 2.0, 4.0, 6.0]  # input untouched


def test_plan_reset_touches_only_modules_with_pruned_ranks():
    imp = torch.tensor([[3.9, 0.05, 0.03, 0.02], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # threshold 0.95 * 16 = 15.2; sorted cumsum 3.9, 4.9, ..., 14.9, 15.9: position 13 (module 3 rank 3) on
    plans = algorithm.plan_reset(imp, keep=0.95, seed=0, step=10)
    assert [p.module_index for p in plans] == [0, 3]
    assert plans[0].targets == [1, 2, 3] and plans[0].sources == [0, 0, 0]
    assert plans[1].targets == [3] and plans[1].sources == [0]  # the top kept rank; ties: lowest index
    again = algorithm.plan_reset(imp, keep=0.95, seed=0, step=10)
    assert again == plans
