"""Orthogonal Procrustes maps of every language into a pivot language."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils.validation import check_is_fitted

from ._apply import affine_by_language, deliver, usable_out
from ._backend import DEVICE_CONSTRAINT
from ._base import LanguageTransformerMixin
from ._dask import is_dask, transform_dask
from ._stats import PairMoments
from ._validation import check_languages, check_pair_ids

__all__ = ["ProcrustesAligner", "orthogonal_map", "rotate_by_language"]


#: ``orthogonal_map`` uses ``C`` as it is when its largest ``|entry|`` lies in this
#: range (``CᵀC`` and its eigenvalues, down to 1e-8 of the largest, stay normal
#: float64 numbers for any dimension); outside it, ``C`` is rescaled first.
_SAFE_CROSS = (2.0**-400, 2.0**400)


def orthogonal_map(cross: np.ndarray, device: Any = "cpu") -> np.ndarray:
    """The orthogonal ``W`` minimising ``‖A W − B‖_F`` given ``cross = AᵀB``.

    Schönemann (1966): with the SVD ``AᵀB = U Σ Vᵀ``, ``W = U Vᵀ`` — the orthogonal
    polar factor of ``C = AᵀB``. When ``C`` is well conditioned (``cond(C) < 1e4``)
    it is computed as ``C (CᵀC)^{-1/2}`` from a symmetric eigendecomposition, which
    is about twice as fast as an SVD and equal to ``U Vᵀ`` to ~1e-11 for
    ``cond(C) ≤ 1e3`` and ~1e-9 near the 1e4 limit (forming ``CᵀC`` squares the
    condition number; Higham 1986); otherwise (e.g. fewer pairs than dimensions) from the SVD itself. float64,
    torch, on ``device``.

    The map does not depend on the scale of ``cross``: outside ``[2⁻⁴⁰⁰, 2⁴⁰⁰]``
    (largest ``|entry|``) it is divided by a power of two near that entry (exact)
    before ``CᵀC`` is formed, so that neither overflows nor underflows at any
    finite scale (the cross-product of data at 1e150, squared again, would).

    Raises
    ------
    ValueError
        If ``cross`` holds inf or NaN (the products of the paired rows overflowed
        float64, e.g. float64 rows of magnitude ≳ 1e154).

    Examples
    --------
    >>> import numpy as np
    >>> W = orthogonal_map(np.array([[0.0, 2.0], [-1.0, 0.0]]))
    >>> np.allclose(W @ W.T, np.eye(2))
    True
    """
    C = np.ascontiguousarray(cross, dtype=np.float64)
    big = max(-float(C.min()), float(C.max())) if C.size else 0.0  # NaN propagates
    if not np.isfinite(big):
        raise ValueError(
            "the cross-product of the paired rows holds inf or NaN: the products of "
            "the data overflowed float64 (rows of magnitude ~1e154 or more). The "
            "orthogonal map does not depend on the scale of the data: divide X by a "
            "constant (e.g. its largest |value|) before fitting."
        )
    if big > 0.0 and not _SAFE_CROSS[0] <= big <= _SAFE_CROSS[1]:
        # W is scale-free; an exact power-of-two rescale keeps CᵀC (whose entries
        # are squares of C's) inside float64's range at every scale of C (C at a
        # usual scale is used as it is)
        C = np.ldexp(C, -int(np.frexp(big)[1]))
    if torch.device(device).type == "cpu":
        # numpy on the CPU: ``C.T @ C`` runs as a symmetric rank-k update (half the
        # flops of a GEMM) and LAPACK's syevd through numpy took ~0.6x torch's time
        # for a 768 x 768 matrix on one thread
        w, V = np.linalg.eigh(C.T @ C)
        if w.size and w[0] > 1e-8 * w[-1] > 0:
            # (CᵀC)^{-1/2} = M Mᵀ with M = V diag(w^{-1/4}): a second symmetric
            # rank-k product instead of a GEMM (numpy runs ``M @ M.T`` as syrk)
            M = V * w**-0.25
            return C @ (M @ M.T)
        U, _, Vh = torch.linalg.svd(torch.from_numpy(C), full_matrices=False)
        return (U @ Vh).numpy()
    Ct = torch.from_numpy(C).to(device)
    w, V = torch.linalg.eigh(Ct.T @ Ct)
    if w.numel() and float(w[0]) > 1e-8 * float(w[-1]) > 0:
        return (Ct @ ((V * w.rsqrt()) @ V.T)).cpu().numpy()
    U, _, Vh = torch.linalg.svd(Ct, full_matrices=False)
    return (U @ Vh).cpu().numpy()


#: Smallest dimension whose d×d solves run side by side (below it, thread start-up
#: and the BLAS thread switch cost more than they save).
PARALLEL_SOLVE_DIM = 128


_batch = threading.local()


@contextmanager
def solves_together() -> Iterator[None]:
    """Run the d×d solves of every Procrustes fit inside the block together, at its end.

    ``PerLayer``/``RotateAlign`` fit one aligner per layer; each has only a few
    languages to solve (7 solves on 2 threads leave a thread idle for the last one,
    and every fit pays the thread pool's start-up). Inside this block, fits queue
    their solves instead; on leaving it they all run in one :func:`for_each_solve`
    per device and dimension (28 maps of 384×384 on 2 cores: 0.55 s → ~0.4 s). A
    fit inside the block has its ``rotations_`` only after the block ends; if the
    block raises, the queued maps are set to NaN (never left as uninitialised
    memory). Nested blocks join the outermost one.
    """
    if getattr(_batch, "queue", None) is not None:
        yield
        return
    _batch.queue = queue = []
    ok = False
    try:
        yield
        ok = True
    finally:
        _batch.queue = None
        groups: dict[tuple[str, int], list] = {}
        for solve, item, dev, d in queue:
            groups.setdefault((str(dev), d), []).append((solve, item))
        for (dev, d), items in groups.items():
            if ok:
                for_each_solve(lambda si: si[0](si[1]), items, dev, d)
            else:
                for solve, item in items:
                    solve(item, failed=True)


def _solve_or_queue(solve, items: list, device: Any, d: int) -> None:
    """:func:`for_each_solve` now, or queued for the enclosing :func:`solves_together`."""
    queue = getattr(_batch, "queue", None)
    if queue is None:
        for_each_solve(solve, items, device, d)
    else:
        queue.extend((solve, item, device, d) for item in items)


def for_each_solve(solve, items: list, device: Any, d: int) -> None:
    """``solve(item)`` for every item: one d×d orthogonal map each.

    On the CPU with more than one thread allowed (``torch.get_num_threads()``),
    the solves run side by side, each with one BLAS thread, as scikit-learn's
    KMeans does: LAPACK's symmetric eigensolver (whose tridiagonal reduction is
    memory-bound) gains little from threads at these sizes, so ``t`` solves at
    once on ``t`` threads beat ``t`` threads inside each solve (7 maps at
    d = 768, 2 threads: ~1.2 s → ~0.9 s).  Each item's result is the same as a
    single-threaded solve of it.
    """
    workers = min(torch.get_num_threads(), len(items))
    if torch.device(device).type != "cpu" or workers < 2 or d < PARALLEL_SOLVE_DIM:
        for item in items:
            solve(item)
        return
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(workers) as ex:
        list(ex.map(solve, items))


def rotate_by_language(est, X, languages, *, skip, not_ready, not_ready_message, out=None):
    """``(x − μ_l) W_l`` (``x W_l`` without centring) for each row's language ``l``.

    Shared by the Procrustes-type aligners: ``est`` has ``languages_``, ``means_``,
    ``rotations_`` and ``center``; ``skip`` names a language left unrotated (the
    pivot) and ``not_ready(label)`` flags languages that cannot be mapped yet. With
    ``out`` (a tensor, e.g. a layer of a stack) the result is written there.
    """
    nx, Xc, dev = est._validate(X, reset=False)
    if languages is None:
        raise ValueError(f"{type(est).__name__}.transform needs languages= (one per row).")
    labels, codes = check_languages(languages, Xc.shape[0])
    gcodes, _ = est._fitted_codes(labels, codes)
    present = np.unique(gcodes).tolist()
    fitted = est.languages_.tolist()
    waiting = [fitted[i] for i in present if not_ready(fitted[i])]
    if waiting:
        raise ValueError(f"language(s) {waiting} {not_ready_message}")
    T = nx.to_torch(Xc, dev)
    res = affine_by_language(
        T,
        gcodes,
        shift=est.means_ if est.center else None,
        rotations={i: est.rotations_[i] for i in present if fitted[i] != skip},
        out=usable_out(out, T),
    )
    return deliver(nx, res, Xc, out)


class ProcrustesAligner(LanguageTransformerMixin):
    """Rotate every language into the pivot language's space.

    Wang et al. (2019), "Cross-lingual BERT transformation for zero-shot
    dependency parsing", §3 (Eq. 3–4), as used per layer by Kulshreshtha et al.
    (2020), "Cross-lingual alignment methods for multilingual BERT" (RotateAlign).
    For each non-pivot language ``l``, with ``A`` its rows and ``B`` their pivot
    translations (rows sharing a ``pair_id``), solve::

        W_l = argmin_{WᵀW = I} ‖A W − B‖_F = U Vᵀ,   U Σ Vᵀ = AᵀB   (Schönemann 1966)

    With ``center=True`` every language (the pivot too) is first centred by its own
    mean over *all* its fitted rows (the language-centring normalisation of
    Kulshreshtha et al. §3), so ``A`` and ``B`` are centred and ``transform`` maps
    ``x ↦ (x − μ_l) W_l``; pivot rows become ``x − μ_pivot``. The pivot mean is
    **not** added back: every language, the pivot included, ends in the centred
    pivot frame (add ``means_[languages_ == pivot]`` yourself for the raw pivot
    frame). With ``center=False``: ``x ↦ x W_l`` and pivot rows are unchanged.

    Sentence pairs and dictionary word pairs are the same mechanism: rows that
    share a ``pair_id`` are translations. A ``pair_id`` may occur in any number of
    languages; each non-pivot language is paired with the pivot row of its id.

    Parameters
    ----------
    pivot : hashable, default="en"
        The target language; it must occur in the fitted data.
    center : bool, default=True
        Centre every language by its own mean before fitting and at transform.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where products and the SVD run.

    Attributes
    ----------
    languages_ : ndarray of shape (n_languages,)
        Sorted fitted languages (pivot included).
    means_ : ndarray of shape (n_languages, n_features)
        Per-language means over all fitted rows.
    rotations_ : ndarray of shape (n_languages, n_features, n_features)
        ``W_l`` per language (identity for the pivot), applied as ``x @ W_l``.
    n_pairs_ : dict
        Number of pivot pairs per non-pivot language.
    n_features_in_ : int

    See Also
    --------
    RotateAlign : one aligner per layer of a layer stack.

    Notes
    -----
    One streaming pass: per-language sums and, per language, the d×d
    cross-product with its pivot partners, accumulated in float64; the centred
    cross-covariance is formed from these moments (no second pass), then one
    d×d SVD per language. No n×n matrix is formed. ``partial_fit`` may receive a
    row before its pivot partner: pivot rows, and rows still waiting for their
    partner, are buffered until then (``fit`` drops the buffers at its end, and
    ``save`` does not store them: ``partial_fit`` after ``fit`` or after a load
    continues the statistics, pairing new rows only with partners in the new
    batches, and warns once).
    Fewer pairs than dimensions leave the rotation non-unique (a warning).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.stats import ortho_group
    >>> from posthoc_align import ProcrustesAligner
    >>> rng = np.random.default_rng(0)
    >>> en = rng.normal(size=(50, 4))
    >>> R = ortho_group.rvs(4, random_state=0)
    >>> X = np.vstack([en, en @ R.T])               # "fr" rows are rotated "en" rows
    >>> langs = ["en"] * 50 + ["fr"] * 50
    >>> ids = list(range(50)) * 2
    >>> Z = ProcrustesAligner(pivot="en").fit_transform(X, languages=langs, pair_ids=ids)
    >>> bool(np.allclose(Z[50:], Z[:50]))
    True

    Cross-validation that keeps every translation of a sentence in one fold
    (``GroupKFold`` on ``pair_ids``), so each training fold holds whole pairs;
    ``languages`` and ``pair_ids`` are routed to the aligner:

    >>> import sklearn
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.model_selection import GroupKFold, cross_validate
    >>> from sklearn.pipeline import Pipeline
    >>> y = np.tile((en[:, 0] > 0).astype(int), 2)
    >>> with sklearn.config_context(enable_metadata_routing=True):
    ...     pipe = Pipeline([("align", ProcrustesAligner(pivot="en")),
    ...                      ("clf", LogisticRegression())])
    ...     res = cross_validate(pipe, X, y, cv=GroupKFold(5),
    ...                          params={"languages": langs, "pair_ids": ids, "groups": ids})
    >>> len(res["test_score"])
    5
    """

    __metadata_request__fit = {"languages": True, "pair_ids": True}
    __metadata_request__partial_fit = {"languages": True, "pair_ids": True}

    _parameter_constraints: dict = {
        "pivot": [Hashable],
        "center": ["boolean"],
        "device": DEVICE_CONSTRAINT,
    }

    def __init__(self, *, pivot: Hashable = "en", center: bool = True, device: Any = "auto"):
        self.pivot = pivot
        self.center = center
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, languages=None, pair_ids=None):
        """Fit one orthogonal map per non-pivot language.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        y : ignored
        languages : array-like of shape (n_rows,)
            Language of each row; the pivot must be among them.
        pair_ids : array-like of shape (n_rows,)
            Rows sharing an id are translations.

        Returns
        -------
        self
        """
        self._reset()
        self._fitting_once = True  # one batch: rows without a partner are simply unpaired
        try:
            self._partial_fit(X, languages, pair_ids)
        finally:
            del self._fitting_once
        self._check_complete()
        self._pairs.release()
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, languages=None, pair_ids=None):
        """Add a batch of rows; partners may come in different batches.

        Languages with no pivot pair yet are listed in ``unpaired_languages_`` and
        cannot be transformed until their pairs arrive.
        """
        return self._partial_fit(X, languages, pair_ids)

    def _check_metadata(self, n_rows, languages, pair_ids):
        if self.pivot is None:
            raise ValueError(
                "ProcrustesAligner(pivot=None): a pivot language is needed (e.g. pivot='en'); "
                "to map every language into a shared space with no pivot, use "
                "GeneralizedProcrustes(pivot=None)."
            )
        if languages is None:
            raise ValueError(
                "ProcrustesAligner needs languages= (one label per row) so it knows which "
                f"rows belong to the pivot {self.pivot!r} and which to rotate."
            )
        labels, codes = check_languages(languages, n_rows)
        pids = check_pair_ids(pair_ids, n_rows, required_by="ProcrustesAligner")
        return labels, codes, pids

    def _new_pairs(self):
        return PairMoments(self.pivot)

    def _finalize(self, dev) -> None:
        m, order = self._sorted_moments()
        p = self._pairs
        means = m.means()
        self.means_ = means[order]
        d = means.shape[1]
        # every entry is written below (a tiled identity is one more pass over L·d²)
        rot = np.empty((len(m.labels), d, d))
        self.n_pairs_ = {}
        unpaired = []
        todo = []
        for k, lab in enumerate(self.languages_.tolist()):
            if lab == self.pivot or lab not in p.S:
                rot[k] = np.eye(d)
                if lab != self.pivot:
                    unpaired.append(lab)
                continue
            todo.append((k, lab))
            self.n_pairs_[lab] = int(p.count[lab])
        ip = m.index[self.pivot] if todo else -1

        def solve(item: tuple[int, Hashable], failed: bool = False) -> None:
            k, lab = item
            if failed:
                rot[k] = np.nan
                return
            i = m.index[lab]
            C = p.cross_covariance(
                lab,
                means[i] if self.center else None,
                means[ip] if self.center else None,
                m.shift[i],
                m.shift[ip],
            )
            rot[k] = orthogonal_map(C, dev)

        _solve_or_queue(solve, todo, dev, d)
        self.rotations_ = rot
        self.unpaired_languages_ = unpaired

    def _check_complete(self) -> None:
        if self.pivot not in self.languages_.tolist():
            raise ValueError(
                f"pivot language {self.pivot!r} does not occur in languages "
                f"(found {self.languages_.tolist()}); set pivot= to one of them or add "
                "pivot-language rows."
            )
        if self.unpaired_languages_:
            lab = self.unpaired_languages_[0]
            raise ValueError(
                f"language(s) {self.unpaired_languages_} have no rows paired with the pivot "
                f"{self.pivot!r}: no pair_id of {lab!r} occurs among the pivot rows. Give "
                "translations of pivot rows the same pair_id, or drop those languages."
            )
        self._warn_few_pairs(stacklevel=4)

    def _warn_few_pairs(self, stacklevel: int) -> None:
        """Warn when a language has fewer pivot pairs than dimensions: at the end of
        ``fit``, or (``partial_fit`` streams) at the first transform of that state."""
        d = self.n_features_in_
        few = {lab: n for lab, n in self.n_pairs_.items() if n < d}
        if few and getattr(self, "_few_pairs_warned", None) != few:
            self._few_pairs_warned = few
            warnings.warn(
                f"fewer pivot pairs than dimensions ({d}) for {few}: the orthogonal map is "
                "not unique (it is fixed only on the span of the pairs). Use more pairs "
                "or reduce the dimension first.",
                UserWarning,
                stacklevel=stacklevel,
            )

    def transform(self, X, languages=None):
        """Map each row into the (centred) pivot frame.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        languages : array-like of shape (n_rows,)

        Returns
        -------
        X_new : same type as X
        """
        check_is_fitted(self)
        if is_dask(X):
            return transform_dask(self, X, languages)
        return self._transform(X, languages)

    def _transform(self, X, languages=None, out=None):
        """:meth:`transform`; with ``out`` (a tensor) the result is written there."""
        self._warn_few_pairs(stacklevel=4)
        unpaired = set(self.unpaired_languages_)
        return rotate_by_language(
            self,
            X,
            languages,
            skip=self.pivot,
            not_ready=lambda lab: lab in unpaired,
            not_ready_message=f"have no pairs with the pivot {self.pivot!r} yet; partial_fit "
            "rows paired with pivot rows before transforming them.",
            out=out,
        )

    def fit_transform(self, X, y=None, languages=None, pair_ids=None):
        """Fit, then transform ``X`` (languages reach both steps)."""
        return self.fit(X, y, languages=languages, pair_ids=pair_ids).transform(
            X, languages=languages
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        return tags
