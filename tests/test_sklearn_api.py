"""scikit-learn integration: metadata routing, Pipelines, CV, clone, pickle, set_output."""

import joblib
import numpy as np
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, GroupKFold, cross_validate
from sklearn.pipeline import Pipeline

from posthoc_align import (
    LSAR,
    LanguageMeanCentering,
    LanguageStandardizer,
    ProcrustesAligner,
    RotateAlign,
)


@pytest.fixture
def routing():
    with sklearn.config_context(enable_metadata_routing=True):
        yield


def _data(rng, n=60, d=5, langs=("en", "fr", "de")):
    base = rng.normal(size=(n, d))
    y = (base[:, 0] > 0).astype(int)
    X = np.vstack([base + rng.normal(scale=3, size=d) for _ in langs])
    L = np.repeat(langs, n)
    P = np.tile(np.arange(n), len(langs))
    return X, np.tile(y, len(langs)), L, P


def test_fit_transform_passes_languages_to_transform(rng):
    X, _, L, P = _data(rng)
    for est in (LanguageMeanCentering(), LanguageStandardizer(), LSAR()):
        a = clone(est).fit_transform(X, languages=L)
        b = (
            clone(est)
            .fit(X, languages=L)
            .transform(X, **({} if isinstance(est, LSAR) else {"languages": L}))
        )
        # equal up to rounding (GPU reductions are not bit-reproducible between calls)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    a = ProcrustesAligner().fit_transform(X, languages=L, pair_ids=P)
    b = ProcrustesAligner().fit(X, languages=L, pair_ids=P).transform(X, languages=L)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_pipeline_routes_languages_and_pairs(rng, routing):
    X, y, L, P = _data(rng)
    pipe = Pipeline(
        [
            ("center", LanguageMeanCentering()),
            ("rotate", ProcrustesAligner()),
            ("lsar", LSAR()),
            ("clf", LogisticRegression()),
        ]
    )
    pipe.fit(X, y, languages=L, pair_ids=P)
    manual = LanguageMeanCentering().fit_transform(X, languages=L)
    manual = ProcrustesAligner().fit_transform(manual, languages=L, pair_ids=P)
    manual = LSAR().fit(manual, languages=L).transform(manual)
    np.testing.assert_allclose(pipe[:-1].transform(X, languages=L), manual, atol=1e-12)
    assert pipe.score(X, y, languages=L) > 0.8


def test_set_request_methods_exist_and_turn_routing_off(rng, routing):
    X, y, L, _ = _data(rng)
    est = (
        LanguageMeanCentering()
        .set_fit_request(languages=False)
        .set_transform_request(languages=False)
    )
    std = LanguageStandardizer()
    pipe = Pipeline([("c", est), ("s", std), ("clf", LogisticRegression())])
    pipe.fit(X, y, languages=L)
    assert est.languages_.tolist() == ["__all__"]
    assert std.languages_.tolist() == ["de", "en", "fr"]
    assert hasattr(LanguageMeanCentering(), "set_partial_fit_request")
    assert hasattr(ProcrustesAligner(), "set_fit_request")


def test_group_kfold_keeps_translations_together(rng, routing):
    """``GroupKFold(groups=pair_ids)``: translations of a sentence share a fold."""
    X, y, L, P = _data(rng)
    pipe = Pipeline([("center", LanguageMeanCentering()), ("clf", LogisticRegression())])
    cv = GroupKFold(n_splits=3)
    for train, test in cv.split(X, y, groups=P):
        assert not set(P[train]) & set(P[test])
    res = cross_validate(
        pipe, X, y, cv=cv, params={"languages": L, "groups": P}, return_estimator=True
    )
    assert len(res["test_score"]) == 3 and np.all(res["test_score"] > 0.7)
    assert set(res["estimator"][0][0].languages_) == {"de", "en", "fr"}


def test_grid_search_routes_metadata(rng, routing):
    X, y, L, P = _data(rng)
    pipe = Pipeline([("std", LanguageStandardizer()), ("clf", LogisticRegression())])
    gs = GridSearchCV(pipe, {"std__with_std": [True, False]}, cv=GroupKFold(3))
    gs.fit(X, y, languages=L, groups=P)
    assert gs.best_estimator_[0].languages_.tolist() == ["de", "en", "fr"]


