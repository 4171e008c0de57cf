"""EmbeddingCache: encode a corpus once into a zarr store, then stream it into every fit.

The store is a zarr group (a directory) holding

- ``embeddings``: uncompressed float32 (or float16) array of shape ``(n_rows, n_layers, dim)``,
  one chunk per ``chunk_rows`` rows holding every layer (``n_layers`` counts the embedding layer, so it
  is ``encoder.n_layers + 1`` with ``layers="all"``);
- per-row ``languages`` (str), ``pair_ids`` (stored as str, with their original kind, ``"int"``
  or ``"str"``, in the attributes), ``labels`` (int64) where given, and ``text_sha1`` (the
  SHA-1 of each UTF-8 text, 20 bytes a row) for caches built from text;
- attributes: the encoder's model, pooling, prefix and max_length, the precision its forward
  pass ran in (``compute_dtype``, ``cast_weights``), the layer selection,
  hidden size, dtype, library and format versions, rows planned, rows completed and a
  ``complete`` flag that is set only once every row is written.

Builds write one chunk at a time and record ``rows_completed`` after each, so an interrupted
build resumes where it stopped, and memory stays at about one chunk whatever the corpus size.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ._version import __version__

__all__ = ["FORMAT_VERSION", "CachedLayer", "EmbeddingCache"]

logger = logging.getLogger(__name__)

#: Version of the on-disk layout; a store written with another one is refused.
FORMAT_VERSION = 1
_FORMAT_NAME = "posthoc_align.EmbeddingCache"
_DTYPES = ("float32", "float16")
_SHA_BYTES = 20
# Attributes that describe how the embeddings were made; they must agree to append or resume.
_ENCODER_KEYS = (
    "model",
    "pooling",
    "prefix",
    "max_length",
    "encoder_n_layers",
    "layers",
    "hidden_size",
    "dtype",
    "compute_dtype",
    "cast_weights",
)
# What a cache written before an attribute existed recorded implicitly: every encoder ran in
# float32 before the compute precision was recorded.
_LEGACY_ENCODER_ATTRS = {"compute_dtype": "float32", "cast_weights": False}
# Attributes that only the cache itself may set (``from_arrays(attrs=...)`` cannot).
_RESERVED_KEYS = frozenset(
    {
        "format",
        "format_version",
        "library_version",
        "zarr_version",
        "source",
        "n_layers",
        "hidden_size",
        "dtype",
        "chunk_rows",
        "n_rows_planned",
        "rows_completed",
        "complete",
        "append_start",
        "pair_ids_kind",
        "fields",
    }
)
_FROM_ARRAYS_KEYS = (
    "model",
    "pooling",
    "prefix",
    "max_length",
    "encoder_n_layers",
    "layers",
    "compute_dtype",
    "cast_weights",
)

Progress = bool | Callable[[int, int], Any] | None
LayerSpec = int | Sequence[int] | None
RowSpec = slice | Sequence[int] | Sequence[bool] | np.ndarray | None


# --------------------------------------------------------------------------------------------
# zarr 2 / zarr 3 compatibility (the only version-specific code)
# --------------------------------------------------------------------------------------------


def _write_context() -> contextlib.AbstractContextManager[Any]:
    """Write every chunk, even one equal to the fill value, so missing chunks mean truncation.

    zarr 3 reads this setting when an array is opened, so open arrays inside the context;
    zarr 2 (>= 2.11) writes empty chunks by default.
    """
    config = getattr(zarr, "config", None)
    if config is None:
        return contextlib.nullcontext()
    return config.set({"array.write_empty_chunks": True})


def _create_array(
    group: Any, name: str, shape: tuple, chunks: tuple, dtype: Any, fill: Any, compress: bool = True
) -> Any:
    kw: dict[str, Any] = dict(shape=shape, chunks=chunks, dtype=dtype, fill_value=fill)
    if hasattr(group, "create_array"):  # zarr 3
        return group.create_array(name, **kw, **({} if compress else {"compressors": None}))
    return group.create_dataset(name, **kw, **({} if compress else {"compressor": None}))


def _n_chunks_written(array: Any) -> int:
    n = array.nchunks_initialized
    return int(n() if callable(n) else n)


def _open_group(path: Path, mode: str) -> Any:
    return zarr.open_group(str(path), mode=mode)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check_dtype(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
    return name


def _check_chunk_rows(chunk_rows: Any, name: str = "chunk_rows") -> int:
    if (
        isinstance(chunk_rows, bool)
        or not isinstance(chunk_rows, int | np.integer)
        or chunk_rows < 1
    ):
        raise ValueError(f"{name} must be a positive int, got {chunk_rows!r}.")
    return int(chunk_rows)


def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        raise TypeError(
            f"texts must be a sequence of strings, got the single string {texts[:40]!r}; "
            "pass [text] for one text."
        )
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(
            f"texts must be a sequence of strings, got {type(texts).__name__}."
        ) from None
    if not texts:
        raise ValueError("texts is empty; pass at least one text to encode.")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(
                f"texts[{i}] is a {type(t).__name__}, not a str; every text must be a str."
            )
    return texts


def _as_1d(values: Any, name: str, n_rows: int) -> np.ndarray:
    if isinstance(values, str):
        raise TypeError(
            f"{name} must hold one entry per row, got the single string {values!r}; "
            f"pass e.g. [{values!r}] * n_rows."
        )
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype.kind == "U" and arr.ndim == 1 and not isinstance(values, np.ndarray):
        # numpy turns [None, "en"] or [1, "en"] into strings ("None", "1"): keep the
        # objects, so the missing value or the non-string is caught
        items = list(values)
        if not all(isinstance(v, str) for v in items):
            arr = np.empty(len(items), dtype=object)
            arr[:] = items
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per row), got shape {arr.shape}.")
    if arr.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {arr.shape[0]} entries but there are {n_rows} rows; "
            f"pass exactly one entry of {name} per row."
        )
    return arr


def _to_str(values: np.ndarray) -> np.ndarray:
    """A fixed-width numpy str array (zarr returns object or StringDType arrays)."""
    if values.dtype.kind == "U":
        return values
    return np.array(values.tolist(), dtype=str).reshape(values.shape)


def _refuse_missing(arr: np.ndarray, name: str, what: str = "a label") -> None:
    """A missing entry (None, NaN, pandas' NA/NaT) is an error naming its row, as in the
    estimators; stored as is, ``None`` would become the string ``"None"``."""
    from ._validation import _is_missing

    if arr.dtype.kind == "f":
        rows = np.flatnonzero(np.isnan(arr))
        row = int(rows[0]) if rows.size else None
    elif arr.dtype.kind == "O":
        row = next((i for i, v in enumerate(arr.tolist()) if _is_missing(v)), None)
    else:
        return
    if row is not None:
        raise ValueError(
            f"{name} contains a missing value ({arr[row]!r} at row {row}); every row needs "
            f"{what}. Fill or drop those rows (e.g. Series.fillna / dropna) first."
        )


def _check_strings(values: Any, name: str, n_rows: int) -> np.ndarray:
    arr = _as_1d(values, name, n_rows)
    if arr.dtype.kind == "U":
        return arr
    _refuse_missing(arr, name)
    if arr.dtype.kind == "O" or arr.dtype.kind == "T":
        for v in arr.tolist():
            if not isinstance(v, str):
                raise TypeError(f"{name} must be strings; found {v!r} ({type(v).__name__}).")
        return _to_str(arr)
    raise TypeError(f"{name} must be strings, got an array of dtype {arr.dtype}.")


def _int_str(values: Any) -> np.ndarray:
    """Ints as a str array just wide enough (``astype(str)`` gives 21 characters, 84 B a row)."""
    ints = np.asarray(values, dtype=np.int64)
    width = max(len(str(int(ints.min()))), len(str(int(ints.max())))) if ints.size else 1
    return ints.astype(f"U{width}")


def _check_pair_ids(pair_ids: Any, n_rows: int) -> tuple[np.ndarray, str]:
    """Return pair ids as a str array and their kind, ``"int"`` or ``"str"``."""
    arr = _as_1d(pair_ids, "pair_ids", n_rows)
    _refuse_missing(arr, "pair_ids", "a pair id")
    if arr.dtype.kind in "iu":
        return _int_str(arr), "int"
    if arr.dtype.kind in "UOT":
        values = arr.tolist()
        if all(isinstance(v, str) for v in values):
            return _to_str(arr), "str"
        if all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
            return _int_str(values), "int"
    raise TypeError(
        f"pair_ids must be all ints or all strings, got dtype {arr.dtype}; "
        "convert them first, e.g. np.asarray(pair_ids).astype(str)."
    )


def _check_labels(labels: Any, n_rows: int) -> np.ndarray:
    arr = _as_1d(labels, "labels", n_rows)
    _refuse_missing(arr, "labels")
    if arr.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {arr.dtype}.")
    return arr.astype(np.int64)


def _row_fields(
    n_rows: int, languages: Any, pair_ids: Any, labels: Any
) -> tuple[dict[str, np.ndarray], str | None]:
    fields: dict[str, np.ndarray] = {}
    kind = None
    if languages is not None:
        fields["languages"] = _check_strings(languages, "languages", n_rows)
    if pair_ids is not None:
        fields["pair_ids"], kind = _check_pair_ids(pair_ids, n_rows)
    if labels is not None:
        fields["labels"] = _check_labels(labels, n_rows)
    return fields, kind


def _text_sha1(texts: Sequence[str]) -> np.ndarray:
    digest = b"".join(hashlib.sha1(t.encode("utf-8")).digest() for t in texts)
    return np.frombuffer(digest, dtype=np.uint8).reshape(len(texts), _SHA_BYTES)


def _json_layers(layers: Any) -> str | list[int]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an int or a sequence of ints, got {layers!r}.")
        return "all"
    if isinstance(layers, int | np.integer) and not isinstance(layers, bool):
        return [int(layers)]
    try:
        out = [int(i) for i in layers]
    except (TypeError, ValueError):
        raise ValueError(
            f"layers must be 'all', an int or a sequence of ints, got {layers!r}."
        ) from None
    if not out:
        raise ValueError("layers is empty; pass 'all' or at least one layer index.")
    return out


def _takes_languages(fn: Any) -> bool:
    import inspect

    try:
        return "languages" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _encoder_attrs(encoder: Any, layers: Any, dtype: str) -> dict[str, Any]:
    from .encoders._identity import encoder_identity, encoder_precision

    model = encoder_identity(encoder)
    compute_dtype, cast_weights = encoder_precision(encoder)
    n_layers = getattr(encoder, "n_layers", None)
    hidden = getattr(encoder, "hidden_size", None)
    max_length = getattr(encoder, "max_length", None)
    return {
        "model": str(model),
        "pooling": getattr(encoder, "pooling", None),
        "prefix": getattr(encoder, "prefix", None),
        "max_length": None if max_length is None else int(max_length),
        "encoder_n_layers": None if n_layers is None else int(n_layers),
        "layers": _json_layers(layers),
        "hidden_size": None if hidden is None else int(hidden),
        "dtype": dtype,
        "compute_dtype": compute_dtype,
        "cast_weights": cast_weights,
    }


def _check_same_encoder(stored: dict[str, Any], new: dict[str, Any], action: str) -> None:
    stored = {**_LEGACY_ENCODER_ATTRS, **stored}  # a cache from before: computed in float32
    diffs = [
        f"{key}: cache has {stored.get(key)!r}, now {new[key]!r}"
        for key in _ENCODER_KEYS
        if new.get(key) is not None and stored.get(key) != new[key]
    ]
    # a cache whose value is unknown (None) cannot vouch for the new one either
    diffs += [
        f"{key}: cache has {stored.get(key)!r}, now {new[key]!r}"
        for key in ("model", "pooling", "prefix", "max_length", "layers", "dtype")
        if new.get(key) is None and stored.get(key) is not None
    ]
    if diffs:
        raise ValueError(
            f"Cannot {action}: the embeddings would come from a different encoder setup "
            f"({'; '.join(diffs)}). Use a new path for these embeddings, or pass the same "
            "encoder settings."
        )


def _check_same_fields(
    attrs: dict[str, Any], fields: dict[str, np.ndarray], kind: str | None, action: str
) -> None:
    stored = set(attrs["fields"]) - {"text_sha1"}
    given = set(fields)
    if stored != given:
        missing = sorted(stored - given)
        extra = sorted(given - stored)
        parts = ([f"pass {', '.join(missing)}"] if missing else []) + (
            [f"drop {', '.join(extra)} (the cache has none)"] if extra else []
        )
        raise ValueError(
            f"Cannot {action}: the cache stores {sorted(stored)}; {' and '.join(parts)}."
        )
    if "pair_ids" in given and attrs.get("pair_ids_kind") != kind:
        raise ValueError(
            f"Cannot {action}: the cache's pair_ids are {attrs.get('pair_ids_kind')}s but these "
            f"are {kind}s; pass pair_ids of the same kind."
        )


def _show_progress(progress: Progress, total: int, initial: int) -> Any:
    if callable(progress):
        return None
    show = logger.isEnabledFor(logging.INFO) if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="row", desc="encoding")


# --------------------------------------------------------------------------------------------
# the on-disk writer (shared by build and from_arrays)
# --------------------------------------------------------------------------------------------


def _inspect(path: Path) -> dict[str, Any] | None:
    """Attributes of the cache at ``path``; ``None`` if nothing is there (or an empty folder)."""
    if not path.exists():
        return None
    if path.is_dir() and not any(path.iterdir()):
        return None
    return _read_cache_attrs(path)


def _read_cache_attrs(path: Path) -> dict[str, Any]:
    hint = "Pass the folder that EmbeddingCache.build or EmbeddingCache.from_arrays wrote."
    if not path.is_dir():
        raise ValueError(
            f"{path} is not a posthoc_align embedding cache (it is not a folder). {hint}"
        )
    try:
        group = _open_group(path, "r")
        attrs = dict(group.attrs)
    except Exception as exc:  # zarr raises version-specific errors for "no group here"
        raise ValueError(
            f"{path} is not a posthoc_align embedding cache (no zarr group could be opened: "
            f"{type(exc).__name__}: {exc}). {hint}"
        ) from exc
    if attrs.get("format") != _FORMAT_NAME:
        raise ValueError(
            f"{path} is a zarr store but not a posthoc_align embedding cache (its attributes "
            f"lack format={_FORMAT_NAME!r}). {hint}"
        )
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} was written in cache format version {version!r} (posthoc_align "
            f"{attrs.get('library_version', '?')}); this posthoc_align {__version__} reads format "
            f"version {FORMAT_VERSION}. Rebuild the cache with this version, or read it with "
            f"posthoc_align=={attrs.get('library_version', '?')}."
        )
    return attrs


class _Writer:
    """Creates or reopens the store and writes row ranges, recording progress after each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.group: Any = None
        self.arrays: dict[str, Any] = {}

    def create(
        self,
        n_total: int,
        first: np.ndarray,
        fields: dict[str, np.ndarray],
        attrs: dict[str, Any],
        chunk_rows: int,
    ) -> None:
        _, n_layers, dim = first.shape
        dtype = attrs["dtype"]
        with _write_context():
            self.group = _open_group(self.path, "w")
            self.arrays["embeddings"] = _create_array(
                self.group,
                "embeddings",
                (n_total, n_layers, dim),
                (chunk_rows, n_layers, dim),
                dtype,
                np.nan,
                compress=False,  # hidden states shrink by 5-13%, and reads get ~15x slower
            )
            for name in fields:
                if name == "labels":
                    arr = _create_array(self.group, name, (n_total,), (chunk_rows,), "int64", -1)
                elif name == "text_sha1":
                    shape, chunks = (n_total, _SHA_BYTES), (chunk_rows, _SHA_BYTES)
                    arr = _create_array(self.group, name, shape, chunks, "uint8", 0)
                else:
                    arr = _create_array(self.group, name, (n_total,), (chunk_rows,), str, "")
                self.arrays[name] = arr
            self.group.attrs.update(
                {
                    **attrs,
                    "format": _FORMAT_NAME,
                    "format_version": FORMAT_VERSION,
                    "library_version": __version__,
                    "zarr_version": zarr.__version__,
                    "n_layers": int(n_layers),
                    "hidden_size": int(dim),
                    "chunk_rows": int(chunk_rows),
                    "n_rows_planned": int(n_total),
                    "rows_completed": 0,
                    "complete": False,
                    "append_start": 0,
                    "fields": sorted(fields),
                }
            )

    def reopen(self) -> dict[str, Any]:
        with _write_context():
            self.group = _open_group(self.path, "r+")
            attrs = dict(self.group.attrs)
            for name in ["embeddings", *attrs["fields"]]:
                self.arrays[name] = self.group[name]
        return attrs

    def resize(self, n_total: int) -> None:
        for arr in self.arrays.values():
            arr.resize((n_total, *arr.shape[1:]))

    def write(self, start: int, X: np.ndarray, fields: dict[str, np.ndarray]) -> None:
        stop = start + X.shape[0]
        self.arrays["embeddings"][start:stop] = X
        for name, values in fields.items():
            self.arrays[name][start:stop] = values
        # only now do these rows count: an interruption before this line redoes them
        self.group.attrs.update({"rows_completed": int(stop)})

    def update(self, **attrs: Any) -> None:
        self.group.attrs.update(attrs)


def _load_malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except (ImportError, OSError, AttributeError):
        return None


_MALLOC_TRIM: Any = _load_malloc_trim()  # glibc only; None elsewhere


def _release_freed_memory() -> None:
    """Hand memory freed by the last chunk back to the OS (glibc ``malloc_trim``).

    The encoder's activations are freed after every batch, but glibc keeps freed heap memory for
    reuse, and batches of other token lengths fragment it: without this the RSS between chunks
    creeps up over the first chunks (by ~300 MiB with e5-small, batch 64) and the peak with it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _chunk_bounds(start: int, stop: int, chunk_rows: int) -> Iterator[tuple[int, int]]:
    """Row ranges from ``start`` to ``stop`` that end on chunk boundaries (one chunk each)."""
    a = start
    while a < stop:
        b = min((a // chunk_rows + 1) * chunk_rows, stop)
        yield a, b
        a = b


def _check_block(X: Any, n: int, a: int, b: int, dtype: str, what: str) -> np.ndarray:
    X = np.asarray(X)
    if X.ndim != 3 or X.shape[0] != n:
        raise ValueError(
            f"{what} returned shape {X.shape} for {n} rows ({a}:{b}); expected "
            "(n_rows, n_layers, dim)."
        )
    with np.errstate(over="ignore"):  # float16 overflow is reported below, with the fix
        out = X.astype(dtype, copy=False)
    if not np.isfinite(out).all():
        extra = (
            " (after conversion to float16, which overflows above 65504; use dtype='float32')"
            if dtype == "float16" and np.isfinite(X).all()
            else ""
        )
        raise ValueError(f"{what} gave NaN or infinity in rows {a}:{b}{extra}.")
    return out


def _resume_hint(attrs: dict[str, Any]) -> str:
    if attrs.get("source") == "from_arrays":
        return "Write it again with EmbeddingCache.from_arrays(..., overwrite=True)"
    if attrs.get("append_start", 0):
        return (
            "Resume it by calling EmbeddingCache.build(path, encoder, texts, ..., append=True) again "
            "with the same arguments (finished chunks are not re-encoded)"
        )
    return (
        "Resume it by calling EmbeddingCache.build(path, encoder, texts, ...) again with the same "
        "arguments (finished chunks are not re-encoded)"
    )


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


class CachedLayer:
    """Lazy, read-only view of one layer of an :class:`EmbeddingCache`, shape ``(n_rows, dim)``.

    Nothing is read until it is indexed or converted: ``view[rows]`` and ``view[rows, cols]``
    accept ints, slices, index arrays (any order, repeats allowed) and boolean masks on the
    rows, as numpy does, and return float32 numpy arrays; ``np.asarray(view)`` loads the
    whole layer.

    Examples
    --------
    >>> last = cache.layer(-1)  # doctest: +SKIP
    >>> last.shape, last[:2].dtype  # doctest: +SKIP
    ((2000, 384), dtype('float32'))
    """

    def __init__(self, cache: EmbeddingCache, layer: int) -> None:
        self._cache = cache
        self.layer = layer

    @property
    def shape(self) -> tuple[int, int]:
        return (self._cache.n_rows, self._cache.dim)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self._cache.n_rows

    def __repr__(self) -> str:
        return (
            f"CachedLayer(layer={self.layer}, shape={self.shape}, path={str(self._cache.path)!r})"
        )

    def __getitem__(self, key: Any) -> np.ndarray:
        rest: tuple = ()
        if isinstance(key, tuple):
            if not key:
                key = slice(None)
            elif key[0] is Ellipsis:
                key, rest = slice(None), (Ellipsis, *key[1:])
            else:
                key, rest = key[0], key[1:]
        if isinstance(key, int | np.integer) and not isinstance(key, bool):
            n = self._cache.n_rows
            i = int(key) + n if key < 0 else int(key)
            if not 0 <= i < n:
                raise IndexError(f"row {int(key)} is out of bounds for {n} rows")
            out = self._cache.to_numpy(layer=self.layer, rows=slice(i, i + 1))[0]
            return out[rest] if rest else out
        out = self._cache.to_numpy(layer=self.layer, rows=key)
        return out[(slice(None), *rest)] if rest else out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self._cache.to_numpy(layer=self.layer)
        return out if dtype is None else out.astype(dtype, copy=False)


class EmbeddingCache:
    """Hidden states of every layer for a corpus, stored once in a chunked zarr store.

    Build one with :meth:`build` (from texts and an encoder, resumable) or :meth:`from_arrays`
    (from precomputed arrays); ``EmbeddingCache(path)`` opens it, read-only, and streams rows
    into ``partial_fit`` with :meth:`iter_chunks` in bounded memory.

    Parameters
    ----------
    path : str or path-like
        The store's folder.
    allow_incomplete : bool, default=False
        Open a store whose build was interrupted, exposing only its finished rows
        (``n_rows`` is then ``attrs["rows_completed"]``).

    Attributes
    ----------
    path : pathlib.Path
    n_rows : int
        Rows stored (finished rows of an incomplete store).
    n_layers : int
        Layers stored per row, the embedding layer included (``encoder.n_layers + 1``
        for ``layers="all"``).
    dim : int
        Hidden size.
    languages : ndarray of shape (n_rows,) of str, or None
    pair_ids : ndarray of shape (n_rows,), or None
        int64 or str, as they were given.
    labels : ndarray of shape (n_rows,) of int64, or None
    attrs : dict
        The store's attributes: ``model``, ``pooling``, ``prefix``, ``max_length``,
        ``compute_dtype`` and ``cast_weights`` (the encoder's forward-pass precision; ``None``
        when the encoder does not report it, absent from caches written before
        posthoc_align recorded it, which were computed in float32),
        ``encoder_n_layers``, ``layers``, ``n_layers``, ``hidden_size``, ``dtype``,
        ``library_version``, ``format_version``, ``n_rows_planned``, ``rows_completed``,
        ``complete``, ``chunk_rows``, ``pair_ids_kind``, ``fields``, ``source``.

    Raises
    ------
    FileNotFoundError
        Nothing exists at ``path``.
    ValueError
        ``path`` is not a posthoc_align cache, was written in another format version,
        is incomplete (without ``allow_incomplete``) or has lost chunk files.

    See Also
    --------
    posthoc_align.encoders.HFEncoder : the encoder ``build`` expects.

    Notes
    -----
    Each chunk file holds ``chunk_rows`` rows of every layer, so reading one layer reads
    all of them: stream several layers at once (``iter_chunks(layer=[...])``) when you need
    them. Embeddings are stored uncompressed (compressors save 5-13% on hidden states and
    make reads ~15x slower); a float16 cache halves disk and I/O, and reads always return
    float32 (estimators accumulate in float64 anyway). A store written by another posthoc_align version only
    warns; one written in another *format* version is refused. Do not build into one path
    from two processes at once.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.cache import EmbeddingCache
    >>> X = np.random.default_rng(0).normal(size=(6, 3, 4)).astype(np.float32)
    >>> cache = EmbeddingCache.from_arrays(
    ...     tmp_path / "toy.zarr", X, languages=["en", "fr"] * 3, pair_ids=[0, 0, 1, 1, 2, 2],
    ...     chunk_rows=4)  # doctest: +SKIP
    >>> cache.n_rows, cache.n_layers, cache.dim  # doctest: +SKIP
    (6, 3, 4)
    >>> for Xc, langs, pids in cache.iter_chunks(layer=-1):  # doctest: +SKIP
    ...     est.partial_fit(Xc, languages=langs, pair_ids=pids)
    """

    def __init__(self, path: str | Path, *, allow_incomplete: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(
                f"No embedding cache at {self.path}. Create one with "
                "EmbeddingCache.build(path, encoder, texts, ...) or EmbeddingCache.from_arrays(...)."
            )
        attrs = _read_cache_attrs(self.path)
        if attrs.get("library_version") != __version__:
            warnings.warn(
                f"{self.path} was written by posthoc_align {attrs.get('library_version')}; this "
                f"is {__version__}. The format is the same ({FORMAT_VERSION}), so it is read as is.",
                UserWarning,
                stacklevel=2,
            )
        done, planned = int(attrs["rows_completed"]), int(attrs["n_rows_planned"])
        complete = bool(attrs["complete"]) and done == planned
        if not complete and not allow_incomplete:
            raise ValueError(
                f"{self.path} is an incomplete embedding cache: {done} of {planned} rows are "
                f"complete (its build was interrupted). {_resume_hint(attrs)}, or open the "
                "finished rows with EmbeddingCache(path, allow_incomplete=True)."
            )
        self._group = _open_group(self.path, "r")
        self._attrs = attrs
        self._n = done
        self._chunk_rows = int(attrs["chunk_rows"])
        self._kind = attrs.get("pair_ids_kind")
        try:
            self._emb = self._group["embeddings"]
            arrays = {name: self._group[name] for name in attrs["fields"]}
        except KeyError as exc:
            raise ValueError(
                f"{self.path} is a damaged embedding cache: array {exc} is missing. Rebuild it "
                "(delete the folder, or pass overwrite=True)."
            ) from None
        self._check_chunks({"embeddings": self._emb, **arrays})
        self._arrays = arrays
        self._fields: dict[str, np.ndarray | None] = {}

    def _check_chunks(self, arrays: dict[str, Any]) -> None:
        expected = math.ceil(self._n / self._chunk_rows)
        for name, arr in arrays.items():
            if arr.shape[0] < self._n:
                raise ValueError(
                    f"{self.path} is a damaged embedding cache: {name} has {arr.shape[0]} rows but "
                    f"{self._n} are recorded as complete. Rebuild it."
                )
            written = _n_chunks_written(arr)
            if written < expected:
                raise ValueError(
                    f"{self.path} is a truncated embedding cache: {name} has {written} of its "
                    f"{expected} chunk files for the {self._n} complete rows (files were deleted or "
                    "not copied). Copy the whole folder again, or rebuild it (delete the folder, "
                    "or pass overwrite=True)."
                )

    # ---------------------------------------------------------------- building

    @classmethod
    def build(
        cls,
        path: str | Path,
        encoder: Any,
        texts: Sequence[str],
        languages: Any = None,
        pair_ids: Any = None,
        labels: Any = None,
        chunk_rows: int = 1024,
        dtype: str = "float32",
        layers: str | int | Sequence[int] = "all",
        append: bool = False,
        progress: Progress = None,
        overwrite: bool = False,
    ) -> EmbeddingCache:
        """Encode ``texts`` chunk by chunk into a store at ``path``; resumable.

        Parameters
        ----------
        path : str or path-like
            A folder that does not exist yet (or is empty), an interrupted cache to resume,
            or (with ``append=True``) a finished cache to extend.
        encoder : object
            Needs ``encode(texts, layers=layers)`` returning float32 of shape
            ``(n_texts, n_layers, dim)``, e.g. :class:`posthoc_align.encoders.HFEncoder`;
            one whose ``encode`` takes ``languages=`` (an
            :class:`~posthoc_align.encoders.AlignedEncoder`) gets each chunk's languages.
            Its identity (``model_id``; for a model given as an object, a fingerprint of
            its weights; for an AlignedEncoder, the base encoder's plus a fingerprint of
            the fitted transforms), ``pooling``, ``prefix``, ``max_length``, ``n_layers``,
            ``hidden_size`` and its precision (``compute_dtype``, ``cast_weights``: bfloat16
            autocast or cast weights give slightly different embeddings than float32) are
            recorded when present.
        texts : sequence of str
        languages : sequence of str, optional
            One per text.
        pair_ids : sequence of int or of str, optional
            One per text; rows sharing an id are translations. Read back with their kind.
        labels : sequence of int, optional
            One per text (e.g. a topic, for probing).
        chunk_rows : int, default=1024
            Texts per ``encode`` call, and rows per zarr chunk. Resuming or appending keeps
            the store's own value.
        dtype : {"float32", "float16"}, default="float32"
            Storage type; reads always return float32.
        layers : "all", int or sequence of int, default="all"
            Passed to ``encoder.encode``.
        append : bool, default=False
            Add ``texts`` after the rows of the finished cache at ``path`` (created if
            absent). The encoder setup (model, pooling, prefix, compute precision, ...),
            dtype and per-row fields must match the cache's.
        progress : bool, callable or None, default=None
            A tqdm bar (``None``: only when logging is at INFO or lower), or a callable
            ``progress(rows_done, rows_total)`` called after each chunk.
        overwrite : bool, default=False
            Delete an existing cache at ``path`` first (a folder that is not a cache is
            never deleted).

        Returns
        -------
        EmbeddingCache
            The finished cache, opened read-only.

        Raises
        ------
        ValueError
            Bad input (empty ``texts``, a per-row field of the wrong length, ...), a
            different encoder setup or different texts than the cache being resumed or
            appended to, or a finished cache at ``path`` holding other texts.

        Warns
        -----
        UserWarning
            Once per call, when an :class:`~posthoc_align.encoders.HFEncoder` (or an
            ``AlignedEncoder`` over one) truncated texts longer than its ``max_length``, with
            the count over every chunk this call encoded (not one warning per chunk).

        Notes
        -----
        ``rows_completed`` is recorded after each chunk and ``complete`` only at the end,
        so after an interruption (an exception, a killed process) calling ``build`` again
        with the same arguments re-encodes only the unfinished chunks, after checking the
        finished rows' text hashes, languages, pair ids and labels. Calling ``build`` on a
        finished cache with the same texts returns it without encoding. Peak memory is
        about a few chunks (``chunk_rows * n_layers * dim * 4`` bytes each) besides
        ``texts`` (and a few dozen bytes a row of per-row fields), plus the encoder's
        own working memory for one batch (for :class:`~posthoc_align.encoders.HFEncoder`,
        the activations of ``batch_size`` texts of the longest token length), none of
        which grows with the number of texts.

        Examples
        --------
        >>> from posthoc_align.encoders import HFEncoder  # doctest: +SKIP
        >>> enc = HFEncoder("intfloat/multilingual-e5-small", prefix="passage: ")  # doctest: +SKIP
        >>> cache = EmbeddingCache.build(
        ...     "bible.zarr", enc, bible.data, languages=bible.languages,
        ...     pair_ids=bible.pair_ids, labels=bible.target)  # doctest: +SKIP
        """
        texts = _check_texts(texts)
        n = len(texts)
        fields, kind = _row_fields(n, languages, pair_ids, labels)
        chunk_rows = _check_chunk_rows(chunk_rows)
        dtype = _check_dtype(dtype)
        enc_attrs = _encoder_attrs(encoder, layers, dtype)
        # an encoder that takes languages (AlignedEncoder) gets each chunk's labels
        pass_languages = "languages" in fields and _takes_languages(encoder.encode)
        path = Path(path)
        attrs = _inspect(path)
        if attrs is not None and overwrite:
            shutil.rmtree(path)
            attrs = None
        writer = _Writer(path)
        start, offset = 0, 0  # first row to encode; store row of texts[0]
        total = n
        if attrs is not None:
            action = f"{'append to' if append else 'resume'} the cache at {path}"
            if attrs.get("source") != "build" or "text_sha1" not in attrs["fields"]:
                raise ValueError(
                    f"{path} was written by EmbeddingCache.from_arrays, without texts; "
                    "build into a new path, or pass overwrite=True to replace it."
                )
            _check_same_encoder(attrs, enc_attrs, action)
            _check_same_fields(attrs, fields, kind, action)
            done, planned = int(attrs["rows_completed"]), int(attrs["n_rows_planned"])
            offset = int(attrs.get("append_start", 0))
            chunk_rows = int(attrs["chunk_rows"])
            if attrs["complete"] and done == planned:
                if not append:
                    if planned != n:
                        raise ValueError(
                            f"{path} is a finished cache of {planned} rows, but {n} texts were "
                            "given. Pass append=True to add them, overwrite=True to replace it, "
                            "or another path."
                        )
                    _verify_rows(_open_group(path, "r"), 0, texts, fields, path, action)
                    logger.info("%s is complete and holds these texts; nothing to encode", path)
                    return cls(path)
                attrs = writer.reopen()
                offset, start, total = planned, planned, planned + n
                writer.resize(total)
                writer.update(
                    n_rows_planned=total, complete=False, append_start=offset, source="build"
                )
            else:
                if bool(append) != bool(offset):
                    raise ValueError(
                        f"Cannot {action}: its interrupted build "
                        + (
                            f"was an append starting at row {offset}; resume it with append=True."
                            if offset
                            else "was not an append; resume it with append=False."
                        )
                    )
                if planned - offset != n:
                    raise ValueError(
                        f"Cannot {action}: the interrupted build planned {planned - offset} texts "
                        f"but {n} were given; resume with the same texts, or pass overwrite=True "
                        "to start again."
                    )
                writer.reopen()
                _verify_rows(writer.group, offset, texts[: done - offset], fields, path, action)
                start, total = done, planned
                logger.info("resuming %s at row %d of %d", path, done, planned)

        bar = _show_progress(progress, total - offset, start - offset)
        # an encoder that counts truncated texts (HFEncoder, AlignedEncoder) warns once per
        # build, with the count over every chunk, not once per chunk
        counting = getattr(encoder, "_counting_truncations", None)
        with counting() if callable(counting) else contextlib.nullcontext() as tally:
            try:
                for a, b in _chunk_bounds(start, total, chunk_rows):
                    chunk = texts[a - offset : b - offset]
                    kw = {"layers": layers}
                    if pass_languages:
                        kw["languages"] = fields["languages"][a - offset : b - offset].tolist()
                    X = _check_block(
                        encoder.encode(chunk, **kw), b - a, a, b, dtype, "encoder.encode"
                    )
                    block = {name: v[a - offset : b - offset] for name, v in fields.items()}
                    block["text_sha1"] = _text_sha1(chunk)
                    if writer.group is None:
                        _check_encoder_shape(enc_attrs, X)
                        writer.create(
                            total,
                            X,
                            block,
                            {**enc_attrs, "pair_ids_kind": kind, "source": "build"},
                            chunk_rows,
                        )
                    elif X.shape[1:] != writer.arrays["embeddings"].shape[1:]:
                        raise ValueError(
                            f"encoder.encode returned rows of shape {X.shape[1:]}, but the "
                            f"cache at {path} stores {writer.arrays['embeddings'].shape[1:]}."
                        )
                    writer.write(a, X, block)
                    del X, block
                    _release_freed_memory()
                    if bar is not None:
                        bar.update(b - a)
                    elif callable(progress):
                        progress(b - offset, total - offset)
            except BaseException:
                # a build stopped part-way still reports the truncations of the chunks
                # it encoded (a resumed build counts only the rows it encodes itself)
                if tally is not None and tally.truncated:
                    try:
                        warnings.warn(tally.message(), stacklevel=2)
                    except Warning:  # warnings as errors: keep the real failure
                        pass
                raise
            finally:
                if bar is not None:
                    bar.close()
        writer.update(complete=True)
        if tally is not None and tally.truncated:
            warnings.warn(tally.message(), stacklevel=2)
        return cls(path)

    @classmethod
    def from_arrays(
        cls,
        path: str | Path,
        embeddings: Any,
        languages: Any = None,
        pair_ids: Any = None,
        labels: Any = None,
        attrs: dict[str, Any] | None = None,
        chunk_rows: int = 1024,
        dtype: str = "float32",
        overwrite: bool = False,
    ) -> EmbeddingCache:
        """Write precomputed embeddings (and per-row fields) into a new cache.

        Parameters
        ----------
        path : str or path-like
            A folder that does not exist yet, or is empty.
        embeddings : array-like of shape (n_rows, n_layers, dim) or (n_rows, dim)
            Anything sliceable by rows into numpy: a numpy array or memmap, a zarr or dask
            array, a CPU torch tensor. Read ``chunk_rows`` rows at a time, so a memmap
            larger than memory is fine. 2-D input is stored as one layer.
        languages, pair_ids, labels : optional
            One entry per row, as in :meth:`build`.
        attrs : dict, optional
            Extra JSON-serialisable attributes, e.g. ``{"model": ..., "pooling": "mean"}``;
            the cache's own bookkeeping keys (``rows_completed``, ``dtype``, ...) are refused.
        chunk_rows : int, default=1024
        dtype : {"float32", "float16"}, default="float32"
        overwrite : bool, default=False
            Delete an existing cache at ``path`` first.

        Returns
        -------
        EmbeddingCache

        Examples
        --------
        >>> X = np.lib.format.open_memmap("X.npy", mode="r")  # doctest: +SKIP
        >>> cache = EmbeddingCache.from_arrays("X.zarr", X, languages=langs)  # doctest: +SKIP
        """
        if not hasattr(embeddings, "shape") or not hasattr(embeddings, "__getitem__"):
            embeddings = np.asarray(embeddings)
        shape = tuple(int(s) for s in embeddings.shape)
        if len(shape) not in (2, 3) or shape[0] < 1 or shape[-1] < 1:
            raise ValueError(
                f"embeddings must have shape (n_rows, n_layers, dim) or (n_rows, dim) with at "
                f"least one row, got {shape}."
            )
        n = shape[0]
        fields, kind = _row_fields(n, languages, pair_ids, labels)
        chunk_rows = _check_chunk_rows(chunk_rows)
        dtype = _check_dtype(dtype)
        extra = dict(attrs or {})
        bad = sorted(_RESERVED_KEYS.intersection(extra))
        if bad:
            raise ValueError(f"attrs may not set {bad}: the cache records those itself.")
        try:
            json.dumps(extra)
        except TypeError as exc:
            raise TypeError(f"attrs must be JSON-serialisable: {exc}") from None
        meta = {key: None for key in _FROM_ARRAYS_KEYS}
        meta.update(extra)
        meta.update({"dtype": dtype, "pair_ids_kind": kind, "source": "from_arrays"})
        path = Path(path)
        existing = _inspect(path)
        if existing is not None:
            if not overwrite:
                raise ValueError(
                    f"{path} already holds an embedding cache; pass overwrite=True to replace "
                    "it, or choose another path."
                )
            shutil.rmtree(path)
        writer = _Writer(path)
        for a, b in _chunk_bounds(0, n, chunk_rows):
            X = embeddings[a:b]
            X = np.asarray(X.detach().cpu().numpy() if hasattr(X, "detach") else X)
            if X.ndim == 2:
                X = X[:, None, :]
            X = _check_block(X, b - a, a, b, dtype, "embeddings")
            block = {name: v[a:b] for name, v in fields.items()}
            if writer.group is None:
                writer.create(n, X, block, meta, chunk_rows)
            writer.write(a, X, block)
        writer.update(complete=True)
        return cls(path)

    # ---------------------------------------------------------------- metadata

    @property
    def n_rows(self) -> int:
        return self._n

    @property
    def n_layers(self) -> int:
        return int(self._emb.shape[1])

    @property
    def dim(self) -> int:
        return int(self._emb.shape[2])

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._attrs)

    def _field(self, name: str) -> np.ndarray | None:
        if name not in self._fields:
            arr = self._arrays.get(name)
            if arr is None:
                self._fields[name] = None
            else:
                with self._damaged(name):
                    values = np.asarray(arr[: self._n])
                if name == "labels":
                    values = values.astype(np.int64, copy=False)
                elif name == "pair_ids" and self._kind == "int":
                    values = _to_str(values).astype(np.int64)
                elif name != "text_sha1":
                    values = _to_str(values)
                self._fields[name] = values
        return self._fields[name]

    @property
    def languages(self) -> np.ndarray | None:
        return self._field("languages")

    @property
    def pair_ids(self) -> np.ndarray | None:
        return self._field("pair_ids")

    @property
    def labels(self) -> np.ndarray | None:
        return self._field("labels")

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        state = "" if self._n == self._attrs["n_rows_planned"] else ", incomplete"
        return (
            f"EmbeddingCache({str(self.path)!r}, n_rows={self._n}, n_layers={self.n_layers}, "
            f"dim={self.dim}, dtype={self._attrs['dtype']!r}, model={self._attrs.get('model')!r}"
            f"{state})"
        )

    # ---------------------------------------------------------------- reading

    def _layer_selection(self, layer: LayerSpec) -> int | list[int] | None:
        L = self.n_layers

        def one(i: Any) -> int:
            if isinstance(i, bool) or not isinstance(i, int | np.integer):
                raise TypeError(f"a layer must be an int, got {i!r}")
            if not -L <= i < L:
                raise IndexError(f"layer {int(i)} is out of range: the cache stores {L} layers")
            return int(i) % L

        if layer is None:
            return None
        if isinstance(layer, int | np.integer) and not isinstance(layer, bool):
            return one(layer)
        sel = [one(i) for i in layer]
        if not sel:
            raise ValueError("layer is an empty sequence; pass at least one layer index.")
        return sel

    def _row_positions(self, rows: RowSpec) -> tuple[int, int] | np.ndarray:
        """``(start, stop)`` for a contiguous range of rows, else an int64 index array."""
        n = self._n
        if rows is None:
            return (0, n)
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(n)
            return (lo, max(lo, hi)) if step == 1 else np.arange(lo, hi, step)
        idx = np.asarray(rows)
        if idx.ndim != 1:
            raise ValueError(
                f"rows must be 1-D (an index array or a boolean mask), got {idx.shape}."
            )
        if idx.dtype == bool:
            if idx.shape[0] != n:
                raise ValueError(f"a boolean rows mask needs {n} entries, got {idx.shape[0]}.")
            return np.flatnonzero(idx)
        if idx.size == 0:
            return np.empty(0, dtype=np.int64)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"rows must be integers or booleans, got dtype {idx.dtype}.")
        idx = idx.astype(np.int64)
        if idx.min() < -n or idx.max() >= n:
            raise IndexError(f"rows index out of range for a cache of {n} rows.")
        return np.where(idx < 0, idx + n, idx)

    def _read(self, a: int, b: int, sel: int | list[int] | None) -> np.ndarray:
        with self._damaged(f"rows {a}..{b - 1} of embeddings"):
            if sel is None:
                out = self._emb[a:b]
            elif isinstance(sel, int):
                out = self._emb[a:b, sel]
            else:
                out = self._emb.oindex[a:b, sel]
            return np.asarray(out).astype(np.float32, copy=False)

    @contextlib.contextmanager
    def _damaged(self, what: str) -> Iterator[None]:
        """Turn a chunk that cannot be decoded (a file cut short or overwritten by
        something else) into an error that names the cache and the fix."""
        try:
            yield
        except (ValueError, RuntimeError, OSError) as exc:
            raise ValueError(
                f"The cache at {self.path} could not read {what}: a chunk file is damaged "
                f"or was partly written ({type(exc).__name__}: {exc}). Rebuild it with "
                "EmbeddingCache.build(..., overwrite=True)."
            ) from exc

    def _meta(self, index: slice | np.ndarray) -> tuple[Any, Any]:
        langs, pids = self.languages, self.pair_ids
        return (
            None if langs is None else langs[index],
            None if pids is None else pids[index],
        )

    def iter_chunks(
        self,
        layer: LayerSpec = -1,
        rows: RowSpec = None,
        chunk_rows: int | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
        """Stream ``(X, languages, pair_ids)`` blocks, ready for ``partial_fit``.

        Parameters
        ----------
        layer : int, sequence of int or None, default=-1
            One layer (``X`` of shape ``(m, dim)``; negative counts from the last), several
            (``(m, len(layer), dim)``) or ``None`` for all.
        rows : index array, boolean mask or slice, optional
            Stream only these rows, in this order (an index array may be unsorted and repeat
            rows). Default: every row.
        chunk_rows : int, optional
            Rows per block. Default: the store's chunks, so each block is one zarr chunk (a
            subset's block holds that chunk's selected rows; an unsorted index array gives
            blocks of ``attrs["chunk_rows"]`` rows).

        Yields
        ------
        X : ndarray, float32
        languages : ndarray of str, or None
        pair_ids : ndarray, or None
            ``None`` when the cache has no such field (estimators then read one language).

        Notes
        -----
        Each zarr chunk is read and decompressed once for ``rows=None``, a mask, or a sorted
        index array; an unsorted index array reads each chunk once per block that touches
        it. Memory is about one chunk of the selected layers.

        Examples
        --------
        >>> est = LanguageMeanCentering()  # doctest: +SKIP
        >>> for X, langs, _ in cache.iter_chunks(layer=8, rows=cache.languages != "zh"):
        ...     est.partial_fit(X, languages=langs)  # doctest: +SKIP
        """
        sel = self._layer_selection(layer)
        pos = self._row_positions(rows)
        cr = self._chunk_rows
        step = cr if chunk_rows is None else _check_chunk_rows(chunk_rows)
        n = self._n
        if isinstance(pos, tuple):
            lo, hi = pos
            bounds = (
                _chunk_bounds(lo, hi, cr)
                if chunk_rows is None
                else ((a, min(a + step, hi)) for a in range(lo, hi, step))
            )
            for a, b in bounds:
                yield (self._read(a, b, sel), *self._meta(slice(a, b)))
            return
        if pos.size == 0:
            return
        last: dict[int, np.ndarray] = {}  # the last zarr chunk read, so none is read twice in a row

        def chunk(c: int) -> np.ndarray:
            if c not in last:
                last.clear()
                last[c] = self._read(c * cr, min((c + 1) * cr, n), sel)
            return last[c]

        ids = pos // cr
        if chunk_rows is None and bool(np.all(ids[1:] >= ids[:-1])):
            # sorted by chunk: one block per zarr chunk holding selected rows
            cuts = np.flatnonzero(np.diff(ids)) + 1
            for p in np.split(pos, cuts):
                c = int(p[0] // cr)
                yield (chunk(c)[p - c * cr], *self._meta(p))
            return
        for s in range(0, pos.size, step):
            p = pos[s : s + step]
            c_ids = p // cr
            order = np.argsort(c_ids, kind="stable")
            out = np.empty((p.size, *self._feature_shape(sel)), dtype=np.float32)
            cuts = np.flatnonzero(np.diff(c_ids[order])) + 1
            for part in np.split(order, cuts):
                c = int(c_ids[part[0]])
                out[part] = chunk(c)[p[part] - c * cr]
            yield (out, *self._meta(p))

    def _feature_shape(self, sel: int | list[int] | None) -> tuple[int, ...]:
        if sel is None:
            return (self.n_layers, self.dim)
        if isinstance(sel, int):
            return (self.dim,)
        return (len(sel), self.dim)

    def to_numpy(self, layer: LayerSpec = None, rows: RowSpec = None) -> np.ndarray:
        """Load rows into memory as float32.

        Parameters
        ----------
        layer : int, sequence of int or None, default=None
            ``None``: every layer, shape ``(m, n_layers, dim)``; an int: ``(m, dim)``; a
            sequence: ``(m, len(layer), dim)``.
        rows : index array, boolean mask or slice, optional
            As in :meth:`iter_chunks`; default all rows.

        Returns
        -------
        ndarray, float32

        Examples
        --------
        >>> X_last = cache.to_numpy(layer=-1)  # doctest: +SKIP
        """
        sel = self._layer_selection(layer)
        pos = self._row_positions(rows)
        m = pos[1] - pos[0] if isinstance(pos, tuple) else pos.size
        out = np.empty((m, *self._feature_shape(sel)), dtype=np.float32)
        i = 0
        rows = slice(*pos) if isinstance(pos, tuple) else pos
        for X, _, _ in self.iter_chunks(layer=sel, rows=rows):
            out[i : i + X.shape[0]] = X
            i += X.shape[0]
        return out

    def layer(self, i: int) -> CachedLayer:
        """A lazy view of layer ``i`` (negative counts from the last), see :class:`CachedLayer`.

        Examples
        --------
        >>> view = cache.layer(-1)  # doctest: +SKIP
        >>> view[:10].shape  # doctest: +SKIP
        (10, 384)
        """
        return CachedLayer(self, self._layer_selection(i))

    def to_dask(self, layer: LayerSpec = -1) -> Any:
        """A lazy dask array of one layer (or several, or all with ``None``), float32.

        Built with ``dask.array.from_zarr``, so its chunks are the store's.

        Raises
        ------
        ImportError
            dask is not installed; install it with ``pip install "posthoc_align[dask]"``.

        Examples
        --------
        >>> X = cache.to_dask(layer=-1)  # doctest: +SKIP
        >>> X.mean(axis=0).compute().shape  # doctest: +SKIP
        (384,)
        """
        try:
            import dask.array as da
        except ImportError as exc:
            raise ImportError(
                'EmbeddingCache.to_dask needs dask: pip install "posthoc_align[dask]"'
            ) from exc
        sel = self._layer_selection(layer)
        arr = da.from_zarr(self._emb)[: self._n]
        if sel is not None:
            arr = arr[:, sel]
        return arr.astype(np.float32)


def _check_encoder_shape(enc_attrs: dict[str, Any], X: np.ndarray) -> None:
    n_layers, hidden = enc_attrs["encoder_n_layers"], enc_attrs["hidden_size"]
    problems = []
    if hidden is not None and X.shape[2] != hidden:
        problems.append(f"dim {X.shape[2]} != encoder.hidden_size {hidden}")
    if enc_attrs["layers"] == "all" and n_layers is not None and X.shape[1] != n_layers + 1:
        problems.append(f"{X.shape[1]} layers != encoder.n_layers + 1 = {n_layers + 1}")
    if isinstance(enc_attrs["layers"], list) and X.shape[1] != len(enc_attrs["layers"]):
        problems.append(f"{X.shape[1]} layers for layers={enc_attrs['layers']}")
    if problems:
        raise ValueError(f"encoder.encode returned shape {X.shape}: {'; '.join(problems)}.")


def _verify_rows(
    group: Any,
    start: int,
    texts: Sequence[str],
    fields: dict[str, np.ndarray],
    path: Path,
    action: str,
) -> None:
    """Check that stored rows ``start:start+len(texts)`` hold these texts and fields."""
    n = len(texts)
    if n == 0:
        return
    chunk_rows = int(group.attrs["chunk_rows"])
    for a in range(0, n, chunk_rows):
        b = min(a + chunk_rows, n)
        stored = np.asarray(group["text_sha1"][start + a : start + b])
        same = np.all(stored == _text_sha1(texts[a:b]), axis=1)
        if not same.all():
            i = a + int(np.argmin(same))
            raise ValueError(
                f"Cannot {action}: text {i} (store row {start + i}) differs from the text encoded "
                f"there before ({texts[i][:60]!r}...). Pass the same texts in the same order, or "
                "pass overwrite=True to start again."
            )
    kind = group.attrs.get("pair_ids_kind")
    for name, given in fields.items():
        stored = np.asarray(group[name][start : start + n])
        given = given[:n]
        if name == "labels":
            stored = stored.astype(np.int64)
        else:
            stored = _to_str(stored)
            if name == "pair_ids" and kind == "int":
                stored, given = stored.astype(np.int64), given.astype(np.int64)
        diff = np.flatnonzero(stored != given)
        if diff.size:
            i = int(diff[0])
            raise ValueError(
                f"Cannot {action}: {name}[{i}] is {given[i]!r} but the cache holds "
                f"{stored[i]!r} for that row. Pass the same {name} as before."
            )
