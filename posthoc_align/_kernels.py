"""Fused CPU loops: per-language moments and per-language affine maps in one pass.

On the CPU, torch and numpy have no single operation for "add each row into its
language's accumulator" or "subtract each row's language vector": built from
primitives (a gather, a subtraction, ``index_add_``, a square, another
``index_add_``) a standardisation fit reads its data five times, in cache-sized
blocks.  These loops do it in one pass over the rows, compiled with numba:

* :func:`language_moments` — per-language sums of ``x − s_l`` and of its squares,
  every term formed and added in float64 (more accurate than the compensated float32
  of the torch path, and as fast as one ``X.sum(0)`` on a 2-core EPYC);
* :func:`affine_rows` — ``(x − a_l) · b_l + c`` per row with a finiteness check of
  the written values, one read of ``X`` and one write of the output;
* :func:`project_rows` — ``x − ((x − c) Bᵀ) B`` for a low-rank ``B`` (LSAR), the same
  single pass.

Rows are split into contiguous ranges, one per thread (``torch.get_num_threads()``
threads; each range writes its own pages of the output and has its own float64
accumulators, summed in a fixed order at the end).  Used for CPU tensors of float32
or float64 when numba is importable; the torch kernels remain for CUDA, other dtypes,
and machines without numba.  ``POSTHOC_ALIGN_NUMBA=0`` in the environment turns the
loops off (the torch path then runs on the CPU too).

Examples
--------
>>> import numpy as np, torch
>>> from posthoc_align import _kernels
>>> X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0]])
>>> g = np.array([0, 0, 1])
>>> if _kernels.usable(X):
...     S, Q = _kernels.language_moments(X, g, np.zeros((2, 2)), second=True)
...     print(S.tolist(), Q.tolist())
... else:
...     print([[4.0, 6.0], [10.0, 10.0]], [[10.0, 20.0], [100.0, 100.0]])
[[4.0, 6.0], [10.0, 10.0]] [[10.0, 20.0], [100.0, 100.0]]
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import torch

__all__ = ["affine_rows", "language_moments", "project_rows", "usable", "MAX_LOOP_RANK"]

#: Largest rank whose projection runs in the loops: per row, k dot products and k
#: updates in cache (0.19 s at k = 7 on 200000 x 768 float32, 2-core EPYC, against
#: 0.37 s for blocked GEMMs); above ~12 the GEMMs win (k = 99: 2.4 s vs 0.59 s).
MAX_LOOP_RANK = 12

#: Below this many rows per thread, one thread does all the rows (thread start-up
#: would cost more than it saves). Rows, not elements: the split, and so the float64
#: summation order, does not depend on the number of columns (a layer stack
#: flattened to (n, k·d) sums each column exactly as its layer alone would).
MIN_ROWS_PER_THREAD = 2048

_DTYPES = (torch.float32, torch.float64)
_loops: ModuleType | None = None
_failed = False


def _compiled() -> ModuleType | None:
    """The numba module of loops, or None when numba cannot be used here."""
    global _loops, _failed
    if _loops is None and not _failed:
        try:
            from . import _numba_loops

            _smoke(_numba_loops)
            _loops = _numba_loops
        except ImportError:
            _failed = True
        except Exception as exc:  # e.g. no writable cache location for numba
            _failed = True
            warnings.warn(
                f"numba loops unavailable ({type(exc).__name__}: {exc}); "
                "using the torch kernels instead",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loops


def _smoke(loops: ModuleType) -> None:
    """Run every loop once on tiny float32 and float64 arrays (compiling or loading
    them), so a numba that cannot compile here fails now — and the torch kernels take
    over — rather than in the middle of a fit."""
    g = np.zeros(2, np.int64)
    for dt in (np.float32, np.float64):
        X = np.ones((2, 3), dt)
        out = np.empty_like(X)
        S = np.zeros((1, 3))
        loops.moments_rows(X, g, S, S.copy(), S.copy(), 0, 2, True)
        ok = loops.affine_rows(X, g, X[:1], X[:1], X[0], out, 0, 2)
        ok += loops.project_rows(X, X[:1], X[0], out, 0, 2)
        if ok != 0.0:
            raise RuntimeError("the compiled loops gave a wrong answer on a smoke test")


def enabled() -> bool:
    """Whether the compiled loops run (numba importable and not switched off)."""
    if os.environ.get("POSTHOC_ALIGN_NUMBA", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return _compiled() is not None


def usable(*tensors: torch.Tensor | None) -> bool:
    """True when the loops can serve these tensors: CPU, float32/float64, one dtype,
    2-D, and the loops enabled (``None`` entries are skipped)."""
    ts = [t for t in tensors if t is not None]
    if not ts or not enabled():
        return False
    dt = ts[0].dtype
    return all(t.device.type == "cpu" and t.dtype == dt and t.ndim == 2 for t in ts) and (
        dt in _DTYPES
    )


#: Bytes of per-thread float64 accumulators (threads x L x d) a moments pass may use;
#: with many languages and many cores, fewer threads are used rather than more memory.
ACCUMULATOR_BUDGET = 64 << 20


def _ranges(n: int, per_thread_bytes: int = 0) -> list[tuple[int, int]]:
    threads = max(1, min(torch.get_num_threads(), n // MIN_ROWS_PER_THREAD))
    if per_thread_bytes:
        threads = max(1, min(threads, ACCUMULATOR_BUDGET // per_thread_bytes))
    bounds = np.linspace(0, n, threads + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _run(fn, ranges: list[tuple[int, int]]) -> list:
    """``fn(k, lo, hi)`` for every k-th range, side by side (the first on this thread)."""
    if len(ranges) == 1:
        return [fn(0, *ranges[0])]
    with ThreadPoolExecutor(len(ranges) - 1) as ex:
        futures = [ex.submit(fn, k, lo, hi) for k, (lo, hi) in enumerate(ranges) if k]
        first = fn(0, *ranges[0])
        return [first, *(f.result() for f in futures)]


def _host(T: torch.Tensor) -> np.ndarray:
    return T.detach().numpy()


def _codes(gcodes: np.ndarray, n_langs: int) -> np.ndarray:
    """``gcodes`` as int64, checked to index ``n_langs`` rows (the compiled loops do
    not bounds-check, and a negative index would silently wrap around)."""
    g = np.ascontiguousarray(gcodes, dtype=np.int64)
    if g.size and (int(g.min()) < 0 or int(g.max()) >= n_langs):
        raise IndexError(
            f"language codes span [{int(g.min())}, {int(g.max())}] but statistics exist for "
            f"{n_langs} language(s)"
        )
    return g


def language_moments(
    T: torch.Tensor, gcodes: np.ndarray, shift: np.ndarray, *, second: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-language ``Σ(x − shift[l])`` and ``Σ(x − shift[l])²``, float64.

    Parameters
    ----------
    T : CPU tensor of shape (n, d), float32 or float64
        Rows (may be a strided view, e.g. a layer of a stack); not modified.
    gcodes : ndarray of shape (n,)
        Language index of each row, in ``range(L)``.
    shift : ndarray of shape (L, d)
        Reference row of each language (float64).
    second : bool
        Also return the sums of squares.

    Returns
    -------
    S, Q : ndarray of shape (L, d) (``Q`` None unless ``second``)
    """
    loops = _compiled()
    X = _host(T)
    n, d = X.shape
    sh = np.ascontiguousarray(shift, dtype=np.float64)
    L = sh.shape[0]
    g = _codes(gcodes, L)
    ranges = _ranges(n, L * d * 8 * (2 if second else 1)) or [(0, 0)]
    S = np.zeros((len(ranges), L, d))
    Q = np.zeros((len(ranges), L, d)) if second else S

    _run(lambda k, lo, hi: loops.moments_rows(X, g, sh, S[k], Q[k], lo, hi, second), ranges)
    return S.sum(0), (Q.sum(0) if second else None)


