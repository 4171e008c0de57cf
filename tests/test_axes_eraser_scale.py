"""Scale and offset robustness of LanguageEraser / LanguageAxes; LanguageAxes streaming.

* LanguageEraser's numpy/torch fit shifts rows by a reference row, so a large
  common offset costs no precision (it equals an independent two-pass LEACE).
* LanguageAxes is scale-invariant at any scale the input dtype holds (float32
  scatters rescaled when their products over- or underflow; the eigenproblems
  and scores solved on rescaled scatters).
* LanguageAxes.partial_fit accepts a first batch too small for the axes and
  equals ``fit`` once the stream suffices.
"""

import pickle

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

import posthoc_align
from posthoc_align._covariance import ScatterMoments
from posthoc_align.axes import LanguageAxes
from posthoc_align.erasure import LanguageEraser

LANGS = np.array(["en", "fr", "de"])


def _leace(X, L):
    """Independent two-pass LEACE (Belrose et al. 2023, Thm 3.1), one-hot language."""
    langs = np.unique(L)
    Z = (L[:, None] == langs[None, :]).astype(float)
    Xc = X - X.mean(0)
    Sxx = Xc.T @ Xc / len(X)
    Sxz = Xc.T @ (Z - Z.mean(0)) / len(X)
    w, V = np.linalg.eigh(Sxx)
    W, Wp = V @ np.diag(w**-0.5) @ V.T, V @ np.diag(w**0.5) @ V.T
    U, s, _ = np.linalg.svd(W @ Sxz, full_matrices=False)
    U = U[:, s > 1e-10 * s.max()]
    return X - (Wp @ U @ U.T @ W @ Xc.T).T


def _offset_data(offset, n=600, d=16):
    rng = np.random.default_rng(0)
    L = rng.choice(LANGS, n)
    X = rng.normal(size=(n, d)) + (L[:, None] == LANGS) @ rng.normal(size=(3, d)) * 3
    return X + offset, L


# -- 1. LanguageEraser under a large common offset ------------------------------------
@pytest.mark.parametrize("offset", [1e3, 1e5])
def test_eraser_fit_is_exact_under_a_large_common_offset(offset):
    X, L = _offset_data(offset)
    est = LanguageEraser(device="cpu").fit(X, languages=L)
    # the rows themselves are rounded to ~1e-16 * offset; old code (the fitter fed raw
    # rows) was off by 5e-10 at 1e3 and 4.6e-6 at 1e5
    tol = 1e-14 * offset
    np.testing.assert_allclose(est.transform(X), _leace(X, L), rtol=0, atol=tol)
    Xc = X - X.mean(0)
    np.testing.assert_allclose(est.covariance_, Xc.T @ Xc / len(X), rtol=0, atol=tol)
    np.testing.assert_allclose(est.global_mean_, X.mean(0), rtol=1e-14, atol=0)


def test_eraser_stream_with_offset_survives_pickle_and_input_mutation():
    X, L = _offset_data(1e5)
    ref = _leace(X, L)
    Xa = X[:250].copy()
    est = LanguageEraser(device="cpu").partial_fit(Xa, languages=L[:250])
    Xa[:] = 0.0  # the reference row is the estimator's own copy, not a view of X
    est.partial_fit(X[250:400], languages=L[250:400])
    again = pickle.loads(pickle.dumps(est))  # fitter rebuilt about global_mean_
    assert not hasattr(again, "_fitter_shift")
    again.partial_fit(X[400:], languages=L[400:])
    np.testing.assert_allclose(again.transform(X), ref, rtol=0, atol=1e-9)
    est.partial_fit(X[400:], languages=L[400:])
    np.testing.assert_allclose(est.transform(X), ref, rtol=0, atol=1e-9)


def test_eraser_oracle_means_under_a_large_common_offset():
    X, L = _offset_data(1e5)
    est = LanguageEraser(oracle=True, device="cpu").fit(X, languages=L)
    means = np.stack([X[L == lab].mean(0) for lab in est.languages_])
    np.testing.assert_allclose(est.means_, means, rtol=1e-14, atol=0)
    Z = est.transform(X, languages=L)
    for lab in LANGS:
        np.testing.assert_allclose(Z[L == lab].mean(0), X.mean(0), rtol=1e-13, atol=0)


