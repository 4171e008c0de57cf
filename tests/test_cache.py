"""Tests for posthoc_align.cache.EmbeddingCache (zarr store of per-layer embeddings)."""

from __future__ import annotations

import os
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_align._version import __version__
from posthoc_align.cache import FORMAT_VERSION, CachedLayer, EmbeddingCache

N_LAYERS, DIM = 2, 4  # the fake encoder returns (n, N_LAYERS + 1, DIM)


def _vector(text: str, n_layers: int, dim: int) -> np.ndarray:
    """Deterministic per-text states (independent of the batch the text is in)."""
    seed = int.from_bytes(text.encode("utf-8")[:8].ljust(8, b"\0"), "little") + len(text)
    return np.random.default_rng(seed).standard_normal((n_layers + 1, dim)).astype(np.float32)


class FakeEncoder:
    """Minimal encoder: records every call; can fail on a given call."""

    def __init__(
        self,
        model_id: str = "fake/model",
        n_layers: int = N_LAYERS,
        hidden_size: int = DIM,
        fail_on_call: int | None = None,
        pooling: str = "mean",
    ) -> None:
        self.model_id = model_id
        self.pooling = pooling
        self.prefix = "passage: "
        self.max_length = 128
        self.n_layers = n_layers
        self.hidden_size = hidden_size
        self.fail_on_call = fail_on_call
        self.calls: list[list[str]] = []

    def encode(self, texts, pooling=None, layers="all"):
        self.calls.append(list(texts))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("simulated crash (out of memory, pre-emption...)")
        out = np.stack([_vector(t, self.n_layers, self.hidden_size) for t in texts])
        return out if layers == "all" else out[:, layers]

    @property
    def n_encoded(self) -> int:
        return sum(len(c) for c in self.calls)


def _corpus(n: int, tag: str = ""):
    texts = [f"verse {i}{tag} — ünïcode" for i in range(n)]
    languages = np.array(["en", "fr", "de"] * n)[:n]
    pair_ids = np.arange(n) // 3
    labels = np.arange(n) % 5
    return texts, languages, pair_ids, labels


def _expected(texts) -> np.ndarray:
    return np.stack([_vector(t, N_LAYERS, DIM) for t in texts])


# ------------------------------------------------------------------ round trips


def test_build_round_trip(tmp_path):
    texts, langs, pids, labels = _corpus(23)
    enc = FakeEncoder()
    cache = EmbeddingCache.build(
        tmp_path / "c.zarr", enc, texts, languages=langs, pair_ids=pids, labels=labels, chunk_rows=5
    )
    assert [len(c) for c in enc.calls] == [5, 5, 5, 5, 3]
    assert (cache.n_rows, cache.n_layers, cache.dim) == (23, N_LAYERS + 1, DIM)
    np.testing.assert_array_equal(cache.to_numpy(), _expected(texts))
    assert cache.to_numpy().dtype == np.float32
    np.testing.assert_array_equal(cache.languages, langs)
    assert cache.languages.dtype.kind == "U"
    np.testing.assert_array_equal(cache.pair_ids, pids)
    assert cache.pair_ids.dtype == np.int64
    np.testing.assert_array_equal(cache.labels, labels)
    a = cache.attrs
    assert a["model"] == "fake/model" and a["pooling"] == "mean" and a["prefix"] == "passage: "
    assert a["max_length"] == 128 and a["encoder_n_layers"] == N_LAYERS and a["hidden_size"] == DIM
    assert a["n_layers"] == N_LAYERS + 1 and a["dtype"] == "float32" and a["layers"] == "all"
    assert a["library_version"] == __version__ and a["format_version"] == FORMAT_VERSION
    assert a["n_rows_planned"] == a["rows_completed"] == 23 and a["complete"] is True
    # reopening reads the same thing
    again = EmbeddingCache(tmp_path / "c.zarr")
    np.testing.assert_array_equal(again.to_numpy(layer=-1), _expected(texts)[:, -1])
    assert "n_rows=23" in repr(again)


