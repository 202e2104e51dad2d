"""Property-based fuzzing of BeamLoRAConfig.validate() and the pure algorithm in algorithm.py (issue 8).

The oracles are the spec (docs/method.md sections 2-4) and the labels the strategies attach to what they
generate; expected values are computed here in plain Python (exact Fractions, math), not by the code under
test. derandomize=True: every CI run tries the same examples, so a failure reproduces.
"""
import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from beamlora_ds import BeamLoRAConfig, ConfigError
from beamlora_ds.method import algorithm

FUZZ = settings(deadline=None, max_examples=200, derandomize=True, database=None)
FUZZ_CONFIG = settings(deadline=None, max_examples=300, derandomize=True, database=None)
NAN, INF = float("nan"), float("inf")


class _Huge:
    """Stands for 10**5000 while hypothesis holds it (it cannot repr() the int itself); see materialize()."""

    def __repr__(self):
        return "10**5000"


HUGE = _Huge()  # an int with no repr() in Python >= 3.11: validate() must still build its messages


def materialize(value):
    if isinstance(value, _Huge):
        return 10 ** 5000
    return [materialize(v) for v in value] if isinstance(value, list) else value


ODD = st.sampled_from(["1", "", "score", [], [3], (), True, False, b"x", 1j, None])  # wrong types


# ---------------------------------------------------------------------------------------------- config
def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
        return True
    except Exception:
        return False


def labelled(valid, invalid):
    """(value, is_valid) pairs: the label is the oracle, written from the field's documented domain."""
    return st.one_of(valid.map(lambda v: (v, True)), invalid.map(lambda v: (v, False)))


def positive_finite():
    return st.one_of(st.floats(min_value=0, exclude_min=True, allow_infinity=False),
                     st.integers(1, 10 ** 300))


def not_positive_finite():
    return st.one_of(st.floats(max_value=0), st.just(NAN), st.just(INF), st.integers(max_value=0),
                     st.sampled_from([10 ** 400, HUGE]), ODD)  # ints too large for a float are not usable


NON_INT = st.one_of(st.floats(), ODD)
VALID = {  # each field's documented domain
    "r": st.one_of(st.integers(2, 2 ** 70), st.just(HUGE)),
    "alpha": positive_finite(),
    "tau": positive_finite(),
    "dropout": st.one_of(st.floats(0, 1, exclude_max=True), st.just(0)),
    "p0": st.one_of(st.floats(0, 1, exclude_min=True), st.just(1)),
    "optimizer_state": st.sampled_from(["inherit", "keep"]),
    "importance": st.sampled_from(["score", "norm"]),
    "seed": st.integers(-2 ** 63, 2 ** 64 - 1),
    "target_modules": st.one_of(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=3),
                                st.just(("q_proj", "v_proj")), st.sampled_from([r".*\.(q|v)_proj$", "proj", ""])),
    "total_steps": st.one_of(st.integers(1, 10 ** 6), st.just(10 ** 30), st.just(HUGE)),
    "interval": st.one_of(st.integers(2, 10 ** 4), st.just(HUGE)),  # may still be too long: expected_invalid()
    "t_end": st.one_of(st.none(), st.integers(1, 10 ** 9), st.just(HUGE)),
}
INVALID = {  # out of the domain: 0, negative, huge, NaN/inf, wrong types
    "r": st.one_of(st.integers(max_value=1), NON_INT),
    "alpha": not_positive_finite(),
    "tau": not_positive_finite(),
    "dropout": st.one_of(st.floats(min_value=1), st.floats(max_value=0, exclude_max=True), st.just(NAN),
                         st.integers(min_value=1), st.integers(max_value=-1), ODD),
    "p0": st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.just(NAN),
                    st.integers(max_value=0), st.integers(min_value=2), ODD),
    "optimizer_state": st.one_of(st.text(max_size=8).filter(lambda s: s not in ("inherit", "keep")),
                                 st.just(["inherit"]), st.just(("keep",)), ODD),
    "importance": st.one_of(st.text(max_size=8).filter(lambda s: s not in ("score", "norm")),
                            st.just(["score"]), st.just(0), st.just(None)),
    "seed": st.one_of(st.integers(min_value=2 ** 64), st.integers(max_value=-2 ** 63 - 1), st.just(HUGE), NON_INT),
    "target_modules": st.sampled_from([[], [""], [1], ["q_proj", None], [HUGE], None, 5, 3.5, True, b"q_proj",
                                       "q_proj(", "a{99999999999}", "(" * 5000 + ")" * 5000]),
    "total_steps": st.one_of(st.integers(max_value=0), NON_INT),
    "interval": st.one_of(st.integers(max_value=1), NON_INT),
    "t_end": st.one_of(st.integers(max_value=0), st.floats(), st.sampled_from(["1", True, [5]])),
}
FIELDS = {name: labelled(VALID[name], INVALID[name]) for name in VALID}
FIELDS["target_modules"] = st.one_of(  # any string is a regular expression: valid iff re compiles it
    FIELDS["target_modules"], st.text(max_size=8).map(lambda s: (s, _compiles(s))))


