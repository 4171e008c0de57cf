"""Review 7 of the foundation contract: half precision, saved set_output and warned
state, single-row languages in partial_fit streams, 3-D estimators and set_output,
non-numeric object arrays."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

import posthoc_align as pa
from posthoc_align import (
    LSAR,
    GeneralizedProcrustes,
    LanguageAxes,
    LanguageEraser,
    LanguageMeanCentering,
    LanguageStandardizer,
    PerLayer,
    ProcrustesAligner,
    RotateAlign,
)
from posthoc_align.persistence import _config_digest

N, D = 30, 4


def _data(seed=0, layers=None):
    # "fr" = "en" rotated and shifted (plus noise): a well-posed alignment, so that
    # half precision moves every estimator's result only by its rounding
    rng = np.random.default_rng(seed)
    shape = (N, D) if layers is None else (N, layers, D)
    en = rng.normal(size=shape) * np.arange(1.0, D + 1.0)
    R = np.linalg.qr(rng.normal(size=(D, D)))[0]
    fr = en @ R + 2.0 + 0.05 * rng.normal(size=shape)
    X = np.concatenate([en, fr]).astype(np.float32)
    L = np.array(["en"] * N + ["fr"] * N)
    P = np.tile(np.arange(N), 2)
    return X, L, P


# name, estimator factory, fit kwargs (besides languages), transform takes languages=
_ESTIMATORS = [
    ("center", LanguageMeanCentering, False, True),
    ("standardize", LanguageStandardizer, False, True),
    ("standardize-batch", lambda: LanguageStandardizer(mode="batch"), False, True),
    ("procrustes", ProcrustesAligner, True, True),
    ("lsar", LSAR, False, False),
    ("eraser", LanguageEraser, False, False),
    ("axes", LanguageAxes, False, False),
    ("gpa", GeneralizedProcrustes, True, True),
]


def _fit_transform(make, pairs, langs_at_transform, X, L, P):
    est = make().fit(X, languages=L, **({"pair_ids": P} if pairs else {}))
    return est.transform(X, **({"languages": L} if langs_at_transform else {}))


def _as_float32(Z):
    if isinstance(Z, torch.Tensor):
        return Z.float().numpy()
    return np.asarray(Z, dtype=np.float32)


# -- 1. half precision in gives half precision out -------------------------------------
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,make,pairs,tl", _ESTIMATORS, ids=[e[0] for e in _ESTIMATORS])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_tensor_keeps_its_dtype(name, make, pairs, tl, dtype):
    X, L, P = _data()
    T = torch.from_numpy(X).to(dtype)
    # the reference sees the same (rounded) values in float32: GeneralizedProcrustes'
    # consensus frame is only defined up to a global rotation, which rounding can move
    ref = _fit_transform(make, pairs, tl, T.float().numpy(), L, P)
    Z = _fit_transform(make, pairs, tl, T, L, P)
    assert isinstance(Z, torch.Tensor) and Z.dtype == dtype and Z.device.type == "cpu"
    tol = 2e-2 if dtype == torch.float16 else 1e-1
    np.testing.assert_allclose(_as_float32(Z), ref, atol=tol)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,make,pairs,tl", _ESTIMATORS, ids=[e[0] for e in _ESTIMATORS])
def test_numpy_float16_kept_like_standard_scaler(name, make, pairs, tl):
    X, L, P = _data()
    X16 = X.astype(np.float16)
    # scikit-learn's StandardScaler keeps float16; so does every estimator here
    assert StandardScaler().fit_transform(X16).dtype == np.float16
    Z = _fit_transform(make, pairs, tl, X16, L, P)
    assert isinstance(Z, np.ndarray) and Z.dtype == np.float16
    ref = _fit_transform(make, pairs, tl, X16.astype(np.float32), L, P)
    np.testing.assert_allclose(Z.astype(np.float32), ref, atol=2e-2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_float64_unchanged(dtype):
    X, L, _ = _data()
    for Xi in (X.astype(dtype), torch.from_numpy(X.astype(dtype))):
        Z = LanguageMeanCentering().fit_transform(Xi, languages=L)
        assert str(Z.dtype).removeprefix("torch.") == np.dtype(dtype).name


@pytest.mark.parametrize(
    "make",
    [
        lambda: PerLayer(LanguageMeanCentering(), layers=[0, 2]),
        lambda: PerLayer(LanguageStandardizer(), layers="all"),
        lambda: PerLayer(LSAR(), layers=[1]),
        lambda: RotateAlign(layers=[1, 2]),
    ],
    ids=["center", "standardize-fused", "lsar", "rotate"],
)
@pytest.mark.parametrize("kind", ["np16", "t16", "bf16"])
def test_per_layer_half_keeps_its_dtype(make, kind):
    X, L, P = _data(layers=3)
    Xi = {
        "np16": X.astype(np.float16),
        "t16": torch.from_numpy(X).half(),
        "bf16": torch.from_numpy(X).bfloat16(),
    }[kind]
    X = _as_float32(Xi)  # the same rounded values, in float32
    ref = make().fit(X, languages=L, pair_ids=P).transform(X, languages=L)
    Z = make().fit(Xi, languages=L, pair_ids=P).transform(Xi, languages=L)
    assert type(Z) is type(Xi) and Z.dtype == Xi.dtype and tuple(Z.shape) == X.shape
    np.testing.assert_allclose(_as_float32(Z), ref, atol=2e-2 if kind != "bf16" else 1e-1)
    # the layers passed through are the input's values exactly
    if isinstance(make(), PerLayer) and not isinstance(make(), RotateAlign):
        kept = [j for j in range(3) if j not in make().fit(X, languages=L).layers_]
        for j in kept:
            assert np.array_equal(_as_float32(Z[:, j]), _as_float32(Xi[:, j]))


def test_half_output_overflow_is_a_clear_error():
    # finite float16 input whose centred values exceed float16's range (65504)
    X = np.array([[60000.0], [-60000.0], [60000.0]], dtype=np.float16)
    for Xi in (X, torch.from_numpy(X)):
        with pytest.raises(ValueError, match=r"overflows float16.*float32"):
            LanguageMeanCentering().fit_transform(Xi)


# -- 2. set_output survives save/load ---------------------------------------------------
def test_save_load_keeps_set_output(tmp_path):
    X, L, _ = _data()
    cols = [f"f{i}" for i in range(D)]
    df = pd.DataFrame(X, columns=cols)
    est = LanguageMeanCentering().set_output(transform="pandas").fit(df, languages=L)
    est.save(tmp_path / "e")
    again = pa.load(tmp_path / "e")
    out = again.transform(df, languages=L)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == cols
    pd.testing.assert_frame_equal(out, est.transform(df, languages=L))


def test_save_load_keeps_set_output_of_nested_estimator(tmp_path):
    X, L, _ = _data(layers=2)
    inner = LanguageMeanCentering().set_output(transform="pandas")
    pl = PerLayer(inner, layers=[1]).fit(X, languages=L)
    pl.save(tmp_path / "pl")
    again = pa.load(tmp_path / "pl")
    assert again.estimator._sklearn_output_config == {"transform": "pandas"}
    assert again.estimators_[0]._sklearn_output_config == {"transform": "pandas"}
    np.testing.assert_array_equal(again.transform(X, languages=L), pl.transform(X, languages=L))


def test_saves_without_output_config_still_load(tmp_path):
    # a save written before the output configuration was recorded has no such entry
    X, L, _ = _data()
    LanguageMeanCentering().set_output(transform="pandas").fit(X, languages=L).save(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["output_config"] == {"transform": "pandas"}
    del cfg["output_config"]
    cfg["config_sha256"] = _config_digest(cfg)
    cfg_file.write_text(json.dumps(cfg))
    assert isinstance(pa.load(tmp_path).transform(X, languages=L), np.ndarray)


# -- 3. single-row languages warn in partial_fit streams too ----------------------------
def _solo():
    X = np.random.default_rng(0).normal(size=(11, 3))
    return X, np.array(["en"] * 10 + ["solo"])


def _recorded(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    return [str(w.message) for w in rec if "fewer than 2 rows" in str(w.message)], out


def test_partial_fit_single_row_language_warns_once_per_state():
    X, L = _solo()
    est = LanguageStandardizer().partial_fit(X, languages=L)
    msgs, Z = _recorded(lambda: est.transform(X, languages=L))
    assert len(msgs) == 1 and "['solo']" in msgs[0]
    np.testing.assert_allclose(Z[-1], 0.0)
    assert _recorded(lambda: est.transform(X, languages=L))[0] == []  # same state
    # a second row for "solo": nothing to warn about any more
    est.partial_fit(X[-1:] + 1.0, languages=["solo"])
    assert _recorded(lambda: est.transform(X, languages=L))[0] == []
    # a new single-row language is a new state: warned again
    est.partial_fit(X[:1], languages=["other"])
    msgs, _ = _recorded(lambda: est.transform(X[:1], languages=["other"]))
    assert len(msgs) == 1 and "['other']" in msgs[0]


def test_fit_transform_single_row_language_warns_once():
    X, L = _solo()
    msgs, _ = _recorded(lambda: LanguageStandardizer().fit_transform(X, languages=L))
    assert len(msgs) == 1


def test_per_layer_partial_fit_single_row_language_warns():
    X, L = _solo()
    S = np.stack([X, X + 1.0, X - 1.0], axis=1)
    for layers in ([0, 1], [0, 2]):  # fused (contiguous) and per-layer transform paths
        pl = PerLayer(LanguageStandardizer(), layers=layers).partial_fit(S, languages=L)
        msgs, _ = _recorded(lambda pl=pl: pl.transform(S, languages=L))
        assert len(msgs) == 2  # one per layer, as at fit
        assert _recorded(lambda pl=pl: pl.transform(S, languages=L))[0] == []


def test_warned_state_survives_save_load(tmp_path):
    X, L = _solo()
    est = LanguageStandardizer().partial_fit(X, languages=L)
    est.save(tmp_path / "unwarned")
    _recorded(lambda: est.transform(X, languages=L))
    est.save(tmp_path / "warned")
    # a loaded copy warns exactly when the original would
    assert _recorded(lambda: pa.load(tmp_path / "warned").transform(X, languages=L))[0] == []
    msgs, _ = _recorded(lambda: pa.load(tmp_path / "unwarned").transform(X, languages=L))
    assert len(msgs) == 1
    # so does ProcrustesAligner's few-pairs state
    rng = np.random.default_rng(1)
    Y = rng.normal(size=(8, 6))
    langs, ids = np.repeat(["en", "fr"], 4), np.tile(np.arange(4), 2)
    with pytest.warns(UserWarning, match="fewer pivot pairs"):
        pro = ProcrustesAligner().fit(Y, languages=langs, pair_ids=ids)
    pro.save(tmp_path / "pro")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pa.load(tmp_path / "pro").transform(Y, languages=langs)


# -- 4. 3-D estimators: no DataFrame output, documented ---------------------------------
@pytest.mark.parametrize("cls", [PerLayer, RotateAlign])
def test_three_d_estimators_document_no_set_output(cls):
    doc = cls.__doc__
    assert "set_output" in doc and "get_feature_names_out" in doc and "X[:, i]" in doc
    est = cls(LanguageMeanCentering()) if cls is PerLayer else cls()
    assert not hasattr(est, "set_output") and not hasattr(est, "get_feature_names_out")
    with pytest.raises(ValueError, match="set_output"):
        Pipeline([("layers", est)]).set_output(transform="pandas")


# -- 5. non-numeric object arrays -------------------------------------------------------
@pytest.mark.parametrize(
    "X",
    [
        np.array([[object(), object()]] * 4),
        [[{"a": 1}, 2.0]] * 4,
    ],
    ids=["objects", "list-with-dict"],
)
def test_object_array_is_a_clear_value_error(X):
    with pytest.raises(ValueError, match=r"X holds non-numeric values.*pass a numeric array"):
        LanguageMeanCentering().fit(X, languages=list("aabb"))
    # still the TypeError scikit-learn's own check_array raises for such input
    with pytest.raises(TypeError):
        LanguageMeanCentering().fit(X, languages=list("aabb"))


def test_object_stack_is_a_clear_value_error():
    S = np.empty((4, 2, 2), dtype=object)
    S[...] = object()
    with pytest.raises(ValueError, match=r"non-numeric.*\(n_rows, n_layers, n_features\)"):
        PerLayer(LanguageMeanCentering()).fit(S, languages=list("aabb"))


def test_numeric_object_array_still_accepted():
    X = np.arange(8.0).reshape(4, 2).astype(object)
    Z = LanguageMeanCentering().fit_transform(X, languages=list("aabb"))
    assert Z.dtype == np.float64
    np.testing.assert_allclose(Z, [[-1, -1], [1, 1], [-1, -1], [1, 1]])


def test_lsar_float16_rounding_is_counted_alike_on_every_path():
    """numpy float16 (now kept as float16) and dask float16 (cast to float64) disagreed on
    LSAR's rank cut; counting half precision with float32's eps instead made LSAR remove
    rounding noise from data centred in float16 (regression reviews). Every path counts
    float16's own eps: real differences under it are cut with a warning that names the fix,
    and float16-centred data stay as they are."""
    import warnings

    import dask.array as da

    from posthoc_align import LSAR

    rng = np.random.default_rng(0)
    n, d = 9000, 8
    codes = rng.integers(0, 3, n)
    langs = np.array(["a", "b", "c"])[codes]
    M = rng.normal(size=(3, d)) * 0.05
    X16 = (rng.normal(size=(n, d)) + 300.0 + M[codes]).astype(np.float16)
    fits = []
    for data in (X16, torch.from_numpy(X16), da.from_array(X16, chunks=(3000, d))):
        with pytest.warns(UserWarning, match="rounding cut"):
            fits.append(LSAR().fit(data, languages=langs))
    assert len({f.n_components_ for f in fits}) == 1 and fits[0].n_components_ < 2
    e2 = LSAR(n_components=2).fit(X16, languages=langs)  # the fix the warning names
    e64 = LSAR(n_components=2).fit(X16.astype(np.float64), languages=langs)
    np.testing.assert_allclose(np.abs(e2.components_), np.abs(e64.components_), atol=1e-6)
    # data centred in float16 (offsets of a few units, as the review's case): the means
    # differ by float16 rounding only, and LSAR is the identity
    Xc = (rng.normal(size=(n, d)) + 3.0 + rng.normal(size=(3, d))[codes]).astype(np.float16)
    for c in range(3):
        Xc[codes == c] = Xc[codes == c] - Xc[codes == c].mean(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        e = LSAR().fit(Xc, languages=langs)
    assert e.n_components_ == 0
    np.testing.assert_array_equal(e.transform(Xc), Xc)


def test_lsar_int_override_on_float32_centred_data_warns():
    """An int n_components overrides the rounding cut; on data centred in float32 the removed
    directions are rounding noise, and the fit must say so (regression review)."""
    from posthoc_align import LSAR

    rng = np.random.default_rng(0)
    L, n, d = 4, 200, 16
    X = (rng.normal(size=(L * n, d)) + 1.0).astype(np.float32)
    langs = np.repeat(np.arange(L), n)
    for g in range(L):
        X[langs == g] -= X[langs == g].mean(0, dtype=np.float32)
    with pytest.warns(UserWarning, match="within the rounding of the input"):
        est = LSAR(n_components=3).fit(X, languages=langs)
    assert est.n_components_ == 3
