"""Encoders: pooled hidden states of every layer of a transformers model, aligned at inference."""

from .aligned import AlignedEncoder
from .hf import POOLINGS, HFEncoder, TokenStates
from .offline import load_offline_encoder
from .text import TextEncoder

__all__ = [
    "POOLINGS",
    "AlignedEncoder",
    "HFEncoder",
    "TextEncoder",
    "TokenStates",
    "load_offline_encoder",
]
