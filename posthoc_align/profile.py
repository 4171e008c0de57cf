"""The alignment profile of any encoder: every metric at every layer, before and after.

For decoder-only models nobody knows in advance which layers hold the
language-neutral "implicit encoder" (survey §5.3); this measures it. Point it at any
:class:`~posthoc_align.encoders.HFEncoder` — a hub name, a local path, a GPT-style
model with ``pooling="last"`` or ``"mean"`` — and a parallel dataset.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.base import clone

__all__ = ["alignment_profile", "default_transforms", "best_layers"]

#: keyword arguments of the metrics that hold one value per row of the dataset: the
#: profile evaluates on the held-out rows, so it passes these on for those rows only
PER_ROW_KW = ("y",)


def default_transforms() -> dict[str, Any]:
    """The transforms profiled by default: centring, LSAR and Procrustes to the source."""
    from . import LSAR, LanguageMeanCentering, ProcrustesAligner

    return {
        "centring": LanguageMeanCentering(),
        "LSAR": LSAR(),
        "Procrustes": ProcrustesAligner(),
    }


def _checked(X: Any, langs: Any, pids: Any, what: str):
    """``(X, languages, pair_ids)`` as numpy, X 3-D and one label per row."""
    X = np.asarray(X)
    if X.ndim != 3:
        raise ValueError(
            f"alignment_profile needs the hidden states of every layer, {what} of shape "
            f"(n_rows, n_layers, n_features); got shape {X.shape}. For a single layer pass "
            "X[:, None, :] (or use posthoc_align.metrics.evaluate_pairs on the 2-D X)."
        )
    langs, pids = np.asarray(langs), np.asarray(pids)
    for name, v in (("languages", langs), ("pair_ids", pids)):
        if v.ndim != 1 or v.shape[0] != X.shape[0]:
            raise ValueError(
                f"{name} has shape {v.shape} but X has {X.shape[0]} rows; pass one entry per "
                "row of X."
            )
    return X, langs, pids


def _check_test_fraction(test_fraction: Any) -> float:
    """``test_fraction`` as a float in the open interval (0, 1), else a ValueError."""
    if (
        isinstance(test_fraction, np.ndarray)
        and test_fraction.ndim == 0
        and test_fraction.dtype.kind == "f"
    ):
        test_fraction = test_fraction.item()  # a 0-d float array, e.g. np.array(0.5)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise ValueError(
            f"test_fraction must be a float in the open interval (0, 1), the share of "
            f"translation groups held out for evaluation; got {test_fraction!r} of type "
            f"{type(test_fraction).__name__}. Pass e.g. test_fraction=0.5."
        )
    tf = float(test_fraction)
    if not 0.0 < tf < 1.0:  # also rejects NaN
        raise ValueError(
            f"test_fraction must be in the open interval (0, 1), the share of translation "
            f"groups held out for evaluation (the rest train the transforms); got "
            f"{test_fraction!r}. Pass e.g. test_fraction=0.5."
        )
    return tf


def _as_arrays(encoder: Any, dataset: Any, pooling: str | None):
    """(X (n, layers, d), languages, pair_ids) from a Bunch, a cache or a tuple."""
    if isinstance(dataset, tuple) and len(dataset) == 3:
        return _checked(*dataset, "X of the tuple (X, languages, pair_ids)")
    if hasattr(dataset, "to_numpy") and hasattr(dataset, "pair_ids"):  # EmbeddingCache
        return _checked(
            dataset.to_numpy(), dataset.languages, dataset.pair_ids, "the cache's vectors"
        )
    for key in ("data", "languages", "pair_ids"):
        if key not in dataset:
            raise ValueError(
                f"dataset has no {key!r}; pass a Bunch from posthoc_align.datasets (data, "
                "languages, pair_ids), an EmbeddingCache, or a tuple (X, languages, pair_ids)"
            )
    if encoder is None:
        raise ValueError("encoder is None but dataset holds text; pass an HFEncoder")
    X = encoder.encode(list(dataset["data"]), pooling=pooling)
    if not isinstance(X, np.ndarray) or X.ndim != 3:
        raise ValueError("pooling='tokens' gives no sentence vectors; use mean, cls or last")
    return X, np.asarray(dataset["languages"]), np.asarray(dataset["pair_ids"])


def alignment_profile(
    encoder: Any,
    dataset: Any,
    transforms: Mapping[str, Any] | None = None,
    metrics: Sequence[str] = ("retrieval_cosine", "retrieval_csls", "weak", "strong"),
    *,
    source: str = "en",
    targets: Sequence[str] | None = None,
    test_fraction: float = 0.5,
    pooling: str | None = None,
    random_state: int = 0,
    plot_path: str | None = None,
    **metric_kw: Any,
) -> list[dict[str, Any]]:
    """Every metric at every layer, for the raw states and after each transform.

    Texts are encoded once (all layers). Translation groups (``pair_ids``) are split
    into a training part, on which each transform is fitted layer by layer
    (:class:`~posthoc_align.PerLayer`), and a disjoint held-out part, on which every
    metric is computed for each ``source → target`` pair.

    Parameters
    ----------
    encoder : HFEncoder or None
        Anything with ``encode(texts, pooling=...) -> (n, n_layers + 1, d)``. May be
        None when ``dataset`` already holds vectors.
    dataset : Bunch, EmbeddingCache or tuple
        A Bunch with ``data`` (texts), ``languages`` and ``pair_ids`` (e.g. from
        :func:`posthoc_align.datasets.load_bible`), an
        :class:`~posthoc_align.cache.EmbeddingCache`, or ``(X, languages, pair_ids)``
        with ``X`` of shape (n, n_layers, d).
    transforms : dict {name: estimator}, optional
        Default :func:`default_transforms`. A transform that needs ``pair_ids``
        receives them. A transform whose ``pivot`` parameter is set (not None, e.g.
        ``ProcrustesAligner``) gets ``pivot=source``; pivot-free transforms
        (``GeneralizedProcrustes``, whose ``pivot`` is always None) are left as given.
    metrics : sequence of str
        Names understood by :func:`posthoc_align.metrics.evaluate_pairs` (see
        :data:`posthoc_align.metrics.METRICS`), e.g. ``"language_id"`` for how much
        language information is left, or ``"transfer_gap"`` with ``y=``.
    source : str, default="en"
    targets : sequence of str, optional
        Default: every other language.
    test_fraction : float in (0, 1), default=0.5
        The share of translation groups (``pair_ids``) held out for the metrics;
        the others train the transforms.
    pooling : {"mean", "cls", "last"}, optional
        Overrides the encoder's pooling (``"last"`` for decoder-only models).
    random_state : int, default=0
    plot_path : str, optional
        Save the per-layer curve of the first metric there (PNG; needs matplotlib).
    **metric_kw
        Passed to the metrics (e.g. ``memory_budget``, ``cv``). Per-row arguments
        (:data:`PER_ROW_KW`: ``y``, the task labels of the transfer metrics) are
        given for every row of the dataset, like ``languages``; since the metrics
        run on the held-out rows ``X[test]``, the profile passes them on for those
        rows only.

    Returns
    -------
    list of dict
        Tidy rows ``{layer, transform, source, target, metric, value}``.

    Examples
    --------
    >>> from posthoc_align.encoders import HFEncoder  # doctest: +SKIP
    >>> from posthoc_align.datasets import load_bible  # doctest: +SKIP
    >>> enc = HFEncoder("gpt2-like/local/path", pooling="last")  # doctest: +SKIP
    >>> rows = alignment_profile(enc, load_bible(("en", "fr", "de"), n_verses=500))  # doctest: +SKIP
    >>> best_layers(rows, "retrieval_cosine")  # doctest: +SKIP
    """
    from . import PerLayer
    from .demo import heldout_split
    from .metrics import evaluate_pairs
    from .metrics.table import check_metric_request
    from .per_layer import _accepted

    metrics = check_metric_request(metrics, metric_kw)  # before any encoding or fitting
    test_fraction = _check_test_fraction(test_fraction)
    X, langs, pids = _as_arrays(encoder, dataset, pooling)
    per_row = {}
    for key in PER_ROW_KW:
        v = metric_kw.pop(key, None)
        if v is not None:
            v = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
            if v.ndim != 1 or v.shape[0] != X.shape[0]:
                raise ValueError(
                    f"{key} has shape {v.shape} but the dataset has {X.shape[0]} rows; pass "
                    f"one {key} per row of the dataset (the profile keeps the held-out rows)."
                )
            per_row[key] = v
    available = sorted(set(langs.tolist()))
    if source not in available:
        raise ValueError(f"source language {source!r} is not in the data ({available})")
    targets = list(targets) if targets is not None else [t for t in available if t != source]
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(f"target language(s) {missing} are not in the data ({available})")
    train, test = heldout_split(pids, test_fraction, random_state)
    if not train.any() or not test.any():
        n_groups = np.unique(pids).size
        raise ValueError(
            f"too few translation groups ({n_groups}) to split into train and test with "
            f"test_fraction={test_fraction}; pass more translation groups or a "
            "test_fraction nearer 0.5."
        )
    metric_kw.update({key: v[test] for key, v in per_row.items()})  # the rows evaluated
    transforms = default_transforms() if transforms is None else dict(transforms)
    outputs = {"raw": [X[test][:, i] for i in range(X.shape[1])]}
    for name, est in transforms.items():
        est = clone(est)
        # only a pivot that is set moves to the source; pivot=None means "no pivot"
        if est.get_params(deep=False).get("pivot") is not None:
            est.set_params(pivot=source)
        per_layer = PerLayer(est).fit(X[train], languages=langs[train], pair_ids=pids[train])
        # layer by layer (not PerLayer.transform): a transform may change the width,
        # e.g. LanguageAxes(mode="keep_neutral"), and the metrics take any width
        Xt = X[test]
        outputs[name] = [
            fitted.transform(Xt[:, i], **_accepted(fitted.transform, languages=langs[test]))
            for i, fitted in zip(per_layer.layers_, per_layer.estimators_, strict=True)
        ]
    rows: list[dict[str, Any]] = []
    pairs = [(source, t) for t in targets]
    for name, Z in outputs.items():
        for layer in range(len(Z)):
            rows += evaluate_pairs(
                Z[layer],
                langs[test],
                pids[test],
                pairs=pairs,
                metrics=metrics,
                tags={"layer": layer, "transform": name},
                **metric_kw,
            )
    if plot_path is not None:
        from .plotting import plot_layer_curves

        plot_layer_curves(
            rows,
            metric=metrics[0],
            path=plot_path,
            title=f"{metrics[0]}: {source} -> {', '.join(targets)} (held out)",
        )
    return rows


def best_layers(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, tuple[int, float]]:
    """For each transform, the layer with the highest mean ``metric`` over pairs."""
    acc: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        if r["metric"] == metric and np.isfinite(r["value"]):
            acc.setdefault((r["transform"], r["layer"]), []).append(r["value"])
    best: dict[str, tuple[int, float]] = {}
    for (name, layer), vals in sorted(acc.items()):
        m = float(np.mean(vals))
        if name not in best or m > best[name][1]:
            best[name] = (layer, m)
    return best
