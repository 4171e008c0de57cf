"""HFEncoder, AlignedEncoder and TextEncoder on tiny random BERT, XLM-R and GPT-2 models.

Models and tokenizers are built here from configs and a word-level vocabulary: nothing is
downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import warnings
import weakref

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaModel,
)
from transformers.modeling_outputs import BaseModelOutput

from posthoc_align.encoders import AlignedEncoder, HFEncoder, TextEncoder, TokenStates, hf
from posthoc_align.encoders._hooks import find_layer_modules, first_tensor, replace_first_tensor
from posthoc_align.encoders.hf import _pool

WORDS = (
    "the a cat dog sat on mat le chat der hund is was big small red blue house tree runs "
    "fast slowly and or la maison est grand petit das haus rot"
).split()
TEXTS = [
    "the cat sat on the mat and the dog runs fast",
    "le chat",
    "der hund is big",
    "red",
    "a small blue house and a big red tree",
    "la maison est grand",
    "das haus",
]
N_LAYERS, HIDDEN = 3, 32


def _word_tokenizer(specials, template=None, **special_tokens):
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[-1] if template else specials[0]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        bos, eos = template
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special_tokens), len(vocab)


def _bert():
    tok, vocab = _word_tokenizer(
        ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"],
        ("[CLS]", "[SEP]"),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return BertModel(config, add_pooling_layer=False), tok


def _xlmr():
    tok, vocab = _word_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>"],
        ("<s>", "</s>"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    torch.manual_seed(1)
    config = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=66,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    return XLMRobertaModel(config, add_pooling_layer=False), tok


def _gpt2():
    # Like GPT-2's own tokenizer: no pad token, no special tokens added around a text.
    tok, vocab = _word_tokenizer(
        ["<|endoftext|>"], eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=HIDDEN,
        n_layer=N_LAYERS,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2Model(config), tok


BUILDERS = {"bert": _bert, "xlmr": _xlmr, "gpt2": _gpt2}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models gain nothing from threads, and OpenMP threads on a busy 2-core machine wait on
    # each other (20 ms instead of 1 ms per matmul); restore the setting for other modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def model_and_tokenizer(request):
    return BUILDERS[request.param]()


@pytest.fixture(scope="module")
def bert():
    return _bert()


@pytest.fixture
def encoder(model_and_tokenizer):
    model, tok = model_and_tokenizer
    return HFEncoder(model, tok, batch_size=3, show_progress_bar=False)


def _hooks(model):
    """Every forward (pre-)hook on the model (transformers installs its own, permanently)."""
    return {
        (name, kind, key)
        for name, module in model.named_modules()
        for kind, hooks in (("post", module._forward_hooks), ("pre", module._forward_pre_hooks))
        for key in hooks
    }


# -- HFEncoder: shapes and layers -----------------------------------------------------------------
def test_shapes_dtype_and_attributes(encoder):
    X = encoder.encode(TEXTS)
    assert X.shape == (len(TEXTS), N_LAYERS + 1, HIDDEN) and X.dtype == np.float32
    assert encoder.n_layers == N_LAYERS and encoder.hidden_size == HIDDEN
    expected = "cuda" if torch.cuda.is_available() else "cpu"  # device="auto"
    assert encoder.device.type == expected and not encoder.model.training
    assert isinstance(encoder.model_id, str) and encoder.model_id


def test_layer_selection_matches_all(encoder):
    X = encoder.encode(TEXTS)
    np.testing.assert_allclose(encoder.encode(TEXTS, layers=2), X[:, [2]], atol=1e-6)
    np.testing.assert_allclose(encoder.encode(TEXTS, layers=[-1, 0, 2]), X[:, [3, 0, 2]], atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        encoder.encode(TEXTS, layers=N_LAYERS + 1)
    with pytest.raises(ValueError, match="out of range"):
        encoder.encode(TEXTS, layers=[-(N_LAYERS + 2)])
    with pytest.raises(TypeError, match="ints"):
        encoder.encode(TEXTS, layers=[1.5])
    with pytest.raises(ValueError, match="'all'"):
        encoder.encode(TEXTS, layers="last")


def test_layer_zero_is_embedding_output(bert):
    model, tok = bert
    enc = HFEncoder(model, tok, pooling="cls")
    ids = tok(["le chat"], return_tensors="pt")["input_ids"].to(enc.device)
    with torch.no_grad():
        expected = model.embeddings(input_ids=ids)[0, 0].cpu()
    np.testing.assert_allclose(enc.encode(["le chat"], layers=0)[0, 0], expected.numpy(), atol=1e-6)


# -- HFEncoder: padding, order, hooks -------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_padding_does_not_leak(encoder, pooling):
    batch = encoder.encode(TEXTS, pooling=pooling)
    for i, text in enumerate(TEXTS):
        alone = encoder.encode([text], pooling=pooling)
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5, rtol=0)


def test_pooling_reads_real_tokens_only(encoder):
    ids = encoder.tokenizer(["le chat"])["input_ids"][0]
    X = encoder.encode(["le chat"], pooling="tokens")
    states = X.states[0]
    assert states.shape[0] == len(ids)
    np.testing.assert_allclose(
        encoder.encode(["le chat"], pooling="mean")[0], states.mean(0), atol=1e-5
    )
    np.testing.assert_allclose(encoder.encode(["le chat"], pooling="cls")[0], states[0], atol=1e-6)
    np.testing.assert_allclose(
        encoder.encode(["le chat"], pooling="last")[0], states[-1], atol=1e-6
    )


@pytest.mark.parametrize("side", ["left", "right"])
def test_pool_left_and_right_padding(side):
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(3, 5, 4, generator=gen)
    lengths = [5, 2, 3]
    mask = torch.zeros(3, 5, dtype=torch.long)
    real = []
    for row, n in enumerate(lengths):
        span = slice(5 - n, 5) if side == "left" else slice(0, n)
        mask[row, span] = 1
        real.append(states[row, span])
    torch.testing.assert_close(_pool(states, mask, "mean"), torch.stack([r.mean(0) for r in real]))
    torch.testing.assert_close(_pool(states, mask, "cls"), torch.stack([r[0] for r in real]))
    torch.testing.assert_close(_pool(states, mask, "last"), torch.stack([r[-1] for r in real]))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    picks=st.lists(st.integers(0, len(TEXTS) - 1), min_size=1, max_size=12),
    batch_size=st.integers(1, 8),
)
def test_order_restored_for_any_batch_size(bert, picks, batch_size):
    model, tok = bert
    texts = [TEXTS[i] for i in picks]
    reference = HFEncoder(model, tok, batch_size=1).encode(texts)
    got = HFEncoder(model, tok, batch_size=batch_size).encode(texts)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_hook_path_matches_hidden_states(encoder, pooling):
    expected = encoder.encode(TEXTS, pooling=pooling)
    before = _hooks(encoder.model)
    encoder.pool_in_hooks = False  # the fallback: states first, pooled afterwards...
    encoder._use_hooks = True  # ...collected with forward hooks instead of hidden_states
    got = encoder.encode(TEXTS, pooling=pooling)
    assert _hooks(encoder.model) == before
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)  # GPT-2: final ln_f included
    subset = encoder.encode(TEXTS, pooling=pooling, layers=[3, 1])
    np.testing.assert_allclose(subset, expected[:, [3, 1]], atol=1e-6, rtol=0)


# -- HFEncoder: pooling inside the forward pass (pool_in_hooks=True, the default) -----------------
def _spy_forward(monkeypatch, encoder):
    """Record the output_hidden_states argument of every call of the encoder's core model."""
    calls = []
    forward = encoder._core.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("output_hidden_states"))
        return forward(*args, **kwargs)

    monkeypatch.setattr(encoder._core, "forward", spy)
    return calls


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
def test_pooling_in_hooks_equals_hidden_states_path(model_and_tokenizer, pooling):
    model, tok = model_and_tokenizer
    inside = HFEncoder(model, tok, batch_size=3, show_progress_bar=False)
    outside = HFEncoder(model, tok, batch_size=3, show_progress_bar=False, pool_in_hooks=False)
    assert inside.pool_in_hooks and not outside.pool_in_hooks
    expected = outside.encode(TEXTS, pooling=pooling)  # installs transformers' capture hooks
    before = _hooks(model)
    got = inside.encode(TEXTS, pooling=pooling)
    assert _hooks(model) == before
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    for layers in ([3, 1], [0], -1, [2, 2, 0]):  # subsets, one layer, repeats
        expected_sub = outside.encode(TEXTS, pooling=pooling, layers=layers)
        got_sub = inside.encode(TEXTS, pooling=pooling, layers=layers)
        np.testing.assert_allclose(got_sub, expected_sub, atol=1e-6, rtol=0)
    assert _hooks(model) == before


