"""float64 range handling is the same on the numpy and the dask paths.

Regression tests (review R1): the dask statistics had none of the range handling of
the numpy paths. Dask ``ProcrustesAligner`` gave wrong maps for rows of 1e-160 and
garbage below (numpy raised), dask ``GeneralizedProcrustes`` gave garbage for rows
of 1e-165 (numpy rescales its rows) and refused rows of 1e160. And numpy Procrustes
refused rows of 1e-150 although their products (~1e-300) are normal float64 numbers:
``TINY_CROSS64`` was 2⁻⁹⁶⁹, documented as the subnormal limit (it is 2⁻¹⁰²²).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

da = pytest.importorskip("dask.array")

from posthoc_align import ProcrustesAligner, _stats  # noqa: E402
from posthoc_align import generalized_procrustes as gp  # noqa: E402
from posthoc_align.generalized_procrustes import GeneralizedProcrustes  # noqa: E402

UNDERFLOW = r"of language 'fr' with their pivot partners underflow float64"
OVERFLOW = r"of language 'fr' with their pivot partners overflowed float64"


def _rotated_pair(n: int = 30, d: int = 5, seed: int = 0):
    """ "en" rows and "fr" rows that are a rotated, shifted, noisy copy of them."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, d))
    Q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    X = np.vstack([A, A @ Q + 3.0 + 0.01 * rng.normal(size=(n, d))])
    return X, np.array(["en"] * n + ["fr"] * n), np.tile(np.arange(n), 2)


