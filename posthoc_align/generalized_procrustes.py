"""Generalised Procrustes analysis: every language into one shared space, no pivot."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Hashable
from typing import Any

import numpy as np
import scipy.sparse
import torch
from sklearn.base import _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from ._backend import DEVICE_CONSTRAINT
from ._base import LanguageTransformerMixin, languages_array
from ._covariance import check_finite_rows
from ._dask import is_dask, transform_dask
from ._stats import LanguageMoments, _labels_list, _RowStore, row_blocks
from ._validation import check_languages, check_pair_ids
from .procrustes import orthogonal_map, rotate_by_language

__all__ = ["GeneralizedProcrustes"]


class GeneralizedProcrustes(LanguageTransformerMixin):
    """Rotate every language into a shared consensus space (no pivot language).

    Generalised Procrustes analysis (Gower 1975, "Generalized Procrustes
    analysis", Psychometrika 40) as used for multilingual embedding spaces by
    Kementchedjhieva et al. (2018), "Generalizing Procrustes Analysis for Better
    Bilingual Dictionary Induction" (CoNLL), §3. With ``y_{l,p}`` the (centred)
    row of language ``l`` with pair id ``p``, minimise over orthogonal ``W_l``::

        Σ_p Σ_{l ∈ p} ‖y_{l,p} W_l − c_p‖²,    c_p = (1/m_p) Σ_{k ∈ p} y_{k,p} W_k

    (``m_p`` the number of languages holding ``p``) by alternating: compute the
    consensus ``c`` from the current maps, then give every language at once its
    orthogonal Procrustes map to the consensus, ``W_l = U Vᵀ`` with
    ``U Σ Vᵀ = Σ_p y_{l,p}ᵀ c_p`` (Schönemann 1966).

    Start: sequential Procrustes (Gower 1975, §3; Ten Berge 1977): the language
    with the most paired rows keeps ``I``, then each language in turn (the one
    sharing the most pair ids with those already placed) gets its Procrustes map
    onto their partial consensus ``Σ_{k placed} M_lk W_k``. Starting every map at
    ``I`` instead cannot change the sign of any ``det(W_l W_kᵀ)``, so two languages
    related by a reflection stay in a wrong local minimum (twice the optimal
    objective); the sequential start has the right orientation, and with two
    languages it is already the optimum, ``W_a W_bᵀ`` = Procrustes of ``a`` onto
    ``b``. Frame: GPA fixes the maps only up to one global rotation ``R``; at the
    end every map is turned by the ``R`` that maximises ``Σ_l tr(W_l R)`` (polar
    factor of ``(Σ_l W_l)ᵀ``), the common frame closest to the languages' own
    frames (the sign of a null direction of ``Σ_l W_l``, e.g. for two languages
    related by a reflection, is fixed by the data: see ``_common_frame``). So no language is privileged and the result does not depend on the
    order of languages or rows, nor on the start (up to rounding, where GPA
    reaches the same optimum). Where the languages' own frames are far apart
    (``Σ_l W_l`` nearly singular, e.g. unrelated random rotations) that closest
    frame is ill-determined: a small change of the data may turn the whole output
    by one global rotation, which leaves every distance, retrieval and alignment
    score unchanged. ``transform`` maps ``x ↦ (x − μ_l) W_l``.

    Parameters
    ----------
    pivot : None, default=None
        Always None: no language is privileged (the pivot-free counterpart of
        :class:`ProcrustesAligner`'s ``pivot``; accepted so code can switch between the
        two by the ``pivot`` argument alone).
    n_iter : int, default=20
        Maximum number of alternating updates.
    tol : float, default=1e-8
        Stop when one update lowers the objective (mean squared distance of a
        paired row to its consensus) by at most ``tol`` times the mean squared
        norm of the centred paired rows. Convergence is linear, so when it is
        slow the maps can still be further from the fixpoint than ``sqrt(tol)``
        (1e-3 at ``tol=1e-8`` on hard data). ``tol=0`` iterates to the fixpoint:
        until an update moves no language's aligned paired rows by more than
        :data:`FIXPOINT_CHANGE` relative (the simultaneous updates are not
        monotone at the last digits, so a rise of the objective alone does not
        stop it), or ``n_iter``.
    center : bool, default=True
        Centre every language by its own mean over all its fitted rows before
        fitting and at transform; with False, ``x ↦ x W_l``.
    device : {"auto", "cpu", "cuda"} or torch.device, default="auto"
        Where the iterations run.

    Attributes
    ----------
    languages_ : ndarray of shape (n_languages,)
    means_ : ndarray of shape (n_languages, n_features)
        Per-language means over all fitted rows.
    rotations_ : ndarray of shape (n_languages, n_features, n_features)
        ``W_l``, applied as ``(x − μ_l) @ W_l``.
    n_pairs_ : ndarray of shape (n_languages,)
        Rows of each language that entered the fit (pair id shared with at
        least one other language).
    objective_ : ndarray of shape (n_iter_ + 1,)
        Objective at the sequential Procrustes start and after each update.
    n_iter_ : int
        Updates performed.
    converged_ : bool
    unpaired_languages_ : list
        Languages sharing no pair id with another language yet (partial_fit);
        they cannot be transformed.
    n_features_in_ : int

    See Also
    --------
    ProcrustesAligner : maps every language into one pivot language.

    Notes
    -----
    Pair ids: rows sharing a ``pair_id`` in different languages are
    translations; each id may occur at most once per language. An id may be
    missing in some languages: its consensus is the mean over the languages that
    have it, and ids held by a single language do not enter the fit (they still
    count for the language mean). Every language must share ids with another,
    and the languages must be connected through shared ids (otherwise the groups
    would be aligned independently, in unrelated frames): both are errors.

    Centring (as in :class:`ProcrustesAligner`) uses each language's mean over
    all its fitted rows. When languages hold different sentences (missing pair
    ids), these means also differ by content, a translation that rotations
    cannot undo: pair the same sentences, or centre beforehand and use
    ``center=False``.

    Memory: unlike the pivot aligner, the iterations need the rows themselves.
    Every fitted row is kept on the host in float64 until the end of ``fit``
    (``partial_fit`` keeps them all, since a later batch may complete a pair),
    and the paired rows are copied to ``device`` for the iterations, which cost
    O(n_paired · d²) each; no n×n matrix is formed. ``fit`` drops the rows at its
    end, so ``partial_fit`` cannot continue a ``fit`` (or a loaded estimator);
    each ``partial_fit`` reruns the whole GPA from its start (so it equals
    ``fit`` on the data so far). Orthogonal maps only: no scaling. Fewer paired
    rows than dimensions leave a map non-unique (a warning).

    Dask arrays: ``fit``/``partial_fit`` of a dask ``X`` (``languages`` and
    ``pair_ids`` numpy, or dask with ``X``'s row chunks) keep no rows. Every
    step of GPA is linear in the blocks ``M_lk = Σ_p y_{l,p}ᵀ y_{k,p} / m_p``
    (``Σ_p y_{l,p}ᵀ c_p = Σ_k M_lk W_k``; objective ``Σ‖y‖² − Σ_lk
    tr(W_lᵀ M_lk W_k)``), so one ``dask.compute`` gathers the paired rows by
    pair id into a ``P × (L·d)`` dask matrix and reduces, in a tree, its
    weighted Gram matrix (``(L·d)²`` float64 on the client, e.g. 10 languages
    at d = 768: 470 MB) with the language means and sums for the centring; the
    iterations then run on the client at ``O(L²d³)`` each, with the same
    updates and stopping rule (equal to the numpy fit to rounding). Each dask
    ``partial_fit`` recomputes these statistics over every dask batch so far
    (the weights ``1/m_p`` change as pairs complete); numpy and dask batches
    cannot be mixed. ``transform`` of a dask array is lazy (``map_blocks``).

    Examples
    --------
    >>> import numpy as np
    >>> from scipy.stats import ortho_group
    >>> from posthoc_align.generalized_procrustes import GeneralizedProcrustes
    >>> rng = np.random.default_rng(0)
    >>> S = rng.normal(size=(50, 4))
    >>> X = np.vstack([S @ ortho_group.rvs(4, random_state=k) for k in range(3)])
    >>> langs = np.repeat(["de", "en", "fr"], 50)
    >>> ids = np.tile(np.arange(50), 3)
    >>> Z = GeneralizedProcrustes().fit_transform(X, languages=langs, pair_ids=ids)
    >>> bool(np.allclose(Z[:50], Z[50:100]) and np.allclose(Z[:50], Z[100:]))
    True
    """

    __metadata_request__fit = {"languages": True, "pair_ids": True}
    __metadata_request__partial_fit = {"languages": True, "pair_ids": True}

    _state_attrs = (*LanguageTransformerMixin._state_attrs, "_dask_parts")

    _parameter_constraints: dict = {
        "n_iter": [Interval(numbers.Integral, 1, None, closed="left")],
        "tol": [Interval(numbers.Real, 0, None, closed="left")],
        "center": ["boolean"],
        "device": DEVICE_CONSTRAINT,
        "pivot": [None],
    }

    def __init__(
        self,
        *,
        pivot: None = None,
        n_iter: int = 20,
        tol: float = 1e-8,
        center: bool = True,
        device: Any = "auto",
    ):
        self.pivot = pivot
        self.n_iter = n_iter
        self.tol = tol
        self.center = center
        self.device = device

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, languages=None, pair_ids=None):
        """Fit one orthogonal map per language by generalised Procrustes analysis.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        y : ignored
        languages : array-like of shape (n_rows,)
            Language of each row (at least two languages).
        pair_ids : array-like of shape (n_rows,)
            Rows sharing an id are translations.

        Returns
        -------
        self
        """
        self._reset()
        self._partial_fit(X, languages, pair_ids)
        self._check_complete()
        self._rows = None  # fit is final: release the kept rows
        self._dask_parts = None  # (and the references to the dask arrays)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None, languages=None, pair_ids=None):
        """Add a batch of rows (kept in memory) and rerun GPA on all rows so far."""
        return self._partial_fit(X, languages, pair_ids)

    def _partial_fit(self, X, languages, pair_ids):
        first = not hasattr(self, "_moments")
        try:
            return self._add_batch(X, languages, pair_ids, first)
        except Exception:
            if first:  # a rejected first batch leaves the estimator unfitted, not half-set
                self._reset()
            raise

    def _add_batch(self, X, languages, pair_ids, first: bool):
        parts = getattr(self, "_dask_parts", None)
        if not first and getattr(self, "_rows", None) is None and parts is None:
            raise RuntimeError(
                "GeneralizedProcrustes keeps no rows after fit() (or after loading), and GPA "
                "needs them all; to stream batches, start with partial_fit() instead of fit()."
            )
        if not first and is_dask(X) != (parts is not None):
            raise ValueError(
                "GeneralizedProcrustes cannot mix numpy/tensor batches and dask arrays in "
                "partial_fit (GPA reruns on every row so far, which are kept either as rows or "
                "as dask arrays); convert the batches to one kind, e.g. with "
                "dask.array.from_array."
            )
        if is_dask(X):
            return self._partial_fit_dask(X, languages, pair_ids, first)
        nx, X, dev = self._validate(X, reset=first)
        if languages is None:
            raise ValueError(
                "GeneralizedProcrustes needs languages= (one label per row) to know which "
                "rows share a rotation."
            )
        labels, codes = check_languages(languages, X.shape[0])
        pids = check_pair_ids(pair_ids, X.shape[0], required_by="GeneralizedProcrustes")
        T = nx.to_torch(X, dev)
        check_finite_rows(T)
        rows: dict[Hashable, _RowStore] = {} if first else self._rows
        staged = _stage_rows(T, labels, codes, pids, rows)  # validates ids before any change
        if first:
            self._moments = LanguageMoments()
        self._moments.update(T, labels, codes)
        for lab, (R, ids) in staged.items():
            rows.setdefault(lab, _RowStore()).add(R, ids)
        self._rows = rows
        self._solve(dev)
        return self

    def _solve(self, dev: torch.device) -> None:
        m = self._moments
        order = np.argsort(np.asarray(m.labels), kind="stable")
        self.languages_ = languages_array(m.labels)
        self.means_ = m.means()[order]
        langs = self.languages_.tolist()
        n_lang, d = len(langs), self.means_.shape[1]
        Y, lang_of, pair_of, n_pair_ids = _paired_rows(self._rows, langs)
        self.n_pairs_ = np.bincount(lang_of, minlength=n_lang).astype(np.int64)
        self.unpaired_languages_ = [
            lab for lab, k in zip(langs, self.n_pairs_, strict=True) if k == 0
        ]
        rot = np.tile(np.eye(d), (n_lang, 1, 1))
        if Y.shape[0] == 0:
            self.rotations_, self.objective_ = rot, np.zeros(0)
            self.n_iter_, self.converged_ = 0, False
            return
        Yt = torch.from_numpy(Y).to(dev)
        if self.center:
            Yt -= torch.from_numpy(self.means_).to(dev)[torch.from_numpy(lang_of).to(dev)]
        # the maps are scale-free: bring the rows to unit scale by an exact power of two,
        # so that products neither overflow nor lose digits to subnormals (rows of 1e-200
        # or 1e160 give the maps of rows of 1); the objective is scaled back
        top = float(torch.linalg.vector_norm(Yt, float("inf")))
        e = math.frexp(top)[1] if 0.0 < top < math.inf else 0
        if e:
            Yt = torch.ldexp(Yt, torch.tensor(-e, device=dev))
        W, history, converged = _gpa(Yt, pair_of, lang_of, n_pair_ids, self.n_iter, self.tol)
        for i in np.flatnonzero(self.n_pairs_):
            rot[i] = W[i]
        self.rotations_ = rot
        self.objective_ = np.ldexp(np.asarray(history), 2 * e)
        self.n_iter_ = len(history) - 1
        self.converged_ = converged

    def _partial_fit_dask(self, X, languages, pair_ids, first: bool):
        """GPA from d×d statistics of one dask pass over every dask batch so far.

        See Notes: the iterations need only the per-language means and the
        weighted cross-products ``M_lk`` of paired rows, all computed in one
        ``dask.compute``; the rows never reach the client.
        """
        from ._dask import begin_fit, host_device, labels_numpy

        X = begin_fit(self, X, first=first)
        n = X.shape[0]
        if languages is None:
            raise ValueError(
                "GeneralizedProcrustes needs languages= (one label per row) to know which "
                "rows share a rotation."
            )
        labels, codes = check_languages(labels_numpy(languages, X, "languages"), n)
        pids = check_pair_ids(
            labels_numpy(pair_ids, X, "pair_ids"), n, required_by="GeneralizedProcrustes"
        )
        parts = [*([] if first else self._dask_parts), (X, labels[codes], pids)]
        Xall, langs_all, pids_all = _concat_parts(parts)
        stats = _gpa_stats_dask(Xall, langs_all, pids_all, self.center)  # validates ids first
        self._moments = stats["moments"]
        self._dask_parts = parts
        self._solve_stats(stats, host_device(self))
        return self

    def _solve_stats(self, stats: dict[str, Any], dev: torch.device) -> None:
        """``_solve`` from the statistics of :func:`_gpa_stats_dask`."""
        labels = stats["labels"]
        self.languages_ = languages_array(labels)
        self.means_ = stats["moments"].means()  # labels are sorted: languages_ order
        n_lang, d = len(labels), self.means_.shape[1]
        self.n_pairs_ = stats["n_pairs"].astype(np.int64)
        self.unpaired_languages_ = [
            lab for lab, k in zip(labels, self.n_pairs_, strict=True) if k == 0
        ]
        rot = np.tile(np.eye(d), (n_lang, 1, 1))
        if stats["M"] is None:
            self.rotations_, self.objective_ = rot, np.zeros(0)
            self.n_iter_, self.converged_ = 0, False
            return
        present = np.flatnonzero(self.n_pairs_)
        W, history, converged = _gpa_moments(
            stats["M"], stats["total_sq"], int(self.n_pairs_.sum()), present,
            stats["shared"], self.n_pairs_, d,
            self.n_iter, self.tol, dev,
        )  # fmt: skip
        self.rotations_ = W
        # the statistics are those of the rows times 2⁻ᵉ (see _gpa_stats_dask)
        self.objective_ = np.ldexp(np.asarray(history), 2 * stats.get("exponent", 0))
        self.n_iter_ = len(history) - 1
        self.converged_ = converged

    def _check_complete(self) -> None:
        if len(self.languages_) < 2:
            raise ValueError(
                f"GeneralizedProcrustes needs at least two languages; got "
                f"{self.languages_.tolist()}."
            )
        if self.unpaired_languages_:
            raise ValueError(
                f"language(s) {self.unpaired_languages_} share no pair_id with any other "
                "language, so they cannot be aligned. Give translations the same pair_id, "
                "or drop those languages."
            )
        if getattr(self, "_dask_parts", None) is not None:
            ids_by_lang = _ids_by_language(*_concat_parts(self._dask_parts)[1:])
        else:
            ids_by_lang = {lab: store.pos for lab, store in self._rows.items()}
        groups = _connected_groups(ids_by_lang, self.languages_.tolist())
        if len(groups) > 1:
            raise ValueError(
                f"the languages fall into {len(groups)} groups that share no pair_id with "
                f"each other: {groups}. GPA would align each group in its own unrelated "
                "frame; add translations linking the groups, or fit each group separately."
            )
        if not self.converged_:
            warnings.warn(
                f"GeneralizedProcrustes did not converge in n_iter={self.n_iter} updates "
                + (
                    f"(last objective decrease above tol={self.tol}); "
                    if self.tol > 0
                    else "(the maps still changed and the objective still fell); "
                )
                + "increase n_iter.",
                ConvergenceWarning,
                stacklevel=4,
            )
        d = self.n_features_in_
        few = {
            lab: int(k)
            for lab, k in zip(self.languages_.tolist(), self.n_pairs_, strict=True)
            if k < d
        }
        if few:
            warnings.warn(
                f"fewer paired rows than dimensions ({d}) for {few}: the orthogonal maps "
                "are not unique (fixed only on the span of the pairs). Use more pairs or "
                "reduce the dimension first.",
                UserWarning,
                stacklevel=4,
            )

    def transform(self, X, languages=None):
        """Map each row into the shared space, ``(x − μ_l) W_l``.

        Parameters
        ----------
        X : array-like or tensor of shape (n_rows, n_features)
        languages : array-like of shape (n_rows,)

        Returns
        -------
        X_new : same type as X
        """
        check_is_fitted(self)
        if is_dask(X):
            return transform_dask(self, X, languages)
        n_pairs = dict(zip(self.languages_.tolist(), self.n_pairs_, strict=True))
        return rotate_by_language(
            self,
            X,
            languages,
            skip=None,
            not_ready=lambda lab: n_pairs[lab] == 0,
            not_ready_message="share no pair_id with another language yet; partial_fit "
            "their translations before transforming them.",
        )

    def fit_transform(self, X, y=None, languages=None, pair_ids=None):
        """Fit, then transform ``X`` (languages reach both steps)."""
        return self.fit(X, y, languages=languages, pair_ids=pair_ids).transform(
            X, languages=languages
        )

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        return tags


def _stage_rows(
    T: torch.Tensor,
    labels: np.ndarray,
    codes: np.ndarray,
    pids: np.ndarray,
    rows: dict[Hashable, _RowStore],
) -> dict[Hashable, tuple[torch.Tensor, list[Hashable]]]:
    """Per language: (float64 host rows, pair ids); duplicate ids are an error."""
    lab_list = _labels_list(labels)
    pid_py = pids.tolist()
    out = {}
    for c, lab in enumerate(lab_list):
        idx = np.flatnonzero(codes == c)
        if idx.size == 0:
            continue
        ids = [pid_py[i] for i in idx]
        seen = rows[lab].pos if lab in rows else {}
        batch: set[Hashable] = set()
        for i in ids:
            if i in seen or i in batch:
                raise ValueError(
                    f"pair_id {i!r} occurs more than once in language {lab!r}; within one "
                    "language each pair_id must be unique (rows sharing a pair_id are "
                    "translations in different languages)."
                )
            batch.add(i)
        R = T[torch.from_numpy(idx).to(T.device)].detach().to("cpu", torch.float64)
        out[lab] = (R, ids)
    return out


def _paired_rows(
    rows: dict[Hashable, _RowStore], langs: list[Hashable]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows whose pair id occurs in ≥ 2 languages, grouped by language.

    Returns ``(Y, lang_of, pair_of, n_pair_ids)``: float64 rows, each row's index
    into ``langs`` and into the compact list of shared pair ids.
    """
    ids_by_lang = {lab: list(rows[lab].pos) if lab in rows else [] for lab in langs}
    count: dict[Hashable, int] = {}
    for ids in ids_by_lang.values():
        for i in ids:
            count[i] = count.get(i, 0) + 1
    shared = {i: k for k, i in enumerate(i for i, c in count.items() if c >= 2)}
    Ys, lang_of, pair_of = [], [], []
    for g, lab in enumerate(langs):
        ids = [i for i in ids_by_lang[lab] if i in shared]
        if not ids:
            continue
        store = rows[lab]
        Ys.append(store.take(store.lookup(ids)).numpy())
        lang_of.append(np.full(len(ids), g, dtype=np.int64))
        pair_of.append(np.fromiter((shared[i] for i in ids), dtype=np.int64, count=len(ids)))
    if not Ys:
        d = next((st.rows.shape[1] for st in rows.values() if st.rows is not None), 0)
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros((0, d)), empty, empty, 0
    return np.vstack(Ys), np.concatenate(lang_of), np.concatenate(pair_of), len(shared)


def _connected_groups(ids_by_lang: dict[Hashable, Any], langs: list[Hashable]) -> list[list]:
    """Languages grouped by connectivity through shared pair ids (union-find).

    ``ids_by_lang`` maps each language to an iterable of its pair ids.
    """
    parent = {lab: lab for lab in langs}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    owner: dict[Hashable, Hashable] = {}
    for lab in langs:
        for i in ids_by_lang.get(lab, ()):
            if i in owner:
                parent[find(lab)] = find(owner[i])
            else:
                owner[i] = lab
    groups: dict[Hashable, list] = {}
    for lab in langs:
        groups.setdefault(find(lab), []).append(lab)
    return sorted(groups.values(), key=lambda g: str(g[0]))


#: ``tol=0``: the iterations stop when no language's aligned paired rows move by more
#: than this, relative (``‖Y_l ΔW_l‖_F / ‖Y_l‖_F``; where a language has fewer pairs
#: than dimensions its map may still turn outside their span, which changes nothing)
FIXPOINT_CHANGE = 1e-12


def _start_order(
    shared: np.ndarray, n_pairs: np.ndarray, present: np.ndarray
) -> list[tuple[int, bool]]:
    """Order of the sequential Procrustes start: ``[(language index, anchored), …]``.

    ``shared[l, k]``: pair ids languages ``l`` and ``k`` both hold; ``n_pairs[l]``:
    paired rows of ``l``. The first language is the one with the most paired rows;
    then, each time, the unplaced language sharing the most ids with the placed
    ones (``anchored``: it gets its Procrustes map onto their partial consensus).
    A language sharing none (a still disconnected ``partial_fit``) starts a new
    group at the identity. Ties go to the lower index.
    """
    todo = [int(g) for g in present]
    placed: list[int] = []
    order: list[tuple[int, bool]] = []
    while todo:
        links = [int(shared[g, placed].sum()) if placed else 0 for g in todo]
        best = max(range(len(todo)), key=lambda i: (links[i], int(n_pairs[todo[i]]), -i))
        if links[best] == 0:  # a new group: the largest remaining language
            best = max(range(len(todo)), key=lambda i: (int(n_pairs[todo[i]]), -i))
        g = todo.pop(best)
        order.append((g, links[best] > 0 if placed else False))
        placed.append(g)
    return order


def _common_frame(maps: list[np.ndarray], grams: list[np.ndarray]) -> np.ndarray:
    """The orthogonal ``R`` maximising ``Σ_l tr(W_l R)``: polar factor of ``(Σ_l W_l)ᵀ``.

    GPA determines the maps only up to ``W_l ↦ W_l R``; this ``R`` puts the
    consensus in the orthogonal frame closest to the languages' own frames. It is
    covariant (maps turned by any ``R'`` give ``R'ᵀ R``), so the final maps are the
    same whatever the start or the order of languages. Where ``Σ_l W_l`` has one
    null direction ``u`` (always for two languages related by a reflection:
    ``W_a W_bᵀ`` has an eigenvalue −1) both signs of it maximise the sum — the two
    candidate outputs differ by the reflection ``I − 2uuᵀ``, and for two languages
    they hold the same maps, swapped between the languages — so rounding, or the
    start, would pick one. The sign is then fixed by the data: the candidate with
    the larger ``Σ_l 1ᵀ Rᵀ W_lᵀ G_l W_l R 1`` (``G_l`` the Gram matrix of the
    language's paired rows, ``grams``), the same for any start, language order or
    rounding. (Two or more null directions need exact symmetries; left to the SVD.)
    """
    A = np.sum(maps, axis=0)
    U, s, Vt = np.linalg.svd(A)
    R = Vt.T @ U.T
    null = s <= 1e-8 * s[0] if s.size and s[0] > 0 else np.zeros(s.size, dtype=bool)
    if int(null.sum()) == 1:
        flip = R - 2.0 * np.outer(Vt[-1], U[:, -1])

        def score(Rc: np.ndarray) -> float:
            total = 0.0
            for W, G in zip(maps, grams, strict=True):
                v = W @ Rc.sum(axis=1)  # W R 1
                total += float(v @ G @ v)
            return total

        if score(flip) > score(R):
            R = flip
    return R


def _stop(history: list[float], tol: float, scale: float, change: float) -> bool:
    """The stopping rule shared by both GPA loops (see ``tol``)."""
    if tol > 0:
        return history[-2] - history[-1] <= tol * scale
    return change <= FIXPOINT_CHANGE


def _gpa(
    Y: torch.Tensor,
    pair_of: np.ndarray,
    lang_of: np.ndarray,
    n_pair_ids: int,
    n_iter: int,
    tol: float,
) -> tuple[dict[int, np.ndarray], list[float], bool]:
    """Alternating GPA on paired rows ``Y`` (grouped by language, float64 on any device).

    Returns the maps ``{language index: W}``, the objective history and whether
    the stopping rule (:func:`_stop`) was met.
    """
    dev = Y.device
    d = Y.shape[1]
    n = Y.shape[0]
    pidx = torch.from_numpy(pair_of).to(dev)
    m = torch.zeros(n_pair_ids, dtype=torch.float64, device=dev)
    m.index_add_(0, pidx, torch.ones(n, dtype=torch.float64, device=dev))
    present = np.unique(lang_of)
    bounds = {
        int(g): (int(np.searchsorted(lang_of, g)), int(np.searchsorted(lang_of, g, "right")))
        for g in present
    }
    n_lang = int(lang_of.max()) + 1
    held = scipy.sparse.csr_matrix(
        (np.ones(n, dtype=np.int64), (pair_of, lang_of)), shape=(n_pair_ids, n_lang)
    )  # which language holds which pair id (each at most once)
    shared = (held.T @ held).toarray()
    W: dict[int, torch.Tensor] = {}
    S = torch.zeros((n_pair_ids, d), dtype=torch.float64, device=dev)  # Σ_{k placed} y W_k / m
    for g, anchored in _start_order(shared, np.bincount(lang_of, minlength=n_lang), present):
        lo, hi = bounds[g]
        W[g] = torch.eye(d, dtype=torch.float64, device=dev)
        if anchored:
            cross = Y[lo:hi].T @ S.index_select(0, pidx[lo:hi])
            W[g] = torch.from_numpy(orthogonal_map(cross.cpu().numpy(), dev)).to(dev)
        S.index_add_(0, pidx[lo:hi], (Y[lo:hi] @ W[g]) / m[pidx[lo:hi]][:, None])
    del S
    scale = float((Y * Y).sum()) / n  # mean squared norm (rotation invariant)
    Z = torch.empty_like(Y)

    def consensus() -> tuple[torch.Tensor, float]:
        for g, (lo, hi) in bounds.items():
            Z[lo:hi] = Y[lo:hi] @ W[g]
        C = torch.zeros((n_pair_ids, d), dtype=torch.float64, device=dev)
        C.index_add_(0, pidx, Z).div_(m[:, None])
        obj = 0.0
        for sl in row_blocks(n):
            r = Z[sl] - C.index_select(0, pidx[sl])
            obj += float((r * r).sum())
        return C, obj / n

    C, obj = consensus()
    history, converged = [obj], False
    row_norm = {g: float(torch.linalg.norm(Y[lo:hi])) for g, (lo, hi) in bounds.items()}
    for _ in range(n_iter):
        Z_prev = Z.clone()
        for g, (lo, hi) in bounds.items():
            cross = Y[lo:hi].T @ C.index_select(0, pidx[lo:hi])
            W[g] = torch.from_numpy(orthogonal_map(cross.cpu().numpy(), dev)).to(dev)
        C, obj = consensus()
        change = max(
            float(torch.linalg.norm(Z[lo:hi] - Z_prev[lo:hi])) / max(row_norm[g], 1e-300)
            for g, (lo, hi) in bounds.items()
        )
        history.append(obj)
        if _stop(history, tol, scale, change):
            converged = True
            break
    grams = []
    for g in W:
        lo, hi = bounds[g]
        Yw = Y[lo:hi] * m[pidx[lo:hi]].rsqrt()[:, None]  # Σ_p y_pᵀ y_p / m_p, as M_ll
        grams.append((Yw.T @ Yw).cpu().numpy())
    R = _common_frame([w.cpu().numpy() for w in W.values()], grams)
    return {g: w.cpu().numpy() @ R for g, w in W.items()}, history, converged


def _concat_parts(parts: list) -> tuple[Any, np.ndarray, np.ndarray]:
    """All dask batches so far as one dask array, with their labels and pair ids."""
    import dask.array as da

    X = parts[0][0] if len(parts) == 1 else da.concatenate([p[0] for p in parts], axis=0)
    return X, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _ids_by_language(langs: np.ndarray, pids: np.ndarray) -> dict[Hashable, list]:
    labels, codes = check_languages(langs, langs.shape[0])
    return {lab: pids[codes == c].tolist() for c, lab in enumerate(_labels_list(labels))}


def _pair_layout(
    labels: np.ndarray, codes: np.ndarray, pids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Row of each (shared pair id, language), ``-1`` where missing; ``(P, L)``.

    Pair ids held by one language only are dropped (they do not enter GPA); an id
    occurring twice in one language is an error.
    """
    n_lang = len(labels)
    _, pcodes = np.unique(pids, return_inverse=True)
    pcodes = pcodes.reshape(-1)
    n_ids = int(pcodes.max()) + 1 if pcodes.size else 0
    key = codes * n_ids + pcodes
    _, first, cnt = np.unique(key, return_index=True, return_counts=True)
    if (cnt > 1).any():
        bad = first[np.argmax(cnt > 1)]
        raise ValueError(
            f"pair_id {pids[bad]!r} occurs more than once in language "
            f"{_labels_list(labels)[codes[bad]]!r}; within one language each pair_id must be "
            "unique (rows sharing a pair_id are translations in different languages)."
        )
    shared = np.bincount(pcodes, minlength=n_ids) >= 2
    compact = np.cumsum(shared) - 1
    rows = np.flatnonzero(shared[pcodes])
    layout = np.full((int(shared.sum()), n_lang), -1, dtype=np.int64)
    layout[compact[pcodes[rows]], codes[rows]] = rows
    return layout


def _gpa_stats_dask(X: Any, langs: np.ndarray, pids: np.ndarray, center: bool) -> dict[str, Any]:
    """One dask pass: language means and the GPA cross-product matrix ``M``.

    With ``y_{l,p}`` the centred row of language ``l`` and shared pair id ``p``
    (``m_p`` languages hold ``p``), ``M`` is the ``(L·d) × (L·d)`` matrix of
    blocks ``M_lk = Σ_p y_{l,p}ᵀ y_{k,p} / m_p`` (over the ids both hold). The
    consensus step of GPA is then ``Σ_p y_{l,p}ᵀ c_p = Σ_k M_lk W_k`` and the
    objective ``Σ‖y‖² − Σ_lk tr(W_lᵀ M_lk W_k)``, so the iterations need no rows.

    The products are formed on rows shifted by each language's own first row
    ``s_l`` and centred on the client (the means come from the same pass):
    ``y = y' − δ_l``, ``y' = x − s_l`` (one row shared by every language would
    leave languages far apart, relative to their spread, to cancel digits away).

    Scale (the maps are scale-free, as in :meth:`GeneralizedProcrustes._solve`):
    the products run on ``2⁻ᵉ·y'``, an exact power of two, so that rows of 1e-200
    or 1e160 give the statistics of rows of 1 instead of products lost to
    subnormals or overflowed. ``e`` is 0 for rows of normal scale (the pass is then
    unchanged); where the reference rows are beyond ``2^±256`` it is taken from them. If
    the column sums of squares ``Σ(2⁻ᵉy')²`` still fall outside ``2^±512`` (rows far
    smaller or larger than ``X[0]``: rare), the largest ``|y'|`` is computed and the
    products are formed again with the right ``e`` (two more passes). The returned
    ``M`` and ``total_sq`` are those of ``2⁻ᵉ·y``, and ``"exponent"`` is ``e``
    (the objective scales by ``2²ᵉ``).
    """
    import dask
    import dask.array as da

    from ._dask import language_shifts, moments_tree

    labels, codes = check_languages(langs, langs.shape[0])
    labs = _labels_list(labels)
    n_lang, d = len(labs), int(X.shape[1])
    layout = _pair_layout(labels, codes, pids)
    shift = language_shifts(None, labs, codes, X)  # (L, d): each language's first row
    mask = layout >= 0
    todo: dict[str, Any] = {"moments": moments_tree(X, codes, labs, shift, False)}
    P = layout.shape[0]
    safe = 256  # |e| of the row scale whose products are far from over-/underflow

    def exponent(top: float) -> int:
        # 2⁻ᵉ must stay a normal float64 (rows of 2⁻¹⁰⁷⁴ or 2¹⁰²³ come to 2^∓74, 2²³)
        return min(max(math.frexp(top)[1], -1000), 1000) if 0.0 < top < math.inf else 0

    e = exponent(float(np.abs(shift).max()) if shift.size else 0.0)
    e = e if abs(e) > safe else 0
    if P:
        w = 1.0 / mask.sum(1)
        step = max(1, int(np.median(X.chunks[0])) // n_lang)  # rows of the P × (L·d) matrix
        rows = np.where(mask, layout, 0).ravel()
        keep = mask.ravel().astype(np.float64)

        def scaled_rows(e: int) -> Any:
            """The ``P × (L·d)`` matrix of ``2⁻ᵉ·y'`` (0 where a language lacks the id)."""
            Yg = X[rows].astype(np.float64).rechunk((step * n_lang, d))
            Y3 = Yg.reshape(P, n_lang, d) - shift[None]  # y' = x − s_l, per language
            # the scale rides on the mask's multiplication (no extra pass; exact)
            scale = np.ldexp(keep, -e).reshape(P, n_lang, 1)
            Y3 = Y3 * da.from_array(scale, chunks=(step, n_lang, 1))
            return Y3.reshape(P, n_lang * d).rechunk((step, -1))

        def products(e: int) -> dict[str, Any]:
            Y = scaled_rows(e)
            wd = da.from_array(w, chunks=step)
            return {
                "G": da.matmul(Y.T, Y * wd[:, None]),
                "H": da.matmul(Y.T, da.from_array(mask * w[:, None], chunks=(step, -1))),
                "cs": Y.sum(axis=0),
                "sq": (Y * Y).sum(axis=0),
            }

        todo.update(products(e))
    (res,) = dask.compute(todo)
    m = res["moments"]
    out: dict[str, Any] = {
        "labels": labs,
        "moments": m,
        "n_pairs": mask.sum(0),
        "shared": mask.T.astype(np.int64) @ mask.astype(np.int64),
        "M": None,
        "total_sq": 0.0,
        "exponent": 0,
    }
    if not P:
        return out
    delta = (m.means() - shift) if center else -shift  # y = y' − δ_l
    sq_top = float(np.max(res["sq"]))
    d_top = float(np.abs(np.ldexp(delta, -e)).max())
    if not (2.0**-512 <= sq_top <= 2.0**512 and d_top <= 2.0**safe):
        # rare: rows far from the scale of X[0]; their largest |y'| (one pass), then
        # the products on rows of unit scale (one more)
        amax = float(dask.compute(abs(scaled_rows(e)).max())[0])
        top = max(float(np.ldexp(amax, e)), float(np.abs(delta).max()))
        if 0.0 < top < math.inf:
            e = exponent(top)
            (new,) = dask.compute(products(e))
            res.update(new)
    out["exponent"] = e
    delta = np.ldexp(delta, -e)
    K = (mask * w[:, None]).T @ mask.astype(np.float64)
    G = np.asarray(res["G"]).reshape(n_lang, d, n_lang, d)
    H = np.asarray(res["H"]).reshape(n_lang, d, n_lang)
    M = (
        G
        - np.einsum("lik,kj->likj", H, delta)
        - np.einsum("li,kjl->likj", delta, H)
        + np.einsum("lk,li,kj->likj", K, delta, delta)
    ).reshape(n_lang * d, n_lang * d)
    cs = np.asarray(res["cs"]).reshape(n_lang, d)
    sq = np.asarray(res["sq"]).reshape(n_lang, d).sum(1)
    n_l = mask.sum(0)
    out["M"] = (M + M.T) / 2
    out["total_sq"] = float((sq - 2 * (delta * cs).sum(1) + n_l * (delta * delta).sum(1)).sum())
    return out


def _gpa_moments(
    M: np.ndarray,
    total_sq: float,
    n: int,
    present: np.ndarray,
    shared: np.ndarray,
    n_pairs: np.ndarray,
    d: int,
    n_iter: int,
    tol: float,
    dev: torch.device,
) -> tuple[np.ndarray, list[float], bool]:
    """The alternating GPA of :func:`_gpa` on the statistics of :func:`_gpa_stats_dask`.

    Same updates, objective and stopping rule, ``O(L²d³)`` per iteration instead
    of ``O(n d²)``. Returns all maps ``(L, d, d)`` (identity for languages without
    pairs), the objective history and convergence.
    """
    n_lang = M.shape[0] // d
    Mt = torch.from_numpy(M).to(dev)
    W = torch.eye(d, dtype=torch.float64, device=dev).repeat(n_lang, 1)  # (L·d, d)
    placed: list[int] = []
    for g, anchored in _start_order(shared, n_pairs, present):
        sl = slice(g * d, (g + 1) * d)
        if anchored:
            cross = sum(Mt[sl, k * d : (k + 1) * d] @ W[k * d : (k + 1) * d] for k in placed)
            W[sl] = torch.from_numpy(orthogonal_map(cross.cpu().numpy(), dev)).to(dev)
        placed.append(g)
    scale = total_sq / n

    def objective() -> float:
        return (total_sq - float((W * (Mt @ W)).sum())) / n

    history, converged = [objective()], False
    for _ in range(n_iter):
        cross = (Mt @ W).cpu().numpy()
        change = 0.0
        for g in present:
            sl = slice(int(g) * d, (int(g) + 1) * d)
            new = torch.from_numpy(orthogonal_map(cross[sl], dev)).to(dev)
            # the move of the aligned paired rows, through the language's (weighted)
            # Gram block: tr(ΔWᵀ M_ll ΔW) / tr(M_ll)
            dW, G = new - W[sl], Mt[sl, sl]
            num = float((dW * (G @ dW)).sum())
            change = max(change, (max(num, 0.0) / max(float(torch.trace(G)), 1e-300)) ** 0.5)
            W[sl] = new
        obj = objective()
        history.append(obj)
        if _stop(history, tol, scale, change):
            converged = True
            break
    Wn = W.reshape(n_lang, d, d).cpu().numpy()
    Mn = Mt.cpu().numpy()
    grams = [Mn[int(g) * d : (int(g) + 1) * d, int(g) * d : (int(g) + 1) * d] for g in present]
    R = _common_frame([Wn[g] for g in present], grams)
    Wn[present] = Wn[present] @ R
    return Wn, history, converged
