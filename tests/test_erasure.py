"""LanguageEraser (LEACE) against the closed form, planted data and centring."""

import pickle
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import posthoc_align
from posthoc_align import LanguageMeanCentering
from posthoc_align.erasure import LanguageEraser


def planted(rng, n=900, d=10, langs=("a", "b", "c")):
    """Languages offset along e0, e1; a balanced binary meaning along e5; correlated noise."""
    L = np.repeat(langs, n // len(langs))
    meaning = np.tile([0, 1], n // 2)
    X = rng.normal(size=(n, d)) @ (np.eye(d) + 0.3 * rng.normal(size=(d, d)))
    X[:, 5] += 3.0 * (2 * meaning - 1)
    offsets = np.zeros((len(langs), d))
    offsets[:, :2] = rng.normal(scale=3.0, size=(len(langs), 2))
    X += offsets[np.searchsorted(langs, L)]
    return X, L, meaning


def leace_reference(X, L):
    """Belrose et al. (2023), Theorem 3.1, with full one-hot labels, in plain numpy."""
    labs = np.unique(L)
    Z = (L[:, None] == labs[None, :]).astype(float)
    n, d = X.shape
    mu = X.mean(0)
    Xc, Zc = X - mu, Z - Z.mean(0)
    Sxx, Sxz = Xc.T @ Xc / (n - 1), Xc.T @ Zc / (n - 1)
    ev, V = np.linalg.eigh(Sxx)
    keep = ev > ev.max() * d * np.finfo(float).eps
    W = (V[:, keep] / np.sqrt(ev[keep])) @ V[:, keep].T
    W_inv = (V[:, keep] * np.sqrt(ev[keep])) @ V[:, keep].T
    U, s, _ = np.linalg.svd(W @ Sxz, full_matrices=False)
    U = U[:, s > 1e-10 * s.max()]  # drops the structural zero of one-hot labels
    P = W_inv @ U @ U.T @ W
    return X - Xc @ P.T


def _spread(Z, L):
    """Largest deviation of a language mean from the global mean, relative to the data."""
    dev = max(np.abs(Z[L == lab].mean(0) - Z.mean(0)).max() for lab in np.unique(L))
    return dev / np.abs(Z).max()


def test_matches_theorem_3_1(rng, to_backend):
    convert, back = to_backend
    X, L, _ = planted(rng)
    Z = back(LanguageEraser().fit(convert(X), languages=L).transform(convert(X)))
    np.testing.assert_allclose(Z, leace_reference(X, L), atol=1e-9)


def test_every_language_has_the_same_mean(rng, to_backend):
    convert, back = to_backend
    X, L, _ = planted(rng, langs=("a", "b", "c", "d", "e"), n=1000)
    est = LanguageEraser().fit(convert(X), languages=L)
    Z = back(est.transform(convert(X)))
    assert _spread(X, L) > 0.05
    assert _spread(Z, L) < 1e-6
    assert est.proj_left_.shape == (X.shape[1], 4) and est.proj_right_.shape == (4, X.shape[1])
    # the global mean is kept (affine eraser through μ)
    np.testing.assert_allclose(Z.mean(0), X.mean(0), atol=1e-10)


def test_weak_language_signal_is_erased_too(rng):
    """A mean shift of 1e-3 std: under concept-erasure's default svd_tol=0.01, erased here."""
    X = rng.normal(size=(2000, 4))
    L = np.repeat(["a", "b"], 1000)
    X[L == "b", 0] += 1e-3
    Z = LanguageEraser().fit(X, languages=L).transform(X)
    diff = Z[L == "a"].mean(0) - Z[L == "b"].mean(0)
    assert np.abs(diff).max() < 1e-12


def test_planted_direction_gone_meaning_kept(rng):
    X, L, meaning = planted(rng, n=600)
    Z = LanguageEraser().fit(X, languages=L).transform(X)
    clf = make_pipeline(StandardScaler(), LogisticRegression())
    lang_before = cross_val_score(clf, X, L, cv=3).mean()
    lang_after = cross_val_score(clf, Z, L, cv=3).mean()
    mean_before = cross_val_score(clf, X, meaning, cv=3).mean()
    mean_after = cross_val_score(clf, Z, meaning, cv=3).mean()
    assert lang_before > 0.9
    assert lang_after < 1 / 3 + 0.1  # majority class: 1/3
    assert mean_after > 0.95 and abs(mean_after - mean_before) < 0.03


@pytest.mark.parametrize("balanced", [True, False])
def test_oracle_equals_centering_plus_global_mean(rng, to_backend, balanced):
    convert, back = to_backend
    X, L, _ = planted(rng, n=1200)
    if not balanced:  # a language with 2 of 1200 rows: Σ_zz has an eigenvalue < 0.01
        keep = (L != "c") | (np.cumsum(L == "c") <= 2)
        X, L = X[keep], L[keep]
    est = LanguageEraser(oracle=True).fit(convert(X), languages=L)
    Z = back(est.transform(convert(X), languages=L))
    c = LanguageMeanCentering().fit(X, languages=L)
    np.testing.assert_allclose(Z, c.transform(X, languages=L) + c.global_mean_, atol=1e-9)
    np.testing.assert_allclose(est.means_, c.means_, atol=1e-10)
    assert est.coef_.shape == (X.shape[1], 2) and not hasattr(est, "proj_left_")


def _chunks(n, cuts):
    bounds = np.cumsum(cuts)
    edges = [0, *bounds[bounds < n].tolist(), n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


@settings(max_examples=10, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 90), min_size=1, max_size=6),
    seed=st.integers(0, 999),
    oracle=st.booleans(),
)
def test_partial_fit_any_chunking_equals_fit(cuts, seed, oracle):
    rng = np.random.default_rng(seed)
    X, L, _ = planted(rng, n=150, d=6)
    perm = rng.permutation(len(X))
    first = [int(np.flatnonzero(L[perm] == lab)[0]) for lab in np.unique(L)]
    perm = np.concatenate([perm[first], np.delete(perm, first)])  # every language up front
    X, L = X[perm], L[perm]
    cuts = [max(cuts[0], 3), *cuts[1:]]
    ref = LanguageEraser(oracle=oracle).fit(X, languages=L)
    inc = LanguageEraser(oracle=oracle)
    for sl in _chunks(len(X), cuts):
        inc.partial_fit(X[sl], languages=L[sl])
    kw = {"languages": L} if oracle else {}
    np.testing.assert_allclose(inc.transform(X, **kw), ref.transform(X, **kw), atol=1e-9)
    np.testing.assert_allclose(inc.means_, ref.means_, atol=1e-10)
    assert inc.n_samples_seen_ == len(X)


def test_torch_float32_in_tensor_out(rng):
    X, L, _ = planted(rng)
    ref = LanguageEraser().fit(X, languages=L)
    T = torch.from_numpy(X.astype(np.float32))
    est = LanguageEraser().fit(T, languages=L)
    out = est.transform(T)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref.transform(X), atol=1e-3)
    out32 = ref.transform(X.astype(np.float32))
    assert out32.dtype == np.float32
    o = LanguageEraser(oracle=True).fit(T, languages=L)
    assert o.transform(T, languages=L).dtype == torch.float32


