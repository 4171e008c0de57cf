"""Streaming per-language d×d scatter matrices, in float64 (class-conditional moments).

:class:`ScatterMoments` extends :class:`~posthoc_align._stats.LanguageMoments`
(counts, shifted sums) with one d×d scatter matrix per language, from which the
pooled within-language scatter ``S_w``, the between-language scatter ``S_b`` and
each language's own covariance are read.  Same numerics as :mod:`._stats`: blocks
of :data:`~posthoc_align._stats.BLOCK_ROWS` rows are multiplied in the input
precision and added into float64 accumulators, every language shifted by its own
reference row (Chan, Golub & LeVeque 1983), so any chunking of the stream gives
the same result up to rounding.  A float32 block whose products overflow or turn
subnormal (rows of size beyond ~1e19 or below ~1e-16; read off the d×d result) is
multiplied again scaled by a power of two, so a float32 scatter is right at any
scale.  float64 rows whose squares leave float64's range cannot be accumulated in
float64: a scatter that overflows (rows of size ≳ 1e154) raises a ``ValueError``
asking for a rescale, and :meth:`~ScatterMoments.update` /
:meth:`~ScatterMoments.merge` are all or nothing (a rejected batch leaves the
statistics as they were).  Rows whose products of deviations are all subnormal
(rows varying by ≲ 1e-154: digits lost) are not refused batch by batch, since
whether *every* product is subnormal depends on all the rows, not on a batch or a
block: :attr:`~ScatterMoments.largest_deviation` keeps ``max |x − s_l|`` (capped
at :data:`DEVIATION_CAP`, above which some product is normal), combined by ``max``
across batches and blocks, and :attr:`~ScatterMoments.underflows` tells the reader
(e.g. a solve) of the statistics, whatever the chunking.  Two objects filled from
different parts of the data combine exactly with :meth:`ScatterMoments.merge`.

Memory is ``n_languages × d × d`` float64 on the host (e.g. 10 languages at
d = 768: 47 MB), the price of per-language covariances.

No method logic lives here: closed forms are in the file named after the method.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch

from ._backend import block_rows, compute_dtype
from ._stats import BLOCK_ROWS, TINY_CROSS64, LanguageMoments, _labels_list, row_blocks
from ._validation import raise_non_finite

__all__ = ["DEVIATION_CAP", "ScatterMoments", "check_finite_rows"]

#: Rows whose deviations from their reference rows all stay below this (in size)
#: have only subnormal products (``DEVIATION_CAP² = 2⁻¹⁰²²``, the smallest normal
#: float64): their scatter has lost digits (:attr:`ScatterMoments.underflows`).
#: :attr:`ScatterMoments.largest_deviation` is capped here: above it, nothing is
#: lost (the subnormal rounding of the smaller products is no worse than ordinary
#: rounding next to the largest one).
DEVIATION_CAP = 2.0**-511


def check_finite_rows(T: torch.Tensor, name: str = "X") -> None:
    """Raise a ValueError naming the first non-finite row of ``T`` (one cheap pass).

    Used before updating statistics that cannot be rolled back (a streaming
    fitter), so that a bad batch leaves the earlier state intact.
    """
    for sl in row_blocks(T.shape[0]):
        if not bool(torch.isfinite(T[sl]).all()):
            raise_non_finite(T[sl], name, offset=sl.start)


def _group_scatter(
    T: torch.Tensor, idx: torch.Tensor, shift: torch.Tensor, *, rescale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ (x − s)(x − s)ᵀ`` over the rows ``T[idx]`` (float64), and whether it is exact.

    Blocks are multiplied in the input precision (float32 stays float32: the GEMM
    is the hot path). A product of rows of size ``a`` is of size ``a²``: in float32
    it overflows for ``a ≳ 1e19`` and loses digits to subnormals for ``a ≲ 1e-16``.
    Both are read off each block's d×d result (Cauchy–Schwarz bounds every entry,
    and every partial sum, by the largest diagonal entry); the second value is a
    device bool, False when any block was out of range. ``rescale=True`` (the rare
    path) multiplies every block scaled by a power of two (exact) to unit size and
    scales the result back in float64.
    """
    dev, d = T.device, T.shape[1]
    cdt = compute_dtype(T.dtype)
    fi = torch.finfo(cdt)
    acc = torch.zeros((d, d), dtype=torch.float64, device=dev)
    in_range = torch.ones((), dtype=torch.bool, device=dev)
    for sl in row_blocks(idx.shape[0], block_rows(BLOCK_ROWS, dev)):
        rows = T.index_select(0, idx[sl]).to(cdt)
        k = rows.shape[0]
        # compensated: the GEMM runs on the rows centred on their block mean m;
        # with the reference row s, in float64 (dm = m − s, r = Σ(x−m)),
        #   Σ(x−s)(x−s)ᵀ = Σ(x−m)(x−m)ᵀ + dm rᵀ + r dmᵀ + n dm dmᵀ
        mb = rows.mean(0)
        rows -= mb
        dm = mb.to(torch.float64) - shift
        cross = torch.outer(dm, rows.sum(0).to(torch.float64))
        if rescale:
            acc += _scaled_gram(rows)
        else:
            G = rows.T @ rows
            if k > 1:  # one row is exactly its own mean
                top = G.diagonal().max()
                in_range &= torch.isfinite(top) & (top >= k * fi.tiny / fi.eps)
            acc += G
        acc += cross + cross.T + k * torch.outer(dm, dm)
    return acc, in_range


