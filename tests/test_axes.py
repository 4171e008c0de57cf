"""LanguageAxes (LDA sensitive axes, neutral axes) on planted geometry; ScatterMoments."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import subspace_angles
from scipy.stats import ortho_group
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import posthoc_align
from posthoc_align._covariance import ScatterMoments
from posthoc_align.axes import LDA_RIDGE, LanguageAxes


def planted(rng, n_per=200, d=8, langs=("a", "b", "c"), variances=None):
    """Language means differ only in span(U) (2-D); within-language scatter exactly B D Bᵀ.

    ``B`` is a random orthonormal basis whose first two columns are ``U``, so the
    pooled within scatter is block-diagonal with respect to span(U) (isotropic when
    ``variances`` is None) and LDA must return exactly span(U).
    """
    B = ortho_group.rvs(d, random_state=int(rng.integers(1 << 30)))
    U = B[:, :2]
    L = np.repeat(langs, n_per)
    E = rng.normal(size=(len(L), d))
    for lab in langs:
        E[L == lab] -= E[L == lab].mean(0)
    ev, V = np.linalg.eigh(E.T @ E / len(L))
    E = E @ (V / np.sqrt(ev)) @ V.T  # pooled within covariance exactly I
    D = np.ones(d) if variances is None else np.asarray(variances, dtype=float)
    E = E @ B @ np.diag(np.sqrt(D)) @ B.T
    offsets = rng.normal(scale=3.0, size=(len(langs), 2)) @ U.T
    X = E + offsets[np.searchsorted(langs, L)] + rng.normal(size=d)
    return X, L, U


def test_sensitive_span_recovered(rng, to_backend):
    convert, back = to_backend
    for variances in (None, [4.0, 0.5, 3.0, 2.0, 1.0, 0.3, 0.2, 0.1]):
        X, L, U = planted(rng, variances=variances)
        est = LanguageAxes().fit(convert(X), languages=L)
        assert est.sensitive_axes_.shape == (2, 8) and est.n_sensitive_ == 2
        assert np.max(subspace_angles(est.sensitive_axes_.T, U)) < 1e-8
        np.testing.assert_allclose(np.linalg.norm(est.sensitive_axes_, axis=1), 1.0)
        assert np.all(np.diff(est.sensitive_scores_) <= 0)
        # the most neutral d - 2 axes exclude the planted subspace, the last two span it
        assert np.abs(est.neutral_axes_[:6] @ U).max() < 1e-8
        assert np.max(subspace_angles(est.neutral_axes_[6:].T, U)) < 1e-8
        Z = back(est.transform(convert(X)))
        means = np.stack([Z[L == lab].mean(0) for lab in "abc"])
        np.testing.assert_allclose(means, np.broadcast_to(Z.mean(0), means.shape), atol=1e-10)


def test_matches_sklearn_lda_and_scores(rng):
    X = rng.normal(size=(600, 6)) @ rng.normal(size=(6, 6))
    L = rng.choice(["a", "b", "c", "d"], size=600)
    X += rng.normal(scale=2.0, size=(4, 6))[np.searchsorted(["a", "b", "c", "d"], L)]
    est = LanguageAxes().fit(X, languages=L)
    lda = LinearDiscriminantAnalysis(solver="eigen").fit(X, L)
    ref = lda.scalings_[:, :3].T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    cos = np.abs(np.sum(ref * est.sensitive_axes_, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    # the scores are the generalised Rayleigh quotients
    labs = np.unique(L)
    mu = X.mean(0)
    Sw = sum((X[L == a] - X[L == a].mean(0)).T @ (X[L == a] - X[L == a].mean(0)) for a in labs)
    Sb = sum(
        (L == a).sum() * np.outer(X[L == a].mean(0) - mu, X[L == a].mean(0) - mu) for a in labs
    )
    Sr = Sw + LDA_RIDGE * np.trace(Sw) / 6 * np.eye(6)
    for v, lam in zip(est.sensitive_axes_, est.sensitive_scores_, strict=True):
        np.testing.assert_allclose(lam, (v @ Sb @ v) / (v @ Sr @ v), rtol=1e-8)


def _neutral_score(X, L, v):
    """The docstring's neutral score, straight from the rows."""
    labs = np.unique(L)
    pi = np.array([(L == a).mean() for a in labs])
    m = np.array([X[L == a].mean(0) @ v for a in labs])
    s2 = np.array([np.var(X[L == a] @ v) for a in labs])
    sig2 = pi @ s2
    return pi @ (m - X.mean(0) @ v) ** 2 / sig2 + pi @ (s2 - sig2) ** 2 / sig2**2


