"""Weak and strong alignment, mean and normalised cosine of translation pairs."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from .._backend import compute_dtype
from .._stats import row_blocks
from ._similarity import (
    DEFAULT_MEMORY_BUDGET,
    Rows,
    _raise_non_finite_row,
    check_memory_budget,
    prepare,
    require_pairs,
    rescaled_block,
    row_norms,
    scan,
    score_scale,
    strictly_above,
)

__all__ = ["alignment_scores", "pair_cosines", "unit_mean"]

_SIMILARITIES = ("cosine", "dot", "euclidean")


def _block_rows(n_features: int, itemsize: int, memory_budget: int) -> int:
    return int(max(1, min(4096, memory_budget // max(1, 3 * n_features * itemsize))))


def pair_cosines(
    a: Rows, b: Rows, *, device: torch.device, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> np.ndarray:
    """Cosine of ``a[i]`` and ``b[i]`` for every ``i`` (float64 numpy, 0 for zero rows)."""
    dtype = compute_dtype(a.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = np.empty(len(a))
    with torch.no_grad():
        for sl in row_blocks(len(a), _block_rows(a.n_features, itemsize, memory_budget)):
            # rows whose squared norm over- or underflows come rescaled (cosines do
            # not change with the scale of a row)
            A, na = rescaled_block(a, a.take(sl.start, sl.stop, device, dtype), sl.start)
            B, nb = rescaled_block(b, b.take(sl.start, sl.stop, device, dtype), sl.start)
            dot = (A * B).sum(dim=1, dtype=torch.float64)
            den = na.to(torch.float64) * nb.to(torch.float64)
            cos = torch.where(den > 0, dot / torch.where(den > 0, den, 1.0), 0.0)
            out[sl] = cos.cpu().numpy()
    if not np.isfinite(out).all():
        raise ValueError(
            "Input X contains NaN or infinity. Remove or impute those rows "
            "(e.g. with sklearn.impute.SimpleImputer) first."
        )
    return out


def unit_mean(
    rows: Rows, *, device: torch.device, memory_budget: int = DEFAULT_MEMORY_BUDGET
) -> np.ndarray:
    """Mean of the unit-normalised rows (zero rows stay zero), float64 numpy."""
    dtype = compute_dtype(rows.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    acc = torch.zeros(rows.n_features, dtype=torch.float64, device=device)
    with torch.no_grad():
        for sl in row_blocks(len(rows), _block_rows(rows.n_features, itemsize, memory_budget)):
            B = rows.take(sl.start, sl.stop, device, dtype)
            B, norms = rescaled_block(rows, B, sl.start)  # overflow-safe norms
            inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
            acc += (B * inv[:, None]).sum(dim=0, dtype=torch.float64)
    return acc.cpu().numpy() / len(rows)


def _sq_norms(rows: Rows, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``‖y‖²`` of every row; a ValueError when one is NaN or overflows ``dtype``.

    Unlike cosines, Euclidean distances depend on the scale of ``X``: a squared norm
    that overflows cannot be rescaled away, and the message asks to rescale ``X``.
    """
    out = torch.empty(len(rows), dtype=dtype, device=device)
    for sl in row_blocks(len(rows)):
        B = rows.take(sl.start, sl.stop, device, dtype)
        sq = (B * B).sum(dim=1)
        if not bool(torch.isfinite(sq).all()):
            _raise_non_finite_row(
                rows, B, sl.start, "the squared row norms (of the Euclidean distances)"
            )
        out[sl] = sq
    return out


def _euclidean_scorer(sq_target: torch.Tensor) -> Any:
    """Ranking part of ``−‖x − y‖² = 2x·y − ‖y‖² − ‖x‖²`` (``‖x‖²`` is per query)."""

    def score(S: torch.Tensor, qs: slice, ts: slice) -> None:
        S.mul_(2).sub_(sq_target[None, ts])

    return score


