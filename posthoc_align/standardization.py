"""Per-language standardisation (Zhao et al. 2021), fitted or in-batch."""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import numpy as np
from sklearn.base import _fit_context
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._apply import affine_by_language, deliver, usable_out
from ._backend import DEVICE_CONSTRAINT
from ._base import LanguageTransformerMixin
from ._dask import is_dask, transform_dask
from ._stats import LanguageMoments
from ._validation import check_languages

__all__ = ["LanguageStandardizer"]


def _scale(variances: np.ndarray, eps: float) -> np.ndarray:
    """``sqrt(var + eps)``; an exact 0 (zero variance with ``eps=0``) becomes 1, as in
    scikit-learn's ``StandardScaler``: a constant feature is centred, not divided by 0."""
    s = np.sqrt(variances + eps)
    s[s == 0.0] = 1.0
    return s


def _small_languages(labels, counts) -> list:
    """The languages with fewer than 2 rows (variance 0: only eps is left)."""
    return [lab for lab, c in zip(labels, counts, strict=True) if c < 2]


def _warn_small(small: list, where: str, stacklevel: int = 3) -> None:
    if small:
        warnings.warn(
            f"language(s) {small} have fewer than 2 rows {where}: their variance is 0 and "
            "only eps keeps the division finite. Give every language more rows.",
            UserWarning,
            stacklevel=stacklevel,
        )


class LanguageStandardizer(LanguageTransformerMixin):
    """Z-score every dimension with the statistics of the row's language.

    Zhao et al. (2021), "Inducing Language-Agnostic Multilingual Representations",
    §3.2 (normalisation of language-specific means and variances): for a row ``x``
    of language ``l``::

        x ↦ (x − μ_l) / sqrt(σ²_l + eps)

    with μ_l and σ²_l the per-dimension mean and population variance (ddof=0) of
    language ``l``.

    Parameters
    ----------
    mode : {"fitted", "batch"}, default="fitted"
        ``"fitted"`` uses statistics learned in ``fit``; ``"batch"`` normalises each
        language group with the statistics of the rows in the same ``transform``
        call (the in-batch normalisation of Zhao et al. and OneAligner); ``fit``
        then only records the number of features.
    with_mean : bool, default=True
        Subtract the language mean.
    with_std : bool, default=True
        Divide by ``sqrt(var + eps)``.
    eps : float, default=1e-6
        Added to the variance. A language with a single row has variance 0 and is
        scaled by ``1/sqrt(eps)`` of a zero vector (a warning is issued, once per
        fitted state: at the end of ``fit``, or at the first ``transform`` after
        ``partial_fit``). With
        ``eps=0`` a feature of zero variance is left unscaled (scale 1, as
        ``StandardScaler`` does) instead of divided by zero.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"

    Attributes
    ----------
    languages_ : ndarray of shape (n_languages,)
        Sorted fitted languages (``mode="fitted"``; in batch mode, those seen at fit).
    means_ : ndarray of shape (n_languages, n_features)
    vars_ : ndarray of shape (n_languages, n_features)
    scale_ : ndarray of shape (n_languages, n_features)
        ``sqrt(vars_ + eps)``, with 1 where that is 0 (ones when ``with_std=False``).
    counts_ : ndarray of shape (n_languages,)
    n_features_in_ : int

    See Also
    --------
    LanguageMeanCentering : the mean part only.

    Notes
    -----
    Means and variances come from one streaming pass of shifted sums and sums of
    squares accumulated in float64 (see :mod:`posthoc_align._stats`).

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align import LanguageStandardizer
    >>> X = np.array([[0.0], [2.0], [10.0], [30.0]])
    >>> LanguageStandardizer(eps=0.0).fit_transform(X, languages=["a", "a", "b", "b"])
    array([[-1.],
           [ 1.],
           [-1.],
           [ 1.]])
    """

    _parameter_constraints: dict = {
        "mode": [StrOptions({"fitted", "batch"})],
        "with_mean": ["boolean"],
        "with_std": ["boolean"],
        "eps": [Interval(numbers.Real, 0, None, closed="left")],
        "device": DEVICE_CONSTRAINT,
    }
    _second_moments = True

    def __init__(
        self,
        *,
        mode: str = "fitted",
        with_mean: bool = True,
        with_std: bool = True,
        eps: float = 1e-6,
        device: Any = "auto",
    ):
        self.mode = mode
        self.with_mean = with_mean
        self.with_std = with_std
        self.eps = eps
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, languages=None):
        """Learn per-language means and variances (``mode="fitted"``).

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        y : ignored
        languages : array-like of shape (n_rows,), default=None
            None means all rows are one language.

        Returns
        -------
        self
        """
        self._reset()
        self._partial_fit(X, languages)
        self._after_fit()
        return self

    def _after_fit(self) -> None:
        self._warn_small_fitted("at fit", stacklevel=6)

    def _warn_small_fitted(self, where: str, stacklevel: int) -> None:
        """Warn about fitted languages with fewer than 2 rows, once per state: at the end
        of ``fit``, or (``partial_fit`` streams) at the first transform of that state."""
        if self.mode != "fitted":
            return
        small = _small_languages(self.languages_.tolist(), self.counts_)
        if small and getattr(self, "_small_warned", None) != small:
            self._small_warned = small
            _warn_small(small, where, stacklevel=stacklevel)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, languages=None):
        """Add a batch to the running per-language statistics."""
        return self._partial_fit(X, languages)

    def _finalize(self, device) -> None:
        m, order = self._sorted_moments()
        self.counts_ = m.counts[order].astype(np.int64)
        self.n_samples_seen_ = int(m.counts.sum())
        self.means_ = m.means()[order]
        self.vars_ = m.variances()[order]
        self.scale_ = _scale(self.vars_, self.eps) if self.with_std else np.ones_like(self.vars_)

    def transform(self, X, languages=None):
        """Standardise each row with its language's statistics.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        languages : array-like of shape (n_rows,), default=None

        Returns
        -------
        X_new : same type as X
        """
        check_is_fitted(self)
        self._warn_small_fitted("in the fitted statistics", stacklevel=5)
        if is_dask(X):
            return transform_dask(self, X, languages)
        return self._transform(X, languages)

    def _transform(self, X, languages=None, out=None):
        """:meth:`transform`; with ``out`` (a tensor) the result is written there."""
        nx, Xc, dev = self._validate(X, reset=False)
        labels, codes = check_languages(languages, Xc.shape[0])
        T = nx.to_torch(Xc, dev)
        if self.mode == "batch":
            m = LanguageMoments(second_moments=True).update(T, labels, codes)
            _warn_small(_small_languages(m.labels, m.counts), "in this batch")
            lut = np.array([m.index[lab] for lab in labels.tolist()], dtype=np.int64)
            gcodes, means, var = lut[codes], m.means(), m.variances()
        else:
            gcodes, _ = self._fitted_codes(labels, codes)
            means, var = self.means_, self.vars_
        shift = means if self.with_mean else None
        scale = 1.0 / _scale(var, self.eps) if self.with_std else None
        res = affine_by_language(T, gcodes, shift=shift, scale=scale, out=usable_out(out, T))
        return deliver(nx, res, Xc, out)

    def _unknown_message(self, unknown):
        return (
            f"LanguageStandardizer: language(s) {unknown} were not seen during fit "
            f"(fitted languages: {self.languages_.tolist()}). Fit on rows of those "
            "languages, or use mode='batch' to standardise each language with the "
            "statistics of its rows in the call."
        )