# -- 2. LanguageAxes at extreme scales -------------------------------------------------
def _axes_data():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(12, 5)) + rng.normal(size=5) * 3 for _ in range(3)])
    return X, np.repeat(["en", "fr", "de"], 12)


SCALES = [
    (np.float32, 1e-30),  # old: LinAlgError
    (np.float32, 1e-25),  # old: "within-language scatter is zero"
    (np.float32, 1e-22),  # old: silently different axes (0.066)
    (np.float32, 1e19),  # old: "array must not contain infs or NaNs"
    (np.float32, 1e30),
    (np.float64, 1e-150),  # old keep_neutral: scores all NaN, different output
    (np.float64, 1e-100),
    (np.float64, 1e150),
]


@pytest.mark.parametrize("mode", ["remove_sensitive", "keep_neutral"])
@pytest.mark.parametrize(("dtype", "scale"), SCALES)
def test_axes_are_scale_invariant(dtype, scale, mode):
    X, L = _axes_data()
    ref = LanguageAxes(mode=mode, device="cpu").fit(X, languages=L)
    Xs = (X * scale).astype(dtype)
    est = LanguageAxes(mode=mode, device="cpu").fit(Xs, languages=L)
    tol = 1e-4 if dtype is np.float32 else 1e-10
    Z = est.transform(Xs)
    assert Z.dtype == dtype
    np.testing.assert_allclose(Z.astype(float) / scale, ref.transform(X), rtol=0, atol=tol)
    np.testing.assert_allclose(est.sensitive_scores_, ref.sensitive_scores_, rtol=tol)
    np.testing.assert_allclose(
        np.abs(est.sensitive_axes_ @ ref.sensitive_axes_.T).diagonal(), 1.0, atol=tol
    )
    assert np.isfinite(est.neutral_scores_).all()
    np.testing.assert_allclose(est.neutral_scores_, ref.neutral_scores_, rtol=tol, atol=tol)
    np.testing.assert_allclose(
        np.abs(est.neutral_axes_ @ ref.neutral_axes_.T).diagonal(), 1.0, atol=tol
    )


@pytest.mark.parametrize("scale", [1e-30, 1e-22, 1e19, 1e30])
def test_scatter_moments_float32_at_extreme_scales(scale):
    X, L = _axes_data()
    labels, codes = np.unique(L, return_inverse=True)
    ref = ScatterMoments().update(torch.from_numpy(X), labels, codes)
    T = torch.from_numpy((X * scale).astype(np.float32))
    got = ScatterMoments().update(T, labels, codes)
    Xr = (X * scale).astype(np.float32).astype(float) / scale  # what float32 can hold
    ref = ScatterMoments().update(torch.from_numpy(Xr), labels, codes)
    np.testing.assert_allclose(got.within() / scale**2, ref.within(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.scatters() / scale**2, ref.scatters(), rtol=1e-5, atol=1e-5)


def test_scatter_moments_one_row_blocks_stay_on_the_fast_path(monkeypatch):
    # one row per language in a batch is exactly its own block mean: no rescaled redo
    from posthoc_align import _covariance

    calls = []
    real = _covariance._scaled_gram
    monkeypatch.setattr(_covariance, "_scaled_gram", lambda Y: calls.append(1) or real(Y))
    X, L = _axes_data()
    labels, codes = np.unique(L, return_inverse=True)
    s = ScatterMoments().update(torch.from_numpy(X.astype(np.float32)), labels, codes)
    s.update(torch.from_numpy(X[:1].astype(np.float32)), labels, codes[:1])
    assert calls == []


# -- 3. LanguageAxes.partial_fit over a small first batch ---------------------------
def _two_languages():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(10, 3)) + 4 * i for i in range(2)])
    return X, np.repeat(["en", "fr"], 10)


