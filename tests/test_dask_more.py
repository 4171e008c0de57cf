"""Dask arrays for the metrics and the issue-6 estimators: equal to numpy, lazy, bounded."""

import warnings

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

import posthoc_align as pa
from posthoc_align import metrics as M
from posthoc_align.axes import LanguageAxes
from posthoc_align.erasure import LanguageEraser
from posthoc_align.generalized_procrustes import GeneralizedProcrustes

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

pytest.importorskip("concept_erasure")


@pytest.fixture
def sync():
    with dask.config.set(scheduler="synchronous"):
        yield


def _langs(rng, n=240, d=6):
    L = rng.choice(["en", "fr", "de", "sw"], size=n)
    X = rng.normal(size=(n, d)) + 5 * (L[:, None] == "fr") - 3 * (L[:, None] == "de")
    X[L == "sw", 1] *= 3.0  # a different spread too
    return X, L


def _gpa_data(rng, n=50, d=5, drop=(3, 60, 61, 130, 131, 132)):
    """Three rotated, shifted, noisy copies; some pair ids missing; rows shuffled."""
    S = rng.normal(size=(n, d))
    X = np.vstack(
        [
            S @ ortho_group.rvs(d, random_state=k) + k + 0.05 * rng.normal(size=(n, d))
            for k in range(3)
        ]
    )
    L, P = np.repeat(["de", "en", "fr"], n), np.tile(np.arange(n), 3)
    keep = np.ones(len(X), bool)
    keep[list(drop)] = False
    perm = rng.permutation(int(keep.sum()))
    return X[keep][perm], L[keep][perm], P[keep][perm]


def _metric_data(rng, n=60, d=8):
    """en/de translations (10 de rows unpaired: distractors) and an unrelated fr."""
    E = rng.normal(size=(n, d))
    X = np.vstack(
        [
            E + 0.4 * rng.normal(size=(n, d)),
            E + 0.6 * rng.normal(size=(n, d)),
            rng.normal(size=(n, d)),
        ]
    )
    L, P = np.repeat(["en", "de", "fr"], n), np.tile(np.arange(n), 3)
    P[n : n + 10] += 1000
    perm = rng.permutation(len(X))
    return X[perm], L[perm], P[perm]


# -- estimators ----------------------------------------------------------------------

ESTIMATORS = [
    LanguageEraser(),
    LanguageEraser(oracle=True),
    LanguageAxes(),
    LanguageAxes(mode="keep_neutral", n_neutral=3),
]
ATTRS = (
    "means_",
    "counts_",
    "covariance_",
    "proj_left_",
    "proj_right_",
    "coef_",
    "components_",
    "sensitive_axes_",
    "neutral_axes_",
    "neutral_scores_",
)


def _ids(est):
    return f"{type(est).__name__}-{est.oracle if hasattr(est, 'oracle') else est.mode}"


def _check_same(got, ref):
    for attr in ATTRS:
        if hasattr(ref, attr):
            np.testing.assert_allclose(getattr(got, attr), getattr(ref, attr), atol=1e-10)


@pytest.mark.parametrize("est", ESTIMATORS, ids=_ids)
@pytest.mark.parametrize("chunks", [7, 240])
def test_estimator_fit_equals_numpy(est, chunks, rng, sync):
    X, L = _langs(rng)
    ref = est.__class__(**est.get_params()).fit(X, languages=L)
    got = est.__class__(**est.get_params()).fit(
        da.from_array(X, chunks=(chunks, -1)), languages=da.from_array(L, chunks=chunks)
    )
    assert got.n_features_in_ == X.shape[1]
    _check_same(got, ref)
    kw = {"languages": L} if getattr(est, "oracle", False) else {}
    out = got.transform(da.from_array(X, chunks=(50, 3)), **kw)
    assert isinstance(out, da.Array)
    want = ref.transform(X, **kw)
    assert out.shape == want.shape
    np.testing.assert_allclose(out.compute(), want, atol=1e-10)


@pytest.mark.parametrize("est", ESTIMATORS[:3], ids=_ids)
def test_estimator_partial_fit_mixes_numpy_and_dask(est, rng, sync):
    X, L = _langs(rng)
    ref = est.__class__(**est.get_params()).fit(X, languages=L)
    inc = est.__class__(**est.get_params())
    inc.partial_fit(da.from_array(X[:100], chunks=30), languages=L[:100])
    inc.partial_fit(X[100:170], languages=L[100:170])
    inc.partial_fit(da.from_array(X[170:], chunks=33), languages=L[170:])
    _check_same(inc, ref)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("chunks", [17, 200])