@pytest.mark.parametrize(
    "est",
    [LanguageMeanCentering(), LanguageStandardizer(), LSAR(n_components=1), ProcrustesAligner()],
)
def test_clone_pickle_and_refit(est, rng, tmp_path):
    X, _, L, P = _data(rng)
    kw = {"pair_ids": P} if isinstance(est, ProcrustesAligner) else {}
    tkw = {} if isinstance(est, LSAR) else {"languages": L}
    fitted = clone(est).fit(X, languages=L, **kw)
    assert clone(fitted).get_params() == est.get_params()
    joblib.dump(fitted, tmp_path / "m.joblib")
    again = joblib.load(tmp_path / "m.joblib")
    np.testing.assert_array_equal(again.transform(X, **tkw), fitted.transform(X, **tkw))
    # refit is idempotent
    np.testing.assert_allclose(
        clone(est).fit(X, languages=L, **kw).transform(X, **tkw),
        fitted.fit(X, languages=L, **kw).transform(X, **tkw),
    )


def test_procrustes_generic_invariants(rng):
    """What the generic checks cannot reach for ProcrustesAligner, with real pairs."""
    X, _, L, P = _data(rng)
    est = ProcrustesAligner()
    assert est.fit(X, languages=L, pair_ids=P) is est
    assert est.n_features_in_ == X.shape[1]
    perm = rng.permutation(len(X))
    np.testing.assert_allclose(
        est.transform(X[perm], languages=L[perm]), est.transform(X, languages=L)[perm], atol=1e-12
    )
    Z32 = ProcrustesAligner().fit_transform(X.astype(np.float32), languages=L, pair_ids=P)
    assert Z32.dtype == np.float32
    names = est.get_feature_names_out()
    assert len(names) == X.shape[1]
    with pytest.raises(sklearn.exceptions.NotFittedError):
        ProcrustesAligner().transform(X, languages=L)
    bad = X.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        ProcrustesAligner().fit(bad, languages=L, pair_ids=P)


def test_set_output_pandas(rng):
    pd = pytest.importorskip("pandas")
    X, _, L, _ = _data(rng)
    df = pd.DataFrame(X, columns=[f"h{i}" for i in range(X.shape[1])])
    est = LanguageMeanCentering().set_output(transform="pandas")
    out = est.fit_transform(df, languages=L)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == list(df.columns)
    assert list(est.get_feature_names_out()) == list(df.columns)


def test_rotate_align_params_and_clone():
    ra = RotateAlign(layers=(-2, -1), pivot="de", center=False)
    assert ra.get_params() == {"layers": (-2, -1), "pivot": "de", "center": False, "device": "auto"}
    assert clone(ra).get_params() == ra.get_params()


def test_device_cuda_without_gpu_is_clear(rng):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    X, _, L, _ = _data(rng)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        LanguageMeanCentering(device="cuda").fit(X, languages=L)


def test_wrong_ndim_messages_name_the_fix():
    from posthoc_align import LanguageMeanCentering, PerLayer

    X3 = np.zeros((10, 13, 4))
    for X in (X3, torch.from_numpy(X3)):
        with pytest.raises(ValueError, match=r"PerLayer\(est, layers=\.\.\.\).*X\[:, i\]"):
            LanguageMeanCentering().fit(X)
    with pytest.raises(ValueError, match=r"X.reshape\(1, 1, -1\)"):
        PerLayer(LanguageMeanCentering()).fit(torch.zeros(10))
    with pytest.raises(ValueError, match=r"X\[:, None, :\]"):
        PerLayer(LanguageMeanCentering()).fit(np.zeros((10, 4)))


def test_rejected_first_partial_fit_batch_leaves_the_estimator_unfitted():
    from sklearn.exceptions import NotFittedError

    from posthoc_align import GeneralizedProcrustes

    X = np.random.default_rng(0).normal(size=(6, 3))
    langs = np.array(["a", "a", "a", "b", "b", "b"])
    bad_ids = np.array([0, 1, 2, 0, 0, 1])  # pair_id 0 twice in 'b'
    for est in (ProcrustesAligner(pivot="a"), GeneralizedProcrustes()):
        with pytest.raises(ValueError, match="pair_id 0"):
            est.partial_fit(X, languages=langs, pair_ids=bad_ids)
        assert not hasattr(est, "n_features_in_")
        with pytest.raises(NotFittedError):
            est.transform(X, languages=langs)
        # a later batch of another width is a fresh start
        est.partial_fit(X[:, :2], languages=langs, pair_ids=np.array([0, 1, 2, 0, 1, 2]))
        assert est.n_features_in_ == 2
    nan = X.copy()
    nan[1, 0] = np.nan
    est = LSAR()
    with pytest.raises(ValueError, match="NaN or infinity"):
        est.partial_fit(nan, languages=langs)
    with pytest.raises(NotFittedError):
        est.transform(X)