def fields_named(error: ConfigError) -> set:
    """The field each listed problem starts with ("  - r=1: ...", "  - total_steps is not set ...")."""
    problems = str(error).split("\n  - ")[1:]
    return {re.match(r"[a-z_0-9]+", p).group() for p in problems}


def expected_invalid(drawn: dict) -> set:
    bad = {name for name, (_, ok) in drawn.items() if not ok}
    (interval, interval_ok), (total, total_ok) = drawn["interval"], drawn["total_steps"]
    if interval_ok and total_ok and interval > total // 2:  # no reset would ever happen
        bad.add("interval")
    (t_end, t_end_ok) = drawn["t_end"]
    if t_end_ok and total_ok and t_end is not None and t_end > total:  # the schedule would never finish
        bad.add("t_end")
    return bad


def check(drawn: dict):
    drawn = {name: (materialize(value), ok) for name, (value, ok) in drawn.items()}
    cfg = BeamLoRAConfig(**{name: value for name, (value, _) in drawn.items()})
    bad = expected_invalid(drawn)
    try:
        assert cfg.validate() is cfg
    except ConfigError as e:
        assert bad, f"a valid config was refused: {e}"
        assert fields_named(e) == bad, str(e)
        return
    assert not bad, f"accepted although {sorted(bad)} are invalid"


@FUZZ_CONFIG
@given(st.fixed_dictionaries(FIELDS))
def test_config_validate_accepts_or_names_every_bad_field(drawn):
    """Any mix of values: validate() passes iff every field is in its domain, else one ConfigError that
    names exactly the bad fields. Any other exception (TypeError, OverflowError, ...) fails the test."""
    check(drawn)


VALID_BASE = {name: (value, True) for name, value in dict(
    r=8, alpha=16.0, tau=0.05, dropout=0.0, p0=0.9, optimizer_state="inherit", importance="score", seed=0,
    target_modules=["q_proj"], total_steps=10_000, interval=100, t_end=None).items()}
assert set(VALID_BASE) == set(FIELDS)
ONE_BAD = st.sampled_from(sorted(INVALID)).flatmap(lambda name: INVALID[name].map(lambda value: (name, value)))


@FUZZ_CONFIG
@given(st.one_of(ONE_BAD, st.integers(5001, 10 ** 9).map(lambda t: ("interval", t))))
def test_config_one_bad_field_is_named(bad):
    """A single bad value in an otherwise good config is reported, naming that field only."""
    name, value = bad
    drawn = {**VALID_BASE, name: (materialize(value), False)}
    assert expected_invalid(drawn) == {name}
    check(drawn)


