"""Many language pairs × many metrics → one tidy table (a list of dict rows)."""

from __future__ import annotations

import csv
import difflib
import inspect
import math
import os
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from .._dask import check_dask_X, is_dask, labels_numpy
from .._validation import check_languages, check_X
from ._similarity import NoPairsError
from .alignment import alignment_scores
from .hubness import hubness
from .isomorphism import eigenvector_similarity, relational_similarity
from .mining import bitext_mining_f1
from .probes import pair_language_id, pair_transfer
from .retrieval import retrieval_accuracy

__all__ = ["METRICS", "DEFAULT_METRICS", "evaluate_pairs", "to_markdown", "to_csv"]

#: metric name -> (function, fixed keyword arguments, key of the result dict or None)
METRICS: dict[str, tuple[Callable[..., Any], dict[str, Any], str | None]] = {
    "retrieval_cosine": (retrieval_accuracy, {"scoring": "cosine"}, None),
    "retrieval_dot": (retrieval_accuracy, {"scoring": "dot"}, None),
    "retrieval_csls": (retrieval_accuracy, {"scoring": "csls"}, None),
    "weak": (alignment_scores, {}, "weak"),
    "strong": (alignment_scores, {}, "strong"),
    "mean_cosine": (alignment_scores, {}, "mean_cosine"),
    "normalized_cosine": (alignment_scores, {}, "normalized_cosine"),
    "mining_f1": (bitext_mining_f1, {}, "f1"),
    "mining_precision": (bitext_mining_f1, {}, "precision"),
    "mining_recall": (bitext_mining_f1, {}, "recall"),
    "eigenvector_similarity": (eigenvector_similarity, {}, None),
    "relational_similarity": (relational_similarity, {}, None),
    "hubness": (hubness, {}, "k_occurrence_skewness"),
    "hub_occupancy": (hubness, {}, "hub_occupancy"),
    "language_id": (pair_language_id, {}, "accuracy"),
    "language_id_majority": (pair_language_id, {}, "majority_baseline"),
    "transfer_gap": (pair_transfer, {}, "gap"),
    "transfer_target_score": (pair_transfer, {}, "target_score"),
    "transfer_source_score": (pair_transfer, {}, "source_score"),
}

#: metrics that need per-row task labels ``y=``
TRANSFER_METRICS = ("transfer_gap", "transfer_target_score", "transfer_source_score")

DEFAULT_METRICS = (
    "retrieval_cosine",
    "retrieval_csls",
    "weak",
    "strong",
    "mean_cosine",
    "normalized_cosine",
)

_FIXED = {"X", "languages", "pair_ids", "source", "target", "scoring"}


def _accepted(func: Callable[..., Any]) -> set[str]:
    return set(inspect.signature(func).parameters) - _FIXED


def _takes_pair_ids(func: Callable[..., Any]) -> bool:
    return "pair_ids" in inspect.signature(func).parameters


def _unknown_metrics_message(unknown: list[str]) -> str:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(METRICS), n=2, cutoff=0.5)
        close.sort(key=lambda c: not name.startswith(c))  # "language_id_accuracy" → language_id
        if close:
            hints.append(f"{name!r}: did you mean {' or '.join(map(repr, close))}?")
    hint = (" " + " ".join(hints)) if hints else ""
    return f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}.{hint}"


