"""``factorize`` (language codes for every fit and transform) equals ``np.unique``."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posthoc_align._validation import factorize

ALPHABET = st.text(alphabet="abzé中\x01", min_size=0, max_size=4)


def _check(arr: np.ndarray) -> None:
    labels, codes = factorize(arr)
    ref_labels, ref_codes = np.unique(arr, return_inverse=True)
    np.testing.assert_array_equal(labels, ref_labels)
    assert labels.dtype == ref_labels.dtype
    assert codes.dtype == np.int64 and codes.shape == arr.shape
    np.testing.assert_array_equal(codes, ref_codes.reshape(-1))


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(ALPHABET, min_size=1, max_size=6, unique=True),
    sizes=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factorize_matches_unique_strings(labels, sizes, shuffle, seed):
    rng = np.random.default_rng(seed)
    arr = np.concatenate([np.full(s, labels[i % len(labels)]) for i, s in enumerate(sizes)]).astype(
        f"<U{max(1, max(map(len, labels)))}"
    )
    if shuffle:
        arr = arr[rng.permutation(arr.size)]
    _check(arr)


@pytest.mark.parametrize("width", [1, 2, 3, 8])
@pytest.mark.parametrize("layout", ["grouped", "shuffled"])
def test_factorize_paths(width, layout):
    rng = np.random.default_rng(width)
    pool = np.array(["".join(rng.choice(list("abcxyz中"), width)) for _ in range(7)] + ["a"])
    arr = np.repeat(pool, 300)
    if layout == "shuffled":
        arr = arr[rng.permutation(arr.size)]
    _check(arr)


@pytest.mark.parametrize("dtype", [np.int64, np.int8, np.uint16, bool])
def test_factorize_integer_labels(dtype):
    rng = np.random.default_rng(0)
    arr = np.repeat(np.array([3, 1, 2, 1, 0]).astype(dtype), 500)
    _check(arr)
    _check(arr[rng.permutation(arr.size)])


def test_factorize_does_not_mutate():
    arr = np.repeat(np.array(["fr", "en", "de"]), 1000)[::-1].copy()
    before = arr.copy()
    factorize(arr)
    factorize(arr[::2])  # non-contiguous
    np.testing.assert_array_equal(arr, before)


def test_factorized_labels_are_reused_and_views_drop_them():
    from posthoc_align._validation import check_labels, factorized

    langs = np.array(["fr", "en", "fr", "de"] * 100)
    f = factorized(langs, langs.size)
    labels, codes = check_labels(f, langs.size, "languages")
    np.testing.assert_array_equal(labels, ["de", "en", "fr"])
    np.testing.assert_array_equal(labels[codes], langs)
    part = f[::2]  # a view: its own factorisation, never the parent's
    assert part._factors is None
    labels2, codes2 = check_labels(part, part.size, "languages")
    np.testing.assert_array_equal(labels2[codes2], langs[::2])
    with pytest.raises(ValueError, match="entries but X has"):
        check_labels(f, langs.size + 1, "languages")
    assert factorized(None, 3) is None


@pytest.mark.parametrize(
    "pool",
    [
        np.array(["eng_Latn", "deu_Latn", "zho_Hans", "a", "", "\x01b"]),  # exact 8-byte keys
        np.array(["english_bible", "german", "中文", "portuguese_brazil"]),  # hashed
        np.array([-5, 3, 0, 2**40, -(2**40)]),
        np.array([2**64 - 1, 0, 7], dtype=np.uint64),
    ],
)
def test_factorize_shuffled_key_paths(pool):
    rng = np.random.default_rng(1)
    _check(pool[rng.integers(0, pool.size, 3000)])


def test_factorize_many_labels_and_bucket_collisions(monkeypatch):
    import posthoc_align._validation as v

    rng = np.random.default_rng(2)
    many = np.array([f"l{i:05d}" for i in range(20000)])[rng.integers(0, 20000, 50000)]
    _check(many)  # ~20k distinct keys in 2**16 buckets: collisions -> np.unique fallback
    monkeypatch.setattr(v, "_BUCKET_BITS", 1)  # every pair of languages collides
    _check(np.array(["en", "de", "fr"])[rng.integers(0, 3, 1000)])
    _check(np.array(["english_x", "german_xx", "french_xx"])[rng.integers(0, 3, 1000)])
