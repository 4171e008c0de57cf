"""Apply an estimator per layer of a layer stack; RotateAlign on top of it."""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Sequence
from numbers import Integral
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin, _fit_context, clone
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils._set_output import _get_output_config
from sklearn.utils.validation import check_is_fitted

from ._apply import _empty_like, affine_by_language
from ._backend import DEVICE_CONSTRAINT, HALF_DTYPES, resolve_device
from ._dask import is_dask
from ._validation import check_languages, check_X, factorized
from .procrustes import ProcrustesAligner, solves_together


def _factorize_once(X: Any, languages: Any) -> Any:
    """Factorise the language labels once for all layers (not for dask input)."""
    if languages is None or is_dask(X) or is_dask(languages):
        return languages
    return factorized(languages, X.shape[0])


__all__ = ["PerLayer", "RotateAlign"]


def _writes_into(est) -> bool:
    """Whether ``est`` can write its transform into a slice of the output stack: a
    posthoc_align estimator (``_transform(X, languages, out=)``) with the default
    output container (``set_output`` not configured)."""
    from .centering import LanguageMeanCentering
    from .lsar import LSAR
    from .standardization import LanguageStandardizer

    # exact types: a subclass may override transform without _transform
    if type(est) not in (LanguageMeanCentering, LanguageStandardizer, ProcrustesAligner, LSAR):
        return False
    return _get_output_config("transform", est)["dense"] == "default"


def _warn_fitted_state(estimators: list) -> None:
    """The warnings a layer's own ``transform`` gives about its fitted state (once per
    state; the fused and ``out=`` paths bypass it), pointed at the caller's line."""
    from .standardization import LanguageStandardizer

    for est in estimators:
        if isinstance(est, LanguageStandardizer):
            est._warn_small_fitted("in the fitted statistics", stacklevel=5)


def _fusable(est) -> bool:
    """Whether ``est`` is a per-language moment method whose per-layer fits can share
    one pass over the stack (exact types: a subclass may change the fit)."""
    from .centering import LanguageMeanCentering
    from .lsar import LSAR
    from .standardization import LanguageStandardizer

    return type(est) in (LanguageMeanCentering, LanguageStandardizer, LSAR)


def _layer_block(X: Any, layers: tuple[int, ...]):
    """``X[:, a:b+1, :]`` as ``(n, k * d)`` when ``layers`` is the range a..b, else None."""
    a, b = layers[0], layers[-1]
    if list(layers) != list(range(a, b + 1)):
        return None
    return X[:, a : b + 1, :].reshape(X.shape[0], -1)


def _accepted(method, **kwargs) -> dict:
    """The keyword arguments that ``method`` accepts, dropping the others."""
    params = inspect.signature(method).parameters
    return {k: v for k, v in kwargs.items() if k in params and v is not None}


#: ``layers``: "all", one layer index, or a sequence of them (bools are refused)
_LAYERS: list = [
    StrOptions({"all"}),
    Interval(Integral, None, None, closed="neither"),
    "array-like",
]