def test_from_arrays_round_trip_str_pair_ids_and_attrs(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((11, 3, 6)).astype(np.float32)
    pids = np.array([f"v{i // 2}" for i in range(11)])
    cache = EmbeddingCache.from_arrays(
        tmp_path / "a.zarr",
        X,
        languages=["en", "sw"] * 5 + ["en"],
        pair_ids=pids,
        attrs={"model": "precomputed", "pooling": "cls", "note": "from a paper"},
        chunk_rows=4,
    )
    np.testing.assert_array_equal(cache.to_numpy(), X)
    np.testing.assert_array_equal(cache.pair_ids, pids)
    assert cache.pair_ids.dtype.kind == "U"
    assert cache.labels is None
    assert cache.attrs["model"] == "precomputed" and cache.attrs["note"] == "from a paper"
    assert cache.attrs["source"] == "from_arrays"
    # 2-D input is one layer; None fields stay None
    one = EmbeddingCache.from_arrays(tmp_path / "b.zarr", X[:, 0])
    assert one.n_layers == 1 and one.languages is None and one.pair_ids is None
    np.testing.assert_array_equal(one.to_numpy(layer=0), X[:, 0])
    for _, langs, pids_chunk in one.iter_chunks():
        assert langs is None and pids_chunk is None
    with pytest.raises(ValueError, match="already holds an embedding cache"):
        EmbeddingCache.from_arrays(tmp_path / "a.zarr", X)
    replaced = EmbeddingCache.from_arrays(tmp_path / "a.zarr", X[:3], overwrite=True)
    assert replaced.n_rows == 3
    with pytest.raises(ValueError, match="may not set"):
        EmbeddingCache.from_arrays(tmp_path / "c.zarr", X, attrs={"rows_completed": 1})


def test_from_arrays_memmap_bounded_memory(tmp_path):
    n, L, d, chunk = 16_000, 4, 64, 1000
    mm = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=np.float32, shape=(n, L, d))
    mm[:] = np.arange(n, dtype=np.float32)[:, None, None]
    mm.flush()
    X = np.load(tmp_path / "X.npy", mmap_mode="r")
    tracemalloc.start()
    try:
        cache = EmbeddingCache.from_arrays(tmp_path / "m.zarr", X, chunk_rows=chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    chunk_bytes = chunk * L * d * 4
    assert peak < 5 * chunk_bytes < X.nbytes / 3
    np.testing.assert_array_equal(cache.to_numpy(layer=2)[:, 0], np.arange(n))


def test_layer_view(tmp_path):
    X = np.random.default_rng(1).standard_normal((13, 3, 5)).astype(np.float32)
    cache = EmbeddingCache.from_arrays(tmp_path / "v.zarr", X, chunk_rows=4)
    view = cache.layer(-1)
    assert isinstance(view, CachedLayer)
    assert view.shape == (13, 5) and len(view) == 13 and view.ndim == 2
    ref = X[:, 2]
    mask = np.arange(13) % 3 == 0
    for key in (2, -1, slice(None), slice(3, 11), slice(None, None, -2), [7, 0, 7], mask):
        np.testing.assert_array_equal(view[key], ref[key])
    np.testing.assert_array_equal(view[-1, 1], ref[-1, 1])
    np.testing.assert_array_equal(view[:, :2], ref[:, :2])
    np.testing.assert_array_equal(view[..., 3], ref[..., 3])
    np.testing.assert_array_equal(np.asarray(view), ref)
    np.testing.assert_array_equal(np.asarray(cache.layer(0), dtype=np.float64), X[:, 0])
    with pytest.raises(IndexError):
        view[13]
    with pytest.raises(IndexError, match="3 layers"):
        cache.layer(3)


def test_to_numpy_layers_and_rows(tmp_path):
    X = np.random.default_rng(2).standard_normal((9, 4, 3)).astype(np.float32)
    cache = EmbeddingCache.from_arrays(tmp_path / "t.zarr", X, chunk_rows=2)
    np.testing.assert_array_equal(cache.to_numpy(layer=[3, 0]), X[:, [3, 0]])
    np.testing.assert_array_equal(cache.to_numpy(layer=1, rows=[8, 1]), X[[8, 1], 1])
    assert cache.to_numpy(layer=1, rows=[]).shape == (0, 3)
    with pytest.raises(ValueError, match="boolean rows mask needs 9"):
        cache.to_numpy(rows=np.ones(3, dtype=bool))
    with pytest.raises(IndexError):
        cache.to_numpy(rows=[9])


def test_to_dask(tmp_path, monkeypatch):
    pytest.importorskip("dask.array")
    X = np.random.default_rng(3).standard_normal((10, 3, 4)).astype(np.float16)
    cache = EmbeddingCache.from_arrays(tmp_path / "d.zarr", X, chunk_rows=4, dtype="float16")
    lazy = cache.to_dask(-1)
    assert lazy.dtype == np.float32 and lazy.chunks[0] == (4, 4, 2)
    np.testing.assert_array_equal(lazy.compute(), cache.to_numpy(layer=-1))
    monkeypatch.setitem(sys.modules, "dask", None)
    monkeypatch.setitem(sys.modules, "dask.array", None)
    with pytest.raises(ImportError, match=r'pip install "posthoc_align\[dask\]"'):
        cache.to_dask(0)


def test_float16(tmp_path):
    texts, langs, pids, _ = _corpus(10)
    cache = EmbeddingCache.build(
        tmp_path / "h.zarr", FakeEncoder(), texts, languages=langs, chunk_rows=4, dtype="float16"
    )
    assert cache.attrs["dtype"] == "float16"
    assert zarr.open_group(str(tmp_path / "h.zarr"), mode="r")["embeddings"].dtype == np.float16
    full = cache.to_numpy()
    assert full.dtype == np.float32
    np.testing.assert_allclose(full, _expected(texts), rtol=1e-3, atol=1e-3)
    for X, _, _ in cache.iter_chunks(layer=[0, 1]):
        assert X.dtype == np.float32
    # appending float32 embeddings to a float16 cache is refused
    with pytest.raises(ValueError, match="dtype"):
        EmbeddingCache.build(
            tmp_path / "h.zarr", FakeEncoder(), texts, languages=langs, append=True
        )
    # values beyond float16's range are an error, not silent infinities
    big = np.full((3, 1, 2), 1e6, dtype=np.float32)
    with pytest.raises(ValueError, match="float16"):
        EmbeddingCache.from_arrays(tmp_path / "big.zarr", big, dtype="float16")


# ------------------------------------------------------------------ resume and append


def test_resume_after_interruption_encodes_only_missing_chunks(tmp_path):
    texts, langs, pids, labels = _corpus(23)
    path = tmp_path / "r.zarr"
    kw = dict(languages=langs, pair_ids=pids, labels=labels, chunk_rows=5)
    crashing = FakeEncoder(fail_on_call=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        EmbeddingCache.build(path, crashing, texts, **kw)
    with pytest.raises(ValueError, match=r"10 of 23 rows are complete.*EmbeddingCache\.build"):
        EmbeddingCache(path)
    partial = EmbeddingCache(path, allow_incomplete=True)
    assert partial.n_rows == 10 and partial.attrs["complete"] is False
    np.testing.assert_array_equal(partial.to_numpy(), _expected(texts[:10]))
    np.testing.assert_array_equal(partial.languages, langs[:10])

    counting = FakeEncoder()
    cache = EmbeddingCache.build(path, counting, texts, **kw)
    assert counting.calls == [texts[10:15], texts[15:20], texts[20:23]]
    assert cache.attrs["complete"] is True
    np.testing.assert_array_equal(cache.to_numpy(), _expected(texts))
    np.testing.assert_array_equal(cache.labels, labels)

    # a finished cache with the same texts: nothing is encoded again
    again = FakeEncoder()
    EmbeddingCache.build(path, again, texts, **kw)
    assert again.calls == []


def test_resume_with_different_texts_or_encoder_is_an_error(tmp_path):
    texts, langs, pids, labels = _corpus(12)
    path = tmp_path / "r.zarr"
    with pytest.raises(RuntimeError):
        EmbeddingCache.build(
            path, FakeEncoder(fail_on_call=2), texts, languages=langs, chunk_rows=4
        )
    changed = list(texts)
    changed[2] = "another text"
    with pytest.raises(ValueError, match=r"text 2 .*differs"):
        EmbeddingCache.build(path, FakeEncoder(), changed, languages=langs, chunk_rows=4)
    with pytest.raises(ValueError, match="languages"):
        EmbeddingCache.build(path, FakeEncoder(), texts, languages=langs[::-1], chunk_rows=4)
    with pytest.raises(ValueError, match="model"):
        EmbeddingCache.build(path, FakeEncoder("other/model"), texts, languages=langs)
    with pytest.raises(ValueError, match="planned 12 texts but 11"):
        EmbeddingCache.build(path, FakeEncoder(), texts[:11], languages=langs[:11])
    with pytest.raises(ValueError, match="append=False"):
        EmbeddingCache.build(path, FakeEncoder(), texts, languages=langs, append=True)
    # none of those marked it complete
    assert zarr.open_group(str(path), mode="r").attrs["complete"] is False
    enc = FakeEncoder()
    assert EmbeddingCache.build(path, enc, texts, languages=langs).n_rows == 12
    assert enc.n_encoded == 8


def test_append(tmp_path):
    t1, l1, p1, y1 = _corpus(7)
    t2, l2, p2, y2 = _corpus(6, tag="b")
    path = tmp_path / "a.zarr"
    EmbeddingCache.build(
        path, FakeEncoder(), t1, languages=l1, pair_ids=p1, labels=y1, chunk_rows=4
    )
    enc = FakeEncoder()
    cache = EmbeddingCache.build(
        path, enc, t2, languages=l2, pair_ids=p2 + 100, labels=y2, append=True, chunk_rows=999
    )
    assert [len(c) for c in enc.calls] == [1, 4, 1]  # fills chunk 1, then the store's 4-row chunks
    assert cache.n_rows == 13 and cache.attrs["complete"] is True
    np.testing.assert_array_equal(cache.to_numpy(), _expected(t1 + t2))
    np.testing.assert_array_equal(cache.languages, np.concatenate([l1, l2]))
    np.testing.assert_array_equal(cache.pair_ids, np.concatenate([p1, p2 + 100]))
    np.testing.assert_array_equal(cache.labels, np.concatenate([y1, y2]))
    # append=True on a missing path creates it
    fresh = EmbeddingCache.build(tmp_path / "new.zarr", FakeEncoder(), t1, append=True)
    assert fresh.n_rows == 7


def test_interrupted_append_resumes(tmp_path):
    t1, l1, _, _ = _corpus(5)
    t2, l2, _, _ = _corpus(9, tag="b")
    path = tmp_path / "a.zarr"
    EmbeddingCache.build(path, FakeEncoder(), t1, languages=l1, chunk_rows=3)
    with pytest.raises(RuntimeError):
        EmbeddingCache.build(path, FakeEncoder(fail_on_call=3), t2, languages=l2, append=True)
    with pytest.raises(ValueError, match=r"9 of 14 rows.*append=True"):
        EmbeddingCache(path)
    with pytest.raises(ValueError, match="append=True"):
        EmbeddingCache.build(path, FakeEncoder(), t2, languages=l2)
    enc = FakeEncoder()
    cache = EmbeddingCache.build(path, enc, t2, languages=l2, append=True)
    assert enc.calls == [t2[4:7], t2[7:9]]
    np.testing.assert_array_equal(cache.to_numpy(), _expected(t1 + t2))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(model_id="another/model"), "model"),
        (dict(pooling="cls"), "pooling"),
        (dict(hidden_size=8), "hidden_size"),
        (dict(n_layers=3), "encoder_n_layers"),
    ],
)
def test_append_with_a_different_encoder_is_an_error(tmp_path, change, match):
    texts, langs, _, _ = _corpus(4)
    path = tmp_path / "a.zarr"
    EmbeddingCache.build(path, FakeEncoder(), texts, languages=langs)
    other = FakeEncoder(**change)
    with pytest.raises(ValueError, match=f"Cannot append.*{match}"):
        EmbeddingCache.build(path, other, texts, languages=langs, append=True)
    assert other.calls == []
    cache = EmbeddingCache(path)
    assert cache.n_rows == 4 and cache.attrs["complete"] is True


