"""Streaming sufficient statistics per language, in one pass, in float64.

Two moment objects feed every method:

* :class:`LanguageMoments` — per-language row counts, sums and (optionally) sums of
  squares.  Enough for centring, standardisation, LSAR and the centring inside
  Procrustes.
* :class:`PairMoments` — for each language, the cross-product between its rows and
  their pivot-language partners (rows sharing a ``pair_id``).  Enough for every
  orthogonal Procrustes map.

Numerics.  On the CPU (float32/float64 input, numba installed) :class:`LanguageMoments`
is one pass of :func:`posthoc_align._kernels.language_moments`: every term
``x − shift_l`` and its square is formed and added in float64 (agreement with a
two-pass float64 computation ~1e-12 relative, float32 input included).  Otherwise (CUDA,
other dtypes, ``POSTHOC_ALIGN_NUMBA=0``) rows are processed in blocks (:data:`SUM_BLOCK` rows for the per-language
sums, :data:`BLOCK_ROWS` for pair products).  Inside a block the
work runs in the input precision (float32 stays float32, so segmented sums and GEMMs
run at full speed); every block result is added into a float64 accumulator.  Each
language's data are shifted by a fixed reference row (the first row seen of that
language; one row shared by all languages, the first row seen, when only sums are
needed) before summing, so
sums of squares and cross-products do not lose precision to large means (the
"shifted data" algorithm; Chan, Golub & LeVeque 1983).  float64 input is float64 throughout (agreement with a two-pass float64
computation ~1e-12 relative).  float32 input: first-moment-only sums (centring)
are float32 block sums, ~1e-6 relative to the values' magnitude; with second
moments (standardisation), or ``compensated=True`` (LSAR, whose subspace comes from
differences of language means), rows are centred near their language's mean m before the
float32 reductions — on a fixed per-language centre (the running mean, or the mean of
the language's first block; :meth:`LanguageMoments._sum_centred`) for shuffled rows, on
each block's own mean for rows grouped by language — and ``Σy = n·m + Σ(y−m)``,
``Σy² = Σ(y−m)² + 2m·Σ(y−m) + n·m²`` are formed in float64 (compensated float32:
rounding relative to the spread, not to the mean; ~1e-7 relative on variances and
means), whatever the chunking of the stream.  Pass float64 arrays when more is needed.

No method logic lives here: closed forms are in the file named after the method.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import numpy as np
import torch

from . import _kernels
from ._backend import block_rows, compute_dtype
from ._validation import raise_non_finite

__all__ = ["BLOCK_ROWS", "LanguageMoments", "PairMoments", "row_blocks"]

#: Rows per block for block-wise statistics and transforms.
BLOCK_ROWS = 4096

#: Rows per block of the segmented sums (a block of 2048 float32 rows of 768 stays in
#: cache across the shift, the sums and the squares; 4096 was ~1.5x slower).
SUM_BLOCK = 2048


#: A float32 pair cross-product (one language's pairs in one batch) whose largest
#: ``|entry|`` is below this is formed again in float64 (:meth:`PairMoments._accumulate`): below it, the rounding
#: of subnormal products (2⁻¹⁵⁰ each) is no longer negligible against float32's
#: relative precision for up to ~2²⁵ pairs, and all-underflowed products give 0.
TINY_CROSS = 2.0**-100

#: The smallest normal float64, 2⁻¹⁰²² (``np.finfo(np.float64).tiny``): the float64
#: range check of the pair products (:func:`cross_underflows`, used by
#: :meth:`PairMoments._accumulate` and the dask path alike). A product below it is
#: subnormal: it is rounded to a multiple of 2⁻¹⁰⁷⁴, an absolute error of up to
#: 2⁻¹⁰⁷⁵ instead of a relative one. While the largest product of a language's
#: rows with their pivot partners, ``max|a − k_a| · max|b − k_b|`` (rows shifted by
#: the reference rows ``k``), is at least this, that absolute error is at most half
#: an ulp of the largest product: no worse than ordinary rounding (float64 rows of
#: magnitude ≳ 1.5e-154). Below it *every* product has lost digits, down to 0:
#: such rows cannot be paired (a clear error).
TINY_CROSS64 = 2.0**-1022


#: Rows grouped by language in runs at least this long (on average) take the
#: contiguous-segment path; otherwise segmented ``index_add_`` over blocks.
MIN_RUN = 1024


def _runs(gcodes: np.ndarray) -> list[tuple[int, int, int]] | None:
    """``[(start, stop, code), ...]`` when rows come in few long runs of one language."""
    n = gcodes.shape[0]
    change = np.flatnonzero(gcodes[1:] != gcodes[:-1]) + 1
    if (change.size + 1) * MIN_RUN > n:
        return None
    bounds = np.concatenate(([0], change, [n]))
    return [(int(a), int(b), int(gcodes[a])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def row_blocks(n: int, block: int = BLOCK_ROWS) -> Iterator[slice]:
    """Slices covering ``range(n)`` in blocks of ``block`` rows."""
    for start in range(0, n, block):
        yield slice(start, min(start + block, n))


def _labels_list(labels: np.ndarray) -> list[Hashable]:
    return [lab.item() if isinstance(lab, np.generic) else lab for lab in labels]


class LanguageMoments:
    """Per-language counts, sums and sums of squares of rows, streamed.

    Parameters
    ----------
    second_moments : bool, default=False
        Also accumulate per-dimension sums of squares (for variances).
    compensated : bool, optional
        Form float32 sums about each language's block mean (see the module notes):
        ~1e-7 instead of ~1e-6 relative, at one more in-cache pass. Defaults to
        ``second_moments`` (always on with second moments).
    absolute : bool, default=False
        Also accumulate per-dimension sums of ``|x|`` over all rows (first absolute
        moments): the magnitude of the values whose rounding the means inherit,
        independent of the order of the rows (LSAR's rank cut). First moments only.

    Attributes
    ----------
    labels : list
        Languages in the order they were registered (sorted within a batch).
    counts : ndarray of shape (n_languages,)
    shift : ndarray of shape (n_languages, n_features)
        Reference row of each language (its first row seen), float64.
    sums, sumsq : ndarray of shape (n_languages, n_features)
        Sums of ``x - shift`` and of ``(x - shift) ** 2``, float64.
    abs_sums : ndarray of shape (n_features,) or None
        Sums of ``|x|`` over all rows (with ``absolute=True``), float64.

    Examples
    --------
    >>> import numpy as np, torch
    >>> m = LanguageMoments().update(torch.tensor([[1.0], [3.0], [10.0]]),
    ...                              np.array(["de", "en"]), np.array([1, 1, 0]))
    >>> m.labels, m.means().ravel().tolist()
    (['de', 'en'], [10.0, 2.0])
    """

    def __init__(
        self,
        *,
        second_moments: bool = False,
        compensated: bool | None = None,
        absolute: bool = False,
    ):
        if absolute and second_moments:
            raise ValueError("absolute moments are accumulated with first moments only")
        self.second_moments = second_moments
        self.compensated = second_moments if compensated is None else bool(compensated)
        self.absolute = bool(absolute)
        self.abs_sums: np.ndarray | None = None
        self.labels: list[Hashable] = []
        self.index: dict[Hashable, int] = {}
        self.counts = np.zeros(0)
        self.shift: np.ndarray | None = None
        self.sums: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None
        #: machine epsilon of the least precise input seen (rounding already in the data:
        #: e.g. the residual means of float32 rows centred in float32 are ~eps32, not 0)
        self.input_eps = 0.0

    # -- streaming ------------------------------------------------------------
    def _global_codes(self, T: torch.Tensor, labels: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Map batch codes to global language indices, registering new languages."""
        d = T.shape[1]
        if self.shift is None:
            self.shift = np.zeros((0, d))
            self.sums = np.zeros((0, d))
            self.sumsq = np.zeros((0, d)) if self.second_moments else None
            self.abs_sums = np.zeros(d) if self.absolute else None
        lab_list = _labels_list(labels)
        new = [i for i, lab in enumerate(lab_list) if lab not in self.index]
        if new:
            # O(n) (no sort): which batch labels occur, and where the first new one starts
            present = np.bincount(codes, minlength=len(lab_list)) > 0
            new = [i for i in new if present[i]]
            if new:
                rows = self._reference_rows(T, codes, new)
                for i in new:
                    self.index[lab_list[i]] = len(self.labels)
                    self.labels.append(lab_list[i])
                self.shift = np.vstack([self.shift, rows])
                self.sums = np.vstack([self.sums, np.zeros_like(rows)])
                self.counts = np.concatenate([self.counts, np.zeros(len(new))])
                if self.second_moments:
                    self.sumsq = np.vstack([self.sumsq, np.zeros_like(rows)])
        lut = np.array([self.index.get(lab, -1) for lab in lab_list], dtype=np.int64)
        return lut[codes]

    def _reference_rows(self, T: torch.Tensor, codes: np.ndarray, new: list[int]) -> np.ndarray:
        """Shift rows (float64) for the batch languages ``new`` (codes), first seen now.

        With second moments each language gets its own first row: a variance is
        ``Σ(x−s)²/n − (Σ(x−s)/n)²``, which cancels catastrophically when ``s`` is far
        from the language (another language's row, 10⁴ away, lost half the digits of
        a 10⁻⁶ variance). First moments only need ``Σ(x−s)``, exact enough for any
        ``s``: they share one row, the first ever seen, so the shift is a broadcast
        subtraction rather than a per-row gather on the torch path.
        """
        if self.second_moments:
            first = np.full(int(codes.max()) + 1 if len(codes) else 0, -1, dtype=np.int64)
            # first occurrence of each code: reversed assignment keeps the smallest index
            idx = np.arange(len(codes) - 1, -1, -1)
            first[codes[idx]] = idx
            take = torch.from_numpy(first[new]).to(T.device)
            rows = T.index_select(0, take).to(torch.float64).cpu().numpy()
        elif len(self.labels):
            rows = np.tile(self.shift[0], (len(new), 1))
        else:
            ref = T[int(np.argmax(codes == new[0]))].to(torch.float64).cpu().numpy()
            rows = np.tile(ref, (len(new), 1))
        if not np.isfinite(rows).all():
            raise_non_finite(T)
        return rows

    def update(
        self, T: torch.Tensor, labels: np.ndarray, codes: np.ndarray, *, name: str = "X"
    ) -> LanguageMoments:
        """Add the rows of ``T`` (torch, any device) with language ``labels[codes]``.

        All or nothing: if the batch holds NaN/inf the error leaves the moments as
        they were (no half-registered language).
        """
        saved = (
            list(self.labels),
            dict(self.index),
            self.counts,
            self.shift,
            self.sums,
            self.sumsq,
            self.abs_sums,
        )
        try:
            out = self._update(T, labels, codes, name)
            if T.is_floating_point():
                self.input_eps = max(self.input_eps, input_rounding(T.dtype))
            return out
        except Exception:
            (
                self.labels,
                self.index,
                self.counts,
                self.shift,
                self.sums,
                self.sumsq,
                self.abs_sums,
            ) = saved
            raise

    def _update(
        self, T: torch.Tensor, labels: np.ndarray, codes: np.ndarray, name: str
    ) -> LanguageMoments:
        if T.shape[0] == 0:
            return self
        if self.sums is not None and self.sums.shape[1] != T.shape[1]:
            raise ValueError(
                f"{name} has {T.shape[1]} features but earlier batches had "
                f"{self.sums.shape[1]}; every batch must have the same number of columns."
            )
        gcodes = self._global_codes(T, labels, codes)
        if self.absolute:
            if _kernels.usable(T):  # sums and absolute sums fused in one pass
                S, A = _kernels.language_abs_moments(T, gcodes, self.shift)
                self._add_abs(torch.from_numpy(A), T, name)
                return self._commit(T, gcodes, torch.from_numpy(S), None, name)
            self._add_abs(self._abs_sums_blocks(T, gcodes), T, name)
        if _kernels.usable(T):  # one fused pass, float64 terms (CPU)
            S, Q = _kernels.language_moments(T, gcodes, self.shift, second=self.second_moments)
            acc_q = None if Q is None else torch.from_numpy(Q)
            return self._commit(T, gcodes, torch.from_numpy(S), acc_q, name)
        L = len(self.labels)
        dev, cdt = T.device, compute_dtype(T.dtype)
        n, d = T.shape
        g = torch.from_numpy(gcodes).to(dev)
        shift = torch.from_numpy(self.shift).to(dev, cdt)
        shared = bool((self.shift == self.shift[0]).all())  # one reference row for all
        shift0 = shift[0]
        acc_s = torch.zeros((L, d), dtype=torch.float64, device=dev)
        acc_q = torch.zeros_like(acc_s) if self.second_moments else None
        runs = _runs(gcodes)
        if runs is not None:
            self._sum_runs(T, runs, cdt, acc_s, acc_q)
            return self._commit(T, gcodes, acc_s, acc_q, name)
        comp = self.compensated or acc_q is not None
        if comp:
            self._sum_centred(T, g, gcodes, cdt, acc_s, acc_q)
            return self._commit(T, gcodes, acc_s, acc_q, name)
        bs = torch.empty((L, d), dtype=cdt, device=dev)
        raw_sums = shared  # plain first moments: no shift pass needed
        # blocks of SUM_BLOCK rows: the shifted block stays in cache between the
        # subtraction, the two segmented sums and the squaring (4096-row blocks spilled)
        step = min(block_rows(SUM_BLOCK, dev), n)
        xbuf = torch.empty((step, d), dtype=cdt, device=dev)
        if not shared:
            gbuf = torch.empty((step, d), dtype=cdt, device=dev)
        for sl in row_blocks(n, step):
            gb = g[sl]
            src = T[sl]
            xs = xbuf[: sl.stop - sl.start]
            # block partial sums in the input precision (float32 index_add_ runs at
            # memory speed; converting blocks to float64 made it ~13x slower), then
            # accumulated in float64 across blocks
            if raw_sums:
                if src.dtype != cdt or not src.is_contiguous():
                    # index_add_ from a strided view (a layer of a stack) is ~5x slower
                    # than copying the block first
                    src = xs.copy_(src)
                bs.zero_().index_add_(0, gb, src)
                acc_s += bs
                continue
            if src.dtype != cdt:
                src = src.to(cdt)
            k = sl.stop - sl.start
            if shared:
                torch.sub(src, shift0, out=xs)
            else:
                gs = gbuf[:k]
                torch.index_select(shift, 0, gb, out=gs)
                torch.sub(src, gs, out=xs)
            bs.zero_().index_add_(0, gb, xs)
            acc_s += bs
        if raw_sums:  # shifted sums, formed in float64
            n_batch = torch.from_numpy(np.bincount(gcodes, minlength=L).astype(np.float64))
            acc_s -= n_batch.to(dev)[:, None] * torch.from_numpy(self.shift).to(dev)
        return self._commit(T, gcodes, acc_s, acc_q, name)

    def _sum_centred(self, T, g, gcodes, cdt, acc_s, acc_q) -> None:
        """Compensated sums of shuffled rows: each row centred on a fixed vector near its
        language's mean.

        The centre c of a language is its running mean (from earlier batches), or, for a
        language new to the stream, the mean of its rows in the first block it appears in;
        c is rounded to the input precision and used exactly. Per block: one gather of the
        centres, one subtraction and one ``index_add_`` (two with second moments, after
        squaring in place), all in cache. The float32 rounding is then relative to the
        spread of the data, not to its mean, and with the reference row s, once per batch
        in float64: ``Σ(x−s) = Σ(x−c) + n(c−s)`` and
        ``Σ(x−s)² = Σ(x−c)² + 2(c−s)Σ(x−c) + n(c−s)²``.
        """
        dev = T.device
        n, d = T.shape
        L = len(self.labels)
        seen = self.counts[:L] if self.counts.shape[0] >= L else np.zeros(L)
        have = np.zeros(L, dtype=bool)
        have[: seen.shape[0]] = seen > 0
        centre = np.zeros((L, d))
        if have.any():
            known = have.nonzero()[0]
            centre[known] = self.shift[known] + self.sums[known] / self.counts[known, None]
        c = torch.from_numpy(centre).to(dev, cdt)  # rounded to the input precision ...
        step = min(block_rows(SUM_BLOCK, dev), n)
        xbuf = torch.empty((step, d), dtype=cdt, device=dev)
        gbuf = torch.empty((step, d), dtype=cdt, device=dev)
        rs = torch.empty((L, d), dtype=cdt, device=dev)
        qs = torch.empty((L, d), dtype=cdt, device=dev) if acc_q is not None else None
        acc_r = torch.zeros((L, d), dtype=torch.float64, device=dev)  # Σ(x−c)
        acc_rr = torch.zeros_like(acc_r) if acc_q is not None else None  # Σ(x−c)²
        for sl in row_blocks(n, step):
            k = sl.stop - sl.start
            gb = g[sl]
            src = T[sl] if T.dtype == cdt else T[sl].to(cdt)
            if not have.all():
                cnt = np.bincount(gcodes[sl], minlength=L)
                new = (cnt > 0) & ~have
                if new.any():  # centres of languages first met in this block
                    bsum = torch.zeros((L, d), dtype=cdt, device=dev).index_add_(0, gb, src)
                    idx = torch.from_numpy(new.nonzero()[0]).to(dev)
                    w = torch.from_numpy(cnt[new].astype(np.float64)).to(dev, cdt)
                    c[idx] = bsum[idx] / w[:, None]
                    have |= new
            xs = torch.sub(src, torch.index_select(c, 0, gb, out=gbuf[:k]), out=xbuf[:k])
            rs.zero_().index_add_(0, gb, xs)
            acc_r += rs
            if acc_q is not None:
                xs.mul_(xs)
                qs.zero_().index_add_(0, gb, xs)
                acc_rr += qs
        # ... and used exactly: the corrections are formed in float64 from c's values
        n_l = torch.from_numpy(np.bincount(gcodes, minlength=L).astype(np.float64)).to(dev)
        dm = c.to(torch.float64) - torch.from_numpy(self.shift).to(dev)
        acc_s += acc_r + n_l[:, None] * dm
        if acc_q is not None:
            acc_q += acc_rr + dm * (2.0 * acc_r + n_l[:, None] * dm)

    def _abs_sums_blocks(self, T: torch.Tensor, gcodes: np.ndarray) -> torch.Tensor:
        """Per-dimension ``Σ|x|`` on the torch path: block sums added in float64."""
        dev, cdt = T.device, compute_dtype(T.dtype)
        n, d = T.shape
        acc = torch.zeros(d, dtype=torch.float64, device=dev)
        step = min(block_rows(SUM_BLOCK, dev), n)
        xbuf = torch.empty((step, d), dtype=cdt, device=dev)
        for sl in row_blocks(n, step):
            xs = torch.abs(T[sl].to(cdt), out=xbuf[: sl.stop - sl.start])
            acc += xs.sum(0).to(torch.float64)
        return acc

    def _add_abs(self, acc_a: torch.Tensor, T: torch.Tensor, name: str) -> None:
        if not bool(torch.isfinite(acc_a).all()):
            raise_non_finite(T, name)
        self.abs_sums = self.abs_sums + acc_a.cpu().numpy()

    def _commit(self, T, gcodes, acc_s, acc_q, name) -> LanguageMoments:
        if not bool(torch.isfinite(acc_s).all()) or (
            acc_q is not None and not bool(torch.isfinite(acc_q).all())
        ):
            raise_non_finite(T, name)
        self.sums = self.sums + acc_s.cpu().numpy()
        if acc_q is not None:
            self.sumsq = self.sumsq + acc_q.cpu().numpy()
        self.counts = self.counts + np.bincount(gcodes, minlength=len(self.labels))
        return self

    def _sum_runs(self, T, runs, cdt, acc_s, acc_q) -> None:
        """Rows grouped by language (few long runs): contiguous segment reductions.

        Each run is reduced with ``torch.sum`` over a contiguous slice — the same
        multi-threaded, cascade-summed pass as ``X.sum(0)`` — instead of
        ``index_add_`` (one row at a time into its language's row). First moments
        only: one float32 sum per block of :data:`SUM_BLOCK` rows of a run.
        Compensated / second moments: each chunk c of a run is re-centred on its own
        mean m and, with the language's reference row s, ``Σ(x−s) = n(m−s) + Σ(x−m)``
        and ``Σ(x−s)² = Σ(x−m)² + 2(m−s)Σ(x−m) + n(m−s)²`` are formed in float64.
        """
        dev = T.device
        comp = self.compensated or acc_q is not None
        shift = torch.from_numpy(self.shift).to(dev)  # float64
        step = block_rows(SUM_BLOCK, dev)  # cache-sized: ~15% faster than whole runs
        if comp:  # reused: a fresh block-sized temporary costs page faults every time
            ybuf = torch.empty((min(step, T.shape[0]), T.shape[1]), dtype=cdt, device=dev)
        for start, stop, code in runs:
            seg = T[start:stop]
            if not comp:
                for sl in row_blocks(stop - start, step):
                    acc_s[code] += seg[sl].sum(0, dtype=cdt)
                acc_s[code] -= (stop - start) * shift[code]
                continue
            for sl in row_blocks(stop - start, step):
                x = seg[sl] if seg.dtype == cdt else seg[sl].to(cdt)
                k = sl.stop - sl.start
                m = x.mean(0)
                y = torch.sub(x, m, out=ybuf[:k])
                r64 = y.sum(0).to(torch.float64)
                dm = m.to(torch.float64) - shift[code]
                acc_s[code] += k * dm + r64
                if acc_q is not None:
                    acc_q[code] += y.square_().sum(0) + dm * (2.0 * r64 + k * dm)

    @classmethod
    def with_shifts(
        cls,
        labels: list[Hashable],
        shift: np.ndarray,
        *,
        second_moments: bool = False,
        compensated: bool | None = None,
        absolute: bool = False,
    ) -> LanguageMoments:
        """Empty moments for known languages with fixed reference rows.

        Moments built on the same shifts add exactly (:meth:`add`), which is how
        block-wise (dask) statistics are combined.
        """
        m = cls(second_moments=second_moments, compensated=compensated, absolute=absolute)
        m.labels = list(labels)
        m.index = {lab: i for i, lab in enumerate(m.labels)}
        m.shift = np.array(shift, dtype=np.float64, copy=True)
        m.sums = np.zeros_like(m.shift)
        m.sumsq = np.zeros_like(m.shift) if second_moments else None
        m.abs_sums = np.zeros(m.shift.shape[1]) if absolute else None
        m.counts = np.zeros(len(m.labels))
        return m

    def columns(self, cols: slice) -> LanguageMoments:
        """The moments of the feature columns ``cols`` (copies; same languages).

        Per-dimension moments of a flattened layer stack ``(n, n_layers * d)`` are the
        concatenation of each layer's moments: ``PerLayer`` accumulates them in one
        pass and hands each layer its columns.
        """
        m = type(self)(
            second_moments=self.second_moments,
            compensated=self.compensated,
            absolute=self.absolute,
        )
        m.labels = list(self.labels)
        m.index = dict(self.index)
        m.counts = self.counts.copy()
        m.input_eps = self.input_eps
        if self.shift is not None:
            m.shift = self.shift[:, cols].copy()
            m.sums = self.sums[:, cols].copy()
            if self.sumsq is not None:
                m.sumsq = self.sumsq[:, cols].copy()
            if self.abs_sums is not None:
                m.abs_sums = self.abs_sums[cols].copy()
        return m

    def add(self, other: LanguageMoments) -> LanguageMoments:
        """Add moments accumulated on the same languages and shifts (in place)."""
        if other.labels != self.labels or not np.array_equal(other.shift, self.shift):
            raise ValueError("can only add moments built on the same languages and shifts")
        self.sums += other.sums
        self.counts += other.counts
        self.input_eps = max(self.input_eps, getattr(other, "input_eps", 0.0))
        if self.sumsq is not None:
            self.sumsq += other.sumsq
        if self.abs_sums is not None:
            self.abs_sums += other.abs_sums
        return self

    # -- reading --------------------------------------------------------------
    @property
    def n_features(self) -> int:
        return 0 if self.sums is None else self.sums.shape[1]

    def means(self) -> np.ndarray:
        """Per-language means, shape (n_languages, n_features), float64."""
        return self.shift + self.sums / self.counts[:, None]

    def variances(self) -> np.ndarray:
        """Per-language population variances (ddof=0), float64, clipped at 0."""
        if not self.second_moments:
            raise RuntimeError("these moments were accumulated without second moments")
        c = self.counts[:, None]
        m = self.sums / c
        return np.maximum(self.sumsq / c - m * m, 0.0)

    def mean_abs(self) -> np.ndarray | None:
        """Per-dimension mean of ``|x|`` over all rows (None without ``absolute=True``)."""
        if self.abs_sums is None:
            return None
        return self.abs_sums / max(float(self.counts.sum()), 1.0)

    def global_mean(self) -> np.ndarray:
        """Mean over all rows of all languages."""
        return (self.shift * self.counts[:, None] + self.sums).sum(0) / self.counts.sum()

    # -- persistence ----------------------------------------------------------
    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta = {
            "labels": self.labels,
            "second_moments": self.second_moments,
            "compensated": self.compensated,
            "input_eps": self.input_eps,
            "absolute": self.absolute,
        }
        arrays = {"counts": self.counts}
        if self.shift is not None:
            arrays.update(shift=self.shift, sums=self.sums)
            if self.sumsq is not None:
                arrays["sumsq"] = self.sumsq
            if self.abs_sums is not None:
                arrays["abs_sums"] = self.abs_sums
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> LanguageMoments:
        m = cls(second_moments=meta["second_moments"], compensated=meta.get("compensated"))
        m.labels = list(meta["labels"])
        m.index = {lab: i for i, lab in enumerate(m.labels)}
        m.counts = np.asarray(arrays["counts"], dtype=np.float64)
        m.input_eps = float(meta.get("input_eps", 0.0))
        if "shift" in arrays:
            m.shift = np.asarray(arrays["shift"], dtype=np.float64)
            m.sums = np.asarray(arrays["sums"], dtype=np.float64)
            if "sumsq" in arrays:
                m.sumsq = np.asarray(arrays["sumsq"], dtype=np.float64)
        # saves from before absolute moments have none: such a fit goes on without them
        m.absolute = bool(meta.get("absolute", False)) and (
            "abs_sums" in arrays or "shift" not in arrays
        )
        if "abs_sums" in arrays and m.absolute:
            m.abs_sums = np.asarray(arrays["abs_sums"], dtype=np.float64)
        return m


class _RowStore:
    """Rows kept on the host until their partner arrives (growing buffer)."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.n = 0
        self.pos: dict[Hashable, int] = {}

    def add(self, rows: torch.Tensor, ids: list[Hashable]) -> None:
        rows = rows.detach().to("cpu")
        if self.rows is None:
            self.rows = torch.empty((max(16, rows.shape[0]), rows.shape[1]), dtype=rows.dtype)
        need = self.n + rows.shape[0]
        if need > self.rows.shape[0]:
            grown = torch.empty(
                (max(need, 2 * self.rows.shape[0]), rows.shape[1]), dtype=self.rows.dtype
            )
            grown[: self.n] = self.rows[: self.n]
            self.rows = grown
        self.rows[self.n : need] = rows.to(self.rows.dtype)
        for k, i in enumerate(ids):
            self.pos[i] = self.n + k
        self.n = need

    def lookup(self, ids: list[Hashable]) -> np.ndarray:
        get = self.pos.get
        return np.fromiter((get(i, -1) for i in ids), dtype=np.int64, count=len(ids))

    def take(self, positions: np.ndarray) -> torch.Tensor:
        return self.rows[torch.from_numpy(positions)]

    def remove(self, ids: list[Hashable]) -> None:
        for i in ids:
            del self.pos[i]
        if not self.pos:  # everything consumed: release the memory
            self.rows, self.n = None, 0


def _gather_rows(src: torch.Tensor, idx: np.ndarray, buf: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``src`` copied into the first ``len(idx)`` rows of ``buf``
    (``buf``'s device and dtype; no temporary when they are ``src``'s)."""
    out = buf[: len(idx)]
    it = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64)).to(src.device)
    if src.device == buf.device and src.dtype == buf.dtype:
        return torch.index_select(src, 0, it, out=out)
    return out.copy_(src.index_select(0, it))