@pytest.mark.parametrize("mode", ["remove_sensitive", "keep_neutral"])
def test_axes_partial_fit_accepts_one_row_per_language_first(mode):
    X, L = _two_languages()
    first = [0, 10]
    rest = [i for i in range(20) if i not in first]
    ref = LanguageAxes(mode=mode).fit(X, languages=L)
    est = LanguageAxes(mode=mode).partial_fit(X[first], languages=L[first])
    with pytest.raises(NotFittedError, match=r"no axes yet.*2 row\(s\) for 2 languages"):
        est.transform(X)
    with pytest.raises(NotFittedError, match="no axes yet"):
        est.get_feature_names_out()
    est.partial_fit(X[rest], languages=L[rest])
    np.testing.assert_allclose(est.transform(X), ref.transform(X), atol=1e-10)
    np.testing.assert_allclose(est.sensitive_axes_, ref.sensitive_axes_, atol=1e-10)
    np.testing.assert_allclose(est.neutral_scores_, ref.neutral_scores_, rtol=1e-8, atol=1e-12)


def test_axes_partial_fit_waits_out_a_zero_scatter_then_saves_and_resumes(tmp_path):
    X, L = _two_languages()
    dup = [0, 0, 10, 10]  # more rows than languages, but every language's rows identical
    est = LanguageAxes().partial_fit(X[dup], languages=L[dup])
    with pytest.raises(NotFittedError, match="within-language scatter is zero"):
        est.transform(X)
    est.save(tmp_path / "pending")
    again = posthoc_align.load(tmp_path / "pending")
    with pytest.raises(NotFittedError, match="within-language scatter is zero"):
        again.transform(X)
    again.partial_fit(X, languages=L)
    ref = LanguageAxes().fit(np.vstack([X[dup], X]), languages=np.r_[L[dup], L])
    np.testing.assert_allclose(again.transform(X), ref.transform(X), atol=1e-10)


def test_axes_partial_fit_dask_small_first_batch():
    da = pytest.importorskip("dask.array")
    import dask

    X, L = _two_languages()
    first = [0, 10]
    rest = [i for i in range(20) if i not in first]
    ref = LanguageAxes().fit(X, languages=L)
    with dask.config.set(scheduler="synchronous"):
        est = LanguageAxes().partial_fit(
            da.from_array(X[first], chunks=(1, -1)), languages=L[first]
        )
        with pytest.raises(NotFittedError, match="no axes yet"):
            est.transform(X)
        est.partial_fit(da.from_array(X[rest], chunks=(6, -1)), languages=L[rest])
    np.testing.assert_allclose(est.transform(X), ref.transform(X), atol=1e-10)


def test_axes_fit_still_refuses_too_few_rows_and_stays_unfitted():
    X, L = _two_languages()
    est = LanguageAxes()
    with pytest.raises(ValueError, match="more rows than languages"):
        est.fit(X[[0, 10]], languages=L[[0, 10]])
    assert not hasattr(est, "_scatter") and not hasattr(est, "n_features_in_")
    with pytest.raises(NotFittedError):
        est.transform(X)
    with pytest.raises(ValueError, match="within-language scatter is zero"):
        est.fit(X[[0, 0, 10, 10]], languages=L[[0, 0, 10, 10]])
    assert not hasattr(est, "_scatter")


# -- 4. float64 rows whose scatter leaves float64's range: clear errors, all or nothing --
def _overflow_data():
    rng = np.random.default_rng(0)
    L = np.repeat(["a", "b"], 50)
    X = rng.normal(size=(100, 4)) + np.repeat(rng.normal(size=(2, 4)), 50, axis=0)
    return X, L


def _scatter_state(est):
    s = est._scatter
    return (
        list(s.labels),
        s.counts.copy(),
        s.moments.shift.copy(),
        s.moments.sums.copy(),
        s.scatter.copy(),
    )