@st.composite
def valid_configs(draw):
    total = draw(st.integers(4, 10 ** 7))
    values = {name: materialize(draw(VALID[name]))
              for name in VALID if name not in ("total_steps", "interval", "r", "seed", "t_end")}
    values.update(total_steps=total, interval=draw(st.integers(2, total // 2)), r=draw(st.integers(2, 512)),
                  seed=draw(VALID["seed"]), t_end=draw(st.one_of(st.none(), st.integers(1, total))))
    return BeamLoRAConfig(**values)


@FUZZ
@given(valid_configs())
def test_valid_config_round_trips_and_has_a_reset(cfg):
    """A valid config survives to_dict -> from_dict / BeamLoRAConfig(**d), and its schedule has at least one
    reset (step T) with a snapshot T//2 steps before it and a keep-fraction in [p0, 1]."""
    cfg.validate()
    d = cfg.to_dict()
    again = BeamLoRAConfig.from_dict(d).validate()
    assert again.to_dict() == d and BeamLoRAConfig(**d).to_dict() == d
    if not isinstance(cfg.target_modules, tuple):  # to_dict writes a tuple as a list
        assert again == cfg
    T = cfg.interval
    assert algorithm.is_reset_step(T, T, cfg.total_steps)
    assert algorithm.is_snapshot_step(T - T // 2, T, cfg.total_steps) and 1 <= T - T // 2 < T
    assert cfg.resolved_t_end >= 1
    keep = algorithm.keep_fraction(T, cfg.p0, cfg.resolved_t_end)
    assert cfg.p0 - 1e-12 <= keep <= 1.0


# -------------------------------------------------------------------------------------------- schedule
@FUZZ
@given(p0=st.floats(1e-12, 1.0), t_end=st.integers(1, 10 ** 7), a=st.integers(1, 3 * 10 ** 7),
       b=st.integers(1, 3 * 10 ** 7))
def test_keep_fraction_rises_from_p0_to_one(p0, t_end, a, b):
    """p(t) is non-decreasing in t (fewer ranks pruned as training goes on), in [p0, 1] and > 0, equal to p0
    at t = 1 and exactly 1 from t = T_end + 1 on (cos(pi) = -1)."""
    a, b = sorted((a, b))
    pa, pb = algorithm.keep_fraction(a, p0, t_end), algorithm.keep_fraction(b, p0, t_end)
    assert pa <= pb
    assert 0 < pa and p0 - 1e-12 <= pa <= 1.0
    assert math.isclose(algorithm.keep_fraction(1, p0, t_end), p0, rel_tol=0, abs_tol=1e-12)
    assert algorithm.keep_fraction(t_end + 1 + a, p0, t_end) == 1.0


def test_keep_fraction_hand_values():
    """Hand-computed from p(t) = 1 - (1 - p0)(1 + cos(pi min(t-1, T_end) / T_end)) / 2."""
    assert math.isclose(algorithm.keep_fraction(6, 0.8, 10), 0.9)  # halfway: cos(pi/2) = 0
    assert math.isclose(algorithm.keep_fraction(2, 0.8, 3), 0.85)  # cos(pi/3) = 1/2: 1 - 0.2 * 0.75
    assert math.isclose(algorithm.keep_fraction(3, 0.6, 3), 0.9)  # cos(2pi/3) = -1/2: 1 - 0.4 * 0.25
    assert algorithm.keep_fraction(4, 0.6, 3) == 1.0


@FUZZ
@given(interval=st.integers(2, 40), total=st.integers(1, 400))
def test_reset_and_snapshot_steps_follow_the_spec(interval, total):
    """Resets at kT for k >= 1 while T steps remain (k <= total // T - 1); snapshots at kT - T//2."""
    steps = range(1, total + interval + 1)
    resets = [t for t in steps if algorithm.is_reset_step(t, interval, total)]
    snapshots = [t for t in steps if algorithm.is_snapshot_step(t, interval, total)]
    assert resets == [k * interval for k in range(1, total // interval)]
    assert snapshots == [t - interval // 2 for t in resets]
    assert all(1 <= s < t for s, t in zip(snapshots, resets))


# ------------------------------------------------------------------------------------------ importance
@FUZZ
@given(rows=st.integers(1, 5).flatmap(lambda r: st.lists(
           st.lists(st.floats(-1e4, 1e4, width=32), min_size=r, max_size=r), min_size=1, max_size=5)),
       tau=st.floats(1e-3, 10))
def test_score_importance_is_a_weighting_that_sums_to_r(rows, tau):
    """I = r softmax(s / tau): same shape, non-negative, each row sums to r, order-preserving in s."""
    logits = torch.tensor(rows)
    imp = algorithm.score_importance(logits, tau)
    n, r = logits.shape
    assert imp.shape == (n, r) and bool(torch.isfinite(imp).all()) and bool((imp >= 0).all())
    assert torch.allclose(imp.double().sum(dim=1), torch.full((n,), float(r), dtype=torch.float64), rtol=1e-5)
    for m in range(n):
        for i in range(r):
            for j in range(r):
                if rows[m][i] > rows[m][j]:
                    assert imp[m, i] >= imp[m, j] - 1e-6 * r
                elif rows[m][i] == rows[m][j]:
                    assert math.isclose(imp[m, i], imp[m, j], rel_tol=1e-6, abs_tol=1e-30)


SQ = st.one_of(st.just(0.0), st.floats(0, 2.0 ** 100, width=32))


@FUZZ
@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 6)), data=st.data())
def test_norm_importance_matches_products_of_norms(shape, data):
    """I_i = r ||a_i|| ||b_i|| / sum_j ||a_j|| ||b_j|| (uniform 1 when the row is all zero), from sums of squares."""
    n, r = shape
    a = data.draw(st.lists(st.lists(SQ, min_size=r, max_size=r), min_size=n, max_size=n))
    b = data.draw(st.lists(st.lists(SQ, min_size=r, max_size=r), min_size=n, max_size=n))
    imp = algorithm.norm_importance(torch.tensor(a), torch.tensor(b))
    assert imp.shape == (n, r)
    for m in range(n):
        raw = [math.sqrt(a[m][i]) * math.sqrt(b[m][i]) for i in range(r)]
        total = math.fsum(raw)
        want = [1.0] * r if total == 0 else [r * x / total for x in raw]
        for got, w in zip(imp[m].tolist(), want):
            assert math.isclose(got, w, rel_tol=1e-5, abs_tol=1e-6)


@FUZZ
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 6)), data=st.data(),
       bad=st.sampled_from([NAN, INF, -INF]), tau=st.floats(1e-2, 1))
