"""safetensors + JSON persistence: round trips and clear errors on bad files."""

import json

import numpy as np
import pytest

import posthoc_align as pa


def _fitted(rng):
    X = rng.normal(size=(60, 4, 3))
    L = np.repeat(["en", "fr", "de"], 20)
    P = np.tile(np.arange(20), 3)
    return (
        X,
        L,
        P,
        [
            pa.LanguageMeanCentering(unknown_language="global").fit(X[:, 0], languages=L),
            pa.LanguageStandardizer(eps=1e-3).fit(X[:, 0], languages=L),
            pa.LSAR(n_components=1).fit(X[:, 0], languages=L),
            pa.ProcrustesAligner(pivot="fr").fit(X[:, 0], languages=L, pair_ids=P),
            pa.RotateAlign(layers=(-1, 1)).fit(X, languages=L, pair_ids=P),
            pa.PerLayer(pa.LanguageMeanCentering(), layers="all").fit(X, languages=L),
        ],
    )


def _write_config(path, cfg):
    """Write an edited config with a valid checksum (as a deliberate editor could)."""
    cfg["config_sha256"] = pa.persistence._config_digest(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_round_trip(rng, tmp_path):
    X, L, _, ests = _fitted(rng)
    for k, est in enumerate(ests):
        est.save(tmp_path / f"e{k}")
        again = pa.load(tmp_path / f"e{k}")
        assert type(again) is type(est)
        assert again.get_params(deep=False).keys() == est.get_params(deep=False).keys()
        data = X if isinstance(est, pa.PerLayer) else X[:, 0]
        kw = {} if isinstance(est, pa.LSAR) else {"languages": L}
        np.testing.assert_array_equal(again.transform(data, **kw), est.transform(data, **kw))
    assert not list(tmp_path.rglob("*.pkl"))


def test_partial_fit_continues_after_load(rng, tmp_path):
    X = rng.normal(size=(40, 3))
    L = rng.choice(["a", "b"], size=40)
    est = pa.LanguageStandardizer().partial_fit(X[:20], languages=L[:20])
    est.save(tmp_path / "s")
    again = pa.load(tmp_path / "s").partial_fit(X[20:], languages=L[20:])
    ref = pa.LanguageStandardizer().fit(X, languages=L)
    np.testing.assert_allclose(again.vars_, ref.vars_, atol=1e-12)


def test_tampered_and_foreign_files(rng, tmp_path):
    _, _, _, ests = _fitted(rng)
    ests[0].save(tmp_path / "c")
    arr = tmp_path / "c" / "arrays.safetensors"
    raw = bytearray(arr.read_bytes())
    raw[-3] ^= 0xFF
    arr.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        pa.load(tmp_path / "c")
    ests[0].save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="newer than this library"):
        pa.load(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        pa.load(tmp_path / "d")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a saved posthoc_align estimator"):
        pa.load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        pa.load(tmp_path / "missing")
    ests[0].save(tmp_path / "e")
    cfg = json.loads((tmp_path / "e" / "config.json").read_text())
    cfg["class"] = "os.system"
    _write_config(tmp_path / "e", cfg)
    with pytest.raises(ValueError, match="unknown estimator class"):
        pa.load(tmp_path / "e")


def test_foreign_estimator_refused(tmp_path):
    from sklearn.preprocessing import StandardScaler

    with pytest.raises(TypeError, match="joblib"):
        pa.persistence.save(StandardScaler().fit(np.eye(3)), tmp_path / "x")


def test_edited_config_is_refused(rng, tmp_path):
    X, L, P, ests = _fitted(rng)
    ests[3].save(tmp_path / "p")
    cfg_file = tmp_path / "p" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["params"]["center"] = False  # a plausible, valid edit: still caught
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match its own checksum"):
        pa.load(tmp_path / "p")
    cfg["params"]["center"] = "yes"  # an invalid value behind a recomputed checksum
    _write_config(tmp_path / "p", cfg)
    with pytest.raises(ValueError, match="saved configuration.*.center. parameter"):
        pa.load(tmp_path / "p")


def test_procrustes_partial_fit_after_load_and_after_fit(rng, tmp_path):
    X = rng.normal(size=(80, 3))
    L = np.repeat(["en", "fr"], 40)
    P = np.tile(np.arange(40), 2)
    first = P < 20
    est = pa.ProcrustesAligner().partial_fit(X[first], languages=L[first], pair_ids=P[first])
    with pytest.warns(UserWarning, match="not saved"):
        est.save(tmp_path / "p")
    again = pa.load(tmp_path / "p")
    with pytest.warns(UserWarning, match="earlier rows are not kept"):
        again.partial_fit(X[~first], languages=L[~first], pair_ids=P[~first])
    ref = pa.ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    # every pair lies within one of the two batches: the statistics are complete
    np.testing.assert_allclose(again.rotations_, ref.rotations_, atol=1e-10)
    assert again.n_pairs_ == {"fr": 40}
    fitted = pa.ProcrustesAligner().fit(X[first], languages=L[first], pair_ids=P[first])
    with pytest.warns(UserWarning, match="earlier rows are not kept"):
        fitted.partial_fit(X[~first], languages=L[~first], pair_ids=P[~first])
    np.testing.assert_allclose(fitted.rotations_, ref.rotations_, atol=1e-10)


@pytest.mark.parametrize("version", ["3", None, [3], 0, True, "missing"])
def test_format_version_must_be_a_positive_integer(rng, tmp_path, version):
    X, L, P, ests = _fitted(rng)
    ests[0].save(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    if version == "missing":
        del cfg["format_version"]
    else:
        cfg["format_version"] = version
    _write_config(tmp_path / "c", cfg)
    with pytest.raises(ValueError, match="format_version is .* not a positive integer"):
        pa.load(tmp_path / "c")


def test_format_version_1_loads_with_a_warning(rng, tmp_path):
    # version 1 had no config checksum: lowering the version must not pass silently
    X, L, P, ests = _fitted(rng)
    ests[3].save(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg["format_version"] = 1
    del cfg["config_sha256"]
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="format version 1.*no checksum"):
        est = pa.load(tmp_path / "p")
    np.testing.assert_allclose(
        est.transform(X[:, 0], languages=L), ests[3].transform(X[:, 0], languages=L)
    )


def test_swapped_child_directory_is_refused(rng, tmp_path):
    X, L, P, ests = _fitted(rng)
    ests[4].save(tmp_path / "ra")  # RotateAlign: one child per rotated layer
    other = pa.LanguageMeanCentering().fit(rng.normal(size=(20, 3)), languages=L[:20])
    other.save(tmp_path / "other")
    child = tmp_path / "ra" / "estimators_.0"
    for name in ("config.json", "arrays.safetensors"):
        (child / name).write_bytes((tmp_path / "other" / name).read_bytes())
    with pytest.raises(ValueError, match="not the nested estimator its parent saved"):
        pa.load(tmp_path / "ra")
    # the nested estimator of a PerLayer parameter is bound the same way
    ests[5].save(tmp_path / "pl")
    inner = tmp_path / "pl" / "param.estimator"
    cfg = json.loads((inner / "config.json").read_text())
    cfg["params"]["unknown_language"] = "batch"
    _write_config(inner, cfg)
    with pytest.raises(ValueError, match="not the nested estimator its parent saved"):
        pa.load(tmp_path / "pl")


def test_bytes_labels_give_a_clear_save_error(tmp_path):
    est = pa.LanguageMeanCentering().fit(np.zeros((4, 2)), languages=[b"en", b"en", b"fr", b"fr"])
    with pytest.raises(TypeError, match=r"decode bytes labels first"):
        est.save(tmp_path / "b")
