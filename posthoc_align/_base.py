"""What every posthoc_align estimator shares: validation, metadata, output, saving."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, OneToOneFeatureMixin, TransformerMixin
from sklearn.utils.validation import validate_data

from ._backend import Backend, resolve_device
from ._dask import is_dask
from ._stats import LanguageMoments
from ._validation import ALL_ROWS, check_languages, check_X

__all__ = ["LanguageTransformerMixin", "languages_array"]


def languages_array(labels: list[Hashable]) -> np.ndarray:
    """Sorted 1-D array of language labels (the order of every ``*_`` attribute)."""
    arr = np.asarray(labels)
    return np.sort(arr)


class LanguageTransformerMixin(OneToOneFeatureMixin, TransformerMixin, BaseEstimator):
    """Shared plumbing for per-language transformers.

    * ``languages`` (and ``pair_ids`` where used) are per-row metadata,
      requested by default for ``fit``, ``partial_fit`` and ``transform`` so that
      Pipelines, ``cross_validate`` and ``GridSearchCV`` route them once
      ``sklearn.set_config(enable_metadata_routing=True)`` is on
      (``set_fit_request(languages=False)`` turns it off).
    * ``fit_transform`` passes the metadata to both ``fit`` and ``transform``
      (scikit-learn's default drops it before ``transform``).
    * ``save(path)`` writes safetensors + JSON (see :mod:`posthoc_align.persistence`).

    Examples
    --------
    Cross-validation that keeps every translation of a sentence in the same fold
    (``GroupKFold`` on ``pair_ids``), with ``languages`` routed to the aligner:

    >>> import numpy as np, sklearn
    >>> from sklearn.linear_model import LogisticRegression
    >>> from sklearn.model_selection import GroupKFold, cross_validate
    >>> from sklearn.pipeline import Pipeline
    >>> from posthoc_align import LanguageMeanCentering
    >>> rng = np.random.default_rng(0)
    >>> base = rng.normal(size=(30, 4))
    >>> X = np.vstack([base, base + 3.0])            # "fr" = shifted "en"
    >>> y = np.tile((base[:, 0] > 0).astype(int), 2)
    >>> langs, pair_ids = ["en"] * 30 + ["fr"] * 30, np.tile(np.arange(30), 2)
    >>> with sklearn.config_context(enable_metadata_routing=True):
    ...     pipe = Pipeline([("center", LanguageMeanCentering()),
    ...                      ("clf", LogisticRegression())])
    ...     res = cross_validate(pipe, X, y, cv=GroupKFold(3),
    ...                          params={"languages": langs, "groups": pair_ids})
    >>> len(res["test_score"])
    3
    """

    __metadata_request__fit = {"languages": True}
    __metadata_request__partial_fit = {"languages": True}
    __metadata_request__transform = {"languages": True}

    #: whether the fit needs per-language sums of squares
    _second_moments = False

    #: whether first-moment float32 sums must be compensated where the torch kernels run
    #: (CUDA, no numba): LSAR's subspace comes from *differences* of language means
    _compensated_moments = False

    #: whether the fit needs per-language sums of ``|x|`` (LSAR's rank cut)
    _absolute_moments = False

    def _new_moments(self) -> LanguageMoments:
        return LanguageMoments(
            second_moments=self._second_moments,
            compensated=self._second_moments or self._compensated_moments,
            absolute=self._absolute_moments,
        )

    # -- the streaming fit, shared by every estimator ----------------------------
    def _partial_fit(self, X, languages, pair_ids=None):
        """Validate a batch, add it to the moments, recompute the closed form."""
        if is_dask(X):
            from ._dask import partial_fit_dask

            return partial_fit_dask(self, X, languages, pair_ids)
        first = not hasattr(self, "_moments")
        try:
            nx, Xc, dev = self._validate(X, reset=first)
            labels, codes, pids = self._check_metadata(Xc.shape[0], languages, pair_ids)
            if first:
                self._moments = self._new_moments()
                self._pairs = self._new_pairs()
            pairs = getattr(self, "_pairs", None)
            # every check before any statistic changes: a rejected batch leaves the fit as
            # it was
            prepared = pairs.check(labels, codes, pids) if pairs is not None else None
            T = nx.to_torch(Xc, dev)
            self._moments.update(T, labels, codes)
        except Exception:
            if first:  # a rejected first batch leaves the estimator unfitted, not half-set
                self._reset()
            raise
        if pairs is not None:
            try:
                pairs.update(T, labels, codes, pids, self._moments, _prepared=prepared)
            except Exception as exc:
                # rare: products out of float64's range, found while pairing (after the
                # moments took the batch); nothing half-updated is kept
                self._reset()
                if first or not isinstance(exc, ValueError):
                    raise
                raise ValueError(
                    f"{exc} This partial_fit stream was reset (its statistics had already "
                    "taken part of the batch): start it again with the rescaled data."
                ) from exc
        self._finalize(dev)
        return self

    def _fit_from_moments(self, moments: LanguageMoments, device: Any) -> None:
        """Become fitted from moments accumulated elsewhere (``PerLayer``'s one pass
        over a layer stack): the same state and closed form as :meth:`fit`."""
        self._reset()
        self.n_features_in_ = moments.n_features
        self._moments = moments
        self._pairs = None
        self._finalize(device)
        self._after_fit()

    def _after_fit(self) -> None:
        """Checks run at the end of ``fit`` (e.g. warnings about tiny languages)."""

    #: private streaming state dropped by ``fit`` (besides every ``*_`` attribute)
    _state_attrs: tuple[str, ...] = (
        "_moments",
        "_pairs",
        "_scatter",
        "_fitter",
        "_rows",
        "_few_pairs_warned",
        "_small_warned",
    )

    def _reset(self) -> None:
        """Forget everything learned: every ``*_`` attribute and the streaming state."""
        for attr in list(vars(self)):
            learned = attr.endswith("_") and not attr.startswith("__")
            if learned or attr in self._state_attrs:
                delattr(self, attr)

    def _check_metadata(self, n_rows: int, languages: Any, pair_ids: Any):
        """``(labels, codes, pair_ids)`` for a batch; estimators needing pairs override."""
        labels, codes = check_languages(languages, n_rows)
        return labels, codes, None

    def _new_pairs(self):
        """A fresh pair-moment accumulator, or None when the method uses no pairs."""
        return None

    def _finalize(self, device) -> None:  # pragma: no cover - abstract
        """Compute the learned ``*_`` attributes from ``self._moments``."""
        raise NotImplementedError

    def _sorted_moments(self) -> tuple[LanguageMoments, np.ndarray]:
        """The moments and the permutation that sorts their languages."""
        m = self._moments
        order = np.argsort(np.asarray(m.labels), kind="stable")
        self.languages_ = languages_array(m.labels)
        return m, order

    # -- helpers for subclasses ------------------------------------------------
    def _validate(self, X: Any, *, reset: bool) -> tuple[Backend, Any, torch.device]:
        nx, Xc = check_X(X, estimator=self, keep_float16=True)
        validate_data(self, X, reset=reset, skip_check_array=True)
        return nx, Xc, resolve_device(getattr(self, "device", "auto"), nx, Xc)

    def _fitted_codes(
        self, labels: np.ndarray, codes: np.ndarray, *, policy: str = "error"
    ) -> tuple[np.ndarray, list[Hashable]]:
        """Indices into ``languages_`` for each row; -1 marks languages not fitted.

        With ``policy="error"`` an unknown language raises a ValueError listing the
        fitted languages.
        """
        known = {lab: i for i, lab in enumerate(self.languages_.tolist())}
        lut = np.array([known.get(lab, -1) for lab in labels.tolist()], dtype=np.int64)
        unknown = [lab for lab, i in zip(labels.tolist(), lut, strict=True) if i < 0]
        if unknown and policy == "error":
            if unknown == [ALL_ROWS]:
                raise ValueError(
                    f"{type(self).__name__} was fitted with languages= "
                    f"({self.languages_.tolist()}), but this call got no languages=. Pass "
                    "the language of each row; in a Pipeline, turn on metadata routing "
                    "(sklearn.set_config(enable_metadata_routing=True)) and pass "
                    "languages= to its transform/predict/score."
                )
            raise ValueError(self._unknown_message(unknown))
        return lut[codes], unknown

    def _unknown_message(self, unknown: list[Hashable]) -> str:
        return (
            f"{type(self).__name__}: language(s) {unknown} were not seen during fit "
            f"(fitted languages: {self.languages_.tolist()}). Fit on rows of those "
            "languages, or pass languages= at transform if you passed it at fit."
        )

    # -- scikit-learn API ----------------------------------------------------
    def fit_transform(self, X, y=None, languages=None, **fit_params):
        """Fit, then transform ``X`` with the same metadata.

        Unlike scikit-learn's default, ``languages`` reaches ``transform`` too.
        """
        self.fit(X, y, languages=languages, **fit_params)
        return self.transform(X, languages=languages)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- persistence ------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write this estimator to the directory ``path`` (safetensors + JSON, no pickle).

        Load it back with :func:`posthoc_align.load`.
        """
        from .persistence import save

        save(self, path)


def unknown_policy_message(est: Any, unknown: list[Hashable]) -> str:
    return (
        f"{type(est).__name__}: language(s) {unknown} were not seen during fit "
        f"(fitted languages: {est.languages_.tolist()}). Either fit on rows of those "
        "languages, or choose another unknown_language policy: 'batch' (use the mean of "
        "that language's rows in this call) or 'global' (use the mean over all fitted rows)."
    )
