"""Cross-lingual retrieval accuracy (P@1) with cosine, dot or CSLS scoring."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from .._backend import compute_dtype
from ._similarity import (
    DEFAULT_MEMORY_BUDGET,
    Paired,
    Rows,
    check_k,
    check_memory_budget,
    prepare,
    require_pairs,
    row_norms,
    scan,
    score_scale,
    strictly_above,
)

__all__ = ["retrieval_accuracy", "csls_penalties"]

_SCORINGS = ("cosine", "dot", "csls")


def csls_penalties(
    queries: Rows,
    neighbours: Rows,
    k: int,
    *,
    memory_budget: int,
    device: torch.device,
) -> torch.Tensor:
    """Mean cosine of each query row to its ``k`` nearest ``neighbours`` rows.

    This is ``r_T(x)`` / ``r_S(y)`` of CSLS (Lample et al. 2018, Eq. 5) and the
    kNN term of the ratio margin (Artetxe & Schwenk 2019). ``k`` is clipped to
    the number of neighbour rows. Returns a CPU tensor of shape (n_queries,).
    """
    k = min(k, len(neighbours))
    res = scan(
        queries, neighbours, similarity="cosine", k=k, memory_budget=memory_budget, device=device
    )
    return res.topk_values.mean(dim=1)


def _csls_scorer(r_target: torch.Tensor) -> Any:
    """Ranking part of CSLS, ``2 cos(x, y) − r_S(y)``, applied in place."""

    def score(S: torch.Tensor, qs: slice, ts: slice) -> None:
        S.mul_(2).sub_(r_target[None, ts])

    return score


def _gold_and_best(
    p: Paired,
    queries: np.ndarray,
    scoring: str,
    k: int,
    memory_budget: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gold score, best non-gold score and tie scale of each query row (numpy).

    The tie scale is :func:`score_scale` of the scores (None for cosine and CSLS).
    """
    scorer = None
    if scoring == "csls":
        r_s = csls_penalties(p.target, p.source, k, memory_budget=memory_budget, device=p.device)
        scorer = _csls_scorer(r_s.to(p.device, dtype=compute_dtype(p.dtype)))
    res = scan(
        p.source.subset(queries),
        p.target,
        similarity="dot" if scoring == "dot" else "cosine",
        gold=p.gold[queries],
        scorer=scorer,
        memory_budget=memory_budget,
        device=p.device,
    )
    # rounding relative to the rows compared: the query and its translation (a large
    # unrelated target row must not widen every query's tie band)
    scale = None
    if scoring == "dot":
        gold_norms = row_norms(p.target.subset(p.gold[queries]))
        scale = score_scale(scoring, res.query_norms, gold_norms)
    return res.gold_score.numpy(), res.best_other.numpy(), scale


def retrieval_accuracy(
    X: Any,
    languages: Any,
    pair_ids: Any,
    source: Hashable,
    target: Hashable,
    scoring: str = "cosine",
    k: int = 10,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: Any = "auto",
) -> float:
    """Precision at 1 of retrieving each source row's translation among all target rows.

    For every source row ``x`` that has a translation ``y*`` (a target row with the
    same ``pair_id``), the retrieval is correct when ``y*`` scores *strictly higher*
    than every other target row::

        P@1 = (1/|Q|) Σ_{x∈Q} 1[ s(x, y*) > max_{y ≠ y*} s(x, y) ]

    with ``s`` the cosine, the dot product, or CSLS (Lample et al. 2018,
    "Word Translation Without Parallel Data", Eq. 6)::

        CSLS(x, y) = 2 cos(x, y) − r_T(x) − r_S(y)

    where ``r_T(x)`` is the mean cosine of ``x`` to its ``k`` nearest target rows
    and ``r_S(y)`` the mean cosine of ``y`` to its ``k`` nearest source rows.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
        Hidden states, every language stacked.
    languages : array-like of shape (n_rows,)
        Language of each row.
    pair_ids : array-like of shape (n_rows,)
        Rows sharing a ``pair_id`` are translations of each other.
    source, target : hashable
        The query and the searched language (must differ).
    scoring : {"cosine", "dot", "csls"}, default="cosine"
    k : int, default=10
        Neighbourhood size of CSLS (ignored otherwise); clipped to the number of
        rows of the language searched.
    memory_budget : int, default=512 MiB
        Bytes of working memory of the block-wise search (see
        :func:`posthoc_align.metrics._similarity.plan_blocks`).
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the similarity blocks are computed. ``"auto"``: a tensor's own
        device; numpy input on CUDA when available, else the CPU.

    Returns
    -------
    float
        P@1 in [0, 1].

    Raises
    ------
    ValueError
        Unknown or equal languages, lengths that differ from ``X``, a source
        ``pair_id`` found on several target rows, or no source row with a
        translation.

    Notes
    -----
    * Source rows without a translation are not queried; target rows without one
      stay in the search as distractors. ``r_S`` uses *all* source rows.
    * Ties: a query counts as correct only if its translation scores strictly
      higher than every other target row; a tie is a miss. Scores within rounding
      of each other are a tie, so a duplicate of the translation among the targets
      is a tie wherever it sits, whatever ``memory_budget``. Rounding is
      ``4 · eps · sqrt(d)`` times the scale of the scores: 1 (or the larger score)
      for cosine and CSLS, and ``‖x‖ · ‖y‖`` of the query and its translation for ``"dot"``, so dot
      scoring gives the same hits at any scale of ``X`` (``X`` and ``1e-4 · X``).
    * ``r_T(x)`` is the same for every candidate of a query, so it cannot change
      the ranking; the search ranks by ``2 cos(x, y) − r_S(y)`` and skips that pass.
    * Scores are computed in the precision of ``X`` (float32 stays float32).
      Memory is ``O(block × n_target)``: no n×n matrix is formed.
    * Dask arrays: ``X`` may be a dask array (``languages``/``pair_ids`` numpy, or dask with
      ``X``'s row chunks). Only the rows of ``source`` and ``target`` are computed,
      window by window (``memory_budget // 4`` bytes each); targets larger than
      half the budget are read in segments of a quarter, each once, so memory
      stays within ``memory_budget``. The result equals the numpy one.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import retrieval_accuracy
    >>> X = np.array([[3.0, 3.0], [3.0, 2.0], [1.0, 2.0], [5.0, 3.0], [4.0, 0.0]])
    >>> langs = ["en", "en", "de", "de", "de"]
    >>> pairs = [0, 1, 0, 1, 99]              # the last German row is a distractor
    >>> retrieval_accuracy(X, langs, pairs, "en", "de")   # row 3 is a hub: it wins twice
    0.5
    >>> retrieval_accuracy(X, langs, pairs, "en", "de", scoring="csls", k=1)
    1.0
    """
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {list(_SCORINGS)}, got {scoring!r}.")
    k = check_k(k)
    memory_budget = check_memory_budget(memory_budget)
    p = prepare(
        X,
        languages,
        pair_ids,
        source,
        target,
        func="retrieval_accuracy",
        device=device,
        memory_budget=memory_budget,
    )
    queries = require_pairs(p, "retrieval_accuracy", source, target)
    g, best, scale = _gold_and_best(p, queries, scoring, k, memory_budget)
    return float(np.mean(strictly_above(g, best, p.tie_tolerance(), scale)))
