"""Fit/transform speed and peak memory of the posthoc_align estimators.

Every estimator is timed (best of ``--repeat`` rounds, after a warm-up) beside two
baselines measured in the same run and on the same data:

* the machine's **ceiling** for that work: the one BLAS/ufunc call that a perfect
  implementation could not beat (a ``X.sum(0)`` pass for mean/variance fits,
  ``np.subtract(X, v, out=buf)`` for elementwise transforms, the ``A.T @ B`` GEMMs
  of the paired rows for Procrustes fits, ``X @ W`` for rotations, rank-k
  ``X @ B.T @ B`` for LSAR).  Each ceiling runs in numpy and in torch during the
  warm-up; the faster library is used for the timed rounds;
* a **loop** baseline: a straightforward re-implementation of the research code,
  a Python loop over languages with boolean masks (``X[langs == l].mean(0)``,
  ``scipy.linalg.orthogonal_procrustes`` on gathered pairs, ``out[m] = X[m] - mu``).

Rounds are interleaved (ours, ceiling, loop, then again) so that load from other
processes hits the three alike.  Peak memory is measured per estimator in a fresh
subprocess (this script with the hidden ``--one`` flag): the peak RSS after one fit
and one transform minus the peak once the data is generated, over the input size.
The peak is the kernel's high-water mark (VmHWM, what ``ru_maxrss`` reports without
the floor a child inherits from its parent at exec), reset after data generation.

The loop baseline's outputs double as a smoke guard: every estimator's transform
must match the loop's output, else the script prints ``CHECK FAILED`` and exits 1.

Usage::

    python benchmarks/bench_fit.py                  # 200k x 768, 8 and 100 languages
    python benchmarks/bench_fit.py --quick          # ~10x smaller smoke run (< 20 s idle)
    python benchmarks/bench_fit.py --output bench_results/fit.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
import sklearn
import torch

REPO = Path(__file__).resolve().parents[1]

#: Targets from the performance issue.
FIT_VS_CEILING = 1.5
TRANSFORM_VS_CEILING = 2.0
LOOP_SPEEDUP_MANY = 5.0
PEAK_VS_INPUT = 2.0

#: (kind, data case) per benchmark row, in table order.
SPECS = [
    ("center", "flat"),
    ("std", "flat"),
    ("std_batch", "flat"),
    ("procrustes", "flat"),
    ("lsar", "flat"),
    ("rotate", "layered"),
    ("perlayer", "layered"),
    ("center", "many"),
    ("std", "many"),
    ("std_batch", "many"),
    ("procrustes", "many"),
    ("lsar", "many"),
]

NAMES = {
    "center": "LanguageMeanCentering",
    "std": "LanguageStandardizer(fitted)",
    "std_batch": "LanguageStandardizer(batch)",
    "procrustes": 'ProcrustesAligner(pivot="en")',
    "lsar": "LSAR",
    "rotate": "RotateAlign(last {k} layers)",
    "perlayer": "PerLayer(LanguageMeanCentering())",
}

#: Relative tolerance of the smoke guard (max |ours - loop| / max |loop|).
CHECK_TOL = {"procrustes": 1e-2, "rotate": 1e-2}
DEFAULT_TOL = 1e-3

SEEDS = {"flat": 0, "layered": 1, "many": 2}


def load_library():
    """Import posthoc_align from this checkout (it need not be installed)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    return importlib.import_module("posthoc_align")


# --------------------------------------------------------------------------- data
@dataclass
class Data:
    X: np.ndarray  # (n, d) or (n, n_layers, d), float32
    langs: np.ndarray  # (n,) str
    pids: np.ndarray  # (n,) int64: id of the translation (same id = same sentence)
    pivot: str
    n_ids: int

    @property
    def nbytes(self) -> int:
        return self.X.nbytes + self.langs.nbytes + self.pids.nbytes

    def subset(self, k: int) -> Data:
        """Rows whose pair id is below ``k`` (every pair stays complete)."""
        m = self.pids < k
        return Data(np.ascontiguousarray(self.X[m]), self.langs[m], self.pids[m], self.pivot, k)


def lang_names(n_langs: int) -> list[str]:
    base = ["en", "de", "fr", "es", "zh", "ar", "ru", "hi", "ja", "sw"]
    if n_langs <= len(base):
        return base[:n_langs]
    return ["en"] + [f"l{i:03d}" for i in range(1, n_langs)]