def test_append_with_different_fields_is_an_error(tmp_path):
    texts, langs, pids, _ = _corpus(4)
    path = tmp_path / "a.zarr"
    EmbeddingCache.build(path, FakeEncoder(), texts, languages=langs, pair_ids=pids)
    with pytest.raises(ValueError, match="pass pair_ids"):
        EmbeddingCache.build(path, FakeEncoder(), texts, languages=langs, append=True)
    with pytest.raises(ValueError, match="pair_ids are ints"):
        EmbeddingCache.build(
            path, FakeEncoder(), texts, languages=langs, pair_ids=pids.astype(str), append=True
        )
    with pytest.raises(ValueError, match="drop labels"):
        EmbeddingCache.build(
            path, FakeEncoder(), texts, languages=langs, pair_ids=pids, labels=pids, append=True
        )


def test_finished_cache_with_other_texts_is_not_overwritten(tmp_path):
    texts, _, _, _ = _corpus(4)
    path = tmp_path / "c.zarr"
    EmbeddingCache.build(path, FakeEncoder(), texts)
    with pytest.raises(ValueError, match="append=True"):
        EmbeddingCache.build(path, FakeEncoder(), texts + ["more"])
    with pytest.raises(ValueError, match="differs"):
        EmbeddingCache.build(path, FakeEncoder(), texts[::-1])
    replaced = EmbeddingCache.build(path, FakeEncoder(), texts[:2], overwrite=True)
    assert replaced.n_rows == 2