def test_gpa_fit_equals_numpy(center, chunks, rng, sync):
    X, L, P = _gpa_data(rng)
    ref = GeneralizedProcrustes(center=center).fit(X, languages=L, pair_ids=P)
    got = GeneralizedProcrustes(center=center).fit(
        da.from_array(X, chunks=(chunks, -1)),
        languages=da.from_array(L, chunks=chunks),
        pair_ids=da.from_array(P, chunks=chunks),
    )
    assert got.n_iter_ == ref.n_iter_ and got.converged_ == ref.converged_
    np.testing.assert_array_equal(got.n_pairs_, ref.n_pairs_)
    np.testing.assert_allclose(got.rotations_, ref.rotations_, atol=1e-10)
    np.testing.assert_allclose(got.objective_, ref.objective_, atol=1e-10)
    np.testing.assert_allclose(got.means_, ref.means_, atol=1e-10)
    out = got.transform(da.from_array(X, chunks=40), languages=L)
    assert isinstance(out, da.Array)
    np.testing.assert_allclose(out.compute(), ref.transform(X, languages=L), atol=1e-10)
    assert got._dask_parts is None  # fit keeps no reference to the data


def test_gpa_partial_fit_dask_batches(rng, sync):
    X, L, P = _gpa_data(rng)
    ref = GeneralizedProcrustes().fit(X, languages=L, pair_ids=P)
    inc = GeneralizedProcrustes()
    inc.partial_fit(da.from_array(X[:70], chunks=30), languages=L[:70], pair_ids=P[:70])
    inc.partial_fit(da.from_array(X[70:], chunks=25), languages=L[70:], pair_ids=P[70:])
    np.testing.assert_allclose(inc.rotations_, ref.rotations_, atol=1e-10)
    with pytest.raises(ValueError, match="cannot mix numpy/tensor batches and dask"):
        inc.partial_fit(X[:5], languages=L[:5], pair_ids=P[:5] + 10_000)
    fitted = GeneralizedProcrustes().fit(da.from_array(X, chunks=50), languages=L, pair_ids=P)
    with pytest.raises(RuntimeError, match="keeps no rows after fit"):
        fitted.partial_fit(da.from_array(X, chunks=50), languages=L, pair_ids=P)


def test_gpa_dask_errors(rng, sync):
    X, L, P = _gpa_data(rng)
    Xd = da.from_array(X, chunks=50)
    dup = P.copy()
    dup[np.flatnonzero(L == "en")[:2]] = 7
    with pytest.raises(ValueError, match="occurs more than once in language 'en'"):
        GeneralizedProcrustes().fit(Xd, languages=L, pair_ids=dup)
    alone = P.copy()
    alone[L == "fr"] += 10_000
    with pytest.raises(ValueError, match=r"share no pair_id with any other language"):
        GeneralizedProcrustes().fit(Xd, languages=L, pair_ids=alone)
    with pytest.raises(ValueError, match="needs languages="):
        GeneralizedProcrustes().fit(Xd, pair_ids=P)


# -- metrics -------------------------------------------------------------------------

#: default budget (everything computed at once) and one that forces windows of the
#: queries and segments of the targets (60 rows × 64 B per language: 3 of each)
BUDGETS = [M._similarity.DEFAULT_MEMORY_BUDGET, 7000]


def _close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _close(a[key], b[key])
    else:
        assert abs(a - b) <= 1e-10 or (np.isnan(a) and np.isnan(b)), (a, b)


@pytest.mark.parametrize("budget", BUDGETS)
def test_pair_metrics_equal_numpy(budget, rng, sync):
    X, L, P = _metric_data(rng)
    Xd, Ld, Pd = (da.from_array(a, chunks=37) for a in (X, L, P))
    Xd = Xd.rechunk((37, -1))
    mb = {"memory_budget": budget}
    full = budget == BUDGETS[0]  # the windowed case: the variants that add a pass
    for scoring in ("cosine", "dot", "csls") if full else ("csls",):
        a = M.retrieval_accuracy(X, L, P, "en", "de", scoring=scoring, **mb)
        assert M.retrieval_accuracy(Xd, Ld, Pd, "en", "de", scoring=scoring, **mb) == a
    for sim in ("cosine", "dot", "euclidean") if full else ("euclidean",):
        a = M.alignment_scores(X, L, P, "en", "de", similarity=sim, **mb)
        b = M.alignment_scores(Xd, Ld, Pd, "en", "de", similarity=sim, **mb)
        assert (a["weak"], a["strong"]) == (b["weak"], b["strong"])
        _close(a, b)
    a, b = (M.bitext_mining_f1(x, L, P, "en", "de", **mb) for x in (X, Xd))
    assert (a["f1"], a["precision"], a["recall"]) == (b["f1"], b["precision"], b["recall"])
    _close(a, b)
    for scoring in ("cosine", "csls") if full else ("csls",):
        a, b = (M.hubness(x, L, "en", "fr", k=5, scoring=scoring, **mb) for x in (X, Xd))
        _close(a, b)
    for f in (M.eigenvector_similarity, M.relational_similarity):
        _close(f(X, L, P, "en", "de", **mb), f(Xd, Ld, P, "en", "de", **mb))