def test_neutral_axes_scores_and_variance_term(rng):
    """Means differ along e0, e1; one language's variance along e3: those rank last."""
    n, d = 900, 6
    L = np.repeat(["a", "b", "c"], n // 3)
    X = rng.normal(size=(n, d)) * np.array([1.0, 1.0, 1.5, 0.5, 0.25, 2.0])
    X[:, :2] += np.array([[-2.0, 0.0], [0.0, 2.0], [2.0, -1.0]])[
        np.searchsorted(["a", "b", "c"], L)
    ]
    X[L == "a", 3] *= 3.0
    est = LanguageAxes().fit(X, languages=L)
    V = est.neutral_axes_
    np.testing.assert_allclose(V @ V.T, np.eye(d), atol=1e-12)
    for v, score in zip(V, est.neutral_scores_, strict=True):
        np.testing.assert_allclose(score, _neutral_score(X, L, v), rtol=1e-6, atol=1e-12)
    assert np.all(np.diff(est.neutral_scores_) >= 0)
    assert np.max(subspace_angles(V[-3:].T, np.eye(d)[:, [0, 1, 3]])) < 0.1
    assert np.abs(V[-3:, [0, 1]]).max(axis=1).argmin() == 0  # e3 is the least bad of the 3
    assert est.neutral_scores_[-3] > 10 * est.neutral_scores_[-4]
    # the complement axes (first d - 2) have exactly equal language means
    Z = (X - X.mean(0)) @ V[:3].T
    means = np.stack([Z[L == lab].mean(0) for lab in "abc"])
    np.testing.assert_allclose(means, 0.0, atol=1e-10)


def test_keep_neutral_output_and_feature_names(rng):
    X, L, U = planted(rng)
    est = LanguageAxes(mode="keep_neutral").fit(X, languages=L)
    assert est.n_neutral_ == 6
    Z = est.transform(X)
    assert Z.shape == (len(X), 6)
    np.testing.assert_allclose(Z, (X - X.mean(0)) @ est.neutral_axes_[:6].T, atol=1e-10)
    assert est.get_feature_names_out().tolist() == [f"languageaxes{i}" for i in range(6)]
    clf = make_pipeline(StandardScaler(), LogisticRegression())
    assert cross_val_score(clf, X, L, cv=3).mean() > 0.9
    assert cross_val_score(clf, Z, L, cv=3).mean() < 1 / 3 + 0.1
    df = (
        LanguageAxes(mode="keep_neutral", n_neutral=2)
        .set_output(transform="pandas")
        .fit_transform(X, languages=L)
    )
    assert list(df.columns) == ["languageaxes0", "languageaxes1"]
    rm = LanguageAxes().fit(X, languages=L)
    assert rm.get_feature_names_out().tolist() == [f"x{i}" for i in range(8)]


def test_remove_sensitive_uses_orthonormalised_axes(rng):
    X = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5))
    L = rng.choice(["a", "b", "c", "d"], size=400)
    est = LanguageAxes(n_sensitive=2).fit(X, languages=L)
    Q = est.components_
    np.testing.assert_allclose(Q @ Q.T, np.eye(2), atol=1e-12)
    assert np.max(subspace_angles(Q.T, est.sensitive_axes_[:2].T)) < 1e-10
    mu = X.mean(0)
    np.testing.assert_allclose(est.transform(X), X - (X - mu) @ Q.T @ Q, atol=1e-10)
    zero = LanguageAxes(n_sensitive=0).fit(X, languages=L)
    np.testing.assert_allclose(zero.transform(X), X, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(cuts=st.lists(st.integers(1, 60), min_size=1, max_size=5), seed=st.integers(0, 999))
def test_partial_fit_any_chunking_equals_fit(cuts, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(120, 5)) + 3.0 * rng.normal(size=(3, 5)).repeat(40, axis=0)
    L = np.repeat(["x", "y", "z"], 40)
    perm = rng.permutation(120)
    X, L = X[perm] + 100.0, L[perm]  # a large common offset tests the shifted sums
    ref = LanguageAxes().fit(X, languages=L)
    inc = LanguageAxes()
    cuts = [max(cuts[0], 4), *cuts[1:]]  # the first batch needs more rows than languages
    bounds = np.cumsum(cuts)
    edges = [0, *bounds[bounds < 120].tolist(), 120]
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        inc.partial_fit(X[a:b], languages=L[a:b])
    np.testing.assert_allclose(inc.transform(X), ref.transform(X), atol=1e-8)
    np.testing.assert_allclose(inc.means_, ref.means_, atol=1e-10)
    np.testing.assert_allclose(inc.neutral_scores_, ref.neutral_scores_, rtol=1e-6, atol=1e-12)


def test_numpy_torch_float32(rng):
    X, L, _ = planted(rng)
    ref = LanguageAxes().fit(X, languages=L)
    T = torch.from_numpy(X.astype(np.float32))
    est = LanguageAxes().fit(T, languages=L)
    out = est.transform(T)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref.transform(X), atol=1e-3)
    kn = LanguageAxes(mode="keep_neutral").fit(T, languages=L).transform(T)
    assert isinstance(kn, torch.Tensor) and kn.dtype == torch.float32 and kn.shape[1] == 6
    assert ref.transform(X.astype(np.float32)).dtype == np.float32


