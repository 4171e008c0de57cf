"""Block-wise nearest-neighbour engine shared by every metric (never an n×n matrix).

One function, :func:`scan`, streams blocks of query rows against blocks of target
rows (``torch`` matmul on the chosen device) and keeps, per query row, only

* the running top-``k`` scores and their target indices,
* the score of its gold target (its translation), and
* the best score over every *other* target (gold and excluded rows masked),

so its memory is ``O(block_q × block_t)`` plus ``O(n)`` vectors, whatever the
number of rows.  The block shape comes from a byte budget (:func:`plan_blocks`).

Numerics.  The matmul runs in the input precision (float32 stays float32, float64
stays float64, float16/bfloat16 are computed in float32, see
:func:`posthoc_align._backend.compute_dtype`).  Cosine similarity is
``(x·y) / (‖x‖ ‖y‖)``: the raw rows are multiplied and the similarity block is
scaled by the inverse row norms (computed once per target row, once per query
block), so no normalised copy of ``X`` is ever made.  Rows of norm zero get
cosine 0 with every row (as :func:`sklearn.preprocessing.normalize` leaves them
at zero).  Row norms are overflow-safe: a row whose squared norm would overflow
or underflow (``|x| ≈ 1e19`` or ``1e-25`` in float32, ``1e160`` or ``1e-170`` in
float64) is multiplied by a power of two that brings its largest entry into
``[0.5, 1)`` before it is squared or multiplied (:func:`_block_norms`), as
``numpy.linalg.norm`` and BLAS ``nrm2`` scale; cosines do not change with the scale
of a row, so cosine, CSLS and margin scores are the same at any scale of ``X``.
Usual rows are not touched (the check is one comparison over the norms of a
block).  Dot-product and Euclidean scores do change with the scale: when they
would overflow or underflow the dtype, a ValueError asks to rescale ``X``.

The module also holds :func:`prepare`, the validation shared by the metrics that
take ``(X, languages, pair_ids, source, target)``.

Dask arrays.  :func:`prepare` wraps a dask ``X`` in :class:`DaskRows`: the rows of
the two languages are read lazily, one window (a quarter of the budget) per
``dask.compute``, only rows of the selected languages.  :func:`scan` then reads
the queries once if they fit a quarter of the budget (else window by window),
and the targets once if they fit half of it; larger targets are read in
segments of a quarter of the budget, each segment once, every query streamed
against it.  Memory stays within the budget whatever the size of ``X`` (the
queries are re-read once per target segment), and the results equal those of
the numpy path: per query row, the target blocks are visited in the same order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .._backend import _BACKENDS, Backend, compute_dtype, resolve_device
from .._dask import check_dask_X, is_dask, labels_numpy
from .._stats import row_blocks
from .._validation import check_languages, check_pair_ids, check_X, raise_non_finite

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DaskRows",
    "NoPairsError",
    "MIN_QUERY_BLOCK",
    "Paired",
    "Rows",
    "ScanResult",
    "check_k",
    "check_memory_budget",
    "nearest_neighbours",
    "plan_blocks",
    "score_scale",
    "strictly_above",
    "tie_tolerance",
    "prepare",
    "rescaled_block",
    "row_norms",
    "scan",
]

#: Default working memory of one scan, in bytes (512 MiB).
DEFAULT_MEMORY_BUDGET = 512 * 2**20

#: Query rows per block the planner tries to keep before it tiles the targets
#: (a matmul with fewer rows than this runs far below peak speed).
MIN_QUERY_BLOCK = 64

#: Bytes of working memory per entry of a similarity block, in units of the
#: item size: the block itself plus one temporary of the same shape (a mask,
#: the margin denominator).
_ENTRY_FACTOR = 2

#: Score hook: modifies a similarity block in place, given the query slice and
#: the target slice it covers.
Scorer = Callable[[torch.Tensor, slice, slice], None]


class NoPairsError(ValueError):
    """Too few translation pairs (or rows) between two languages for a metric.

    A :class:`ValueError`; :func:`posthoc_align.metrics.evaluate_pairs` records NaN
    for such a language pair instead of stopping.
    """


# -- inputs -------------------------------------------------------------------------


class Rows:
    """A subset of the rows of a 2-D tensor, read block by block.

    Parameters
    ----------
    base : torch.Tensor of shape (n_rows, n_features)
        All rows (any device; a CPU view of a numpy array is fine).
    index : ndarray of shape (n,)
        Positions of the subset in ``base``, in the order used for results.
    origin : ndarray of shape (n,), optional
        Row numbers in the caller's ``X`` (differ from ``index`` once a subset
        is cached as a new tensor); used in error messages.

    Notes
    -----
    A subset that is one contiguous run of rows is read as a view; any other is
    gathered block by block, so the subset is never copied as a whole unless
    :func:`scan` decides to cache it (see there).
    """

    def __init__(self, base: torch.Tensor, index: np.ndarray, origin: np.ndarray | None = None):
        self.base = base
        self.index = np.asarray(index, dtype=np.int64)
        #: row numbers of the caller's X (for error messages); ``index`` unless cached
        self.origin = self.index if origin is None else np.asarray(origin, dtype=np.int64)
        n = self.index.shape[0]
        self.start: int | None = None
        if n and self.index[-1] - self.index[0] == n - 1 and (np.diff(self.index) == 1).all():
            self.start = int(self.index[0])
        self._index_t: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.index.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.base.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        """torch dtype of the rows as stored."""
        return self.base.dtype

    def is_view_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        """True when blocks are views: contiguous rows already on ``device`` in ``dtype``."""
        return self.start is not None and self.base.device == device and self.base.dtype == dtype

    def take(self, lo: int, hi: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``lo:hi`` of the subset on ``device`` in ``dtype`` (read-only use)."""
        if self.start is not None:
            B = self.base[self.start + lo : self.start + hi]
        else:
            if self._index_t is None:
                self._index_t = torch.from_numpy(self.index).to(self.base.device)
            B = self.base.index_select(0, self._index_t[lo:hi])
        return B.to(device=device, dtype=dtype)

    def subset(self, positions: np.ndarray) -> Rows:
        """The rows at ``positions`` of this subset."""
        pos = np.asarray(positions, dtype=np.int64)
        return Rows(self.base, self.index[pos], self.origin[pos])