def _assert_same_state(a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1:], b[1:], strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["numpy", "torch", "dask"])
def test_axes_fit_overflow_names_the_overflow_not_a_zero_scatter(kind):
    # old: "the within-language scatter is zero (every language's rows are identical)"
    X, L = _overflow_data()
    Xb = X * 1e160
    if kind == "torch":
        Xb = torch.from_numpy(Xb)
    elif kind == "dask":
        da = pytest.importorskip("dask.array")
        Xb = da.from_array(Xb, chunks=(30, -1))
    est = LanguageAxes()
    with pytest.raises(ValueError, match=r"overflows float64.*divide X by a constant"):
        est.fit(Xb, languages=L)
    assert not hasattr(est, "_scatter")


@pytest.mark.parametrize("mode", ["remove_sensitive", "keep_neutral"])
def test_axes_partial_fit_rejects_an_overflowing_batch_and_keeps_the_stream(mode):
    # old: the batch was silently added as NaN/inf, the solve skipped forever after
    # (counts_ and components_ frozen, transform serving stale axes)
    da = pytest.importorskip("dask.array")
    X, L = _overflow_data()
    est = LanguageAxes(mode=mode).partial_fit(X, languages=L)
    before = _scatter_state(est)
    comp = est.components_.copy()
    for bad, langs in [
        (X * 1e160, L),
        (da.from_array(X * 1e160, chunks=(30, -1)), L),
        (X * 1e160, np.repeat(["c", "d"], 50)),  # new languages are not registered either
    ]:
        with pytest.raises(ValueError, match=r"overflows float64.*divide X by a constant"):
            est.partial_fit(bad, languages=langs)
        _assert_same_state(_scatter_state(est), before)
        np.testing.assert_array_equal(est.components_, comp)
        np.testing.assert_array_equal(est.counts_, [50, 50])
    est.partial_fit(X[::2], languages=L[::2])  # the stream goes on
    ref = LanguageAxes(mode=mode).fit(np.vstack([X, X[::2]]), languages=np.r_[L, L[::2]])
    np.testing.assert_array_equal(est.counts_, ref.counts_)
    np.testing.assert_allclose(est.transform(X), ref.transform(X), atol=1e-10)
    # a fresh stream given such a batch keeps nothing of it
    fresh = LanguageAxes(mode=mode)
    with pytest.raises(ValueError, match="overflows float64"):
        fresh.partial_fit(X * 1e160, languages=L)
    fresh.partial_fit(X, languages=L)
    np.testing.assert_array_equal(fresh.counts_, [50, 50])


@pytest.mark.parametrize("scale", [1e-160, 1e-200])
@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_axes_float64_underflow_raises_instead_of_inexact_axes(scale, kind):
    # old: 1e-160 gave components_ off by 6e-4 and neutral_scores_ by 5e-3 silently;
    # 1e-200 said "the within-language scatter is zero" (false)
    X, L = _overflow_data()
    Xs = X * scale
    if kind == "dask":
        da = pytest.importorskip("dask.array")
        Xs = da.from_array(Xs, chunks=(30, -1))
    with pytest.raises(ValueError, match=r"underflows float64.*multiply X by a constant"):
        LanguageAxes().fit(Xs, languages=L)
    # a stream keeps such rows (later ones may vary more) but has no axes from them
    est = LanguageAxes().partial_fit(Xs, languages=L)
    assert not hasattr(est, "components_")
    with pytest.raises(NotFittedError, match=r"underflows float64.*multiplied by a constant"):
        est.transform(X)
    # 1e-146..1e-154 rows still work (their squares are normal float64)
    ref = LanguageAxes().fit(X, languages=L)
    got = LanguageAxes().fit(X * 1e-152, languages=L)
    np.testing.assert_allclose(got.sensitive_scores_, ref.sensitive_scores_, rtol=1e-9)
    np.testing.assert_allclose(got.neutral_scores_, ref.neutral_scores_, rtol=1e-9, atol=1e-12)


def test_axes_tiny_rows_without_lost_digits_are_not_an_underflow():
    X, L = _overflow_data()
    # identical tiny rows: an exactly zero scatter, not an underflow
    dup = [0, 0, 50, 50]
    est = LanguageAxes().partial_fit(X[dup] * 1e-200, languages=L[dup])
    with pytest.raises(NotFittedError, match="within-language scatter is zero"):
        est.transform(X)
    # tiny rows in a stream of normal rows: their deviations from the reference rows
    # are normal-sized, nothing is lost
    est = LanguageAxes().partial_fit(X, languages=L)
    est.partial_fit(X * 1e-200, languages=L)
    ref = LanguageAxes().fit(np.vstack([X, X * 1e-200]), languages=np.r_[L, L])
    np.testing.assert_allclose(est.transform(X), ref.transform(X), atol=1e-10)


