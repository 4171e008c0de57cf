"""Ties in the k-nearest-neighbour metrics and the scale of dot/Euclidean tie tolerances.

Every reference here is a brute-force full-matrix numpy computation written in this
file, applying the library's documented tie rule on its own:

* kNN (hubness, eigenvector similarity): every target whose score is above the
  k-th best score is a neighbour, and the remaining places go to the targets tied
  with the k-th score that come first in row order;
* P@1 / weak / strong: the translation must score above every other candidate
  beyond rounding, where rounding is relative to the norms of the rows (so the
  answer does not change when X is scaled).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from threadpoolctl import threadpool_limits

from posthoc_align.metrics import (
    alignment_scores,
    eigenvector_similarity,
    hubness,
    retrieval_accuracy,
)
from posthoc_align.metrics._similarity import Rows, nearest_neighbours, scan

#: from blocks of one row and a few targets to everything at once
BUDGETS = [300, 3000, 20_000, 512 * 2**20]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


# -- brute-force references ---------------------------------------------------------------


def unit(A):
    n = np.linalg.norm(A, axis=1, keepdims=True)
    return np.divide(A, n, out=np.zeros_like(A), where=n > 0)


def bf_knn(M, k, tol=1e-9):
    """Rows of k target positions: above the k-th score, then the first tied ones."""
    out = []
    for row in M:
        finite = row[np.isfinite(row)]
        kth = np.sort(finite)[::-1][k - 1]
        above = np.flatnonzero(row - kth > tol)
        tied = np.flatnonzero(np.abs(row - kth) <= tol)
        assert above.size < k <= above.size + tied.size
        out.append(np.sort(np.r_[above, tied[: k - above.size]]))
    return np.array(out)


def bf_hubness_skew(S, T, k, scoring):
    C = unit(S) @ unit(T).T
    if scoring == "csls":
        r_t = np.sort(C, axis=1)[:, ::-1][:, : min(k, T.shape[0])].mean(1)
        r_s = np.sort(C, axis=0)[::-1][: min(k, S.shape[0])].mean(0)
        C = 2 * C - r_t[:, None] - r_s[None, :]
    counts = np.bincount(bf_knn(C, min(k, T.shape[0])).ravel(), minlength=T.shape[0])
    return scipy.stats.skew(counts)


def bf_spectrum(A, k):
    n = len(A)
    C = unit(A) @ unit(A).T
    np.fill_diagonal(C, -np.inf)
    nn = bf_knn(C, min(k, n - 1))
    Adj = np.zeros((n, n))
    Adj[np.repeat(np.arange(n), nn.shape[1]), nn.ravel()] = 1
    Adj = np.maximum(Adj, Adj.T)
    return np.sort(np.linalg.eigvalsh(np.diag(Adj.sum(1)) - Adj))[::-1]


def bf_eigen(S, T, k):
    e1, e2 = bf_spectrum(S, k), bf_spectrum(T, k)

    def share(e):
        c = np.cumsum(e)
        return int(np.argmax(c >= 0.9 * c[-1] - 1e-9) + 1)

    m = min(share(e1), share(e2))
    return float(((e1[:m] - e2[:m]) ** 2).sum())


def duplicate_heavy(seed=5, n_s=70, n_t=90, d=6):
    """Small-integer rows: many exact ties in direction; targets drawn with repetition."""
    rng = np.random.default_rng(seed)
    S = rng.integers(-2, 3, size=(n_s, d)).astype(np.float64)
    T = S[rng.integers(0, n_s, size=n_t)]
    return S, T


# -- the engine ---------------------------------------------------------------------------


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_nearest_neighbours_lowest_position_wins_ties(similarity, k):
    rng = np.random.default_rng(0)
    A = rng.integers(-2, 3, size=(50, 4)).astype(np.float64)
    A = np.vstack([A, A[:20]])  # and exact duplicates
    base = torch.from_numpy(A)
    q_idx, t_idx = np.arange(0, 70, 2), rng.permutation(70)[:45]
    M = A[q_idx] @ A[t_idx].T if similarity == "dot" else unit(A[q_idx]) @ unit(A[t_idx]).T
    exclude = rng.integers(-1, 45, size=q_idx.size)
    for i, e in enumerate(exclude):
        if e >= 0:
            M[i, e] = -np.inf
    ref = bf_knn(M, k)
    for budget in [1, *BUDGETS]:  # 1: blocks of one query and one target
        got = nearest_neighbours(
            Rows(base, q_idx),
            Rows(base, t_idx),
            k,
            similarity=similarity,
            exclude=exclude,
            memory_budget=budget,
        )
        np.testing.assert_array_equal(got, ref)


def test_scan_top1_dot_ties_scale_with_the_norms():
    """Small float32 rows: 1e-10 and 2e-10 are different dot products, not a tie."""
    base = torch.tensor([[1e-5, 0.0], [1e-5, 0.0], [2e-5, 0.0], [2e-5, 0.0]], dtype=torch.float32)
    for budget in (1, 100, 10_000):
        res = scan(
            Rows(base, [0]), Rows(base, [1, 2, 3]), similarity="dot", k=1, memory_budget=budget
        )
        assert res.topk_indices.item() == 1  # the first of the two largest, not position 0


# -- hubness and eigenvector similarity ---------------------------------------------------


@pytest.mark.parametrize("scoring", ["cosine", "csls"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_hubness_with_duplicate_targets_is_independent_of_memory_budget(scoring, k):
    S, T = duplicate_heavy()
    X = np.vstack([S, T])
    L = ["en"] * len(S) + ["fr"] * len(T)
    ref = bf_hubness_skew(S, T, k, scoring)
    for budget in BUDGETS:
        got = hubness(X, L, "en", "fr", k=k, scoring=scoring, memory_budget=budget)
        assert got["k_occurrence_skewness"] == pytest.approx(ref, rel=1e-12, abs=1e-12), budget


def test_hubness_ties_interleaved_rows_and_float32():
    """The rule is about positions among the target rows: interleaving the languages
    in X (targets kept in order, sources shuffled) gives the same result."""
    S, T = duplicate_heavy(seed=6)
    rng = np.random.default_rng(0)
    n = len(S) + len(T)
    is_t = np.zeros(n, dtype=bool)
    is_t[rng.choice(n, size=len(T), replace=False)] = True
    X = np.empty((n, S.shape[1]))
    X[is_t], X[~is_t] = T, S[rng.permutation(len(S))]
    L = np.where(is_t, "fr", "en")
    ref = bf_hubness_skew(S, T, 4, "cosine")
    for budget in (300, 512 * 2**20):
        for A in (X, X.astype(np.float32)):
            got = hubness(A, L, "en", "fr", k=4, memory_budget=budget)["k_occurrence_skewness"]
            assert got == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_eigenvector_similarity_with_ties_is_independent_of_memory_budget(k):
    rng = np.random.default_rng(5)
    S = rng.integers(-2, 3, size=(70, 6)).astype(np.float64)
    T = S + (rng.random((70, 6)) < 0.2) * rng.integers(-1, 2, size=(70, 6))
    X = np.vstack([S, T])
    L = ["en"] * 70 + ["fr"] * 70
    P = list(range(70)) * 2
    ref = bf_eigen(S, T, k)
    for budget in BUDGETS:
        got = eigenvector_similarity(X, L, P, "en", "fr", k=k, memory_budget=budget)
        assert got == pytest.approx(ref, rel=1e-8, abs=1e-8), budget


def test_knn_metrics_with_dask_equal_numpy():
    da = pytest.importorskip("dask.array")
    import dask

    S, T = duplicate_heavy(seed=7)
    X = np.vstack([S, T])
    L = np.array(["en"] * len(S) + ["fr"] * len(T))
    P = np.r_[np.arange(len(S)), np.arange(len(T)) % len(S) + 1000]
    P[len(S) : len(S) + 40] = np.arange(40)
    Xd = da.from_array(X, chunks=(37, -1))
    with dask.config.set(scheduler="synchronous"):
        for budget in (2000, 512 * 2**20):  # 2000: targets read in segments
            for scoring in ("cosine", "csls"):
                a = hubness(X, L, "en", "fr", k=3, scoring=scoring, memory_budget=budget)
                assert hubness(Xd, L, "en", "fr", k=3, scoring=scoring, memory_budget=budget) == a
            e = eigenvector_similarity(X, L, P, "en", "fr", k=3, memory_budget=budget)
            assert eigenvector_similarity(Xd, L, P, "en", "fr", k=3, memory_budget=budget) == (
                pytest.approx(e, rel=1e-12)
            )
    assert a["k_occurrence_skewness"] == pytest.approx(bf_hubness_skew(S, T, 3, "csls"))


# -- tie tolerance of dot and Euclidean scores follows the scale of X ---------------------


def bf_scores(S, T, gold, similarity):
    """Weak hits, strong hits and P@1-style hits (float64, relative tolerance 1e-9)."""
    if similarity == "cosine":
        cross, own = unit(S) @ unit(T).T, unit(S) @ unit(S).T
        scale = np.ones(len(S))
        own_scale = scale
    elif similarity == "dot":
        cross, own = S @ T.T, S @ S.T
        ns, nt = np.linalg.norm(S, axis=1), np.linalg.norm(T, axis=1)
        scale, own_scale = ns * nt.max(), ns * max(nt.max(), ns.max())
    else:
        cross = -((S[:, None, :] - T[None, :, :]) ** 2).sum(-1)
        own = -((S[:, None, :] - S[None, :, :]) ** 2).sum(-1)
        ns, nt = np.linalg.norm(S, axis=1), np.linalg.norm(T, axis=1)
        scale, own_scale = ns**2 + nt.max() ** 2, ns**2 + max(nt.max(), ns.max()) ** 2
    weak, strong = [], []
    for i, j in enumerate(gold):
        if j < 0:
            continue
        w = cross[i, j] - np.delete(cross[i], j).max() > 1e-9 * scale[i]
        weak.append(w)
        strong.append(w and cross[i, j] - np.delete(own[i], i).max() > 1e-9 * own_scale[i])
    return np.mean(weak), np.mean(strong)


def translations(n=200, d=64, noise=0.3, n_copies=0, seed=0):
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(n, d))
    T = np.vstack([E, E[:n_copies]])  # decoys: exact copies of gold targets
    S = E + noise * rng.normal(size=E.shape)
    X = np.vstack([S, T])
    L = np.array(["en"] * n + ["de"] * len(T))
    P = np.r_[np.arange(n), np.arange(n), 10_000 + np.arange(n_copies)]
    gold = np.arange(n)
    return X, L, P, S, T, gold


@pytest.mark.parametrize("scale", [1.0, 1e-3, 3e-4, 1e-4])
def test_dot_and_euclidean_scores_do_not_depend_on_the_scale_of_X(scale):
    X, L, P, S, T, gold = translations()
    Xs = (X * scale).astype(np.float32)
    S64 = Xs[: len(S)].astype(np.float64)
    T64 = Xs[len(S) :].astype(np.float64)
    for sim in ("cosine", "dot", "euclidean"):
        weak, strong = bf_scores(S64, T64, gold, sim)
        assert weak == 1.0  # the data: every translation is clearly the nearest
        got = alignment_scores(Xs, L, P, "en", "de", similarity=sim)
        assert (got["weak"], got["strong"]) == (weak, strong), sim
    for scoring in ("cosine", "dot"):
        p1 = bf_scores(S64, T64, gold, scoring)[0]
        assert retrieval_accuracy(Xs, L, P, "en", "de", scoring=scoring) == p1 == 1.0


@pytest.mark.parametrize("scale", [1.0, 1e-4, 1e4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_duplicates_still_tie_at_any_scale(scale, dtype):
    X, L, P, S, T, gold = translations(n=50, d=33, n_copies=25)
    Xs = (X * scale).astype(dtype)
    S64, T64 = Xs[:50].astype(np.float64), Xs[50:].astype(np.float64)
    for budget in (300, 3000, 512 * 2**20):
        for sim in ("dot", "euclidean"):
            weak, strong = bf_scores(S64, T64, gold, sim)
            assert weak == 0.5  # the 25 duplicated translations tie: misses
            got = alignment_scores(Xs, L, P, "en", "de", similarity=sim, memory_budget=budget)
            assert (got["weak"], got["strong"]) == (weak, strong)
        got = retrieval_accuracy(Xs, L, P, "en", "de", scoring="dot", memory_budget=budget)
        assert got == bf_scores(S64, T64, gold, "dot")[0] == 0.5


def test_an_unrelated_large_row_does_not_widen_the_tie_band():
    # the rounding of a score is relative to the rows compared (the query and its
    # translation), not to the largest target row (review finding: P@1 0.51 -> 0.31)
    from posthoc_align.metrics import alignment_scores, retrieval_accuracy

    rng = np.random.default_rng(0)
    n, d = 300, 64
    S = rng.normal(size=(n, d))
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    T = S + 0.02 * rng.normal(size=(n, d))
    D = T + 0.002 * rng.normal(size=(n, d))
    X = np.vstack([S, T, D]).astype(np.float32)
    langs = ["en"] * n + ["de"] * (2 * n)
    pids = list(range(n)) * 2 + list(range(10**6, 10**6 + n))
    X2 = np.hstack([X, np.zeros((len(X), 1), np.float32)])
    big = np.zeros((1, d + 1), np.float32)
    big[0, -1] = 100.0  # orthogonal to every row: scores 0, never retrieved
    X2 = np.vstack([X2, big])
    l2, p2 = langs + ["de"], pids + [-1]
    assert retrieval_accuracy(X2, l2, p2, "en", "de", scoring="dot") == retrieval_accuracy(
        X, langs, pids, "en", "de", scoring="dot"
    )
    for sim in ("dot", "euclidean"):
        a = alignment_scores(X, langs, pids, "en", "de", similarity=sim)
        b = alignment_scores(X2, l2, p2, "en", "de", similarity=sim)
        assert a["weak"] == b["weak"] and a["strong"] == b["strong"]