def language_abs_moments(
    T: torch.Tensor, gcodes: np.ndarray, shift: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-language ``Σ(x − shift[l])`` (float64) and per-dimension ``Σ|x|`` over all
    rows, in one pass.

    Parameters and layout as :func:`language_moments` (first moments only); the
    second result has shape (n_features,).
    """
    loops = _compiled()
    X = _host(T)
    n, d = X.shape
    sh = np.ascontiguousarray(shift, dtype=np.float64)
    L = sh.shape[0]
    g = _codes(gcodes, L)
    ranges = _ranges(n, L * d * 8) or [(0, 0)]
    S = np.zeros((len(ranges), L, d))
    A = np.zeros((len(ranges), d))
    _run(lambda k, lo, hi: loops.moments_abs_rows(X, g, sh, S[k], A[k], lo, hi), ranges)
    return S.sum(0), A.sum(0)


def affine_rows(
    T: torch.Tensor,
    gcodes: np.ndarray,
    out: torch.Tensor,
    *,
    shift: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
) -> bool:
    """``out = (T − shift[g]) · scale[g] + offset`` row-wise; True if all finite.

    ``shift``/``scale`` are (L, d) and ``offset`` (d,) tensors in ``T``'s dtype
    (absent parts act as 0, 1 and 0); ``out`` is a CPU tensor of ``T``'s shape and
    dtype, possibly a strided view.
    """
    loops = _compiled()
    X = _host(T)
    Y = out.numpy()
    n, d = X.shape
    dt = X.dtype
    g = np.ascontiguousarray(gcodes, dtype=np.int64)
    L = int(g.max()) + 1 if n else 1
    a = np.zeros((L, d), dt) if shift is None else np.ascontiguousarray(_host(shift))
    b = np.ones((L, d), dt) if scale is None else np.ascontiguousarray(_host(scale))
    c = np.zeros(d, dt) if offset is None else np.ascontiguousarray(_host(offset))
    g = _codes(g, min(a.shape[0], b.shape[0]))
    if a.shape[1:] != (d,) or b.shape[1:] != (d,) or c.shape != (d,) or Y.shape != X.shape:
        raise ValueError("shift/scale/offset/out do not match the rows' width")
    if n == 0:
        return True
    bad = _run(lambda k, lo, hi: loops.affine_rows(X, g, a, b, c, Y, lo, hi), _ranges(n))
    return bool(np.isfinite(sum(bad)))


def project_rows(
    T: torch.Tensor, basis: torch.Tensor, out: torch.Tensor, *, center: torch.Tensor | None = None
) -> bool:
    """``out = T − ((T − center) Bᵀ) B`` row-wise (``B``: k×d, orthonormal rows, in
    ``T``'s dtype); True if every written value is finite."""
    loops = _compiled()
    X = _host(T)
    Y = out.numpy()
    n, d = X.shape
    B = np.ascontiguousarray(_host(basis))
    c = np.zeros(d, X.dtype) if center is None else np.ascontiguousarray(_host(center))
    if B.ndim != 2 or B.shape[1] != d or c.shape != (d,) or Y.shape != X.shape:
        raise ValueError("basis/center/out do not match the rows' width")
    if n == 0:
        return True
    bad = _run(lambda k, lo, hi: loops.project_rows(X, B, c, Y, lo, hi), _ranges(n))
    return bool(np.isfinite(sum(bad)))