def test_pooling_in_hooks_runs_without_hidden_states(encoder, monkeypatch):
    calls = _spy_forward(monkeypatch, encoder)
    encoder.encode(TEXTS)
    assert calls and set(calls) == {False}  # one forward per batch, no hidden_states kept
    calls.clear()
    encoder.encode(TEXTS[:2], pooling="tokens")  # per-token states: the hidden_states path
    assert set(calls) == {True}
    calls.clear()
    encoder.pool_in_hooks = False
    encoder.encode(TEXTS[:2])
    assert set(calls) == {True}


def test_pooling_in_hooks_frees_each_layer(model_and_tokenizer):
    """When block i runs, the output of block i - 2 is gone: one layer's states are alive."""
    model, tok = model_and_tokenizer
    layers = find_layer_modules(model, N_LAYERS)

    def alive_while_running(pool_in_hooks):
        refs, alive = {}, []

        def watch(i):
            def hook(module, args, output):
                if i >= 2:
                    alive.append(refs[i - 2]() is not None)
                refs[i] = weakref.ref(first_tensor(output))

            return hook

        handles = [layer.register_forward_hook(watch(i)) for i, layer in enumerate(layers)]
        try:
            enc = HFEncoder(model, tok, batch_size=8, pool_in_hooks=pool_in_hooks)
            enc.encode(TEXTS)
        finally:
            for handle in handles:
                handle.remove()
        return alive

    assert alive_while_running(True) == [False] * (N_LAYERS - 2)
    assert alive_while_running(False) == [True] * (N_LAYERS - 2)  # the test can see states


def test_pooling_in_hooks_pools_only_wanted_layers(bert, monkeypatch):
    model, tok = bert
    enc = HFEncoder(model, tok, batch_size=8)
    pooled = []
    pool = hf._LayerPooler._pool

    def spy(self, index, states):
        pooled.append(index)
        return pool(self, index, states)

    monkeypatch.setattr(hf._LayerPooler, "_pool", spy)
    enc.encode(TEXTS, layers=[2])
    assert pooled == [2]
    pooled.clear()
    enc.encode(TEXTS, layers=[-1, 0])
    assert sorted(pooled) == [0, N_LAYERS]
    pooled.clear()
    enc.encode(TEXTS)
    assert sorted(pooled) == list(range(N_LAYERS + 1))