class _IdCodes:
    """Integer codes for pair ids (any hashable), given to ids of buffered rows only."""

    def __init__(self) -> None:
        self.index: dict[Hashable, int] = {}

    def lookup(self, values: list) -> np.ndarray:
        """Code of each value, -1 for values never registered."""
        if not self.index:
            return np.full(len(values), -1, dtype=np.int64)
        get = self.index.get
        return np.fromiter((get(v, -1) for v in values), dtype=np.int64, count=len(values))

    def register(self, values: list) -> np.ndarray:
        """New codes for ``values`` (distinct, not yet registered)."""
        start = len(self.index)
        self.index.update(zip(values, range(start, start + len(values)), strict=True))
        return np.arange(start, start + len(values), dtype=np.int64)


class _CodedRowStore:
    """Rows kept on the host until their partner arrives, addressed by id code.

    ``pos[code]`` is the row's position in the growing buffer ``rows`` (-1: none).
    Rows are stored centred on a fixed vector, ``centre`` (float64, the value
    subtracted exactly as the stored precision rounds it), chosen at the first
    :meth:`add` — the language's running mean — so that products of stored rows
    run on small, centred numbers (see :meth:`PairMoments._accumulate`).
    """

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.centre: np.ndarray | None = None
        self.n = 0
        self.live = 0
        self.pos = np.zeros(0, dtype=np.int64)

    def position(self, codes: np.ndarray) -> np.ndarray:
        """Buffer position of each code (-1 for none or a negative code)."""
        out = np.full(codes.shape, -1, dtype=np.int64)
        ok = (codes >= 0) & (codes < self.pos.size)
        out[ok] = self.pos[codes[ok]]
        return out

    def add(self, T: torch.Tensor, rows: np.ndarray, codes: np.ndarray, centre: np.ndarray) -> None:
        """Copy rows ``rows`` of ``T`` into the buffer under ``codes``, centred.

        ``centre`` (float64) is used when the buffer is created; later rows are
        centred on the same vector.
        """
        k, d = len(rows), T.shape[1]
        if k == 0:
            return
        if self.rows is None:
            cdt = compute_dtype(T.dtype)
            self.rows = torch.empty((max(16, k), d), dtype=cdt)
            self.centre = _rounded(centre, cdt)
        need = self.n + k
        if need > self.rows.shape[0]:
            grown = torch.empty((max(need, 2 * self.rows.shape[0]), d), dtype=self.rows.dtype)
            grown[: self.n] = self.rows[: self.n]
            self.rows = grown
        block = _gather_rows(T, rows, self.rows[self.n : need])
        block.sub_(torch.from_numpy(self.centre).to(block.dtype))
        top = int(codes.max()) + 1
        if top > self.pos.size:
            grown_pos = np.full(max(top, 2 * self.pos.size), -1, dtype=np.int64)
            grown_pos[: self.pos.size] = self.pos
            self.pos = grown_pos
        self.pos[codes] = np.arange(self.n, need)
        self.n = need
        self.live += k

    def remove(self, codes: np.ndarray) -> None:
        self.pos[codes] = -1
        self.live -= len(codes)
        if not self.live:  # everything consumed: release the memory
            self.rows, self.centre, self.n = None, None, 0
            self.pos = np.zeros(0, dtype=np.int64)


