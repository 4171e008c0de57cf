"""Hubness of the target language when the source language queries it."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np

from .._backend import compute_dtype
from ._similarity import (
    DEFAULT_MEMORY_BUDGET,
    check_k,
    check_memory_budget,
    nearest_neighbours,
    prepare,
)
from .retrieval import _csls_scorer, csls_penalties

__all__ = ["hubness", "k_occurrence"]

_SCORINGS = ("cosine", "csls")


def k_occurrence(neighbours: np.ndarray, n_targets: int) -> np.ndarray:
    """``N_k(y)``: how often each target occurs among the queries' k nearest neighbours.

    Examples
    --------
    >>> k_occurrence(np.array([[0, 1], [0, 2]]), 4)
    array([2, 1, 1, 0])
    """
    idx = neighbours[neighbours >= 0]
    return np.bincount(idx, minlength=n_targets)


def _skewness(x: np.ndarray) -> float:
    x = x.astype(np.float64)
    c = x - x.mean()
    var = np.mean(c * c)
    if var <= 0:
        return 0.0
    return float(np.mean(c**3) / var**1.5)


def hubness(
    X: Any,
    languages: Any,
    source: Hashable,
    target: Hashable,
    k: int = 10,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    scoring: str = "cosine",
    device: Any = "auto",
) -> dict[str, float]:
    """k-occurrence statistics of target rows retrieved by source rows.

    Radovanović, Nanopoulos & Ivanović (2010), "Hubs in Space", §3: let
    ``N_k(y)`` be the number of source rows that have target row ``y`` among their
    ``k`` nearest target rows. Hubness is the skewness of its distribution::

        S_{N_k} = E[(N_k − μ)³] / σ³

    A large positive skew means a few *hubs* are the neighbours of many queries
    (and so are retrieved wrongly), while many rows (*anti-hubs*) are never found.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    languages : array-like of shape (n_rows,)
    source, target : hashable
        Query and searched language (no ``pair_ids`` needed).
    k : int, default=10
        Neighbours per query (clipped to the number of target rows).
    memory_budget : int, default=512 MiB
    scoring : {"cosine", "csls"}, default="cosine"
        Neighbourhoods by cosine or by CSLS (with the same ``k``), which was
        designed to reduce hubness (Lample et al. 2018).
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"

    Returns
    -------
    dict
        * ``k_occurrence_skewness``: ``S_{N_k}`` (population skewness; 0 when every
          target occurs equally often);
        * ``hub_occupancy``: share of the ``n_source · k`` neighbour slots taken
          by hubs, target rows with ``N_k > μ + 2σ`` (Radovanović et al.'s hub
          definition; ``μ = n_source · k / n_target``);
        * ``hub_rate``: share of target rows that are hubs;
        * ``antihub_rate``: share of target rows with ``N_k = 0``;
        * ``max_k_occurrence``: the largest ``N_k``.

    Notes
    -----
    Ties at the ``k``-th neighbour go to the lowest target rows: scores equal
    within rounding (``4 · eps · sqrt(d)``, relative to the larger score and at
    least 1; see :data:`~posthoc_align.metrics._similarity.TIE_ULPS`) are a tie,
    every target above the ``k``-th score beyond that is a neighbour, and the
    remaining places go to the tied targets that come first in row order. So
    duplicate target rows give the same result whatever ``memory_budget`` (see
    :func:`~posthoc_align.metrics._similarity.nearest_neighbours`: two passes over
    the targets, the second with blocks planned on half the budget).

    Dask arrays: ``X`` may be a dask array (``languages`` numpy, or dask with
    ``X``'s row chunks). Only the rows of ``source`` and ``target`` are computed,
    window by window (``memory_budget // 4`` bytes each); targets larger than
    half the budget are read in segments of a quarter, each once per pass, so
    memory stays within ``memory_budget``. The result equals the numpy one.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import hubness
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(400, 64))
    >>> h = hubness(X, ["en"] * 200 + ["de"] * 200, "en", "de", k=5)
    >>> h["k_occurrence_skewness"] > 0       # hubness grows with dimension
    True
    """
    if scoring not in _SCORINGS:
        raise ValueError(f"scoring must be one of {list(_SCORINGS)}, got {scoring!r}.")
    k = check_k(k)
    memory_budget = check_memory_budget(memory_budget)
    p = prepare(
        X,
        languages,
        None,
        source,
        target,
        func="hubness",
        device=device,
        need_pairs=False,
        memory_budget=memory_budget,
    )
    n_s, n_t = len(p.source), len(p.target)
    kk = min(k, n_t)
    scorer = None
    if scoring == "csls":
        r_s = csls_penalties(p.target, p.source, k, memory_budget=memory_budget, device=p.device)
        scorer = _csls_scorer(r_s.to(p.device, compute_dtype(p.dtype)))
    neighbours = nearest_neighbours(
        p.source,
        p.target,
        kk,
        similarity="cosine",
        scorer=scorer,
        memory_budget=memory_budget,
        device=p.device,
    )
    counts = k_occurrence(neighbours, n_t)
    mu, sigma = counts.mean(), counts.std()
    hubs = counts > mu + 2 * sigma
    return {
        "k_occurrence_skewness": _skewness(counts),
        "hub_occupancy": float(counts[hubs].sum() / (n_s * kk)),
        "hub_rate": float(hubs.mean()),
        "antihub_rate": float(np.mean(counts == 0)),
        "max_k_occurrence": float(counts.max()),
    }
