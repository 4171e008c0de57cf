"""The compiled loops behind :mod:`posthoc_align._kernels` (numba, imported lazily).

Each function handles the rows ``lo:hi`` of its arrays and releases the GIL, so
:mod:`posthoc_align._kernels` runs a few of them side by side on disjoint row
ranges.  Compiled on first use for the argument types met and cached on disk
(``cache=True``), so a process pays the compilation once per machine.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def moments_rows(X, g, shift, S, Q, lo, hi, second):  # pragma: no cover - compiled
    """``S[l] += x - shift[l]`` (and ``Q[l] += (x - shift[l])**2``) for rows lo:hi.

    Every term is formed and added in float64 (``S``, ``Q`` and ``shift`` are
    float64), one row after another: the accumulation order per column is the row
    order, whatever the number of columns.
    """
    d = X.shape[1]
    for i in range(lo, hi):
        lang = g[i]
        row = X[i]
        s = S[lang]
        sh = shift[lang]
        if second:
            q = Q[lang]
            for j in range(d):
                v = np.float64(row[j]) - sh[j]
                s[j] += v
                q[j] += v * v
        else:
            for j in range(d):
                s[j] += np.float64(row[j]) - sh[j]


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _add_abs(b, row):  # pragma: no cover - compiled
    """``b += |row|`` (vectorised: reassociation only, in this function alone)."""
    for j in range(row.shape[0]):
        b[j] += abs(row[j])


@numba.njit(nogil=True, cache=True)
def moments_abs_rows(X, g, shift, S, A, lo, hi):  # pragma: no cover - compiled
    """``S[l] += x - shift[l]`` (float64 terms, as :func:`moments_rows`) and
    ``A += |x|`` over all rows, for rows lo:hi.

    ``A`` (per-dimension first absolute moments) measures the magnitude of the
    values whose rounding the means inherit (LSAR's rank cut); a rough scale, so it
    is summed in the input precision over runs of 256 rows, then in float64.
    """
    d = X.shape[1]
    b = np.zeros(d, X.dtype)
    run = 0
    for i in range(lo, hi):
        lang = g[i]
        row = X[i]
        s = S[lang]
        sh = shift[lang]
        for j in range(d):
            s[j] += np.float64(row[j]) - sh[j]
        _add_abs(b, row)
        run += 1
        if run == 256:
            for j in range(d):
                A[j] += b[j]
                b[j] = 0
            run = 0
    for j in range(d):
        A[j] += b[j]


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _nan_if_non_finite(o):  # pragma: no cover - compiled
    """0 when every entry of ``o`` is finite, NaN otherwise (``inf * 0`` is NaN).

    Only reassociation is allowed (so the sum vectorises); NaN semantics are kept.
    """
    z = o[0] * 0
    for j in range(1, o.shape[0]):
        z += o[j] * 0
    return z


@numba.njit(nogil=True, cache=True)
def affine_rows(X, g, shift, scale, offset, out, lo, hi):  # pragma: no cover - compiled
    """``out[i] = (X[i] - shift[g[i]]) * scale[g[i]] + offset`` for rows lo:hi.

    Returns 0.0, or NaN when any written value is NaN or infinite. Evaluated in the
    arrays' precision as three separately rounded operations (no fused multiply-add),
    as the torch kernels do.
    """
    d = X.shape[1]
    bad = 0.0
    if d == 0:
        return bad
    for i in range(lo, hi):
        lang = g[i]
        row = X[i]
        o = out[i]
        a = shift[lang]
        b = scale[lang]
        for j in range(d):
            o[j] = (row[j] - a[j]) * b[j] + offset[j]
        bad += _nan_if_non_finite(o)
    return bad


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _centred_dot(x, c, b):  # pragma: no cover - compiled
    """``Σ_j (x_j − c_j) b_j`` in the arrays' precision (vectorised: reassociation
    only, NaN semantics kept)."""
    z = x[0] * 0
    for j in range(x.shape[0]):
        z += (x[j] - c[j]) * b[j]
    return z


@numba.njit(nogil=True, cache=True)
def project_rows(X, B, c, out, lo, hi):  # pragma: no cover - compiled
    """``out[i] = X[i] − ((X[i] − c) Bᵀ) B`` for rows lo:hi (``B``: k×d, low rank).

    Returns 0.0, or NaN when any written value is NaN or infinite.
    """
    k, d = B.shape
    bad = 0.0
    if d == 0:
        return bad
    coef = np.empty(max(k, 1), X.dtype)
    for i in range(lo, hi):
        x = X[i]
        o = out[i]
        for r in range(k):
            coef[r] = _centred_dot(x, c, B[r])
        for j in range(d):
            o[j] = x[j]
        for r in range(k):
            cr = coef[r]
            br = B[r]
            for j in range(d):
                o[j] -= cr * br[j]
        bad += _nan_if_non_finite(o)
    return bad