# ------------------------------------------------------------------ damaged and foreign stores


def _chunk_files(array_dir: Path) -> list[Path]:
    meta = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}
    return sorted(p for p in array_dir.rglob("*") if p.is_file() and p.name not in meta)


def test_missing_chunk_file_is_a_clear_error(tmp_path):
    X = np.ones((10, 2, 3), dtype=np.float32)
    EmbeddingCache.from_arrays(tmp_path / "t.zarr", X, languages=["en"] * 10, chunk_rows=4)
    files = _chunk_files(tmp_path / "t.zarr" / "embeddings")
    assert len(files) == 3
    files[1].unlink()
    with pytest.raises(ValueError, match=r"truncated.*2 of its 3 chunk files"):
        EmbeddingCache(tmp_path / "t.zarr")


def test_damaged_chunk_file_is_a_clear_error_on_read(tmp_path):
    X = np.arange(10 * 2 * 3, dtype=np.float32).reshape(10, 2, 3)
    EmbeddingCache.from_arrays(tmp_path / "t.zarr", X, languages=["en"] * 10, chunk_rows=4)
    files = _chunk_files(tmp_path / "t.zarr" / "embeddings")
    raw = files[1].read_bytes()
    files[1].write_bytes(raw[: len(raw) // 2])  # a chunk cut short
    cache = EmbeddingCache(tmp_path / "t.zarr")
    np.testing.assert_array_equal(cache.to_numpy(rows=slice(0, 4)), X[:4])  # intact chunk
    for read in (cache.to_numpy, lambda: cache.layer(0)[3:6], lambda: list(cache.iter_chunks())):
        with pytest.raises(ValueError, match=r"could not read rows.*damaged.*overwrite=True"):
            read()


def test_rows_completed_low_is_incomplete(tmp_path):
    texts, _, _, _ = _corpus(9)
    path = tmp_path / "c.zarr"
    EmbeddingCache.build(path, FakeEncoder(), texts, chunk_rows=3)
    zarr.open_group(str(path), mode="r+").attrs.update({"rows_completed": 3})
    with pytest.raises(ValueError, match=r"incomplete.*3 of 9 rows.*EmbeddingCache\.build"):
        EmbeddingCache(path)
    assert EmbeddingCache(path, allow_incomplete=True).n_rows == 3
    enc = FakeEncoder()
    assert EmbeddingCache.build(path, enc, texts).n_rows == 9
    assert enc.calls == [texts[3:6], texts[6:9]]


def test_not_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="No embedding cache"):
        EmbeddingCache(tmp_path / "missing.zarr")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a posthoc_align embedding cache"):
        EmbeddingCache(plain)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a posthoc_align embedding cache"):
        EmbeddingCache(tmp_path / "file.txt")
    group = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    group.attrs.update({"creator": "someone else"})
    with pytest.raises(ValueError, match="zarr store but not a posthoc_align"):
        EmbeddingCache(tmp_path / "other.zarr")
    zarr.open_array(str(tmp_path / "arr.zarr"), mode="w", shape=(3,), dtype="f4")
    with pytest.raises(ValueError, match="not a posthoc_align embedding cache"):
        EmbeddingCache(tmp_path / "arr.zarr")
    # building into a foreign folder refuses, and leaves it alone (overwrite too)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a posthoc_align"):
            EmbeddingCache.build(plain, FakeEncoder(), ["a"], overwrite=overwrite)
    assert sorted(os.listdir(plain)) == ["notes.txt"]


def test_format_and_library_versions(tmp_path):
    path = tmp_path / "v.zarr"
    EmbeddingCache.from_arrays(path, np.zeros((2, 1, 2), dtype=np.float32))
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update({"library_version": "0.0.1"})
    with pytest.warns(UserWarning, match="written by posthoc_align 0.0.1"):
        EmbeddingCache(path)
    group.attrs.update({"format_version": FORMAT_VERSION + 1})
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        EmbeddingCache(path)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(texts=[]), ValueError, "texts is empty"),
        (dict(texts="one text"), TypeError, "single string"),
        (dict(texts=["a", 3]), TypeError, r"texts\[1\]"),
        (dict(languages=["en"] * 4), ValueError, "languages has 4 entries but there are 5 rows"),
        (dict(pair_ids=[0, 1]), ValueError, "pair_ids has 2 entries"),
        (dict(pair_ids=[0.5] * 5), TypeError, "pair_ids must be all ints or all strings"),
        (dict(labels=[0.5] * 5), TypeError, "labels must be integers"),
        (dict(languages=[1] * 5), TypeError, "languages must be strings"),
        # numpy would turn a list mixing strings and ints into strings ("1")
        (dict(languages=["en", 1, "fr", "de", "en"]), TypeError, "languages must be strings"),
        (dict(pair_ids=[0, "a", 1, 2, 3]), TypeError, "pair_ids must be all ints or all str"),
        (dict(chunk_rows=0), ValueError, "chunk_rows"),
        (dict(dtype="int8"), ValueError, "dtype"),
        (dict(layers="some"), ValueError, "layers"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, kwargs, error, match):
    args = dict(texts=[f"t{i}" for i in range(5)])
    args.update(kwargs)
    enc = FakeEncoder()
    with pytest.raises(error, match=match):
        EmbeddingCache.build(tmp_path / "bad.zarr", enc, **args)
    assert enc.calls == []
    assert not (tmp_path / "bad.zarr").exists()


