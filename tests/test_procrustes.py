"""ProcrustesAligner / RotateAlign against scipy and planted rotations."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import orthogonal_procrustes
from scipy.stats import ortho_group

from posthoc_align import PerLayer, ProcrustesAligner, RotateAlign
from posthoc_align.procrustes import orthogonal_map


def planted(rng, n=80, d=5, langs=("en", "fr", "de"), noise=0.0, offsets=True):
    """Pivot rows + rotated, shifted copies per language; returns rotations too."""
    en = rng.normal(size=(n, d))
    X, L, P, R = [en], ["en"] * n, list(range(n)), {}
    for k, lang in enumerate(langs[1:]):
        Q = ortho_group.rvs(d, random_state=k + 1)
        off = rng.normal(scale=4.0, size=d) if offsets else 0.0
        X.append(en @ Q + off + noise * rng.normal(size=en.shape))
        L += [lang] * n
        P += list(range(n))
        R[lang] = Q
    return np.vstack(X), np.array(L), np.array(P), R


def test_matches_scipy(rng, to_backend):
    convert, back = to_backend
    X, L, P, _ = planted(rng, noise=0.3)
    for center in (True, False):
        est = ProcrustesAligner(pivot="en", center=center).fit(convert(X), languages=L, pair_ids=P)
        for lang in ("fr", "de"):
            A, B = X[L == lang], X[L == "en"]
            if center:
                A, B = A - A.mean(0), B - B.mean(0)
            R_ref, _ = orthogonal_procrustes(A, B)
            i = est.languages_.tolist().index(lang)
            np.testing.assert_allclose(est.rotations_[i], R_ref, atol=1e-10)
        Z = back(est.transform(convert(X), languages=L))
        for lang in ("fr", "de"):
            i = est.languages_.tolist().index(lang)
            shift = X[L == lang].mean(0) if center else 0
            np.testing.assert_allclose(
                Z[L == lang], (X[L == lang] - shift) @ est.rotations_[i], atol=1e-10
            )
        piv_shift = X[L == "en"].mean(0) if center else 0
        np.testing.assert_allclose(Z[L == "en"], X[L == "en"] - piv_shift, atol=1e-12)


def test_recovers_planted_rotation_and_offsets(rng):
    X, L, P, R = planted(rng, noise=0.0)
    est = ProcrustesAligner(pivot="en").fit(X, languages=L, pair_ids=P)
    for lang, Q in R.items():
        i = est.languages_.tolist().index(lang)
        np.testing.assert_allclose(est.rotations_[i], Q.T, atol=1e-10)
    Z = est.transform(X, languages=L)
    for lang in R:
        np.testing.assert_allclose(Z[L == lang], Z[L == "en"], atol=1e-10)


def test_identical_inputs_give_identity(rng):
    en = rng.normal(size=(30, 4))
    X = np.vstack([en, en])
    est = ProcrustesAligner().fit(X, languages=["en"] * 30 + ["fr"] * 30, pair_ids=[*range(30)] * 2)
    np.testing.assert_allclose(est.rotations_, np.tile(np.eye(4), (2, 1, 1)), atol=1e-12)


def test_rows_out_of_order_and_word_pairs(rng):
    """Pairs are found by id, not by position; extra unpaired rows are allowed."""
    X, L, P, R = planted(rng, noise=0.0)
    perm = rng.permutation(len(X))
    extra = rng.normal(size=(7, X.shape[1]))  # words without translations (ids unseen)
    Xp = np.vstack([X[perm], extra])
    Lp = np.concatenate([L[perm], ["fr"] * 7])
    Pp = np.concatenate([P[perm].astype(str), [f"w{i}" for i in range(7)]])
    est = ProcrustesAligner(center=False).fit(Xp, languages=Lp, pair_ids=Pp)
    i = est.languages_.tolist().index("de")
    A = X[L == "de"]
    np.testing.assert_allclose(
        est.rotations_[i], orthogonal_procrustes(A, X[L == "en"])[0], atol=1e-10
    )
    assert est.n_pairs_ == {"de": 80, "fr": 80}


@settings(max_examples=15, deadline=None)
@given(cuts=st.lists(st.integers(1, 90), min_size=1, max_size=6), seed=st.integers(0, 999))
def test_partial_fit_any_chunking_equals_fit(cuts, seed):
    rng = np.random.default_rng(seed)
    X, L, P, _ = planted(rng, n=40, d=4, noise=0.5)
    perm = rng.permutation(len(X))
    X, L, P = X[perm], L[perm], P[perm]
    ref = ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    inc = ProcrustesAligner()
    bounds = np.cumsum(cuts)
    start = 0
    for stop in [*bounds[bounds < len(X)].tolist(), len(X)]:
        inc.partial_fit(X[start:stop], languages=L[start:stop], pair_ids=P[start:stop])
        start = stop
    np.testing.assert_allclose(inc.rotations_, ref.rotations_, atol=1e-9)
    np.testing.assert_allclose(inc.means_, ref.means_, atol=1e-12)
    assert inc._pairs.n_pending() == {}


def test_partial_fit_pivot_arrives_last(rng):
    X, L, P, _ = planted(rng, n=30, d=3, noise=0.2)
    ref = ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    inc = ProcrustesAligner()
    order = np.argsort(L == "en", kind="stable")  # every pivot row at the end
    first, second = order[:60], order[60:]
    inc.partial_fit(X[first], languages=L[first], pair_ids=P[first])
    assert set(inc.unpaired_languages_) == {"fr", "de"}
    with pytest.raises(ValueError, match="no pairs with the pivot"):
        inc.transform(X[first], languages=L[first])
    inc.partial_fit(X[second], languages=L[second], pair_ids=P[second])
    np.testing.assert_allclose(inc.rotations_, ref.rotations_, atol=1e-10)


def test_torch_float32_matches_numpy(rng):
    X, L, P, _ = planted(rng, noise=0.3)
    ref = ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    T = torch.from_numpy(X.astype(np.float32))
    est = ProcrustesAligner().fit(T, languages=L, pair_ids=P)
    np.testing.assert_allclose(est.rotations_, ref.rotations_, atol=1e-5)
    out = est.transform(T, languages=L)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


def test_bad_input(rng):
    X, L, P, _ = planted(rng, n=20, d=3)
    with pytest.raises(ValueError, match="needs pair_ids"):
        ProcrustesAligner().fit(X, languages=L)
    with pytest.raises(ValueError, match="needs languages"):
        ProcrustesAligner().fit(X, pair_ids=P)
    with pytest.raises(ValueError, match="pivot language 'xx' does not occur"):
        ProcrustesAligner(pivot="xx").fit(X, languages=L, pair_ids=P)
    P2 = P.copy()
    P2[L == "de"] += 1000
    with pytest.raises(ValueError, match=r"\['de'\] have no rows paired with the pivot"):
        ProcrustesAligner().fit(X, languages=L, pair_ids=P2)
    P3 = P.copy()
    P3[(L == "fr").nonzero()[0][1]] = P3[(L == "fr").nonzero()[0][0]]
    with pytest.raises(ValueError, match="occurs 2 times in language 'fr'"):
        ProcrustesAligner().fit(X, languages=L, pair_ids=P3)
    with pytest.raises(ValueError, match="pair_ids has 5 entries"):
        ProcrustesAligner().fit(X, languages=L, pair_ids=P[:5])
    with pytest.warns(UserWarning, match="fewer pivot pairs than dimensions"):
        ProcrustesAligner().fit(X[::10], languages=L[::10], pair_ids=P[::10])
    est = ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    with pytest.raises(ValueError, match=r"\['sw'\] were not seen during fit"):
        est.transform(X[:2], languages=["sw", "sw"])


def test_orthogonal_map_is_orthogonal(rng):
    W = orthogonal_map(rng.normal(size=(6, 6)))
    np.testing.assert_allclose(W @ W.T, np.eye(6), atol=1e-12)


def test_rotate_align_per_layer(rng):
    n, layers, d = 50, 5, 4
    Xen = rng.normal(size=(n, layers, d))
    Q = ortho_group.rvs(d, random_state=3)
    Xfr = Xen @ Q
    X = np.concatenate([Xen, Xfr])
    L, P = ["en"] * n + ["fr"] * n, list(range(n)) * 2
    ra = RotateAlign(layers=(-2, -1)).fit(X, languages=L, pair_ids=P)
    assert ra.layers_ == (3, 4)
    Z = ra.transform(X, languages=L)
    np.testing.assert_array_equal(Z[:, :3], X[:, :3])  # passed through
    for i in (3, 4):
        np.testing.assert_allclose(Z[n:, i], Z[:n, i], atol=1e-10)
        ref = ProcrustesAligner().fit(X[:, i], languages=L, pair_ids=P)
        np.testing.assert_allclose(Z[:, i], ref.transform(X[:, i], languages=L), atol=1e-12)
    assert isinstance(ra.estimators_[0], ProcrustesAligner)
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        RotateAlign(layers=(7,)).fit(X, languages=L, pair_ids=P)
    with pytest.raises(ValueError, match="3-D array"):
        ra.transform(X[:, 0], languages=L)
    with pytest.raises(ValueError, match="fitted on 5 layers"):
        ra.transform(X[:, :4], languages=L)


def test_per_layer_partial_fit(rng):
    from posthoc_align import LanguageMeanCentering

    X = rng.normal(size=(40, 3, 2))
    L = rng.choice(["a", "b"], size=40)
    full = PerLayer(LanguageMeanCentering()).fit(X, languages=L)
    inc = PerLayer(LanguageMeanCentering())
    for sl in (slice(0, 13), slice(13, 40)):
        inc.partial_fit(X[sl], languages=L[sl])
    for a, b in zip(full.estimators_, inc.estimators_, strict=True):
        np.testing.assert_allclose(a.means_, b.means_, atol=1e-12)
    T = torch.from_numpy(X)
    out = full.transform(T, languages=L)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), full.transform(X, languages=L), atol=1e-12)


def test_pair_matching_across_batches_mixed_order(rng):
    """Vectorised pair-id matching: string ids, partners in any batch, unpaired extras."""
    X, L, P, _ = planted(rng, n=60, d=4, noise=0.3)
    P = np.array([f"s{p}" for p in P])
    ref = ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    perm = rng.permutation(len(X))
    X, L, P = X[perm], L[perm], P[perm]
    extra = rng.normal(size=(5, 4))
    inc = ProcrustesAligner()
    # non-pivot rows first (they wait), then the pivot rows and extras without partners
    first = np.flatnonzero(L != "en")[:70]
    rest = np.setdiff1d(np.arange(len(X)), first)
    inc.partial_fit(X[first], languages=L[first], pair_ids=P[first])
    assert sum(inc._pairs.n_pending().values()) == 70
    for chunk in np.array_split(rest, 3):
        inc.partial_fit(X[chunk], languages=L[chunk], pair_ids=P[chunk])
    inc.partial_fit(extra, languages=["fr"] * 5, pair_ids=[f"w{i}" for i in range(5)])
    assert inc._pairs.n_pending() == {"fr": 5}
    np.testing.assert_allclose(inc.rotations_[1:], ref.rotations_[1:], atol=1e-9)
    assert inc.n_pairs_ == ref.n_pairs_ == {"de": 60, "fr": 60}


def test_pair_ids_duplicates_across_batches(rng):
    X, L, P, _ = planted(rng, n=20, d=3)
    est = ProcrustesAligner().partial_fit(X, languages=L, pair_ids=P)
    with pytest.raises(ValueError, match="of pivot language 'en' was already seen"):
        est.partial_fit(X[:3], languages=L[:3], pair_ids=P[:3])
    # a non-pivot row still waiting for its partner cannot be sent twice
    est = ProcrustesAligner().partial_fit(X[20:22], languages=L[20:22], pair_ids=P[20:22])
    with pytest.raises(ValueError, match="of language 'fr' was already seen"):
        est.partial_fit(X[20:21], languages=L[20:21], pair_ids=P[20:21])
    assert est._pairs.n_pending() == {"fr": 2}


def test_pair_matching_float64_then_float32_batches(rng):
    """Buffered rows keep the first batch's dtype; later batches are converted."""
    X, L, P, _ = planted(rng, n=40, d=4, noise=0.2)
    ref = ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    inc = ProcrustesAligner()
    piv = L == "en"
    inc.partial_fit(X[~piv], languages=L[~piv], pair_ids=P[~piv])
    inc.partial_fit(
        torch.from_numpy(X[piv].astype(np.float32)).numpy(), languages=L[piv], pair_ids=P[piv]
    )
    np.testing.assert_allclose(inc.rotations_, ref.rotations_, atol=1e-5)


