"""The numba CPU loops (posthoc_align._kernels) against independent numpy computations."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_align import LanguageStandardizer, _kernels

pytestmark = pytest.mark.skipif(not _kernels.enabled(), reason="numba is not installed")


def _reference_moments(X, g, shift, L):
    X64 = np.asarray(X, dtype=np.float64)
    S = np.zeros((L, X.shape[1]))
    Q = np.zeros((L, X.shape[1]))
    for lang in range(L):
        r = X64[g == lang] - shift[lang]
        S[lang], Q[lang] = r.sum(0), (r * r).sum(0)
    return S, Q


@pytest.fixture(params=[1, 4], ids=["1 thread", "4 threads"])
def threads(request, monkeypatch):
    """Run with one row range, or four (more ranges than this machine has cores)."""
    monkeypatch.setattr(_kernels, "MIN_ROWS_PER_THREAD", 16)
    monkeypatch.setattr(_kernels.torch, "get_num_threads", lambda: request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layout", ["contiguous", "layer of a stack"])
def test_language_moments_match_float64_loop(rng, dtype, layout, threads):
    n, d, L = 997, 7, 5
    stack = (rng.normal(size=(n, 3, d)) * 3 + 100).astype(dtype)
    X = stack[:, 1, :] if layout == "layer of a stack" else np.ascontiguousarray(stack[:, 1, :])
    before = X.copy()
    g = rng.integers(0, L, n)
    shift = rng.normal(size=(L, d)) + 100
    S, Q = _kernels.language_moments(torch.from_numpy(X), g, shift, second=True)
    rS, rQ = _reference_moments(X, g, shift, L)
    np.testing.assert_allclose(S, rS, rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(Q, rQ, rtol=1e-12)
    S1, Q1 = _kernels.language_moments(torch.from_numpy(X), g, shift, second=False)
    assert Q1 is None
    np.testing.assert_array_equal(S1, S)
    np.testing.assert_array_equal(X, before)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 300),
    d=st.integers(1, 9),
    L=st.integers(1, 6),
    cut=st.floats(0, 1),
)
def test_language_moments_add_over_any_split(seed, n, d, L, cut):
    """Two updates over a split of the rows equal one update over all (float64 terms)."""
    rng = np.random.default_rng(seed)
    X = torch.from_numpy(rng.normal(size=(n, d)).astype(np.float32))
    g = rng.integers(0, L, n)
    shift = rng.normal(size=(L, d))
    k = int(cut * n)
    S, Q = _kernels.language_moments(X, g, shift, second=True)
    Sa, Qa = _kernels.language_moments(X[:k], g[:k], shift, second=True)
    Sb, Qb = _kernels.language_moments(X[k:], g[k:], shift, second=True)
    np.testing.assert_allclose(Sa + Sb, S, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Qa + Qb, Q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("parts", ["shift", "scale", "shift+scale+offset", "none"])
def test_affine_rows_match_numpy(rng, dtype, parts, threads):
    n, d, L = 1001, 5, 4
    X = rng.normal(size=(n, d)).astype(dtype)
    g = rng.integers(0, L, n)
    a = rng.normal(size=(L, d)).astype(dtype) if "shift" in parts else None
    b = rng.uniform(0.5, 2, size=(L, d)).astype(dtype) if "scale" in parts else None
    c = rng.normal(size=d).astype(dtype) if "offset" in parts else None
    ref = X.copy()
    if a is not None:
        ref = ref - a[g]
    if b is not None:
        ref = ref * b[g]
    if c is not None:
        ref = ref + c
    stack = torch.zeros((n, 3, d), dtype=torch.from_numpy(X).dtype)
    t = None if a is None else torch.from_numpy(a)
    s = None if b is None else torch.from_numpy(b)
    o = None if c is None else torch.from_numpy(c)
    ok = _kernels.affine_rows(torch.from_numpy(X), g, stack[:, 1], shift=t, scale=s, offset=o)
    assert ok
    np.testing.assert_array_equal(stack[:, 1].numpy(), ref)  # same rounding as numpy
    assert not stack[:, 0].any() and not stack[:, 2].any()


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_affine_rows_report_non_finite(rng, bad, threads):
    X = rng.normal(size=(500, 4)).astype(np.float32)
    X[433, 2] = bad
    g = rng.integers(0, 3, 500)
    out = torch.empty((500, 4))
    shift = torch.zeros((3, 4))
    assert not _kernels.affine_rows(torch.from_numpy(X), g, out, shift=shift)
    X[433, 2] = 0.0
    assert _kernels.affine_rows(torch.from_numpy(X), g, out, shift=shift)


def test_empty_and_usable():
    e = torch.empty((0, 3))
    assert _kernels.affine_rows(e, np.zeros(0, np.int64), torch.empty((0, 3)))
    S, _ = _kernels.language_moments(e, np.zeros(0, np.int64), np.zeros((2, 3)), second=False)
    assert S.shape == (2, 3) and not S.any()
    assert _kernels.usable(torch.zeros(2, 2), None)
    assert not _kernels.usable(torch.zeros(2, 2, dtype=torch.float16))
    assert not _kernels.usable(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.float64))
    assert not _kernels.usable(torch.zeros(2, 2, 2))
    assert not _kernels.usable()


def test_environment_switch_and_missing_numba(monkeypatch, rng):
    """POSTHOC_ALIGN_NUMBA=0, or no numba, gives the torch kernels: same statistics."""
    X = (rng.normal(size=(3000, 6)) + 50).astype(np.float32)
    langs = rng.choice(["a", "b", "c"], size=3000)
    loops = LanguageStandardizer().fit(X, languages=langs)
    monkeypatch.setenv("POSTHOC_ALIGN_NUMBA", "0")
    assert not _kernels.enabled()
    torch_path = LanguageStandardizer().fit(X, languages=langs)
    monkeypatch.delenv("POSTHOC_ALIGN_NUMBA")
    monkeypatch.setattr(_kernels, "_compiled", lambda: None)
    assert not _kernels.enabled() and not _kernels.usable(torch.zeros(2, 2))
    no_numba = LanguageStandardizer().fit(X, languages=langs)
    for other in (torch_path, no_numba):
        np.testing.assert_allclose(other.means_, loops.means_, rtol=1e-6)
        np.testing.assert_allclose(other.vars_, loops.vars_, rtol=1e-5)
    ref = np.stack([X[langs == lab].astype(np.float64).var(0) for lab in loops.languages_])
    np.testing.assert_allclose(loops.vars_, ref, rtol=1e-10)  # float64 terms: exact-ish


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [0, 1, 7])
@pytest.mark.parametrize("centred", [False, True])
def test_project_rows_match_numpy(rng, dtype, k, centred, threads):
    n, d = 777, 9
    X = (rng.normal(size=(n, d)) + 3).astype(dtype)
    B = np.linalg.qr(rng.normal(size=(d, max(k, 1))))[0].T[:k].astype(dtype)
    c = rng.normal(size=d).astype(dtype) if centred else np.zeros(d, dtype)
    X64, B64, c64 = (a.astype(np.float64) for a in (X, B, c))
    ref = X64 - ((X64 - c64) @ B64.T) @ B64
    stack = torch.zeros((n, 2, d), dtype=torch.from_numpy(X).dtype)
    ok = _kernels.project_rows(
        torch.from_numpy(X),
        torch.from_numpy(np.ascontiguousarray(B)),
        stack[:, 0],
        center=torch.from_numpy(c) if centred else None,
    )
    assert ok and not stack[:, 1].any()
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(stack[:, 0].numpy(), ref, atol=tol * np.abs(ref).max())
    X[5, 0] = np.inf
    assert not _kernels.project_rows(torch.from_numpy(X), torch.from_numpy(B.copy()), stack[:, 0])


def test_lsar_transform_loops_equal_torch_kernels(rng, monkeypatch):
    """LSAR (rank 7 <= MAX_LOOP_RANK: the loops) equals the blocked-GEMM torch path."""
    from posthoc_align import LSAR

    X = rng.normal(size=(4000, 16)) + rng.normal(scale=3, size=(8, 16))[rng.integers(0, 8, 4000)]
    langs = rng.integers(0, 8, 4000).astype(str)
    est = LSAR().fit(X, languages=langs)
    assert est.components_.shape[0] == 7 <= _kernels.MAX_LOOP_RANK
    Z = est.transform(X.astype(np.float32))
    monkeypatch.setenv("POSTHOC_ALIGN_NUMBA", "0")
    Zt = est.transform(X.astype(np.float32))
    np.testing.assert_allclose(Z, Zt, atol=1e-5)


def test_codes_out_of_range_raise_instead_of_wrapping(rng):
    X = torch.from_numpy(rng.normal(size=(10, 3)))
    with pytest.raises(IndexError, match="language codes"):
        _kernels.language_moments(X, np.full(10, 2), np.zeros((2, 3)), second=False)
    with pytest.raises(IndexError, match="language codes"):
        _kernels.affine_rows(
            X,
            np.full(10, -1),
            torch.empty((10, 3), dtype=X.dtype),
            shift=torch.zeros((2, 3), dtype=X.dtype),
        )
    with pytest.raises(ValueError, match="width"):
        _kernels.project_rows(X, torch.zeros((1, 4), dtype=X.dtype), torch.empty_like(X))


def test_accumulator_budget_limits_threads(monkeypatch):
    """Many languages x many cores: fewer row ranges, not threads x L x d memory."""
    monkeypatch.setattr(_kernels, "MIN_ROWS_PER_THREAD", 1)
    monkeypatch.setattr(_kernels.torch, "get_num_threads", lambda: 64)
    assert len(_kernels._ranges(10_000)) == 64
    per_thread = 1000 * 1024 * 8 * 2  # 1000 languages, d = 1024, sums and squares
    assert len(_kernels._ranges(10_000, per_thread)) == _kernels.ACCUMULATOR_BUDGET // per_thread
    assert len(_kernels._ranges(10_000, 10 * _kernels.ACCUMULATOR_BUDGET)) == 1


def test_loops_that_fail_to_compile_fall_back_with_a_warning(monkeypatch, rng):
    """A numba that imports but cannot run the loops: a RuntimeWarning, then the torch
    kernels (the smoke test runs before any fit uses the loops)."""
    monkeypatch.setattr(_kernels, "_loops", None)
    monkeypatch.setattr(_kernels, "_failed", False)

    def broken(loops):
        raise RuntimeError("LLVM says no")

    monkeypatch.setattr(_kernels, "_smoke", broken)
    with pytest.warns(RuntimeWarning, match="LLVM says no"):
        assert not _kernels.enabled()
    assert not _kernels.usable(torch.zeros(2, 2))
    X = rng.normal(size=(50, 3))
    est = LanguageStandardizer().fit(X, languages=np.repeat(["a", "b"], 25))
    np.testing.assert_allclose(est.vars_[0], X[:25].var(0), rtol=1e-10)


def test_smoke_test_passes_on_this_machine():
    from posthoc_align import _numba_loops

    _kernels._smoke(_numba_loops)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 5000),
    d=st.integers(1, 12),
    n_langs=st.integers(1, 9),
    dtype=st.sampled_from([np.float32, np.float64]),
    offset=st.floats(-1e3, 1e3),
)
def test_loops_equal_torch_kernels_for_the_estimators(seed, n, d, n_langs, dtype, offset):
    """Random shapes (across the row-range threshold), languages (some with one row),
    dtypes and offsets: centring and standardisation with the loops equal the torch
    kernels; LSAR with the loops on float32 input equals LSAR on the same numbers in
    float64 (its subspace comes from differences of means, which float32 sums blur
    when the offset dwarfs the spread — the loops form every term in float64)."""
    import os

    from posthoc_align import LSAR, LanguageMeanCentering

    rng = np.random.default_rng(seed)
    X = (rng.normal(size=(n, d)) * rng.uniform(0.1, 10) + offset).astype(dtype)
    langs = rng.integers(0, n_langs, n).astype(str)
    scale = 1 + abs(offset)
    tol = (
        dict(rtol=2e-4, atol=2e-4 * scale)
        if dtype == np.float32
        else dict(rtol=1e-9, atol=1e-9 * scale)
    )
    results = {}
    for mode in ("loops", "torch"):
        os.environ["POSTHOC_ALIGN_NUMBA"] = "1" if mode == "loops" else "0"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                s = LanguageStandardizer().fit(X, languages=langs)
                c = LanguageMeanCentering().fit(X, languages=langs)
                results[mode] = (
                    s.means_,
                    s.vars_,
                    s.transform(X, languages=langs),
                    c.transform(X, languages=langs),
                )
        finally:
            os.environ.pop("POSTHOC_ALIGN_NUMBA", None)
    for a, b in zip(results["loops"], results["torch"], strict=True):
        np.testing.assert_allclose(a, b, **tol)
    X64 = X.astype(np.float64)
    a = LSAR().fit(X, languages=langs)
    b = LSAR().fit(X64, languages=langs)
    np.testing.assert_allclose(a.means_, b.means_, rtol=1e-12, atol=1e-12 * scale)
    eps = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(a.transform(X), b.transform(X64), atol=eps * scale * np.sqrt(d))


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_ids=st.integers(30, 400),
    d=st.integers(2, 10),
    offset=st.floats(-500, 500),
    cut=st.floats(0.1, 0.9),
)
def test_procrustes_loops_torch_and_chunking_agree(seed, n_ids, d, offset, cut):
    """ProcrustesAligner on float32 rows with planted rotations and language offsets:
    loops vs torch kernels, and fit vs partial_fit over a random split, give the same
    maps and the same transformed rows (float32 tolerances)."""
    import os

    from scipy.stats import ortho_group

    from posthoc_align import ProcrustesAligner

    rng = np.random.default_rng(seed)
    en = rng.normal(size=(n_ids, d))
    rows, langs, ids = [en], ["en"] * n_ids, list(range(n_ids))
    for lang in ("fr", "de"):
        R = ortho_group.rvs(d, random_state=int(rng.integers(1 << 30)))
        rows.append(en @ R + 0.05 * rng.normal(size=(n_ids, d)) + rng.normal(size=d))
        langs += [lang] * n_ids
        ids += list(range(n_ids))
    X = (np.vstack(rows) + offset).astype(np.float32)
    langs, ids = np.array(langs), np.array(ids)
    perm = rng.permutation(len(X))
    X, langs, ids = X[perm], langs[perm], ids[perm]
    k = int(cut * len(X))
    out = {}
    for mode in ("loops", "torch"):
        os.environ["POSTHOC_ALIGN_NUMBA"] = "1" if mode == "loops" else "0"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                full = ProcrustesAligner().fit(X, languages=langs, pair_ids=ids)
                part = ProcrustesAligner().partial_fit(X[:k], languages=langs[:k], pair_ids=ids[:k])
                part.partial_fit(X[k:], languages=langs[k:], pair_ids=ids[k:])
                out[mode] = (full.rotations_, part.rotations_, full.transform(X, languages=langs))
        finally:
            os.environ.pop("POSTHOC_ALIGN_NUMBA", None)
    ref = out["loops"][0]
    for mode in out:
        np.testing.assert_allclose(out[mode][0], ref, atol=2e-4)
        np.testing.assert_allclose(out[mode][1], ref, atol=2e-4)
    np.testing.assert_allclose(
        out["loops"][2], out["torch"][2], atol=2e-3 * (1 + abs(offset)) ** 0.5
    )


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), n_ids=st.integers(40, 300), offset=st.floats(-200, 200))
def test_other_estimators_loops_equal_torch_kernels(seed, n_ids, offset):
    """LanguageEraser, LanguageAxes and GeneralizedProcrustes read their language means
    through the same moments: the loops and the torch kernels agree (float32 input)."""
    import os

    from posthoc_align import GeneralizedProcrustes, LanguageAxes, LanguageEraser

    rng = np.random.default_rng(seed)
    d = 6
    base = rng.normal(size=(n_ids, d))
    X = np.vstack(
        [base + rng.normal(scale=2, size=d) + 0.3 * rng.normal(size=base.shape) for _ in range(3)]
    )
    X = (X + offset).astype(np.float32)
    langs = np.repeat(["en", "fr", "de"], n_ids)
    ids = np.tile(np.arange(n_ids), 3)
    out = {}
    for mode in ("loops", "torch"):
        os.environ["POSTHOC_ALIGN_NUMBA"] = "1" if mode == "loops" else "0"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[mode] = [
                    LanguageEraser().fit(X, languages=langs).transform(X),
                    LanguageAxes().fit(X, languages=langs).transform(X),
                    GeneralizedProcrustes()
                    .fit(X, languages=langs, pair_ids=ids)
                    .transform(X, languages=langs),
                ]
        finally:
            os.environ.pop("POSTHOC_ALIGN_NUMBA", None)
    for a, b in zip(out["loops"], out["torch"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3 * (1 + abs(offset)) ** 0.5)