@pytest.mark.parametrize(
    ("field", "values", "row", "what"),
    [
        ("languages", ["en", None, "fr"], 1, "label"),
        ("languages", np.array(["en", "fr", None], dtype=object), 2, "label"),
        ("languages", [np.nan, "en", "fr"], 0, "label"),
        ("languages", np.array([1.0, np.nan, 2.0]), 1, "label"),
        ("pair_ids", [0, None, 1], 1, "pair id"),
        ("pair_ids", [0.0, 1.0, np.nan], 2, "pair id"),
        ("labels", [1, None, 0], 1, "label"),
        ("labels", [np.nan, 1.0, 0.0], 0, "label"),
    ],
)
def test_missing_row_values_are_refused_not_stored_as_text(tmp_path, field, values, row, what):
    # None used to be stored as the string "None" (a language of its own)
    texts = ["a", "b", "c"]
    match = rf"{field} contains a missing value \(.* at row {row}\); every row needs a {what}"
    enc = FakeEncoder()
    with pytest.raises(ValueError, match=match):
        EmbeddingCache.build(tmp_path / "b.zarr", enc, texts, **{field: values})
    assert enc.calls == [] and not (tmp_path / "b.zarr").exists()
    X = np.zeros((3, 2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        EmbeddingCache.from_arrays(tmp_path / "f.zarr", X, **{field: values})
    assert not (tmp_path / "f.zarr").exists()


class _PrecisionEncoder(FakeEncoder):
    """A FakeEncoder that reports its forward-pass precision, as HFEncoder does."""

    def __init__(self, compute_dtype="float32", cast_weights=False, **kw) -> None:
        super().__init__(**kw)
        self.compute_dtype, self.cast_weights = compute_dtype, cast_weights


def test_append_or_resume_in_another_compute_precision_is_an_error(tmp_path):
    texts, langs, _, _ = _corpus(6)
    path = tmp_path / "p.zarr"
    cache = EmbeddingCache.build(path, _PrecisionEncoder(), texts[:3], languages=langs[:3])
    assert cache.attrs["compute_dtype"] == "float32" and cache.attrs["cast_weights"] is False
    for dtype, cast in (("bfloat16", False), ("bfloat16", True), ("float16", False)):
        other = _PrecisionEncoder(dtype, cast)
        with pytest.raises(
            ValueError, match=f"Cannot append.*compute_dtype: cache has 'float32', now '{dtype}'"
        ):
            EmbeddingCache.build(path, other, texts[3:], languages=langs[3:], append=True)
        assert other.calls == []
    # autocast and cast weights in the same dtype are told apart too
    bf = tmp_path / "bf.zarr"
    cache = EmbeddingCache.build(bf, _PrecisionEncoder("bfloat16"), texts[:3], languages=langs[:3])
    assert cache.attrs["compute_dtype"] == "bfloat16" and cache.attrs["cast_weights"] is False
    with pytest.raises(ValueError, match="cast_weights: cache has False, now True"):
        EmbeddingCache.build(
            bf, _PrecisionEncoder("bfloat16", True), texts[3:], languages=langs[3:], append=True
        )
    # an interrupted fp32 build is not resumed in bfloat16
    part = tmp_path / "part.zarr"
    with pytest.raises(RuntimeError, match="simulated"):
        EmbeddingCache.build(part, _PrecisionEncoder(fail_on_call=2), texts, chunk_rows=2)
    with pytest.raises(ValueError, match="Cannot resume.*compute_dtype"):
        EmbeddingCache.build(part, _PrecisionEncoder("bfloat16"), texts, chunk_rows=2)
    # the same precision appends
    cache = EmbeddingCache.build(
        path, _PrecisionEncoder(), texts[3:], languages=langs[3:], append=True
    )
    assert cache.n_rows == 6


def test_a_cache_without_precision_attributes_counts_as_float32(tmp_path):
    # caches written before the precision was recorded: every encoder ran in float32
    texts, langs, _, _ = _corpus(6)
    path = tmp_path / "old.zarr"
    EmbeddingCache.build(path, _PrecisionEncoder(), texts[:3], languages=langs[:3])
    group = zarr.open_group(str(path), mode="r+")
    attrs = dict(group.attrs)
    for key in ("compute_dtype", "cast_weights"):
        del attrs[key]
    group.attrs.clear()
    group.attrs.update(attrs)
    assert "compute_dtype" not in EmbeddingCache(path).attrs
    with pytest.raises(ValueError, match="compute_dtype: cache has 'float32', now 'bfloat16'"):
        EmbeddingCache.build(
            path, _PrecisionEncoder("bfloat16"), texts[3:], languages=langs[3:], append=True
        )
    cache = EmbeddingCache.build(
        path, _PrecisionEncoder(), texts[3:], languages=langs[3:], append=True
    )
    assert cache.n_rows == 6
    # an encoder that does not report its precision is not refused for it
    cache = EmbeddingCache.build(path, FakeEncoder(), ["x"], languages=["en"], append=True)
    assert cache.n_rows == 7


class _BadEncoder(FakeEncoder):
    def __init__(self, bad_call: int, kind: str) -> None:
        super().__init__()
        self.bad_call, self.kind = bad_call, kind

    def encode(self, texts, pooling=None, layers="all"):
        out = super().encode(texts, pooling, layers)
        if len(self.calls) == self.bad_call:
            out = out[:, :, :2] if self.kind == "shape" else np.full_like(out, np.nan)
        return out


@pytest.mark.parametrize("kind", ["shape", "nan"])
def test_bad_encoder_output_leaves_store_incomplete(tmp_path, kind):
    texts = [f"t{i}" for i in range(9)]
    with pytest.raises(ValueError, match="shape" if kind == "shape" else "NaN"):
        EmbeddingCache.build(tmp_path / "c.zarr", _BadEncoder(2, kind), texts, chunk_rows=3)
    group = zarr.open_group(str(tmp_path / "c.zarr"), mode="r")
    assert group.attrs["complete"] is False and group.attrs["rows_completed"] == 3
    with pytest.raises(ValueError, match="dim 2 != encoder.hidden_size"):
        EmbeddingCache.build(tmp_path / "first.zarr", _BadEncoder(1, "shape"), texts)
    assert not (tmp_path / "first.zarr").exists()


def test_progress_callable_and_layers_subset(tmp_path):
    seen = []
    texts = [f"t{i}" for i in range(7)]
    cache = EmbeddingCache.build(
        tmp_path / "p.zarr",
        FakeEncoder(),
        texts,
        layers=[0, -1],
        chunk_rows=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(3, 7), (6, 7), (7, 7)]
    assert cache.n_layers == 2 and cache.attrs["layers"] == [0, -1]
    np.testing.assert_array_equal(cache.to_numpy(), _expected(texts)[:, [0, -1]])


# ------------------------------------------------------------------ streaming


@pytest.fixture(scope="module")
def stream_cache(tmp_path_factory):
    n = 37
    X = np.random.default_rng(7).standard_normal((n, 3, 4)).astype(np.float32)
    langs = np.array(["en", "fr", "de", "ja"] * 10)[:n]
    pids = np.array([f"p{i // 4}" for i in range(n)])
    path = tmp_path_factory.mktemp("stream") / "s.zarr"
    cache = EmbeddingCache.from_arrays(path, X, languages=langs, pair_ids=pids, chunk_rows=5)
    return cache, X, langs, pids


_rows = st.one_of(
    st.none(),
    st.lists(st.booleans(), min_size=37, max_size=37).map(np.array),
    st.lists(st.integers(-37, 36), max_size=60).map(lambda v: np.array(v, dtype=np.int64)),
    st.sets(st.integers(0, 36)).map(lambda v: np.array(sorted(v), dtype=np.int64)),
    st.tuples(st.integers(-40, 40), st.integers(-40, 40), st.sampled_from([1, 2, -1])).map(
        lambda t: slice(*t)
    ),
)


@settings(max_examples=60, deadline=None)
@given(
    rows=_rows,
    layer=st.sampled_from([-1, 0, 1, [2, 0], [1, 1], None]),
    chunk_rows=st.sampled_from([None, 1, 3, 5, 7, 100]),
)
def test_iter_chunks_equals_to_numpy_rows(stream_cache, rows, layer, chunk_rows):
    cache, X, langs, pids = stream_cache
    index = np.arange(37) if rows is None else np.arange(37)[rows]
    want = X[index] if layer is None else X[index][:, layer]
    blocks = list(cache.iter_chunks(layer=layer, rows=rows, chunk_rows=chunk_rows))
    limit = 5 if chunk_rows is None else chunk_rows
    for Xc, lc, pc in blocks:
        assert Xc.dtype == np.float32 and 0 < Xc.shape[0] <= limit
        assert Xc.shape[1:] == want.shape[1:] and lc.shape == pc.shape == (Xc.shape[0],)
    got = np.concatenate([b[0] for b in blocks]) if blocks else want[:0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cache.to_numpy(layer=layer, rows=rows), want)
    if blocks:
        np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), langs[index])
        np.testing.assert_array_equal(np.concatenate([b[2] for b in blocks]), pids[index])