_TORCH_DTYPES = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


class DaskRows(Rows):
    """A subset of the rows of a 2-D dask array, computed window by window.

    Parameters
    ----------
    base : dask.array.Array of shape (n_rows, n_features)
        All rows (validated: floating dtype, one chunk of columns).
    index, origin : ndarray of shape (n,)
        As for :class:`Rows`.
    window_bytes : int, default=DEFAULT_MEMORY_BUDGET // 4
        Size of the window kept on the host: a ``take`` inside the window is a
        slice of it; one outside computes the next window (only the rows of the
        subset, in one ``dask.compute``). Requests larger than a window are
        computed as they are and not kept.
    """

    def __init__(
        self,
        base: Any,
        index: np.ndarray,
        origin: np.ndarray | None = None,
        window_bytes: int = DEFAULT_MEMORY_BUDGET // 4,
    ):
        super().__init__(base, index, origin)
        self.window_bytes = int(window_bytes)
        self._window: torch.Tensor | None = None
        self._window_lo = 0

    @property
    def dtype(self) -> torch.dtype:
        return _TORCH_DTYPES.get(np.dtype(self.base.dtype), torch.float64)

    def is_view_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        return False

    def _compute(self, lo: int, hi: int) -> torch.Tensor:
        idx = self.index[lo:hi]
        if idx.size == 0:
            return torch.empty((0, self.n_features), dtype=self.dtype)
        if idx[-1] - idx[0] == idx.size - 1 and (np.diff(idx) == 1).all():
            block = self.base[int(idx[0]) : int(idx[-1]) + 1].compute()
        else:
            u, inv = np.unique(idx, return_inverse=True)
            block = self.base[u].compute()[inv.reshape(-1)]
        return torch.from_numpy(np.ascontiguousarray(block, dtype=np.dtype(self.base.dtype)))

    def take(self, lo: int, hi: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        w = self._window
        if w is not None and self._window_lo <= lo and hi <= self._window_lo + w.shape[0]:
            B = w[lo - self._window_lo : hi - self._window_lo]
        else:
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            span = max(1, self.window_bytes // max(1, self.n_features * itemsize))
            if hi - lo >= span:
                self._window = None
                return self._compute(lo, hi).to(device=device, dtype=dtype)
            self._window_lo = lo
            self._window = self._compute(lo, min(len(self), lo + span))
            B = self._window[: hi - lo]
        return B.to(device=device, dtype=dtype)

    def subset(self, positions: np.ndarray) -> DaskRows:
        pos = np.asarray(positions, dtype=np.int64)
        return DaskRows(self.base, self.index[pos], self.origin[pos], self.window_bytes)


@dataclass
class ScanResult:
    """What :func:`scan` keeps per query row (CPU tensors).

    Attributes
    ----------
    topk_values, topk_indices : Tensor of shape (n_queries, k) or None
        Highest scores (descending) and their target positions; ``None`` if ``k=0``.
        With ``k=1`` ties go to the lowest target position; with ``k > 1`` the
        values are exact but which of several tied targets is kept depends on the
        blocks (use :func:`nearest_neighbours` when the indices matter).
    gold_score : Tensor of shape (n_queries,) or None
        Score of each query's gold target (NaN where it has none).
    best_other : Tensor of shape (n_queries,) or None
        Highest score over the targets other than the gold and the excluded one
        (``-inf`` where there are none).
    query_norms : Tensor of shape (n_queries,) or None
        ``‖x_i‖`` of every query row (float64), for :func:`score_scale`.
    target_max_norm : float
        ``max_j ‖y_j‖`` over every target row (excluded ones included).
    """

    topk_values: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    gold_score: torch.Tensor | None = None
    best_other: torch.Tensor | None = None
    query_norms: torch.Tensor | None = None
    target_max_norm: float = 0.0


# -- planning -----------------------------------------------------------------------


#: scores within ``TIE_ULPS · eps · sqrt(d) · scale`` of each other are a tie: the
#: rounding of a length-``d`` dot product, so that two identical target rows (a
#: duplicate sentence) tie wherever they sit in a block.  ``scale`` is the magnitude
#: the rounding is relative to (see :func:`score_scale`): 1 for cosine-based scores
#: (cosine, CSLS, ratio margin; at least the larger score), ``‖x‖·max‖y‖`` for dot
#: products and ``‖x‖² + max‖y‖²`` for squared Euclidean distances, per query row.
TIE_ULPS = 4.0


def tie_tolerance(dtype: Any, n_features: int) -> float:
    """Relative tie tolerance ``TIE_ULPS · eps · sqrt(d)`` (see :data:`TIE_ULPS`).

    Multiply by the scale of the scores (:func:`score_scale`; 1 for cosines).
    """
    eps = torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) else np.finfo(dtype).eps
    return float(TIE_ULPS * eps * np.sqrt(max(int(n_features), 1)))


def row_norms(rows: Rows, device: Any = "cpu") -> np.ndarray:
    """``‖y‖`` of every row of ``rows`` (float64 numpy), read window by window.

    Overflow-safe (rows whose squared norm overflows float64 are rescaled first, see
    :func:`_block_norms`); rejects NaN and infinity.
    """
    out = np.empty(len(rows))
    step = 1 << 14
    for lo in range(0, len(rows), step):
        hi = min(lo + step, len(rows))
        block = rows.take(lo, hi, torch.device(device), torch.float64)
        norms, exps = _block_norms(rows, block, lo)
        out[lo:hi] = _unscale(norms, exps).cpu().numpy()
    return out


def score_scale(similarity: str, query_norms: Any, target_max_norm: Any) -> np.ndarray | None:
    """Per query row, the magnitude that the rounding of its scores is relative to.

    Parameters
    ----------
    similarity : {"cosine", "csls", "margin", "dot", "euclidean"}
        How the scores were made. Cosine-based scores are bounded: their rounding
        is absolute, and None is returned (scale 1).
    query_norms : array-like of shape (n_queries,)
        ``‖x_i‖`` (:attr:`ScanResult.query_norms`).
    target_max_norm : float
        ``max_j ‖y_j‖`` (:attr:`ScanResult.target_max_norm`).

    Returns
    -------
    ndarray of shape (n_queries,) or None
        ``‖x_i‖ · max_j ‖y_j‖`` for ``"dot"`` (the rounding of ``x·y`` is at most
        ``γ_d Σ_k |x_k y_k| ≤ γ_d ‖x‖ ‖y‖``), ``‖x_i‖² + max_j ‖y_j‖²`` for
        ``"euclidean"`` (the ranking score ``2x·y − ‖y‖²``: ``2‖x‖‖y‖ + ‖y‖²``
        is at most twice that), None otherwise.

    Examples
    --------
    >>> score_scale("dot", np.array([0.5, 2.0]), 3.0)
    array([1.5, 6. ])
    >>> score_scale("cosine", np.array([1e-3]), 3.0) is None
    True
    """
    if similarity not in ("dot", "euclidean"):
        return None
    qn = np.asarray(query_norms.cpu() if torch.is_tensor(query_norms) else query_norms)
    qn = qn.astype(np.float64)
    tmax = np.asarray(target_max_norm, dtype=np.float64)  # a scalar or one per query
    return qn * tmax if similarity == "dot" else qn * qn + tmax * tmax


def strictly_above(
    a: np.ndarray, b: np.ndarray, tol: float, scale: np.ndarray | None = None
) -> np.ndarray:
    """``a > b`` beyond rounding: ``a − b > tol · max(scale, |a|, |b|)`` (NaN: False).

    Parameters
    ----------
    a, b : ndarray
        Scores (``b`` may be ``-inf``: then ``a`` is above unless it is NaN).
    tol : float
        Relative tolerance (:func:`tie_tolerance`).
    scale : ndarray or None
        Magnitude the rounding is relative to, per entry (:func:`score_scale`);
        None means 1 (cosine-based scores).

    Examples
    --------
    >>> strictly_above(np.array([1.0, 1.0 + 1e-16]), np.array([0.5, 1.0]), 1e-12)
    array([ True, False])
    >>> strictly_above(np.array([2e-8]), np.array([1e-8]), 1e-7)  # absolute: a tie
    array([False])
    >>> strictly_above(np.array([2e-8]), np.array([1e-8]), 1e-7, np.array([1e-8]))
    array([ True])
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    base = 1.0 if scale is None else np.asarray(scale, dtype=np.float64)
    scale = np.maximum(base, np.maximum(np.abs(a), np.abs(np.where(np.isinf(b), 0.0, b))))
    return (a - b) > tol * scale


def check_memory_budget(memory_budget: Any) -> int:
    """Validate ``memory_budget`` (a positive number of bytes)."""
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int | np.integer):
        raise TypeError(
            f"memory_budget must be an int number of bytes, got {memory_budget!r} "
            "(e.g. memory_budget=512 * 2**20 for 512 MiB)."
        )
    if memory_budget < 1:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}.")
    return int(memory_budget)


def check_k(k: Any, name: str = "k") -> int:
    """Validate a neighbourhood size (an int >= 1)."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"{name} must be an int >= 1, got {k!r}.")
    return int(k)


def plan_blocks(
    n_queries: int,
    n_targets: int,
    n_features: int,
    itemsize: int,
    memory_budget: int,
    *,
    stream_targets: bool = False,
) -> tuple[int, int]:
    """Block shape ``(block_q, block_t)`` whose working memory fits ``memory_budget``.

    Working memory of one step is counted as
    ``block_q·block_t·2·itemsize`` (similarity block and one temporary)
    ``+ block_q·d·itemsize`` (query block) ``+ block_t·d·itemsize`` (target block,
    only when targets are gathered per block, ``stream_targets=True``).

    Full-width blocks (``block_t = n_targets``) are used when at least
    ``min(n_queries, MIN_QUERY_BLOCK)`` query rows fit, with as many query rows as
    the budget allows; otherwise the targets are tiled too, and with a budget too
    small even for that, one query row meets ``>= 1`` target rows per step.

    Examples
    --------
    >>> plan_blocks(200_000, 200_000, 384, 4, 512 * 2**20)
    (335, 200000)
    >>> plan_blocks(10, 50, 8, 8, 1)
    (1, 1)
    """
    per_entry = _ENTRY_FACTOR * itemsize
    row = n_features * itemsize
    t_row = row if stream_targets else 0

    def cost(bq: int, bt: int) -> int:
        return bq * bt * per_entry + bq * row + bt * t_row

    bq_min = max(1, min(n_queries, MIN_QUERY_BLOCK))
    if cost(bq_min, n_targets) <= memory_budget:
        bq = (memory_budget - n_targets * t_row) // (n_targets * per_entry + row)
        return max(1, min(n_queries, bq)), n_targets
    bt = (memory_budget - bq_min * row) // (bq_min * per_entry + t_row)
    if bt >= 1:
        return bq_min, min(n_targets, bt)
    bt = (memory_budget - row) // (per_entry + t_row)
    return 1, max(1, min(n_targets, bt))


# -- the engine ---------------------------------------------------------------------


def _raise_non_finite_row(
    rows: Rows, B: torch.Tensor, lo: int, what: str = "the squared row norms"
) -> None:
    """Raise naming the row of ``X`` behind the first non-finite row of block ``B``.

    ``B`` holds rows ``lo:lo + len(B)`` of ``rows``.  When every entry of ``B`` is
    finite, ``what`` (a quantity computed from it) overflowed: the message says so
    and names the rows, instead of looking for a non-finite input that is not there.
    """
    bad_rows = torch.nonzero(~torch.isfinite(B).all(dim=1)).flatten() if B.numel() else None
    if bad_rows is not None and bad_rows.numel():
        bad = int(bad_rows[0])
        raise_non_finite(B[bad : bad + 1], offset=int(rows.origin[lo + bad]))
    big = float(B.abs().max()) if B.numel() else 0.0
    first, last = int(rows.origin[lo]), int(rows.origin[lo + max(B.shape[0], 1) - 1])
    dtype = str(B.dtype).replace("torch.", "")
    raise ValueError(
        f"Input X is finite, but {what} of rows {first}..{last} overflowed {dtype} "
        f"(largest |value| {big:.3g}, largest {dtype} {torch.finfo(B.dtype).max:.3g}). "
        "Rescale X (e.g. divide it by its largest absolute value)"
        + (" or pass float64 data." if B.dtype != torch.float64 else ".")
    )


@functools.cache
def _safe_norm_range(dtype: torch.dtype) -> tuple[float, float]:
    """Row norms ``[lo, hi]`` whose products need no rescaling in ``dtype``.

    Powers of two with ``hi² ≤ max / 16`` (no square or product of two such rows
    overflows) and ``lo² ≥ 4 · tiny / eps`` (their products are normal numbers down to
    the rounding of the larger terms, so nothing relevant underflows).
    """
    fi = torch.finfo(dtype)
    lo = math.ldexp(1.0, math.floor((math.log2(fi.tiny) - math.log2(fi.eps)) / 2) + 2)
    hi = math.ldexp(1.0, math.floor(math.log2(fi.max) / 2) - 2)
    return lo, hi


def _pow2(e: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2**e`` in ``dtype``, exactly, built from its bits (``e``: normal exponents)."""
    if dtype == torch.float64:
        return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32).to(dtype)


def _scale_rows(B: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """``B[i] · 2**exps[i]`` (a new tensor), exact but for entries that underflow.

    Multiplied in two steps so that every factor is a normal number of ``B.dtype``.
    """
    e1 = torch.div(exps, 2, rounding_mode="floor")
    f1, f2 = _pow2(e1, B.dtype), _pow2(exps - e1, B.dtype)
    return B * f1[:, None] * f2[:, None]


def _unscale(norms: torch.Tensor, exps: torch.Tensor | None) -> torch.Tensor:
    """True norms (float64) from the norms of rows scaled by ``2**exps``."""
    out = norms.to(torch.float64)
    if exps is None:
        return out
    return _scale_rows(out[:, None], -exps)[:, 0]


def _block_norms(rows: Rows, B: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``‖row‖`` of every row of block ``B`` (rows ``lo:`` of ``rows``), overflow-safe.

    Returns ``(norms, exps)``.  ``exps`` is None when every norm lies in
    :func:`_safe_norm_range` (the usual case: one comparison over the norms).
    Otherwise the rows outside it (squared norm overflowing or underflowing, as for
    ``|x| ≈ 1e19`` or ``1e-25`` in float32) get a power of two ``2**exps[i]`` that
    brings their largest entry into ``[0.5, 1)`` (``exps[i] = 0`` for the other rows),
    and ``norms`` are the norms of the rescaled rows, ``‖2**exps[i] · B[i]‖``, as
    ``numpy.linalg.norm``/BLAS ``nrm2`` scale before squaring.  Raises a
    ValueError naming the row when ``B`` holds NaN or infinity.
    """
    norms = torch.linalg.vector_norm(B, dim=1)
    r_lo, r_hi = _safe_norm_range(B.dtype)
    if bool(((norms >= r_lo) & (norms <= r_hi)).all()):
        return norms, None
    # rare path: zero rows, NaN/inf, or norms whose squares overflow or underflow
    amax = B.abs().amax(dim=1) if B.shape[1] else torch.zeros_like(norms)
    if not bool(torch.isfinite(amax).all()):
        _raise_non_finite_row(rows, B, lo)
    risky = ~((norms >= r_lo) & (norms <= r_hi)) & (amax > 0)
    if not bool(risky.any()):  # only zero rows
        return norms, None
    exps = torch.where(risky, -torch.frexp(amax).exponent.to(torch.int64), 0)
    return torch.linalg.vector_norm(_scale_rows(B, exps), dim=1), exps


def rescaled_block(rows: Rows, B: torch.Tensor, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``B`` (rows ``lo:`` of ``rows``) ready for cosines, and its row norms.

    Rows whose squared norm would overflow or underflow are multiplied by a power of
    two (see :func:`_block_norms`; a new tensor, ``B`` itself is never modified);
    the others, and ``B`` itself in the usual case, are returned as they are.  The
    norms are those of the returned rows, so ``returned / norms`` are the unit rows.
    Raises a ValueError naming the row when ``B`` holds NaN or infinity.
    """
    norms, exps = _block_norms(rows, B, lo)
    return (B if exps is None else _scale_rows(B, exps)), norms


class _ScaledRows(Rows):
    """The rows of ``rows``, row ``i`` multiplied by ``2**exps[i]`` as it is read.

    Used by :func:`scan` for cosine scores of rows whose squared norms overflow or
    underflow (the scale of a row does not change its cosines).
    """

    def __init__(self, rows: Rows, exps: torch.Tensor):
        super().__init__(rows.base, rows.index, rows.origin)
        self.rows = rows
        self.exps = exps

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def is_view_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        return False

    def take(self, lo: int, hi: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        B = self.rows.take(lo, hi, device, dtype)
        return _scale_rows(B, self.exps[lo:hi].to(B.device))

    def subset(self, positions: np.ndarray) -> Rows:
        pos = np.asarray(positions, dtype=np.int64)
        return _ScaledRows(self.rows.subset(pos), self.exps[torch.from_numpy(pos)])


def _norms(
    rows: Rows, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Overflow-safe ``‖row‖`` for every row, checking finiteness on the way.

    Returns ``(norms, exps)`` as :func:`_block_norms` does, for all of ``rows``.
    """
    out = torch.empty(len(rows), dtype=dtype, device=device)
    exps: torch.Tensor | None = None
    for sl in row_blocks(len(rows)):
        B = rows.take(sl.start, sl.stop, device, dtype)
        out[sl], e = _block_norms(rows, B, sl.start)
        if e is not None:
            if exps is None:
                exps = torch.zeros(len(rows), dtype=torch.int64, device=device)
            exps[sl] = e
    return out, exps


def _check_dot_range(
    queries: Rows,
    lo: int,
    q_norms: torch.Tensor,
    t_max: float,
    dtype: torch.dtype,
) -> None:
    """Raise when dot products of query rows ``lo:`` overflow or underflow ``dtype``.

    ``q_norms`` (float64) are the true query norms and ``t_max`` the largest target
    norm: ``|x·y| ≤ ‖x‖ · max ‖y‖``.  Only called when some norm fell outside
    :func:`_safe_norm_range` (rows inside it cannot overflow or underflow).
    """
    fi = torch.finfo(dtype)
    bound = q_norms * t_max
    name = str(dtype).replace("torch.", "")
    over = bound > fi.max
    # (the float64 product itself may underflow to 0: test the factors)
    under = (q_norms > 0) & (t_max > 0) & (bound < fi.tiny)
    for mask, verb, limit in ((over, "overflow", fi.max), (under, "underflow", fi.tiny)):
        if bool(mask.any()):
            i = int(torch.nonzero(mask).flatten()[0])
            wider = " or pass float64 data" if dtype != torch.float64 else ""
            raise ValueError(
                f"Dot-product (or Euclidean) scores of row {int(queries.origin[lo + i])} of X "
                f"{verb} {name}: its norm ‖x‖ = {float(q_norms[i]):.3g} times the largest "
                f"target norm max‖y‖ = {t_max:.3g} is {'above' if verb == 'overflow' else 'below'} "
                f"{limit:.3g}. Rescale X (e.g. multiply it by a constant that brings its row "
                f"norms near 1){wider}; cosine and CSLS scores do not depend on the scale of X."
            )


def _inverse(norms: torch.Tensor) -> torch.Tensor:
    """``1/‖row‖`` (0 for zero rows)."""
    return torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))


def scan(
    queries: Rows,
    targets: Rows,
    *,
    similarity: str = "cosine",
    k: int = 0,
    gold: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    scorer: Scorer | None = None,
    tie_scale: np.ndarray | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: torch.device | str = "cpu",
) -> ScanResult:
    """Stream ``queries`` against ``targets`` keeping top-k, gold and best-other scores.

    The score of a query ``x`` and a target ``y`` is ``cos(x, y)`` or ``x·y``
    (``similarity``), then ``scorer`` (e.g. CSLS, the ratio margin) applied in
    place to each block.

    Parameters
    ----------
    queries, targets : Rows
        Query and target rows (same number of features).
    similarity : {"cosine", "dot"}
    k : int, default=0
        Neighbours to keep per query (0: none). Clipped to ``len(targets)``.
        The excluded target is never a neighbour; the gold target may be.
    gold : ndarray of shape (n_queries,), optional
        Target position of each query's gold partner, ``-1`` for none.
    exclude : ndarray of shape (n_queries,), optional
        A target position to ignore entirely per query (``-1`` for none), e.g. the
        query itself when queries and targets are the same rows.
    scorer : callable, optional
        ``scorer(S, q_slice, t_slice)`` modifies a score block in place.
    tie_scale : ndarray of shape (n_queries,), optional
        Magnitude of each query's scores for the tie rule of ``k=1`` (see
        :data:`TIE_ULPS`). Default: 1 for cosine, ``‖x_i‖ · max_j ‖y_j‖`` for dot
        (pass :func:`score_scale` of the scorer's scores when a scorer changes the
        magnitude, e.g. to squared distances).
    memory_budget : int
        Bytes of working memory (see :func:`plan_blocks`).
    device : torch.device or str
        Where blocks are multiplied.

    Returns
    -------
    ScanResult

    Notes
    -----
    With ``k=1`` a later target wins only when its score is above the current best
    beyond the tie tolerance ``tie_tolerance · max(scale, |score|)``, and within a
    block the lowest position within the tolerance of the block maximum wins: ties
    go to the lowest target position whatever the blocks.

    Rows whose squared norm would overflow or underflow (see the module notes) are
    rescaled by a power of two for cosine scores (targets then are read through
    :class:`_ScaledRows`, one scaled copy per block); for dot scores that would
    overflow or underflow ``dtype`` a ValueError asks to rescale ``X``.

    Targets that are one contiguous run of rows already on ``device`` are read as
    views.  Otherwise they are gathered and cached on ``device`` once when that
    copy takes at most half the budget, else gathered block by block (their cost
    is then counted in every block).

    Dask arrays (:class:`DaskRows`): queries that fit a quarter of the budget
    and targets that fit half of it are computed once; larger targets are
    computed in segments of a quarter of the budget, each once, and every query
    block meets every segment (target blocks keep their order per query row, so
    the result is the numpy path's).
    """
    if similarity not in ("cosine", "dot"):
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}.")
    device = torch.device(device)
    dtype = compute_dtype(queries.dtype)
    m, n, d = len(queries), len(targets), queries.n_features
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = memory_budget
    stream = False
    segment = n  # targets per segment; dask targets too large for the budget are split
    if isinstance(queries, DaskRows):  # computed once, or window by window
        budget -= min(m * d * itemsize, queries.window_bytes)
        if m * d * itemsize <= memory_budget // 4:
            queries = Rows(queries.take(0, m, device, dtype), np.arange(m), queries.origin)
    if not targets.is_view_on(device, dtype):
        if n * d * itemsize <= memory_budget // 2:
            targets = Rows(targets.take(0, n, device, dtype), np.arange(n), targets.origin)
            budget -= n * d * itemsize
        elif isinstance(targets, DaskRows):
            segment = max(1, (memory_budget // 4) // (d * itemsize))
            budget -= segment * d * itemsize
        else:
            stream = True
    budget = max(1, budget)
    bq, bt = plan_blocks(m, segment, d, itemsize, budget, stream_targets=stream)
    k = min(int(k), n)

    def _segment(t0: int, t1: int) -> Rows:
        if segment == n:
            return targets
        # one dask segment of targets, computed once
        return Rows(targets.take(t0, t1, device, dtype), np.arange(t1 - t0), targets.origin[t0:t1])

    with torch.no_grad():
        res = ScanResult()
        tie_t = None
        if tie_scale is not None:
            tie_t = torch.as_tensor(np.asarray(tie_scale, dtype=np.float64)).to(device, dtype)
        # the dot tie scale of k=1 needs max ‖y‖ over every target before the first
        # block: one extra pass over the segments of dask targets split for the budget
        t_max_all = None
        if k == 1 and similarity == "dot" and tie_t is None and segment < n:
            t_max_all = 0.0
            for t0 in range(0, n, segment):
                norms, exps = _norms(_segment(t0, min(n, t0 + segment)), device, dtype)
                t_max_all = max(t_max_all, float(_unscale(norms, exps).max()))
        sbuf = torch.empty(min(bq, m) * min(bt, n), dtype=dtype, device=device)
        q_norms = torch.zeros(m, dtype=torch.float64, device=device)
        t_max = 0.0
        if k:
            top_v = torch.full((m, k), -torch.inf, dtype=dtype, device=device)
            top_i = torch.full((m, k), -1, dtype=torch.int64, device=device)
        if gold is not None:
            gold_t = torch.from_numpy(np.asarray(gold, dtype=np.int64)).to(device)
            g_score = torch.full((m,), torch.nan, dtype=dtype, device=device)
            other = torch.full((m,), -torch.inf, dtype=dtype, device=device)
        excl_t = (
            torch.from_numpy(np.asarray(exclude, dtype=np.int64)).to(device)
            if exclude is not None
            else None
        )
        for t0 in range(0, n, max(segment, 1)):
            t1 = min(n, t0 + segment)
            seg = _segment(t0, t1)
            # also rejects NaN/inf, at O(n·d); t_exps: rows rescaled against overflow
            t_norms, t_exps = _norms(seg, device, dtype)
            seg_max = float(_unscale(t_norms, t_exps).max()) if t_norms.numel() else 0.0
            t_max = max(t_max, seg_max)
            t_inv = None
            if similarity == "cosine":
                if t_exps is not None:  # cosines do not change with the scale of a row
                    seg = _ScaledRows(seg, t_exps)
                t_inv = _inverse(t_norms)
            dot_max = t_max if t_max_all is None else t_max_all
            for qs in row_blocks(m, bq):
                Q = queries.take(qs.start, qs.stop, device, dtype)
                q_norm, q_exps = _block_norms(queries, Q, qs.start)
                q_true = None
                if q_exps is not None or t_exps is not None:  # rare: rows out of range
                    q_true = _unscale(q_norm, q_exps)
                    if similarity == "dot":
                        _check_dot_range(queries, qs.start, q_true, seg_max, dtype)
                    elif q_exps is not None:
                        Q = _scale_rows(Q, q_exps)
                if t0 == 0:
                    q_norms[qs] = q_norm.to(torch.float64) if q_true is None else q_true
                q_inv = _inverse(q_norm)
                row_scale = None
                if k == 1:
                    if tie_t is not None:
                        row_scale = tie_t[qs]
                    elif similarity == "dot":
                        if q_true is None:
                            row_scale = q_norm * dot_max
                        else:
                            row_scale = (q_true * dot_max).to(dtype)
                for ls in row_blocks(t1 - t0, bt):
                    ts = slice(t0 + ls.start, t0 + ls.stop)  # positions among all targets
                    T = seg.take(ls.start, ls.stop, device, dtype)
                    # one score buffer for every block: a fresh block-sized output would
                    # be page-faulted in again on every step
                    S = torch.mm(
                        Q, T.T, out=sbuf[: Q.shape[0] * T.shape[0]].view(Q.shape[0], T.shape[0])
                    )
                    if t_inv is not None:
                        S.mul_(q_inv[:, None]).mul_(t_inv[None, ls])
                    if scorer is not None:
                        scorer(S, qs, ts)
                    if excl_t is not None:
                        _mask(S, excl_t[qs], ts)
                    if k:
                        _merge_topk(S, ts.start, top_v, top_i, qs, k, Q.shape[1], row_scale)
                    if gold is not None:
                        rows, cols = _in_block(gold_t[qs], ts)
                        if rows.numel():
                            g_score[qs.start + rows] = S[rows, cols]
                            S[rows, cols] = -torch.inf
                        other[qs] = torch.maximum(other[qs], S.amax(dim=1))
        if k:
            res.topk_values, res.topk_indices = top_v.cpu(), top_i.cpu()
        if gold is not None:
            res.gold_score, res.best_other = g_score.cpu(), other.cpu()
        res.query_norms, res.target_max_norm = q_norms.cpu(), t_max
    return res


def _in_block(pos: torch.Tensor, ts: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose target position ``pos`` falls in ``ts``, and its column there."""
    hit = (pos >= ts.start) & (pos < ts.stop)
    rows = torch.nonzero(hit).flatten()
    return rows, pos[rows] - ts.start


def _mask(S: torch.Tensor, pos: torch.Tensor, ts: slice) -> None:
    rows, cols = _in_block(pos, ts)
    if rows.numel():
        S[rows, cols] = -torch.inf


def _merge_topk(
    S: torch.Tensor,
    offset: int,
    top_v: torch.Tensor,
    top_i: torch.Tensor,
    qs: slice,
    k: int,
    n_features: int = 0,
    row_scale: torch.Tensor | None = None,
) -> None:
    """Merge a block's best ``k`` into the running top-k of rows ``qs``.

    With ``k=1`` ties within ``tie_tolerance · max(row_scale, |score|)`` (``row_scale``
    defaults to 1) go to the lowest target position.
    """
    if k == 1:
        # argmax where ties (within rounding, see TIE_ULPS) go to the lowest position:
        # the first score within the tolerance of the block's maximum, and a later block
        # wins only when it is higher beyond the tolerance
        v = S.amax(dim=1)
        tol = tie_tolerance(S.dtype, n_features) if n_features else 0.0
        scale = v.abs().nan_to_num(0.0, 0.0, 0.0)
        if row_scale is None:
            scale = scale.clamp(min=1.0)
        else:
            scale = torch.maximum(scale, row_scale.to(scale.dtype))
        i = (S >= (v - tol * scale)[:, None]).to(torch.uint8).argmax(dim=1)
        prev = top_v[qs, 0]
        prev_scale = torch.maximum(scale, prev.abs().nan_to_num(0.0, 0.0, 0.0))
        better = (v - prev) > tol * prev_scale
        better |= torch.isneginf(prev) & ~torch.isneginf(v)
        top_v[qs, 0] = torch.where(better, v, prev)
        top_i[qs, 0] = torch.where(better, i + offset, top_i[qs, 0])
        return
    kk = min(k, S.shape[1])
    v, i = torch.topk(S, kk, dim=1)
    if offset == 0 and kk == k:  # first block: the running top-k is still empty
        top_v[qs], top_i[qs] = v, i
        return
    cat_v = torch.cat([top_v[qs], v], dim=1)
    cat_i = torch.cat([top_i[qs], i + offset], dim=1)
    v2, j = torch.topk(cat_v, k, dim=1)
    top_v[qs] = v2
    top_i[qs] = torch.gather(cat_i, 1, j)


def _append_first(
    mask: torch.Tensor,
    offset: int,
    buf: torch.Tensor,
    count: torch.Tensor,
    qs: slice,
) -> None:
    """Append the positions of the first True entries of each row of ``mask`` to ``buf``.

    ``buf[qs]`` (shape ``(rows, cap)``) holds ``count[qs]`` positions per row; as many
    of the block's True entries as still fit are added, lowest column first.
    Modifies ``mask``.
    """
    cap = buf.shape[1]
    room = (cap - count[qs]).to(torch.int32)
    rank = mask.cumsum(dim=1, dtype=torch.int32)  # 1-based rank among the row's hits
    mask &= rank <= room[:, None]
    r, c = torch.nonzero(mask, as_tuple=True)
    if r.numel():
        slot = count[qs][r] + rank[r, c].to(torch.int64) - 1
        buf[qs.start + r, slot] = c + offset
        count[qs] += mask.sum(dim=1)


def nearest_neighbours(
    queries: Rows,
    targets: Rows,
    k: int,
    *,
    similarity: str = "cosine",
    exclude: np.ndarray | None = None,
    scorer: Scorer | None = None,
    tie_scale: np.ndarray | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The ``k`` best targets of every query, ties broken by the lowest target position.

    Scores as in :func:`scan` (``similarity``, then ``scorer``; the ``exclude``
    target of a query is never a neighbour). Two passes over the targets, both in
    blocks under ``memory_budget``:

    1. :func:`scan` gives each query's ``k``-th best score ``s_k``;
    2. a second stream keeps every target whose score is above ``s_k`` beyond the
       tie tolerance (fewer than ``k``), and fills the remaining places with the
       targets *tied* with ``s_k`` (``|s − s_k| ≤ tol · max(scale, |s|, |s_k|)``, see
       :data:`TIE_ULPS`) at the lowest positions, scanning the targets in position
       order.

    So among targets tied at the ``k``-th place the lowest positions win, whatever
    the block shape: the result does not depend on ``memory_budget`` (``torch.topk``
    alone would pick among ties by their place in a block).

    Parameters
    ----------
    queries, targets : Rows
    k : int
        Neighbours per query; clipped to ``len(targets)``.
    similarity : {"cosine", "dot"}, default="cosine"
    exclude : ndarray of shape (n_queries,), optional
        A target position to ignore per query (``-1`` for none).
    scorer : callable, optional
        As for :func:`scan`.
    tie_scale : ndarray of shape (n_queries,), optional
        Magnitude of each query's scores (default as in :func:`scan`).
    memory_budget : int, default=512 MiB
        Working memory of each pass; the second pass plans its blocks with half of
        it (it keeps two masks and a running count beside each score block).
    device : torch.device or str, default="cpu"

    Returns
    -------
    ndarray of shape (n_queries, k), int64
        Target positions, ascending within each row; ``-1`` where a query has fewer
        than ``k`` candidates (all but one excluded).

    Examples
    --------
    >>> base = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [1.0, 1.0]])
    >>> nearest_neighbours(Rows(base, [0]), Rows(base, [2, 1, 3, 4]), 2)  # 1 and 3 tie
    array([[1, 2]])
    """
    n = len(targets)
    m = len(queries)
    k = min(int(k), n)
    if k <= 0 or m == 0:
        return np.full((m, max(k, 0)), -1, dtype=np.int64)
    device = torch.device(device)
    first = scan(
        queries,
        targets,
        similarity=similarity,
        k=k,
        exclude=exclude,
        scorer=scorer,
        tie_scale=tie_scale,
        memory_budget=memory_budget,
        device=device,
    )
    dtype = first.topk_values.dtype
    kth = first.topk_values[:, k - 1].to(device)
    if tie_scale is not None:
        base = torch.as_tensor(np.asarray(tie_scale, dtype=np.float64))
    elif similarity == "dot":
        base = first.query_norms * first.target_max_norm
    else:
        base = torch.ones(m, dtype=torch.float64)
    # per row: max(scale, |s_k|); a row whose k-th place is empty (-inf) keeps its scale
    base = torch.maximum(base.to(device, dtype), kth.abs().nan_to_num(0.0, 0.0, 0.0))
    tol = tie_tolerance(dtype, queries.n_features)
    above = torch.full((m, k), -1, dtype=torch.int64, device=device)
    tied = torch.full((m, k), -1, dtype=torch.int64, device=device)
    n_above = torch.zeros(m, dtype=torch.int64, device=device)
    n_tied = torch.zeros(m, dtype=torch.int64, device=device)
    excl_t = (
        torch.from_numpy(np.asarray(exclude, dtype=np.int64)).to(device)
        if exclude is not None
        else None
    )

    def select(S: torch.Tensor, qs: slice, ts: slice) -> None:
        if scorer is not None:
            scorer(S, qs, ts)
        if excl_t is not None:
            _mask(S, excl_t[qs], ts)
        # tolerance of every entry, tol · max(scale, |s|) (the block's one temporary;
        # an excluded −inf entry gets a finite one, so it is neither above nor tied)
        lim = S.abs().nan_to_num_(posinf=0.0)
        torch.maximum(lim, base[qs, None], out=lim).mul_(tol)
        S.sub_(kth[qs, None])  # s − s_k (−inf − −inf = NaN: never kept)
        up = S > lim
        _append_first(up, ts.start, above, n_above, qs)
        del up
        near = S.abs_() <= lim
        _append_first(near, ts.start, tied, n_tied, qs)

    scan(
        queries,
        targets,
        similarity=similarity,
        scorer=select,
        memory_budget=max(1, memory_budget // 2),
        device=device,
    )
    # the n_above (< k) clear winners, then the lowest tied positions
    j = torch.arange(k, device=device)[None, :]
    fill = torch.gather(tied, 1, (j - n_above[:, None]).clamp(min=0))
    out = torch.where(j < n_above[:, None], above, fill)
    out = torch.where(out < 0, torch.iinfo(torch.int64).max, out).sort(dim=1).values
    out = torch.where(out == torch.iinfo(torch.int64).max, -1, out)
    return out.cpu().numpy()


# -- validation shared by the pair metrics ------------------------------------------


@dataclass
class Paired:
    """Validated inputs of a source→target metric.

    Attributes
    ----------
    nx : Backend or None
        None for a dask ``X``.
    base : torch.Tensor or dask.array.Array
        ``X`` as a tensor on its own device (a view of numpy input), or the
        validated dask array.
    source, target : Rows
        All rows of each language, in row order.
    gold : ndarray of shape (n_source,) or None
        Position in ``target`` of each source row's translation, ``-1`` for none.
    device : torch.device
    """

    nx: Backend | None
    base: Any
    source: Rows
    target: Rows
    gold: np.ndarray | None
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        """torch dtype of the rows of ``X`` as stored."""
        return self.source.dtype

    @property
    def n_features(self) -> int:
        return int(self.base.shape[1])

    def tie_tolerance(self) -> float:
        """Tolerance below which two scores of these rows are a tie (see :data:`TIE_ULPS`)."""
        return tie_tolerance(compute_dtype(self.dtype), self.n_features)

    @property
    def has_partner(self) -> np.ndarray:
        """Positions in ``source`` of the rows that have a translation in ``target``."""
        if self.gold is None:
            raise RuntimeError("no pair_ids were given")
        return np.flatnonzero(self.gold >= 0)


def _find_language(labels: np.ndarray, lang: Hashable, name: str) -> int:
    known = labels.tolist()
    for i, lab in enumerate(known):
        if lab == lang:
            return i
    raise ValueError(f"{name} language {lang!r} does not occur in languages; found {known}.")


def prepare(
    X: Any,
    languages: Any,
    pair_ids: Any,
    source: Hashable,
    target: Hashable,
    *,
    func: str,
    device: Any = "auto",
    need_pairs: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Paired:
    """Validate ``(X, languages, pair_ids, source, target)`` for a metric named ``func``.

    Raises a ValueError when lengths differ, a language is unknown, ``source ==
    target``, or a source row's ``pair_id`` occurs on several target rows.

    A dask ``X`` is not computed: the source and target rows become
    :class:`DaskRows` (windows of ``memory_budget // 4`` bytes); dask
    ``languages``/``pair_ids`` must have ``X``'s row chunks and are computed.
    """
    dask_in = is_dask(X)
    if dask_in:
        X = check_dask_X(X)
        languages = labels_numpy(languages, X, "languages")
        pair_ids = labels_numpy(pair_ids, X, "pair_ids") if need_pairs else None
        nx = None
    else:
        nx, X = check_X(X, name="X")
    n = X.shape[0]
    if languages is None:
        raise ValueError(f"{func} needs languages= (one language label per row of X).")
    labels, codes = check_languages(languages, n)
    s = _find_language(labels, source, "source")
    t = _find_language(labels, target, "target")
    if s == t:
        raise ValueError(
            f"source and target are the same language {source!r}; pass two different languages."
        )
    src = np.flatnonzero(codes == s)
    tgt = np.flatnonzero(codes == t)
    gold = None
    if need_pairs:
        pids = check_pair_ids(pair_ids, n, required_by=func)
        _, inv = np.unique(np.concatenate([pids[src], pids[tgt]]), return_inverse=True)
        inv = inv.reshape(-1)
        cs, ct = inv[: src.size], inv[src.size :]
        n_ids = int(inv.max()) + 1
        count_t = np.bincount(ct, minlength=n_ids)
        dup = count_t[cs] > 1
        if dup.any():
            bad = src[np.argmax(dup)]
            raise ValueError(
                f"pair_id {pids[bad]!r} of source row {bad} occurs on {count_t[cs][dup][0]} "
                f"rows of target language {target!r}; within one language each pair_id must "
                "be unique (rows sharing a pair_id are translations)."
            )
        count_s = np.bincount(cs, minlength=n_ids)
        dup = (count_s[cs] > 1) & (count_t[cs] > 0)
        if dup.any():
            bad = src[np.argmax(dup)]
            raise ValueError(
                f"pair_id {pids[bad]!r} occurs on {count_s[cs][dup][0]} rows of source "
                f"language {source!r}; within one language each pair_id must be unique "
                "(rows sharing a pair_id are translations)."
            )
        pos = np.full(n_ids, -1, dtype=np.int64)
        pos[ct] = np.arange(tgt.size)
        gold = pos[cs]
    if dask_in:
        dev = resolve_device(device, _BACKENDS["numpy"], None)
        window = max(1, memory_budget // 4)
        return Paired(
            None, X, DaskRows(X, src, None, window), DaskRows(X, tgt, None, window), gold, dev
        )
    base = nx.to_torch(X)
    dev = resolve_device(device, nx, X)
    return Paired(nx, base, Rows(base, src), Rows(base, tgt), gold, dev)


def require_pairs(p: Paired, func: str, source: Hashable, target: Hashable) -> np.ndarray:
    """Positions of source rows with a partner; ValueError if there are none."""
    q = p.has_partner
    if q.size == 0:
        raise NoPairsError(
            f"{func}: no row of source language {source!r} shares a pair_id with a row of "
            f"target language {target!r}; pass pair_ids that link translations."
        )
    return q
