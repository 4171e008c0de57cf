"""Input validation shared by every estimator and metric.

Every error says what was wrong and how to fix it.  Nothing here copies the
caller's data unless a dtype conversion is unavoidable (e.g. integers to float64),
and nothing mutates it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.utils import check_array as _sk_check_array

from ._backend import Backend, backend_for

__all__ = [
    "ALL_ROWS",
    "NonNumericDataError",
    "check_X",
    "check_labels",
    "check_languages",
    "check_pair_ids",
    "raise_non_finite",
]


class NonNumericDataError(ValueError, TypeError):
    """``X`` holds values that are not numbers (strings, arbitrary objects).

    A ValueError (as every input error of the package) and a TypeError (what
    scikit-learn's ``check_array`` raises for objects such as dicts, and what its
    estimator checks expect), so handlers written for either keep working.
    """


#: Language label given to every row when ``languages`` is omitted.
ALL_ROWS = "__all__"


def _ndim_hint(got: int, want: int) -> str:
    """How to fix an input with ``got`` dimensions where ``want`` are expected."""
    if want == 2 and got == 3:
        return (
            "For a stack of layers (n_rows, n_layers, n_features) wrap the estimator in "
            "PerLayer(est, layers=...) (or use RotateAlign), or pick one layer with X[:, i]."
        )
    if want == 2 and got == 1:
        return "Reshape a single row with X.reshape(1, -1)."
    if want == 3 and got == 2:
        return (
            "This estimator takes a layer stack; use the inner estimator on a single layer, "
            "or add a layer axis with X[:, None, :]."
        )
    if want == 3 and got == 1:
        return "Reshape a single row of one layer with X.reshape(1, 1, -1)."
    return ""


def check_X(
    X: Any,
    *,
    ndim: int = 2,
    name: str = "X",
    estimator: Any = None,
    min_rows: int = 1,
    keep_float16: bool = False,
) -> tuple[Backend, Any]:
    """Validate a data array and return ``(backend, X)``.

    numpy-like input goes through :func:`sklearn.utils.check_array` (lists become
    arrays, integers become float64, complex and string data are rejected with
    scikit-learn's messages); float32/float64 arrays are returned without a copy.
    torch tensors stay tensors on their device.  Finiteness is checked later, in
    the same pass that computes statistics (see :func:`raise_non_finite`), so
    validation costs no extra pass over the data.

    With ``keep_float16`` (the estimators) a float16 array is returned as is too:
    it is computed in a wider dtype and the output cast back to float16 (see
    :meth:`~posthoc_align._backend.Backend.from_torch`), as scikit-learn's
    ``StandardScaler`` keeps float16.  Otherwise it becomes float64.
    """
    if isinstance(X, torch.Tensor):
        if X.ndim != ndim:
            raise ValueError(
                f"Expected a {ndim}-D tensor {name} of shape "
                f"{'(n_rows, n_features)' if ndim == 2 else '(n_rows, n_layers, n_features)'}, "
                f"got shape {tuple(X.shape)}. " + _ndim_hint(X.ndim, ndim)
            )
        if X.is_complex() or X.dtype == torch.bool:
            raise ValueError(f"{name} has dtype {X.dtype}; pass real floating-point data.")
        if not X.is_floating_point():
            X = X.to(torch.float64)
        if X.shape[0] < min_rows:
            raise ValueError(
                f"Found array with {X.shape[0]} sample(s) (shape={tuple(X.shape)}) while a "
                f"minimum of {min_rows} is required."
            )
        if X.shape[-1] < 1:
            raise ValueError(
                f"Found array with 0 feature(s) (shape={tuple(X.shape)}) while a minimum of 1 "
                "is required."
            )
        return backend_for(X), X
    kind = type(X).__module__.split(".")[0]
    if kind == "dask":
        raise TypeError(
            "dask arrays are supported through the estimator's fit/transform entry points only"
        )
    kind_in = getattr(X, "dtype", None)
    if kind_in is None and isinstance(X, list | tuple) and len(X):
        # a look at the first entry, not a second conversion of a possibly large list
        first = X[0][0] if isinstance(X[0], list | tuple) and len(X[0]) else X[0]
        if isinstance(first, str | bytes):
            kind_in = np.asarray([first]).dtype
    if getattr(kind_in, "kind", None) in ("U", "S"):
        raise ValueError(
            f"{name} holds strings (dtype {kind_in}); pass numeric data. If the strings "
            f"are numbers, convert them first, e.g. {name}.astype(np.float32); to encode "
            "text, use posthoc_align.encoders.HFEncoder / TextEncoder."
        )
    try:
        X = _sk_check_array(
            X,
            dtype=[np.float64, np.float32, np.float16]
            if keep_float16
            else [np.float64, np.float32],
            ensure_all_finite=False,
            allow_nd=ndim > 2,
            ensure_min_samples=min_rows,
            estimator=estimator,
            input_name=name,
        )
    except (ValueError, TypeError) as exc:
        # "could not convert string to float" (ValueError) or, for arbitrary objects,
        # "float() argument must be a string or a real number" (TypeError); other
        # TypeErrors (e.g. sparse input) are scikit-learn's own and kept
        if "could not convert" in str(exc) or "argument must be" in str(exc):
            shape = "(n_rows, n_features)" if ndim == 2 else "(n_rows, n_layers, n_features)"
            raise NonNumericDataError(
                f"{name} holds non-numeric values ({exc}); pass a numeric array of shape {shape}."
            ) from exc
        if isinstance(exc, TypeError):
            raise
        got = np.ndim(X) if isinstance(X, np.ndarray) else None
        if got is not None and got > ndim:
            raise ValueError(f"{exc} {_ndim_hint(got, ndim)}") from exc
        raise
    if X.ndim != ndim:
        shape = "(n_rows, n_features)" if ndim == 2 else "(n_rows, n_layers, n_features)"
        raise ValueError(
            f"Expected a {ndim}-D array {name} of shape {shape}, got shape {X.shape}. "
            + _ndim_hint(X.ndim, ndim)
        )
    return backend_for(X), X


def raise_non_finite(X: Any, name: str = "X", offset: int = 0) -> None:
    """Raise a ValueError naming the first row of ``X`` that holds NaN or inf.

    Called when a sum or an output came out non-finite.  If ``X`` itself is finite,
    the computation overflowed (values too large for the dtype) and the message
    says so instead.
    """
    T = X if isinstance(X, torch.Tensor) else torch.as_tensor(np.asarray(X))
    bad = ~torch.isfinite(T.reshape(T.shape[0], -1)).all(dim=1)
    rows = torch.nonzero(bad).flatten()
    if rows.numel():
        raise ValueError(
            f"Input {name} contains NaN or infinity (first at row {int(rows[0]) + offset}, "
            f"{int(rows.numel())} row(s) in that block). Remove or impute those rows "
            "(e.g. with sklearn.impute.SimpleImputer) first."
        )
    big = float(T.abs().max()) if T.numel() else 0.0
    raise ValueError(
        f"Input {name} is finite, but computing with it overflowed to infinity or NaN in "
        f"{str(T.dtype).replace('torch.', '')} (largest |value| {big:.3g}). Rescale {name} "
        "(e.g. divide by its largest value) or pass float64 data."
    )


def _is_missing(v: Any) -> bool:
    """None, a float NaN, or pandas' NA/NaT (without importing pandas)."""
    if v is None:
        return True
    if isinstance(v, float | np.floating):
        return bool(np.isnan(v))
    return type(v).__name__ in ("NAType", "NaTType")


def _to_1d_numpy(values: Any, name: str, n_rows: int) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    elif hasattr(values, "compute") and type(values).__module__.split(".")[0] == "dask":
        values = values.compute()
    if isinstance(values, str):
        raise TypeError(
            f"{name} must be one label per row, got the single string {values!r}. "
            f"Pass e.g. [{values!r}] * n_rows."
        )
    arr = np.asarray(values)
    if arr.dtype.kind == "U" and not isinstance(values, np.ndarray) and arr.ndim == 1:
        # numpy turns a list mixing strings and numbers into strings (1 and "1" would
        # become one label): keep the objects, so the mixed types are caught below
        if not all(isinstance(v, str) for v in values):
            arr = np.empty(len(values), dtype=object)
            arr[:] = list(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one label per row); got shape {arr.shape}.")
    if arr.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {arr.shape[0]} entries but X has {n_rows} rows; "
            f"pass exactly one {name[:-1] if name.endswith('s') else name} per row of X."
        )
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN; every row needs a label.")
    if arr.dtype.kind == "O":
        values_list = arr.tolist()
        missing = next((i for i, v in enumerate(values_list) if _is_missing(v)), None)
        if missing is not None:
            raise ValueError(
                f"{name} contains a missing value ({values_list[missing]!r} at row {missing}); "
                "every row needs a label. Fill or drop those rows (e.g. Series.fillna / "
                "dropna) first."
            )
        kinds = {type(v) for v in arr.tolist()}
        if len(kinds) > 1 and not all(issubclass(k, (int, np.integer)) for k in kinds):
            if all(issubclass(k, str | np.str_) for k in kinds):
                arr = arr.astype(str)
            else:
                raise TypeError(
                    f"{name} mixes label types {sorted(k.__name__ for k in kinds)}; "
                    "use one type (e.g. all strings)."
                )
        else:
            arr = np.asarray(arr.tolist())
    return arr