class _BlockTwice(torch.nn.Module):
    """A model that runs one of its blocks a second time after the forward pass."""

    def __init__(self, inner, block=1):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.block = block

    def forward(self, output_hidden_states=None, **kwargs):
        out = self.inner(**kwargs)
        self.inner.encoder.layer[self.block](out.last_hidden_state)
        return out


def test_pooling_in_hooks_checks_n_layers_plus_one_states(bert):
    model, tok = bert
    before = _hooks(model)
    enc = HFEncoder(_BlockTwice(model), tok)
    with pytest.raises(RuntimeError, match=r"n_layers \+ 1 = 4.*2 \(2x\).*pool_in_hooks=False"):
        enc.encode(TEXTS)
    assert _hooks(model) == before  # hooks removed after the error
    # The fallback reads the states the model reports (here: collected by hooks, last wins).
    HFEncoder(_BlockTwice(model), tok, pool_in_hooks=False).encode(TEXTS)


def test_pooling_in_hooks_removed_after_an_error(encoder):
    expected = encoder.encode(TEXTS[:2])
    before = _hooks(encoder.model)

    def boom(module, args, output):
        raise ValueError("boom in block 2")

    handle = encoder._layers[1].register_forward_hook(boom)
    try:
        with pytest.raises(ValueError, match="boom"):
            encoder.encode(TEXTS)
    finally:
        handle.remove()
    assert _hooks(encoder.model) == before
    np.testing.assert_allclose(encoder.encode(TEXTS[:2]), expected, atol=1e-6)


def test_pooling_in_hooks_under_autocast_equals_hidden_states_path(bert, monkeypatch):
    model, tok = bert
    monkeypatch.setattr(hf, "_cpu_bf16", lambda: True)
    inside = HFEncoder(model, tok, dtype="bfloat16").encode(TEXTS)
    outside = HFEncoder(model, tok, dtype="bfloat16", pool_in_hooks=False).encode(TEXTS)
    np.testing.assert_allclose(inside, outside, atol=1e-6, rtol=0)  # pooled in float32 both


class _NoHiddenStates(torch.nn.Module):
    """A model that ignores output_hidden_states and returns only the last layer."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, output_hidden_states=None, **kwargs):
        return BaseModelOutput(last_hidden_state=self.inner(**kwargs).last_hidden_state)


def test_models_without_hidden_states_fall_back_to_hooks(bert):
    model, tok = bert
    expected = HFEncoder(model, tok).encode(TEXTS)
    before = _hooks(model)
    enc = HFEncoder(_NoHiddenStates(model), tok)
    np.testing.assert_allclose(enc.encode(TEXTS), expected, atol=1e-6, rtol=0)  # pooled in hooks
    assert not enc._use_hooks  # never needed hidden_states
    enc.pool_in_hooks = False  # states first: none returned, so collected with hooks
    np.testing.assert_allclose(enc.encode(TEXTS), expected, atol=1e-6, rtol=0)
    assert enc._use_hooks and _hooks(model) == before


class _PlainForward(torch.nn.Module):
    """A model whose forward takes no output_hidden_states argument and returns a tensor."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_models_without_output_hidden_states_argument_use_hooks(bert):
    model, tok = bert
    expected = HFEncoder(model, tok).encode(TEXTS)
    enc = HFEncoder(_PlainForward(model), tok)
    assert enc._use_hooks
    np.testing.assert_allclose(enc.encode(TEXTS), expected, atol=1e-6)
    enc.pool_in_hooks = False
    np.testing.assert_allclose(enc.encode(TEXTS), expected, atol=1e-6)


def test_tokens_pooling(encoder):
    texts = ["le chat", "the cat sat on the mat"]
    out = encoder.encode(texts, pooling="tokens", layers=[0, -1])
    assert isinstance(out, TokenStates) and len(out) == 2
    full = encoder.encode(texts, pooling="tokens")
    for i, text in enumerate(texts):
        ids = encoder.tokenizer([text])["input_ids"][0]
        assert out.states[i].shape == (len(ids), 2, HIDDEN) and out.states[i].dtype == np.float32
        assert out.tokens[i] == encoder.tokenizer.convert_ids_to_tokens(ids)
        np.testing.assert_allclose(out.states[i], full.states[i][:, [0, -1]], atol=1e-6)
        words = [text[a:b] for a, b in out.offsets[i] if a >= 0]
        assert words == text.split()
        special = [t for t, (a, _) in zip(out.tokens[i], out.offsets[i], strict=True) if a < 0]
        assert all(t in encoder.tokenizer.all_special_tokens for t in special)


def test_prefix_is_prepended(bert):
    model, tok = bert
    with_prefix = HFEncoder(model, tok, prefix="the ").encode(["cat sat", "red"])
    np.testing.assert_allclose(
        with_prefix, HFEncoder(model, tok).encode(["the cat sat", "the red"]), atol=1e-6
    )
    offsets = HFEncoder(model, tok, prefix="the ").encode(["cat sat"], pooling="tokens").offsets[0]
    assert offsets.tolist() == [[-1, -1], [-1, -1], [0, 3], [4, 7], [-1, -1]]