def test_non_finite_inputs_never_give_a_silent_plan(shape, data, bad, tau):
    """A NaN/Inf score or sum of squares makes its row non-finite and plan_reset refuses it with ValueError
    (the controller skips such resets). Only -inf logits are meaningful: weight exactly 0, row still sums to r."""
    n, r = shape
    m, i = data.draw(st.integers(0, n - 1)), data.draw(st.integers(0, r - 1))
    logits = torch.tensor(data.draw(st.lists(st.lists(st.floats(-5, 5, width=32), min_size=r, max_size=r),
                                             min_size=n, max_size=n)))
    logits[m, i] = bad
    imp = algorithm.score_importance(logits, tau)
    finite_rows = torch.isfinite(imp).all(dim=1)
    if bad == -INF and r > 1:
        assert bool(finite_rows.all()) and imp[m, i] == 0
        assert math.isclose(float(imp[m].double().sum()), r, rel_tol=1e-5)
    else:
        assert not bool(finite_rows[m])
        with pytest.raises(ValueError, match="finite"):
            algorithm.plan_reset(imp, 0.9, 0, 10)

    if bad != -INF:  # a sum of squares is >= 0: NaN and +inf are the ways it goes wrong
        a_sq, b_sq = logits.abs() ** 2, torch.ones(n, r)
        a_sq[m, i] = bad
        norm = algorithm.norm_importance(a_sq, b_sq)
        assert not bool(torch.isfinite(norm[m]).all())  # not silently uniform
        with pytest.raises(ValueError, match="finite"):
            algorithm.plan_reset(norm, 0.9, 0, 10)


@pytest.mark.parametrize("keep", [NAN, INF, -INF])
def test_non_finite_keep_is_refused(keep):
    with pytest.raises(ValueError, match="finite"):
        algorithm.plan_reset(torch.ones(2, 4), keep, 0, 10)