def _scaled_gram(Y: torch.Tensor) -> torch.Tensor:
    """``YᵀY`` as float64 with the GEMM on ``Y / 2**e`` (entries below 1 in size)."""
    amax = float(Y.abs().max()) if Y.numel() else 0.0
    if amax == 0.0:
        return torch.zeros((Y.shape[1], Y.shape[1]), dtype=torch.float64, device=Y.device)
    e = int(np.frexp(amax)[1])  # 2**(e-1) <= amax < 2**e
    Ys = torch.ldexp(Y, torch.tensor(-e, device=Y.device))
    return torch.ldexp((Ys.T @ Ys).to(torch.float64), torch.tensor(2 * e, device=Y.device))


def _overflow_error(what: str, name: str) -> ValueError:
    return ValueError(
        f"the scatter {what} overflows float64 (rows of magnitude ~1e154 or more: their "
        f"squares exceed the largest float64, ~1.8e308). The language axes and scores do "
        f"not depend on the scale of the data: divide {name} by a constant (e.g. its "
        "largest |value|) before fitting."
    )


def _underflow_error(name: str) -> ValueError:
    return ValueError(
        "the within-language scatter underflows float64 (rows varying by ~1e-154 or "
        "less: every product of their deviations is below the smallest normal float64, "
        "2.2e-308, and its digits are lost to subnormal numbers, down to 0). The language "
        "axes and scores do not depend on the scale of the data: multiply "
        f"{name} by a constant (e.g. 1 / its largest |value|) before fitting."
    )


def _largest_deviation(T: torch.Tensor, gcodes: np.ndarray, shift: np.ndarray) -> float:
    """``max |x − s_l|`` over the rows of ``T`` (float64; one more pass, rare path)."""
    dev = T.device
    sh = torch.from_numpy(shift).to(dev)
    g = torch.from_numpy(gcodes).to(dev)
    big = 0.0
    for sl in row_blocks(T.shape[0]):
        dx = T[sl].to(torch.float64) - sh.index_select(0, g[sl])
        if dx.numel():
            big = max(big, float(dx.abs().max()))
    return big


class _OwnRowMoments(LanguageMoments):
    """:class:`~posthoc_align._stats.LanguageMoments` with every language shifted by
    its own first row.

    First moments alone share one reference row (exact enough for sums), but a
    scatter ``Q − a aᵀ / n`` formed about another language's row cancels
    catastrophically when the languages are far apart relative to their spread
    (10⁴ apart with a spread of 10⁻³: 2e-2 relative error in ``S_w``), as a
    variance does: scatters take the second-moment rule.
    """

    def _reference_rows(self, T: torch.Tensor, codes: np.ndarray, new: list[int]) -> np.ndarray:
        first = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        idx = np.arange(len(codes) - 1, -1, -1)
        first[codes[idx]] = idx  # reversed assignment keeps the first occurrence
        take = torch.from_numpy(first[new]).to(T.device)
        rows = T.index_select(0, take).to(torch.float64).cpu().numpy()
        if not np.isfinite(rows).all():
            raise_non_finite(T)
        return rows