@pytest.mark.parametrize("as_torch", [False, True])
def test_per_layer_writes_into_one_output(rng, as_torch):
    """PerLayer's in-place path equals each estimator's own transform, for every kind."""
    from posthoc_align import LSAR, LanguageMeanCentering, LanguageStandardizer

    n, layers, d = 60, 4, 5
    X = rng.normal(size=(n, layers, d)).astype(np.float32) + 3.0
    L = np.repeat(["en", "fr", "de"], n // 3)
    P = np.tile(np.arange(n // 3), 3)
    Xin = torch.from_numpy(X) if as_torch else X
    for est in (
        PerLayer(LanguageMeanCentering(), layers=[0, 2]),
        PerLayer(LanguageStandardizer(), layers=[1]),
        PerLayer(LSAR(), layers="all"),
        RotateAlign(layers=(-1, 1)),
    ):
        est.fit(Xin, languages=L, pair_ids=P)
        Z = est.transform(Xin, languages=L)
        assert type(Z) is type(Xin) and Z.dtype == Xin.dtype
        Zn = Z.numpy() if as_torch else Z
        for j in range(layers):
            if j not in est.layers_:
                np.testing.assert_array_equal(Zn[:, j], X[:, j])
        for i, e in zip(est.layers_, est.estimators_, strict=True):
            kw = {} if isinstance(e, LSAR) else {"languages": L}
            np.testing.assert_allclose(Zn[:, i], e.transform(X[:, i], **kw), atol=1e-5)
    np.testing.assert_array_equal(Xin if not as_torch else Xin.numpy(), X)  # not mutated


def test_solves_together_equals_immediate_solves_and_fails_safe(rng):
    """Fits inside solves_together() get the same maps once the block ends; if the
    block raises, the queued maps are NaN, never uninitialised memory."""
    from posthoc_align.procrustes import solves_together

    X = rng.normal(size=(300, 6))
    langs = np.repeat(["en", "fr", "de"], 100)
    ids = np.tile(np.arange(100), 3)
    ref = ProcrustesAligner().fit(X, languages=langs, pair_ids=ids)
    with solves_together():
        a = ProcrustesAligner().fit(X, languages=langs, pair_ids=ids)
        with solves_together():  # nested blocks join the outer one
            b = ProcrustesAligner().fit(X * 2, languages=langs, pair_ids=ids)
    ref_b = ProcrustesAligner().fit(X * 2, languages=langs, pair_ids=ids)
    np.testing.assert_allclose(a.rotations_, ref.rotations_, atol=1e-12)
    np.testing.assert_allclose(b.rotations_, ref_b.rotations_, atol=1e-12)
    with pytest.raises(RuntimeError, match="boom"), solves_together():
        c = ProcrustesAligner().fit(X, languages=langs, pair_ids=ids)
        raise RuntimeError("boom")
    pivot = list(c.languages_).index("en")
    others = [k for k in range(3) if k != pivot]
    assert np.isnan(c.rotations_[others]).all()
    np.testing.assert_array_equal(c.rotations_[pivot], np.eye(6))


def _two_language_data(seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(60, 3))
    X[30:] = X[:30] @ np.linalg.qr(rng.normal(size=(3, 3)))[0] + 2
    return X, np.repeat(["en", "fr"], 30), np.tile(np.arange(30), 2)


@pytest.mark.filterwarnings("ignore:fewer pivot pairs")
@pytest.mark.parametrize("flaw", ["duplicate_in_batch", "seen_before"])
def test_rejected_partial_fit_batch_leaves_the_fit_unchanged(flaw):
    X, langs, ids = _two_language_data()
    A, B, C = np.r_[0:10, 30:40], np.r_[20:30, 50:60], np.r_[10:20, 40:50]
    bad = ids.copy()
    if flaw == "duplicate_in_batch":
        bad[21] = bad[20]  # two 'en' rows with one pair_id in the batch
    else:
        bad[50] = ids[30]  # an 'fr' id already paired in batch A
    est = ProcrustesAligner().partial_fit(X[A], languages=langs[A], pair_ids=ids[A])
    with pytest.raises(ValueError, match="pair_id"):
        est.partial_fit(X[B], languages=langs[B], pair_ids=bad[B])
    est.partial_fit(X[C], languages=langs[C], pair_ids=ids[C])
    rows = np.r_[A, C]
    ref = ProcrustesAligner().fit(X[rows], languages=langs[rows], pair_ids=ids[rows])
    np.testing.assert_allclose(est.means_, ref.means_, atol=1e-12)
    np.testing.assert_allclose(est.rotations_, ref.rotations_, atol=1e-10)
    assert est.n_pairs_ == ref.n_pairs_


@pytest.mark.filterwarnings("ignore:fewer pivot pairs")
def test_duplicate_non_pivot_id_across_batches_is_refused_like_fit():
    X = np.random.default_rng(0).normal(size=(6, 3))
    langs = np.array(["en", "en", "en", "fr", "fr", "fr"])
    ids = np.array([0, 1, 2, 0, 1, 0])
    with pytest.raises(ValueError, match="pair_id 0 occurs 2 times"):
        ProcrustesAligner().fit(X, languages=langs, pair_ids=ids)
    est = ProcrustesAligner().partial_fit(X[:5], languages=langs[:5], pair_ids=ids[:5])
    with pytest.raises(ValueError, match="pair_id 0 of language 'fr' was already seen"):
        est.partial_fit(X[5:], languages=langs[5:], pair_ids=ids[5:])
    assert est.n_pairs_ == {"fr": 2}


def test_few_pairs_warning_reaches_partial_fit_streams():
    # fit warns at its end; a partial_fit stream has no end, so its first transform
    # warns (once per state), as the README promises (review finding)
    import warnings

    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 32))
    langs, ids = np.repeat(["en", "fr"], 10), np.tile(np.arange(10), 2)
    est = ProcrustesAligner()
    est.partial_fit(X[::2], languages=langs[::2], pair_ids=ids[::2])
    est.partial_fit(X[1::2], languages=langs[1::2], pair_ids=ids[1::2])
    with pytest.warns(UserWarning, match=r"fewer pivot pairs than dimensions \(32\)"):
        est.transform(X, languages=langs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.transform(X, languages=langs)  # the same state: warned already
