"""Isomorphism of two languages' spaces: eigenvector and relational similarity."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .._backend import compute_dtype
from .._stats import row_blocks
from ._similarity import (
    DEFAULT_MEMORY_BUDGET,
    NoPairsError,
    Paired,
    Rows,
    check_k,
    check_memory_budget,
    nearest_neighbours,
    prepare,
    require_pairs,
    rescaled_block,
)

__all__ = ["eigenvector_similarity", "relational_similarity", "knn_laplacian_spectrum"]


def _paired_rows(
    p: Paired,
    func: str,
    source: Hashable,
    target: Hashable,
    n_samples: int | None,
    random_state: int,
) -> tuple[Rows, Rows]:
    """The source rows with a translation and their translations, optionally subsampled."""
    q = require_pairs(p, func, source, target)
    if n_samples is not None:
        if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer):
            raise ValueError(f"n_samples must be None or an int, got {n_samples!r}.")
        if n_samples < 3:
            raise ValueError(f"n_samples must be at least 3, got {n_samples}.")
        if n_samples < q.size:
            rng = np.random.default_rng(random_state)
            q = np.sort(rng.choice(q, size=n_samples, replace=False))
    if q.size < 3:
        raise NoPairsError(
            f"{func} needs at least 3 translation pairs between {source!r} and {target!r}, "
            f"got {q.size}."
        )
    return p.source.subset(q), p.target.subset(p.gold[q])


def knn_laplacian_spectrum(
    rows: Rows, k: int, *, memory_budget: int, device: torch.device
) -> np.ndarray:
    """Eigenvalues (descending) of the Laplacian of the symmetric cosine kNN graph.

    Each row is joined to its ``k`` nearest other rows by cosine (``k`` clipped to
    ``n − 1``; ties at the ``k``-th place go to the lowest rows, see
    :func:`~posthoc_align.metrics._similarity.nearest_neighbours`); the graph is made
    undirected (an edge when either row is among the other's neighbours) and
    unweighted, and ``L = D − A``.
    """
    n = len(rows)
    k = min(k, n - 1)
    nb = nearest_neighbours(
        rows,
        rows,
        k,
        similarity="cosine",
        exclude=np.arange(n),
        memory_budget=memory_budget,
        device=device,
    )
    cols = nb.ravel()
    r = np.repeat(np.arange(n), k)
    r, cols = r[cols >= 0], cols[cols >= 0]
    A = sp.coo_matrix((np.ones(r.size), (r, cols)), shape=(n, n)).tocsr()
    A = ((A + A.T) > 0).astype(np.float64)
    L = sp.diags(np.asarray(A.sum(axis=1)).ravel()) - A
    return np.linalg.eigvalsh(L.toarray())[::-1]


def _k_for_share(eig: np.ndarray, share: float = 0.9) -> int:
    """Smallest ``k`` whose ``k`` largest eigenvalues sum to at least ``share`` of all."""
    c = np.cumsum(eig)
    return int(np.searchsorted(c, share * c[-1] * (1 - 1e-12)) + 1)


def eigenvector_similarity(
    X: Any,
    languages: Any,
    pair_ids: Any,
    source: Hashable,
    target: Hashable,
    k: int = 10,
    n_samples: int | None = None,
    random_state: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: Any = "auto",
) -> float:
    """Spectral distance of the two languages' kNN graphs (lower = more isomorphic).

    Søgaard, Ruder & Vulić (2018), "On the Limitations of Unsupervised Bilingual
    Dictionary Induction", §4.3: build the cosine nearest-neighbour graph of the
    source rows that have a translation and that of their translations, take the
    eigenvalues ``λ¹ ≥ λ² ≥ …`` of each graph Laplacian ``L = D − A``, and::

        Δ = Σ_{i=1}^{k'} (λ¹_i − λ²_i)²

    where ``k' = min(k₁, k₂)`` and ``k_j`` is the smallest number of largest
    eigenvalues of graph ``j`` that hold at least 90% of its eigenvalue sum (the
    paper takes the smaller of the two graphs' ``k``).

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    languages, pair_ids : array-like of shape (n_rows,)
    source, target : hashable
    k : int, default=10
        Neighbours per node of the kNN graphs (clipped to ``n_pairs − 1``).
    n_samples : int, optional
        Use a random subset of this many translation pairs (the eigenvalues are
        computed from a dense ``n_pairs × n_pairs`` Laplacian: ``O(n²)`` memory
        and ``O(n³)`` time; the paper used 10k words).
    random_state : int, default=0
        Seed of the subset.
    memory_budget : int, default=512 MiB
        Working memory of the kNN search.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"

    Returns
    -------
    float
        ``Δ ≥ 0``; 0 when both graphs have the same spectrum, e.g. when the target
        rows are a rotation of the source rows.

    Notes
    -----
    Unlike the rest of :mod:`posthoc_align.metrics`, this builds an n×n matrix
    (the Laplacian, densified for the eigenvalue solver); subsample with
    ``n_samples`` for more than a few thousand pairs. Ties among the ``k``-th
    neighbours (cosines equal within rounding, ``4 · eps · sqrt(d)``, e.g. duplicate
    rows) go to the rows that come first among the translation pairs, whatever
    ``memory_budget``.

    Dask arrays: ``X`` may be a dask array (``languages``/``pair_ids`` numpy, or dask with
    ``X``'s row chunks). Only the rows of ``source`` and ``target`` are computed,
    window by window (``memory_budget // 4`` bytes each); targets larger than
    half the budget are read in segments of a quarter, each once, so memory
    stays within ``memory_budget`` (plus the dense Laplacian above). The result equals the numpy one.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import eigenvector_similarity
    >>> rng = np.random.default_rng(0)
    >>> E = rng.normal(size=(50, 8))
    >>> Q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    >>> X = np.vstack([E, E @ Q])                        # an exact rotation
    >>> langs, pairs = ["en"] * 50 + ["de"] * 50, list(range(50)) * 2
    >>> round(eigenvector_similarity(X, langs, pairs, "en", "de"), 6)
    0.0
    """
    k = check_k(k)
    memory_budget = check_memory_budget(memory_budget)
    p = prepare(
        X,
        languages,
        pair_ids,
        source,
        target,
        func="eigenvector_similarity",
        device=device,
        memory_budget=memory_budget,
    )
    a, b = _paired_rows(p, "eigenvector_similarity", source, target, n_samples, random_state)
    e1 = knn_laplacian_spectrum(a, k, memory_budget=memory_budget, device=p.device)
    e2 = knn_laplacian_spectrum(b, k, memory_budget=memory_budget, device=p.device)
    kk = min(_k_for_share(e1), _k_for_share(e2))
    return float(np.sum((e1[:kk] - e2[:kk]) ** 2))


def _unit_moments(a: Rows, b: Rows, device: torch.device, memory_budget: int) -> dict[str, Any]:
    """float64 d×d Gram moments of the unit-normalised paired rows."""
    dtype = compute_dtype(a.dtype)
    d = a.n_features
    f64 = torch.float64
    G_aa = torch.zeros((d, d), dtype=f64, device=device)
    G_bb = torch.zeros_like(G_aa)
    G_ab = torch.zeros_like(G_aa)
    s_a = torch.zeros(d, dtype=f64, device=device)
    s_b = torch.zeros_like(s_a)
    diag = torch.zeros(3, dtype=f64, device=device)  # Σ‖a‖⁴, Σ‖b‖⁴, Σ‖a‖²‖b‖²
    block = int(max(1, min(4096, memory_budget // max(1, 4 * d * 8))))
    with torch.no_grad():
        for sl in row_blocks(len(a), block):
            # overflow-safe norms (rows with squared norms out of float64's range come
            # rescaled); a NaN or infinite row raises, naming it
            U, nu = rescaled_block(a, a.take(sl.start, sl.stop, device, dtype).to(f64), sl.start)
            V, nv = rescaled_block(b, b.take(sl.start, sl.stop, device, dtype).to(f64), sl.start)
            U = U * torch.where(nu > 0, 1 / torch.where(nu > 0, nu, 1.0), 0.0)[:, None]
            V = V * torch.where(nv > 0, 1 / torch.where(nv > 0, nv, 1.0), 0.0)[:, None]
            G_aa += U.T @ U
            G_bb += V.T @ V
            G_ab += U.T @ V
            s_a += U.sum(0)
            s_b += V.sum(0)
            qa, qb = (U * U).sum(1), (V * V).sum(1)
            diag += torch.stack([(qa * qa).sum(), (qb * qb).sum(), (qa * qb).sum()])
    return {
        "aa": float((G_aa * G_aa).sum()),
        "bb": float((G_bb * G_bb).sum()),
        "ab": float((G_ab * G_ab).sum()),
        "sa": float(s_a @ s_a),
        "sb": float(s_b @ s_b),
        "trace_a": float(G_aa.trace()),
        "trace_b": float(G_bb.trace()),
        "diag": diag.cpu().numpy(),
    }


def relational_similarity(
    X: Any,
    languages: Any,
    pair_ids: Any,
    source: Hashable,
    target: Hashable,
    n_samples: int | None = None,
    random_state: int = 0,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: Any = "auto",
) -> float:
    """Pearson correlation of within-language cosines over all pairs of translations.

    Vulić, Ruder & Søgaard (2020), "Are All Good Word Vector Spaces Isomorphic?",
    §3 (RSIM): for the translation pairs ``(x_i, y_i)``, ``i = 1..n``, the Pearson
    correlation between ``cos(x_i, x_j)`` and ``cos(y_i, y_j)`` over all ``i < j``.
    Higher = more isomorphic; 1 for an exact rotation.

    Computed exactly without forming the ``n(n−1)/2`` cosines: with ``U``, ``V``
    the unit-normalised paired rows, the sums the correlation needs are
    ``Σ_{i≠j} cos(x_i,x_j) cos(y_i,y_j) = ‖UᵀV‖²_F − Σ_i ‖u_i‖²‖v_i‖²``,
    ``Σ_{i≠j} cos(x_i,x_j) = ‖Σ_i u_i‖² − Σ_i ‖u_i‖²`` and likewise, from
    ``d × d`` float64 moments: ``O(n d²)`` time, ``O(d²)`` memory.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    languages, pair_ids : array-like of shape (n_rows,)
    source, target : hashable
    n_samples : int, optional
        Use a random subset of this many translation pairs (default: all).
    random_state : int, default=0
        Seed of the subset.
    memory_budget : int, default=512 MiB
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"

    Returns
    -------
    float
        In [-1, 1]; NaN when the cosines of one language are all equal.

    Notes
    -----
    Dask arrays: ``X`` may be a dask array (``languages``/``pair_ids`` numpy, or dask with
    ``X``'s row chunks). Only the rows of ``source`` and ``target`` are computed,
    window by window (``memory_budget // 4`` bytes each); targets larger than
    half the budget are read in segments of a quarter, each once, so memory
    stays within ``memory_budget``. The result equals the numpy one.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import relational_similarity
    >>> rng = np.random.default_rng(0)
    >>> E = rng.normal(size=(30, 5))
    >>> Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    >>> X = np.vstack([E, E @ Q])
    >>> langs, pairs = ["en"] * 30 + ["de"] * 30, list(range(30)) * 2
    >>> round(relational_similarity(X, langs, pairs, "en", "de"), 6)
    1.0
    """
    memory_budget = check_memory_budget(memory_budget)
    p = prepare(
        X,
        languages,
        pair_ids,
        source,
        target,
        func="relational_similarity",
        device=device,
        memory_budget=memory_budget,
    )
    a, b = _paired_rows(p, "relational_similarity", source, target, n_samples, random_state)
    m = _unit_moments(a, b, p.device, memory_budget)
    n = len(a)
    N = n * (n - 1)  # ordered pairs i ≠ j: the same correlation as over i < j
    d4a, d4b, d4ab = m["diag"]
    s_a = m["sa"] - m["trace_a"]
    s_b = m["sb"] - m["trace_b"]
    s_aa = m["aa"] - d4a
    s_bb = m["bb"] - d4b
    s_ab = m["ab"] - d4ab
    cov = s_ab / N - (s_a / N) * (s_b / N)
    var_a = s_aa / N - (s_a / N) ** 2
    var_b = s_bb / N - (s_b / N) ** 2
    if var_a <= 0 or var_b <= 0:
        return float("nan")
    return float(np.clip(cov / np.sqrt(var_a * var_b), -1.0, 1.0))
