"""Centring and standardisation against per-language loops written here."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from posthoc_align import LanguageMeanCentering, LanguageStandardizer


def loop_center(X, langs):
    out = np.empty_like(X, dtype=float)
    for lang in np.unique(langs):
        m = langs == lang
        out[m] = X[m] - X[m].mean(0)
    return out


def loop_standardize(X, langs, eps):
    out = np.empty_like(X, dtype=float)
    for lang in np.unique(langs):
        m = langs == lang
        out[m] = (X[m] - X[m].mean(0)) / np.sqrt(X[m].var(0) + eps)
    return out


def test_centering_matches_loop(rng, to_backend, multilingual):
    convert, back = to_backend
    X, langs, _ = multilingual(rng)
    Z = LanguageMeanCentering().fit_transform(convert(X), languages=langs)
    np.testing.assert_allclose(back(Z), loop_center(X, langs), atol=1e-12)


def test_standardizer_matches_loop(rng, to_backend, multilingual):
    convert, back = to_backend
    X, langs, _ = multilingual(rng)
    Z = LanguageStandardizer(eps=1e-6).fit_transform(convert(X), languages=langs)
    np.testing.assert_allclose(back(Z), loop_standardize(X, langs, 1e-6), atol=1e-10)


def test_batch_mode_uses_call_statistics(rng, multilingual):
    X, langs, _ = multilingual(rng)
    st_ = LanguageStandardizer(mode="batch").fit(X[:10], languages=langs[:10])
    sub = rng.permutation(len(X))[:70]
    Z = st_.transform(X[sub], languages=langs[sub])
    np.testing.assert_allclose(Z, loop_standardize(X[sub], langs[sub], 1e-6), atol=1e-10)


def test_standardizer_options(rng, multilingual):
    X, langs, _ = multilingual(rng)
    only_mean = LanguageStandardizer(with_std=False).fit_transform(X, languages=langs)
    np.testing.assert_allclose(only_mean, loop_center(X, langs), atol=1e-12)
    only_std = LanguageStandardizer(with_mean=False, eps=0.0).fit_transform(X, languages=langs)
    ref = np.empty_like(X)
    for lang in np.unique(langs):
        m = langs == lang
        ref[m] = X[m] / X[m].std(0)
    np.testing.assert_allclose(only_std, ref, atol=1e-12)


def test_dtype_and_type_kept(rng, multilingual):
    X, langs, _ = multilingual(rng)
    X32 = X.astype(np.float32)
    Z = LanguageMeanCentering().fit_transform(X32, languages=langs)
    assert Z.dtype == np.float32 and isinstance(Z, np.ndarray)
    T = torch.from_numpy(X32)
    Zt = LanguageStandardizer().fit_transform(T, languages=langs)
    assert isinstance(Zt, torch.Tensor) and Zt.dtype == torch.float32
    np.testing.assert_allclose(Zt.numpy(), loop_standardize(X, langs, 1e-6), atol=2e-4)
    Zi = LanguageMeanCentering().fit_transform(
        np.arange(12).reshape(6, 2), languages=list("aabbcc")
    )
    assert Zi.dtype == np.float64


def test_inputs_not_mutated(rng, multilingual):
    X, langs, _ = multilingual(rng)
    X0, l0 = X.copy(), langs.copy()
    for est in (
        LanguageMeanCentering(),
        LanguageStandardizer(),
        LanguageStandardizer(mode="batch"),
    ):
        est.fit_transform(X, languages=langs)
    np.testing.assert_array_equal(X, X0)
    np.testing.assert_array_equal(langs, l0)


def test_unknown_language_policies(rng, multilingual):
    X, langs, _ = multilingual(rng)
    fit_rows = langs != "de"
    est = LanguageMeanCentering().fit(X[fit_rows], languages=langs[fit_rows])
    with pytest.raises(ValueError, match=r"\['de'\].*fitted languages.*'batch'.*'global'"):
        est.transform(X, languages=langs)
    Zb = est.set_params(unknown_language="batch").transform(X, languages=langs)
    de = langs == "de"
    np.testing.assert_allclose(Zb[de], X[de] - X[de].mean(0), atol=1e-12)
    np.testing.assert_allclose(Zb[~de], loop_center(X[~de], langs[~de]), atol=1e-12)
    Zg = est.set_params(unknown_language="global").transform(X, languages=langs)
    np.testing.assert_allclose(Zg[de], X[de] - X[fit_rows].mean(0), atol=1e-12)


def test_unknown_language_standardizer(rng, multilingual):
    X, langs, _ = multilingual(rng)
    est = LanguageStandardizer().fit(X[langs != "de"], languages=langs[langs != "de"])
    with pytest.raises(ValueError, match="mode='batch'"):
        est.transform(X, languages=langs)


def test_single_row_language_warns(rng):
    X = rng.normal(size=(5, 3))
    with pytest.warns(UserWarning, match=r"fewer than 2 rows"):
        Z = LanguageStandardizer().fit_transform(X, languages=["a"] * 4 + ["b"])
    assert np.isfinite(Z).all()
    np.testing.assert_allclose(Z[4], 0.0)


def test_languages_none_is_one_language(rng):
    X = rng.normal(size=(20, 3))
    Z = LanguageMeanCentering().fit_transform(X)
    np.testing.assert_allclose(Z, X - X.mean(0), atol=1e-12)
    assert LanguageMeanCentering().fit(X).languages_.tolist() == ["__all__"]


@pytest.mark.parametrize("Est", [LanguageMeanCentering, LanguageStandardizer])
def test_bad_input_messages(Est, rng):
    X = rng.normal(size=(10, 3))
    langs = ["a"] * 5 + ["b"] * 5
    with pytest.raises(ValueError, match="languages has 9 entries but X has 10 rows"):
        Est().fit(X, languages=langs[:9])
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity.*row 3"):
        Est().fit(bad, languages=langs)
    bad[3, 1] = np.inf
    est = Est().fit(X, languages=langs)
    with pytest.raises(ValueError, match="NaN or infinity.*row 3"):
        est.transform(bad, languages=langs)
    with pytest.raises(ValueError, match="3 features"):
        est.transform(X[:, :2], languages=langs)
    with pytest.raises(ValueError, match="2D array|2-D"):
        est.transform(X[0], languages=langs[:1])
    with pytest.raises(ValueError):
        Est().fit(np.array([["a", "b"], ["c", "d"]]), languages=["x", "y"])
    with pytest.raises(TypeError, match="one label per row"):
        Est().fit(X, languages="en")


@pytest.mark.parametrize("Est", [LanguageMeanCentering, LanguageStandardizer])
def test_more_bad_input_messages(Est, rng):
    X = rng.normal(size=(10, 3))
    langs = ["a"] * 5 + ["b"] * 5
    # numbers stored as strings are refused, not silently parsed
    with pytest.raises(ValueError, match="holds strings.*astype"):
        Est().fit(X.astype(str), languages=langs)
    with pytest.raises(ValueError, match="non-numeric"):
        Est().fit(np.array([[1.0, "x"]], dtype=object))
    # int 1 and str "1" are different labels: mixing them is an error, not a merge
    with pytest.raises(TypeError, match="mixes label types"):
        Est().fit(X[:4], languages=[1, 1, "1", "1"])
    # fitted with languages, transformed without: say so (no internal sentinel)
    est = Est().fit(X, languages=langs)
    with pytest.raises(ValueError, match="fitted with languages=.*got no languages=") as info:
        est.transform(X)
    assert "__all__" not in str(info.value)
    if Est is LanguageMeanCentering:  # the permissive policies apply, with a warning
        for policy in ("batch", "global"):
            est = Est(unknown_language=policy).fit(X, languages=langs)
            with pytest.warns(UserWarning, match="got no languages="):
                est.transform(X)
    with pytest.raises(ValueError, match="not a torch device"):
        Est(device="tpu").fit(X)
    with pytest.raises(ValueError, match="only 'cpu' and 'cuda'"):
        Est(device="meta").fit(X)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("as_tensor", [False, True])
def test_overflow_is_named_not_crashed(as_tensor):
    X = np.array([[3e38], [3e38], [-3e38]], dtype=np.float32)
    X = torch.from_numpy(X) if as_tensor else X
    with pytest.raises(ValueError, match="finite, but computing with it overflowed.*float32"):
        LanguageMeanCentering().fit_transform(X)


@pytest.mark.parametrize("mode", ["fitted", "batch"])
def test_eps_zero_constant_feature_is_centred_not_divided(mode, rng):
    X = np.column_stack([rng.normal(size=6), np.full(6, 2.0)])
    L = ["a"] * 3 + ["b"] * 3
    est = LanguageStandardizer(eps=0.0, mode=mode)
    Z = est.fit_transform(X, languages=L)
    assert np.isfinite(Z).all()
    np.testing.assert_array_equal(Z[:, 1], 0.0)  # scale 1 (StandardScaler's rule)
    np.testing.assert_allclose(Z[:, 0], loop_standardize(X, np.array(L), 0.0)[:, 0])
    if mode == "fitted":
        np.testing.assert_array_equal(est.scale_[:, 1], 1.0)


chunkings = st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=8)


@pytest.mark.usefixtures("kernels")
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    X=arrays(np.float64, (60, 4), elements=st.floats(-1e3, 1e3, allow_nan=False)),
    cuts=chunkings,
    seed=st.integers(0, 2**16),
)
def test_partial_fit_any_chunking_equals_fit(X, cuts, seed):
    rng = np.random.default_rng(seed)
    langs = rng.choice(["en", "fr", "de", "sw"], size=len(X))
    ref = LanguageStandardizer().fit(X, languages=langs)
    inc = LanguageStandardizer()
    start = 0
    bounds = np.cumsum(cuts)
    for stop in [*bounds[bounds < len(X)].tolist(), len(X)]:
        inc.partial_fit(X[start:stop], languages=langs[start:stop])
        start = stop
    np.testing.assert_array_equal(inc.languages_, ref.languages_)
    scale = 1 + np.abs(X).max()
    np.testing.assert_allclose(inc.means_, ref.means_, atol=1e-12 * scale)
    np.testing.assert_allclose(inc.vars_, ref.vars_, atol=1e-9 * scale**2)
    c1 = LanguageMeanCentering().fit(X, languages=langs)
    np.testing.assert_allclose(c1.means_, ref.means_, atol=1e-12 * scale)


@settings(max_examples=20, deadline=None)
@given(shift=st.floats(-1e6, 1e6), seed=st.integers(0, 2**16))
def test_centering_translation_invariant(shift, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(30, 3))
    langs = rng.choice(["a", "b"], size=30)
    langs[:2] = ["a", "b"]
    Z1 = LanguageMeanCentering().fit_transform(X, languages=langs)
    Z2 = LanguageMeanCentering().fit_transform(X + shift, languages=langs)
    np.testing.assert_allclose(Z1, Z2, atol=1e-9 * (1 + abs(shift)))


@pytest.mark.usefixtures("kernels")
def test_float32_large_mean_precision(rng):
    """Shifted sums keep float32 variances accurate under a large mean (1e4 vs std 1):
    without the shift, float32 sums of squares would lose everything."""
    X = (1e4 + rng.normal(size=(20000, 3))).astype(np.float32)
    est = LanguageStandardizer().fit(X)
    ref = X.astype(np.float64).var(0)
    np.testing.assert_allclose(est.vars_[0], ref, rtol=2e-5)
    est64 = LanguageStandardizer().fit(X.astype(np.float64))
    np.testing.assert_allclose(est64.vars_[0], ref, rtol=1e-10)


@pytest.mark.usefixtures("kernels")
def test_nan_batch_leaves_moments_untouched(rng):
    X = rng.normal(size=(20, 3))
    est = LanguageMeanCentering().partial_fit(X[:10], languages=["a"] * 10)
    bad = X[10:].copy()
    bad[-1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        est.partial_fit(bad, languages=["b"] * 10)
    est.partial_fit(X[10:], languages=["b"] * 10)
    ref = LanguageMeanCentering().fit(X, languages=["a"] * 10 + ["b"] * 10)
    np.testing.assert_allclose(est.means_, ref.means_, atol=1e-12)
    np.testing.assert_array_equal(est.counts_, [10, 10])


@pytest.mark.usefixtures("kernels")
def test_out_kernels_write_into_views(rng):
    """affine_by_language / project_out with out= (a strided layer view) and rotations."""
    from posthoc_align._apply import affine_by_language, project_out

    n, d, L = 3000, 6, 4  # more rows than one kernel block
    T = torch.from_numpy(rng.normal(size=(n, d)))
    g = rng.integers(0, L, n)
    shift, scale = rng.normal(size=(L, d)), rng.uniform(0.5, 2, size=(L, d))
    R = {1: np.linalg.qr(rng.normal(size=(d, d)))[0], 3: np.eye(d)[::-1].copy()}
    off = rng.normal(size=d)
    Xn = T.numpy()
    ref = (Xn - shift[g]) * scale[g]
    for k, Rk in R.items():
        ref[g == k] = ref[g == k] @ Rk
    ref += off
    stack = torch.zeros((n, 3, d), dtype=torch.float64)
    got = affine_by_language(
        T, g, shift=shift, scale=scale, rotations=R, offset=off, out=stack[:, 1, :]
    )
    assert got.data_ptr() == stack[:, 1, :].data_ptr()
    np.testing.assert_allclose(stack[:, 1].numpy(), ref, atol=1e-12)
    assert not stack[:, 0].any() and not stack[:, 2].any()
    np.testing.assert_allclose(
        affine_by_language(T, g, shift=shift, scale=scale).numpy(),
        (Xn - shift[g]) * scale[g],
        atol=1e-12,
    )
    B = np.linalg.qr(rng.normal(size=(d, 2)))[0].T
    c = rng.normal(size=d)
    project_out(T, B, center=c, out=stack[:, 2, :])
    np.testing.assert_allclose(stack[:, 2].numpy(), Xn - ((Xn - c) @ B.T) @ B, atol=1e-12)
    with pytest.raises(ValueError, match="out has shape"):
        affine_by_language(T, g, shift=shift, out=torch.empty((n, d), dtype=torch.float32))
    bad = T.clone()
    bad[2500, 3] = np.nan
    with pytest.raises(ValueError, match="first at row 2500"):
        affine_by_language(bad, g, shift=shift, rotations=R)


@pytest.mark.usefixtures("kernels")
def test_standardizer_strided_and_many_languages(rng):
    """Segmented sums from a strided view (a layer of a stack) and > block rows."""
    X3 = rng.normal(size=(5000, 3, 4)) * 10 + 100
    L = rng.integers(0, 37, 5000).astype(str)
    for layer in range(3):
        Xl = X3[:, layer]
        est = LanguageStandardizer().fit(Xl, languages=L)
        ref = LanguageStandardizer().fit(np.ascontiguousarray(Xl), languages=L)
        np.testing.assert_allclose(est.vars_, ref.vars_, rtol=1e-12)
        for i, lab in enumerate(est.languages_):
            np.testing.assert_allclose(est.means_[i], Xl[L == lab].mean(0), rtol=1e-12)
            np.testing.assert_allclose(est.vars_[i], Xl[L == lab].var(0), rtol=1e-9)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("offset", [0.0, 50.0])
def test_float32_statistics_are_compensated(offset):
    """float32 input: variances and means close to a float64 fit of the same numbers,
    even when the language means are far from the shared reference row (cancellation)."""
    from posthoc_align._covariance import ScatterMoments

    rng = np.random.default_rng(7)
    langs = np.repeat(["a", "b", "c"], [3000, 5000, 4100])
    shifts = {lab: rng.normal(scale=offset, size=24) for lab in "abc"}
    X = np.stack([shifts[lab] for lab in langs]) + rng.standard_normal((langs.size, 24))
    X32 = X.astype(np.float32)
    X64 = X32.astype(np.float64)
    a = LanguageStandardizer(device="cpu").fit(X32, languages=langs)
    b = LanguageStandardizer(device="cpu").fit(X64, languages=langs)
    assert np.abs(a.vars_ / b.vars_ - 1).max() < 1e-5
    assert np.abs(a.means_ - b.means_).max() < 1e-6 * max(1.0, offset)
    codes = np.unique(langs, return_inverse=True)[1]
    s32 = ScatterMoments().update(torch.from_numpy(X32), np.array(list("abc")), codes)
    s64 = ScatterMoments().update(torch.from_numpy(X64), np.array(list("abc")), codes)
    w32, w64 = s32.within(), s64.within()
    assert np.abs(w32 - w64).max() < 1e-5 * np.abs(w64).max()


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("second", [False, True])
def test_grouped_rows_path_equals_segmented_path(second):
    """Rows in long language runs take contiguous reductions; shuffled rows take
    segmented index_add_. Both equal a float64 reference (and each other)."""
    from posthoc_align._stats import MIN_RUN, LanguageMoments, _runs

    rng = np.random.default_rng(11)
    sizes = [3 * MIN_RUN, 2 * MIN_RUN + 17, MIN_RUN + 5]
    langs = np.repeat(np.array(["a", "b", "c"]), sizes)
    X = rng.normal(size=(langs.size, 12)) * 2 + 5 * rng.normal(size=12)
    X[langs == "b"] += 40.0
    codes = np.unique(langs, return_inverse=True)[1]
    assert _runs(codes) is not None
    perm = rng.permutation(langs.size)
    assert _runs(codes[perm]) is None
    labels = np.array(["a", "b", "c"])

    def fit(A, c):
        m = LanguageMoments(second_moments=second)
        return m.update(torch.from_numpy(np.ascontiguousarray(A)), labels, c)

    ref = fit(X, codes)  # float64 input: float64 throughout
    for A, c in ((X.astype(np.float32), codes), (X[perm].astype(np.float32), codes[perm])):
        m = fit(A, c)
        np.testing.assert_allclose(m.means(), ref.means(), rtol=0, atol=2e-5)
        np.testing.assert_array_equal(m.counts, ref.counts)
        if second:
            np.testing.assert_allclose(m.variances(), ref.variances(), rtol=1e-5)
    m64 = fit(X[perm], codes[perm])
    np.testing.assert_allclose(m64.means(), ref.means(), rtol=1e-12)
    if second:
        np.testing.assert_allclose(m64.variances(), ref.variances(), rtol=1e-10)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("cls", [LanguageMeanCentering, LanguageStandardizer])
def test_transform_grouped_rows_path_equals_shuffled(cls):
    """Grouped rows are transformed run by run (broadcast vectors), shuffled rows by
    gathered statistics: the same numbers either way, float32 and float64."""
    from posthoc_align._stats import MIN_RUN

    rng = np.random.default_rng(5)
    langs = np.repeat(np.array(["x", "y", "z"]), [2 * MIN_RUN, MIN_RUN + 3, 3 * MIN_RUN])
    X = rng.normal(size=(langs.size, 10)) + np.repeat(
        rng.normal(scale=4, size=(3, 10)), [2 * MIN_RUN, MIN_RUN + 3, 3 * MIN_RUN], axis=0
    )
    perm = rng.permutation(langs.size)
    for dtype in (np.float32, np.float64):
        A = X.astype(dtype)
        est = cls().fit(A, languages=langs)
        grouped = est.transform(A, languages=langs)
        shuffled = est.transform(A[perm], languages=langs[perm])
        assert grouped.dtype == dtype
        np.testing.assert_allclose(
            shuffled, grouped[perm], rtol=0, atol=1e-6 if dtype == np.float32 else 1e-12
        )
    bad = X.copy()
    bad[MIN_RUN + 7, 3] = np.nan
    with pytest.raises(ValueError, match="NaN|finite"):
        est.transform(bad, languages=langs)


@pytest.mark.parametrize("cls", [LanguageMeanCentering, LanguageStandardizer])
def test_negative_strides_and_tensors_requiring_grad(rng, cls):
    """A reversed numpy view (negative strides) and a tensor that requires grad are read
    like any other input (the fits are closed forms: outputs carry no graph)."""
    X = rng.normal(size=(300, 5)).astype(np.float32)
    langs = rng.choice(["a", "b", "c"], size=300)
    ref = (
        cls()
        .fit(X[::-1].copy(), languages=langs[::-1])
        .transform(X[::-1].copy(), languages=langs[::-1])
    )
    Z = cls().fit(X[::-1], languages=langs[::-1]).transform(X[::-1], languages=langs[::-1])
    np.testing.assert_array_equal(Z, ref)
    T = torch.from_numpy(X).requires_grad_(True)
    Zt = cls().fit(T, languages=langs).transform(T, languages=langs)
    assert isinstance(Zt, torch.Tensor) and not Zt.requires_grad
    np.testing.assert_array_equal(Zt.numpy(), ref[::-1])


@pytest.mark.parametrize("mode", ["fitted", "batch"])
@pytest.mark.parametrize("chunks", [None, 3])
def test_standardizer_variances_with_distant_language_offsets(mode, chunks):
    # each language is shifted by its own reference row: a language 10⁴ away from
    # another must not lose its 10⁻⁶ variances to cancellation (review finding)
    rng = np.random.default_rng(0)
    n, d = 600, 4
    a = 1e4 + rng.normal(size=(n, d))
    b = 1e-3 * rng.normal(size=(n, d))
    X = np.vstack([a, b])
    langs = np.array(["a"] * n + ["b"] * n)
    perm = rng.permutation(2 * n)
    X, langs = X[perm], langs[perm]
    est = LanguageStandardizer(mode=mode, eps=0.0)
    if chunks is None:
        est.fit(X, languages=langs)
    else:
        for part in np.array_split(np.arange(2 * n), chunks):
            est.partial_fit(X[part], languages=langs[part])
    Z = est.transform(X, languages=langs)
    for lab, rows in (("a", a), ("b", b)):
        ref = (X[langs == lab] - rows.mean(0)) / rows.std(0)
        np.testing.assert_allclose(Z[langs == lab], ref, rtol=1e-7, atol=1e-7)
    if mode == "fitted":
        np.testing.assert_allclose(est.vars_[1], b.var(0), rtol=1e-9)
        np.testing.assert_allclose(est.vars_[0], a.var(0), rtol=1e-9)


def test_standardizer_distant_offsets_dask():
    da = pytest.importorskip("dask.array")
    rng = np.random.default_rng(1)
    n, d = 400, 3
    X = np.vstack([1e4 + rng.normal(size=(n, d)), 1e-3 * rng.normal(size=(n, d))])
    langs = np.array(["a"] * n + ["b"] * n)
    perm = rng.permutation(2 * n)
    X, langs = X[perm], langs[perm]
    est = LanguageStandardizer(eps=0.0).fit(da.from_array(X, chunks=150), languages=langs)
    np.testing.assert_allclose(est.vars_[1], X[langs == "b"].var(0), rtol=1e-9)


@pytest.mark.parametrize(
    "make",
    [
        lambda labs: labs[:2] + [None] + labs[3:],
        lambda labs: np.array(labs[:2] + [np.nan] + labs[3:], dtype=object),
        lambda labs: pd.Categorical(labs[:2] + [None] + labs[3:]),
        lambda labs: pd.Series(labs[:2] + [pd.NA] + labs[3:], dtype="string"),
        lambda labs: pd.Series(labs).where(np.arange(len(labs)) != 2),
    ],
)
def test_missing_language_labels_are_named_as_missing(make):
    X = np.random.default_rng(0).normal(size=(6, 2))
    labs = ["en", "fr", "en", "fr", "en", "fr"]
    with pytest.raises(ValueError, match="missing value .* at row 2.*needs a label"):
        LanguageMeanCentering().fit(X, languages=make(labs))
