"""``PerLayer``'s one-pass path for per-dimension methods equals fitting layer by layer."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_align import LSAR, LanguageMeanCentering, LanguageStandardizer, PerLayer, RotateAlign

ESTIMATORS = [
    LanguageMeanCentering(),
    LanguageMeanCentering(unknown_language="global"),
    LanguageStandardizer(),
    LanguageStandardizer(with_mean=False),
    LanguageStandardizer(with_std=False, eps=1e-3),
    LanguageStandardizer(mode="batch"),
    LSAR(),
    LSAR(n_components=1),
]
LAYERS = ["all", [1, 2, 3], [0, 2], [-1]]


def _stack(seed: int, n: int = 300, L: int = 5, d: int = 6):
    rng = np.random.default_rng(seed)
    offsets = rng.normal(scale=10.0, size=(1, L, d))
    X = (rng.normal(size=(n, L, d)) + offsets).astype(np.float32)
    langs = np.array(["en", "de", "fr"])[rng.integers(0, 3, n)]
    return X, langs


def _learned(est) -> dict:
    return {k: v for k, v in vars(est).items() if k.endswith("_") and not k.startswith("_")}


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
@pytest.mark.parametrize("layers", LAYERS, ids=str)
def test_fused_fit_equals_per_layer_fits(est, layers):
    X, langs = _stack(0)
    pl = PerLayer(est, layers=layers).fit(X, languages=langs)
    for i, fitted in zip(pl.layers_, pl.estimators_, strict=True):
        ref = type(est)(**est.get_params()).fit(X[:, i, :], languages=langs)
        got, want = _learned(fitted), _learned(ref)
        assert got.keys() == want.keys()
        for k, v in want.items():
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(v), err_msg=k)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("est", ESTIMATORS, ids=repr)
@pytest.mark.parametrize("layers", LAYERS, ids=str)
@pytest.mark.parametrize("kind", ["float32", "float64", "torch"])
def test_fused_transform_equals_per_layer_transforms(est, layers, kind):
    X, langs = _stack(1)
    pl = PerLayer(est, layers=layers).fit(X, languages=langs)
    Xin = {"float32": X, "float64": X.astype(np.float64), "torch": torch.from_numpy(X)}[kind]
    before = Xin.clone().numpy() if isinstance(Xin, torch.Tensor) else Xin.copy()
    Z = pl.transform(Xin, languages=langs)
    assert type(Z) is type(Xin) and Z.dtype == Xin.dtype
    np.testing.assert_array_equal(np.asarray(Xin), before)  # input untouched
    for j in range(X.shape[1]):
        if j in pl.layers_:
            e = pl.estimators_[pl.layers_.index(j)]
            kw = {} if isinstance(e, LSAR) else {"languages": langs}
            want = np.asarray(e.transform(Xin[:, j, :], **kw))
        else:
            want = np.asarray(Xin[:, j, :])
        np.testing.assert_array_equal(np.asarray(Z[:, j, :]), want, err_msg=f"layer {j}")


def test_fused_transform_unknown_language_policies():
    X, langs = _stack(2)
    other = langs.copy()
    other[:7] = "xx"
    pl = PerLayer(LanguageMeanCentering()).fit(X, languages=langs)
    with pytest.raises(ValueError, match=r"not seen during fit.*'xx'|'xx'.*not seen"):
        pl.transform(X, languages=other)
    pl = PerLayer(LanguageMeanCentering(unknown_language="batch")).fit(X, languages=langs)
    Z = pl.transform(X, languages=other)
    for j, e in enumerate(pl.estimators_):
        np.testing.assert_array_equal(Z[:, j], e.transform(X[:, j], languages=other))


@pytest.mark.usefixtures("kernels")
def test_fused_fit_then_partial_fit_streams_on():
    X, langs = _stack(3, n=400)
    a = PerLayer(LanguageStandardizer()).fit(X[:250], languages=langs[:250])
    a.partial_fit(X[250:], languages=langs[250:])
    b = PerLayer(LanguageStandardizer()).fit(X, languages=langs)
    for ea, eb in zip(a.estimators_, b.estimators_, strict=True):
        np.testing.assert_allclose(ea.means_, eb.means_, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ea.vars_, eb.vars_, rtol=1e-5, atol=1e-6)


def test_fused_fit_warns_once_per_layer_like_the_loop():
    X, langs = _stack(4, n=50)
    langs[0] = "solo"
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        PerLayer(LanguageStandardizer(), layers=[0, 1]).fit(X, languages=langs)
    assert sum("fewer than 2 rows" in str(w.message) for w in rec) == 2


def test_fused_fit_rejects_non_finite_like_the_loop():
    X, langs = _stack(5)
    X[17, 3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        PerLayer(LanguageMeanCentering()).fit(X, languages=langs)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    layers=st.lists(st.integers(0, 4), min_size=1, max_size=5, unique=True),
    std=st.booleans(),
)
def test_fused_path_property(seed, layers, std):
    X, langs = _stack(seed, n=80)
    est = LanguageStandardizer() if std else LanguageMeanCentering()
    pl = PerLayer(est, layers=sorted(layers)).fit(X, languages=langs)
    Z = pl.transform(X, languages=langs)
    for j in pl.layers_:
        ref = type(est)().fit(X[:, j], languages=langs)
        np.testing.assert_allclose(Z[:, j], ref.transform(X[:, j], languages=langs), atol=1e-6)


@pytest.mark.parametrize("est", [LanguageMeanCentering(), LanguageStandardizer(), LSAR()], ids=repr)
def test_fused_path_on_every_backend(est, to_backend):
    """numpy, CPU tensors and (where present) CUDA tensors: fused = per-layer fits."""
    convert, back = to_backend
    X, langs = _stack(6)
    Xb = convert(X)
    pl = PerLayer(est, layers=[1, 2, 3]).fit(Xb, languages=langs)
    kw = {} if isinstance(est, LSAR) else {"languages": langs}
    Z = pl.transform(Xb, **kw)
    if convert.kind != "numpy":
        assert isinstance(Z, torch.Tensor) and Z.device == Xb.device
    for j, e in zip(pl.layers_, pl.estimators_, strict=True):
        ref = type(est)(**est.get_params()).fit(X[:, j], languages=langs)
        np.testing.assert_allclose(e.means_, ref.means_, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(back(Z[:, j]), ref.transform(X[:, j], **kw), atol=2e-5)
    np.testing.assert_array_equal(back(Z[:, 0]), X[:, 0])


def test_empty_layers_and_feature_changing_estimator_are_clear(rng):
    from sklearn.decomposition import PCA

    X = rng.normal(size=(10, 2, 3))
    with pytest.raises(ValueError, match="layers is empty"):
        PerLayer(LanguageMeanCentering(), layers=[]).fit(X)
    with pytest.raises(ValueError, match="must keep the number of features"):
        PerLayer(PCA(n_components=2), layers=[0]).fit_transform(X)


@pytest.mark.parametrize("layers", [[-1], [3, 0], "all"])
def test_transform_of_a_tensor_that_requires_grad(layers):
    # a tensor in gives a tensor out, detached, as for the 2-D estimators (review finding)
    X = torch.tensor(np.random.default_rng(0).normal(size=(40, 4, 3)), requires_grad=True)
    langs = ["en"] * 20 + ["fr"] * 20
    for inner in (LanguageMeanCentering(), LSAR()):
        est = PerLayer(inner, layers=layers).fit(X, languages=langs)
        out = est.transform(X, languages=langs)
        assert isinstance(out, torch.Tensor) and not out.requires_grad
        ref = est.transform(X.detach().numpy(), languages=langs)
        np.testing.assert_allclose(out.numpy(), ref)


@pytest.mark.parametrize("Est", [PerLayer, RotateAlign])
def test_layers_parameter_is_validated(Est):
    from sklearn.utils._param_validation import InvalidParameterError

    X = np.random.default_rng(0).normal(size=(10, 3, 2))
    make = (lambda **kw: PerLayer(LanguageMeanCentering(), **kw)) if Est is PerLayer else Est
    for bad in (2.0, None, "last"):
        with pytest.raises(InvalidParameterError, match="'layers' parameter"):
            make(layers=bad).fit(X)
    for bad in (True, [True, 1]):
        with pytest.raises(TypeError, match="layers must hold ints"):
            make(layers=bad).fit(X)
    with pytest.raises(ValueError, match=r"shape \(10, 0, 2\): no layers"):
        make(layers="all").fit(np.zeros((10, 0, 2)))