#: Odd 64-bit multipliers for the bucket hash of :func:`_bucket_codes` (a second one is
#: tried when two distinct keys share a bucket under the first).
_MULTIPLIERS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F))
_BUCKET_BITS = 16


def _bucket_codes(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(one row per distinct key in key order, codes)`` in O(n), or None.

    Keys are hashed into 2**16 buckets (multiplicative hashing); one representative row
    per bucket is stored and every key is checked against its bucket's representative,
    so the result is exact whenever it is returned. With few distinct keys (languages)
    this replaces ``np.unique``'s O(n log n) sort by four vectorised O(n) passes (~3 ms
    instead of ~8-27 ms for 200,000 labels). None when distinct keys collide.
    """
    n = keys.shape[0]
    size = 1 << _BUCKET_BITS
    lo = keys.min()
    if keys.max() - lo < size:  # small key range (e.g. two-letter codes): direct, exact
        b = (keys - lo).view(np.int64)
        occupied = np.flatnonzero(np.bincount(b, minlength=size))
        firsts = np.empty(size, dtype=np.int64)
        firsts[b] = np.arange(n)
        lut = np.empty(size, dtype=np.int64)
        lut[occupied] = np.arange(occupied.size)
        return firsts[occupied], lut[b]
    rows = np.arange(n)
    for mult in _MULTIPLIERS:
        b = ((keys * mult) >> np.uint64(64 - _BUCKET_BITS)).view(np.int64)
        rep = np.empty(size, dtype=np.int64)
        rep[b] = rows  # any row of the bucket will do: all are checked below
        if np.array_equal(keys[rep[b]], keys):
            occupied = np.flatnonzero(np.bincount(b, minlength=size))
            firsts = rep[occupied]
            order = np.argsort(keys[firsts], kind="stable")
            lut = np.empty(size, dtype=np.int64)
            lut[occupied[order]] = np.arange(order.size)
            return firsts[order], lut[b]
    return None


def _exact_keys(arr: np.ndarray) -> np.ndarray | None:
    """Order-preserving exact ``uint64`` keys, or None when the labels do not fit.

    Strings of up to 8 characters below U+0100 (ISO codes, ``"eng_Latn"``) pack one byte
    per character, first character in the top byte of the ``8 * width`` used (numpy
    orders strings by code point, shorter ones first: the zero padding keeps that order); integers and booleans map
    monotonically (sign bit flipped).
    """
    n = arr.shape[0]
    if arr.dtype.kind in "iub":
        if arr.dtype.kind == "u" and arr.dtype.itemsize == 8:
            return arr.astype(np.uint64)
        return arr.astype(np.int64).view(np.uint64) ^ np.uint64(1 << 63)
    if arr.dtype.kind != "U" or arr.dtype.itemsize > 32:
        return None
    u = np.ascontiguousarray(arr).view(np.uint32).reshape(n, -1)
    if u.size and u.max() > 255:
        return None
    k = u.shape[1]
    keys = np.zeros(n, dtype=np.uint64)
    for j in range(k):  # all strings are zero-padded to k characters
        keys |= u[:, j].astype(np.uint64) << np.uint64(8 * (k - 1 - j))
    return keys


def _string_hashes(arr: np.ndarray) -> np.ndarray:
    """A 64-bit polynomial hash of each string's code points (collisions possible)."""
    n = arr.shape[0]
    u = np.ascontiguousarray(arr).view(np.uint32).reshape(n, -1)
    h = np.zeros(n, dtype=np.uint64)
    for j in range(u.shape[1]):  # mod 2**64
        h *= np.uint64(1000003)
        h += u[:, j]
    return h