def test_bfloat16_autocast_returns_float32_close_to_fp32(bert, monkeypatch):
    model, tok = bert
    fp32 = HFEncoder(model, tok).encode(TEXTS)
    monkeypatch.setattr(hf, "_cpu_bf16", lambda: True)
    bf16 = HFEncoder(model, tok, dtype="bfloat16").encode(TEXTS)
    assert bf16.dtype == np.float32
    cos = (fp32 * bf16).sum(-1) / np.linalg.norm(fp32, axis=-1) / np.linalg.norm(bf16, axis=-1)
    assert cos.min() > 0.99
    assert not np.array_equal(fp32, bf16)  # autocast really ran in bfloat16


def _cosine(a, b):
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_bfloat16_weights_close_to_fp32_per_layer(name, monkeypatch):
    model, tok = BUILDERS[name]()
    monkeypatch.setattr(hf, "_cpu_bf16", lambda: True)
    fp32 = HFEncoder(model, tok).encode(TEXTS)  # moves the model to the device, in place
    params = {k: (v.dtype, v.data_ptr()) for k, v in model.state_dict().items()}
    enc = HFEncoder(model, tok, dtype="bfloat16", cast_weights=True)
    assert enc.model is not model and enc.cast_weights and enc._autocast_dtype is None
    assert {p.dtype for p in enc.model.parameters()} == {torch.bfloat16}
    # the caller's model is untouched: same tensors, still float32
    assert {k: (v.dtype, v.data_ptr()) for k, v in model.state_dict().items()} == params
    for pooling in ("mean", "last"):
        expected = (
            fp32 if pooling == "mean" else HFEncoder(model, tok).encode(TEXTS, pooling=pooling)
        )
        got = enc.encode(TEXTS, pooling=pooling)
        assert got.dtype == np.float32 and got.shape == expected.shape
        per_layer = _cosine(got, expected).min(0)  # worst text, per layer
        assert per_layer.min() >= 0.99, f"{name} {pooling}: cosine to fp32 per layer {per_layer}"
        assert not np.array_equal(got, expected)  # really ran in bfloat16
    np.testing.assert_allclose(HFEncoder(model, tok).encode(TEXTS), fp32, atol=1e-6)  # still fp32


def test_bfloat16_weights_tied_and_non_float_tensors(monkeypatch):
    model, tok = _gpt2()
    monkeypatch.setattr(hf, "_cpu_bf16", lambda: True)
    copy = hf._copy_in_dtype(model, torch.bfloat16)
    assert copy.wte.weight.dtype == torch.bfloat16 and model.wte.weight.dtype == torch.float32
    model, tok = _bert()
    model.embeddings.word_embeddings.weight = model.embeddings.position_embeddings.weight  # tie
    copy = hf._copy_in_dtype(model, torch.bfloat16)
    emb = copy.embeddings
    assert emb.word_embeddings.weight is emb.position_embeddings.weight  # still tied
    assert emb.position_ids.dtype == torch.long  # integer buffers keep their dtype


def test_bfloat16_weights_from_a_path_and_tokens(tmp_path, bert, monkeypatch):
    model, tok = bert
    monkeypatch.setattr(hf, "_cpu_bf16", lambda: True)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = HFEncoder(str(tmp_path), dtype="bfloat16", cast_weights=True)
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    out = enc.encode(TEXTS[:2], pooling="tokens")
    assert all(s.dtype == np.float32 for s in out.states)
    fp32 = HFEncoder(model, tok).encode(TEXTS[:2], pooling="tokens")
    for a, b in zip(out.states, fp32.states, strict=True):
        assert _cosine(a, b).min() >= 0.99
    with pytest.raises(ValueError, match="cast_weights=True needs dtype"):
        HFEncoder(model, tok, cast_weights=True)


