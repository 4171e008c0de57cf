"""What an encoder *is*, as a string a cache can record and compare.

``EmbeddingCache`` refuses to append to (or resume) a cache with a different encoder.
A hub name or local path names a model; an in-memory model has no name, so its
weights are fingerprinted; an :class:`AlignedEncoder` is its base encoder plus a
fingerprint of its fitted transforms (their parameters and learned arrays). The precision
the forward pass runs in (float32, or bfloat16/float16 under autocast or with cast weights)
changes the embeddings too, so it is recorded beside the identity (:func:`encoder_precision`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

__all__ = ["encoder_identity", "encoder_precision"]

#: values sampled from each weight tensor for the fingerprint of an in-memory model
_SAMPLES = 1024


def _update(h: Any, obj: Any, depth: int = 0) -> None:
    """Feed ``obj`` into the hash ``h`` (arrays by value, estimators by state)."""
    if depth > 8:  # a cycle or a deep object graph: its type is all we take
        h.update(f"deep:{type(obj).__qualname__}".encode())
        return
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"nd{a.dtype.str}{a.shape}".encode())
        if a.dtype.kind == "O":
            h.update(repr(a.tolist()).encode())
        else:
            h.update(a.tobytes())
    elif isinstance(obj, BaseEstimator):
        h.update(f"est:{type(obj).__module__}.{type(obj).__qualname__}".encode())
        for k, v in sorted(obj.get_params(deep=False).items()):
            h.update(k.encode())
            _update(h, v, depth + 1)
        learned = sorted(k for k in vars(obj) if k.endswith("_") and not k.startswith("_"))
        for k in learned:
            h.update(k.encode())
            _update(h, getattr(obj, k), depth + 1)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            _update(h, k, depth + 1)
            _update(h, obj[k], depth + 1)
    elif isinstance(obj, list | tuple):
        h.update(f"seq{len(obj)}".encode())
        for v in obj:
            _update(h, v, depth + 1)
    elif obj is None or isinstance(obj, bool | int | float | str | bytes | np.generic):
        h.update(f"{type(obj).__name__}:{obj!r}".encode())
    elif hasattr(obj, "__dict__"):  # any other transform object: its type and its state
        h.update(f"obj:{type(obj).__module__}.{type(obj).__qualname__}".encode())
        _update(h, vars(obj), depth + 1)
    else:  # no state to read (e.g. a function): its name, never its address
        name = getattr(obj, "__qualname__", type(obj).__qualname__)
        h.update(f"other:{getattr(obj, '__module__', '')}.{name}".encode())


def transforms_fingerprint(transforms: dict[int, Any]) -> str:
    """sha256 (16 hex digits) of fitted transforms: class, parameters, learned arrays."""
    h = hashlib.sha256()
    _update(h, dict(transforms))
    return h.hexdigest()[:16]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) of a model's config and a strided sample of every weight."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        h.update(config.to_json_string(use_diff=False).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES)
        sample = flat[::step][:_SAMPLES].to("cpu", torch.float32).numpy()
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def encoder_identity(encoder: Any) -> str:
    """A string naming the encoder's model and (for an AlignedEncoder) its transforms."""
    from .aligned import AlignedEncoder

    if isinstance(encoder, AlignedEncoder):
        return (
            f"aligned[{encoder_identity(encoder.encoder)}; transforms "
            f"{transforms_fingerprint(encoder._by_layer)}; propagate={encoder.propagate}]"
        )
    model_id = getattr(encoder, "model_id", None)
    if model_id is None:
        return f"{type(encoder).__module__}.{type(encoder).__qualname__}"
    model_id = str(model_id)
    model = getattr(encoder, "model", None)
    if model_id.startswith("<in-memory") and isinstance(model, torch.nn.Module):
        return f"{model_id} weights {weights_fingerprint(model)}"
    return model_id


def encoder_precision(encoder: Any) -> tuple[str | None, bool | None]:
    """``(compute_dtype, cast_weights)`` of an encoder; ``(None, None)`` when it does not say.

    An :class:`~posthoc_align.encoders.HFEncoder` (or an AlignedEncoder over one) reports
    ``("float32", False)``, ``("bfloat16", False)`` under bfloat16 autocast, or
    ``("bfloat16", True)`` with its weights cast to bfloat16.
    """
    dtype = getattr(encoder, "compute_dtype", None)
    if dtype is None:
        return None, None
    dtype = str(dtype).removeprefix("torch.")
    return dtype, bool(getattr(encoder, "cast_weights", False)) and dtype != "float32"