# -------------------------------------------------------------------------------------------- selection
DYADIC = st.sampled_from([k / 8 for k in range(0, 65)])  # sums of these are exact in float32 and float64


@st.composite
def importance_cases(draw):
    """(importance (N, r), exact): ties, zeros, equal rows, peaked rows, arbitrary floats, real score weights."""
    n, r = draw(st.integers(1, 6)), draw(st.integers(1, 8))
    kind = draw(st.sampled_from(["dyadic", "ties", "equal_rows", "zeros", "peaked", "float", "score"]))
    row = lambda values: draw(st.lists(values, min_size=r, max_size=r))  # noqa: E731
    if kind == "dyadic":
        rows = [row(DYADIC) for _ in range(n)]
    elif kind == "ties":
        rows = [row(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(n)]
    elif kind == "equal_rows":
        rows = [row(DYADIC)] * n
    elif kind == "zeros":
        rows = [[0.0] * r for _ in range(n)]
    elif kind == "peaked":
        rows = [[0.0] * r for _ in range(n)]
        for m in range(n):
            rows[m][draw(st.integers(0, r - 1))] = float(r)
    elif kind == "float":
        rows = [row(st.floats(0, 100, width=32)) for _ in range(n)]
    else:
        logits = torch.tensor([row(st.floats(-1, 1, width=32)) for _ in range(n)])
        return algorithm.score_importance(logits, draw(st.sampled_from([0.03, 0.05, 0.5]))), False
    return torch.tensor(rows, dtype=torch.float32), kind not in ("float",)


KEEP = st.one_of(st.sampled_from([k / 64 for k in range(1, 65)]), st.floats(0, 1, exclude_min=True))


def spec_pruned(values: list, keep: float) -> set:
    """docs/method.md section 4, step 1, in exact arithmetic: sort descending (ties: lower global index first), the
    first position whose cumulative sum exceeds p N r and all after it are pruned; a wiped module keeps its top
    rank."""
    n, r = len(values), len(values[0])
    if keep >= 1:
        return set()
    flat = [v for row in values for v in row]
    order = sorted(range(n * r), key=lambda f: (-flat[f], f))
    threshold, total, pruned = Fraction(keep * n * r), Fraction(0), set()
    for pos, f in enumerate(order):
        total += Fraction(flat[f])
        if total > threshold:
            pruned = {divmod(g, r) for g in order[pos:]}
            break
    for m in range(n):
        if all((m, i) in pruned for i in range(r)):
            pruned.discard((m, top_rank(values[m])))
    return pruned


def top_rank(row: list) -> int:
    return min(range(len(row)), key=lambda i: (-row[i], i))


def boundary_keeps(values: list):
    """Keep-fractions whose threshold p N r lands on a cumulative sum: "exceeds" must be strict there."""
    n, r = len(values), len(values[0])
    flat = sorted((v for row in values for v in row), reverse=True)
    sums = [math.fsum(flat[:q]) for q in range(1, n * r + 1)]
    keeps = sorted({c / (n * r) for c in sums if 0 < c < n * r and c / (n * r) * n * r == c})
    return st.sampled_from(keeps) if keeps else KEEP


@FUZZ
@given(case=importance_cases(), data=st.data(), seed=st.integers(-2 ** 63, 2 ** 64 - 1),
       step=st.integers(1, 10 ** 9))
def test_plan_reset_invariants(case, data, seed, step):
    """Targets and sources disjoint, in range, same length; targets are exactly the globally pruned ranks
    (the spec's top-p rule, checked exactly when sums are exact); sources are the module's top kept ranks,
    reused cyclically; a module keeps its top rank; same (seed, step) -> same plan."""
    importance, exact = case
    values = importance.tolist()
    n, r = importance.shape
    keep = data.draw(st.one_of(boundary_keeps(values), KEEP), label="keep")
    plans = algorithm.plan_reset(importance, keep, seed, step)
    pruned = {(p.module_index, j) for p in plans for j in p.targets}

    assert [p.module_index for p in plans] == sorted({p.module_index for p in plans})
    for p in plans:
        assert 0 <= p.module_index < n and p.targets
        assert p.targets == sorted(set(p.targets)) and all(0 <= j < r for j in p.targets)
        assert len(p.sources) == len(p.targets) and all(0 <= s < r for s in p.sources)
        assert not set(p.targets) & set(p.sources)
        assert top_rank(values[p.module_index]) not in p.targets
        kept = sorted((i for i in range(r) if i not in p.targets), key=lambda i: (-values[p.module_index][i], i))
        assert sorted(p.sources) == sorted(kept[i % len(kept)] for i in range(len(p.targets)))

    flat = [v for row in values for v in row]
    position = {divmod(f, r): pos for pos, f in enumerate(sorted(range(n * r), key=lambda f: (-flat[f], f)))}
    kept_non_top = [(m, i) for m in range(n) for i in range(r) if (m, i) not in pruned and i != top_rank(values[m])]
    if pruned and kept_non_top:  # pruned is a suffix of the global order (up to rescued top ranks)
        assert max(position[x] for x in kept_non_top) < min(position[x] for x in pruned)
    if keep >= 1:
        assert plans == []
    if exact:
        assert pruned == spec_pruned(values, keep)

    assert algorithm.plan_reset(importance.clone(), keep, seed, step) == plans
    other = algorithm.plan_reset(importance, keep, seed + 1, step)  # the seed only reshuffles the pairing
    assert [(p.module_index, p.targets, sorted(p.sources)) for p in other] == \
           [(p.module_index, p.targets, sorted(p.sources)) for p in plans]


def test_a_module_with_every_rank_pruned_has_no_source():
    with pytest.raises(ValueError, match="no source"):
        algorithm.pair_targets_with_sources(torch.ones(3), torch.ones(3, dtype=torch.bool), algorithm.reset_generator(0, 1, 0))


# --------------------------------------------------------------------------------------- score averaging
@st.composite
def pairings(draw):
    """Logits of one module and a plan-shaped pairing: distinct targets in any order, sources outside them."""
    r = draw(st.integers(2, 10))
    logits = draw(st.lists(st.floats(-100, 100, width=32), min_size=r, max_size=r))
    targets = draw(st.lists(st.integers(0, r - 1), unique=True, max_size=r - 1))
    rest = [i for i in range(r) if i not in targets]
    sources = [draw(st.sampled_from(rest)) for _ in targets]
    return logits, targets, sources


@FUZZ
@given(pairings(), st.sampled_from([0.03, 0.05, 1.0]))
def test_average_scores_follows_the_spec(case, tau):
    """docs/method.md section 4, step 5: for pairs in ascending j, s_j and s_src both become (s_j + s_src) / 2 of the
    then-current values. Same shape, input untouched, other logits unchanged, the sum is conserved, importance still
    sums to r."""
    logits, targets, sources = case
    before = torch.tensor(logits)
    out = algorithm.average_scores(before, targets, sources)
    assert out.shape == before.shape and out.dtype == before.dtype
    assert before.tolist() == logits

    want = [Fraction(x) for x in logits]
    for j, s in sorted(zip(targets, sources)):
        want[j] = want[s] = (want[j] + want[s]) / 2
    touched = set(targets) | set(sources)
    for i, (got, w) in enumerate(zip(out.tolist(), want)):
        if i in touched:
            assert math.isclose(got, float(w), rel_tol=1e-5, abs_tol=1e-4)
        else:
            assert got == logits[i]
    assert math.isclose(out.double().sum(), math.fsum(logits), abs_tol=1e-3)
    if touched:
        lo, hi = min(logits[i] for i in touched), max(logits[i] for i in touched)
        assert all(lo <= out[i] <= hi for i in touched)
    if len(set(sources)) == len(sources):  # independent pairs: each target ends equal to its source
        assert all(out[j] == out[s] for j, s in zip(targets, sources))
    imp = algorithm.score_importance(out[None], tau)
    assert math.isclose(float(imp.double().sum()), len(logits), rel_tol=1e-5)