def test_bfloat16_on_a_cpu_without_it_warns(bert, monkeypatch):
    model, tok = bert
    monkeypatch.setattr(hf, "_cpu_bf16", lambda: False)
    with pytest.warns(UserWarning, match="slower"):
        HFEncoder(model, tok, dtype="bfloat16", device="cpu")
    with pytest.warns(UserWarning, match="weights run emulated"):
        HFEncoder(model, tok, dtype="bfloat16", device="cpu", cast_weights=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        HFEncoder(model, tok, device="cpu")  # float32: no warning


def test_loads_from_a_local_path(tmp_path, bert):
    model, tok = bert
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    enc = HFEncoder(str(tmp_path))
    assert enc.model_id == str(tmp_path)
    np.testing.assert_allclose(enc.encode(TEXTS), HFEncoder(model, tok).encode(TEXTS), atol=1e-6)
    enc2 = HFEncoder(model, str(tmp_path))  # tokenizer as a path
    assert enc2.tokenizer.convert_ids_to_tokens([5]) == tok.convert_ids_to_tokens([5])


# -- HFEncoder: bad input -------------------------------------------------------------------------
def test_bad_texts(encoder):
    with pytest.raises(ValueError, match="empty"):
        encoder.encode([])
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        encoder.encode(["le chat", 3, "red"])
    with pytest.raises(TypeError, match=r"texts\[0\]"):
        encoder.encode([None])
    with pytest.raises(TypeError, match="wrap it"):
        encoder.encode("le chat")


def test_text_with_no_tokens_names_the_index():
    model, tok = _gpt2()
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        HFEncoder(model, tok).encode(["le chat", ""])


def test_unknown_pooling_lists_valid_ones(bert):
    model, tok = bert
    with pytest.raises(ValueError, match="mean, cls, last, tokens"):
        HFEncoder(model, tok, pooling="max")
    with pytest.raises(ValueError, match="mean, cls, last, tokens"):
        HFEncoder(model, tok).encode(TEXTS, pooling="max")


def test_truncation_warns_once_per_call(bert):
    model, tok = bert
    enc = HFEncoder(model, tok, max_length=4)
    long = ["the cat sat on the mat", "a small blue house", "red"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        X = enc.encode(long)
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("2 of 3 texts")
    cut = HFEncoder(model, tok).encode(["the cat", "a small", "red"])  # [CLS] w w [SEP]
    np.testing.assert_allclose(X, cut, atol=1e-5)


def test_texts_beyond_the_models_positions_are_truncated(model_and_tokenizer):
    """The tiny models take 64 positions (XLM-R: 66 less its offset of 2) while their
    tokenizers declare no limit: a 300-word text must be truncated, not crash."""
    from posthoc_align.encoders.hf import model_position_limit

    model, tok = model_and_tokenizer
    assert model_position_limit(model) == 64
    enc = HFEncoder(model, tok, batch_size=2, show_progress_bar=False)
    long = " ".join(["cat"] * 300)
    with pytest.warns(UserWarning, match="1 of 2 texts.*max_length=64"):
        X = enc.encode([long, "red"])
    assert np.isfinite(X).all()
    np.testing.assert_allclose(X[1], enc.encode(["red"])[0], atol=1e-5)


def test_bad_constructor_arguments(bert):
    model, tok = bert
    with pytest.raises(ValueError, match="tokenizer is required"):
        HFEncoder(model)
    with pytest.raises(ValueError, match="dtype"):
        HFEncoder(model, tok, dtype="int8")
    with pytest.raises(ValueError, match="batch_size"):
        HFEncoder(model, tok, batch_size=0)
    with pytest.raises(TypeError, match="model must be"):
        HFEncoder(42, tok)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(bert):
    model, tok = bert
    with pytest.raises(ValueError, match="CUDA"):
        HFEncoder(model, tok, device="cuda")


def test_progress_bar_switch(bert, capsys):
    model, tok = bert
    HFEncoder(model, tok, show_progress_bar=False).encode(TEXTS)
    assert "batch" not in capsys.readouterr().err
    HFEncoder(model, tok, show_progress_bar=True).encode(TEXTS)
    assert "batch" in capsys.readouterr().err
    HFEncoder(model, tok).encode(TEXTS)  # None: off unless the logger is at INFO
    assert "batch" not in capsys.readouterr().err


# -- hook helpers ---------------------------------------------------------------------------------
def test_block_output_containers():
    t, u = torch.zeros(2), torch.ones(2)
    assert first_tensor(t) is t and replace_first_tensor(t, u) is u
    assert first_tensor((t, None)) is t and replace_first_tensor((t, None), u)[0] is u
    out = BaseModelOutput(last_hidden_state=t)
    assert first_tensor(out) is t and replace_first_tensor(out, u).last_hidden_state is u
    with pytest.raises(TypeError):
        first_tensor("nothing")


def test_find_layer_modules(model_and_tokenizer):
    model, _ = model_and_tokenizer
    layers = find_layer_modules(model, N_LAYERS)
    assert len(layers) == N_LAYERS
    with pytest.raises(ValueError, match="transformer blocks"):
        find_layer_modules(torch.nn.Linear(2, 2), 3)


# -- AlignedEncoder -------------------------------------------------------------------------------
LANGS = ["en", "fr", "de", "en", "en", "fr", "de"]


class _Shift:
    """A fitted affine transform with no ``languages`` parameter; remembers its input types."""

    def __init__(self, shift):
        self.shift, self.seen = shift, []

    def transform(self, X):
        self.seen.append(type(X))
        return X + (
            torch.as_tensor(self.shift, device=X.device)
            if isinstance(X, torch.Tensor)
            else self.shift
        )


class _ByLanguage:
    """Adds a per-language offset: checks that each row (token) gets its text's label."""

    def __init__(self, offsets):
        self.offsets = offsets

    def transform(self, X, languages=None):
        shift = np.stack([self.offsets[lang] for lang in languages]).astype(np.float32)
        if isinstance(X, torch.Tensor):
            return X + torch.from_numpy(shift).to(X.device)
        return X + shift


@pytest.fixture
def offsets():
    rng = np.random.default_rng(0)
    return {lang: rng.normal(size=HIDDEN).astype(np.float32) for lang in ("en", "fr", "de")}


def test_aligned_pooled_transform_changes_only_its_layer(encoder, offsets):
    base = encoder.encode(TEXTS)
    aligned = AlignedEncoder(encoder, {2: _ByLanguage(offsets)}).encode(TEXTS, languages=LANGS)
    expected = base.copy()
    expected[:, 2] += np.stack([offsets[lang] for lang in LANGS])
    np.testing.assert_allclose(aligned, expected, atol=1e-6)


@pytest.mark.parametrize("layer", [0, 2])
def test_aligned_propagate_rewrites_states_inside_the_model(encoder, offsets, layer):
    base = encoder.encode(TEXTS)
    before = _hooks(encoder.model)
    aligned = AlignedEncoder(encoder, {layer: _ByLanguage(offsets)}, propagate=True)
    got = aligned.encode(TEXTS, languages=LANGS)
    assert _hooks(encoder.model) == before
    np.testing.assert_allclose(got[:, :layer], base[:, :layer], atol=1e-5)  # earlier: unchanged
    shift = np.stack([offsets[lang] for lang in LANGS])
    # every real token moved by its text's offset, so its mean moved by the same offset
    np.testing.assert_allclose(got[:, layer], base[:, layer] + shift, atol=1e-4)
    assert np.abs(got[:, layer + 1 :] - base[:, layer + 1 :]).max() > 1e-2  # later: recomputed


def test_aligned_propagate_gives_padding_free_token_states(encoder, offsets):
    aligned = AlignedEncoder(encoder, {1: _ByLanguage(offsets)}, propagate=True)
    batch = aligned.encode(TEXTS, languages=LANGS, pooling="mean")
    for i in (0, 3):
        alone = aligned.encode([TEXTS[i]], languages=[LANGS[i]], pooling="mean")
        np.testing.assert_allclose(batch[i], alone[0], atol=1e-5)


def test_aligned_propagate_at_last_layer_equals_pooled(encoder):
    pooled = AlignedEncoder(encoder, {-1: _Shift(1.0)}).encode(TEXTS)
    inside = AlignedEncoder(encoder, {N_LAYERS: _Shift(1.0)}, propagate=True).encode(TEXTS)
    np.testing.assert_allclose(inside, pooled, atol=1e-6)


def test_aligned_transforms_get_torch_inside_and_numpy_outside(bert):
    model, tok = bert
    enc = HFEncoder(model, tok)
    inside, outside = _Shift(0.5), _Shift(0.5)
    AlignedEncoder(enc, {1: inside}, propagate=True).encode(TEXTS)
    AlignedEncoder(enc, {1: outside}).encode(TEXTS)
    assert set(inside.seen) == {torch.Tensor} and set(outside.seen) == {np.ndarray}


def test_aligned_with_posthoc_align_estimator(bert):
    centering = pytest.importorskip("posthoc_align.centering")
    model, tok = bert
    enc = HFEncoder(model, tok)
    base = enc.encode(TEXTS)
    est = centering.LanguageMeanCentering().fit(base[:, 2], languages=LANGS)
    got = AlignedEncoder(enc, {2: est}, propagate=True).encode(TEXTS, languages=LANGS)
    np.testing.assert_allclose(got[:, 2], est.transform(base[:, 2], languages=LANGS), atol=1e-4)
    means = {lang: got[np.array(LANGS) == lang, 2].mean(0) for lang in set(LANGS)}
    assert max(np.abs(m).max() for m in means.values()) < 1e-4  # centred per language


def test_aligned_sklearn_transformer_without_languages(bert):
    model, tok = bert
    enc = HFEncoder(model, tok)
    base = enc.encode(TEXTS)
    scaler = StandardScaler().fit(base[:, 1])
    got = AlignedEncoder(enc, {1: scaler}).encode(TEXTS, languages=LANGS)
    np.testing.assert_allclose(got[:, 1], scaler.transform(base[:, 1]), atol=1e-5)


def test_aligned_tokens_pooling(encoder, offsets):
    base = encoder.encode(TEXTS[:2], pooling="tokens")
    for propagate in (False, True):
        out = AlignedEncoder(encoder, {2: _ByLanguage(offsets)}, propagate=propagate).encode(
            TEXTS[:2], languages=LANGS[:2], pooling="tokens"
        )
        for i in range(2):
            np.testing.assert_allclose(
                out.states[i][:, 2], base.states[i][:, 2] + offsets[LANGS[i]], atol=1e-4
            )


def test_aligned_hooks_removed_after_an_error(encoder):
    class Boom:
        def transform(self, X):
            raise RuntimeError("boom")

    expected = encoder.encode(TEXTS[:2])
    before = _hooks(encoder.model)
    aligned = AlignedEncoder(encoder, {2: Boom(), 1: _Shift(1.0)}, propagate=True)
    with pytest.raises(RuntimeError, match="boom"):
        aligned.encode(TEXTS)
    assert _hooks(encoder.model) == before
    np.testing.assert_array_equal(encoder.encode(TEXTS[:2]), expected)


def test_aligned_bad_arguments(bert):
    model, tok = bert
    enc = HFEncoder(model, tok)
    with pytest.raises(ValueError, match="out of range"):
        AlignedEncoder(enc, {N_LAYERS + 1: _Shift(1.0)})
    with pytest.raises(ValueError, match="twice"):
        AlignedEncoder(enc, {-1: _Shift(1.0), N_LAYERS: _Shift(1.0)})
    with pytest.raises(NotFittedError, match="layer 2"):
        AlignedEncoder(enc, {2: StandardScaler()})
    with pytest.raises(TypeError, match="transform"):
        AlignedEncoder(enc, {2: object()})
    with pytest.raises(ValueError, match="non-empty"):
        AlignedEncoder(enc, {})
    aligned = AlignedEncoder(enc, {2: _Shift(1.0)})
    with pytest.raises(ValueError, match="per row"):
        aligned.encode(TEXTS, languages=["en"])

    class Shrink:
        def transform(self, X):
            return X[:, :3]

    with pytest.raises(ValueError, match="keep the shape"):
        AlignedEncoder(enc, {1: Shrink()}).encode(TEXTS)


def test_aligned_save_and_load(tmp_path, bert):
    pytest.importorskip("posthoc_align.persistence")
    centering = pytest.importorskip("posthoc_align.centering")
    model, tok = bert
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    enc = HFEncoder(str(tmp_path / "model"), batch_size=2, prefix="the ")
    base = enc.encode(TEXTS)
    transforms = {
        1: centering.LanguageMeanCentering().fit(base[:, 1], languages=LANGS),
        -1: centering.LanguageMeanCentering().fit(base[:, -1], languages=LANGS),
    }
    aligned = AlignedEncoder(enc, transforms, propagate=True)
    aligned.save_pretrained(tmp_path / "aligned")
    assert {p.name for p in (tmp_path / "aligned").iterdir()} >= {"layer_1", f"layer_{N_LAYERS}"}
    again = AlignedEncoder.from_pretrained(tmp_path / "aligned")
    assert again.propagate and again.layers_ == [1, N_LAYERS]
    assert again.encoder.prefix == "the " and again.encoder.batch_size == 2
    np.testing.assert_allclose(
        again.encode(TEXTS, languages=LANGS), aligned.encode(TEXTS, languages=LANGS), atol=1e-6
    )


def test_aligned_save_in_memory_model_needs_encoder(tmp_path, bert):
    pytest.importorskip("posthoc_align.persistence")
    centering = pytest.importorskip("posthoc_align.centering")
    model, tok = bert
    enc = HFEncoder(model, tok)
    est = centering.LanguageMeanCentering().fit(enc.encode(TEXTS, layers=2)[:, 0], languages=LANGS)
    enc.model_id = "<in-memory BertModel>"
    with pytest.warns(UserWarning, match="in-memory"):
        AlignedEncoder(enc, {2: est}).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder="):
        AlignedEncoder.from_pretrained(tmp_path)
    again = AlignedEncoder.from_pretrained(tmp_path, encoder=enc)
    np.testing.assert_allclose(
        again.encode(TEXTS, languages=LANGS)[:, 2],
        est.transform(enc.encode(TEXTS)[:, 2], languages=LANGS),
        atol=1e-5,
    )


def test_aligned_save_requires_savable_transforms(tmp_path, bert):
    model, tok = bert
    with pytest.raises(TypeError, match="save"):
        AlignedEncoder(HFEncoder(model, tok), {1: _Shift(1.0)}).save_pretrained(tmp_path)


# -- TextEncoder ----------------------------------------------------------------------------------
def test_text_encoder_transform_and_attributes(bert):
    model, tok = bert
    enc = HFEncoder(model, tok)
    te = TextEncoder(enc, layer=2, pooling="cls")
    assert te.get_params() == {"encoder": enc, "layer": 2, "pooling": "cls"}
    X = te.transform(TEXTS)  # no fit needed: nothing to learn
    np.testing.assert_allclose(X, enc.encode(TEXTS, pooling="cls")[:, 2], atol=1e-6)
    assert te.fit(TEXTS) is te and te.layer_ == 2 and te.n_features_out_ == HIDDEN
    assert TextEncoder(enc).fit(TEXTS).layer_ == N_LAYERS
    assert te.get_feature_names_out().shape == (HIDDEN,)
    column = np.array(TEXTS, dtype=object)[:, None]  # what a ColumnTransformer passes
    np.testing.assert_allclose(te.transform(column), X, atol=1e-6)


def test_text_encoder_clone_shares_the_encoder(bert):
    model, tok = bert
    enc = HFEncoder(model, tok)
    te = TextEncoder(enc, layer=1)
    twin = clone(te)
    assert twin is not te and twin.encoder is enc and twin.layer == 1
    aligned = AlignedEncoder(enc, {1: _Shift(1.0)})
    assert clone(TextEncoder(aligned)).encoder is aligned


def test_text_encoder_in_a_pipeline_on_raw_strings(bert):
    model, tok = bert
    texts = TEXTS * 4
    y = np.array([0, 1, 1, 0, 0, 1, 1] * 4)
    pipe = Pipeline(
        [
            ("enc", TextEncoder(HFEncoder(model, tok), layer=-1)),
            ("align", StandardScaler()),
            ("clf", LogisticRegression(max_iter=1000)),
        ]
    )
    pred = pipe.fit(texts, y).predict(texts)
    assert pred.shape == (len(texts),) and (pred == y).mean() > 0.8
    assert clone(pipe).steps[0][1].encoder is pipe.steps[0][1].encoder


def test_text_encoder_pipeline_with_routed_languages(bert, offsets):
    """The issue's Pipeline: TextEncoder -> LanguageMeanCentering -> classifier, with
    languages routed (to the centring, and to an AlignedEncoder through fit_transform)."""
    import sklearn

    from posthoc_align import LanguageMeanCentering

    model, tok = bert
    enc = HFEncoder(model, tok)
    texts, langs = TEXTS * 4, LANGS * 4
    y = np.array([0, 1, 1, 0, 0, 1, 1] * 4)
    with sklearn.config_context(enable_metadata_routing=True):
        for encoder in (enc, AlignedEncoder(enc, {2: _ByLanguage(offsets)})):
            pipe = Pipeline(
                [
                    ("enc", TextEncoder(encoder, layer=2)),
                    ("align", LanguageMeanCentering()),
                    ("clf", LogisticRegression(max_iter=1000)),
                ]
            )
            pipe.fit(texts, y, languages=langs)
            X = pipe[:-1].transform(texts, languages=langs)
            ref = LanguageMeanCentering().fit_transform(
                TextEncoder(encoder, layer=2).transform(texts, languages=langs), languages=langs
            )
            np.testing.assert_allclose(X, ref, atol=1e-5)
            assert pipe.predict(texts, languages=langs).shape == (len(texts),)
    te = TextEncoder(AlignedEncoder(enc, {2: _ByLanguage(offsets)}), layer=2)
    np.testing.assert_allclose(
        te.fit_transform(TEXTS, languages=LANGS), te.transform(TEXTS, languages=LANGS)
    )


def test_text_encoder_with_aligned_encoder_passes_languages(bert, offsets):
    model, tok = bert
    enc = HFEncoder(model, tok)
    te = TextEncoder(AlignedEncoder(enc, {2: _ByLanguage(offsets)}), layer=2)
    X = te.transform(TEXTS, languages=LANGS)
    np.testing.assert_allclose(
        X, enc.encode(TEXTS)[:, 2] + np.stack([offsets[lang] for lang in LANGS]), atol=1e-5
    )


def test_text_encoder_bad_parameters(bert):
    model, tok = bert
    enc = HFEncoder(model, tok)
    with pytest.raises(ValueError, match="one vector per text"):
        TextEncoder(enc, pooling="tokens").fit(TEXTS)
    with pytest.raises(TypeError, match="layer must be an int"):
        TextEncoder(enc, layer="last").transform(TEXTS)
    with pytest.raises(TypeError, match="HFEncoder"):
        TextEncoder("bert-base").fit(TEXTS)
    with pytest.raises(ValueError, match="out of range"):
        TextEncoder(enc, layer=9).fit(TEXTS)


# -- EmbeddingCache with AlignedEncoder / in-memory models -------------------------------------
def test_cache_of_an_aligned_encoder_gets_languages_and_records_its_identity(
    bert, offsets, tmp_path
):
    import copy

    from posthoc_align.cache import EmbeddingCache

    model, tok = bert
    enc = HFEncoder(model, tok, show_progress_bar=False)
    aligned = AlignedEncoder(enc, {2: _ByLanguage(offsets)})
    cache = EmbeddingCache.build(tmp_path / "a", aligned, TEXTS, languages=LANGS, chunk_rows=3)
    np.testing.assert_allclose(cache.to_numpy(), aligned.encode(TEXTS, languages=LANGS), atol=1e-6)
    assert cache.attrs["model"].startswith("aligned[<in-memory BertModel> weights ")
    EmbeddingCache.build(tmp_path / "a", aligned, TEXTS[:2], languages=LANGS[:2], append=True)
    other = {lang: v + 1.0 for lang, v in offsets.items()}
    for wrong in (enc, AlignedEncoder(enc, {2: _ByLanguage(other)})):
        with pytest.raises(ValueError, match="different encoder setup"):
            EmbeddingCache.build(tmp_path / "a", wrong, TEXTS[:2], languages=LANGS[:2], append=True)
    # two in-memory models are told apart by their weights
    EmbeddingCache.build(tmp_path / "b", enc, TEXTS, chunk_rows=4)
    model2 = copy.deepcopy(model)
    with torch.no_grad():
        next(model2.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="different encoder setup"):
        EmbeddingCache.build(tmp_path / "b", HFEncoder(model2, tok), TEXTS[:2], append=True)
    EmbeddingCache.build(
        tmp_path / "b", HFEncoder(copy.deepcopy(model), tok), TEXTS[:2], append=True
    )


def test_cache_records_the_compute_precision_and_refuses_to_mix_it(bert, tmp_path, monkeypatch):
    # bfloat16 rows (autocast or cast weights) appended to a float32 cache went unnoticed
    from posthoc_align.cache import EmbeddingCache
    from posthoc_align.encoders._identity import encoder_precision

    model, tok = bert
    monkeypatch.setattr(hf, "_cpu_bf16", lambda: True)
    fp32 = HFEncoder(model, tok, show_progress_bar=False)
    autocast = HFEncoder(model, tok, dtype="bfloat16", show_progress_bar=False)
    cast = HFEncoder(model, tok, dtype="bfloat16", cast_weights=True, show_progress_bar=False)
    fp16 = HFEncoder(model, tok, dtype=torch.float16, show_progress_bar=False)
    assert (fp32.compute_dtype, autocast.compute_dtype, cast.compute_dtype) == (
        "float32",
        "bfloat16",
        "bfloat16",
    )
    assert fp16.compute_dtype == "float16"
    assert encoder_precision(fp32) == ("float32", False)
    assert encoder_precision(autocast) == ("bfloat16", False)
    assert encoder_precision(cast) == ("bfloat16", True)
    aligned = AlignedEncoder(autocast, {1: _Shift(1.0)})
    assert encoder_precision(aligned) == ("bfloat16", False)  # the base encoder's

    path = tmp_path / "c.zarr"
    cache = EmbeddingCache.build(path, fp32, TEXTS[:3], chunk_rows=2)
    assert cache.attrs["compute_dtype"] == "float32" and cache.attrs["cast_weights"] is False
    for other in (autocast, cast):
        with pytest.raises(ValueError, match="compute_dtype: cache has 'float32', now 'bfloat16'"):
            EmbeddingCache.build(path, other, TEXTS[3:], append=True)
    assert EmbeddingCache(path).n_rows == 3
    bf = EmbeddingCache.build(tmp_path / "bf.zarr", autocast, TEXTS[:3])
    assert bf.attrs["compute_dtype"] == "bfloat16" and bf.attrs["cast_weights"] is False
    with pytest.raises(ValueError, match="cast_weights: cache has False, now True"):
        EmbeddingCache.build(tmp_path / "bf.zarr", cast, TEXTS[3:], append=True)
    assert EmbeddingCache.build(tmp_path / "bf.zarr", autocast, TEXTS[3:], append=True).n_rows == 7
    assert EmbeddingCache.build(path, fp32, TEXTS[3:], append=True).n_rows == 7
