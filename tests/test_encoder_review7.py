"""Review 7: HFEncoder leaves a caller's model object as it was; truncation warns once per build.

Tiny random models and a word-level tokenizer are built here (as in ``test_encoders.py``):
nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import warnings

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

from posthoc_align.cache import EmbeddingCache
from posthoc_align.encoders import AlignedEncoder, HFEncoder, hf

WORDS = "the a cat dog sat on mat le chat der hund is big small red blue house".split()
SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
TEXTS = ["the cat sat on the mat", "le chat", "der hund is big", "red", "a small blue house"]
LONG = "the cat sat on the mat " * 4  # 24 words: longer than max_length=6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tokenizer():
    vocab = {w: i for i, w in enumerate([*SPECIALS, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _bert(seed: int = 0) -> BertModel:
    """A tiny BERT in training mode (dropout 0.1), as ``BertModel(config)`` returns it."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(SPECIALS) + len(WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return BertModel(config, add_pooling_layer=False)


def _state(model: torch.nn.Module) -> dict:
    return {k: (v.dtype, v.device, v.data_ptr()) for k, v in model.state_dict().items()}


# -- finding 1: a model object is never cast in place ---------------------------------------------
@pytest.mark.parametrize(
    "model_dtype, kwargs",
    [
        (torch.bfloat16, {}),
        (torch.float16, {}),
        (torch.bfloat16, {"dtype": "bfloat16"}),  # the autocast path
    ],
)
def test_half_precision_model_object_is_not_cast_in_place(model_dtype, kwargs, monkeypatch):
    monkeypatch.setattr(hf, "_cpu_bf16", lambda: True)  # no "emulated bfloat16" warning
    model = _bert().to(model_dtype)
    before = _state(model)
    reference = copy.deepcopy(model).float()  # what the encoder should run: a float32 copy
    enc = HFEncoder(model, _tokenizer(), device="cpu", show_progress_bar=False, **kwargs)
    # the caller's object keeps its dtype, tensors and mode: only the encoder's copy is float32
    assert _state(model) == before and model.training
    assert enc.model is not model
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
    assert not enc.model.training
    X = enc.encode(TEXTS)
    assert _state(model) == before and model.training
    expected = HFEncoder(reference, _tokenizer(), device="cpu", **kwargs).encode(TEXTS)
    np.testing.assert_array_equal(X, expected)  # the copy holds the same (upcast) weights


def test_mixed_dtype_model_object_is_copied_and_float32_is_used_as_is():
    model = _bert()
    model.embeddings.LayerNorm.to(torch.float16)  # one float16 module in a float32 model
    enc = HFEncoder(model, _tokenizer(), device="cpu")
    assert enc.model is not model and model.embeddings.LayerNorm.weight.dtype == torch.float16
    assert {p.dtype for p in enc.model.parameters()} == {torch.float32}
    model = _bert()
    enc = HFEncoder(model, _tokenizer(), device="cpu")
    assert enc.model is model  # float32: no copy, put in eval mode (documented)
    assert not model.training


def test_encode_runs_in_eval_mode_and_restores_each_modules_mode():
    model = _bert()
    enc = HFEncoder(model, _tokenizer(), device="cpu", show_progress_bar=False)
    expected = enc.encode(TEXTS)  # eval mode: deterministic
    expected_cls = enc.encode(TEXTS, pooling="cls", layers=[0, -1])
    model.train()  # the caller goes back to fine-tuning the shared model
    model.embeddings.eval()  # with one part frozen in eval mode
    modes = {name: m.training for name, m in model.named_modules()}
    torch.manual_seed(123)
    np.testing.assert_array_equal(enc.encode(TEXTS), expected)  # no dropout
    cls = enc.encode(TEXTS, pooling="cls", layers=[0, -1])  # the hooks path, too
    np.testing.assert_array_equal(cls, expected_cls)
    assert {name: m.training for name, m in model.named_modules()} == modes

    class _Broken:
        def transform(self, X):
            raise RuntimeError("broken transform")

    with pytest.raises(RuntimeError, match="broken transform"):  # inside the forward pass
        AlignedEncoder(enc, {1: _Broken()}, propagate=True).encode(TEXTS)
    # modes come back after an error too
    assert {name: m.training for name, m in model.named_modules()} == modes


