"""Procrustes maps are scale-free: they must stay right (or fail clearly) at any scale.

Regression tests for the float32 pair cross-products that overflowed (|x| ~ 1e19:
numpy's raw ``LinAlgError``) or fell into subnormals (|x| <= 1e-22: silently wrong
maps), and for ``orthogonal_map`` forming ``CᵀC`` unscaled (float64 data at 1e150).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from posthoc_align import ProcrustesAligner, RotateAlign, _stats
from posthoc_align.procrustes import orthogonal_map


def _rotated_pair(n: int = 12, d: int = 5, seed: int = 0):
    """ "en" rows and "fr" rows that are a rotated, shifted copy of them."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d))
    Q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    X = np.vstack([A, A @ Q + 3.0])
    L = np.array(["en"] * n + ["fr"] * n)
    P = np.tile(np.arange(n), 2)
    return X, L, P, A - A.mean(0)


@pytest.mark.parametrize("scale", [1e-22, 1e-30, 1e19, 1e30])
def test_float32_extreme_scales_give_the_scaled_map(scale):
    X, L, P, target = _rotated_pair()
    n = len(target)
    Xs = (X * scale).astype(np.float32)
    Z = ProcrustesAligner(pivot="en").fit_transform(Xs, languages=L, pair_ids=P)
    assert Z.dtype == np.float32 and np.isfinite(Z).all()
    np.testing.assert_allclose(Z[n:].astype(np.float64) / scale, target, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-25, 1e25])
@pytest.mark.parametrize("pivot_first", [True, False])
def test_float32_extreme_scales_streamed_pairs(scale, pivot_first):
    # partners in different batches: the products run on the row stores
    X, L, P, target = _rotated_pair()
    n = len(target)
    Xs = (X * scale).astype(np.float32)
    est = ProcrustesAligner(pivot="en")
    halves = [slice(0, n), slice(n, 2 * n)] if pivot_first else [slice(n, 2 * n), slice(0, n)]
    for sl in halves:
        est.partial_fit(Xs[sl], languages=L[sl], pair_ids=P[sl])
    Z = est.transform(Xs, languages=L)
    np.testing.assert_allclose(Z[n:].astype(np.float64) / scale, target, atol=1e-5)


def test_rotate_align_float32_stack_at_1e19():
    X, L, P, target = _rotated_pair()
    n = len(target)
    stack = np.stack([X, X], axis=1).astype(np.float32) * np.float32(1e19)
    Z = RotateAlign(layers=(-1,)).fit_transform(stack, languages=L, pair_ids=P)
    np.testing.assert_allclose(Z[n:, -1].astype(np.float64) / 1e19, target, atol=1e-5)


def test_float32_normal_scale_stays_in_float32(monkeypatch):
    # the float64 redo is a rare path: normal-scale data form their products once
    X, L, P, _ = _rotated_pair(n=64, d=8)
    dtypes = []
    orig = _stats.PairMoments._accumulate

    def spy(self, *args, cdt=None, **kwargs):
        dtypes.append(cdt)
        return orig(self, *args, cdt=cdt, **kwargs)

    monkeypatch.setattr(_stats.PairMoments, "_accumulate", spy)
    ProcrustesAligner(pivot="en").fit(X.astype(np.float32), languages=L, pair_ids=P)
    assert dtypes == [None]


def test_float64_at_1e150():
    X, L, P, target = _rotated_pair()
    n = len(target)
    Z = ProcrustesAligner(pivot="en").fit_transform(X * 1e150, languages=L, pair_ids=P)
    np.testing.assert_allclose(Z[n:] / 1e150, target, atol=1e-12)


@pytest.mark.parametrize("scale", [1e160, 1e-200])
def test_float64_out_of_range_products_raise_clearly(scale):
    X, L, P, _ = _rotated_pair()
    with pytest.raises(ValueError, match="does not depend on the scale of the data"):
        ProcrustesAligner(pivot="en").fit(X * scale, languages=L, pair_ids=P)


def test_float64_constant_language_is_not_an_underflow():
    # rows equal to their mean give a zero cross-product, not an underflow error
    X, L, P, _ = _rotated_pair()
    n = len(P) // 2
    X[n:] = 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = ProcrustesAligner(pivot="en").fit(X, languages=L, pair_ids=P)
    assert np.isfinite(est.rotations_).all()


@pytest.mark.parametrize("exponent", [-1000, -600, 600, 1000])
@pytest.mark.parametrize("rank", [5, 2])
def test_orthogonal_map_is_scale_free(exponent, rank):
    rng = np.random.default_rng(1)
    C = rng.normal(size=(5, rank)) @ rng.normal(size=(rank, 5))
    W = orthogonal_map(C)
    Ws = orthogonal_map(np.ldexp(C, exponent))
    np.testing.assert_allclose(Ws, W, atol=1e-10)
    np.testing.assert_allclose(Ws @ Ws.T, np.eye(5), atol=1e-12)


def test_orthogonal_map_non_finite_raises_clearly():
    C = np.eye(3)
    C[0, 1] = np.inf
    with pytest.raises(ValueError, match="does not depend on the scale of the data"):
        orthogonal_map(C)


def test_partial_fit_rejected_for_range_resets_the_stream():
    """A float64 batch whose products overflow is found while pairing, after the means
    took it: the stream is reset (NotFittedError after), never left half-updated."""
    from sklearn.exceptions import NotFittedError

    from posthoc_align import ProcrustesAligner

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4))
    L, P = np.repeat(["en", "fr"], 20), np.tile(np.arange(20), 2)
    est = ProcrustesAligner().partial_fit(X, languages=L, pair_ids=P)
    big = X * 1e160
    with pytest.raises(ValueError, match="reset"):
        est.partial_fit(big, languages=L, pair_ids=P + 100)
    with pytest.raises(NotFittedError):
        est.transform(X, languages=L)
