"""Tests of posthoc_align.plotting (figures saved to tmp_path)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

pytest.importorskip("matplotlib")

from posthoc_align.metrics import evaluate_pairs  # noqa: E402
from posthoc_align.plotting import (  # noqa: E402
    plot_language_map,
    plot_language_maps_before_after,
    plot_layer_curves,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one thread avoids OpenMP wake-up costs on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def _languages_data(seed=0, n=40, d=12):
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(n, d))
    shifts = {"en": 0.0, "de": 2.0, "fr": -2.0}
    X = np.vstack([E + s + 0.3 * rng.normal(size=E.shape) for s in shifts.values()])
    langs = np.repeat(list(shifts), n)
    pids = np.tile(np.arange(n), len(shifts))
    return X, langs, pids


def test_layer_curves_from_tidy_rows(tmp_path):
    X, langs, pids = _languages_data()
    rows = []
    for layer in range(4):
        scale = 1.0 / (layer + 1)  # later "layers" carry less language signal
        Xl = X.copy()
        Xl[langs == "de"] -= 2.0 * (1 - scale)
        for name, Y in (("none", Xl), ("centering", Xl - Xl.mean(0))):
            rows += evaluate_pairs(
                Y,
                langs,
                pids,
                metrics=["retrieval_cosine", "weak"],
                tags={"layer": layer, "transform": name},
            )
    path = tmp_path / "curves.png"
    fig = plot_layer_curves(rows, metric="retrieval_cosine", path=path)
    assert _is_png(path)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "layer" and ax.get_ylabel() == "retrieval cosine"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["none", "centering"]
    assert "mean over 6 language pairs" in ax.get_title()
    assert len(ax.lines) == 2 and list(ax.lines[0].get_xdata()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="several metrics"):
        plot_layer_curves(rows)
    with pytest.raises(ValueError, match="not in the rows"):
        plot_layer_curves(rows, metric="strong")
    with pytest.raises(ValueError, match="'layer' column"):
        plot_layer_curves([{"metric": "weak", "value": 0.5}])


def test_layer_curves_from_mapping(tmp_path):
    data = {"none": [0.1, 0.4, 0.5, 0.3], "procrustes": {0: 0.2, 1: 0.6, 2: 0.8, 3: 0.7}}
    path = tmp_path / "m.png"
    fig = plot_layer_curves(data, metric="retrieval_csls", path=path, title="P@1 (CSLS)")
    assert _is_png(path)
    ax = fig.axes[0]
    assert ax.get_title() == "P@1 (CSLS)" and ax.get_ylabel() == "retrieval csls"
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.2, 0.6, 0.8, 0.7])


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_language_map(tmp_path, method):
    X, langs, _ = _languages_data(n=30)
    path = tmp_path / f"map_{method}.png"
    fig = plot_language_map(torch.from_numpy(X), langs, method=method, path=path)
    assert _is_png(path)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    assert sorted(t.get_text() for t in ax.get_legend().get_texts()) == ["de", "en", "fr"]
    assert sum(len(c.get_offsets()) for c in ax.collections) == 90


def test_language_map_subsamples_and_validates(tmp_path):
    X, langs, _ = _languages_data(n=30)
    fig = plot_language_map(X, langs, max_points=20)
    assert sum(len(c.get_offsets()) for c in fig.axes[0].collections) == 20
    with pytest.raises(ValueError, match="method"):
        plot_language_map(X, langs, method="umap")
    with pytest.raises(ValueError, match="languages has"):
        plot_language_map(X, langs[:-1])


def test_before_after(tmp_path):
    X, langs, _ = _languages_data()
    after = X.copy()
    for lang in np.unique(langs):
        after[langs == lang] -= after[langs == lang].mean(0)
    path = tmp_path / "before_after.png"
    fig = plot_language_maps_before_after(
        X, after, langs, path=path, title="Language-mean centring", labels=("raw", "centred")
    )
    assert _is_png(path)
    assert [ax.get_title() for ax in fig.axes] == ["raw", "centred"]
    assert fig.get_suptitle() == "Language-mean centring"
    assert len(fig.legends) == 1
    with pytest.raises(ValueError, match="same rows"):
        plot_language_maps_before_after(X, after[:-1], langs)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "posthoc_align\[plot\]"'):
        plot_layer_curves({"none": [0.1, 0.2]})
