"""benchmarks/reset_scaling.py's cost-model fit: non-negative least squares in numpy (scipy is not a dependency;
clipping a plain least-squares solution gave a 2455% median error once two features were nearly collinear)."""
import itertools
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import reset_scaling  # noqa: E402


def supported_solutions(A, b):
    """The least-squares solution on every support set: the non-negative ones include the optimum."""
    for k in range(A.shape[1] + 1):
        for support in itertools.combinations(range(A.shape[1]), k):
            z = np.zeros(A.shape[1])
            if support:
                z[list(support)] = np.linalg.lstsq(A[:, list(support)], b, rcond=None)[0]
            yield z


def test_nnls_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(100):
        A, b = rng.normal(size=(20, 4)), rng.normal(size=20)
        best = min(np.sum((A @ z - b) ** 2) for z in supported_solutions(A, b) if (z >= -1e-12).all())
        x = reset_scaling.nnls(A, b)
        assert (x >= 0).all() and abs(np.sum((A @ x - b) ** 2) - best) < 1e-8


def test_nnls_with_collinear_features_fits_like_one_feature():
    t = np.linspace(1, 2, 30)
    A = np.stack([t, t, t / 2], axis=1)  # the K*S and K*S/W columns at W = 1, and W = 2
    b = 3 * t
    assert np.allclose(A @ reset_scaling.nnls(A, b), b)