def check_metric_request(metrics: Sequence[str], kw: Mapping[str, Any]) -> list[str]:
    """Validate metric names and the keyword arguments they need; returns the names.

    Raises a ValueError for an unknown name (with a close match when there is one),
    for ``scoring=`` (chosen by the name), and for a transfer metric without ``y=``.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(_unknown_metrics_message(unknown))
    if "scoring" in kw:
        raise ValueError(
            "scoring is chosen by the metric name (retrieval_cosine, retrieval_csls, ...); "
            "drop scoring=."
        )
    wants_y = [m for m in metrics if m in TRANSFER_METRICS]
    if wants_y and kw.get("y") is None:
        raise ValueError(
            f"metric(s) {wants_y} need task labels: pass y= (one label per row of X, all "
            "languages), e.g. evaluate_pairs(X, languages, pair_ids, metrics=[...], y=labels)."
        )
    return metrics


def evaluate_pairs(
    X: Any,
    languages: Any,
    pair_ids: Any,
    pairs: Sequence[tuple[Hashable, Hashable]] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    tags: Mapping[str, Any] | None = None,
    as_frame: bool = False,
    **kw: Any,
) -> list[dict[str, Any]] | Any:
    """Evaluate several metrics on several (source, target) pairs as a tidy table.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    languages, pair_ids : array-like of shape (n_rows,)
    pairs : list of (source, target), optional
        Ordered language pairs. Default: every ordered pair of distinct languages
        (sorted), ``L·(L−1)`` pairs.
    metrics : sequence of str, default=DEFAULT_METRICS
        Names from :data:`METRICS`: ``retrieval_cosine``, ``retrieval_dot``,
        ``retrieval_csls``, ``weak``, ``strong``, ``mean_cosine``,
        ``normalized_cosine``, ``mining_f1``, ``mining_precision``,
        ``mining_recall``, ``eigenvector_similarity``, ``relational_similarity``,
        ``hubness`` (k-occurrence skewness), ``hub_occupancy``;
        ``language_id`` (accuracy of the linear language-ID probe of
        :func:`language_id_accuracy` on the rows of the pair's two languages) and
        ``language_id_majority`` (its majority-class baseline);
        ``transfer_gap``, ``transfer_target_score``, ``transfer_source_score``
        (:func:`transfer_gap` restricted to the two languages: trained on the
        source rows, tested on the target rows, the source score
        cross-validated; they need ``y=``, see ``**kw``).
    tags : mapping, optional
        Extra columns added to every row, e.g. ``{"layer": 6, "transform": "centering"}``
        (what :func:`posthoc_align.plotting.plot_layer_curves` reads).
    as_frame : bool, default=False
        Return a ``pandas.DataFrame`` (needs pandas) instead of a list of dicts.
    **kw
        Passed to every metric function that takes them (``k``, ``memory_budget``,
        ``device``, ``similarity``, ``random_state``, ``n_samples``, ``cv`` of the
        language-ID probe, ``classifier`` of the transfer probe, ...). ``y``: the
        task label of every row of ``X`` (all languages), required by the transfer
        metrics; each pair uses the labels of its own rows.

    Returns
    -------
    list of dict
        One row per (pair, metric): ``{**tags, "source", "target", "metric",
        "value"}``. Each function runs once per pair, whatever the number of
        metrics it provides.

    Notes
    -----
    A pair with too few translations for a metric, or too few rows for the folds of
    the language-ID probe (:class:`NoPairsError`), gets ``value = nan`` and a
    warning, so one sparse pair does not stop a large table; every other error is
    raised.

    Dask arrays: ``X`` may be a dask array (``languages``/``pair_ids`` numpy or
    dask with ``X``'s row chunks, computed once here). Every metric then reads
    only the rows of its two languages, window by window under
    ``memory_budget`` (see the metric functions), so the table equals the numpy
    one; the rows are re-read per (pair, metric function), so persist ``X``
    first if it is expensive to compute. The probes (``language_id*``,
    ``transfer_*``) compute the rows they train on to the host, as
    :func:`language_id_accuracy` and :func:`transfer_gap` do; a dask ``y`` is
    computed once here.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import evaluate_pairs, to_markdown
    >>> rng = np.random.default_rng(0)
    >>> E = rng.normal(size=(20, 8))
    >>> X = np.vstack([E, E + 0.01, E - 0.01])
    >>> langs = ["de"] * 20 + ["en"] * 20 + ["fr"] * 20
    >>> rows = evaluate_pairs(X, langs, list(range(20)) * 3, metrics=["retrieval_cosine"])
    >>> len(rows), rows[0]
    (6, {'source': 'de', 'target': 'en', 'metric': 'retrieval_cosine', 'value': 1.0})
    >>> print(to_markdown(rows[:2]))
    | source | target | metric           | value  |
    |--------|--------|------------------|--------|
    | de     | en     | retrieval_cosine | 1.0000 |
    | de     | fr     | retrieval_cosine | 1.0000 |
    """
    metrics = check_metric_request(metrics, kw)
    funcs = {METRICS[m][0] for m in metrics}
    usable = set().union(*(_accepted(f) for f in funcs)) if funcs else set()
    stray = sorted(set(kw) - usable)
    if stray:
        raise ValueError(
            f"keyword argument(s) {stray} are not taken by the chosen metrics; "
            f"valid ones: {sorted(usable)}."
        )
    if is_dask(X):  # metadata computed once, X read lazily by every metric
        X = check_dask_X(X)
        languages = labels_numpy(languages, X, "languages")
        pair_ids = labels_numpy(pair_ids, X, "pair_ids")
        if "y" in kw:
            kw["y"] = labels_numpy(kw["y"], X, "y")
    else:
        _, X = check_X(X, name="X")
    labels, _ = check_languages(languages, X.shape[0])
    known = labels.tolist()
    if pairs is None:
        pairs = [(s, t) for s in known for t in known if s != t]
    else:
        pairs = [tuple(p) for p in pairs]
        for p in pairs:
            if len(p) != 2:
                raise ValueError(f"pairs must be (source, target) tuples, got {p!r}.")
            missing = [lang for lang in p if lang not in known]
            if missing:
                raise ValueError(
                    f"language(s) {missing} of pair {p!r} do not occur in languages; found {known}."
                )
    extra = dict(tags or {})
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for src, tgt in pairs:
        cache: dict[tuple[Any, ...], Any] = {}
        for name in metrics:
            func, fixed, key = METRICS[name]
            call_kw = {**{a: v for a, v in kw.items() if a in _accepted(func)}, **fixed}
            ck = (func.__name__, tuple(sorted(fixed.items())))
            if ck not in cache:
                args = (X, languages, pair_ids) if _takes_pair_ids(func) else (X, languages)
                try:
                    cache[ck] = func(*args, src, tgt, **call_kw)
                except NoPairsError as exc:
                    cache[ck] = exc
            out = cache[ck]
            if isinstance(out, NoPairsError):
                value = math.nan
                skipped.append(f"{src}->{tgt} {name}: {out}")
            else:
                value = float(out if key is None else out[key])
            rows.append({**extra, "source": src, "target": tgt, "metric": name, "value": value})
    if skipped:
        warnings.warn(
            f"{len(skipped)} value(s) set to NaN for lack of translation pairs or rows; first: "
            f"{skipped[0]}",
            RuntimeWarning,
            stacklevel=2,
        )
    if as_frame:
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError(
                "as_frame=True needs pandas (pip install pandas); the default list of "
                "dicts needs nothing."
            ) from exc
        return pd.DataFrame(rows)
    return rows


def _columns(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    cols: dict[str, None] = {}
    for r in rows:
        for c in r:
            cols.setdefault(c, None)
    return list(cols)


def _fmt(v: Any, floatfmt: str) -> str:
    if isinstance(v, float):
        return format(v, floatfmt)
    return str(v)


def to_markdown(rows: Sequence[Mapping[str, Any]], floatfmt: str = ".4f") -> str:
    """A GitHub-flavoured Markdown table of tidy rows (columns in first-seen order).

    Examples
    --------
    >>> print(to_markdown([{"metric": "weak", "value": 0.5}]))
    | metric | value  |
    |--------|--------|
    | weak   | 0.5000 |
    """
    cols = _columns(rows)
    cells = [[_fmt(r.get(c, ""), floatfmt) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join([line, rule, *body])


def to_csv(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write tidy rows to a CSV file (header = columns in first-seen order).

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "scores.csv")
    >>> to_csv([{"metric": "weak", "value": 0.5}], path)
    >>> open(path).read().splitlines()
    ['metric,value', 'weak,0.5']
    """
    cols = _columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, restval="")
        writer.writeheader()
        for r in rows:
            writer.writerow(dict(r))