def test_scatter_moments_merge_is_all_or_nothing():
    # old: merge added inf/NaN in place
    X, L = _overflow_data()
    labels, codes = np.unique(L, return_inverse=True)
    s = ScatterMoments().update(torch.from_numpy(X), labels, codes)
    big = ScatterMoments().update(torch.from_numpy(X * 1e152), labels, codes)
    before = (list(s.labels), s.counts.copy(), s.moments.sums.copy(), s.scatter.copy())
    with pytest.raises(ValueError, match="overflows float64"):
        for _ in range(200):  # each part is finite, their sum is not
            s.merge(big)
            before = (list(s.labels), s.counts.copy(), s.moments.sums.copy(), s.scatter.copy())
    assert np.isfinite(s.scatter).all()
    assert s.labels == before[0]
    for x, y in zip((s.counts, s.moments.sums, s.scatter), before[1:], strict=True):
        np.testing.assert_array_equal(x, y)


def test_scatter_moments_centred_scatter_does_not_overflow_below_the_range():
    # Q is finite (9.9e307) but a aᵀ is not (9.8e309): old scatters() gave -inf
    x = np.r_[0.0, np.full(99, 1e153)][:, None]
    s = ScatterMoments().update(torch.from_numpy(x), np.array(["a"]), np.zeros(100, dtype=int))
    np.testing.assert_allclose(s.within(), [[((x - x.mean()) ** 2).sum()]], rtol=1e-12)


def test_scatter_moments_far_apart_languages_keep_their_digits():
    # old: every language was shifted by the first language's first row, so Q − a aᵀ/n
    # cancelled catastrophically for a language far from it (2e-2 relative error)
    rng = np.random.default_rng(0)
    L = np.repeat([0, 1], 500)
    X = rng.normal(size=(1000, 3)) * 1e-3 + np.repeat([[0.0, 0, 0], [1e4, 0, 0]], 500, 0)
    ref = sum((X[L == g] - X[L == g].mean(0)).T @ (X[L == g] - X[L == g].mean(0)) for g in (0, 1))
    labels = np.array(["a", "b"])
    s = ScatterMoments().update(torch.from_numpy(X[:300]), labels, L[:300])
    s.update(torch.from_numpy(X[300:]), labels, L[300:])
    np.testing.assert_allclose(s.within(), ref, rtol=0, atol=1e-9 * np.abs(ref).max())
    again = ScatterMoments.from_state(*s.state())  # a loaded stream keeps the rule
    again.update(torch.from_numpy(X[700:701]), np.array(["c"]), np.array([0]))
    np.testing.assert_array_equal(again.moments.shift[2], X[700])


def test_axes_dask_far_apart_languages_keep_their_digits():
    """The dask path shifted every language by one shared row (review): LanguageAxes on
    languages 1e4 apart with a 1e-3 spread must match the numpy fit, streamed or not."""
    import dask
    import dask.array as da

    from posthoc_align import LanguageAxes

    rng = np.random.default_rng(0)
    L = np.repeat(["a", "b", "c"], 400)
    off = np.repeat([[0.0, 0, 0, 0], [1e4, 0, 0, 0], [0, -1e4, 0, 0]], 400, 0)
    X = rng.normal(size=(1200, 4)) * 1e-3 * np.array([1, 2, 3, 4]) + off
    perm = rng.permutation(1200)
    X, L = X[perm], L[perm]
    ref = LanguageAxes().fit(X, languages=L)
    with dask.config.set(scheduler="synchronous"):
        est = LanguageAxes().fit(da.from_array(X, chunks=(100, -1)), languages=L)
        stream = LanguageAxes()
        for sl in (slice(0, 500), slice(500, 1200)):
            stream.partial_fit(da.from_array(X[sl], chunks=(100, -1)), languages=L[sl])
    for e in (est, stream):
        np.testing.assert_allclose(np.abs(e.components_), np.abs(ref.components_), atol=1e-8)
        np.testing.assert_allclose(e.transform(X), ref.transform(X), rtol=0, atol=1e-6)


