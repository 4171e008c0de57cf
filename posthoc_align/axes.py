"""Language-sensitive (LDA) and language-neutral axes (Chang, Tu & Bergen 2022)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import scipy.linalg
import torch
from sklearn.base import _fit_context
from sklearn.exceptions import NotFittedError
from sklearn.utils import metadata_routing
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import _generate_get_feature_names_out, check_is_fitted

from ._apply import project_out
from ._backend import DEVICE_CONSTRAINT
from ._base import LanguageTransformerMixin, languages_array
from ._covariance import ScatterMoments
from ._dask import is_dask, transform_dask
from ._linalg import flip_signs
from ._stats import _labels_list, row_blocks
from ._validation import check_languages, raise_non_finite
from .lsar import language_subspace

__all__ = ["LanguageAxes"]

#: Ridge added to the within-language scatter before the generalised eigenproblem,
#: relative to its mean eigenvalue ``trace(S_w) / d``.
LDA_RIDGE = 1e-6


class LanguageAxes(LanguageTransformerMixin):
    """Find language-sensitive and language-neutral axes; remove or keep them.

    Chang, Tu & Bergen (2022), "The Geometry of Multilingual Language Model
    Representations" (EMNLP), §4: the language means differ along
    *language-sensitive* axes, found by linear discriminant analysis over the
    language labels, while *language-neutral* axes carry information shared by
    all languages.

    **Sensitive axes** (LDA, Fisher): with per-language means ``μ_l``, counts
    ``n_l``, global mean ``μ``, the within- and between-language scatters::

        S_w = Σ_l Σ_{i ∈ l} (x_i − μ_l)(x_i − μ_l)ᵀ,   S_b = Σ_l n_l (μ_l − μ)(μ_l − μ)ᵀ

    solve ``S_b v = λ (S_w + ε I) v`` (``scipy.linalg.eigh``, ridge
    ``ε = 1e-6 · trace(S_w) / d``) and keep the ``min(L − 1, d)`` axes of largest
    ``λ`` (between- over within-language sum of squares along ``v``), as unit
    rows in ``sensitive_axes_`` with ``λ`` in ``sensitive_scores_``.

    **Neutral axes**: an orthonormal basis of PCA axes of the pooled
    within-language covariance ``Σ_w = S_w / n``, computed separately inside the
    span ``M`` of the language-mean differences (rank ``r ≤ L − 1``, the subspace
    of :class:`LSAR`) and inside its orthogonal complement, so that no axis mixes
    the two (a plain PCA of ``Σ_w`` with near-equal variances would spread the
    mean differences over many axes; every complement axis has exactly equal
    language means). Each axis ``v``, with pooled variance ``σ²(v) = vᵀ Σ_w v``,
    gets the score::

        score(v) = Σ_l π_l (m_l − m̄)² / σ²(v)  +  Σ_l π_l (s²_l − σ²(v))² / σ⁴(v)

    where ``π_l = n_l / n``, ``m_l = μ_lᵀv`` the language's projected mean,
    ``m̄ = μᵀv``, and ``s²_l = vᵀ S_l v / n_l`` its projected variance (ddof=0;
    ``σ²(v) = Σ_l π_l s²_l``). The first term is the Fisher ratio of the axis
    (disagreement of the means), the second the squared coefficient of
    variation of the per-language variances (disagreement of the spreads); both
    are scale-free, and 0 means every language has the same mean and variance
    along ``v``. Axes are ranked by ascending score; axes with zero pooled
    variance score ``inf``; ties keep the order complement axes first, each
    block by decreasing variance (with one language: plain PCA order). If the
    means differ in fewer than ``L − 1`` directions beyond sampling noise, the
    noise directions of ``M`` still bound the complement and tilt its axes.

    Parameters
    ----------
    n_sensitive : int or None, default=None
        Number of sensitive axes removed by ``mode="remove_sensitive"``. None:
        ``L − 1`` (all of them). More than ``L − 1`` is an error.
    mode : {"remove_sensitive", "keep_neutral"}, default="remove_sensitive"
        ``"remove_sensitive"``: project the top ``n_sensitive`` sensitive axes
        out (output keeps ``n_features`` columns). ``"keep_neutral"``: return
        the coordinates ``(x − μ)ᵀv`` on the top ``n_neutral`` neutral axes.
    n_neutral : int or None, default=None
        Number of neutral axes kept by ``mode="keep_neutral"``. None:
        ``max(d − (L − 1), 1)``. At most ``n_features``.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the statistics and transforms are computed (the LDA eigenproblem
        runs in scipy on the host).

    Attributes
    ----------
    languages_ : ndarray of shape (n_languages,)
    counts_ : ndarray of shape (n_languages,)
    means_ : ndarray of shape (n_languages, n_features)
    global_mean_ : ndarray of shape (n_features,)
    sensitive_axes_ : ndarray of shape (min(n_languages − 1, n_features), n_features)
        Unit-norm LDA directions, most discriminative first (not orthogonal).
    sensitive_scores_ : ndarray of shape (min(n_languages − 1, n_features),)
        Their generalised eigenvalues ``λ``, descending.
    neutral_axes_ : ndarray of shape (n_features, n_features)
        Orthonormal axes (see above), most neutral first.
    neutral_scores_ : ndarray of shape (n_features,)
        Their scores, ascending.
    n_sensitive_, n_neutral_ : int
        Resolved numbers of axes.
    components_ : ndarray of shape (n_components, n_features)
        What ``transform`` uses: an orthonormal basis of the removed span
        (``"remove_sensitive"``; QR of the selected sensitive axes), or the kept
        neutral axes (``"keep_neutral"``).
    n_features_in_ : int

    See Also
    --------
    LSAR : removes the span of the language means (orthogonal projection).
    LanguageEraser : LEACE, the least-squares optimal erasure with a guarantee.

    Notes
    -----
    One streaming pass accumulates, in float64 and per language, counts, sums
    and a d×d scatter matrix (:class:`posthoc_align._covariance.ScatterMoments`;
    memory ``L·d²`` float64 on the host, needed for the per-language variances
    of the neutral score). ``partial_fit`` over any chunking equals ``fit`` up to
    rounding; a stream may start with fewer rows than the axes need (e.g. one row
    per language): the axes appear once the rows suffice, and until then
    ``transform`` raises ``NotFittedError`` saying why. The eigenproblems and the
    scores are computed on the scatters divided by a power of two near their mean
    eigenvalue, so the axes and scores do not depend on the scale of ``X``
    (float32 from ~1e-30 to ~1e30 included, float64 from ~1e-150 to ~1e150).
    float64 rows whose squares overflow (rows of size ≳ 1e154) raise a
    ``ValueError`` asking to divide ``X`` by a constant; a ``partial_fit`` batch so
    rejected leaves the stream as it was. Rows varying by ≲ 1e-154 (every product
    of their deviations subnormal: digits lost) are judged over all the rows, so
    the same whatever the chunking: ``fit`` raises a ``ValueError`` asking to
    multiply ``X`` by a constant, while ``partial_fit`` keeps such rows and waits,
    as for too few rows, until one row varies by more (then the axes equal
    ``fit`` on all the rows).

    Dask arrays: ``fit``/``partial_fit`` of a dask ``X`` (``languages`` numpy or
    dask with ``X``'s row chunks) compute each row block's float64 scatter on the
    same reference row, add the blocks in a tree (one ``dask.compute``) and solve
    on the client; it equals the numpy fit to rounding, and numpy and dask
    batches can be mixed in ``partial_fit``. ``transform`` of a dask array is
    lazy (``map_blocks``) and returns a dask array.

    LDA axes are discriminant directions (filters), not orthonormal: removal
    projects orthogonally onto the complement of their span, through the global
    mean (the basis is orthonormalised by a QR decomposition of the selected
    axes, then :func:`posthoc_align._apply.project_out`). This sets every LDA
    coordinate to the global mean's. When the within-language covariance is
    isotropic on the span of the mean differences, this also makes the language
    means coincide; otherwise some mean difference may remain (use
    :class:`LSAR` or :class:`LanguageEraser` for that guarantee). The ridge makes
    the problem well posed when ``S_w`` is singular (``d ≥ n − L``); the axes then
    depend on it, so reduce the dimension first in that regime.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.axes import LanguageAxes
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 4))
    >>> langs = np.repeat(["en", "fr", "de"], 100)
    >>> X[langs == "fr", 0] += 5.0
    >>> X[langs == "de", 1] += 5.0
    >>> axes = LanguageAxes().fit(X, languages=langs)
    >>> bool(np.abs(axes.sensitive_axes_[:, 2:]).max() < 0.2)
    True
    >>> LanguageAxes(mode="keep_neutral", n_neutral=2).fit_transform(X, languages=langs).shape
    (300, 2)
    """

    # transform takes no labels: never route ``languages`` to it
    __metadata_request__transform = {"languages": metadata_routing.UNUSED}

    _parameter_constraints: dict = {
        "n_sensitive": [Interval(numbers.Integral, 0, None, closed="left"), None],
        "mode": [StrOptions({"remove_sensitive", "keep_neutral"})],
        "n_neutral": [Interval(numbers.Integral, 1, None, closed="left"), None],
        "device": DEVICE_CONSTRAINT,
    }

    def __init__(
        self,
        *,
        n_sensitive: int | None = None,
        mode: str = "remove_sensitive",
        n_neutral: int | None = None,
        device: Any = "auto",
    ):
        self.n_sensitive = n_sensitive
        self.mode = mode
        self.n_neutral = n_neutral
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, languages=None):
        """Find the sensitive and neutral axes.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        y : ignored
        languages : array-like of shape (n_rows,), default=None
            None means one language: no sensitive axes, and the neutral axes
            are the PCA axes.

        Returns
        -------
        self
        """
        self._reset()
        try:
            return self._partial_fit(X, languages, streaming=False)
        except Exception:
            self._reset()  # a failed fit leaves the estimator unfitted, not half-set
            raise

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, languages=None):
        """Add a batch to the per-language scatter matrices and refit the axes.

        The statistics so far decide whether there are axes: a stream may start with
        too few rows (e.g. one row per language, so no within-language scatter yet),
        or with float64 rows varying by ≲ 1e-154 (every product of their deviations
        subnormal). Such a batch is kept, and the axes appear once later batches make
        the rows enough; until then ``transform`` raises ``NotFittedError`` saying
        why. Over any chunking the result equals ``fit`` on all the rows.
        """
        return self._partial_fit(X, languages, streaming=True)

    def _partial_fit(self, X, languages, *, streaming: bool):
        first = not hasattr(self, "_scatter")
        if first and hasattr(self, "languages_"):
            raise ValueError(
                "this LanguageAxes has no streaming statistics (it was loaded from a save "
                "that holds only the fitted axes); partial_fit cannot continue it. Call "
                "fit() on all the data instead."
            )
        if is_dask(X):
            return self._partial_fit_dask(X, languages, first, streaming)
        nx, X, dev = self._validate(X, reset=first)
        labels, codes = check_languages(languages, X.shape[0])
        s = ScatterMoments() if first else self._scatter
        n_lang = len(set(s.labels) | set(labels.tolist()))
        self._check_sizes(n_lang, X.shape[1])
        s.update(nx.to_torch(X, dev), labels, codes)
        self._scatter = s
        return self._solve_when_ready(dev, streaming)

    def _partial_fit_dask(self, X, languages, first: bool, streaming: bool):
        """One dask pass: per-block scatters on per-language shifts, tree-reduced, merged."""
        from ._dask import begin_fit, host_device, labels_numpy, language_shifts, scatter_tree

        X = begin_fit(self, X, first=first)
        labels, codes = check_languages(labels_numpy(languages, X, "languages"), X.shape[0])
        s = ScatterMoments() if first else self._scatter
        n_lang = len(set(s.labels) | set(labels.tolist()))
        self._check_sizes(n_lang, X.shape[1])
        labs = _labels_list(labels)
        shifts = language_shifts(s.moments, labs, codes, X)  # each language's own row
        part = scatter_tree(X, codes, labs, shifts, keep_underflow=True).compute()
        s.merge(part)  # known languages keep their shifts: a plain sum
        self._scatter = s
        return self._solve_when_ready(host_device(self), streaming)

    def _check_sizes(self, n_lang: int, d: int) -> None:
        k_max = min(n_lang - 1, d)
        if self.n_sensitive is not None and self.n_sensitive > k_max:
            raise ValueError(
                f"n_sensitive={self.n_sensitive} is larger than the number of LDA axes, "
                f"min(L - 1, n_features) = {k_max} for {n_lang} language(s) and {d} "
                f"feature(s); LDA over L languages has at most L - 1 discriminant axes. "
                f"Use n_sensitive <= {k_max} or None."
            )
        if self.n_neutral is not None and self.n_neutral > d:
            raise ValueError(
                f"n_neutral={self.n_neutral} is larger than n_features={d}; use "
                f"n_neutral <= {d} or None."
            )

    def _not_ready(self) -> str | None:
        """Why the statistics so far give no axes (None when they do).

        Every reason only fades as rows are added (the within-language scatter and
        the largest deviation only grow), so a stream that once had axes keeps them.
        """
        s = self._scatter
        if s.underflows:  # any number of languages: the neutral axes need S_w too
            return (
                "the within-language scatter underflows float64 (the rows vary by "
                "~1e-154 or less: every product of their deviations is subnormal)"
            )
        n_lang, n_rows = len(s.labels), int(s.counts.sum())
        if n_lang < 2:
            return None
        if n_rows <= n_lang:
            return (
                f"LanguageAxes needs more rows than languages to estimate the "
                f"within-language scatter; got {n_rows} row(s) for {n_lang} languages"
            )
        tr = float(np.trace(s.within()))
        # a non-finite trace (only from a save of an older version: ScatterMoments now
        # rejects such batches) is not "zero": _solve raises the overflow error for it
        if np.isfinite(tr) and not tr > 0:
            return (
                "the within-language scatter is zero (every language's rows are "
                "identical), so the LDA axes are undefined"
            )
        return None

    def _solve_when_ready(self, dev: torch.device, streaming: bool) -> LanguageAxes:
        """Solve for the axes, or (``partial_fit``) wait for rows that define them."""
        why = self._not_ready()
        if why is None:
            self._solve(dev)
        elif not streaming:
            self._scatter.check_underflow()  # its own advice: rescale X
            raise ValueError(f"{why}. Give at least one language two or more distinct rows.")
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "components_")

    def _check_fitted(self) -> None:
        """``check_is_fitted``, saying why when ``partial_fit`` rows give no axes yet."""
        if not hasattr(self, "components_") and hasattr(self, "_scatter"):
            why = self._not_ready()
            if why is not None:
                fix = (
                    "with rows that vary by more, or refit on X multiplied by a constant "
                    "(e.g. 1 / its largest |value|; the axes do not depend on the scale)"
                    if self._scatter.underflows
                    else "with more rows (at least one language needs two or more distinct rows)"
                )
                raise NotFittedError(
                    f"LanguageAxes has no axes yet: {why} so far. Call partial_fit {fix} "
                    "before transform."
                )
        check_is_fitted(self)

    def _solve(self, dev: torch.device) -> None:
        s = self._scatter
        order = np.argsort(np.asarray(s.labels), kind="stable")
        counts = s.counts[order]
        means = s.means()[order]
        scat = s.scatters()[order]
        mu = s.moments.global_mean()
        n, n_lang, d = float(counts.sum()), len(order), means.shape[1]
        Sw = scat.sum(0)
        tr = float(np.trace(Sw))
        if not np.isfinite(tr):
            raise ValueError(
                "the within-language scatter overflows float64 (rows of size ~1e154 or "
                "more); divide X by a constant first (the axes do not depend on it)."
            )
        self.languages_ = languages_array(s.labels)
        self.counts_ = counts.astype(np.int64)
        self.means_ = means
        self.global_mean_ = mu
        # Axes and scores are scale-free: solve on the scatters divided by a power of
        # two near their mean eigenvalue (exact), so that no square of a variance in
        # the eigenproblems or the scores under- or overflows, whatever the scale of X.
        c = float(np.ldexp(1.0, int(np.frexp(tr / d)[1]))) if tr > 0 else 1.0
        root_c = float(np.sqrt(c))
        scat = scat / c
        Sw = Sw / c

        # -- sensitive axes: LDA ------------------------------------------------
        k_max = min(n_lang - 1, d)
        if k_max > 0:
            dm = (means - mu) / root_c
            Sb = (dm * counts[:, None]).T @ dm
            if not tr > 0:  # _not_ready() keeps such statistics from coming here
                raise ValueError(
                    "the within-language scatter is zero (every language's rows are "
                    "identical), so the LDA axes are undefined; pass varied rows."
                )
            ridge = LDA_RIDGE * float(np.trace(Sw)) / d
            evals, evecs = scipy.linalg.eigh(
                Sb, Sw + ridge * np.eye(d), subset_by_index=[d - k_max, d - 1]
            )
            axes = evecs[:, ::-1].T
            axes = flip_signs(axes / np.linalg.norm(axes, axis=1, keepdims=True))
            self.sensitive_axes_ = np.ascontiguousarray(axes)
            self.sensitive_scores_ = np.ascontiguousarray(np.maximum(evals[::-1], 0.0))
        else:
            self.sensitive_axes_, self.sensitive_scores_ = np.zeros((0, d)), np.zeros(0)

        # -- neutral axes: PCA of the pooled within covariance, inside the span of
        # the language-mean differences and inside its complement, ranked ---------
        Vh, sv = language_subspace(means, dev)
        tol = max(float(np.abs(means).max()), 1e-300) * max(n_lang, d) * 1e3 * np.finfo(float).eps
        r = int((sv > tol).sum())
        Cw = torch.from_numpy(Sw / n).to(dev)
        if r:  # orthonormal bases of the complement and of the mean-difference span
            M = torch.from_numpy(np.ascontiguousarray(Vh[:r])).to(dev)
            basis = torch.linalg.svd(M, full_matrices=True)[2]
            blocks = [B for B in (basis[r:], basis[:r]) if B.shape[0]]
        else:
            blocks = [torch.eye(d, dtype=Cw.dtype, device=dev)]
        parts = []
        for B in blocks:
            lam_b, E = torch.linalg.eigh(B @ Cw @ B.T)
            parts.append((E.flip(1).T @ B, lam_b.flip(0)))  # largest variance first
        V = torch.cat([p[0] for p in parts]).T  # (d, d), columns are the axes
        lam = torch.cat([p[1] for p in parts]).clamp_min(0.0)
        # deviations are formed before projecting, so one language scores exactly 0
        pi_np = counts / n
        D_l = torch.from_numpy(scat / counts[:, None, None] - Sw / n).to(dev)
        dev_var = ((D_l @ V) * V).sum(1)  # s²_l − σ², shape (L, d)
        pi = torch.from_numpy(pi_np).to(dev)
        proj = torch.from_numpy((means - pi_np @ means) / root_c).to(dev) @ V  # m_l − m̄
        between = (pi[:, None] * proj**2).sum(0)
        spread = (pi[:, None] * dev_var**2).sum(0)
        lam_max = float(lam.max()) if d else 0.0
        zero = lam <= max(lam_max * d * torch.finfo(torch.float64).eps, 1e-300)
        safe = torch.where(zero, torch.ones_like(lam), lam)
        score = torch.where(zero, torch.full_like(lam, np.inf), between / safe + spread / safe**2)
        rank = np.argsort(score.cpu().numpy(), kind="stable")
        self.neutral_axes_ = flip_signs(np.ascontiguousarray(V.cpu().numpy()[:, rank].T))
        self.neutral_scores_ = score.cpu().numpy()[rank]

        # -- what transform uses --------------------------------------------------
        self.n_sensitive_ = k_max if self.n_sensitive is None else int(self.n_sensitive)
        self.n_neutral_ = max(d - k_max, 1) if self.n_neutral is None else int(self.n_neutral)
        if self.mode == "keep_neutral":
            self.components_ = np.ascontiguousarray(self.neutral_axes_[: self.n_neutral_])
        elif self.n_sensitive_ == 0:
            self.components_ = np.zeros((0, d))
        else:
            A = torch.from_numpy(self.sensitive_axes_[: self.n_sensitive_].T.copy()).to(dev)
            Q, _ = torch.linalg.qr(A)
            self.components_ = np.ascontiguousarray(flip_signs(Q.T.cpu().numpy()))

    def transform(self, X):
        """Remove the sensitive axes, or return the coordinates on the neutral axes.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)

        Returns
        -------
        X_new : same type as X, shape (n_rows, n_features) with
            ``mode="remove_sensitive"``, (n_rows, n_neutral_) with
            ``mode="keep_neutral"``
        """
        self._check_fitted()
        if is_dask(X):
            return transform_dask(self, X, None, n_features_out=self._n_features_out)
        nx, Xc, dev = self._validate(X, reset=False)
        T = nx.to_torch(Xc, dev)
        if self.mode == "keep_neutral":
            out = _coordinates(T, self.components_, self.global_mean_)
        else:
            out = project_out(T, self.components_, center=self.global_mean_)
        return nx.from_torch(out, like=Xc)

    def fit_transform(self, X, y=None, languages=None):
        """Fit on ``X`` with ``languages``, then transform ``X``."""
        return self.fit(X, y, languages=languages).transform(X)

    @property
    def _n_features_out(self) -> int:
        return self.components_.shape[0] if self.mode == "keep_neutral" else self.n_features_in_

    def get_feature_names_out(self, input_features=None):
        """Output feature names.

        ``"remove_sensitive"``: the input names. ``"keep_neutral"``:
        ``languageaxes0``, ``languageaxes1``, … (one per kept axis).
        """
        self._check_fitted()
        if self.mode == "keep_neutral":
            return _generate_get_feature_names_out(
                self, self._n_features_out, input_features=input_features
            )
        return super().get_feature_names_out(input_features)


def _coordinates(
    T: torch.Tensor, axes: np.ndarray, center: np.ndarray, name: str = "X"
) -> torch.Tensor:
    """``(x − center) axesᵀ`` in row blocks, shape (n, k)."""
    dev = T.device
    cdt = T.dtype if T.dtype in (torch.float32, torch.float64) else torch.float64
    A = torch.from_numpy(np.ascontiguousarray(axes)).to(dev, cdt)
    c = torch.from_numpy(center).to(dev, cdt)
    out = torch.empty((T.shape[0], A.shape[0]), dtype=cdt, device=dev)
    for sl in row_blocks(T.shape[0]):
        x = T[sl].to(cdt)
        if not bool(torch.isfinite(x).all()):
            raise_non_finite(x, name, offset=sl.start)
        torch.matmul(x - c, A.T, out=out[sl])
    return out
