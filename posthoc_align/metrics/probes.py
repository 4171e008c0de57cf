"""Linear probes: language identification and zero-shot cross-lingual transfer gap."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from .._dask import check_dask_X, is_dask, labels_numpy
from .._validation import check_labels, check_languages, check_X, raise_non_finite
from ._similarity import NoPairsError

__all__ = ["language_id_accuracy", "transfer_gap"]


def _host(X: Any) -> np.ndarray:
    if is_dask(X):
        A = np.asarray(check_dask_X(X).compute())
    else:
        nx, X = check_X(X, name="X")
        A = nx.asnumpy(X)
    if not np.isfinite(A).all():
        raise_non_finite(A)
    return A


def _predict_block(block: np.ndarray, model: Any) -> np.ndarray:
    if not np.isfinite(block).all():
        raise_non_finite(block)
    return model.predict(block)


def language_id_accuracy(
    X: Any, languages: Any, cv: int = 5, random_state: int = 0
) -> dict[str, float]:
    """Cross-validated accuracy of a linear language-identification probe.

    Libovický, Rosa & Fraser (2020), "On the Language Neutrality of Pre-trained
    Multilingual Representations", §4 (language identification): the lower the
    probe's accuracy above the majority baseline, the more language-neutral the
    representation. The probe is ``StandardScaler`` then
    ``LogisticRegression(max_iter=1000)``, scored by accuracy over a shuffled,
    seeded ``StratifiedKFold(cv)``.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    languages : array-like of shape (n_rows,)
    cv : int, default=5
        Number of folds; every language needs at least ``cv`` rows.
    random_state : int, default=0
        Seed of the fold shuffle (and of the probe).

    Returns
    -------
    dict
        ``{"accuracy", "majority_baseline", "n_languages"}``: mean fold accuracy,
        the share of the largest language (accuracy of always guessing it), and
        the number of languages.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import language_id_accuracy
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(60, 4)) + np.repeat([[0.0] * 4, [5.0] * 4], 30, axis=0)
    >>> language_id_accuracy(X, ["en"] * 30 + ["de"] * 30)
    {'accuracy': 1.0, 'majority_baseline': 0.5, 'n_languages': 2}

    Notes
    -----
    Dask arrays: ``X`` may be a dask array (``languages`` numpy or dask with
    ``X``'s row chunks). The probe's folds train on all rows, so ``X`` is
    computed to the host (``n × d``, as with numpy input); the result equals
    the numpy one.
    """
    if is_dask(X):
        languages = labels_numpy(languages, check_dask_X(X), "languages")
    A = _host(X)
    labels, codes = check_languages(languages, A.shape[0])
    if labels.size < 2:
        raise ValueError(f"language_id_accuracy needs at least 2 languages, got {labels.tolist()}.")
    if isinstance(cv, bool) or not isinstance(cv, int | np.integer) or cv < 2:
        raise ValueError(f"cv must be an int >= 2, got {cv!r}.")
    counts = np.bincount(codes)
    if counts.min() < cv:
        small = labels[int(np.argmin(counts))]
        raise ValueError(
            f"language {small!r} has {counts.min()} row(s), fewer than cv={cv} folds; "
            "pass a smaller cv or more rows."
        )
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=1000, random_state=random_state)
    )
    folds = StratifiedKFold(n_splits=cv, shuffle=True, random_state=random_state)
    scores = cross_val_score(probe, A, codes, cv=folds, scoring="accuracy")
    return {
        "accuracy": float(scores.mean()),
        "majority_baseline": float(counts.max() / counts.sum()),
        "n_languages": int(labels.size),
    }


def transfer_gap(
    X: Any,
    y: Any,
    languages: Any,
    source: Hashable,
    classifier: BaseEstimator | None = None,
) -> dict[str, Any]:
    """Zero-shot cross-lingual transfer gap of a probe trained on one language.

    Train ``classifier`` on the rows of ``source`` and test it on every other
    language (zero-shot transfer, e.g. Hu et al. 2020 "XTREME", §4)::

        gap = acc(source) − mean_{l ≠ source} acc(l)

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    y : array-like of shape (n_rows,)
        Task labels.
    languages : array-like of shape (n_rows,)
    source : hashable
        Training language.
    classifier : estimator, optional
        Cloned before fitting. Default ``LogisticRegression(max_iter=1000)``.

    Returns
    -------
    dict
        ``{"scores": {language: accuracy}, "source_score", "target_mean", "gap"}``.

    Notes
    -----
    The source language's own score would be a training accuracy if measured on
    the training rows, so it is a cross-validated accuracy instead: a shuffled
    ``StratifiedKFold`` (seed 0) with ``min(5, smallest class count)`` folds,
    each fold fitting a fresh clone. The transfer model is fitted once on all
    source rows.

    Dask arrays: ``X`` may be a dask array (``y`` and ``languages`` numpy or
    dask with ``X``'s row chunks). Only the source language's rows are computed
    to the host (the probe trains on them); every other row is predicted block
    by block (``map_blocks``), so memory is the source rows plus one chunk. The
    result equals the numpy one.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import transfer_gap
    >>> rng = np.random.default_rng(0)
    >>> y = np.tile([0, 1], 40)
    >>> X = rng.normal(size=(80, 3)) + 4 * y[:, None]
    >>> X[40:, 0] += 8                     # German rows are shifted: weaker transfer
    >>> out = transfer_gap(X, y, ["en"] * 40 + ["de"] * 40, "en")
    >>> out["source_score"], out["gap"] > 0
    (1.0, True)
    """
    dask_in = is_dask(X)
    if dask_in:
        X = check_dask_X(X)
        y, languages = labels_numpy(y, X, "y"), labels_numpy(languages, X, "languages")
        n = X.shape[0]
    else:
        A = _host(X)
        n = A.shape[0]
    y_labels, y_codes = check_labels(y, n, "y")
    y_arr = y_labels[y_codes]
    labels, codes = check_languages(languages, n)
    known = labels.tolist()
    if source not in known:
        raise ValueError(f"source language {source!r} does not occur in languages; found {known}.")
    if len(known) < 2:
        raise ValueError("transfer_gap needs rows of at least one language besides the source.")
    s = known.index(source)
    clf = LogisticRegression(max_iter=1000) if classifier is None else classifier
    is_src = codes == s
    y_src = y_arr[is_src]
    class_counts = np.bincount(y_codes[is_src])
    class_counts = class_counts[class_counts > 0]
    if class_counts.size < 2:
        raise ValueError(
            f"the {int(is_src.sum())} rows of source language {source!r} hold a single "
            "class; the probe needs at least two."
        )
    n_splits = int(min(5, class_counts.min()))
    if n_splits < 2:
        raise ValueError(
            f"a class has a single row in source language {source!r}; cross-validating the "
            "source score needs at least 2 rows per class."
        )
    folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=0)
    A_src = _host(X[np.flatnonzero(is_src)]) if dask_in else A[is_src]
    source_score = float(
        cross_val_score(clone(clf), A_src, y_src, cv=folds, scoring="accuracy").mean()
    )
    model = clone(clf).fit(A_src, y_src)
    if dask_in:  # every other row predicted block by block, one dask.compute
        rest = np.flatnonzero(~is_src)
        pred = X[rest].map_blocks(
            _predict_block, model, drop_axis=1, dtype=y_src.dtype, meta=np.empty(0, y_src.dtype)
        )
        hit = np.zeros(n, dtype=bool)
        hit[rest] = np.asarray(pred.compute()) == y_arr[rest]
    scores: dict[Any, float] = {}
    for i, lang in enumerate(known):
        if i == s:
            scores[lang] = source_score
        else:
            rows = codes == i
            if dask_in:
                scores[lang] = float(np.mean(hit[rows]))
            else:
                scores[lang] = float(np.mean(model.predict(A[rows]) == y_arr[rows]))
    target_mean = float(np.mean([v for i, v in enumerate(scores.values()) if i != s]))
    return {
        "scores": scores,
        "source_score": source_score,
        "target_mean": target_mean,
        "gap": source_score - target_mean,
    }


# -- one language pair at a time (the tidy table of evaluate_pairs) -----------------------


def _pair_rows(
    X: Any, languages: Any, source: Hashable, target: Hashable, func: str
) -> tuple[Any, np.ndarray, np.ndarray, int]:
    """``X`` validated, the rows of ``source`` and ``target`` (in row order), all labels.

    Returns ``(X, rows, languages_of_rows, n_rows_of_X)``; a dask ``X`` stays lazy.
    """
    if is_dask(X):
        X = check_dask_X(X)
        languages = labels_numpy(languages, X, "languages")
    else:
        nx, X = check_X(X, name="X")
        X = nx.asnumpy(X)
    n = X.shape[0]
    if languages is None:
        raise ValueError(f"{func} needs languages= (one language label per row of X).")
    labels, codes = check_languages(languages, n)
    known = labels.tolist()
    for name, lang in (("source", source), ("target", target)):
        if lang not in known:
            raise ValueError(
                f"{name} language {lang!r} does not occur in languages; found {known}."
            )
    if source == target:
        raise ValueError(
            f"source and target are the same language {source!r}; pass two different languages."
        )
    s, t = known.index(source), known.index(target)
    rows = np.flatnonzero((codes == s) | (codes == t))
    return X, rows, labels[codes[rows]], n


def pair_language_id(
    X: Any,
    languages: Any,
    source: Hashable,
    target: Hashable,
    cv: int = 5,
    random_state: int = 0,
) -> dict[str, float]:
    """:func:`language_id_accuracy` on the rows of two languages only.

    The entry ``"language_id"`` (and ``"language_id_majority"``) of
    :data:`~posthoc_align.metrics.METRICS`: how well a linear probe tells
    ``source`` rows from ``target`` rows (the order of the two does not matter).

    Parameters
    ----------
    X : array-like, torch.Tensor or dask array of shape (n_rows, n_features)
        Every language stacked; only the rows of the two languages are used.
    languages : array-like of shape (n_rows,)
    source, target : hashable
        The two languages (must differ).
    cv, random_state : int
        As for :func:`language_id_accuracy`.

    Returns
    -------
    dict
        ``{"accuracy", "majority_baseline", "n_languages"}`` of the probe on the
        two languages' rows.

    Raises
    ------
    NoPairsError
        One of the two languages has fewer rows than ``cv`` folds (a
        :class:`ValueError`; :func:`evaluate_pairs` records NaN for such a pair).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(90, 4)) + np.repeat([[0.0] * 4, [5.0] * 4, [0.0] * 4], 30, axis=0)
    >>> langs = ["en"] * 30 + ["de"] * 30 + ["fr"] * 30
    >>> pair_language_id(X, langs, "en", "de")["accuracy"]
    1.0
    """
    X, rows, langs, _ = _pair_rows(X, languages, source, target, "language_id")
    if isinstance(cv, bool) or not isinstance(cv, int | np.integer) or cv < 2:
        raise ValueError(f"cv must be an int >= 2, got {cv!r}.")
    for lang in (source, target):
        c = int(np.sum(langs == lang))
        if c < cv:
            raise NoPairsError(
                f"language_id: language {lang!r} has {c} row(s), fewer than cv={cv} folds; "
                "pass a smaller cv or more rows."
            )
    return language_id_accuracy(X[rows], langs, cv=cv, random_state=random_state)


def pair_transfer(
    X: Any,
    languages: Any,
    source: Hashable,
    target: Hashable,
    y: Any = None,
    classifier: BaseEstimator | None = None,
) -> dict[str, float]:
    """:func:`transfer_gap` from ``source`` to ``target`` on those two languages' rows.

    The entries ``"transfer_gap"``, ``"transfer_target_score"`` and
    ``"transfer_source_score"`` of :data:`~posthoc_align.metrics.METRICS`: the probe
    is trained on the ``source`` rows and tested on the ``target`` rows; the source
    score is cross-validated on the source rows, as :func:`transfer_gap` defines it.

    Parameters
    ----------
    X : array-like, torch.Tensor or dask array of shape (n_rows, n_features)
    languages : array-like of shape (n_rows,)
    source, target : hashable
    y : array-like of shape (n_rows,)
        Task label of every row of ``X`` (all languages; the two languages' rows
        are taken). Required.
    classifier : estimator, optional
        As for :func:`transfer_gap`.

    Returns
    -------
    dict
        ``{"gap", "target_score", "source_score"}`` with
        ``gap = source_score − target_score``.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = np.tile([0, 1], 60)
    >>> X = rng.normal(size=(120, 3)) + 4 * y[:, None]
    >>> langs = ["en"] * 40 + ["de"] * 40 + ["fr"] * 40
    >>> out = pair_transfer(X, langs, "en", "de", y=y)
    >>> out["source_score"], out["target_score"]
    (1.0, 1.0)
    """
    if y is None:
        raise ValueError(
            "the transfer metrics (transfer_gap, transfer_target_score, "
            "transfer_source_score) need task labels: pass y= (one label per row of X, "
            "e.g. evaluate_pairs(..., y=labels) or alignment_profile(..., y=labels))."
        )
    X, rows, langs, n = _pair_rows(X, languages, source, target, "transfer_gap")
    if is_dask(X):
        y = labels_numpy(y, X, "y")
    y_labels, y_codes = check_labels(y, n, "y")
    # too few source rows per class for the probe: NaN in a table, like language_id
    src_counts = np.bincount(y_codes[rows][np.asarray(langs) == source])
    src_counts = src_counts[src_counts > 0]
    if src_counts.size < 2 or src_counts.min() < 2:
        raise NoPairsError(
            f"transfer from {source!r}: its rows need at least two classes with at least 2 "
            f"rows each (class counts {src_counts.tolist()})"
        )
    out = transfer_gap(X[rows], y_labels[y_codes[rows]], langs, source, classifier=classifier)
    return {
        "gap": out["gap"],
        "target_score": out["scores"][target],
        "source_score": out["source_score"],
    }