def _rounded(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``v`` rounded to ``dtype`` (float32 or float64), returned as exact float64."""
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    return np.asarray(v, dtype=np.float64).astype(np_dtype).astype(np.float64)


def _factorize_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(sorted distinct ids, code of each row)``, like ``np.unique(ids,
    return_inverse=True)``; integer ids in a range not much wider than their count
    (the usual ``arange``-like sentence ids) take an O(n) table instead of a sort."""
    if ids.dtype.kind in "iu" and ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if hi - lo <= 4 * ids.size and hi <= np.iinfo(np.int64).max:
            present = np.zeros(hi - lo + 1, dtype=bool)
            off = ids.astype(np.int64) - lo
            present[off] = True
            values = np.flatnonzero(present)
            lut = np.cumsum(present, dtype=np.int64) - 1
            return (values + lo).astype(ids.dtype, copy=False), lut[off]
    values, inv = np.unique(ids, return_inverse=True)
    return values, inv.reshape(-1).astype(np.int64, copy=False)


def _has_repeats(key: np.ndarray, n_keys: int) -> bool:
    """Whether the non-negative integer ``key`` (< ``n_keys``) holds a value twice."""
    if n_keys <= 8 * key.size:
        return bool((np.bincount(key, minlength=n_keys) > 1).any())
    return np.unique(key).size < key.size


def cross_underflows(big: float, n: int, extremes: Callable[[], tuple[float, float]]) -> bool:
    """Whether float64 pair products underflowed (:data:`TINY_CROSS64`).

    Parameters
    ----------
    big : float
        Largest ``|entry|`` of the cross-product ``S = Σ (a − k_a)(b − k_b)ᵀ`` of
        ``n`` pairs of rows shifted by their reference rows ``k``.
    n : int
        The number of pairs.
    extremes : callable
        Returns ``(max|a − k_a|, max|b − k_b|)``: one more pass over the pairs,
        called only on the rare path (``big < n · TINY_CROSS64``).

    Returns
    -------
    bool
        True when the largest product ``max|a − k_a| · max|b − k_b|`` is positive but
        below :data:`TINY_CROSS64` (every product subnormal); a zero cross-product
        (e.g. rows equal to their reference row) is not an underflow.

    Notes
    -----
    ``|S_ij| ≤ n · max|a − k_a| · max|b − k_b|``, so ``big ≥ n · TINY_CROSS64``
    proves the largest product normal without looking at the rows: normal-scale
    data never take the extra pass.
    """
    if big >= n * TINY_CROSS64:
        return False
    amax, bmax = extremes()
    if amax == 0.0 or bmax == 0.0:
        return False
    return math.log2(amax) + math.log2(bmax) < math.log2(TINY_CROSS64)


def _shifted_extremes(
    blocks: Iterator[tuple[torch.Tensor, torch.Tensor, Any]], da: torch.Tensor, db: torch.Tensor
) -> tuple[float, float]:
    """``(max|a + δ_a|, max|b + δ_b|)`` over the blocks of centred pairs: the largest
    ``|a − k_a|``, ``|b − k_b|`` of the rows shifted by the reference rows (``δ = c − k``),
    from the columns' extremes (no shifted copy). One more pass: rare path only."""
    ext: list[list[torch.Tensor]] = [[], []]
    for a, b, _ in blocks:
        for i, (x, shift) in enumerate(((a, da), (b, db))):
            lo, hi = torch.aminmax(x, dim=0)
            ext[i].append(torch.maximum((lo + shift).abs(), (hi + shift).abs()))
    return tuple(float(torch.stack(e).max()) if e else 0.0 for e in ext)  # type: ignore[return-value]


def cross_range_error(lab: Hashable, *, overflow: bool) -> ValueError:
    """The error for float64 pair products out of range (same text on every path)."""
    if overflow:
        return ValueError(
            f"the products of the rows of language {lab!r} with their pivot partners "
            "overflowed float64 (rows of magnitude ~1e154 or more). The orthogonal map "
            "does not depend on the scale of the data: divide X by a constant (e.g. its "
            "largest |value|) before fitting."
        )
    return ValueError(
        f"the products of the rows of language {lab!r} with their pivot partners "
        "underflow float64 (rows of magnitude ~1e-154 or less: every product is below "
        "the smallest normal float64, 2.2e-308, and its digits are lost to subnormal "
        "numbers). The orthogonal map does not depend on the scale of the data: multiply "
        "X by a constant (e.g. 1 / its largest |value|) before fitting."
    )


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (``5``, not ``np.int64(5)``, in messages)."""
    return value.item() if isinstance(value, np.generic) else value


def input_rounding(dtype: Any) -> float:
    """The relative rounding a batch of this dtype may bring into the statistics: its ``eps``.

    Data may have been computed in their own precision before reaching us (e.g.
    centred in float32, or in float16): their language means then keep residues of
    order ``eps · |x|``, which LSAR's rank cut must not mistake for language
    directions. Half precision counts with its own ``eps`` too (float16 1e-3,
    bfloat16 8e-3): with a large common offset real differences of that order fall
    under the cut, and LSAR says so in a warning (the fix: pass float32/float64 data
    or an int ``n_components``) — rather than removing rounding noise silently
    from data centred in float16. Integers: 0. Dask arrays count with the dtype
    they arrived in (before their cast to float64).
    """
    if isinstance(dtype, torch.dtype):
        return float(torch.finfo(dtype).eps) if dtype.is_floating_point else 0.0
    npdt = np.dtype(dtype)
    return float(np.finfo(npdt).eps) if npdt.kind == "f" else 0.0


class PairMoments:
    """Cross-products between each language's rows and their pivot partners.

    For every non-pivot language ``l`` and every pair (a, b) of an ``l`` row and the
    pivot row sharing its ``pair_id``, accumulates (float64, on shifted data
    ``a' = a - shift_l``, ``b' = b - shift_pivot``)::

        n_l = #pairs,  S_l = sum a' b'^T  (d x d),  sa_l = sum a',  sb_l = sum b'

    Partners may arrive in different batches: pivot rows are kept (host memory,
    input precision, centred on a fixed vector) so later batches can match them, and
    rows whose pivot partner has not arrived yet wait in a buffer.  :meth:`release`
    drops both.

    Numerics (see :meth:`_accumulate`): blocks of :data:`BLOCK_ROWS` pairs are
    multiplied in the input precision on rows centred near their language's mean
    and added into float64 accumulators; the shift to the reference rows is a
    float64 correction, so float32 rounding is relative to the rows' spread, not to
    the languages' offsets, whatever the chunking of the stream.  float32 rows whose
    products overflow (|x| ≳ 1e19) or fall into subnormals (|x| ≲ 1e-19) are paired
    again in float64 (a d×d check decides; normal scales never pay for it); float64
    rows beyond float64's range of products (≳ 1e154; ≲ 1e-154, where every product
    is subnormal: :data:`TINY_CROSS64`) raise a ``ValueError`` asking for a rescale
    (the orthogonal maps are scale-free), on the numpy and the dask path alike.
    """

    def __init__(self, pivot: Hashable):
        self.pivot = pivot
        self.count: dict[Hashable, int] = {}
        self.S: dict[Hashable, np.ndarray] = {}
        self.sa: dict[Hashable, np.ndarray] = {}
        self.sb: dict[Hashable, np.ndarray] = {}
        # pair ids are matched as integer codes: a batch's ids are factorised once
        # (np.unique), and only ids of buffered rows get a global code (_ids)
        self._ids = _IdCodes()
        self._pivot_rows = _CodedRowStore()
        self._pending: dict[Hashable, _CodedRowStore] = {}
        # per non-pivot language, the id codes whose row is already paired (a later row
        # of that language with the same id is a duplicate, as in one fit)
        self._paired: dict[Hashable, np.ndarray] = {}
        self.released = False

    def n_pending(self) -> dict[Hashable, int]:
        """Rows still waiting for a pivot partner, per language."""
        return {lab: st.live for lab, st in self._pending.items() if st.live}

    def _accumulate(
        self,
        lab,
        dev: torch.device,
        src_a: torch.Tensor,
        idx_a: np.ndarray,
        centre_a: np.ndarray,
        stored_a: bool,
        pos_b: np.ndarray,
        shift_a: np.ndarray,
        shift_b: np.ndarray,
        work: dict,
        cdt: torch.dtype | None = None,
    ) -> None:
        """Add pairs: rows ``idx_a`` of ``src_a`` with the pivot rows at ``pos_b``.

        Compensated float32 (as in :class:`LanguageMoments`): the products run on
        rows centred on a fixed vector near their language's mean, ``c_a`` and the
        pivot store's ``c_b`` — ``src_a``'s rows already are when ``stored_a`` (a row
        store), otherwise they are centred here, block by block — and with the
        reference rows ``k_a``, ``k_b`` the float64 accumulators are corrected once
        (``δ_a = c_a − k_a``, ``r_a = Σ(a − c_a)``, likewise for b)::

            Σ(a−k_a)(b−k_b)ᵀ = Σ(a−c_a)(b−c_b)ᵀ + δ_a r_bᵀ + r_a δ_bᵀ + n δ_a δ_bᵀ

        so the float32 rounding is relative to the spread of the rows, not to their
        distance from the reference rows.  Pairs are taken in the order of their
        pivot rows: where those are consecutive in the store (every pivot row has a
        partner, as in a parallel corpus) a block is a view of the store, and its
        sums are shared by all languages; only the ``a`` rows are gathered.  ``work``
        (one per :meth:`update`) keeps those sums and the block buffers.

        Scale: float32 products overflow for rows of magnitude ~1e19 and fall into
        subnormals (digits lost, down to 0) below ~1e-19, while the orthogonal map is
        scale-free.  One check on the d×d result (not on the rows) catches both: if
        its largest ``|entry|`` is inf/NaN or below :data:`TINY_CROSS`, or a row sum
        is not finite, the pairs of this call are formed again in float64 (``cdt``),
        where the products of any float32 values are in range.  Normal-scale data
        never take that path.  float64 rows whose products overflow (≳1e154) or
        underflow (≲1e-154: the largest product ``max|a − k_a|·max|b − k_b|`` of the rows
        shifted by the reference rows below :data:`TINY_CROSS64`, decided by
        :func:`cross_underflows` on the shifted d×d cross-product, with one more pass
        over the pairs only when its largest entry is below ``n·TINY_CROSS64``) cannot
        be accumulated in float64: a ``ValueError`` names the fix (rescale ``X``).
        """
        piv = self._pivot_rows
        cdt = compute_dtype(src_a.dtype) if cdt is None else cdt
        order = np.argsort(pos_b, kind="stable")
        idx_a, pos_b = idx_a[order], pos_b[order]
        if stored_a:
            ca, sub = centre_a, None
        else:
            ca = _rounded(centre_a, cdt)
            sub = torch.from_numpy(ca).to(dev, cdt)
        n, d = len(idx_a), src_a.shape[1]
        step = max(1, min(block_rows(BLOCK_ROWS, dev), n))

        def buffer(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            # reused by every language of the batch (fresh ones cost page faults)
            buf = work.get((name, cdt))
            if buf is None or buf.shape[0] < shape[0]:
                buf = work[(name, cdt)] = torch.empty(shape, dtype=cdt, device=dev)
            return buf

        abuf = buffer("a", (step, d))
        Sb = buffer("S", (d, d))
        S = torch.zeros((d, d), dtype=torch.float64, device=dev)
        sa = torch.zeros(d, dtype=torch.float64, device=dev)
        sb = torch.zeros(d, dtype=torch.float64, device=dev)

        def blocks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            """``(a − c_a, b − c_b, Σ(b − c_b))`` per block of pairs, in ``cdt``."""
            for sl in row_blocks(n, step):
                a = _gather_rows(src_a, idx_a[sl], abuf)
                if sub is not None:
                    a.sub_(sub)
                p = pos_b[sl]
                m, lo = len(p), int(p[0])
                if int(p[-1]) - lo == m - 1:  # sorted distinct positions: consecutive rows
                    b = piv.rows[lo : lo + m]
                    if b.dtype != cdt or b.device != dev:
                        b = buffer("b", (step, d))[:m].copy_(b)
                    key = ("sum", lo, m, cdt)
                    rb = work.get(key)
                    if rb is None:
                        rb = work[key] = b.sum(0).to(torch.float64)
                else:
                    b = _gather_rows(piv.rows, p, buffer("b", (step, d)))
                    rb = b.sum(0).to(torch.float64)
                yield a, b, rb

        for a, b, rb in blocks():
            # block products and sums in the block's precision (torch's
            # float64-accumulating sum of float32 is ~50x slower), added in float64
            S += torch.mm(a.T, b, out=Sb)
            sa += a.sum(0).to(torch.float64)
            sb += rb
        # d×d and d-vector checks: did the products overflow, or stay so small that
        # subnormal rounding took their digits?
        lo, hi = torch.aminmax(S)  # NaN propagates
        big = max(-float(lo), float(hi))
        finite = math.isfinite(big) and bool(torch.isfinite(sa).all() & torch.isfinite(sb).all())
        if cdt != torch.float64 and not (finite and big >= TINY_CROSS):
            # float32 rows: in float64 all their products are in range (rare path)
            self._accumulate(
                lab,
                dev,
                src_a,
                idx_a,
                centre_a,
                stored_a,
                pos_b,
                shift_a,
                shift_b,
                work,
                cdt=torch.float64,
            )
            return
        if not finite:
            raise cross_range_error(lab, overflow=True)
        da = torch.from_numpy(ca - shift_a).to(dev)
        db = torch.from_numpy(piv.centre - shift_b).to(dev)
        S += torch.outer(da, sb + n * db) + torch.outer(sa, db)
        sa += n * da
        sb += n * db
        # underflow, decided on S = Σ(a−k_a)(b−k_b)ᵀ of the rows shifted by the reference
        # rows: the cross-product the dask path forms, so both paths raise alike
        if cdt == torch.float64:
            lo, hi = torch.aminmax(S)
            big = max(-float(lo), float(hi))
            if cross_underflows(big, n, lambda: _shifted_extremes(blocks(), da, db)):
                raise cross_range_error(lab, overflow=False)
        if lab not in self.S:
            self.S[lab] = np.zeros((d, d))
            self.sa[lab] = np.zeros(d)
            self.sb[lab] = np.zeros(d)
            self.count[lab] = 0
        self.S[lab] += S.cpu().numpy()
        self.sa[lab] += sa.cpu().numpy()
        self.sb[lab] += sb.cpu().numpy()
        self.count[lab] += n

    def check(self, labels: np.ndarray, codes: np.ndarray, pair_ids: np.ndarray) -> tuple:
        """Validate a batch's pair ids against itself and earlier batches; change nothing.

        Raises ``ValueError`` for a pair_id repeated within one language, in this
        batch or against rows kept from earlier batches. Returns what :meth:`update`
        needs, so that a batch is either rejected before any statistic changes or
        accumulated whole.
        """
        lab_list = _labels_list(labels)
        pid_labels, pid_codes = _factorize_ids(pair_ids)
        codes = np.asarray(codes, dtype=np.int64)
        key = codes * len(pid_labels) + pid_codes
        if len(key) and _has_repeats(key, len(lab_list) * len(pid_labels)):
            uniq, first, cnt = np.unique(key, return_index=True, return_counts=True)
            bad = first[np.argmax(cnt > 1)]
            raise ValueError(
                f"pair_id {_plain(pair_ids[bad])!r} occurs {cnt.max()} times in language "
                f"{lab_list[codes[bad]]!r}; within one language each pair_id must be unique "
                "(rows sharing a pair_id are translations in different languages)."
            )
        id_values = pid_labels.tolist()
        # global code of each of the batch's distinct ids (-1: never buffered)
        gid = self._ids.lookup(id_values)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(lab_list) + 1))
        for c, lab in enumerate(lab_list):
            u = pid_codes[order[bounds[c] : bounds[c + 1]]]
            if u.size == 0:
                continue
            g = gid[u]
            if lab == self.pivot:
                clash = self._pivot_rows.position(g) >= 0
            else:
                store = self._pending.get(lab)
                clash = self._was_paired(lab, g)
                if store is not None and store.live:
                    clash |= store.position(g) >= 0
            if clash.any():
                which = "pivot language" if lab == self.pivot else "language"
                raise ValueError(
                    f"pair_id {_plain(id_values[u[np.argmax(clash)]])!r} of {which} {lab!r} was "
                    "already seen in an earlier batch; each pair_id must be unique within "
                    "a language."
                )
        return lab_list, pid_codes, id_values, gid, codes, order, bounds

    def update(
        self,
        T: torch.Tensor,
        labels: np.ndarray,
        codes: np.ndarray,
        pair_ids: np.ndarray,
        shifts: LanguageMoments,
        _prepared: tuple | None = None,
    ) -> PairMoments:
        """Match this batch's rows with pivot partners and accumulate their products.

        ``shifts`` must already include this batch (it provides each language's
        reference row). ``_prepared`` is :meth:`check`'s result for this batch (the
        caller validates before it changes any statistics).
        """
        if self.released:
            # continuing after fit() or a load: the statistics go on, but the earlier
            # rows are gone, so only partners in this and later batches can be matched
            warnings.warn(
                "continuing a Procrustes fit whose earlier rows are not kept (fit() drops "
                "its row buffers, save() does not store them, and dask batches are paired "
                "within themselves): rows of this and later "
                "partial_fit batches are paired only with partners in those batches. To "
                "pair rows across batches, stream every batch with partial_fit() in one "
                "session.",
                UserWarning,
                stacklevel=4,
            )
            self.released = False
        prep = _prepared if _prepared is not None else self.check(labels, codes, pair_ids)
        lab_list, pid_codes, id_values, gid, codes, order, bounds = prep
        dev = T.device
        piv_code = lab_list.index(self.pivot) if self.pivot in lab_list else -1
        # the centres of the rows: running means, this batch included
        means = shifts.shift + shifts.sums / np.maximum(shifts.counts, 1)[:, None]
        work: dict = {}  # block buffers and pivot-block sums, shared by the languages
        if piv_code >= 0:
            prow = order[bounds[piv_code] : bounds[piv_code + 1]]
            u = pid_codes[prow]
            g = self._register(gid, u, id_values)
            self._pivot_rows.add(T, prow, g, means[shifts.index[self.pivot]])
            # rows from earlier batches that were waiting for these pivot rows
            for lab, store in self._pending.items():
                if not store.live:
                    continue
                ppos = store.position(g)
                waiting = ppos >= 0
                if waiting.any():
                    gw = g[waiting]
                    i_l, i_p = shifts.index[lab], shifts.index[self.pivot]
                    self._accumulate(
                        lab,
                        dev,
                        store.rows,
                        ppos[waiting],
                        store.centre,
                        True,
                        self._pivot_rows.pos[gw],
                        shifts.shift[i_l],
                        shifts.shift[i_p],
                        work,
                    )
                    store.remove(gw)
                    self._mark_paired(lab, gw)
        for c, lab in enumerate(lab_list):
            if c == piv_code:
                continue
            rows = order[bounds[c] : bounds[c + 1]]
            if rows.size == 0:
                continue
            u = pid_codes[rows]
            g = gid[u]
            store = self._pending.get(lab)
            pos = self._pivot_rows.position(g)
            hit = pos >= 0
            if hit.any():
                i_l, i_p = shifts.index[lab], shifts.index[self.pivot]
                self._accumulate(
                    lab,
                    dev,
                    T,
                    rows[hit],
                    means[i_l],
                    False,
                    pos[hit],
                    shifts.shift[i_l],
                    shifts.shift[i_p],
                    work,
                )
                self._mark_paired(lab, g[hit])
            if not hit.all():
                miss = ~hit
                gm = self._register(gid, u[miss], id_values)
                if store is None:
                    store = self._pending[lab] = _CodedRowStore()
                store.add(T, rows[miss], gm, means[shifts.index[lab]])
        return self

    def _was_paired(self, lab: Hashable, g: np.ndarray) -> np.ndarray:
        """Whether each id code ``g`` of language ``lab`` already has a paired row."""
        seen = self._paired.get(lab)
        out = np.zeros(g.shape, dtype=bool)
        if seen is not None:
            ok = (g >= 0) & (g < seen.size)
            out[ok] = seen[g[ok]]
        return out

    def _mark_paired(self, lab: Hashable, g: np.ndarray) -> None:
        if g.size == 0:
            return
        seen = self._paired.get(lab)
        need = int(g.max()) + 1
        if seen is None or seen.size < need:
            grown = np.zeros(max(need, 2 * (0 if seen is None else seen.size)), dtype=bool)
            if seen is not None:
                grown[: seen.size] = seen
            seen = self._paired[lab] = grown
        seen[g] = True

    def _register(self, gid: np.ndarray, u: np.ndarray, id_values: list) -> np.ndarray:
        """Global codes of the batch ids ``u``, assigning new ones (``gid`` updated)."""
        g = gid[u]
        new = g < 0
        if new.any():
            un = np.unique(u[new])
            gid[un] = self._ids.register([id_values[j] for j in un.tolist()])
            g = gid[u]
        return g

    def add_moments(
        self, lab: Hashable, S: np.ndarray, sa: np.ndarray, sb: np.ndarray, n: int
    ) -> None:
        """Add pair moments computed elsewhere (same shifts), e.g. by dask."""
        if lab not in self.S:
            d = S.shape[0]
            self.S[lab], self.sa[lab], self.sb[lab] = np.zeros((d, d)), np.zeros(d), np.zeros(d)
            self.count[lab] = 0
        self.S[lab] += S
        self.sa[lab] += sa
        self.sb[lab] += sb
        self.count[lab] += int(n)

    def has_buffers(self) -> bool:
        """Whether rows are buffered for matching with later batches."""
        return self._pivot_rows.live > 0 or any(st.live for st in self._pending.values())

    def release(self) -> None:
        """Drop the row buffers (no further batches will be matched)."""
        self._ids = _IdCodes()
        self._pivot_rows = _CodedRowStore()
        self._pending = {}
        self._paired = {}
        self.released = True

    def cross_covariance(
        self,
        lab: Hashable,
        mean_a: np.ndarray | None,
        mean_b: np.ndarray | None,
        shift_a: np.ndarray,
        shift_b: np.ndarray,
    ) -> np.ndarray:
        """``sum (a - mean_a)(b - mean_b)^T`` over the pairs of ``lab`` (zero means if None)."""
        S, sa, sb, n = self.S[lab], self.sa[lab], self.sb[lab], self.count[lab]
        ma = -shift_a if mean_a is None else mean_a - shift_a
        mb = -shift_b if mean_b is None else mean_b - shift_b
        # S − ma sbᵀ − sa mbᵀ + n ma mbᵀ, as two outer products
        return S - np.outer(ma, sb - n * mb) - np.outer(sa, mb)

    def state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        labs = list(self.S)
        meta = {"pivot": self.pivot, "labels": labs, "count": [self.count[lab] for lab in labs]}
        arrays = {}
        for k, lab in enumerate(labs):
            arrays[f"S{k}"], arrays[f"sa{k}"], arrays[f"sb{k}"] = (
                self.S[lab],
                self.sa[lab],
                self.sb[lab],
            )
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> PairMoments:
        p = cls(meta["pivot"])
        for k, lab in enumerate(meta["labels"]):
            p.S[lab] = np.asarray(arrays[f"S{k}"], dtype=np.float64)
            p.sa[lab] = np.asarray(arrays[f"sa{k}"], dtype=np.float64)
            p.sb[lab] = np.asarray(arrays[f"sb{k}"], dtype=np.float64)
            p.count[lab] = int(meta["count"][k])
        p.released = True
        return p