def make_data(n_ids: int, n_langs: int, tail: tuple[int, ...], seed: int) -> Data:
    """``n_langs`` languages x ``n_ids`` translations, rows shuffled (not in blocks).

    Pivot ("en") rows are Gaussian; every other language's row is its pivot
    partner under a per-layer signed permutation (an exact orthogonal map), rescaled,
    plus 0.1 noise; every language then gets its own mean offset.  Generated in
    chunks so that the generation peak stays close to the final data size.
    """
    rng = np.random.default_rng(seed)
    L, n = n_langs, n_ids * n_langs
    width, layer = int(np.prod(tail)), tail[-1]
    names = np.array(lang_names(L))
    code = np.repeat(np.arange(L), n_ids)
    pid = np.tile(np.arange(n_ids, dtype=np.int64), L)
    perm = rng.permutation(n)
    code, pid = code[perm], pid[perm]
    pos = np.empty((L, n_ids), dtype=np.int64)
    pos[code, pid] = np.arange(n)
    offsets = rng.normal(0.0, 1.0, (L, width)).astype(np.float32)
    scales = rng.uniform(0.5, 2.0, L).astype(np.float32)
    X = np.empty((n, width), dtype=np.float32)
    step = max(1, (1 << 22) // width)
    chunks = [slice(s, min(s + step, n_ids)) for s in range(0, n_ids, step)]
    for ids in chunks:
        k = ids.stop - ids.start
        X[pos[0, ids]] = rng.standard_normal((k, width), dtype=np.float32) * scales[0]
    nblk = width // layer
    for lang in range(1, L):
        cols = np.argsort(rng.random((nblk, layer)), axis=1) + layer * np.arange(nblk)[:, None]
        cols = cols.ravel()
        sign = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), width)
        sign *= scales[lang] / scales[0]
        for ids in chunks:
            k = ids.stop - ids.start
            rows = X[pos[0, ids]][:, cols]
            rows *= sign
            rows += 0.1 * rng.standard_normal((k, width), dtype=np.float32)
            rows += offsets[lang]
            X[pos[lang, ids]] = rows
    for ids in chunks:
        X[pos[0, ids]] += offsets[0]
    return Data(X.reshape((n, *tail)), names[code], pid, str(names[0]), n_ids)


@dataclass
class Sizes:
    rows: int
    dim: int
    langs: int
    many_langs: int
    layer_rows: int
    layers: int
    layer_dim: int
    rotate_layers: int

    def n_ids(self, case: str) -> int:
        if case == "flat":
            return self.rows // self.langs
        if case == "many":
            return self.rows // self.many_langs
        return self.layer_rows // self.langs

    def n_langs(self, case: str) -> int:
        return self.many_langs if case == "many" else self.langs

    def tail(self, case: str) -> tuple[int, ...]:
        return (self.layers, self.layer_dim) if case == "layered" else (self.dim,)

    def make(self, case: str) -> Data:
        return make_data(self.n_ids(case), self.n_langs(case), self.tail(case), SEEDS[case])

    def describe(self, case: str) -> str:
        n = self.n_ids(case) * self.n_langs(case)
        shape = "x".join(str(s) for s in (n, *self.tail(case)))
        return f"{shape}, {self.n_langs(case)} langs"