# -- 4. float64 underflow: judged over all the rows, whatever the chunking ----------
def _mixed_tiny(n=100, d=4):
    """Language 'a' of normal scale, language 'b' of rows ~1e-160 (subnormal products)."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(n, d)) + 2.0, rng.normal(size=(n, d)) * 1e-160])
    return X, np.repeat(["a", "b"], n)


def _stream(batches):
    est = LanguageAxes()
    for X, L in batches:
        est.partial_fit(X, languages=L)
    return est


def test_axes_underflow_outcome_does_not_depend_on_chunking():
    # old: numpy fit and one dask block accepted, 50-row dask blocks and a stream
    # starting with the tiny language raised the underflow error
    import dask
    import dask.array as da

    X, L = _mixed_tiny()
    b = L == "b"
    ref = LanguageAxes().fit(X, languages=L)
    with dask.config.set(scheduler="synchronous"):
        fits = [
            LanguageAxes().fit(da.from_array(X, chunks=(c, -1)), languages=L) for c in (200, 50, 7)
        ]
        fits.append(_stream([(da.from_array(X[b], chunks=(30, -1)), L[b]), (X[~b], L[~b])]))
    fits.append(_stream([(X[b], L[b]), (X[~b], L[~b])]))
    fits.append(_stream([(X[i : i + 13], L[i : i + 13]) for i in range(0, 200, 13)][::-1]))
    for e in fits:
        np.testing.assert_allclose(e.sensitive_scores_, ref.sensitive_scores_, rtol=1e-9)
        np.testing.assert_allclose(e.transform(X), ref.transform(X), rtol=0, atol=1e-9)
    # every row tiny: every chunking refuses (fit) or waits (stream) alike
    tiny = X[b] * 1e-30
    Lt = np.tile(["a", "b"], 50)
    with dask.config.set(scheduler="synchronous"):
        for data in (
            tiny,
            da.from_array(tiny, chunks=(100, -1)),
            da.from_array(tiny, chunks=(9, -1)),
        ):
            with pytest.raises(ValueError, match=r"underflows float64.*multiply X by a constant"):
                LanguageAxes().fit(data, languages=Lt)
    est = _stream([(tiny[i : i + 10], Lt[i : i + 10]) for i in range(0, 100, 10)])
    with pytest.raises(NotFittedError, match="underflows float64"):
        est.transform(tiny)


def test_axes_stream_of_tiny_rows_then_normal_rows_equals_fit():
    # old: the first batch raised (and was dropped), though fit on all the rows works
    import dask
    import dask.array as da

    X, L = _mixed_tiny()
    rng = np.random.default_rng(1)
    tiny = rng.normal(size=(40, 4)) * 1e-170
    Lt = np.tile(["b", "a"], 20)
    ref = LanguageAxes().fit(np.vstack([tiny, X]), languages=np.r_[Lt, L])
    for first in ("numpy", "dask"):
        est = LanguageAxes()
        with dask.config.set(scheduler="synchronous"):
            est.partial_fit(
                tiny if first == "numpy" else da.from_array(tiny, chunks=(8, -1)), languages=Lt
            )
        with pytest.raises(NotFittedError, match=r"no axes yet: .*underflows float64"):
            est.transform(X)
        est.partial_fit(X[::2], languages=L[::2])
        est.partial_fit(X[1::2], languages=L[1::2])
        np.testing.assert_array_equal(est.counts_, ref.counts_)
        np.testing.assert_allclose(est.sensitive_scores_, ref.sensitive_scores_, rtol=1e-9)
        np.testing.assert_allclose(est.transform(X), ref.transform(X), rtol=0, atol=1e-9)


def test_axes_underflowing_stream_survives_save_load_and_pickle(tmp_path):
    X, L = _mixed_tiny()
    b = L == "b"
    tiny = X[b]  # language 'b' only so far: every product subnormal
    with pytest.raises(ValueError, match="underflows float64"):
        LanguageAxes().fit(tiny, languages=L[b])
    est = LanguageAxes().partial_fit(tiny, languages=L[b])
    assert est._scatter.underflows
    est.save(tmp_path / "tiny")
    copies = [posthoc_align.load(tmp_path / "tiny"), pickle.loads(pickle.dumps(est))]
    ref = LanguageAxes().fit(np.vstack([tiny, X[~b]]), languages=np.r_[L[b], L[~b]])
    for again in copies:
        assert again._scatter.underflows
        with pytest.raises(NotFittedError, match="underflows float64"):
            again.transform(X)
        again.partial_fit(X[~b], languages=L[~b])
        assert not again._scatter.underflows
        np.testing.assert_allclose(again.transform(X), ref.transform(X), rtol=0, atol=1e-9)


def test_scatter_moments_saved_without_largest_deviation_load_as_not_underflowing():
    X, L = _mixed_tiny()
    labels, codes = np.unique(L, return_inverse=True)
    s = ScatterMoments().update(torch.from_numpy(X), labels, codes)
    zero = ScatterMoments().update(torch.from_numpy(X[[0, 0]]), labels, codes[[0, 0]])
    for m, expect in ((s, 2.0**-511), (zero, 0.0)):
        meta, arrays = m.state()
        assert meta["largest_deviation"] == expect
        del meta["largest_deviation"]  # as an older version saved it
        old = ScatterMoments.from_state(meta, arrays)
        assert old.largest_deviation == expect and not old.underflows
        state = dict(vars(m))
        del state["largest_deviation"]  # as an older version pickled it
        old = ScatterMoments.__new__(ScatterMoments)
        old.__setstate__(state)
        assert old.largest_deviation == expect
    # a zero state read back still judges later tiny rows
    old = ScatterMoments.from_state(
        {k: v for k, v in zero.state()[0].items() if k != "largest_deviation"}, zero.state()[1]
    )
    old.update(torch.from_numpy(X[100:110]), np.array(["b"]), np.zeros(10, dtype=np.int64))
    assert old.underflows


def test_eraser_dask_underflow_is_decided_on_the_whole_batch():
    # the eraser's dask scatter (one shared reference row) still refuses rows whose
    # products are all subnormal, for any chunking
    import dask
    import dask.array as da

    X, L = _offset_data(0.0, n=120, d=4)
    with dask.config.set(scheduler="synchronous"):
        for c in (120, 25):
            with pytest.raises(ValueError, match="underflows float64"):
                LanguageEraser(device="cpu").fit(
                    da.from_array(X * 1e-170, chunks=(c, -1)), languages=L
                )
            LanguageEraser(device="cpu").fit(da.from_array(X, chunks=(c, -1)), languages=L)


def test_scatter_merge_counts_the_gap_between_reference_rows_in_largest_deviation():
    """merge took max(ld_self, ld_other), ignoring that other's deviations are measured from
    other reference rows: underflow then depended on the split (regression review)."""
    rng = np.random.default_rng(0)
    d = 3
    labels = np.array(["a", "b"])
    codes = [0, 0, 1, 1]

    def sm(rows):
        return ScatterMoments().update(torch.from_numpy(rows), labels, np.asarray(codes))

    base = rng.normal(size=(2, d))
    p1 = np.vstack([base[0], base[0], base[1], base[1]]) * 1e-160
    p2 = p1 + 1e-160 * rng.normal(size=(1, d))
    one = ScatterMoments().update(
        torch.from_numpy(np.vstack([p1, p2])), labels, np.array(codes * 2)
    )
    assert one.underflows and sm(p1).merge(sm(p2)).underflows
    a = rng.normal(size=(4, d)) * 1e-160
    b = a + 1.0
    one = ScatterMoments().update(torch.from_numpy(np.vstack([a, b])), labels, np.array(codes * 2))
    assert not one.underflows and not sm(a).merge(sm(b)).underflows
