"""Per-language mean centring (Libovický, Rosa & Fraser 2020)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted

from ._apply import affine_by_language, deliver, usable_out
from ._backend import DEVICE_CONSTRAINT
from ._base import LanguageTransformerMixin, unknown_policy_message
from ._dask import is_dask, transform_dask
from ._stats import LanguageMoments
from ._validation import ALL_ROWS, check_languages

__all__ = ["LanguageMeanCentering"]


class LanguageMeanCentering(LanguageTransformerMixin):
    """Subtract each language's mean vector.

    Libovický et al. (2020), "On the Language Neutrality of Pre-trained Multilingual
    Representations", §3 (language centroids) and §5: for a row ``x`` of language
    ``l`` with fitted mean ``μ_l = (1/n_l) Σ_{i: lang_i = l} x_i``::

        x ↦ x − μ_l

    Parameters
    ----------
    unknown_language : {"error", "batch", "global"}, default="error"
        What ``transform`` does with a language not seen during fit: raise a
        ValueError listing the fitted languages (``"error"``), subtract the mean of
        that language's rows in the same call (``"batch"``), or subtract the mean
        over all fitted rows (``"global"``).
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the arithmetic runs. ``"auto"``: a tensor's own device; numpy input
        on CUDA when available, else the CPU.

    Attributes
    ----------
    languages_ : ndarray of shape (n_languages,)
        Fitted languages, sorted. Without ``languages`` at fit, one language
        ``"__all__"`` (every row).
    means_ : ndarray of shape (n_languages, n_features)
        Per-language means (float64), rows in the order of ``languages_``.
    counts_ : ndarray of shape (n_languages,)
        Rows seen per language.
    global_mean_ : ndarray of shape (n_features,)
        Mean of all fitted rows.
    n_samples_seen_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only when fitted on a DataFrame with string column names.

    See Also
    --------
    LanguageStandardizer : also divides by the per-language standard deviation.
    LSAR : removes the subspace spanned by the language means instead.

    Notes
    -----
    One streaming pass: per-language sums are accumulated in float64 (blocks of
    4096 rows reduced in the input precision, see :mod:`posthoc_align._stats`),
    so ``partial_fit`` over any chunking equals ``fit`` up to rounding. Input
    arrays are never modified; numpy in gives numpy out (float16/32/64 kept),
    a tensor in gives a tensor out on the same device and dtype (float16 and
    bfloat16 are computed in a wider dtype and the output cast back).

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align import LanguageMeanCentering
    >>> X = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [12.0, 2.0]])
    >>> langs = ["en", "en", "fr", "fr"]
    >>> LanguageMeanCentering().fit_transform(X, languages=langs)
    array([[-1., -1.],
           [ 1.,  1.],
           [-1., -1.],
           [ 1.,  1.]])
    """

    _parameter_constraints: dict = {
        "unknown_language": [StrOptions({"error", "batch", "global"})],
        "device": DEVICE_CONSTRAINT,
    }

    def __init__(self, *, unknown_language: str = "error", device: Any = "auto"):
        self.unknown_language = unknown_language
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, languages=None):
        """Compute each language's mean.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        y : ignored
        languages : array-like of shape (n_rows,), default=None
            Language of each row; None means all rows are one language.

        Returns
        -------
        self
        """
        self._reset()
        return self._partial_fit(X, languages)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, languages=None):
        """Add a batch of rows to the running per-language means."""
        return self._partial_fit(X, languages)

    def _finalize(self, device) -> None:
        m, order = self._sorted_moments()
        self.means_ = m.means()[order]
        self.counts_ = m.counts[order].astype(np.int64)
        self.global_mean_ = m.global_mean()
        self.n_samples_seen_ = int(m.counts.sum())

    def transform(self, X, languages=None):
        """Subtract the fitted mean of each row's language.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        languages : array-like of shape (n_rows,), default=None

        Returns
        -------
        X_new : same type as X, shape (n_rows, n_features)
        """
        check_is_fitted(self)
        if is_dask(X):
            return transform_dask(self, X, languages)
        return self._transform(X, languages)

    def _transform(self, X, languages=None, out=None):
        """:meth:`transform`; with ``out`` (a tensor, e.g. a layer of a stack) the
        result is written there and ``out`` is returned."""
        nx, Xc, dev = self._validate(X, reset=False)
        labels, codes = check_languages(languages, Xc.shape[0])
        policy = self.unknown_language
        gcodes, unknown = self._fitted_codes(labels, codes, policy=policy)
        T = nx.to_torch(Xc, dev)
        shift = self.means_
        if unknown == [ALL_ROWS] and languages is None:
            warnings.warn(
                f"transform got no languages= although LanguageMeanCentering was fitted with "
                f"{self.languages_.tolist()}: every row is treated as one unseen language "
                f"(unknown_language={policy!r}). Pass languages= (in a Pipeline, turn on "
                "metadata routing) unless that is what you want.",
                UserWarning,
                stacklevel=3,
            )
        if unknown:  # policy "batch" or "global": extra rows appended to the shift table
            extra = _means_for_unknown(self, T, labels, codes, gcodes, policy)
            gcodes = gcodes.copy()
            for k, (lab_code, _) in enumerate(extra):
                gcodes[codes == lab_code] = len(self.means_) + k
            shift = np.vstack([self.means_] + [mean[None] for _, mean in extra])
        res = affine_by_language(T, gcodes, shift=shift, out=usable_out(out, T))
        return deliver(nx, res, Xc, out)

    def _unknown_message(self, unknown):
        return unknown_policy_message(self, unknown)


def _means_for_unknown(est, T, labels, codes, gcodes, policy):
    """(batch code, mean) for each language of this call that was not fitted."""
    unknown_codes = np.unique(codes[gcodes < 0])
    if policy == "global":
        return [(c, est.global_mean_) for c in unknown_codes]
    rows = np.flatnonzero(np.isin(codes, unknown_codes))
    m = LanguageMoments().update(T[torch.from_numpy(rows).to(T.device)], labels, codes[rows])
    means = m.means()
    return [(c, means[m.index[labels.tolist()[c]]]) for c in unknown_codes]