def test_metrics_float32_and_subsampling(rng, sync):
    X, L, P = _metric_data(rng)
    X32 = X.astype(np.float32)
    Xd = da.from_array(X32, chunks=(50, -1))
    for budget in (M._similarity.DEFAULT_MEMORY_BUDGET, 2000):
        a = M.retrieval_accuracy(X32, L, P, "de", "en", scoring="csls", memory_budget=budget)
        assert M.retrieval_accuracy(Xd, L, P, "de", "en", scoring="csls", memory_budget=budget) == a
    kw = {"n_samples": 20, "random_state": 3}
    _close(
        M.relational_similarity(X32, L, P, "en", "de", **kw),
        M.relational_similarity(Xd, L, P, "en", "de", **kw),
    )


def test_metrics_read_only_the_two_languages(rng, sync):
    """Rows of other languages are never computed: here they would raise."""
    X, L, P = _metric_data(rng)
    ref = M.retrieval_accuracy(X, L, P, "en", "de", scoring="csls")
    bad = X.copy()
    bad[L == "fr"] = np.nan
    Xd = da.from_array(bad, chunks=(37, -1))
    assert M.retrieval_accuracy(Xd, L, P, "en", "de", scoring="csls", memory_budget=3000) == ref
    with pytest.raises(ValueError, match="NaN or infinity"):
        M.retrieval_accuracy(Xd, L, P, "en", "fr")


def test_probes_equal_numpy(rng, sync):
    X, L = _langs(rng, n=200, d=4)
    y = (X[:, 0] + X[:, 2] > 0).astype(int)
    Xd = da.from_array(X, chunks=(45, -1))
    assert M.language_id_accuracy(Xd, da.from_array(L, chunks=45)) == M.language_id_accuracy(X, L)
    a = M.transfer_gap(X, y, L, "en")
    b = M.transfer_gap(Xd, da.from_array(y, chunks=45), L, "en")
    assert a == b