# -- finding 2: one truncation warning per EmbeddingCache.build -----------------------------------
def _truncation_warnings(caught) -> list[warnings.WarningMessage]:
    return [w for w in caught if "truncated" in str(w.message)]


def test_build_warns_once_with_the_count_over_all_chunks(tmp_path):
    enc = HFEncoder(_bert(), _tokenizer(), device="cpu", max_length=6, show_progress_bar=False)
    texts = [LONG] * 5 + ["red", "le chat", "the cat"]  # 5 of 8 longer than 6 tokens
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = EmbeddingCache.build(tmp_path / "c.zarr", enc, texts, chunk_rows=3)
    found = _truncation_warnings(caught)
    assert [str(w.message)[:37] for w in found] == ["5 of 8 texts were longer than max_len"]
    assert "max_length=6 tokens" in str(found[0].message)
    assert found[0].filename == __file__  # points at the build call
    # encode alone still warns once per call (the build's tally is gone)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X = enc.encode(texts)
    assert [str(w.message)[:12] for w in _truncation_warnings(caught)] == ["5 of 8 texts"]
    np.testing.assert_allclose(cache.layer(-1)[:], X[:, -1], atol=1e-6)


def test_build_with_an_aligned_encoder_warns_once(tmp_path):
    base = HFEncoder(_bert(), _tokenizer(), device="cpu", max_length=6, show_progress_bar=False)

    class _Shift:
        def transform(self, X):
            return X + 1.0

    aligned = AlignedEncoder(base, {1: _Shift()})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EmbeddingCache.build(tmp_path / "a.zarr", aligned, [LONG] * 7, chunk_rows=2)
    found = _truncation_warnings(caught)
    assert len(found) == 1 and str(found[0].message).startswith("7 of 7 texts")
    assert base._truncations is None  # restored after the build


def test_build_without_truncation_does_not_warn(tmp_path):
    enc = HFEncoder(_bert(), _tokenizer(), device="cpu", show_progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        EmbeddingCache.build(tmp_path / "c.zarr", enc, TEXTS, chunk_rows=2)
    assert not _truncation_warnings(caught)


def test_build_stopped_part_way_still_reports_its_truncations(tmp_path):
    """The tally was dropped when build raised: truncated rows already written were never
    reported (regression review)."""
    enc = HFEncoder(_bert(), _tokenizer(), device="cpu", max_length=6, show_progress_bar=False)
    texts = [LONG] * 5 + ["the cat"] * 3

    class Flaky:  # fails on its third chunk
        def __init__(self, e):
            self.e, self.n = e, 0

        def __getattr__(self, k):
            return getattr(self.e, k)

        def encode(self, t, **kw):
            self.n += 1
            if self.n > 2:
                raise RuntimeError("boom")
            return self.e.encode(t, **kw)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="boom"):
            EmbeddingCache.build(tmp_path / "c.zarr", Flaky(enc), texts, chunk_rows=3)
    msgs = [str(w.message) for w in rec if "truncated" in str(w.message)]
    assert len(msgs) == 1 and msgs[0].startswith("5 of 6 texts")


def test_build_failure_is_not_hidden_by_the_warning_under_warnings_as_errors(tmp_path):
    enc = HFEncoder(_bert(), _tokenizer(), device="cpu", max_length=6, show_progress_bar=False)

    class Flaky:
        def __init__(self, e):
            self.e, self.n = e, 0

        def __getattr__(self, k):
            return getattr(self.e, k)

        def encode(self, t, **kw):
            self.n += 1
            if self.n > 1:
                raise RuntimeError("boom")
            return self.e.encode(t, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="boom"):
            EmbeddingCache.build(tmp_path / "c.zarr", Flaky(enc), [LONG] * 4, chunk_rows=2)