class ScatterMoments:
    """Per-language counts, sums and d×d scatter matrices of rows, streamed.

    For every language ``l`` with reference row ``s_l`` (its first row seen)
    accumulates, in float64::

        n_l,   a_l = Σ (x − s_l),   Q_l = Σ (x − s_l)(x − s_l)ᵀ

    and reads the centred scatter ``S_l = Q_l − a_l a_lᵀ / n_l`` on demand.

    Attributes
    ----------
    moments : LanguageMoments
        Counts, reference rows and shifted sums (its ``labels`` order is the
        order of :attr:`scatter`).
    scatter : ndarray of shape (n_languages, n_features, n_features) or None
        The shifted second moments ``Q_l`` (float64).
    largest_deviation : float
        ``max |x − s_l|`` over the rows so far, capped at :data:`DEVIATION_CAP`
        (whether some product of deviations is a normal float64). Read off the
        scatter when it is large enough (Cauchy–Schwarz), else by one more pass
        over the batch (rare: rows equal to their reference rows, or tiny
        deviations); combined by ``max``, so it does not depend on the chunking.

    Examples
    --------
    >>> import numpy as np, torch
    >>> X = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 1.0], [5.0, 3.0]])
    >>> m = ScatterMoments().update(X, np.array(["a", "b"]), np.array([0, 0, 1, 1]))
    >>> m.within().tolist()
    [[2.0, 0.0], [0.0, 2.0]]
    """

    def __init__(self) -> None:
        self.moments: LanguageMoments = _OwnRowMoments(compensated=True)
        self.scatter: np.ndarray | None = None
        self.largest_deviation: float = 0.0

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "largest_deviation" not in state:  # pickled before it was kept
            self.largest_deviation = self._assumed_deviation()

    def _assumed_deviation(self) -> float:
        """``largest_deviation`` of statistics saved without it (older versions).

        Those versions refused batches whose products were all subnormal, so a
        nonzero scatter had a normal product; a zero one had no deviation yet.
        """
        if self.scatter is None or not self.scatter.size:
            return 0.0
        return DEVIATION_CAP if float(self.scatter.diagonal(axis1=1, axis2=2).max()) > 0 else 0.0

    # -- streaming ------------------------------------------------------------
    def update(
        self, T: torch.Tensor, labels: np.ndarray, codes: np.ndarray, *, name: str = "X"
    ) -> ScatterMoments:
        """Add the rows of ``T`` (torch, any device) with language ``labels[codes]``.

        All or nothing: non-finite input, or float64 rows whose scatter overflows
        float64 (see the module notes), raise a ``ValueError`` and leave the
        statistics as they were. Rows whose products are all subnormal are kept:
        :attr:`underflows` (over all the rows so far) tells whether digits were lost.
        """
        if T.shape[0] == 0:
            return self
        check_finite_rows(T, name)
        m = self.moments
        # LanguageMoments rebinds its arrays on update: references restore it exactly
        saved = dict(vars(m), labels=list(m.labels), index=dict(m.index))
        try:
            return self._update(T, labels, codes, name)
        except Exception:
            vars(m).update(saved)
            raise

    def _update(
        self, T: torch.Tensor, labels: np.ndarray, codes: np.ndarray, name: str
    ) -> ScatterMoments:
        m = self.moments.update(T, labels, codes, name=name)
        L, d = len(m.labels), T.shape[1]
        lut = np.array([m.index.get(lab, -1) for lab in _labels_list(labels)], dtype=np.int64)
        gcodes = lut[codes]
        dev = T.device
        order = np.argsort(gcodes, kind="stable")
        bounds = np.searchsorted(gcodes[order], np.arange(L + 1))
        perm = torch.from_numpy(order).to(dev)
        added: dict[int, np.ndarray] = {}
        for g in range(L):
            lo, hi = int(bounds[g]), int(bounds[g + 1])
            if lo == hi:
                continue
            shift = torch.from_numpy(m.shift[g]).to(dev)  # float64
            acc, in_range = _group_scatter(T, perm[lo:hi], shift)
            if not bool(in_range):  # rare: float32 products overflowed or were subnormal
                acc, _ = _group_scatter(T, perm[lo:hi], shift, rescale=True)
            added[g] = acc.cpu().numpy()
        self._checked_sums(added, m.labels, name)
        reach = self._batch_deviation(
            added, T.shape[0], lambda: _largest_deviation(T, gcodes, m.shift)
        )
        # every check passed: commit
        scat = self.scatter if self.scatter is not None else np.zeros((0, d, d))
        if scat.shape[0] < L:
            scat = np.concatenate([scat, np.zeros((L - scat.shape[0], d, d))])
        for g, acc in added.items():
            scat[g] += acc
        self.scatter = scat
        self.largest_deviation = max(self.largest_deviation, reach)
        return self

    def _checked_sums(
        self, added: dict[int, np.ndarray], labels: list[Hashable], name: str
    ) -> dict[int, np.ndarray]:
        """The diagonals of ``Q_l + added[l]``, or a ``ValueError`` if a sum leaves float64.

        Checks each added matrix (min and max: no copy), the new diagonals and the
        pooled trace ``Σ_l trace(Q_l)``; the off-diagonal entries are bounded by the
        diagonal ones (Cauchy–Schwarz), so the committed sums and :meth:`within` are
        finite too. d×d reads and d-vectors only: the caller then adds in place.
        """
        n_old = 0 if self.scatter is None else self.scatter.shape[0]
        old = self.scatter.diagonal(axis1=1, axis2=2) if n_old else None  # a view
        diags: dict[int, np.ndarray] = {}
        for g, acc in added.items():
            diag = old[g] + acc.diagonal() if g < n_old else acc.diagonal().copy()
            finite = acc.size == 0 or np.isfinite(acc.min()) and np.isfinite(acc.max())
            if not (finite and np.isfinite(diag).all()):
                raise _overflow_error(f"of the rows of language {labels[g]!r}", name)
            diags[g] = diag
        total = sum(float(diag.sum()) for diag in diags.values())
        if n_old:
            total += sum(float(old[g].sum()) for g in range(n_old) if g not in diags)
        if not np.isfinite(total):
            raise _overflow_error("pooled over the languages", name)
        return diags

    def _batch_deviation(
        self, added: dict[int, np.ndarray], n_rows: int, largest_deviation: Callable[[], float]
    ) -> float:
        """The batch's ``max |x − s_l|``, capped at :data:`DEVIATION_CAP`.

        ``added`` are the batch's scatters ``Σ (x − s_l)(x − s_l)ᵀ`` (one per
        language). Once a product was normal, the cap is known without a look;
        a pooled diagonal entry of at least ``n_rows · 2⁻¹⁰²²`` has a term (a
        product) of at least ``2⁻¹⁰²²``; otherwise ``largest_deviation()`` reads
        the rows once more (rare: for normal-scale data, only when every row of the
        batch equals its reference row).
        """
        if self.largest_deviation >= DEVIATION_CAP or not added:
            return DEVIATION_CAP if added else 0.0
        pooled = sum(acc.diagonal() for acc in added.values())
        if float(np.max(pooled)) >= n_rows * TINY_CROSS64:
            return DEVIATION_CAP
        return min(largest_deviation(), DEVIATION_CAP)

    @property
    def underflows(self) -> bool:
        """Whether the rows so far vary, but so little that every product is subnormal.

        True when some row differs from its reference row and no row's deviation
        reaches :data:`DEVIATION_CAP` (``≈ 1.5e-154``): every product of deviations
        is below the smallest normal float64 and lost digits, down to 0, so the
        scatters are inexact. A zero scatter (identical rows) is not an underflow;
        one row with a normal deviation is enough (the subnormal rounding of the
        others is then no worse than ordinary rounding). As with
        :func:`~posthoc_align._stats.cross_underflows`. Depends on all the rows, not
        on how they were batched.
        """
        return 0.0 < self.largest_deviation < DEVIATION_CAP

    def check_underflow(self, name: str = "X") -> ScatterMoments:
        """Raise the ``ValueError`` asking to rescale ``name`` if :attr:`underflows`."""
        if self.underflows:
            raise _underflow_error(name)
        return self

    @classmethod
    def with_shifts(cls, labels: list[Hashable], shift: np.ndarray) -> ScatterMoments:
        """Empty statistics for known languages with fixed reference rows.

        Objects built on the same shifts :meth:`merge` by plain addition (the
        correction terms vanish), which is how block-wise (dask) scatters combine.
        """
        s = cls()
        s.moments = _OwnRowMoments.with_shifts(labels, shift, compensated=True)
        d = s.moments.shift.shape[1]
        s.scatter = np.zeros((len(s.moments.labels), d, d))
        return s

    def merge(self, other: ScatterMoments, *, name: str = "X") -> ScatterMoments:
        """Add the statistics of ``other`` (rows seen elsewhere) to these, exactly.

        ``other``'s sums are re-expressed about this object's reference rows
        (``Σ(y + δ) = Σy + nδ``, ``Σ(y + δ)(y + δ)ᵀ = Q + aδᵀ + δaᵀ + nδδᵀ``
        with ``δ = s_other − s_self``); languages new to this object are appended.
        All or nothing: a sum that overflows float64 raises a ``ValueError`` and
        leaves these statistics as they were.
        """
        om = other.moments
        if om.sums is None:
            return self
        m = self.moments
        if m.sums is not None and m.n_features != om.n_features:
            raise ValueError(
                f"cannot merge moments of {om.n_features} features into moments of "
                f"{m.n_features} features"
            )
        d = om.n_features
        labels = list(m.labels)
        index = dict(m.index)
        shift = m.shift if m.shift is not None else np.zeros((0, d))
        sums = m.sums.copy() if m.sums is not None else np.zeros((0, d))
        counts = m.counts.copy() if m.sums is not None else np.zeros(0)
        n_old = len(labels)
        added: dict[int, np.ndarray] = {}
        fresh_shift, fresh_sums, fresh_counts = [], [], []
        gap = 0.0  # largest |δ|: other's deviations are measured from other rows
        for j, lab in enumerate(om.labels):
            n_o, a_o, Q_o = om.counts[j], om.sums[j], other.scatter[j]
            if lab not in index:
                index[lab] = len(labels)
                labels.append(lab)
                fresh_shift.append(om.shift[j])
                fresh_sums.append(a_o)
                fresh_counts.append(n_o)
                added[index[lab]] = Q_o
                continue
            i = index[lab]
            delta = om.shift[j] - shift[i]
            if n_o:
                gap = max(gap, float(np.abs(delta).max(initial=0.0)))
            sums[i] += a_o + n_o * delta
            added[i] = (
                Q_o + np.outer(a_o, delta) + np.outer(delta, a_o) + n_o * np.outer(delta, delta)
            )
            counts[i] += n_o
        if fresh_shift:
            shift = np.vstack([shift, fresh_shift])
            sums = np.vstack([sums, fresh_sums])
            counts = np.concatenate([counts, fresh_counts])
        if not np.isfinite(sums).all():
            raise _overflow_error("of the merged statistics", name)
        self._checked_sums(added, labels, name)
        # every check passed: commit
        scat = self.scatter if self.scatter is not None else np.zeros((0, d, d))
        if len(labels) > n_old:
            scat = np.concatenate([scat, np.zeros((len(labels) - n_old, d, d))])
        for g, acc in added.items():
            scat[g] += acc
        self.scatter = scat
        # |x − s_self| ≤ |x − s_other| + |δ|: a bound, exact where the shifts agree (dask
        # blocks share theirs); past the cap nothing is subnormal anyway
        reach = other.largest_deviation + gap if other.largest_deviation or gap else 0.0
        self.largest_deviation = min(max(self.largest_deviation, reach), DEVIATION_CAP)
        m.labels, m.index, m.shift, m.sums, m.counts = labels, index, shift, sums, counts
        return self

    # -- reading --------------------------------------------------------------
    @property
    def labels(self) -> list[Hashable]:
        return self.moments.labels

    @property
    def counts(self) -> np.ndarray:
        return self.moments.counts

    def means(self) -> np.ndarray:
        """Per-language means, shape (n_languages, n_features)."""
        return self.moments.means()

    def scatters(self) -> np.ndarray:
        """Centred per-language scatter ``Σ (x − μ_l)(x − μ_l)ᵀ``, symmetrised, (L, d, d)."""
        a = self.moments.sums
        # (a / n) aᵀ, not a aᵀ / n: bounded by Q entry-wise, so it cannot overflow
        S = self.scatter - np.einsum("li,lj->lij", a / self.counts[:, None], a)
        return (S + S.transpose(0, 2, 1)) / 2

    def within(self) -> np.ndarray:
        """Pooled within-language scatter ``S_w = Σ_l S_l``, shape (d, d)."""
        return self.scatters().sum(0)

    def between(self) -> np.ndarray:
        """Between-language scatter ``S_b = Σ_l n_l (μ_l − μ)(μ_l − μ)ᵀ``, shape (d, d)."""
        dm = self.means() - self.moments.global_mean()
        return (dm * self.counts[:, None]).T @ dm

    # -- persistence ----------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta, arrays = self.moments.state()
        meta = {**meta, "largest_deviation": float(self.largest_deviation)}
        if self.scatter is not None:
            arrays = {**arrays, "scatter": self.scatter}
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> ScatterMoments:
        s = cls()
        s.moments = _OwnRowMoments.from_state(meta, arrays)
        if "scatter" in arrays:
            s.scatter = np.asarray(arrays["scatter"], dtype=np.float64)
        if "largest_deviation" in meta:
            s.largest_deviation = float(meta["largest_deviation"])
        else:  # saved by an older version
            s.largest_deviation = s._assumed_deviation()
        return s