def test_input_not_modified(rng):
    X, L, _ = planted(rng)
    X0 = X.copy()
    for oracle in (False, True):
        est = LanguageEraser(oracle=oracle).fit(X, languages=L)
        est.transform(X, languages=L)
    np.testing.assert_array_equal(X, X0)


def test_resume_after_pickle_equals_fit(rng):
    X, L, _ = planted(rng)
    for oracle in (False, True):
        ref = LanguageEraser(oracle=oracle).fit(X, languages=L)
        half = LanguageEraser(oracle=oracle).partial_fit(X[::2], languages=L[::2])
        blob = pickle.dumps(half)
        assert b"torch" not in blob  # the fitter's tensors are not pickled
        again = pickle.loads(blob)
        kept = [again.global_mean_, again.means_, getattr(again, "mean_z_", again.counts_)]
        snapshot = [a.copy() for a in kept]
        again.partial_fit(X[1::2], languages=L[1::2])
        for a, b in zip(kept, snapshot, strict=True):  # fitted arrays are not updated in place
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(
            again.transform(X, languages=L), ref.transform(X, languages=L), atol=1e-9
        )


def test_one_language_is_identity(rng):
    X = rng.normal(size=(30, 4))
    for oracle in (False, True):
        est = LanguageEraser(oracle=oracle).fit(X)
        np.testing.assert_allclose(est.transform(X), X, atol=1e-12)
    assert LanguageEraser().fit(X[:1]).transform(X[:1]).shape == (1, 4)