def warmup_ids(D: Data) -> int:
    """Pair ids of the warm-up subset: 1/8 of the rows, enough pairs for a full rank."""
    d = D.X.shape[-1]
    return max(D.n_ids // 8, min(D.n_ids, d + 1))


# --------------------------------------------------------------------- estimators
def make_ours(kind: str, D: Data, pa, sizes: Sizes) -> tuple[Callable, Callable]:
    """(fit() -> fitted estimator, transform(est) -> output) for our estimators."""
    X, langs, pids = D.X, D.langs, D.pids
    if kind == "center":
        return (
            lambda: pa.LanguageMeanCentering().fit(X, languages=langs),
            lambda e: e.transform(X, languages=langs),
        )
    if kind in ("std", "std_batch"):
        mode = "batch" if kind == "std_batch" else "fitted"
        return (
            lambda: pa.LanguageStandardizer(mode=mode).fit(X, languages=langs),
            lambda e: e.transform(X, languages=langs),
        )
    if kind == "procrustes":
        return (
            lambda: pa.ProcrustesAligner(pivot=D.pivot).fit(X, languages=langs, pair_ids=pids),
            lambda e: e.transform(X, languages=langs),
        )
    if kind == "lsar":
        return (lambda: pa.LSAR().fit(X, languages=langs), lambda e: e.transform(X))
    if kind == "rotate":
        layers = tuple(range(-sizes.rotate_layers, 0))
        return (
            lambda: pa.RotateAlign(layers=layers, pivot=D.pivot).fit(
                X, languages=langs, pair_ids=pids
            ),
            lambda e: e.transform(X, languages=langs),
        )
    if kind == "perlayer":
        return (
            lambda: pa.PerLayer(pa.LanguageMeanCentering()).fit(X, languages=langs),
            lambda e: e.transform(X, languages=langs),
        )
    raise ValueError(kind)


# ------------------------------------------------------------------ loop baseline
def loop_means(X, langs):
    return {lab: X[langs == lab].mean(0) for lab in np.unique(langs)}


def loop_center(X, langs, means):
    out = np.empty_like(X)
    for lab, mu in means.items():
        m = langs == lab
        out[m] = X[m] - mu
    return out


def loop_meanvar(X, langs):
    stats = {}
    for lab in np.unique(langs):
        Xl = X[langs == lab]
        stats[lab] = (Xl.mean(0), Xl.var(0))
    return stats


def loop_standardize(X, langs, stats, eps=1e-6):
    out = np.empty_like(X)
    for lab, (mu, var) in stats.items():
        m = langs == lab
        out[m] = (X[m] - mu) / np.sqrt(var + eps)
    return out


def loop_procrustes_fit(X, langs, pids, pivot):
    """Research-code Procrustes: centre each language, gather pairs, scipy per language."""
    means = loop_means(X, langs)
    piv_rows = np.flatnonzero(langs == pivot)
    order = np.argsort(pids[piv_rows])
    piv_rows, piv_ids = piv_rows[order], pids[piv_rows][order]
    rots = {}
    for lab in means:
        if lab == pivot:
            continue
        rows = np.flatnonzero(langs == lab)
        j = np.searchsorted(piv_ids, pids[rows])
        A = X[rows] - means[lab]
        B = X[piv_rows[j]] - means[pivot]
        rots[lab], _ = scipy.linalg.orthogonal_procrustes(A, B)
    return means, rots


def loop_procrustes_transform(X, langs, means, rots):
    out = np.empty_like(X)
    for lab, mu in means.items():
        m = langs == lab
        out[m] = X[m] - mu if lab not in rots else (X[m] - mu) @ rots[lab]
    return out


def loop_lsar_fit(X, langs):
    means = loop_means(X, langs)
    M = np.stack(list(means.values()))
    _, _, Vt = np.linalg.svd(M - M.mean(0), full_matrices=False)
    return Vt[: len(means) - 1]


def make_loop(kind: str, D: Data, sizes: Sizes) -> tuple[Callable, Callable]:
    """(fit() -> params, transform(params) -> output) for the research-code loop."""
    X, langs, pids = D.X, D.langs, D.pids
    if kind == "center":
        return (lambda: loop_means(X, langs), lambda p: loop_center(X, langs, p))
    if kind == "std":
        return (lambda: loop_meanvar(X, langs), lambda p: loop_standardize(X, langs, p))
    if kind == "std_batch":  # transform recomputes the statistics of the batch
        return (
            lambda: loop_meanvar(X, langs),
            lambda p: loop_standardize(X, langs, loop_meanvar(X, langs)),
        )
    if kind == "procrustes":
        return (
            lambda: loop_procrustes_fit(X, langs, pids, D.pivot),
            lambda p: loop_procrustes_transform(X, langs, *p),
        )
    if kind == "lsar":  # the transform has no language loop in any implementation
        return (lambda: loop_lsar_fit(X, langs), lambda B: X - (X @ B.T) @ B)
    if kind == "rotate":
        layers = [X.shape[1] - k for k in range(sizes.rotate_layers, 0, -1)]

        def fit():
            return {i: loop_procrustes_fit(X[:, i], langs, pids, D.pivot) for i in layers}

        def transform(p):
            out = X.copy()
            for i, (means, rots) in p.items():
                for lab, mu in means.items():
                    m = langs == lab
                    out[m, i] = X[m, i] - mu if lab not in rots else (X[m, i] - mu) @ rots[lab]
            return out

        return fit, transform
    if kind == "perlayer":
        return (lambda: loop_means(X, langs), lambda p: loop_center(X, langs, p))
    raise ValueError(kind)


# ----------------------------------------------------------------------- ceilings
def _orthonormal(rng, d: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((d, k)))[0].astype(np.float32)


def _pair_blocks(X2: np.ndarray, D: Data) -> tuple[list[np.ndarray], np.ndarray]:
    """Each non-pivot language's rows and the pivot rows, contiguous, sorted by id."""
    blocks = {}
    for lab in np.unique(D.langs):
        rows = np.flatnonzero(D.langs == lab)
        blocks[lab] = np.ascontiguousarray(X2[rows[np.argsort(D.pids[rows])]])
    B = blocks.pop(D.pivot)
    return list(blocks.values()), B


def make_ceiling(
    kind: str,
    which: str,
    D: Data,
    lib: str,
    sizes: Sizes,
    n_components: int,
    fresh: bool = False,
) -> tuple[Callable, str]:
    """(ceiling callable, label) of the ``which`` ("fit"/"transform") work, numpy or torch.

    ``fresh=True``: the transform ceilings write a newly allocated output on every call
    (as a transform returning a new array must; numpy's allocator, which uses huge
    pages) instead of a preallocated, already-faulted buffer.
    """
    rng = np.random.default_rng(123)
    X = D.X
    tl = lib == "torch"
    T = torch.from_numpy(X) if tl else X
    d = X.shape[-1]

    def new(shape):
        buf = np.empty(shape, dtype=X.dtype)
        return torch.from_numpy(buf) if tl else buf

    def output(shape) -> Callable:
        """A callable giving the output buffer: the same one, or a fresh one per call."""
        if fresh:
            return lambda: new(shape)
        buf = new(shape)
        return lambda: buf

    def colsum():
        return T.sum(0)

    def subtract_fn():
        v = T[0].clone() if tl else X[0].copy()
        buf = output(T.shape)
        if tl:
            return lambda: torch.sub(T, v, out=buf())
        return lambda: np.subtract(X, v, out=buf())

    def gemm_fn(A, W):
        buf = output((A.shape[0], W.shape[1]))
        if tl:
            A, W = torch.from_numpy(A), torch.from_numpy(W)
            return lambda: torch.mm(A, W, out=buf())
        return lambda: np.matmul(A, W, out=buf())

    def pairs_fn(As, B):
        C = new((B.shape[1], B.shape[1]))
        if tl:
            As, B = [torch.from_numpy(a) for a in As], torch.from_numpy(B)
            return lambda: [torch.mm(a.T, B, out=C) for a in As]
        return lambda: [np.matmul(a.T, B, out=C) for a in As]

    layers = [X.shape[1] - k for k in range(sizes.rotate_layers, 0, -1)] if X.ndim == 3 else []
    if which == "fit":
        if kind in ("center", "std", "std_batch", "lsar", "perlayer"):
            return colsum, "X.sum(0)"
        if kind == "procrustes":
            As, B = _pair_blocks(X, D)
            return pairs_fn(As, B), f"{len(As)}x A.T@B ({B.shape[0]}x{d})"
        if kind == "rotate":
            fits = [pairs_fn(*_pair_blocks(np.ascontiguousarray(X[:, i]), D)) for i in layers]
            return (lambda: [f() for f in fits]), f"{len(layers)} layers x pair GEMMs"
        raise ValueError(kind)
    if kind in ("center", "std", "perlayer"):
        return subtract_fn(), "subtract(X, v, out)"
    if kind == "std_batch":
        sub = subtract_fn()
        return (lambda: (colsum(), sub())), "X.sum(0) + subtract(X, v, out)"
    if kind == "procrustes":
        return gemm_fn(X, _orthonormal(rng, d, d)), f"X@W ({X.shape[0]}x{d}x{d})"
    if kind == "lsar":
        Bk = np.ascontiguousarray(_orthonormal(rng, d, n_components).T)  # (k, d)
        BkT = np.ascontiguousarray(Bk.T)
        buf = output(T.shape)
        if tl:
            Bk_, BkT_ = torch.from_numpy(Bk), torch.from_numpy(BkT)
            return (lambda: torch.mm(T @ BkT_, Bk_, out=buf())), f"X@B.T@B (k={n_components})"
        return (lambda: np.matmul(X @ BkT, Bk, out=buf())), f"X@B.T@B (k={n_components})"
    if kind == "rotate":
        W = _orthonormal(rng, d, d)
        trs = [gemm_fn(np.ascontiguousarray(X[:, i]), W) for i in layers]
        stack = output(T.shape)

        def tr_all():
            full = stack()
            if tl:
                full.copy_(T)
            else:
                np.copyto(full, X)
            for f in trs:
                f()

        return tr_all, f"copy stack + {len(layers)}x X_i@W"
    raise ValueError(kind)


# ------------------------------------------------------------------------- timing
def timed(fn: Callable, *args):
    gc.collect()
    t0 = time.perf_counter()
    res = fn(*args)
    return time.perf_counter() - t0, res


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    diff = scale = 0.0
    for s in range(0, a2.shape[0], 8192):
        diff = max(diff, float(np.max(np.abs(a2[s : s + 8192] - b2[s : s + 8192]))))
        scale = max(scale, float(np.max(np.abs(b2[s : s + 8192]))))
    return diff / max(scale, 1e-30)


@dataclass
class Result:
    kind: str
    case: str
    name: str
    case_label: str
    fit: float = np.inf
    transform: float = np.inf
    ceil_fit: float = np.inf
    ceil_tr: float = np.inf
    ceil_tr_fresh: float = np.inf
    loop_fit: float = np.inf
    loop_tr: float = np.inf
    ceil_lib: dict = field(default_factory=dict)
    ceil_label: tuple = ("", "")
    check: float = np.nan
    check_ok: bool = True
    peak: float | None = None  # peak MB above baseline / input MB (fit + transform)
    peak_fit: float | None = None
    peak_mb: float | None = None
    input_mb: float | None = None
    mem_error: str = ""

    @property
    def many(self) -> bool:
        return self.case == "many"

    def verdict(self) -> str:
        miss = []
        if self.fit / self.ceil_fit > FIT_VS_CEILING:
            miss.append(f"fit/ceiling {self.fit / self.ceil_fit:.2f}>{FIT_VS_CEILING}")
        if self.transform / self.ceil_tr > TRANSFORM_VS_CEILING:
            miss.append(
                f"transform/ceiling {self.transform / self.ceil_tr:.2f}>{TRANSFORM_VS_CEILING:g}"
            )
        need_fit = LOOP_SPEEDUP_MANY if self.many else 1.0
        need_tr = LOOP_SPEEDUP_MANY if self.many and self.kind != "lsar" else 1.0
        if self.loop_fit / self.fit < need_fit:
            miss.append(f"fit loop/ours {self.loop_fit / self.fit:.2f}<{need_fit:g}")
        if self.loop_tr / self.transform < need_tr:
            miss.append(f"transform loop/ours {self.loop_tr / self.transform:.2f}<{need_tr:g}")
        if self.peak is not None and self.peak >= PEAK_VS_INPUT:
            miss.append(f"peak {self.peak:.2f}x>={PEAK_VS_INPUT:g}x")
        if not self.check_ok:
            miss.append("CHECK FAILED")
        return "target met" if not miss else "missed: " + ", ".join(miss)


def n_components_for(case: str, sizes: Sizes) -> int:
    return sizes.n_langs(case) - 1


def bench_one(kind: str, case: str, D: Data, pa, sizes: Sizes, repeat: int) -> Result:
    name = NAMES[kind].format(k=sizes.rotate_layers)
    res = Result(kind, case, name, sizes.describe(case))
    k = n_components_for(case, sizes)

    # warm-up on a subset (1/8 of the pairs); the ceiling library is picked here
    S = D.subset(warmup_ids(D))
    fit, tr = make_ours(kind, S, pa, sizes)
    lfit, ltr = make_loop(kind, S, sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr(fit())
        ltr(lfit())
    for which in ("fit", "transform"):
        best = {}
        for lib in ("numpy", "torch"):
            fn, _ = make_ceiling(kind, which, S, lib, sizes, k)
            fn()
            best[lib] = min(timed(fn)[0] for _ in range(2))
        res.ceil_lib[which] = min(best, key=best.get)
    del S, fit, tr, lfit, ltr

    fit, tr = make_ours(kind, D, pa, sizes)
    lfit, ltr = make_loop(kind, D, sizes)
    cfit, lab_fit = make_ceiling(kind, "fit", D, res.ceil_lib["fit"], sizes, k)
    ctr, lab_tr = make_ceiling(kind, "transform", D, res.ceil_lib["transform"], sizes, k)
    ctr_fresh, _ = make_ceiling(
        kind, "transform", D, res.ceil_lib["transform"], sizes, k, fresh=True
    )
    res.ceil_label = (lab_fit, lab_tr)
    out = lout = None
    for r in range(repeat):
        last = r == repeat - 1
        t, est = timed(fit)
        res.fit = min(res.fit, t)
        out = None
        t, out = timed(tr, est)
        res.transform = min(res.transform, t)
        if not last:
            out = None
        res.ceil_fit = min(res.ceil_fit, timed(cfit)[0])
        res.ceil_tr = min(res.ceil_tr, timed(ctr)[0])
        res.ceil_tr_fresh = min(res.ceil_tr_fresh, timed(ctr_fresh)[0])
        t, p = timed(lfit)
        res.loop_fit = min(res.loop_fit, t)
        lout = None
        t, lout = timed(ltr, p)
        res.loop_tr = min(res.loop_tr, t)
        if not last:
            lout = None
    res.check = max_rel_diff(np.asarray(out), lout)
    res.check_ok = bool(res.check <= CHECK_TOL.get(kind, DEFAULT_TOL))
    return res


# ------------------------------------------------------------------------- memory
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """Peak RSS of this address space: VmHWM, else ``ru_maxrss``.

    ``getrusage(RUSAGE_SELF).ru_maxrss`` is max(VmHWM, a per-process floor), and Linux
    sets that floor at ``exec`` to the RSS of the forking parent, so in a child of a
    large benchmark process ``ru_maxrss`` can hide the child's own peak.  VmHWM is the
    same high-water mark without the inherited floor, and ``clear_refs`` resets it.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mb()


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Drop freed heap and reset the peak RSS to the current RSS (Linux >= 4.0)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child_memory(keys: str, sizes: Sizes) -> None:
    """Hidden ``--one kind@case[,kind@case...]``: one fit + one transform per key.

    Prints one ``MEM_JSON`` line per key: the peak above the RSS once the data exists
    (and the one-off library initialisation is done, on a small subset).
    """
    pa = load_library()
    data: dict[str, Data] = {}
    for key in keys.split(","):
        kind, case = key.split("@")
        if case not in data:
            data.clear()
            gc.collect()
            data[case] = sizes.make(case)
        D = data[case]
        S = D.subset(warmup_ids(D))
        with warnings.catch_warnings():  # one-off library/BLAS initialisation, not counted
            warnings.simplefilter("ignore")
            fit, tr = make_ours(kind, S, pa, sizes)
            tr(fit())
        del S, fit, tr
        reset = _reset_peak()
        base, rss_base, maxrss_base = _peak_mb(), _rss_mb(), _maxrss_mb()
        fit, tr = make_ours(kind, D, pa, sizes)
        est = fit()
        peak_fit = _peak_mb()
        out = tr(est)
        peak = _peak_mb()
        maxrss = _maxrss_mb()
        del est, out
        record = {
            "key": key,
            "peak_fit_mb": peak_fit - base,
            "peak_mb": peak - base,
            "input_mb": D.nbytes / 2**20,
            "peak_reset": reset,
            "rss_base_mb": rss_base,
            "ru_maxrss_delta_mb": maxrss - maxrss_base,
        }
        print("MEM_JSON " + json.dumps(record), flush=True)


def measure_memory(results: list[Result], sizes: Sizes) -> None:
    """Run the ``--one`` child for ``results`` (one subprocess) and fill in the peaks."""
    by_key = {f"{r.kind}@{r.case}": r for r in results}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", ",".join(by_key)]
    cmd += sizes_argv(sizes) + ["--threads", str(torch.get_num_threads())]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        for r in results:
            r.mem_error = "timeout"
        return
    for line in p.stdout.splitlines():
        if line.startswith("MEM_JSON "):
            m = json.loads(line[len("MEM_JSON ") :])
            r = by_key.pop(m["key"])
            r.peak_mb, r.input_mb = m["peak_mb"], m["input_mb"]
            r.peak = m["peak_mb"] / m["input_mb"]
            r.peak_fit = m["peak_fit_mb"] / m["input_mb"]
            if not m["peak_reset"]:
                r.mem_error = "peak could not be reset after data generation"
    for r in by_key.values():
        r.mem_error = f"child rc={p.returncode}: {p.stderr.strip().splitlines()[-1:]}"


# ------------------------------------------------------------------------- report
def machine_info() -> list[str]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(x.split(":", 1)[1].strip() for x in f if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    try:
        with redirect_stdout(io.StringIO()):
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        np_blas = f"{blas.get('name')} {blas.get('version')}"
        extra = blas.get("openblas configuration", "")
        np_blas += f" ({' '.join(extra.split()[2:])})" if extra else ""
    except Exception:  # older numpy: no mode="dicts"
        np_blas = "see np.show_config()"
    cfg = torch.__config__.show()
    torch_blas = next(
        (x.split("BLAS_INFO=")[1].split(",")[0] for x in cfg.splitlines() if "BLAS_INFO=" in x), "?"
    )
    pools = ""
    try:
        from threadpoolctl import threadpool_info

        pools = ", ".join(f"{p['internal_api']}={p['num_threads']}" for p in threadpool_info())
    except Exception:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    env = " ".join(
        f"{k}={os.environ[k]}"
        for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
        if k in os.environ
    )
    pa = load_library()
    return [
        f"CPU: {cpu}; {os.cpu_count()} logical cores ({affinity} usable); load average {load}",
        f"torch {torch.__version__} (BLAS {torch_blas}, {torch.get_num_threads()} threads); "
        f"numpy {np.__version__} (BLAS {np_blas}); scipy {scipy.__version__}; "
        f"scikit-learn {sklearn.__version__}; posthoc_align {pa.__version__}; "
        f"Python {platform.python_version()}; CPU loops: {_loops_line()}",
        f"thread pools: {pools or 'threadpoolctl not available'}; "
        f"environment: {env or 'no OMP/MKL/OpenBLAS variables set'}",
    ]


def _loops_line() -> str:
    """Whether the numba CPU loops ran (``POSTHOC_ALIGN_NUMBA=0`` turns them off)."""
    from posthoc_align import _kernels

    if not _kernels.enabled():
        return "off (torch kernels)"
    import numba

    return f"numba {numba.__version__}"


def fmt_s(t: float) -> str:
    return f"{t:.3f}" if t < 10 else f"{t:.2f}"


HEADER = [
    "estimator",
    "case",
    "fit s",
    "ceiling s",
    "fit/ceiling",
    "loop s",
    "loop/ours",
    "transform s",
    "ceiling s",
    "ratio",
    "ceiling + new output s",
    "ratio (new output)",
    "peak MB / input MB",
    "transform loop s",
    "loop/ours",
    "target",
]


def table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in results:
        if r.peak is not None:
            peak = f"{r.peak:.2f} ({r.peak_mb:.0f}/{r.input_mb:.0f})"
        else:
            peak = "n/a"
        cells = [
            r.name,
            r.case_label,
            fmt_s(r.fit),
            fmt_s(r.ceil_fit),
            f"{r.fit / r.ceil_fit:.2f}",
            fmt_s(r.loop_fit),
            f"{r.loop_fit / r.fit:.2f}",
            fmt_s(r.transform),
            fmt_s(r.ceil_tr),
            f"{r.transform / r.ceil_tr:.2f}",
            fmt_s(r.ceil_tr_fresh),
            f"{r.transform / r.ceil_tr_fresh:.2f}",
            peak,
            fmt_s(r.loop_tr),
            f"{r.loop_tr / r.transform:.2f}",
            r.verdict(),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = f"""\
Targets: fit/ceiling <= {FIT_VS_CEILING}, transform/ceiling <= {TRANSFORM_VS_CEILING:g}, \
loop/ours >= 1 (>= {LOOP_SPEEDUP_MANY:g} at 100 languages; LSAR's transform has no language \
loop), peak < {PEAK_VS_INPUT:g}x input.
Times: best of the rounds after a warm-up on 1/8 of the rows; ours, ceiling and loop \
interleaved per round. Ceilings (the faster of numpy/torch, picked on the warm-up subset; \
preallocated outputs): X.sum(0) \
for mean/variance fits; subtract(X, v, out) for elementwise transforms (batch \
standardisation: X.sum(0) + subtract); sum over languages of A.T@B (paired rows x d) for \
Procrustes fits (the d x d SVDs are not in the ceiling); X@W (n x d x d) for the Procrustes \
transform; rank-k X@B.T@B for LSAR; RotateAlign: the pair GEMMs of each rotated layer / \
copy of the stack + X_i@W per rotated layer. "ceiling + new output": the same transform \
ceiling writing a newly allocated output (numpy's allocator, huge pages) on every call, as \
any transform that returns a new array must; the target is checked against the \
preallocated ceiling. Loop: Python loop over languages with \
boolean masks (numpy float32), scipy.linalg.orthogonal_procrustes per language.
Peak: high-water RSS (VmHWM = ru_maxrss of the process's own address space) after one \
fit + one transform (output included) minus the RSS once the data is generated (high-water \
mark reset there), in a fresh subprocess, over the input size (X + labels + pair ids)."""


def set_threads(n: int) -> None:
    """Limit torch's intra-op pool and the BLAS/OpenMP pools to ``n`` threads (0: leave)."""
    if n <= 0:
        return
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:
        pass


def sizes_argv(s: Sizes) -> list[str]:
    return [
        "--rows",
        str(s.rows),
        "--dim",
        str(s.dim),
        "--langs",
        str(s.langs),
        "--many-langs",
        str(s.many_langs),
        "--layer-rows",
        str(s.layer_rows),
        "--layers",
        str(s.layers),
        "--layer-dim",
        str(s.layer_dim),
        "--rotate-layers",
        str(s.rotate_layers),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=200_000, help="rows of the 2-D cases")
    p.add_argument("--dim", type=int, default=768, help="features of the 2-D cases")
    p.add_argument("--langs", type=int, default=8, help="languages (2-D and layered cases)")
    p.add_argument("--many-langs", type=int, default=100, help="languages of the many case")
    p.add_argument("--layer-rows", type=int, default=50_000, help="rows of the layered case")
    p.add_argument("--layers", type=int, default=13, help="layers of the layered case")
    p.add_argument("--layer-dim", type=int, default=384, help="features per layer")
    p.add_argument("--rotate-layers", type=int, default=4, help="last layers RotateAlign fits")
    p.add_argument("--repeat", type=int, default=3, help="timed rounds (best is reported)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="~10x smaller smoke run: rows/10, dims/3, 2 rounds, one memory process",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--only", default="", help="run rows whose name contains this text")
    p.add_argument("--output", type=Path, help="also write the Markdown table to this file")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="limit torch and BLAS to this many threads (ours, ceilings and loop alike; "
        "1 gives ratios that are robust to load from other processes); 0: library default",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = Sizes(
        args.rows,
        args.dim,
        args.langs,
        args.many_langs,
        args.layer_rows,
        args.layers,
        args.layer_dim,
        args.rotate_layers,
    )
    if args.quick and not args.one:
        sizes = Sizes(
            args.rows // 10,
            max(args.dim // 3, 8),
            args.langs,
            args.many_langs,
            args.layer_rows // 10,
            args.layers,
            max(args.layer_dim // 3, 8),
            args.rotate_layers,
        )
        args.repeat = min(args.repeat, 2)
    set_threads(args.threads)
    if args.one:
        child_memory(args.one, sizes)
        return 0

    t_start = time.perf_counter()
    pa = load_library()
    head = machine_info()
    size_mb = {
        c: sizes.n_ids(c) * sizes.n_langs(c) * int(np.prod(sizes.tail(c))) * 4 / 2**20
        for _, c in SPECS
    }
    head.append(
        "sizes: "
        + "; ".join(f"{sizes.describe(c)} float32 ({mb:.0f} MB)" for c, mb in size_mb.items())
    )
    head.append(
        f"rounds: best of {args.repeat} after a warm-up" + (" (--quick)" if args.quick else "")
    )
    head.append("command: python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]))
    busy = os.getloadavg()[0]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if busy > cores:
        head.append(
            f"WARNING: load average {busy:.1f} exceeds the usable cores: other processes compete "
            "for the CPU, so times are inflated and noisy (multi-threaded torch most of all)"
        )
    for line in head:
        print(line)
    print(flush=True)

    specs = [(k, c) for k, c in SPECS if args.only.lower() in f"{NAMES[k]} {c}".lower()]
    results: list[Result] = []
    for case in dict.fromkeys(c for _, c in specs):
        t0 = time.perf_counter()
        D = sizes.make(case)
        print(
            f"[data] {case}: {sizes.describe(case)} generated in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        for kind, c in specs:
            if c != case:
                continue
            r = bench_one(kind, case, D, pa, sizes, args.repeat)
            results.append(r)
            print(
                f"[time] {r.name} | {r.case_label}: fit {fmt_s(r.fit)} s "
                f"(ceiling {fmt_s(r.ceil_fit)} {r.ceil_lib['fit']}, loop {fmt_s(r.loop_fit)}); "
                f"transform {fmt_s(r.transform)} s (ceiling {fmt_s(r.ceil_tr)} "
                f"{r.ceil_lib['transform']}, loop {fmt_s(r.loop_tr)}); "
                f"check {r.check:.1e} {'ok' if r.check_ok else 'FAILED'}",
                flush=True,
            )
        del D
        gc.collect()
    if not args.no_memory:
        # one fresh process per estimator; --quick measures all rows in one process
        groups = [results] if args.quick else [[r] for r in results]
        for group in groups:
            measure_memory(group, sizes)
        for r in results:
            pk = "n/a" if r.peak is None else f"{r.peak:.2f}x (fit alone {r.peak_fit:.2f}x)"
            print(
                f"[mem]  {r.name} | {r.case_label}: peak {pk}"
                + (f" [{r.mem_error}]" if r.mem_error else ""),
                flush=True,
            )

    md = table(results)
    used = "\n".join(
        f"- {r.name} | {r.case_label}: fit ceiling {r.ceil_label[0]} ({r.ceil_lib['fit']}), "
        f"transform ceiling {r.ceil_label[1]} ({r.ceil_lib['transform']}); "
        f"max |ours - loop| / max |loop| = {r.check:.1e}"
        + (f"; peak of fit alone {r.peak_fit:.2f}x" if r.peak_fit is not None else "")
        for r in results
    )
    print()
    print(md)
    print()
    print(LEGEND)
    print()
    print(used)
    n_miss = sum(r.verdict() != "target met" for r in results)
    failed = [r for r in results if not r.check_ok]
    print(
        f"\n{len(results) - n_miss}/{len(results)} rows meet every target; "
        f"smoke guard: {'CHECK FAILED for ' + str([r.name for r in failed]) if failed else 'ok'}"
        f"; load average now {', '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"total {time.perf_counter() - t_start:.0f} s"
    )
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(
            "\n".join(
                ["# bench_fit", "", *[f"- {h}" for h in head], "", md, "", LEGEND, "", used, ""]
            )
        )
        print(f"table written to {args.output}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
