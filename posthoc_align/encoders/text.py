"""TextEncoder: a scikit-learn transformer from raw strings to one layer's pooled states."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from .aligned import AlignedEncoder
from .hf import HFEncoder, _check_texts


class TextEncoder(TransformerMixin, BaseEstimator):
    """Turn texts into the pooled states of one layer, so a Pipeline can start from raw strings.

    Parameters
    ----------
    encoder : HFEncoder or AlignedEncoder
        Kept as given; ``sklearn.clone`` shares it rather than copying the model.
    layer : int, default=-1
        Hidden state to return (``0`` embedding output, negative from the end).
    pooling : {"mean", "cls", "last"}, default="mean"

    Attributes
    ----------
    layer_ : int
        ``layer`` as a non-negative index (set by ``fit``).
    n_features_out_ : int
        Width of the output, the encoder's hidden size (set by ``fit``).

    Notes
    -----
    ``fit`` learns nothing: it only records ``layer_`` and ``n_features_out_``, and ``transform``
    works without it. Texts have no ``n_features_in_``, as in scikit-learn's text vectorizers.
    With an :class:`AlignedEncoder`, ``transform(X, languages=...)`` passes the labels on
    (``fit_transform`` too); ``languages`` is requested for ``fit`` and ``transform`` by
    default, so it is routed through a Pipeline once
    ``sklearn.set_config(enable_metadata_routing=True)`` is on.

    Examples
    --------
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.pipeline import make_pipeline
    >>> clf = make_pipeline(TextEncoder(load_offline_encoder()), LogisticRegression())  # doctest: +SKIP
    >>> clf.fit(["good film", "awful film"], [1, 0]).predict(["très bon film"])  # doctest: +SKIP
    array([1])
    """

    # ``languages`` is requested by default (like the aligners), so a Pipeline with
    # metadata routing on can pass it through: an AlignedEncoder uses it, an
    # HFEncoder ignores it
    __metadata_request__fit = {"languages": True}
    __metadata_request__transform = {"languages": True}

    def __init__(self, encoder: Any, layer: int = -1, pooling: str = "mean") -> None:
        self.encoder = encoder
        self.layer = layer
        self.pooling = pooling

    def fit(self, X: Sequence[str], y: Any = None, languages: Any = None) -> TextEncoder:
        """Check the parameters and record ``layer_`` and ``n_features_out_``; learns nothing.

        ``languages`` is accepted (and unused) so that it can be routed to every step.
        """
        self._check_params()
        (self.layer_,) = self.encoder.layer_indices(self.layer)
        self.n_features_out_ = int(self.encoder.hidden_size)
        return self

    def transform(self, X: Sequence[str], languages: Any = None) -> np.ndarray:
        """Float32 array of shape (n_texts, hidden_size): layer ``layer`` pooled with ``pooling``."""
        self._check_params()
        texts = _check_texts(_as_text_list(X))
        if isinstance(self.encoder, AlignedEncoder):
            out = self.encoder.encode(
                texts, languages=languages, pooling=self.pooling, layers=self.layer
            )
        else:
            out = self.encoder.encode(texts, pooling=self.pooling, layers=self.layer)
        return out[:, 0, :]

    def fit_transform(self, X: Sequence[str], y: Any = None, languages: Any = None) -> np.ndarray:
        """``fit`` then ``transform``, with ``languages`` reaching ``transform``."""
        return self.fit(X, y, languages=languages).transform(X, languages=languages)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Output names ``textencoder<i>``."""
        n = int(self.encoder.hidden_size)
        return np.asarray([f"textencoder{i}" for i in range(n)], dtype=object)

    def _check_params(self) -> None:
        if not isinstance(self.encoder, (HFEncoder, AlignedEncoder)):
            raise TypeError(
                f"encoder must be an HFEncoder or AlignedEncoder, got {type(self.encoder).__name__}"
            )
        if self.pooling not in ("mean", "cls", "last"):
            raise ValueError(
                f"pooling must be 'mean', 'cls' or 'last' (one vector per text), got {self.pooling!r}"
            )
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)):
            raise TypeError(f"layer must be an int, got {self.layer!r}")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.string = True
        tags.requires_fit = False
        return tags


def _as_text_list(X: Any) -> Any:
    """Accept a 1-D sequence, or a one-column 2-D array / DataFrame (as ColumnTransformer passes)."""
    shape = getattr(X, "shape", None)
    if shape is not None and len(shape) == 2 and shape[1] == 1:
        values = X.to_numpy() if hasattr(X, "to_numpy") else np.asarray(X)
        return values.ravel().tolist()
    return X