def test_bad_input(rng):
    X, L, _ = planted(rng, n=90, d=6)
    est = LanguageEraser().partial_fit(X[L != "c"], languages=L[L != "c"])
    Xn = X.copy()
    Xn[7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        LanguageEraser().fit(Xn, languages=L)
    before = est.means_.copy()
    with pytest.raises(ValueError, match="NaN or infinity"):
        est.partial_fit(Xn[L != "c"], languages=L[L != "c"])
    np.testing.assert_array_equal(est.means_, before)  # a bad batch changed nothing
    est.partial_fit(X[:3], languages=L[:3])  # and streaming goes on
    with pytest.raises(ValueError, match="languages has 5 entries"):
        LanguageEraser().fit(X, languages=L[:5])
    with pytest.raises(ValueError, match="dtype"):
        LanguageEraser().fit(torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        est.transform(X[:, :3])
    oracle = LanguageEraser(oracle=True).fit(X, languages=L)
    with pytest.raises(ValueError, match=r"\['sw'\] were not seen during fit"):
        oracle.transform(X[:2], languages=["sw", "sw"])
    with pytest.raises(ValueError, match="fitted with languages=.*got no languages="):
        oracle.transform(X[:2])
    with pytest.raises(ValueError, match="NaN or infinity"):
        LanguageEraser().fit(X, languages=L).transform(Xn)


def test_missing_package_gives_install_hint(rng, monkeypatch):
    monkeypatch.setitem(sys.modules, "concept_erasure", None)
    with pytest.raises(ImportError, match=r"pip install concept-erasure==0\.2\.4"):
        LanguageEraser().fit(rng.normal(size=(5, 2)))


@pytest.mark.skipif(not hasattr(posthoc_align, "LanguageEraser"), reason="export pending")
def test_save_load_round_trip_and_resume(rng, tmp_path):
    X, L, _ = planted(rng)
    for oracle in (False, True):
        kw = {"languages": L}
        est = LanguageEraser(oracle=oracle).partial_fit(X[::2], languages=L[::2])
        est.save(tmp_path / f"e{oracle}")
        again = posthoc_align.load(tmp_path / f"e{oracle}")
        np.testing.assert_array_equal(again.transform(X, **kw), est.transform(X, **kw))
        again.partial_fit(X[1::2], languages=L[1::2])
        ref = LanguageEraser(oracle=oracle).fit(X, languages=L)
        np.testing.assert_allclose(again.transform(X, **kw), ref.transform(X, **kw), atol=1e-9)


@parametrize_with_checks([LanguageEraser(), LanguageEraser(oracle=True)])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.mark.parametrize("oracle", [False, True])
@pytest.mark.parametrize("as_dask", [False, True])
def test_languages_first_seen_in_later_batches(rng, oracle, as_dask):
    """A language-sorted stream (each batch one language, as a cache of load_bible
    streams): every new language widens the concept; the result equals one fit."""
    X, L, _ = planted(rng, n=90, d=6)
    order = np.argsort(L, kind="stable")[::-1]  # languages in reverse sorted order
    X, L = X[order], L[order]
    ref = LanguageEraser(oracle=oracle).fit(X, languages=L)
    est = LanguageEraser(oracle=oracle)
    for s in range(0, len(X), 25):
        Xb = X[s : s + 25]
        if as_dask:
            da = pytest.importorskip("dask.array")
            Xb = da.from_array(Xb, chunks=10)
        est.partial_fit(Xb, languages=L[s : s + 25])
    assert est.languages_.tolist() == ref.languages_.tolist()
    np.testing.assert_array_equal(est.counts_, ref.counts_)
    kw = {"languages": L} if oracle else {}
    np.testing.assert_allclose(est.transform(X, **kw), ref.transform(X, **kw), atol=1e-10)


@pytest.mark.parametrize("oracle", [False, True])
@pytest.mark.parametrize("kind", ["numpy", "dask"])
def test_rejected_batch_with_a_new_language_changes_nothing(oracle, kind):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 4))
    langs = np.repeat(["en", "fr"], 50)
    X[langs == "fr"] += 1
    est = LanguageEraser(oracle=oracle).partial_fit(X, languages=langs)
    before = {k: np.copy(v) for k, v in vars(est).items() if k.endswith("_")}
    bad = rng.normal(size=(10, 4))
    bad[0, 0] = np.nan
    if kind == "dask":
        da = pytest.importorskip("dask.array")
        bad = da.from_array(bad, chunks=5)
    with pytest.raises(ValueError, match="NaN or infinity"):
        est.partial_fit(bad, languages=["zz"] * 10)
    for k, v in before.items():
        np.testing.assert_array_equal(getattr(est, k), v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.partial_fit(X[:10], languages=langs[:10])
    ref = LanguageEraser(oracle=oracle).fit(
        np.vstack([X, X[:10]]), languages=np.r_[langs, langs[:10]]
    )
    np.testing.assert_allclose(est.means_, ref.means_, atol=1e-12)
    if oracle:  # the oracle eraser uses the languages at transform
        with pytest.raises(ValueError, match="not seen during fit"):
            est.transform(X[:1], languages=["zz"])
