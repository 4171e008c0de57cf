"""LEACE with the language as the concept (Belrose et al. 2023)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.base import _fit_context
from sklearn.utils.validation import check_is_fitted

from ._apply import affine_by_language
from ._backend import DEVICE_CONSTRAINT
from ._base import LanguageTransformerMixin, languages_array
from ._covariance import check_finite_rows
from ._dask import is_dask, transform_dask
from ._stats import row_blocks
from ._validation import check_languages, raise_non_finite

__all__ = ["LanguageEraser"]

#: Singular values of the whitened cross-covariance at or below this are treated
#: as zero (concept-erasure's default, 0.01, can leave weak language signal).
LEACE_SVD_TOL = 1e-8


def _concept_erasure() -> Any:
    try:
        import concept_erasure
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "LanguageEraser needs the concept-erasure package (EleutherAI's LEACE): "
            "pip install concept-erasure==0.2.4"
        ) from exc
    return concept_erasure


def _dummy_codes(gcodes: torch.Tensor, n_languages: int) -> torch.Tensor:
    """One-hot language labels without the last language's column, float64.

    The dropped column is minus the sum of the others (after centring), so the
    concept, and hence the eraser, is the same as with full one-hot labels; the
    coding only removes the structurally zero singular direction. One language
    gets a single all-zero column (nothing to erase).
    """
    k = max(n_languages - 1, 1)
    z = torch.zeros((gcodes.shape[0], k), dtype=torch.float64, device=gcodes.device)
    rows = torch.nonzero(gcodes < n_languages - 1).flatten()
    z[rows, gcodes[rows]] = 1.0
    return z


class LanguageEraser(LanguageTransformerMixin):
    """Erase the language from every representation with LEACE.

    Belrose et al. (2023), "LEACE: Perfect linear concept erasure in closed
    form" (NeurIPS), with the row's language ``z`` (one-hot) as the concept.
    Theorem 3.1: the least-squares-optimal affine map after which no linear
    classifier predicts ``z`` better than a constant (equivalently, every
    language has the same mean) is::

        r(x) = x − W⁺ P_{W Σ_xz} W (x − μ),   W = (Σ_xx^{1/2})⁺

    with ``Σ_xx`` the covariance of ``x``, ``Σ_xz`` its cross-covariance with
    ``z``, ``P_A`` the orthogonal projection onto the column space of ``A`` and
    ``μ`` the mean of ``x``. It is a rank-``k`` (``k ≤ L − 1``) oblique projection
    stored as ``I − proj_left_ proj_right_`` and applied as
    ``x − ((x − μ) proj_right_ᵀ) proj_left_ᵀ``; ``transform`` needs no labels.

    With ``oracle=True``, oracle LEACE (§4): when the labels are known at
    transform time too, the optimal eraser is the OLS residual
    ``r(x, z) = x − Σ_xz Σ_zz⁺ (z − E[z])``; for one-hot languages this is
    ``x − μ_l + μ``, i.e. per-language mean centring plus the global mean.

    Parameters
    ----------
    oracle : bool, default=False
        Use oracle LEACE; ``transform`` then needs ``languages=``.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the statistics and the closed form are computed. ``"auto"``: a
        tensor's own device; numpy input on CUDA when available, else the CPU.

    Attributes
    ----------
    languages_ : ndarray of shape (n_languages,)
        Sorted languages seen so far.
    counts_ : ndarray of shape (n_languages,)
        Rows seen per language.
    means_ : ndarray of shape (n_languages, n_features)
        Per-language means (float64).
    global_mean_ : ndarray of shape (n_features,)
        Mean of all fitted rows.
    covariance_ : ndarray of shape (n_features, n_features)
        Covariance of all fitted rows (ddof=0). Only when ``oracle=False``.
    proj_left_ : ndarray of shape (n_features, k)
        Left factor of the erasure (``oracle=False``); ``k ≤ n_languages − 1``.
    proj_right_ : ndarray of shape (k, n_features)
        Right factor of the erasure (``oracle=False``).
    bias_ : ndarray of shape (n_features,)
        The point the projection is taken through, ``μ`` (``oracle=False``).
    coef_ : ndarray of shape (n_features, n_languages − 1)
        ``Σ_xz Σ_zz⁺`` of oracle LEACE (``oracle=True``).
    mean_z_ : ndarray of shape (n_languages − 1,)
        ``E[z]`` of oracle LEACE (``oracle=True``).
    n_samples_seen_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only when fitted on a DataFrame with string column names.

    See Also
    --------
    LSAR : orthogonal projection removing the span of the language means.
    LanguageMeanCentering : oracle LEACE minus the global mean.

    Notes
    -----
    Statistics are streamed by ``concept_erasure.LeaceFitter`` (``OracleFitter``
    when ``oracle=True``) in float64 on ``device``, rows fed in blocks of 4096
    minus a float64 reference row (the first row fitted; Chan, Golub & LeVeque
    1983, as in :mod:`posthoc_align._stats`), so that a large common offset costs
    no precision in the covariances; the closed form is the fitter's ``eraser``.
    Fitter settings, chosen to match the paper exactly: ``shrinkage=False``
    (sample covariance with Bessel's correction, pseudo-inverse),
    ``constrain_cov_trace=False`` (that option mixes in an orthogonal projection
    and breaks the guarantee), and
    ``svd_tol=1e-8`` instead of 0.01 for the whitened cross-covariance; the
    oracle's ``Σ_zz`` is inverted exactly (tolerance below its smallest possible
    eigenvalue, ``1 / (2 (L − 1) n)``). Languages are coded one-hot without the
    last language's column (same concept, same eraser; no structurally zero
    direction). A language first seen in a later ``partial_fit`` batch widens the
    concept (every earlier row has a zero in its column, so its moments so far are
    exactly zero): streaming a language-sorted cache equals one fit.

    The fitter's whole state is kept as public arrays (``counts_``, ``means_``,
    ``global_mean_``, ``covariance_``, ``n_samples_seen_``), so ``partial_fit``
    continues after a joblib round trip and after :func:`posthoc_align.load`
    (the fitter is rebuilt from them; pickles hold no torch tensors).

    Dask arrays: ``fit``/``partial_fit`` of a dask ``X`` (``languages`` numpy or
    dask with ``X``'s row chunks) compute every row block's float64 per-language
    sums and d×d scatter on one shared reference row, add them in a tree (one
    ``dask.compute``), merge them into the state above on the client and solve
    there; this equals the numpy fit to rounding, and dask and numpy batches mix
    in ``partial_fit``. ``transform`` of a dask array is lazy (``map_blocks``)
    and returns a dask array. Memory:
    one d×d float64 matrix (``oracle=False``). With one language (``languages``
    omitted) there is nothing to erase and ``transform`` is the identity.

    Examples
    --------
    >>> import numpy as np
    >>> from posthoc_align.erasure import LanguageEraser
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(300, 4))
    >>> langs = np.repeat(["en", "fr", "de"], 100)
    >>> X[langs == "fr", 0] += 3.0
    >>> Z = LanguageEraser().fit(X, languages=langs).transform(X)
    >>> means = [Z[langs == lang].mean(0) for lang in ("en", "fr", "de")]
    >>> bool(np.allclose(means[0], means[1]) and np.allclose(means[0], means[2]))
    True
    """

    _parameter_constraints: dict = {
        "oracle": ["boolean"],
        "device": DEVICE_CONSTRAINT,
    }

    def __init__(self, *, oracle: bool = False, device: Any = "auto"):
        self.oracle = oracle
        self.device = device

    def __getstate__(self) -> dict:
        # the fitter (torch tensors, maybe on a GPU) is rebuilt from public arrays
        state = super().__getstate__()
        state.pop("_fitter", None)
        state.pop("_fitter_shift", None)
        return state

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, languages=None):
        """Fit the eraser of the language concept.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        y : ignored
        languages : array-like of shape (n_rows,), default=None
            Language of each row; None means one language (nothing to erase).

        Returns
        -------
        self
        """
        self._reset()
        return self._partial_fit(X, languages)

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, languages=None):
        """Add a batch to the streamed statistics and recompute the eraser.

        Later batches may hold any subset of the languages seen so far and new
        ones (e.g. a cache streamed in language-major order): a new language widens
        the one-hot concept, and the result equals one fit over all the rows.
        """
        return self._partial_fit(X, languages)

    def _partial_fit(self, X, languages):
        """Add a batch; all or nothing (a rejected batch leaves the state as it was,
        including the languages a batch would have added)."""
        saved = dict(self.__dict__)
        try:
            return self._add_batch(X, languages)
        except Exception:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def _add_batch(self, X, languages):
        ce = _concept_erasure()
        first = not hasattr(self, "n_samples_seen_")
        if is_dask(X):
            return self._partial_fit_dask(ce, X, languages, first)
        nx, X, dev = self._validate(X, reset=first)
        labels, codes = check_languages(languages, X.shape[0])
        langs, gcodes = self._language_codes(labels, codes, first)
        n_lang = len(langs)
        fitter = self._get_fitter(ce, X.shape[1], dev, n_lang)
        fdev = fitter.mean_x.device
        T = nx.to_torch(X, fdev)
        check_finite_rows(T)  # before the fitter is touched: a bad batch changes nothing
        if self._fitter_shift is None:  # a fresh fitter: the first row is the reference
            self._fitter_shift = T[0].to(torch.float64, copy=True)
        shift = self._fitter_shift
        g = torch.from_numpy(np.ascontiguousarray(gcodes, dtype=np.int64)).to(fdev)
        with torch.no_grad():
            for sl in row_blocks(T.shape[0]):
                # rows shifted by the reference row (float64): the fitter's Welford
                # update then sees values of the spread's size, not of the mean's
                # (float32 − float64 promotes: one pass, exact in float64)
                fitter.update(T[sl] - shift, _dummy_codes(g[sl], n_lang))
        counts = np.bincount(gcodes, minlength=n_lang).astype(np.int64)
        self.languages_ = langs
        self.counts_ = counts if first else self.counts_ + counts
        self._solve()
        return self

    def _language_codes(self, labels: np.ndarray, codes: np.ndarray, first: bool):
        """``(languages, row codes into them)``; the first call fixes the languages."""
        if first:
            self.__dict__.pop("_fitter", None)
            return labels, codes
        gcodes, unknown = self._fitted_codes(labels, codes, policy="ignore")
        if unknown:
            self._add_languages(unknown)
            gcodes, _ = self._fitted_codes(labels, codes, policy="ignore")
        return self.languages_, gcodes

    def _add_languages(self, new: list) -> None:
        """Widen the one-hot concept by languages first seen in a later batch.

        Every earlier row has ``z = 0`` in a new language's column, so the new
        column's moments are exactly zero so far: the state gains a language with
        count 0 and the fitter is rebuilt from it (the column dropped from the
        one-hot code moves to the new last language, the same concept). The result
        equals one fit over all the rows.
        """
        old = self.languages_.tolist()
        langs = languages_array(old + list(new))
        pos = np.array([langs.tolist().index(lab) for lab in old], dtype=np.int64)
        counts = np.zeros(len(langs), dtype=np.int64)
        counts[pos] = self.counts_
        means = np.zeros((len(langs), self.means_.shape[1]))
        means[pos] = self.means_
        self.languages_, self.counts_, self.means_ = langs, counts, means
        self.__dict__.pop("_fitter", None)  # rebuilt from the widened state

    def _partial_fit_dask(self, ce: Any, X, languages, first: bool):
        """One dask pass for the fitter's moments, combined with the state so far.

        Per block, float64 per-language sums and (``oracle=False``) the d×d scatter
        of all rows, on one shared reference row, added in a tree; the batch's
        counts, means and covariance are then merged into the public state
        (Chan et al.'s pairwise update) and the fitter is rebuilt from it.
        """
        import dask

        from ._dask import (
            begin_fit,
            host_device,
            labels_numpy,
            moments_tree,
            scatter_tree,
            shared_shifts,
        )
        from ._stats import _labels_list

        X = begin_fit(self, X, first=first)
        n, d = X.shape
        labels, codes = check_languages(labels_numpy(languages, X, "languages"), n)
        langs, gcodes = self._language_codes(labels, codes, first)
        labs = _labels_list(langs)
        shift = shared_shifts(None, len(labs), X)
        todo = {"moments": moments_tree(X, gcodes, labs, shift, False)}
        if not self.oracle:
            todo["scatter"] = scatter_tree(X, np.zeros(n, dtype=np.int64), ["all"], shift[:1])
        (res,) = dask.compute(todo)
        m = res["moments"]
        cnt = m.counts
        n_b = float(cnt.sum())
        sums = m.sums.sum(0)
        mean_b = shift[0] + sums / n_b
        with np.errstate(invalid="ignore", divide="ignore"):
            means_b = np.where(cnt[:, None] > 0, m.means(), 0.0)
        if not self.oracle:
            cov_b = res["scatter"].scatters()[0]  # Σ (x − mean_b)(x − mean_b)ᵀ
        if first:
            n_tot, counts, means, mean = n_b, cnt, means_b, mean_b
            if not self.oracle:
                scat = cov_b
        else:
            n_a = float(self.n_samples_seen_)
            n_tot = n_a + n_b
            counts = self.counts_ + cnt
            means = (self.means_ * self.counts_[:, None] + means_b * cnt[:, None]) / counts[:, None]
            mean = (n_a * self.global_mean_ + n_b * mean_b) / n_tot
            if not self.oracle:
                delta = mean_b - self.global_mean_
                scat = self.covariance_ * n_a + cov_b + (n_a * n_b / n_tot) * np.outer(delta, delta)
        self.languages_ = langs
        self.counts_ = counts.astype(np.int64)
        self.n_samples_seen_ = int(n_tot)
        self.means_ = means
        self.global_mean_ = mean
        if not self.oracle:
            self.covariance_ = (scat + scat.T) / (2.0 * n_tot)
        self.__dict__.pop("_fitter", None)
        self._get_fitter(ce, d, host_device(self), len(labs))  # rebuilt from the state above
        self._solve()
        return self

    def _get_fitter(self, ce: Any, d: int, dev: torch.device, n_lang: int) -> Any:
        """The streaming fitter: existing, new, or rebuilt from the public state.

        The fitter sees rows minus a float64 reference row, ``_fitter_shift``
        (Chan, Golub & LeVeque's shifted data): the first row of a fresh fit (set by
        the first batch; None until then), or ``global_mean_`` when the fitter is
        rebuilt (its shifted mean is then exactly 0). Its ``mean_x`` is therefore
        ``global_mean_ − shift``; every other moment is shift-invariant.
        """
        if hasattr(self, "_fitter"):
            return self._fitter
        k = max(n_lang - 1, 1)
        kw = {"device": dev, "dtype": torch.float64, "shrinkage": False}
        if self.oracle:
            f = ce.OracleFitter(d, k, svd_tol=LEACE_SVD_TOL, **kw)
        else:
            f = ce.LeaceFitter(
                d, k, "leace", affine=True, constrain_cov_trace=False, svd_tol=LEACE_SVD_TOL, **kw
            )
        if hasattr(self, "n_samples_seen_"):  # resume: rebuild the unnormalised moments
            n = self.n_samples_seen_
            c = self.counts_[: n_lang - 1].astype(np.float64)
            xz = np.zeros((d, k))
            xz[:, : n_lang - 1] = ((self.means_[: n_lang - 1] - self.global_mean_) * c[:, None]).T
            mz = np.zeros(k)
            mz[: n_lang - 1] = c / n

            def put(a):  # a copy: the fitter updates its tensors in place
                return torch.tensor(a, dtype=torch.float64, device=dev)

            f.n = torch.tensor(n, device=dev)
            f.mean_x = torch.zeros(d, dtype=torch.float64, device=dev)
            f.mean_z = put(mz)
            f.sigma_xz_ = put(xz)
            if self.oracle:
                zz = np.zeros((k, k))
                zz[: n_lang - 1, : n_lang - 1] = np.diag(c) - np.outer(c, c) / n
                f.sigma_zz_ = put(zz)
            else:
                f.sigma_xx_ = put(self.covariance_ * n)
            self._fitter_shift = put(self.global_mean_)
        else:
            self._fitter_shift = None
        self._fitter = f
        return f

    def _solve(self) -> None:
        f = self._fitter
        n_lang = len(self.languages_)
        n = int(f.n)
        # copies: on the CPU .numpy() would share memory with tensors updated in place;
        # the fitter's mean is about the reference row
        mean = (f.mean_x + self._fitter_shift).cpu().numpy()
        xz = f.sigma_xz_.cpu().numpy()[:, : n_lang - 1].copy()
        means = np.empty((n_lang, mean.shape[0]))
        c = self.counts_.astype(np.float64)
        means[: n_lang - 1] = mean + (xz / c[: n_lang - 1]).T
        # Σ_l n_l (μ_l − μ) = 0 gives the last (dropped) language's mean
        means[n_lang - 1] = mean - xz.sum(1) / c[n_lang - 1]
        self.n_samples_seen_ = n
        self.global_mean_ = mean
        self.means_ = means
        d = mean.shape[0]
        if self.oracle:
            if n_lang == 1:
                self.coef_, self.mean_z_ = np.zeros((d, 0)), np.zeros(0)
                return
            f.svd_tol = 1.0 / (4.0 * (n_lang - 1) * n)  # below Σ_zz's smallest eigenvalue
            eraser = f.eraser
            self.coef_ = eraser.coef.cpu().numpy().copy()
            self.mean_z_ = eraser.mean_z.cpu().numpy().copy()
            return
        S = f.sigma_xx_.cpu().numpy()
        self.covariance_ = (S + S.T) / (2.0 * n)
        self.bias_ = mean
        if n_lang == 1:
            self.proj_left_, self.proj_right_ = np.zeros((d, 0)), np.zeros((0, d))
            return
        eraser = f.eraser
        left = eraser.proj_left.cpu().numpy()
        right = eraser.proj_right.cpu().numpy()
        keep = (left != 0).any(0) | (right != 0).any(1)  # columns zeroed by svd_tol
        self.proj_left_ = np.ascontiguousarray(left[:, keep])
        self.proj_right_ = np.ascontiguousarray(right[keep])

    def transform(self, X, languages=None):
        """Erase the language from every row.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        languages : array-like of shape (n_rows,), default=None
            Needed with ``oracle=True`` (each row's language, one of
            ``languages_``); ignored otherwise.

        Returns
        -------
        X_new : same type as X, shape (n_rows, n_features)
        """
        check_is_fitted(self)
        if is_dask(X):
            return transform_dask(self, X, languages if self.oracle else None)
        nx, Xc, dev = self._validate(X, reset=False)
        T = nx.to_torch(Xc, dev)
        if self.oracle:
            labels, codes = check_languages(languages, Xc.shape[0])
            gcodes, _ = self._fitted_codes(labels, codes)
            n_lang = len(self.languages_)
            z = np.eye(n_lang, max(n_lang - 1, 0))  # dummy code of each language
            offsets = (z - self.mean_z_) @ self.coef_.T  # Σ_xz Σ_zz⁺ (z_l − E z)
            out = affine_by_language(T, gcodes, shift=np.ascontiguousarray(offsets))
        else:
            out = _erase(T, self.proj_left_, self.proj_right_, self.bias_)
        return nx.from_torch(out, like=Xc)


def _erase(
    T: torch.Tensor, left: np.ndarray, right: np.ndarray, bias: np.ndarray, name: str = "X"
) -> torch.Tensor:
    """``x − ((x − bias) rightᵀ) leftᵀ`` in row blocks with concept_erasure's LeaceEraser."""
    ce = _concept_erasure()
    dev = T.device
    cdt = T.dtype if T.dtype in (torch.float32, torch.float64) else torch.float64

    def put(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev, cdt)

    eraser = ce.LeaceEraser(put(left), put(right), put(bias))
    out = torch.empty(T.shape, dtype=cdt, device=dev)
    with torch.no_grad():
        for sl in row_blocks(T.shape[0]):
            ob = out[sl]
            ob.copy_(eraser(T[sl].to(cdt)))
            if not bool(torch.isfinite(ob.sum())):
                raise_non_finite(T[sl], name, offset=sl.start)
    return out
