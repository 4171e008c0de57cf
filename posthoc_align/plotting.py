"""Figures: metric-by-layer curves and 2-D maps of rows coloured by language.

matplotlib is an optional extra (``pip install "posthoc_align[plot]"``); it is
imported inside each function. Figures are built on matplotlib's object API with
the Agg canvas (``matplotlib.figure.Figure``), so nothing here touches pyplot's
global state or needs a display; each function returns the ``Figure`` and saves
it when given ``path``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ._validation import check_languages, check_X

__all__ = ["plot_layer_curves", "plot_language_map", "plot_language_maps_before_after"]

_INSTALL = 'plotting needs matplotlib: pip install "posthoc_align[plot]"'


def _figure(figsize: tuple[float, float]) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(_INSTALL) from exc
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike[str] | None) -> None:
    if path is not None:
        fig.savefig(path, dpi=150)


# -- metric by layer ------------------------------------------------------------------


def _curves_from_rows(
    rows: Sequence[Mapping[str, Any]], metric: str | None
) -> tuple[dict[str, dict[Any, list[float]]], str, int]:
    metrics = sorted({str(r["metric"]) for r in rows if "metric" in r})
    if metric is None:
        if len(metrics) > 1:
            raise ValueError(f"the rows hold several metrics {metrics}; pass metric= one of them.")
        # rows without a metric column (it is optional) plot as "value"
        metric = metrics[0] if metrics else None
    elif metrics and metric not in metrics:
        raise ValueError(f"metric {metric!r} is not in the rows; found {metrics}.")
    curves: dict[str, dict[Any, list[float]]] = {}
    groups: set[tuple[Any, Any]] = set()
    for r in rows:
        if r.get("metric", metric) != metric:
            continue
        if "layer" not in r:
            raise ValueError(
                "rows need a 'layer' column; add it with "
                "evaluate_pairs(..., tags={'layer': layer, 'transform': name})."
            )
        name = str(r.get("transform", "value"))
        curves.setdefault(name, {}).setdefault(r["layer"], []).append(float(r["value"]))
        groups.add((r.get("source"), r.get("target")))
    return curves, metric or "value", len(groups)


#: markers of the curves: 11 of them, one more than the colours of matplotlib's
#: default cycle, so colour and marker do not repeat together
_MARKERS = "osD^v<>ph*X"
_LINESTYLES = ("-", "--", "-.", ":")


def _line_styles(n: int) -> list[dict[str, Any]]:
    """Colour, marker and line style of ``n`` curves, distinct for any ``n`` up to hundreds.

    The colours are those of matplotlib's ``axes.prop_cycle`` (10 by default), the
    markers cycle with another period (11), and each pass through the colours gets
    the next line style (solid, dashed, dash-dot, dotted): curve ``i`` and curve
    ``i + 10`` share a colour but differ in marker and line style.

    Examples
    --------
    >>> s = _line_styles(12)
    >>> s[0]["linestyle"], s[10]["linestyle"], s[0]["marker"] != s[10]["marker"]
    ('-', '--', True)
    """
    from matplotlib import rcParams

    colours = list(rcParams["axes.prop_cycle"].by_key().get("color", []))
    n_col = len(colours) or 10
    out = []
    for i in range(n):
        style: dict[str, Any] = {
            "marker": _MARKERS[i % len(_MARKERS)],
            "linestyle": _LINESTYLES[(i // n_col) % len(_LINESTYLES)],
        }
        if colours:
            style["color"] = colours[i % n_col]
        out.append(style)
    return out


def plot_layer_curves(
    data: Sequence[Mapping[str, Any]] | Mapping[str, Any],
    metric: str | None = None,
    path: str | os.PathLike[str] | None = None,
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (6.4, 4.2),
) -> Any:
    """Plot a metric against the layer, one line per transform.

    Parameters
    ----------
    data : list of dict or dict
        Either tidy rows with ``layer``, ``value`` and optionally ``metric``,
        ``transform``, ``source``, ``target`` (e.g. from
        :func:`posthoc_align.metrics.evaluate_pairs` with
        ``tags={"layer": ..., "transform": ...}``), or a mapping
        ``{transform: {layer: value}}`` or ``{transform: [value per layer]}``.
        Several rows for one (transform, layer), e.g. several language pairs, are
        averaged, and the title says over how many pairs. Rows without ``metric``
        are plotted as they are (y-axis "value" unless ``metric`` is given).
    metric : str, optional
        Which metric of the rows to plot (needed when they hold several); for a
        mapping, the y-axis label.
    path : str or path-like, optional
        Save the figure there (PNG by extension, 150 dpi).
    title : str, optional
    figsize : (float, float)

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Curves differ in colour (matplotlib's colour cycle), marker and, past the
    number of colours (10 by default), line style, so any number of transforms
    stays distinguishable.

    Examples
    --------
    >>> from posthoc_align.plotting import plot_layer_curves
    >>> fig = plot_layer_curves({"none": [0.2, 0.5, 0.4], "centering": [0.3, 0.7, 0.6]},
    ...                         metric="retrieval_cosine")
    >>> fig.axes[0].get_xlabel()
    'layer'
    """
    fig = _figure(figsize)
    ax = fig.add_subplot()
    n_groups = 0
    if isinstance(data, Mapping):
        curves = {
            str(name): dict(v) if isinstance(v, Mapping) else dict(enumerate(v))
            for name, v in data.items()
        }
        curves = {name: {lay: [float(val)] for lay, val in c.items()} for name, c in curves.items()}
        label = metric or "value"
    else:
        curves, label, n_groups = _curves_from_rows(list(data), metric)
    if not curves:
        raise ValueError("nothing to plot: no rows for this metric.")
    for (name, pts), style in zip(curves.items(), _line_styles(len(curves)), strict=True):
        layers = sorted(pts)
        ax.plot(layers, [float(np.mean(pts[lay])) for lay in layers], label=name, **style)
    ax.set_xlabel("layer")
    ax.set_ylabel(label.replace("_", " "))
    if all(isinstance(lay, int | np.integer) for c in curves.values() for lay in c):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(title="transform", fontsize="small")
    if title is None:
        title = f"{label.replace('_', ' ')} by layer"
        if n_groups > 1:
            title += f" (mean over {n_groups} language pairs)"
    ax.set_title(title)
    _save(fig, path)
    return fig


# -- 2-D language maps ----------------------------------------------------------------


def _subsample(n: int, max_points: int | None, random_state: int) -> np.ndarray:
    if max_points is None or n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(random_state)
    return np.sort(rng.choice(n, size=max_points, replace=False))


def _embed_2d(A: np.ndarray, method: str, random_state: int) -> tuple[np.ndarray, list[str]]:
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=random_state)
        Y = pca.fit_transform(A)
        ratio = pca.explained_variance_ratio_
        return Y, [f"PC {i + 1} ({100 * r:.1f}% of variance)" for i, r in enumerate(ratio)]
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (A.shape[0] - 1) / 3)))
    Y = TSNE(
        n_components=2, perplexity=perplexity, init="pca", random_state=random_state
    ).fit_transform(A)
    return Y, ["t-SNE 1", "t-SNE 2"]


def _prepare_map(
    X: Any,
    languages: Any,
    method: str,
    idx: np.ndarray | None,
    max_points: int | None,
    random_state: int,
    name: str = "X",
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if method not in ("pca", "tsne"):
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}.")
    nx, X = check_X(X, name=name)
    labels, codes = check_languages(languages, X.shape[0])
    if idx is None:
        idx = _subsample(X.shape[0], max_points, random_state)
    A = np.asarray(nx.asnumpy(X)[idx], dtype=np.float64)
    if not np.isfinite(A).all():
        raise ValueError(f"{name} contains NaN or infinity; remove those rows first.")
    return A, labels, codes[idx], idx


def _scatter(
    ax: Any, Y: np.ndarray, labels: np.ndarray, codes: np.ndarray, axis_labels: list[str]
) -> None:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if labels.size <= 10 else "tab20"]
    for c, lab in enumerate(labels):
        sel = codes == c
        ax.scatter(
            Y[sel, 0],
            Y[sel, 1],
            s=12,
            alpha=0.7,
            color=cmap(c % cmap.N),
            label=str(lab),
            edgecolors="none",
        )
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])


def _legend(fig_or_ax: Any, ax: Any, n: int) -> None:
    handles, names = ax.get_legend_handles_labels()
    ncol = 1 if n <= 12 else 2
    fig_or_ax.legend(
        handles,
        names,
        title="language",
        fontsize="small",
        markerscale=1.5,
        ncol=ncol,
        loc="outside right upper" if fig_or_ax is not ax else "best",
    )


def plot_language_map(
    X: Any,
    languages: Any,
    method: str = "pca",
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    random_state: int = 0,
    *,
    max_points: int | None = 5000,
    figsize: tuple[float, float] = (6.4, 5.0),
) -> Any:
    """2-D map of the rows (PCA or t-SNE), coloured by language.

    Language-specific subspaces show up as separated clouds (Libovický et al.
    2020, Fig. 1); a language-neutral representation mixes them.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    languages : array-like of shape (n_rows,)
    method : {"pca", "tsne"}, default="pca"
    path : str or path-like, optional
        Save the figure there.
    title : str, optional
    random_state : int, default=0
        Seed of the subsample and of the projection.
    max_points : int or None, default=5000
        Plot a random subset of at most this many rows (None: all).
    figsize : (float, float)

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.plotting import plot_language_map
    >>> X = np.random.default_rng(0).normal(size=(40, 5))
    >>> fig = plot_language_map(X, ["en"] * 20 + ["de"] * 20)
    >>> fig.axes[0].get_xlabel().startswith("PC 1")
    True
    """
    A, labels, codes, _ = _prepare_map(X, languages, method, None, max_points, random_state)
    fig = _figure(figsize)
    ax = fig.add_subplot()
    Y, axis_labels = _embed_2d(A, method, random_state)
    _scatter(ax, Y, labels, codes, axis_labels)
    _legend(ax, ax, labels.size)
    ax.set_title(
        title or f"Rows by language ({'PCA' if method == 'pca' else 't-SNE'}, {A.shape[0]} rows)"
    )
    _save(fig, path)
    return fig


def plot_language_maps_before_after(
    X_before: Any,
    X_after: Any,
    languages: Any,
    method: str = "pca",
    path: str | os.PathLike[str] | None = None,
    title: str | None = None,
    random_state: int = 0,
    *,
    labels: Iterable[str] = ("before", "after"),
    max_points: int | None = 5000,
    figsize: tuple[float, float] = (11.0, 4.8),
) -> Any:
    """Two language maps side by side: the rows before and after a transform.

    The same rows (same random subset) are projected separately in each panel.

    Parameters
    ----------
    X_before, X_after : array-like or torch.Tensor of shape (n_rows, n_features)
        Same rows, e.g. hidden states and their aligned version (the number of
        features may differ).
    languages : array-like of shape (n_rows,)
    method : {"pca", "tsne"}, default="pca"
    path : str or path-like, optional
    title : str, optional
        Figure title above both panels.
    random_state : int, default=0
    labels : (str, str), default=("before", "after")
        Panel titles.
    max_points : int or None, default=5000
    figsize : (float, float)

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.plotting import plot_language_maps_before_after
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(40, 5)) + np.repeat([[0.0] * 5, [3.0] * 5], 20, axis=0)
    >>> langs = ["en"] * 20 + ["de"] * 20
    >>> fig = plot_language_maps_before_after(X, X - X.mean(0), langs)
    >>> [ax.get_title() for ax in fig.axes]
    ['before', 'after']
    """
    n_before = check_X(X_before, name="X_before")[1].shape[0]
    n_after = check_X(X_after, name="X_after")[1].shape[0]
    if n_before != n_after:
        raise ValueError(
            f"X_before and X_after must hold the same rows; got {n_before} and {n_after} rows."
        )
    A, labs, codes, idx = _prepare_map(
        X_before, languages, method, None, max_points, random_state, "X_before"
    )
    B, _, _, _ = _prepare_map(X_after, languages, method, idx, max_points, random_state, "X_after")
    names = list(labels)
    if len(names) != 2:
        raise ValueError(f"labels must be two panel titles, got {names!r}.")
    fig = _figure(figsize)
    axes = fig.subplots(1, 2)
    for ax, M, name in zip(axes, (A, B), names, strict=True):
        Y, axis_labels = _embed_2d(M, method, random_state)
        _scatter(ax, Y, labs, codes, axis_labels)
        ax.set_title(name)
    _legend(fig, axes[0], labs.size)
    fig.suptitle(
        title or f"Rows by language ({'PCA' if method == 'pca' else 't-SNE'}, {A.shape[0]} rows)"
    )
    _save(fig, path)
    return fig
