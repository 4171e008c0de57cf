"""Dask arrays: block-wise statistics reduced in a tree, lazy transforms.

``fit``/``partial_fit`` of a dask array never bring the data to the client:

1. the per-row metadata (``languages``, ``pair_ids``: one label per row, tiny
   next to the n × d data) is computed to numpy on the client;
2. one reference row per language (the shift of :class:`~posthoc_align._stats.
   LanguageMoments`) is fetched, so every block accumulates on the same shifts;
3. every row block computes its float64 moments with the same kernel as the
   numpy path, and the blocks are added pairwise in a tree (``split_every=8``);
   for Procrustes, each language's cross-products with its pivot partners are a
   dask matrix product of the gathered, row-aligned pairs, also reduced in a tree;
4. one ``dask.compute`` runs it all; the closed form (d×d SVDs) runs on the client.
   Pair products out of float64's range raise the numpy path's ``ValueError``
   (:func:`_check_pair_range`, d×d checks; only rows whose products may be
   subnormal are read again).

``transform`` returns a lazy dask array (``map_blocks`` over row blocks), each
block transformed by the fitted estimator with its slice of ``languages``.

The same blocks serve the other estimators: :func:`scatter_tree` reduces
per-block d×d scatters (:class:`~posthoc_align.axes.LanguageAxes`; the total
scatter of :class:`~posthoc_align.erasure.LanguageEraser`), and
:class:`~posthoc_align.generalized_procrustes.GeneralizedProcrustes` reduces
the weighted Gram matrix of its paired rows (gathered by pair id) so that its
iterations run on the client. Per-row metadata given as dask arrays must share
``X``'s row chunks (:func:`labels_numpy`). The metrics read dask rows lazily,
window by window (:class:`posthoc_align.metrics._similarity.DaskRows`).

The same code runs on a laptop's threads, a ``LocalCluster`` or a multi-node
cluster: connect a ``dask.distributed.Client(address)`` before calling ``fit``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

__all__ = [
    "begin_fit",
    "check_dask_X",
    "host_device",
    "is_dask",
    "labels_numpy",
    "moments_tree",
    "partial_fit_dask",
    "reference_row",
    "scatter_tree",
    "shared_shifts",
    "language_shifts",
    "transform_dask",
]

_SPLIT_EVERY = 8


def is_dask(x: Any) -> bool:
    """Whether ``x`` is a dask collection (checked without importing dask)."""
    return type(x).__module__.split(".")[0] == "dask"


def check_dask_X(X: Any, *, ndim: int = 2, name: str = "X", required_by: str | None = None) -> Any:
    """Validate a dask data array: ``ndim``, known row chunks, a real numeric dtype.

    Parameters
    ----------
    X : dask array
        The data.
    ndim : int, default=2
        The number of dimensions ``X`` must have.
    name : str, default="X"
        How ``X`` is called in error messages.
    required_by : str or None, default=None
        The name of the estimator that needs at least one row of ``X`` (as
        scikit-learn's ``ensure_min_samples=1`` for numpy input): a 0-row ``X``
        is then a ValueError, raised before anything is computed. ``None``
        accepts 0 rows.

    Returns
    -------
    X : dask array
        ``X`` with one chunk along every axis but the first (rows); dtypes
        other than float32/float64 are cast lazily to float64 (as for numpy input).
    """
    if X.ndim != ndim:
        shape = "(n_rows, n_features)" if ndim == 2 else "(n_rows, n_layers, n_features)"
        raise ValueError(f"Expected a {ndim}-D dask array {name} of shape {shape}, got {X.shape}")
    if any(np.isnan(c) for c in X.chunks[0]):
        raise ValueError(
            f"dask array {name} has unknown chunk sizes; call {name}.compute_chunk_sizes() first"
        )
    if required_by is not None and X.shape[0] == 0:  # the wording of numpy input's error
        raise ValueError(
            f"Found array with 0 sample(s) (shape={tuple(X.shape)}) while a minimum of 1 is "
            f"required by {required_by}. The dask array {name} has no rows; pass at least one."
        )
    kind = np.dtype(X.dtype).kind
    if kind not in "fiub":
        raise ValueError(f"{name} has dtype {X.dtype}; pass real floating-point data.")
    if np.dtype(X.dtype) not in (np.float32, np.float64):  # as check_X: others to float64
        X = X.astype(np.float64)
    if any(nb > 1 for nb in X.numblocks[1:]):
        X = X.rechunk({i: -1 for i in range(1, X.ndim)})
    return X


def labels_numpy(values: Any, X: Any, name: str) -> Any:
    """Per-row metadata (``languages``, ``pair_ids``, ``y``) as host numpy for a dask ``X``.

    A dask ``values`` must be 1-D with the same row chunks as ``X`` (a mismatch is
    almost always two arrays built from different sources: an error, not a silent
    realignment); it is then computed (one label per row is small next to ``X``).
    Anything else is returned unchanged for the usual validation.
    """
    if not is_dask(values):
        return values
    if values.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row); got shape {values.shape}.")
    if values.shape[0] != X.shape[0]:
        raise ValueError(
            f"{name} has {values.shape[0]} entries but X has {X.shape[0]} rows; "
            f"pass exactly one {name[:-1] if name.endswith('s') else name} per row of X."
        )
    if tuple(values.chunks[0]) != tuple(X.chunks[0]):
        raise ValueError(
            f"{name} is a dask array with row chunks {tuple(values.chunks[0])[:8]}... but X "
            f"has row chunks {tuple(X.chunks[0])[:8]}...; they must match (rows of one block "
            f"and its labels belong together). Use {name}.rechunk(X.chunks[0]) or pass "
            f"{name} as a numpy array."
        )
    return np.asarray(values.compute())


def begin_fit(est: Any, X: Any, *, first: bool) -> Any:
    """Validate a dask ``X`` for ``est.fit``/``partial_fit`` and set ``n_features_in_``.

    Returns the validated array (see :func:`check_dask_X`); a 0-row array, or a
    later batch with a different number of columns, is a ValueError (scikit-learn's
    wording), raised before anything is computed.
    """
    X = check_dask_X(X, required_by=type(est).__name__)
    d = int(X.shape[1])
    if first:
        est.n_features_in_ = d
        est.__dict__.pop("feature_names_in_", None)
    elif d != est.n_features_in_:
        raise ValueError(
            f"X has {d} features, but {type(est).__name__} is expecting "
            f"{est.n_features_in_} features as input."
        )
    return X


def host_device(est: Any) -> Any:
    """The torch device of ``est.device`` for data that arrives as numpy blocks."""
    from ._backend import _BACKENDS, resolve_device

    return resolve_device(getattr(est, "device", "auto"), _BACKENDS["numpy"], None)


def shared_shifts(moments: Any, n_labels: int, X: Any) -> np.ndarray:
    """Reference rows for ``n_labels`` languages: the moments' shared row, else ``X[0]``.

    Every language is shifted by the same row (as in :mod:`posthoc_align._stats`),
    so statistics of later batches add to earlier ones without re-expression.
    """
    if moments is not None and moments.labels:
        ref = np.asarray(moments.shift[0], dtype=np.float64)
    else:
        ref = reference_row(X)
    return np.tile(ref, (n_labels, 1))


def language_shifts(moments: Any, labels: list, codes: np.ndarray, X: Any) -> np.ndarray:
    """Reference rows for ``labels``: each language's own row, as the numpy path keeps.

    A language already in ``moments`` keeps its reference row (so its new sums add
    without re-expression); a new one gets its first row in ``X`` (one small compute
    for all of them). Own rows keep the digits of languages far apart from each
    other (a row shared by every language leaves ``Q − a aᵀ / n`` to cancel).
    """
    from ._validation import raise_non_finite

    d = int(X.shape[1])
    shift = np.zeros((len(labels), d))
    known = {} if moments is None or not moments.labels else moments.index
    new = [i for i, lab in enumerate(labels) if lab not in known]
    for i, lab in enumerate(labels):
        if lab in known:
            shift[i] = moments.shift[known[lab]]
    if new:
        first = [int(np.argmax(codes == i)) for i in new]
        rows = np.asarray(X[np.array(first)].compute(), dtype=np.float64)
        if not np.isfinite(rows).all():
            raise_non_finite(rows)
        shift[new] = rows
    return shift


def reference_row(X: Any) -> np.ndarray:
    """The first row of a dask array as float64 (the shared shift of the moments)."""
    from ._validation import raise_non_finite

    ref = np.asarray(X[0].compute(), dtype=np.float64)
    if not np.isfinite(ref).all():
        raise_non_finite(ref[None])
    return ref


def _row_blocks_of(X: Any, gcodes: np.ndarray) -> list[tuple[Any, np.ndarray, int]]:
    """``(block, its language codes, its first row)`` for every row block of ``X``."""
    bounds = np.cumsum((0, *X.chunks[0]))
    blocks = X.to_delayed().ravel()
    return [(b, gcodes[bounds[k] : bounds[k + 1]], int(bounds[k])) for k, b in enumerate(blocks)]


def _global_rows(exc: ValueError, lo: int, hi: int) -> ValueError:
    """A block's NaN/inf error restated with rows of the whole dask array."""
    import re

    msg = str(exc)
    m = re.match(r"(Input \w+ contains NaN or infinity \(first at row )(\d+)(.*)", msg, re.S)
    if m is None:
        return exc
    rest = m.group(3).replace("in that block", f"in the block of rows {lo}..{hi - 1}")
    return ValueError(f"{m.group(1)}{int(m.group(2)) + lo} of the dask array{rest}")


def moments_tree(
    X: Any,
    gcodes: np.ndarray,
    labels: list,
    shift: np.ndarray,
    second: bool,
    absolute: bool = False,
):
    """Delayed :class:`~posthoc_align._stats.LanguageMoments` of a dask ``X``.

    Every row block is accumulated on the fixed reference rows ``shift`` (one per
    label, ``gcodes`` indexing ``labels``) and the blocks are added in a tree.
    """
    import dask

    parts = [
        dask.delayed(_block_moments)(b, g, list(labels), shift, second, absolute, lo)
        for b, g, lo in _row_blocks_of(X, gcodes)
    ]
    return _tree(parts, _add_moments)


def _block_scatter(block: np.ndarray, gcodes: np.ndarray, labels, shift, lo: int = 0):
    import torch

    from ._covariance import ScatterMoments

    s = ScatterMoments.with_shifts(labels, shift)
    if block.shape[0]:
        T = torch.from_numpy(np.asarray(block, dtype=np.float64))
        try:
            s.update(T, np.asarray(labels, dtype=object), gcodes)
        except ValueError as exc:
            raise _global_rows(exc, lo, lo + block.shape[0]) from None
    return s


def _merge_scatter(*parts):
    out = parts[0]
    for p in parts[1:]:
        out.merge(p)
    return out


def _checked_scatter(s):
    return s.check_underflow()


def scatter_tree(
    X: Any,
    gcodes: np.ndarray,
    labels: list,
    shift: np.ndarray,
    *,
    keep_underflow: bool = False,
):
    """Delayed :class:`~posthoc_align._covariance.ScatterMoments` of a dask ``X``.

    Same scheme as :func:`moments_tree` (fixed shifts, so :meth:`merge` is a plain
    sum), with one d×d scatter matrix per label. Rows whose products are all
    subnormal (:attr:`~posthoc_align._covariance.ScatterMoments.underflows`, decided
    on the merged result, so whatever the chunking) raise the ``ValueError`` asking
    for a rescale, unless ``keep_underflow`` (the caller decides, e.g. at solve time
    over a whole stream).
    """
    import dask

    parts = [
        dask.delayed(_block_scatter)(b, g, list(labels), shift, lo)
        for b, g, lo in _row_blocks_of(X, gcodes)
    ]
    tree = _tree(parts, _merge_scatter)
    return tree if keep_underflow else dask.delayed(_checked_scatter)(tree)


def _block_moments(
    block: np.ndarray,
    gcodes: np.ndarray,
    labels,
    shift,
    second: bool,
    absolute: bool = False,
    lo: int = 0,
):
    import torch

    from ._stats import LanguageMoments

    m = LanguageMoments.with_shifts(labels, shift, second_moments=second, absolute=absolute)
    if block.shape[0]:
        T = torch.from_numpy(np.asarray(block, dtype=np.float64))
        try:
            m.update(T, np.asarray(labels, dtype=object), gcodes)
        except ValueError as exc:
            raise _global_rows(exc, lo, lo + block.shape[0]) from None
    return m


def _add_moments(*parts):
    out = parts[0]
    for p in parts[1:]:
        out.add(p)
    return out


def _tree(parts: list, combine):
    import dask

    while len(parts) > 1:
        parts = [
            dask.delayed(combine)(*parts[i : i + _SPLIT_EVERY])
            for i in range(0, len(parts), _SPLIT_EVERY)
        ]
    return parts[0]


def _pair_indices(labels: np.ndarray, codes: np.ndarray, pids: np.ndarray, pivot) -> dict:
    """For each non-pivot language: (row indices, pivot partner row indices)."""
    lab_list = labels.tolist()
    if pivot not in lab_list:
        return {}
    piv = lab_list.index(pivot)
    prow = np.flatnonzero(codes == piv)
    pos = {p: r for p, r in zip(pids[prow].tolist(), prow.tolist(), strict=True)}
    out = {}
    for c, lab in enumerate(lab_list):
        if c == piv:
            continue
        rows = np.flatnonzero(codes == c)
        partner = np.fromiter((pos.get(p, -1) for p in pids[rows].tolist()), np.int64, rows.size)
        hit = partner >= 0
        if hit.any():
            out[lab] = (rows[hit], partner[hit])
    return out


def partial_fit_dask(est, X, languages, pair_ids):
    """Fit-step of ``est`` on a dask array (see the module docstring).

    All or nothing: a batch that fails (NaN/inf found while computing, bad pairs)
    leaves the estimator as it was, without the languages it would have added.
    """
    saved = dict(est.__dict__)
    m = getattr(est, "_moments", None)
    fields = ("labels", "index", "counts", "shift", "sums", "sumsq", "abs_sums", "input_eps")
    m_saved = None if m is None else {f: getattr(m, f, None) for f in fields}
    if m_saved is not None:
        m_saved["labels"], m_saved["index"] = list(m.labels), dict(m.index)
    p = getattr(est, "_pairs", None)
    p_released = None if p is None else p.released
    try:
        return _partial_fit_dask(est, X, languages, pair_ids)
    except Exception:
        est.__dict__.clear()
        est.__dict__.update(saved)
        if m_saved is not None:
            for f, v in m_saved.items():
                setattr(m, f, v)
        if p is not None:
            p.released = p_released
        raise


def _partial_fit_dask(est, X, languages, pair_ids):
    import dask
    import dask.array as da

    from ._stats import input_rounding
    from ._validation import check_pair_ids

    arrived = getattr(X, "dtype", None)  # before the cast: LSAR's cut counts its rounding
    X = check_dask_X(X, required_by=type(est).__name__)
    dev = host_device(est)  # the closed form's device (a clear error for a missing GPU)
    languages = labels_numpy(languages, X, "languages")
    pair_ids = labels_numpy(pair_ids, X, "pair_ids")
    n, d = X.shape
    first = not hasattr(est, "_moments")
    if first:
        est.n_features_in_ = int(d)
    elif d != est.n_features_in_:
        raise ValueError(
            f"X has {d} features, but {type(est).__name__} is expecting "
            f"{est.n_features_in_} features as input."
        )
    labels, codes, pids = est._check_metadata(n, languages, pair_ids)
    lab_list = [lab.item() if isinstance(lab, np.generic) else lab for lab in labels.tolist()]
    if first:
        est._moments = est._new_moments()
        est._pairs = est._new_pairs()
    m = est._moments
    # reference row of every language new to the moments: one small compute
    new = [i for i, lab in enumerate(lab_list) if lab not in m.index and (codes == i).any()]
    if new:
        if m.second_moments:
            # each language's own first row (see LanguageMoments._reference_rows): one
            # small compute of a row per new language
            first = [int(np.argmax(codes == i)) for i in new]
            rows = np.asarray(X[np.array(first)].compute(), dtype=np.float64)
            if not np.isfinite(rows).all():
                from ._validation import raise_non_finite

                raise_non_finite(rows)
        else:
            # the shared reference row (see _stats): the moments' own, or this array's first
            ref = m.shift[0] if m.labels else reference_row(X)
            rows = np.tile(ref, (len(new), 1))
        if m.shift is None:
            m.shift, m.sums = np.zeros((0, d)), np.zeros((0, d))
            m.sumsq = np.zeros((0, d)) if m.second_moments else None
            m.abs_sums = np.zeros(d) if getattr(m, "absolute", False) else None
        for i in new:
            m.index[lab_list[i]] = len(m.labels)
            m.labels.append(lab_list[i])
        m.shift = np.vstack([m.shift, rows])
        m.sums = np.vstack([m.sums, np.zeros_like(rows)])
        m.counts = np.concatenate([m.counts, np.zeros(len(new))])
        if m.second_moments:
            m.sumsq = np.vstack([m.sumsq, np.zeros_like(rows)])
    lut = np.array([m.index.get(lab, -1) for lab in lab_list], dtype=np.int64)
    gcodes = lut[codes]
    todo = {
        "moments": moments_tree(
            X, gcodes, list(m.labels), m.shift, m.second_moments, getattr(m, "absolute", False)
        )
    }
    pairs = getattr(est, "_pairs", None)
    if pairs is not None:
        if pairs.has_buffers():
            raise ValueError(
                f"{type(est).__name__}: cannot add a dask array to a fit whose numpy batches "
                "still hold rows waiting for pivot partners; fit on the dask array alone (or "
                "stream numpy chunks with partial_fit)."
            )
        pids = check_pair_ids(pids, n, required_by=type(est).__name__)
        _check_unique_pairs(labels, codes, pids)
        piv = pairs.pivot
        matched = _pair_indices(labels, codes, pids, piv)
        # a dask batch is paired within itself (its rows are not kept for later batches)
        lab_list_ = labels.tolist()
        piv_code = lab_list_.index(piv) if piv in lab_list_ else -1
        n_piv = int((codes == piv_code).sum())
        used_piv = len(np.unique(np.concatenate([par for _, par in matched.values()] or [[]])))
        n_unpaired = (n - n_piv) - sum(len(src) for src, _ in matched.values())
        n_unpaired += n_piv - used_piv
        if n_unpaired and not getattr(est, "_fitting_once", False):
            warnings.warn(
                f"{type(est).__name__}.partial_fit: {n_unpaired} row(s) of this dask batch have "
                "no translation partner in it and are left out: a dask batch is paired within "
                "itself, its rows are not kept for later batches. Put every translation of a "
                "sentence in the same dask batch (e.g. one fit() on the whole dask array), or "
                "stream numpy batches, which are buffered until their partners arrive.",
                UserWarning,
                stacklevel=4,
            )
        pairs.released = True  # later numpy batches cannot pair with this batch's rows
        pair_rows = {}
        for lab, (src, par) in matched.items():
            ka = m.shift[m.index[lab]]
            kb = m.shift[m.index[piv]]
            A = X[src].astype(np.float64) - ka
            B = X[par].astype(np.float64).rechunk({0: A.chunks[0]}) - kb
            pair_rows[lab] = (A, B)
            todo[lab] = (
                da.matmul(A.T, B),
                A.sum(axis=0, split_every=_SPLIT_EVERY),
                B.sum(axis=0, split_every=_SPLIT_EVERY),
                src.size,
            )
    (res,) = dask.compute(todo)
    if pairs is not None:
        _check_pair_range(res, pair_rows)
    m.add(res.pop("moments"))
    m.input_eps = max(m.input_eps, input_rounding(arrived if arrived is not None else X.dtype))
    if pairs is not None:
        for lab, (S, sa, sb, cnt) in res.items():
            pairs.add_moments(lab, np.asarray(S), np.asarray(sa), np.asarray(sb), cnt)
    est._finalize(dev)
    return est


def _check_pair_range(res: dict, pair_rows: dict) -> None:
    """Raise the numpy path's ValueError for pair products out of float64's range.

    ``res[lab]`` holds the computed cross-product ``S = Σ(a − k_a)(b − k_b)ᵀ`` of the
    rows shifted by the reference rows, ``pair_rows[lab]`` the dask arrays of those
    shifted rows. Overflow is a d×d check; underflow is decided as on the numpy path
    (:func:`~posthoc_align._stats.cross_underflows`): only where ``max|S|`` is below
    ``n·TINY_CROSS64`` (rare) are the rows' largest ``|values|`` computed, one more
    dask pass over the pairs of those languages.
    """
    import dask

    from ._stats import cross_range_error, cross_underflows

    for lab in pair_rows:
        S, sa, sb, _ = res[lab]
        if not (np.isfinite(S).all() and np.isfinite(sa).all() and np.isfinite(sb).all()):
            raise cross_range_error(lab, overflow=True)

    def extremes(A: Any, B: Any) -> tuple[float, float]:
        amax, bmax = dask.compute(abs(A).max(), abs(B).max())
        return float(amax), float(bmax)

    for lab, (A, B) in pair_rows.items():
        S, _, _, cnt = res[lab]
        big = float(np.abs(S).max()) if np.size(S) else 0.0
        if cross_underflows(big, cnt, lambda A=A, B=B: extremes(A, B)):
            raise cross_range_error(lab, overflow=False)


def _check_unique_pairs(labels, codes, pids):
    _, pid_codes = np.unique(pids, return_inverse=True)
    key = codes * (pid_codes.max() + 1) + pid_codes.reshape(-1)
    _, cnt = np.unique(key, return_counts=True)
    if (cnt > 1).any():
        raise ValueError(
            "a pair_id occurs more than once within one language; within a language each "
            "pair_id must be unique (rows sharing a pair_id are translations)."
        )


def _transform_block(block, est, langs, out_tail=None, out_dtype=None, block_info=None):
    from .per_layer import _accepted

    if block.shape[0] == 0:  # an empty row chunk (e.g. after boolean indexing): nothing to do
        tail = block.shape[1:] if out_tail is None else out_tail
        return np.empty((0, *tail), dtype=block.dtype if out_dtype is None else out_dtype)
    loc = block_info[0]["array-location"][0] if block_info else (0, block.shape[0])
    kw = {} if langs is None else {"languages": langs[loc[0] : loc[1]]}
    try:
        return est.transform(block, **_accepted(est.transform, **kw))
    except ValueError as exc:
        raise _global_rows(exc, loc[0], loc[1]) from None


def transform_dask(est, X, languages, n_features_out: int | None = None):
    """Lazy ``est.transform`` of a dask array, block by block of rows.

    ``n_features_out``: the number of output columns when it differs from the
    input's (2-D only), e.g. :class:`~posthoc_align.axes.LanguageAxes` keeping
    ``n_neutral_`` coordinates.
    """
    from ._validation import _to_1d_numpy

    # 0 rows in all is an error, as for numpy input; empty row chunks of a non-empty
    # array are fine (their blocks are transformed to empty blocks)
    X = check_dask_X(X, ndim=X.ndim, required_by=type(est).__name__)
    languages = labels_numpy(languages, X, "languages")
    langs = None if languages is None else _to_1d_numpy(languages, "languages", X.shape[0])
    # what can be checked without computing anything is checked now, not at .compute()
    n_in = getattr(est, "n_features_in_", None)
    if n_in is not None and X.shape[-1] != n_in:
        raise ValueError(
            f"X has {X.shape[-1]} features, but {type(est).__name__} is expecting {n_in} "
            "features as input."
        )
    if (
        langs is not None
        and hasattr(est, "languages_")
        and getattr(est, "unknown_language", "error") == "error"
        and getattr(est, "mode", "fitted") != "batch"
    ):
        from ._validation import check_languages

        est._fitted_codes(*check_languages(langs, X.shape[0]), policy="error")
    if X.ndim == 2:
        est = _with_call_statistics(est, X, langs, languages is None)
    dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.float64
    kw = {}
    tail = tuple(int(c) for c in X.shape[1:])
    if n_features_out is not None and n_features_out != X.shape[-1]:
        kw["chunks"] = (X.chunks[0], (int(n_features_out),))
        tail = (*tail[:-1], int(n_features_out))
    return X.map_blocks(
        _transform_block,
        est,
        langs,
        out_tail=tail,
        out_dtype=np.dtype(dtype),
        dtype=dtype,
        meta=np.empty((0,) * X.ndim, dtype=dtype),
        **kw,
    )


def _with_call_statistics(est: Any, X: Any, langs: np.ndarray | None, no_labels: bool) -> Any:
    """``est``, or for transforms that use the statistics of the rows in the call
    (``LanguageStandardizer(mode="batch")``, ``unknown_language="batch"``) a copy of
    it fixed to those statistics over the *whole* dask array (one pass, now), so the
    lazy block-wise transform equals the numpy one whatever the chunking.
    """
    import copy

    import dask

    from ._validation import ALL_ROWS, check_languages
    from .centering import LanguageMeanCentering
    from .standardization import LanguageStandardizer, _small_languages, _warn_small

    batch_std = isinstance(est, LanguageStandardizer) and est.mode == "batch"
    batch_centre = isinstance(est, LanguageMeanCentering) and est.unknown_language == "batch"
    if not (batch_std or batch_centre):
        return est
    n = X.shape[0]
    labels, codes = check_languages(langs, n)
    if batch_centre:
        _, unknown = est._fitted_codes(labels, codes, policy="batch")
        if not unknown:
            return est
        if unknown == [ALL_ROWS] and no_labels:
            warnings.warn(
                f"transform got no languages= although LanguageMeanCentering was fitted with "
                f"{est.languages_.tolist()}: every row is treated as one unseen language "
                "(unknown_language='batch'). Pass languages= (in a Pipeline, turn on "
                "metadata routing) unless that is what you want.",
                UserWarning,
                stacklevel=4,
            )
    lab_list = [lab.item() if isinstance(lab, np.generic) else lab for lab in labels.tolist()]
    # each language's own first row as its reference (variances need it)
    first = np.array([int(np.argmax(codes == i)) for i in range(len(lab_list))])
    shift = np.asarray(X[first].compute(), dtype=np.float64)
    if not np.isfinite(shift).all():
        from ._validation import raise_non_finite

        raise_non_finite(shift)
    (m,) = dask.compute(moments_tree(X, codes, lab_list, shift, batch_std))
    frozen = copy.copy(est)
    if batch_std:
        small = _small_languages(lab_list, m.counts)
        # stacklevel: the user's transform call (through transform_dask, sklearn's wrapper)
        _warn_small(small, "in this call", stacklevel=6)
        frozen.mode = "fitted"
        frozen.languages_ = labels  # in the order of the moments (not sorted)
        frozen.counts_ = m.counts.astype(np.int64)
        frozen._small_warned = small  # warned above, once: not again for every block
        frozen.means_, frozen.vars_ = m.means(), m.variances()
        return frozen
    means = m.means()
    idx = [lab_list.index(lab) for lab in unknown]
    frozen.unknown_language = "error"
    frozen.languages_ = np.asarray(est.languages_.tolist() + list(unknown))
    frozen.means_ = np.vstack([est.means_, means[idx]])
    return frozen