def test_bad_input(rng):
    X, L, _ = planted(rng, n_per=10)
    with pytest.raises(
        ValueError, match=r"n_sensitive=3 is larger.*L - 1, n_features\) = 2 for 3 language"
    ):
        LanguageAxes(n_sensitive=3).fit(X, languages=L)
    with pytest.raises(ValueError, match="n_neutral=9 is larger than n_features=8"):
        LanguageAxes(n_neutral=9).fit(X, languages=L)
    with pytest.raises(ValueError, match="more rows than languages"):
        LanguageAxes().fit(X[[0, 10, 20]], languages=L[[0, 10, 20]])
    with pytest.raises(ValueError, match="within-language scatter is zero"):
        LanguageAxes().fit(np.repeat(X[[0, 10]], 2, axis=0), languages=["a", "a", "b", "b"])
    Xn = X.copy()
    Xn[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        LanguageAxes().fit(Xn, languages=L)
    est = LanguageAxes().fit(X, languages=L)
    with pytest.raises(ValueError, match="NaN or infinity"):
        est.transform(Xn)
    with pytest.raises(ValueError, match="NaN or infinity"):
        LanguageAxes(mode="keep_neutral").fit(X, languages=L).transform(Xn)
    with pytest.raises(ValueError, match="languages has 4 entries"):
        LanguageAxes().fit(X, languages=L[:4])
    with pytest.raises(ValueError):
        LanguageAxes(mode="both").fit(X, languages=L)
    X0 = X.copy()
    LanguageAxes().fit(X, languages=L).transform(X)
    np.testing.assert_array_equal(X, X0)


def test_one_language_gives_pca(rng):
    X = rng.normal(size=(50, 4)) * [3.0, 2.0, 1.0, 0.5]
    est = LanguageAxes(mode="keep_neutral").fit(X)
    assert est.sensitive_axes_.shape == (0, 4) and est.n_neutral_ == 4
    np.testing.assert_allclose(np.abs(est.neutral_axes_), np.eye(4), atol=0.3)
    np.testing.assert_array_equal(est.neutral_scores_, 0.0)
    np.testing.assert_allclose(LanguageAxes().fit(X).transform(X), X)


def test_scatter_moments_merge_and_state(rng):
    X = rng.normal(size=(90, 4)) + 50.0
    L = rng.choice(["a", "b", "c"], size=90)

    def filled(rows):
        labels, codes = np.unique(L[rows], return_inverse=True)
        return ScatterMoments().update(torch.from_numpy(X[rows]), labels, codes)

    whole = filled(slice(None))
    merged = filled(slice(0, 31)).merge(filled(slice(31, 70))).merge(filled(slice(70, 90)))
    order = [merged.moments.index[lab] for lab in whole.labels]
    np.testing.assert_allclose(merged.scatters()[order], whole.scatters(), atol=1e-9)
    np.testing.assert_allclose(merged.within(), whole.within(), atol=1e-9)
    np.testing.assert_allclose(merged.between(), whole.between(), atol=1e-9)
    np.testing.assert_array_equal(merged.counts[order], whole.counts)
    again = ScatterMoments.from_state(*whole.state())
    np.testing.assert_array_equal(again.within(), whole.within())
    assert ScatterMoments().merge(whole).labels == whole.labels
    Xn = X[:5].copy()
    Xn[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        whole.update(torch.from_numpy(Xn), np.array(["zz"]), np.zeros(5, dtype=np.int64))
    assert "zz" not in whole.labels  # nothing was added


@pytest.mark.skipif(not hasattr(posthoc_align, "LanguageAxes"), reason="export pending")
def test_save_load_round_trip(rng, tmp_path):
    X, L, _ = planted(rng)
    for mode in ("remove_sensitive", "keep_neutral"):
        est = LanguageAxes(mode=mode).fit(X, languages=L)
        est.save(tmp_path / mode)
        again = posthoc_align.load(tmp_path / mode)
        np.testing.assert_array_equal(again.transform(X), est.transform(X))
        assert again.get_feature_names_out().tolist() == est.get_feature_names_out().tolist()
    # the per-language scatter (`_scatter`) is saved only once persistence knows it
    if hasattr(again, "_scatter"):
        again.partial_fit(X, languages=L)
    else:
        with pytest.raises(ValueError, match="no streaming statistics"):
            again.partial_fit(X, languages=L)


@parametrize_with_checks([LanguageAxes(), LanguageAxes(mode="keep_neutral", n_neutral=1)])
def test_sklearn_compatible(estimator, check):
    check(estimator)
