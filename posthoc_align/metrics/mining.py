"""BUCC-style bitext mining with ratio-margin scoring (Artetxe & Schwenk 2019)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from .._backend import compute_dtype
from ._similarity import (
    DEFAULT_MEMORY_BUDGET,
    NoPairsError,
    check_k,
    check_memory_budget,
    prepare,
    require_pairs,
    scan,
)
from .retrieval import csls_penalties

__all__ = ["bitext_mining_f1", "best_threshold"]


def _ratio_margin_scorer(a: torch.Tensor, b: torch.Tensor) -> Any:
    """``cos(x, y) / (a_x + b_y)`` applied in place to a cosine block."""

    def score(S: torch.Tensor, qs: slice, ts: slice) -> None:
        S.div_(a[qs, None] + b[None, ts])

    return score


def best_threshold(margins: np.ndarray, correct: np.ndarray, n_gold: int) -> tuple[float, float]:
    """Threshold ``t`` maximising F1 of the candidates with ``margin >= t``.

    Candidates are sorted by margin; every cut between two distinct margins is
    tried, and the threshold is the midpoint between the last margin kept and the
    next lower one (as LASER's BUCC script does; the last margin itself when all
    are kept). Among equal F1 the highest cut wins (fewest pairs kept).
    Returns ``(threshold, f1)``.

    Examples
    --------
    >>> best_threshold(np.array([3.0, 2.0, 1.0]), np.array([True, True, False]), 2)
    (1.5, 1.0)
    """
    order = np.argsort(-margins, kind="stable")
    m, c = margins[order], correct[order].astype(np.int64)
    tp = np.cumsum(c)
    n_pred = np.arange(1, m.size + 1)
    last = np.flatnonzero(np.r_[m[1:] != m[:-1], True])  # end of each group of equal margins
    f1 = 2 * tp[last] / (n_pred[last] + n_gold)
    j = int(np.argmax(f1))  # first maximum = highest threshold
    i = last[j]
    t = (m[i] + m[i + 1]) / 2 if i + 1 < m.size else m[i]
    return float(t), float(f1[j])


def _prf(margins: np.ndarray, correct: np.ndarray, n_gold: int, t: float) -> dict[str, float]:
    keep = margins >= t
    tp = int((correct & keep).sum())
    n_pred = int(keep.sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def bitext_mining_f1(
    X: Any,
    languages: Any,
    pair_ids: Any,
    source: Hashable,
    target: Hashable,
    k: int = 4,
    dev_fraction: float = 0.5,
    random_state: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: Any = "auto",
) -> dict[str, float]:
    """F1 of mining translation pairs with a ratio-margin threshold (BUCC style).

    Every source row ``x`` proposes its best target row by the ratio margin of
    Artetxe & Schwenk (2019), "Margin-based Parallel Corpus Mining with
    Multilingual Sentence Embeddings", Eq. 1 with the ratio of §3.1::

        margin(x, y) = cos(x, y) / ( Σ_{z∈NN_k(x)} cos(x, z) / 2k
                                     + Σ_{z∈NN_k(y)} cos(y, z) / 2k )

    where ``NN_k(x)`` are the ``k`` nearest target rows of ``x`` and ``NN_k(y)``
    the ``k`` nearest source rows of ``y`` (forward search, one candidate per
    source row). A candidate is kept when its margin reaches a threshold; the
    gold pairs are the source/target rows sharing a ``pair_id``, and rows without
    a partner are decoys. The threshold maximises F1 on a random ``dev_fraction``
    of the source rows; precision, recall and F1 are reported on the others.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    languages, pair_ids : array-like of shape (n_rows,)
    source, target : hashable
    k : int, default=4
        Neighbourhood size of the margin; clipped to the rows of each side.
    dev_fraction : float in (0, 1), default=0.5
        Share of source rows (decoys included) used to choose the threshold.
    random_state : int, default=0
        Seed of the split: ``np.random.default_rng(random_state).permutation``
        of the source rows, the first ``round(dev_fraction · n_source)`` are dev.
    memory_budget : int, default=512 MiB
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"

    Returns
    -------
    dict
        ``{"f1", "precision", "recall", "threshold"}`` (test-split scores).

    Notes
    -----
    * The threshold maximises dev F1 over every cut of the dev candidates sorted
      by margin; it lies midway between the last margin kept and the next one
      (see :func:`best_threshold`); F1 ties go to the highest cut. Test rows are
      kept when ``margin >= threshold``.
    * A source row whose best target is not its translation is a false positive
      when kept; a gold pair whose source does not propose it is a false negative.
    * Ties between candidate targets go to the lowest target row (scores equal within
      rounding, ``4 · eps · sqrt(d)`` relative, are ties: a duplicated target row is
      never chosen over its first copy, whatever ``memory_budget``).
    * Dask arrays: ``X`` may be a dask array (``languages``/``pair_ids`` numpy, or dask with
      ``X``'s row chunks). Only the rows of ``source`` and ``target`` are computed,
      window by window (``memory_budget // 4`` bytes each); targets larger than
      half the budget are read in segments of a quarter, each once, so memory
      stays within ``memory_budget``. The result equals the numpy one.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import bitext_mining_f1
    >>> rng = np.random.default_rng(0)
    >>> E = rng.normal(size=(40, 16))
    >>> X = np.vstack([E, E[:30] + 0.1 * rng.normal(size=(30, 16))])
    >>> langs = ["en"] * 40 + ["fr"] * 30          # 10 English decoys
    >>> pairs = list(range(40)) + list(range(30))
    >>> bitext_mining_f1(X, langs, pairs, "en", "fr")["f1"]
    1.0
    """
    k = check_k(k)
    if not isinstance(dev_fraction, float | int) or not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be a float in (0, 1), got {dev_fraction!r}.")
    memory_budget = check_memory_budget(memory_budget)
    p = prepare(
        X,
        languages,
        pair_ids,
        source,
        target,
        func="bitext_mining_f1",
        device=device,
        memory_budget=memory_budget,
    )
    require_pairs(p, "bitext_mining_f1", source, target)
    dtype = compute_dtype(p.dtype)
    a = csls_penalties(p.source, p.target, k, memory_budget=memory_budget, device=p.device) / 2
    b = csls_penalties(p.target, p.source, k, memory_budget=memory_budget, device=p.device) / 2
    res = scan(
        p.source,
        p.target,
        similarity="cosine",
        k=1,
        scorer=_ratio_margin_scorer(a.to(p.device, dtype), b.to(p.device, dtype)),
        memory_budget=memory_budget,
        device=p.device,
    )
    margins = res.topk_values[:, 0].to(torch.float64).numpy()
    best = res.topk_indices[:, 0].numpy()
    has_gold = p.gold >= 0
    correct = has_gold & (best == p.gold)

    n = len(p.source)
    perm = np.random.default_rng(random_state).permutation(n)
    n_dev = int(round(dev_fraction * n))
    dev, test = perm[:n_dev], perm[n_dev:]
    n_gold_dev, n_gold_test = int(has_gold[dev].sum()), int(has_gold[test].sum())
    if n_gold_dev == 0 or n_gold_test == 0:
        raise NoPairsError(
            f"bitext_mining_f1: the {'dev' if n_gold_dev == 0 else 'test'} split of the "
            f"{n} source rows holds no translation pair (dev_fraction={dev_fraction}); "
            "use more pairs, another random_state or another dev_fraction."
        )
    threshold, _ = best_threshold(margins[dev], correct[dev], n_gold_dev)
    out = _prf(margins[test], correct[test], n_gold_test, threshold)
    out["threshold"] = threshold
    return out