def _three_languages(n: int = 60, d: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    S = rng.normal(size=(n, d))
    X = np.vstack(
        [
            (S + 0.2 * rng.normal(size=S.shape)) @ np.linalg.qr(rng.normal(size=(d, d)))[0]
            for _ in range(3)
        ]
    )
    return X, np.repeat(["a", "b", "c"], n), np.tile(np.arange(n), 3)


def _dask(X, chunks=20):
    return da.from_array(X, chunks=(chunks, -1))


def _procrustes(X, L, P):
    return ProcrustesAligner(pivot="en").fit(X, languages=L, pair_ids=P)


def test_tiny_cross64_is_the_smallest_normal_float64():
    assert _stats.TINY_CROSS64 == np.finfo(np.float64).tiny == 2.0**-1022


@pytest.mark.parametrize("dask", [False, True])
def test_float64_at_1e_150_is_paired(dask):
    # products ~1e-300 are normal float64 numbers: numpy refused them (TINY_CROSS64 2⁻⁹⁶⁹)
    X, L, P = _rotated_pair()
    ref = _procrustes(X, L, P).rotations_
    Xs = X * 1e-150
    W = _procrustes(_dask(Xs) if dask else Xs, L, P).rotations_
    np.testing.assert_allclose(W, ref, atol=1e-12)


def test_float64_at_1e_150_streamed_pairs_on_the_row_stores():
    # partners in different batches: the products run on the stored, centred rows
    X, L, P = _rotated_pair()
    n = len(P) // 2
    ref = _procrustes(X, L, P).rotations_
    est = ProcrustesAligner(pivot="en")
    for sl in (slice(n, 2 * n), slice(0, n)):  # "fr" waits for its pivot partners
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # one-language first batch
            est.partial_fit(X[sl] * 1e-150, languages=L[sl], pair_ids=P[sl])
    np.testing.assert_allclose(est.rotations_, ref, atol=1e-12)
    est = ProcrustesAligner(pivot="en")
    with pytest.raises(ValueError, match=UNDERFLOW):
        for sl in (slice(n, 2 * n), slice(0, n)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                est.partial_fit(X[sl] * 1e-200, languages=L[sl], pair_ids=P[sl])


@pytest.mark.parametrize("scale", [1e-160, 1e-165, 1e-200])
def test_dask_procrustes_underflow_raises_like_numpy(scale):
    # was: max|W − W_ref| 5e-5 at 1e-160, 1.4 (garbage) below, no error
    X, L, P = _rotated_pair()
    with pytest.raises(ValueError, match=UNDERFLOW):
        _procrustes(X * scale, L, P)
    est = ProcrustesAligner(pivot="en")
    with pytest.raises(ValueError, match=UNDERFLOW + r".*multiply X by a constant"):
        est.fit(_dask(X * scale), languages=L, pair_ids=P)
    assert not hasattr(est, "rotations_")  # all or nothing


@pytest.mark.parametrize("seed", [0, 1])
def test_numpy_and_dask_agree_on_where_the_underflow_error_starts(seed):
    X, L, P = _rotated_pair(seed=seed)
    outcome = {}
    for scale in np.logspace(-153.5, -155.5, 9):
        row = []
        for data in (X * scale, _dask(X * scale)):
            try:
                _procrustes(data, L, P)
                row.append("ok")
            except ValueError as exc:
                assert "underflow float64" in str(exc)
                row.append("error")
        assert row[0] == row[1], (scale, row)
        outcome[scale] = row[0]
    # the boundary (largest products at the smallest normal float64) is in the sweep
    assert set(outcome.values()) == {"ok", "error"}


@pytest.mark.parametrize("scale", [1e155, 1e160])
def test_dask_procrustes_overflow_raises_the_numpy_error(scale):
    X, L, P = _rotated_pair()
    with pytest.raises(ValueError, match=OVERFLOW):
        _procrustes(X * scale, L, P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's overflow warnings from the dask tasks
        with pytest.raises(ValueError, match=OVERFLOW + r".*divide X by a constant"):
            _procrustes(_dask(X * scale), L, P)


def test_normal_scale_procrustes_takes_no_extra_pass(monkeypatch):
    # the underflow check reads the rows again only when max|S| < n · TINY_CROSS64
    X, L, P = _rotated_pair()
    calls = []
    orig = _stats.cross_underflows

    def spy(big, n, extremes):
        def counted():
            calls.append(n)
            return extremes()

        return orig(big, n, counted)

    monkeypatch.setattr(_stats, "cross_underflows", spy)
    _procrustes(X * 1e-100, L, P)
    _procrustes(_dask(X * 1e-100), L, P)
    assert calls == []
    with pytest.raises(ValueError, match=UNDERFLOW):
        _procrustes(_dask(X * 1e-200), L, P)
    assert calls == [len(P) // 2]


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("scale", [1e-165, 1e-200, 1e-300, 1e160, 1e300])
def test_dask_gpa_extreme_scales_give_the_maps_of_unit_rows(scale, center):
    # was: max|W − W_ref| 1.6 at 1e-165 and 1e-200, a ValueError at 1e160
    X, L, P = _three_languages()
    ref = GeneralizedProcrustes(center=center).fit(X, languages=L, pair_ids=P)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the objective (~1e600) overflows to inf
        g = GeneralizedProcrustes(center=center).fit(_dask(X * scale, 50), languages=L, pair_ids=P)
        gn = GeneralizedProcrustes(center=center).fit(X * scale, languages=L, pair_ids=P)
    np.testing.assert_allclose(g.rotations_, ref.rotations_, atol=1e-12)
    np.testing.assert_allclose(g.rotations_, gn.rotations_, atol=1e-12)
    np.testing.assert_allclose(g.objective_[-1], gn.objective_[-1], rtol=1e-9)


@pytest.mark.parametrize("scale", [1e-200, 1e160])
def test_dask_gpa_rows_far_from_the_first_rows_scale(scale, monkeypatch):
    # X[0] = 0 says nothing of the rows' scale: the rare path measures it (one pass)
    # and forms the products again on rows of unit scale
    X, L, P = _three_languages()
    X = X - X[0]
    ref = GeneralizedProcrustes().fit(X, languages=L, pair_ids=P)
    stats = []
    orig = gp._gpa_stats_dask
    monkeypatch.setattr(gp, "_gpa_stats_dask", lambda *a: stats.append(orig(*a)) or stats[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # at 1e160 the first pass overflows (discarded)
        g = GeneralizedProcrustes().fit(_dask(X * scale, 50), languages=L, pair_ids=P)
        gn = GeneralizedProcrustes().fit(X * scale, languages=L, pair_ids=P)
    np.testing.assert_allclose(g.rotations_, ref.rotations_, atol=1e-12)
    assert stats[0]["exponent"] != 0
    np.testing.assert_allclose(g.objective_[-1], gn.objective_[-1], rtol=1e-9)


def test_dask_gpa_normal_scale_is_one_unscaled_pass(monkeypatch):
    import dask

    X, L, P = _three_languages()
    n_compute = []
    orig = dask.compute
    monkeypatch.setattr(dask, "compute", lambda *a, **k: n_compute.append(1) or orig(*a, **k))
    stats = gp._gpa_stats_dask(_dask(X, 50), L, P, True)
    assert stats["exponent"] == 0 and len(n_compute) == 1