def factorize(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(arr, return_inverse=True)`` with int64 codes, fast for the usual layouts.

    Rows usually come grouped by language (one run per language, as a corpus is read):
    then only the first label of each run is sorted, O(n) compares instead of an
    O(n log n) string sort. Unsorted labels become ``uint64`` keys — exact and
    order-preserving for integers and for strings of up to 8 characters below U+0100,
    else a 64-bit hash of the code points checked against the strings — and the keys
    are factorised in O(n) by a verified bucket hash (:func:`_bucket_codes`), with
    ``np.unique`` on the keys as the fallback. Anything else goes to ``np.unique``.
    Same output as ``np.unique`` in every case.
    """
    n = arr.shape[0]
    if n >= 256 and arr.dtype.kind in "USiub":
        change = np.flatnonzero(arr[1:] != arr[:-1]) + 1
        if change.size < n // 16:
            starts = np.concatenate(([0], change))
            labels, inv = np.unique(arr[starts], return_inverse=True)
            lengths = np.diff(np.concatenate((starts, [n])))
            return labels, np.repeat(inv.reshape(-1).astype(np.int64), lengths)
        keys = _exact_keys(arr)
        exact = keys is not None
        if keys is None and arr.dtype.kind == "U":
            keys = _string_hashes(arr)
        if keys is not None:
            found = _bucket_codes(keys)
            if found is None:
                _, first, codes = np.unique(keys, return_index=True, return_inverse=True)
                found = first, codes.reshape(-1).astype(np.int64, copy=False)
            first, codes = found
            if exact:
                return arr[first], codes
            cand = arr[first]
            if np.array_equal(cand[codes], arr):  # no two strings shared a hash
                order = np.argsort(cand, kind="stable")
                rank = np.empty_like(order)
                rank[order] = np.arange(order.size)
                return cand[order], rank[codes].astype(np.int64, copy=False)
    labels, codes = np.unique(arr, return_inverse=True)
    return labels, codes.astype(np.int64, copy=False).reshape(-1)


class FactorizedLabels(np.ndarray):
    """A label array that carries its factorisation, so it is not redone per call.

    Made by :func:`factorized` (e.g. once by ``PerLayer`` for all of its layers). Any
    view, slice or copy of it is a plain label array again (the codes are dropped),
    so a stale factorisation can never be read.
    """

    _factors: tuple[np.ndarray, np.ndarray] | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self._factors = None


def factorized(values: Any, n_rows: int, name: str = "languages") -> Any:
    """``values`` as a :class:`FactorizedLabels` (``None`` stays ``None``)."""
    if values is None:
        return None
    arr = _to_1d_numpy(values, name, n_rows)
    out = arr.view(FactorizedLabels)
    out._factors = factorize(arr)
    return out


def check_labels(values: Any, n_rows: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(unique_labels, codes)`` for one label per row (host numpy)."""
    if isinstance(values, FactorizedLabels) and values._factors is not None:
        if values.shape[0] == n_rows:
            labels, codes = values._factors
            return labels, codes
    return factorize(_to_1d_numpy(values, name, n_rows))


def check_languages(languages: Any, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(labels, codes)``; ``None`` means every row is one language, :data:`ALL_ROWS`."""
    if languages is None:
        return np.array([ALL_ROWS]), np.zeros(n_rows, dtype=np.int64)
    return check_labels(languages, n_rows, "languages")


def check_pair_ids(pair_ids: Any, n_rows: int, *, required_by: str) -> np.ndarray:
    """Validate ``pair_ids`` (one id per row; rows sharing an id are translations)."""
    if pair_ids is None:
        raise ValueError(
            f"{required_by} needs pair_ids= (one id per row; rows sharing an id are "
            "translations of each other). With a Pipeline, enable metadata routing and call "
            "set_fit_request(languages=True, pair_ids=True) on this step."
        )
    return _to_1d_numpy(pair_ids, "pair_ids", n_rows)