class PerLayer(TransformerMixin, BaseEstimator, auto_wrap_output_keys=None):
    """Fit a clone of ``estimator`` on each selected layer of a layer stack.

    Input has shape ``(n_rows, n_layers, n_features)`` — e.g. the output of
    :meth:`posthoc_align.encoders.HFEncoder.encode`, where index 0 is the embedding
    output and ``i`` the output of layer ``i``. Each selected layer gets its own
    clone, fitted on ``X[:, i, :]``; the other layers pass through unchanged.

    Parameters
    ----------
    estimator : estimator
        Any posthoc_align transformer (or scikit-learn transformer); cloned per
        layer. ``languages``/``pair_ids`` are passed to it where its methods
        accept them.
    layers : "all", int or sequence of int, default="all"
        Layers to transform; negative indices count from the last layer.

    Attributes
    ----------
    layers_ : tuple of int
        Selected layers as non-negative indices.
    estimators_ : list of estimators
        Fitted clone per entry of ``layers_``.
    n_layers_in_ : int
    n_features_in_ : int
        Features per layer.

    Notes
    -----
    The output is a 3-D stack ``(n_rows, n_layers, n_features)``, so there is no
    table of named columns to give: ``PerLayer`` has no ``get_feature_names_out`` and
    no ``set_output`` (``Pipeline.set_output(transform="pandas")`` over it raises
    scikit-learn's "set_output is not available" ValueError, and a global
    ``transform_output="pandas"`` leaves its output an array). For a DataFrame, or a
    2-D step in a Pipeline, select a layer with ``X[:, i]`` and use the 2-D estimator
    on it (e.g. ``LanguageMeanCentering().set_output(transform="pandas")``). Numpy in
    gives numpy out (float16/32/64 kept); a tensor in gives a tensor out on the same
    device and dtype (float16/bfloat16 computed in a wider dtype, the output cast back).

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align import LanguageMeanCentering, PerLayer
    >>> X = np.arange(24, dtype=float).reshape(4, 3, 2)
    >>> pl = PerLayer(LanguageMeanCentering(), layers=[-1]).fit(X, languages=list("aabb"))
    >>> Z = pl.transform(X, languages=list("aabb"))
    >>> bool(np.array_equal(Z[:, :2], X[:, :2])), Z[:, 2].tolist()
    (True, [[-3.0, -3.0], [3.0, 3.0], [-3.0, -3.0], [3.0, 3.0]])
    """

    __metadata_request__fit = {"languages": True, "pair_ids": True}
    __metadata_request__partial_fit = {"languages": True, "pair_ids": True}
    __metadata_request__transform = {"languages": True}

    _parameter_constraints: dict = {
        "estimator": [HasMethods(["fit", "transform"])],
        "layers": _LAYERS,
    }

    def __init__(self, estimator: Any, *, layers: str | int | Sequence[int] = "all"):
        self.estimator = estimator
        self.layers = layers

    def _make_estimator(self):
        return clone(self.estimator)

    def _resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        layers = self.layers
        if isinstance(layers, str):
            if layers != "all":
                raise ValueError(f"layers={layers!r}: use 'all', an int or a sequence of ints")
            return tuple(range(n_layers))
        if isinstance(layers, int | np.integer):
            layers = [layers]
        out = []
        for i in layers:
            if isinstance(i, bool | np.bool_) or not isinstance(i, int | np.integer):
                raise TypeError(
                    f"layers must hold ints (layer indices), got {i!r}; e.g. layers=[-1] "
                    "for the last layer or 'all'."
                )
            j = int(i) + n_layers if i < 0 else int(i)
            if not 0 <= j < n_layers:
                raise ValueError(
                    f"layer {i} is out of range for input with {n_layers} layers "
                    f"(valid: {-n_layers}..{n_layers - 1})."
                )
            out.append(j)
        if not out:
            raise ValueError(
                "layers is empty: name at least one layer (an int, a sequence of ints, or "
                "'all'); with none selected every layer would pass through unchanged."
            )
        if len(set(out)) != len(out):
            raise ValueError(f"layers {list(layers)} name the same layer twice")
        return tuple(out)

    def _check_3d(self, X, *, reset: bool):
        if is_dask(X):
            if X.ndim != 3:
                raise ValueError(f"Expected a 3-D dask array, got shape {X.shape}")
            nx = None
        else:
            nx, X = check_X(X, ndim=3, estimator=self, keep_float16=True)
        if X.shape[1] == 0:
            raise ValueError(
                f"X has shape {tuple(X.shape)}: no layers. {type(self).__name__} takes a "
                "stack (n_rows, n_layers, n_features) with at least one layer."
            )
        if reset:
            self.n_layers_in_, self.n_features_in_ = int(X.shape[1]), int(X.shape[2])
        elif (X.shape[1], X.shape[2]) != (self.n_layers_in_, self.n_features_in_):
            raise ValueError(
                f"X has {X.shape[1]} layers of {X.shape[2]} features, but "
                f"{type(self).__name__} was fitted on {self.n_layers_in_} layers of "
                f"{self.n_features_in_} features."
            )
        return nx, X

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None, languages=None, pair_ids=None):
        """Fit one clone per selected layer.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_layers, n_features)
        y : ignored
        languages, pair_ids : array-like of shape (n_rows,), optional
            Passed to each clone where accepted.

        Returns
        -------
        self
        """
        nx, X = self._check_3d(X, reset=True)
        self.layers_ = self._resolve_layers(X.shape[1])
        self.estimators_ = []
        languages = _factorize_once(X, languages)
        if nx is not None and self._fit_fused(X, languages):
            return self
        with solves_together():  # the layers' d×d solves side by side, at the end
            for i in self.layers_:
                est = self._make_estimator()
                est.fit(X[:, i, :], **_accepted(est.fit, languages=languages, pair_ids=pair_ids))
                self.estimators_.append(est)
        return self

    def _fit_fused(self, X, languages) -> bool:
        """One pass of per-language moments over the selected layers at once.

        For centring, standardisation and LSAR the statistics of each layer are
        per-dimension moments, so those of the flattened block ``(n, k * d)`` of
        selected layers are the layers' moments side by side: one contiguous pass
        (instead of ``k`` passes over strided layer views), then every clone is fitted
        from its columns with its own closed form — the same state as fitting it on
        its layer (same reference row, same summation order per element).
        """
        template = self._make_estimator()
        if not _fusable(template):
            return False
        V = _layer_block(X, self.layers_)
        if V is None:
            return False
        nx, Vc, dev = template._validate(V, reset=True)
        labels, codes, _ = template._check_metadata(Vc.shape[0], languages, None)
        moments = template._new_moments()
        moments.update(nx.to_torch(Vc, dev), labels, codes)
        d = self.n_features_in_
        for p in range(len(self.layers_)):
            est = self._make_estimator()
            est._fit_from_moments(moments.columns(slice(p * d, (p + 1) * d)), dev)
            self.estimators_.append(est)
        return True

    def partial_fit(self, X, y=None, languages=None, pair_ids=None):
        """Stream a batch into every layer's clone."""
        first = not hasattr(self, "estimators_")
        if first:
            self._validate_params()
        _, X = self._check_3d(X, reset=first)
        if first:
            self.layers_ = self._resolve_layers(X.shape[1])
            self.estimators_ = [self._make_estimator() for _ in self.layers_]
        languages = _factorize_once(X, languages)
        with solves_together():
            for i, est in zip(self.layers_, self.estimators_, strict=True):
                est.partial_fit(
                    X[:, i, :], **_accepted(est.partial_fit, languages=languages, pair_ids=pair_ids)
                )
        return self

    def transform(self, X, languages=None):
        """Transform the selected layers; other layers are copied unchanged.

        Returns
        -------
        X_new : same type as X, shape (n_rows, n_layers, n_features)
        """
        check_is_fitted(self)
        nx, X = self._check_3d(X, reset=False)
        _warn_fitted_state(self.estimators_)
        if nx is None:  # dask: lazy, layer by layer
            import dask.array as da

            fitted = dict(zip(self.layers_, self.estimators_, strict=True))
            return da.stack(
                [
                    fitted[i].transform(
                        X[:, i, :], **_accepted(fitted[i].transform, languages=languages)
                    )
                    if i in fitted
                    else X[:, i, :]
                    for i in range(X.shape[1])
                ],
                axis=1,
            )
        # one output buffer: the passed-through layers are copied into it and every
        # fitted layer's kernel writes straight into its slice (no copy of the stack)
        if nx.name == "torch":
            X = X.detach()  # as the 2-D estimators: a tensor out, outside the autograd graph
            T = X if X.dtype in (torch.float32, torch.float64) else X.double()
            out = _empty_like(T, T.dtype)
            out_t = out
        else:
            # check_X gave float16/32/64; a read-only array is copied, never written
            T = nx.to_torch(X)
            out = np.empty(X.shape, dtype=np.float32 if T.dtype == torch.float32 else np.float64)
            out_t = torch.from_numpy(out)
        fitted = set(self.layers_)
        languages = _factorize_once(X, languages)
        for j in range(X.shape[1]):
            if j not in fitted:
                out_t[:, j, :].copy_(T[:, j, :])
        if self._transform_fused(nx, T, out_t, languages):
            return self._as_input(nx, out, out_t, X)
        for i, est in zip(self.layers_, self.estimators_, strict=True):
            kwargs = _accepted(est.transform, languages=languages)
            if _writes_into(est):
                est._transform(X[:, i, :], out=out_t[:, i, :], **kwargs)
            else:
                res = est.transform(X[:, i, :], **kwargs)
                if tuple(res.shape) != (X.shape[0], X.shape[2]):
                    raise ValueError(
                        f"{type(self).__name__}: {type(est).__name__} turned layer {i} of shape "
                        f"{(X.shape[0], X.shape[2])} into shape {tuple(res.shape)}; PerLayer "
                        "puts each layer back into the stack, so its estimator must keep the "
                        "number of features (use it on the layer directly to reduce it)."
                    )
                out[:, i, :] = res
        return self._as_input(nx, out, out_t, X)

    @staticmethod
    def _as_input(nx, out, out_t, X):
        """The output stack, cast back to half precision when ``X`` was float16/bfloat16
        (computed in float64 like the 2-D estimators; see ``Backend.from_torch``)."""
        if X.dtype in HALF_DTYPES or X.dtype == np.float16:
            return nx.from_torch(out_t, like=X)
        return out

    def _transform_fused(self, nx, T, out_t, languages) -> bool:
        """Centring / fitted standardisation of all selected layers in one pass.

        The per-layer shift and scale vectors placed side by side make the selected
        block ``(n, k * d)`` one per-language affine map (bitwise the per-layer result).
        False (the caller loops over layers) for other methods, non-contiguous layers,
        languages not seen at fit (each layer's policy handles them) or a device the
        estimators would move the data to.
        """
        from .centering import LanguageMeanCentering
        from .standardization import LanguageStandardizer, _scale

        ests = self.estimators_
        kind = type(ests[0])
        if kind not in (LanguageMeanCentering, LanguageStandardizer):
            return False
        if any(type(e) is not kind or not _writes_into(e) for e in ests):
            return False
        if kind is LanguageStandardizer and any(e.mode != "fitted" for e in ests):
            return False
        if any(not np.array_equal(e.languages_, ests[0].languages_) for e in ests):
            return False
        V, dst = _layer_block(T, self.layers_), _layer_block(out_t, self.layers_)
        if V is None or resolve_device(ests[0].device, nx, V) != T.device:
            return False
        labels, codes = check_languages(languages, T.shape[0])
        gcodes, unknown = ests[0]._fitted_codes(labels, codes, policy="per layer")
        if unknown:
            return False
        shift = scale = None
        if kind is LanguageMeanCentering:
            shift = np.hstack([e.means_ for e in ests])
        else:
            if ests[0].with_mean:
                shift = np.hstack([e.means_ for e in ests])
            if ests[0].with_std:
                scale = np.hstack([1.0 / _scale(e.vars_, e.eps) for e in ests])
        affine_by_language(V, gcodes, shift=shift, scale=scale, out=dst)
        return True

    def fit_transform(self, X, y=None, languages=None, pair_ids=None):
        """Fit, then transform ``X`` (languages reach both steps)."""
        return self.fit(X, y, languages=languages, pair_ids=pair_ids).transform(
            X, languages=languages
        )

    def save(self, path: str) -> None:
        """Write to the directory ``path`` (safetensors + JSON, no pickle)."""
        from .persistence import save

        save(self, path)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags


class RotateAlign(PerLayer):
    """RotateAlign (Kulshreshtha et al. 2020): Procrustes to a pivot on chosen layers.

    One :class:`ProcrustesAligner` per selected layer of a layer stack
    ``(n_rows, n_layers, n_features)``; the other layers pass through unchanged.
    Kulshreshtha et al. (2020), "Cross-lingual Alignment Methods for Multilingual
    BERT: A Comparative Study", §3.1, rotate the last layers into English after
    language centring, following Wang et al. (2019).

    Parameters
    ----------
    layers : int or sequence of int, default=(-4, -3, -2, -1)
        Layers to rotate (negative from the last).
    pivot : hashable, default="en"
    center : bool, default=True
        Centre each language by its own mean (see :class:`ProcrustesAligner`).
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"

    Attributes
    ----------
    layers_ : tuple of int
    estimators_ : list of ProcrustesAligner

    Notes
    -----
    As for :class:`PerLayer`, the output is a 3-D stack, so there is no
    ``get_feature_names_out`` and no ``set_output``: for a DataFrame, select a layer
    with ``X[:, i]`` and use :class:`ProcrustesAligner` on it.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align import RotateAlign
    >>> rng = np.random.default_rng(0)
    >>> en = rng.normal(size=(40, 5, 3))
    >>> X = np.concatenate([en, en[:, :, ::-1]])      # "fr" = permuted coordinates
    >>> langs, ids = ["en"] * 40 + ["fr"] * 40, list(range(40)) * 2
    >>> Z = RotateAlign(layers=(-1,)).fit_transform(X, languages=langs, pair_ids=ids)
    >>> bool(np.allclose(Z[40:, -1], Z[:40, -1]))
    True
    """

    _parameter_constraints: dict = {
        "layers": _LAYERS,
        "pivot": [Hashable],
        "center": ["boolean"],
        "device": DEVICE_CONSTRAINT,
    }

    def __init__(
        self,
        *,
        layers: int | Sequence[int] = (-4, -3, -2, -1),
        pivot: Hashable = "en",
        center: bool = True,
        device: Any = "auto",
    ):
        self.layers = layers
        self.pivot = pivot
        self.center = center
        self.device = device

    def _make_estimator(self):
        return ProcrustesAligner(pivot=self.pivot, center=self.center, device=self.device)