def test_iter_chunks_default_blocks_follow_zarr_chunks(stream_cache):
    cache, X, _, _ = stream_cache
    sizes = [x.shape[0] for x, _, _ in cache.iter_chunks()]
    assert sizes == [5] * 7 + [2]
    mask = np.zeros(37, dtype=bool)
    mask[[0, 3, 4, 21, 36]] = True
    blocks = [p for _, _, p in cache.iter_chunks(rows=mask)]
    assert [len(b) for b in blocks] == [3, 1, 1]  # chunks 0, 4 and 7


# ------------------------------------------------------------------ memory


def test_build_peak_memory_is_about_one_chunk(tmp_path):
    n, n_layers, dim, chunk = 20_000, 12, 64, 1024

    class RandomEncoder:
        model_id, pooling, prefix, max_length = "random", "mean", None, 16
        hidden_size = dim

        def __init__(self) -> None:
            self.n_layers = n_layers
            self.rng = np.random.default_rng(0)

        def encode(self, texts, pooling=None, layers="all"):
            return self.rng.standard_normal((len(texts), n_layers + 1, dim), dtype=np.float32)

    texts = [f"sentence {i}" for i in range(n)]
    langs = np.array(["en", "fr", "de", "zh"] * (n // 4))
    pids = np.arange(n) // 4
    tracemalloc.start()
    try:
        cache = EmbeddingCache.build(
            tmp_path / "big.zarr", RandomEncoder(), texts, languages=langs, pair_ids=pids
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    chunk_bytes = chunk * (n_layers + 1) * dim * 4  # 3.4 MB; the whole store is 66.6 MB
    assert cache.n_rows == n
    assert peak < 5 * chunk_bytes, f"peak {peak / 1e6:.1f} MB for {chunk_bytes / 1e6:.1f} MB chunks"


def test_build_peak_memory_does_not_grow_with_the_corpus(tmp_path):
    # Same chunk, 4x the rows: the traced peak (numpy and Python allocations) may grow only by the
    # per-row inputs (text list, languages, pair ids: ~30 B a row), never by chunks of states.
    n_layers, dim, chunk = 12, 64, 128
    chunk_bytes = chunk * (n_layers + 1) * dim * 4  # 426 kB

    class RandomEncoder:
        model_id, pooling, prefix, max_length = "random", "mean", None, 16
        hidden_size = dim

        def __init__(self) -> None:
            self.n_layers = n_layers
            self.rng = np.random.default_rng(0)

        def encode(self, texts, pooling=None, layers="all"):
            return self.rng.standard_normal((len(texts), n_layers + 1, dim), dtype=np.float32)

    def traced_peak(n: int) -> int:
        texts = [f"sentence {i}" for i in range(n)]
        langs = np.array(["en", "fr", "de", "zh"] * (n // 4))
        pids = np.arange(n) // 4
        encoder = RandomEncoder()
        tracemalloc.start()
        try:
            EmbeddingCache.build(
                tmp_path / f"{n}.zarr",
                encoder,
                texts,
                languages=langs,
                pair_ids=pids,
                chunk_rows=chunk,
                progress=False,
            )
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = traced_peak(6 * chunk), traced_peak(24 * chunk)
    assert large - small < 0.5 * chunk_bytes, (
        f"peak {small / 1e6:.2f} MB for {6 * chunk} rows, {large / 1e6:.2f} MB for {24 * chunk} "
        f"rows ({chunk_bytes / 1e6:.2f} MB chunks)"
    )
    assert large < 5 * chunk_bytes