def test_evaluate_pairs_equals_numpy(rng, sync):
    X, L, P = _metric_data(rng, n=30)
    names = ["retrieval_csls", "weak", "mean_cosine", "mining_f1", "hubness"]
    a = M.evaluate_pairs(X, L, P, pairs=[("en", "de"), ("de", "en")], metrics=names, k=3)
    Xd = da.from_array(X, chunks=(40, -1))
    b = M.evaluate_pairs(
        Xd, da.from_array(L, chunks=40), P, pairs=[("en", "de"), ("de", "en")], metrics=names, k=3
    )
    assert [r["metric"] for r in a] == [r["metric"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        _close(ra["value"], rb["value"])


def test_every_public_metric_takes_dask(rng, sync):
    """Guard: a function added to ``metrics.__all__`` must be covered here too."""
    covered = {
        "retrieval_accuracy",
        "alignment_scores",
        "bitext_mining_f1",
        "language_id_accuracy",
        "transfer_gap",
        "eigenvector_similarity",
        "relational_similarity",
        "hubness",
        "evaluate_pairs",
    }
    funcs = {n for n in M.__all__ if callable(getattr(M, n)) and n[0].islower()}
    assert funcs - {"to_csv", "to_markdown"} == covered


# -- bad input -----------------------------------------------------------------------


def test_bad_dask_metadata(rng, sync):
    X, L, P = _metric_data(rng)
    Xd = da.from_array(X, chunks=(37, -1))
    bad_l = da.from_array(L, chunks=50)
    with pytest.raises(ValueError, match="languages is a dask array with row chunks"):
        M.retrieval_accuracy(Xd, bad_l, P, "en", "de")
    with pytest.raises(ValueError, match="pair_ids is a dask array with row chunks"):
        M.alignment_scores(Xd, L, da.from_array(P, chunks=50), "en", "de")
    with pytest.raises(ValueError, match="languages is a dask array with row chunks"):
        LanguageEraser().fit(Xd, languages=bad_l)
    with pytest.raises(ValueError, match="languages is a dask array with row chunks"):
        pa.LanguageMeanCentering().fit(Xd, languages=bad_l)
    with pytest.raises(ValueError, match="languages has 179 entries"):
        M.hubness(Xd, da.from_array(L[:-1], chunks=37), "en", "de")
    with pytest.raises(ValueError, match="unknown chunk sizes"):
        M.hubness(Xd[Xd[:, 0] > 0], L, "en", "de")
    with pytest.raises(ValueError, match="Expected a 2-D dask array"):
        LanguageAxes().fit(Xd[:, 0], languages=L)
    bad = X.copy()
    bad[5, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        LanguageAxes().fit(da.from_array(bad, chunks=40), languages=L)
    est = LanguageEraser().fit(Xd, languages=L)
    with pytest.raises(ValueError, match="expecting 8 features"):
        est.partial_fit(Xd[:, :3], languages=L)
    est.partial_fit(Xd[:10], languages=["xx"] * 10)  # a new language widens the concept
    assert "xx" in est.languages_.tolist() and est.counts_.sum() == len(X) + 10


# -- a real cluster ------------------------------------------------------------------


def test_local_cluster(rng, cluster_client):
    X, L, P = _metric_data(rng, n=80)
    Xd = da.from_array(X, chunks=(50, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # distributed: large graph warnings
        a = M.retrieval_accuracy(X, L, P, "en", "de", scoring="csls")
        assert M.retrieval_accuracy(Xd, L, P, "en", "de", scoring="csls") == a
        _close(M.alignment_scores(X, L, P, "en", "de"), M.alignment_scores(Xd, L, P, "en", "de"))
        G, GL, GP = _gpa_data(rng)
        ref = GeneralizedProcrustes().fit(G, languages=GL, pair_ids=GP)
        Gd = da.from_array(G, chunks=(40, -1))
        got = GeneralizedProcrustes().fit(Gd, languages=GL, pair_ids=GP)
        np.testing.assert_allclose(got.rotations_, ref.rotations_, atol=1e-10)
        ref_e = LanguageEraser().fit(X, languages=L)
        out = LanguageEraser().fit(Xd, languages=L).transform(Xd).compute()
        np.testing.assert_allclose(out, ref_e.transform(X), atol=1e-10)


def test_procrustes_dask_partial_fit_pairs_within_each_batch_and_says_so(rng, sync):
    """dask batches are paired within themselves: rows whose partner is in another batch
    are left out with a warning (never silently), and numpy batches after them warn too."""
    en = rng.normal(size=(100, 4))
    de = en @ ortho_group.rvs(4, random_state=1) + 0.5 * rng.normal(size=(100, 4))
    X, L, P = np.vstack([en, de]), np.repeat(["en", "de"], 100), np.tile(np.arange(100), 2)
    whole = [np.r_[0:100, 100:200]]
    split = [np.r_[0:60, 100:200], np.r_[60:100]]
    ref = pa.ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    est = pa.ProcrustesAligner()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # complete batches: no warning
        for s in whole:
            est.partial_fit(da.from_array(X[s], chunks=40), languages=L[s], pair_ids=P[s])
    np.testing.assert_allclose(est.rotations_, ref.rotations_, atol=1e-10)
    est = pa.ProcrustesAligner()
    with pytest.warns(UserWarning, match="40 row.*no translation partner in it"):
        est.partial_fit(da.from_array(X[split[0]], chunks=40), languages=L[split[0]],
                        pair_ids=P[split[0]])  # fmt: skip
    assert est.n_pairs_ == {"de": 60}
    with pytest.warns(UserWarning, match="dask batches are paired within themselves"):
        est.partial_fit(X[split[1]], languages=L[split[1]], pair_ids=P[split[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a one-shot fit: unpaired rows are just unpaired
        pa.ProcrustesAligner().fit(
            da.from_array(X[split[0]], chunks=40), languages=L[split[0]], pair_ids=P[split[0]]
        )
    ra = pa.RotateAlign(layers=(-1,))
    X3 = np.stack([X, X], axis=1)
    with pytest.warns(UserWarning, match="no translation partner"):
        ra.partial_fit(da.from_array(X3[split[0]], chunks=(40, 2, 4)), languages=L[split[0]],
                       pair_ids=P[split[0]])  # fmt: skip


def test_dask_transform_checks_what_it_can_at_call_time(rng):
    X = rng.normal(size=(150, 5))
    L = np.repeat(["en", "fr", "de"], 50)
    Xd = da.from_array(X, chunks=40)
    P = np.tile(np.arange(50), 3)
    for est in (
        pa.LanguageMeanCentering().fit(X, languages=L),
        pa.LanguageStandardizer().fit(X, languages=L),
        pa.ProcrustesAligner().fit(X, languages=L, pair_ids=P),
        LanguageEraser(oracle=True).fit(X, languages=L),
    ):
        with pytest.raises(ValueError, match="expecting 5 features"):
            est.transform(Xd[:, :3], languages=L)  # no .compute() needed
        with pytest.raises(ValueError, match=r"\['xx'\] were not seen"):
            est.transform(Xd, languages=np.array(["xx"] * 150))
    lazy = pa.LanguageMeanCentering(unknown_language="global").fit(X, languages=L)
    assert lazy.transform(Xd, languages=np.array(["xx"] * 150)).shape == (150, 5)


@pytest.mark.parametrize("chunks", [400, 100, 37])
def test_in_call_statistics_of_dask_transforms_do_not_depend_on_chunks(chunks):
    # "batch" statistics are those of all rows in the call, not of each block
    import dask
    import dask.array as da

    from posthoc_align import LanguageMeanCentering, LanguageStandardizer

    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 6)) + 5.0
    langs = np.array(["fr", "en", "de", "fr"] * 100)
    X[langs == "de"] *= 3.0
    with dask.config.set(scheduler="synchronous"):
        std = LanguageStandardizer(mode="batch", eps=0.0).fit(X, languages=langs)
        ref = std.transform(X, languages=langs)
        out = std.transform(da.from_array(X, chunks=(chunks, 6)), languages=langs).compute()
        np.testing.assert_allclose(out, ref, atol=1e-12)
        loop = np.empty_like(X)
        for lab in ("fr", "en", "de"):
            rows = X[langs == lab]
            loop[langs == lab] = (rows - rows.mean(0)) / rows.std(0)
        np.testing.assert_allclose(out, loop, atol=1e-6)
        cen = LanguageMeanCentering(unknown_language="batch").fit(
            X[langs != "de"], languages=langs[langs != "de"]
        )
        ref = cen.transform(X, languages=langs)
        out = cen.transform(da.from_array(X, chunks=(chunks, 6)), languages=langs).compute()
        np.testing.assert_allclose(out, ref, atol=1e-12)
        np.testing.assert_allclose(out[langs == "de"].mean(0), 0.0, atol=1e-12)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
@pytest.mark.parametrize("name", ["LanguageMeanCentering", "LanguageStandardizer", "LSAR"])
def test_dask_fit_resolves_the_device(name):
    import dask.array as da

    import posthoc_align as pa

    X = np.random.default_rng(0).normal(size=(40, 4))
    langs = np.repeat(["en", "fr"], 20)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        getattr(pa, name)(device="cuda").fit(da.from_array(X, chunks=10), languages=langs)


def test_dask_nan_error_names_the_row_of_the_whole_array():
    import dask
    import dask.array as da

    from posthoc_align import LanguageMeanCentering

    X = np.random.default_rng(0).normal(size=(100, 3))
    X[77, 1] = np.nan
    langs = np.repeat(["en", "fr"], 50)
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(ValueError, match=r"row 77 of the dask array.*rows 75\.\.99"):
            LanguageMeanCentering().fit(da.from_array(X, chunks=25), languages=langs)
        est = LanguageMeanCentering().fit(np.nan_to_num(X), languages=langs)
        with pytest.raises(ValueError, match=r"row 77 of the dask array"):
            est.transform(da.from_array(X, chunks=25), languages=langs).compute()


@pytest.mark.parametrize("name", ["LanguageStandardizer", "LSAR", "LanguageMeanCentering"])
def test_rejected_dask_batch_adds_no_language(name):
    import dask
    import dask.array as da

    import posthoc_align as pa

    rng = np.random.default_rng(0)
    X = rng.normal(size=(100, 4))
    langs = np.repeat(["a", "b"], 50)
    X[langs == "b"] += 1.0
    bad = rng.normal(size=(40, 4))
    bad[35, 0] = np.nan
    with dask.config.set(scheduler="synchronous"):
        est = getattr(pa, name)().partial_fit(X, languages=langs)
        with pytest.raises(ValueError, match="NaN or infinity"):
            est.partial_fit(da.from_array(bad, chunks=20), languages=["c"] * 40)
        assert est._moments.labels == ["a", "b"]
        est.partial_fit(X, languages=langs)
    ref = getattr(pa, name)().fit(np.vstack([X, X]), languages=np.r_[langs, langs])
    np.testing.assert_allclose(est.means_, ref.means_, atol=1e-12)