def alignment_scores(
    X: Any,
    languages: Any,
    pair_ids: Any,
    source: Hashable,
    target: Hashable,
    similarity: str = "cosine",
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: Any = "auto",
) -> dict[str, float]:
    """Weak and strong alignment and the mean (normalised) cosine of translations.

    For a source row ``x`` with translation ``y*`` and similarity ``s``:

    * weak alignment (Eq. 1 of the survey; Roy et al. 2020): ``y*`` is nearer to
      ``x`` than every other target row, ``s(x, y*) > s(x, y) ∀ y ∈ T∖{y*}``;
    * strong alignment (Eq. 1 and Eq. 2): ``y*`` is also nearer than every other
      source row, ``s(x, y*) > s(x, x') ∀ x' ∈ S∖{x}``, i.e. the translation is
      the nearest row of either language;
    * ``mean_cosine``: mean of ``cos(x, y*)`` over translation pairs;
    * ``normalized_cosine`` (§2.2): ``mean_cosine`` divided by the mean cosine of
      all cross-language pairs (every source row with every target row). That mean
      is exact, not sampled: with ``u``, ``v`` the unit-normalised rows,
      ``mean_{i,j} cos(x_i, y_j) = mean_i(u_i) · mean_j(v_j)``.

    Parameters
    ----------
    X : array-like or torch.Tensor of shape (n_rows, n_features)
    languages, pair_ids : array-like of shape (n_rows,)
    source, target : hashable
    similarity : {"cosine", "dot", "euclidean"}, default="cosine"
        ``s`` for the weak and strong scores; ``"euclidean"`` means nearer in
        Euclidean distance. The cosine scores are cosines whatever this is.
    memory_budget : int, default=512 MiB
        Bytes of working memory of the block-wise search.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"

    Returns
    -------
    dict
        ``{"weak", "strong", "mean_cosine", "normalized_cosine"}`` as floats. The
        first two are shares of the source rows that have a translation.

    Notes
    -----
    Ties count as failures (a translation must be *strictly* nearer). Scores within
    rounding of each other are a tie: ``4 · eps · sqrt(d)`` times the scale of the
    scores, 1 (or the larger score) for cosine, ``‖x‖ · ‖y‖`` for dot and
    ``‖x‖² + ‖y‖²`` for euclidean (``x`` the query, ``y`` its translation; at least
    the larger score), so the dot and euclidean scores do not change with the scale
    of ``X`` and an unrelated large row does not widen the band. A zero mean cross-language cosine gives ``normalized_cosine = nan``. Source rows
    without a translation are not scored but take part in the strong condition
    and in the cross-language mean, as do target rows without one.

    Dask arrays: ``X`` may be a dask array (``languages``/``pair_ids`` numpy, or dask with
    ``X``'s row chunks). Only the rows of ``source`` and ``target`` are computed,
    window by window (``memory_budget // 4`` bytes each); targets larger than
    half the budget are read in segments of a quarter, each once, so memory
    stays within ``memory_budget``. The result equals the numpy one.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.metrics import alignment_scores
    >>> X = np.array([[1.0, 0.0], [1.0, 0.1], [0.8, 0.6], [0.0, 1.0]])
    >>> s = alignment_scores(X, ["en", "en", "de", "de"], [0, 1, 0, 1], "en", "de")
    >>> s["weak"], s["strong"]     # en row 0 finds de row 2, but en row 1 is nearer still
    (0.5, 0.0)
    >>> round(s["mean_cosine"], 3)
    0.45
    """
    if similarity not in _SIMILARITIES:
        raise ValueError(f"similarity must be one of {list(_SIMILARITIES)}, got {similarity!r}.")
    memory_budget = check_memory_budget(memory_budget)
    p = prepare(
        X,
        languages,
        pair_ids,
        source,
        target,
        func="alignment_scores",
        device=device,
        memory_budget=memory_budget,
    )
    queries = require_pairs(p, "alignment_scores", source, target)
    q_rows = p.source.subset(queries)
    dtype = compute_dtype(p.dtype)
    kind = "cosine" if similarity == "cosine" else "dot"

    def scorer(rows: Rows) -> Any:
        if similarity != "euclidean":
            return None
        return _euclidean_scorer(_sq_norms(rows, p.device, dtype))

    with torch.no_grad():
        cross = scan(
            q_rows,
            p.target,
            similarity=kind,
            gold=p.gold[queries],
            scorer=scorer(p.target),
            memory_budget=memory_budget,
            device=p.device,
        )
        own = scan(
            q_rows,
            p.source,
            similarity=kind,
            exclude=queries,
            gold=np.full(queries.size, -1),
            scorer=scorer(p.source),
            memory_budget=memory_budget,
            device=p.device,
        )
    g = cross.gold_score.numpy()
    tol = p.tie_tolerance()  # a score equal within rounding is a tie, i.e. not above
    # rounding is relative to the norms of the rows compared (None: cosine, absolute)
    # of the query and its translation (not of the largest row anywhere, which would
    # widen every query's tie band)
    qn = cross.query_norms
    scale = None
    if similarity in ("dot", "euclidean"):
        scale = score_scale(similarity, qn, row_norms(p.target.subset(p.gold[queries])))
    weak = strictly_above(g, cross.best_other.numpy(), tol, scale)
    strong = weak & strictly_above(g, own.best_other.numpy(), tol, scale)

    cos = pair_cosines(
        q_rows, p.target.subset(p.gold[queries]), device=p.device, memory_budget=memory_budget
    )
    mean_cos = float(cos.mean())
    random_cos = float(
        unit_mean(p.source, device=p.device, memory_budget=memory_budget)
        @ unit_mean(p.target, device=p.device, memory_budget=memory_budget)
    )
    normalized = mean_cos / random_cos if random_cos != 0 else float("nan")
    return {
        "weak": float(weak.mean()),
        "strong": float(strong.mean()),
        "mean_cosine": mean_cos,
        "normalized_cosine": float(normalized),
    }
