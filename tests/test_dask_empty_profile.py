"""Empty dask input (0 rows, empty row chunks) and alignment_profile's test_fraction."""

import inspect
import warnings

import numpy as np
import pytest

import posthoc_align as pa
from posthoc_align.profile import alignment_profile

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

ESTIMATORS = [
    pa.LanguageMeanCentering,
    pa.LanguageStandardizer,
    pa.LSAR,
    pa.ProcrustesAligner,
    pa.GeneralizedProcrustes,
    pa.LanguageEraser,
    pa.LanguageAxes,
]

EMPTY = "Found array with 0 sample"


@pytest.fixture(autouse=True)
def _synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


def _paired(n=20, d=4):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n, d))
    X = np.vstack([base, base[:, ::-1] + 2.0, -base + 1.0]) + 0.05 * rng.normal(size=(3 * n, d))
    L = np.repeat(["en", "fr", "de"], n)
    P = np.tile(np.arange(n), 3)
    return X, L, P


def _kw(cls, pids):
    return {"pair_ids": pids} if "Procrustes" in cls.__name__ else {}


def _transform(est, X, L):
    if "languages" in inspect.signature(est.transform).parameters:
        return est.transform(X, languages=L)
    return est.transform(X)


def _empty_dask(d=4):
    return da.zeros((0, d), chunks=(5, -1))


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("method", ["fit", "partial_fit"])
def test_empty_dask_fit_is_the_numpy_error(cls, method):
    """A 0-row dask array: sklearn's clear error (as for numpy), not an internal one."""
    L, P = np.array([], dtype=str), np.array([], dtype=int)
    est = cls()
    with pytest.raises(ValueError, match=EMPTY) as numpy_err:
        getattr(cls(), method)(np.zeros((0, 4)), languages=L, **_kw(cls, P))
    with pytest.raises(ValueError, match=EMPTY) as dask_err:
        getattr(est, method)(_empty_dask(), languages=L, **_kw(cls, P))
    assert cls.__name__ in str(dask_err.value)
    assert str(dask_err.value).startswith(str(numpy_err.value).rstrip("."))
    assert not hasattr(est, "n_features_in_")  # rejected before any state was set


@pytest.mark.parametrize(
    "cls", [c for c in ESTIMATORS if c is not pa.GeneralizedProcrustes], ids=lambda c: c.__name__
)
def test_empty_dask_later_partial_fit_is_rejected_and_changes_nothing(cls):
    """An empty later batch: rejected as for numpy, and the fit stays as it was."""
    X, L, P = _paired()
    est = cls().partial_fit(da.from_array(X, chunks=(20, -1)), languages=L, **_kw(cls, P))
    before = _transform(est, X, L)
    before = np.asarray(before.compute() if hasattr(before, "compute") else before)
    with pytest.raises(ValueError, match=EMPTY):
        est.partial_fit(np.zeros((0, 4)), languages=L[:0], **_kw(cls, P[:0]))
    with pytest.raises(ValueError, match=EMPTY):
        est.partial_fit(_empty_dask(), languages=L[:0], **_kw(cls, P[:0]))
    after = _transform(est, X, L)
    np.testing.assert_array_equal(before, np.asarray(after))


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
def test_empty_dask_transform_raises_now_as_numpy(cls):
    """transform of a 0-row dask array: the numpy error, raised at the call (not at compute)."""
    X, L, P = _paired()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est = cls().fit(X, languages=L, **_kw(cls, P))
    with pytest.raises(ValueError, match=EMPTY):
        _transform(est, np.zeros((0, 4)), L[:0])
    with pytest.raises(ValueError, match=EMPTY):
        _transform(est, _empty_dask(), L[:0])


@pytest.mark.parametrize("cls", ESTIMATORS, ids=lambda c: c.__name__)
def test_empty_row_chunks_of_a_nonempty_dask_array(cls):
    """Row chunks of size 0 (as boolean indexing leaves them) fit and transform like numpy."""
    X, L, P = _paired()
    Xd = da.from_array(X, chunks=((0, 30, 0, 30, 0), (4,)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cls().fit(X, languages=L, **_kw(cls, P))
        est = cls().fit(Xd, languages=L, **_kw(cls, P))
    out = _transform(est, Xd, L)
    assert out.chunks[0] == Xd.chunks[0]
    got = out.compute()
    want = np.asarray(_transform(ref, X, L))
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_allclose(got, want, atol=1e-8)


def _profile_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2, 5))
    return X, np.repeat(["en", "fr", "de"], 20), np.tile(np.arange(20), 3)


@pytest.mark.parametrize("tf", [1.5, -0.5, 0.0, 1.0, 1, float("nan"), "0.5", True, None])
def test_profile_test_fraction_outside_open_unit_interval(tf):
    with pytest.raises(ValueError, match=r"test_fraction.*open interval \(0, 1\)"):
        alignment_profile(None, _profile_data(), metrics=("retrieval_cosine",), test_fraction=tf)


def test_profile_test_fraction_accepts_numpy_float():
    rows = alignment_profile(
        None,
        _profile_data(),
        {"centring": pa.LanguageMeanCentering()},
        metrics=("retrieval_cosine",),
        test_fraction=np.float32(0.25),
    )
    assert rows and all(np.isfinite(r["value"]) for r in rows)


def test_profile_test_fraction_accepts_a_0d_float_array():
    """np.array(0.5) worked before the check came in (regression review)."""
    rows = alignment_profile(
        None,
        _profile_data(),
        {"centring": pa.LanguageMeanCentering()},
        metrics=("retrieval_cosine",),
        test_fraction=np.array(0.5),
    )
    assert rows and all(np.isfinite(r["value"]) for r in rows)
