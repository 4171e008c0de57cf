"""Tests of posthoc_align.metrics against brute-force full-matrix numpy references."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from threadpoolctl import threadpool_limits

from posthoc_align.metrics import (
    METRICS,
    NoPairsError,
    alignment_scores,
    bitext_mining_f1,
    eigenvector_similarity,
    evaluate_pairs,
    hubness,
    language_id_accuracy,
    relational_similarity,
    retrieval_accuracy,
    to_csv,
    to_markdown,
    transfer_gap,
)
from posthoc_align.metrics._similarity import Rows, plan_blocks, scan

BUDGETS = [300, 3000, 20_000, 512 * 2**20]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one thread avoids OpenMP wake-up costs on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(n)


# -- data and brute-force references ------------------------------------------------------


def make_data(seed=0, n_pairs=25, n_src_extra=5, n_tgt_extra=7, d=8, noise=0.8, shuffle=True):
    """en/de/fr rows: n_pairs translations en<->de, decoys on both sides, fr as noise."""
    rng = np.random.default_rng(seed)
    E = rng.normal(size=(n_pairs, d))
    en = np.vstack([E, rng.normal(size=(n_src_extra, d))])
    de = np.vstack([E + noise * rng.normal(size=E.shape), rng.normal(size=(n_tgt_extra, d))])
    n_fr = min(10, n_pairs)
    fr = E[:n_fr] + noise * rng.normal(size=(n_fr, d))
    X = np.vstack([en, de, fr])
    langs = np.array(["en"] * len(en) + ["de"] * len(de) + ["fr"] * len(fr))
    pids = np.concatenate(
        [
            np.arange(n_pairs),
            1000 + np.arange(n_src_extra),
            np.arange(n_pairs),
            2000 + np.arange(n_tgt_extra),
            np.arange(n_fr),
        ]
    )
    if shuffle:
        perm = rng.permutation(len(X))
        X, langs, pids = X[perm], langs[perm], pids[perm]
    return X, langs, pids


def unit(A):
    n = np.linalg.norm(A, axis=1, keepdims=True)
    return np.divide(A, n, out=np.zeros_like(A), where=n > 0)


def split(X, langs, pids, s, t):
    S, T = X[langs == s], X[langs == t]
    ps, pt = pids[langs == s], pids[langs == t]
    gold = np.array([np.flatnonzero(pt == p)[0] if (pt == p).any() else -1 for p in ps])
    return S, T, gold


def topk_mean(M, k):
    k = min(k, M.shape[1])
    return np.sort(M, axis=1)[:, ::-1][:, :k].mean(axis=1)


def bf_score_matrix(S, T, scoring, k=10):
    cos = unit(S) @ unit(T).T
    if scoring == "cosine":
        return cos
    if scoring == "dot":
        return S @ T.T
    return 2 * cos - topk_mean(cos, k)[:, None] - topk_mean(cos.T, k)[None, :]


def bf_hits(M, gold):
    hits = []
    for i, j in enumerate(gold):
        if j < 0:
            continue
        others = np.delete(M[i], j)
        hits.append(M[i, j] > others.max() if others.size else True)
    return np.array(hits)


def bf_retrieval(X, langs, pids, s, t, scoring="cosine", k=10):
    S, T, gold = split(X, langs, pids, s, t)
    return bf_hits(bf_score_matrix(S, T, scoring, k), gold).mean()


def bf_alignment(X, langs, pids, s, t, similarity="cosine"):
    S, T, gold = split(X, langs, pids, s, t)
    if similarity == "cosine":
        cross, own = unit(S) @ unit(T).T, unit(S) @ unit(S).T
    elif similarity == "dot":
        cross, own = S @ T.T, S @ S.T
    else:
        cross = -((S[:, None, :] - T[None, :, :]) ** 2).sum(-1)
        own = -((S[:, None, :] - S[None, :, :]) ** 2).sum(-1)
    weak, strong = [], []
    for i, j in enumerate(gold):
        if j < 0:
            continue
        w = cross[i, j] > np.delete(cross[i], j).max()
        weak.append(w)
        strong.append(w and cross[i, j] > np.delete(own[i], i).max())
    cos = unit(S) @ unit(T).T
    q = np.flatnonzero(gold >= 0)
    mean_cos = cos[q, gold[q]].mean()
    return {
        "weak": np.mean(weak),
        "strong": np.mean(strong),
        "mean_cosine": mean_cos,
        "normalized_cosine": mean_cos / cos.mean(),  # the full n_S x n_T mean
    }


# -- the engine ------------------------------------------------------------------------------


def test_plan_blocks_respects_budget_and_prefers_full_rows():
    for m, n, d, item, budget, stream in [
        (1000, 5000, 64, 4, 2**24, False),
        (1000, 5000, 64, 4, 2**20, True),
        (10, 100, 8, 8, 5000, False),
        (300, 400, 16, 8, 600_000, False),
    ]:
        bq, bt = plan_blocks(m, n, d, item, budget, stream_targets=stream)
        assert 1 <= bq <= m and 1 <= bt <= n
        cost = bq * bt * 2 * item + bq * d * item + (bt * d * item if stream else 0)
        assert cost <= budget
    assert plan_blocks(100, 50, 8, 8, 2**30) == (100, 50)  # one block
    assert plan_blocks(300, 400, 16, 8, 600_000)[1] == 400  # full width, several row blocks
    assert plan_blocks(300, 400, 16, 8, 600_000)[0] < 300
    assert plan_blocks(10, 50, 8, 8, 1) == (1, 1)
    # 200k x 200k float32 under the default budget: full rows, hundreds of query rows
    bq, bt = plan_blocks(200_000, 200_000, 384, 4, 512 * 2**20)
    assert bt == 200_000 and bq > 100


@pytest.mark.parametrize("budget", [1, *BUDGETS])
@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_scan_matches_full_matrix(budget, similarity):
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.normal(size=(60, 6)))
    q_idx = rng.permutation(60)[:23]  # non-contiguous queries
    t_idx = np.arange(20, 57)  # contiguous targets (view path)
    t_idx_nc = rng.permutation(60)[:37]  # non-contiguous targets (cache or stream path)
    B = base.numpy()
    for targets in (t_idx, t_idx_nc):
        Q, T = B[q_idx], B[targets]
        M = unit(Q) @ unit(T).T if similarity == "cosine" else Q @ T.T
        gold = rng.integers(-1, len(targets), size=len(q_idx))
        exclude = rng.integers(-1, len(targets), size=len(q_idx))
        exclude[exclude == gold] = -1
        res = scan(
            Rows(base, q_idx),
            Rows(base, targets),
            similarity=similarity,
            k=4,
            gold=gold,
            exclude=exclude,
            memory_budget=budget,
        )
        Mx = M.copy()
        for i, e in enumerate(exclude):
            if e >= 0:
                Mx[i, e] = -np.inf
        ref_top = np.sort(Mx, axis=1)[:, ::-1][:, :4]
        np.testing.assert_allclose(res.topk_values.numpy(), ref_top, rtol=1e-12)
        np.testing.assert_allclose(
            np.take_along_axis(Mx, res.topk_indices.numpy(), 1), ref_top, rtol=1e-12
        )
        g = res.gold_score.numpy()
        for i, j in enumerate(gold):
            if j < 0:
                assert np.isnan(g[i])
                assert res.best_other[i] == pytest.approx(Mx[i].max(), rel=1e-12)
            else:
                assert g[i] == pytest.approx(M[i, j], rel=1e-12)
                rest = np.delete(Mx[i], j)
                assert res.best_other[i] == pytest.approx(rest.max(), rel=1e-12)


def test_scan_top1_ties_go_to_lowest_index():
    base = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [5.0, 0.0]])
    for budget in (1, 100, 10_000):
        res = scan(Rows(base, [0]), Rows(base, [2, 1, 3, 4]), k=1, memory_budget=budget)
        assert res.topk_indices.item() == 1  # rows 1, 3, 4 all have cosine 1


# -- retrieval --------------------------------------------------------------------------------


@pytest.mark.parametrize("scoring", ["cosine", "dot", "csls"])
@pytest.mark.parametrize("k", [1, 3, 10, 1000])
def test_retrieval_matches_brute_force(scoring, k):
    X, langs, pids = make_data(seed=3)
    got = retrieval_accuracy(X, langs, pids, "en", "de", scoring=scoring, k=k)
    assert got == pytest.approx(bf_retrieval(X, langs, pids, "en", "de", scoring, k))
    assert 0.0 < got < 1.0  # the data make the test informative
    back = retrieval_accuracy(X, langs, pids, "de", "en", scoring=scoring, k=k)
    assert back == pytest.approx(bf_retrieval(X, langs, pids, "de", "en", scoring, k))


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("scoring", ["cosine", "dot", "csls"])
def test_retrieval_blocks_equal_single_block(budget, scoring):
    X, langs, pids = make_data(seed=4, n_pairs=40)
    one = retrieval_accuracy(X, langs, pids, "en", "de", scoring=scoring, k=3)
    assert retrieval_accuracy(
        X, langs, pids, "en", "de", scoring=scoring, k=3, memory_budget=budget
    ) == pytest.approx(one)


def test_retrieval_contiguous_and_shuffled_rows_agree():
    X, langs, pids = make_data(seed=5, shuffle=False)
    perm = np.random.default_rng(0).permutation(len(X))
    for scoring in ("cosine", "csls"):
        a = retrieval_accuracy(X, langs, pids, "en", "de", scoring=scoring)
        b = retrieval_accuracy(X[perm], langs[perm], pids[perm], "en", "de", scoring=scoring)
        assert a == b


def test_retrieval_ties_count_as_misses():
    # ±1 entries: every cosine is a multiple of 1/4, exact in floating point
    X = np.array(
        [
            [1, 1, 1, 1],  # en 0 -> de 0 (tied with de 2, a copy of de 0)
            [1, -1, 1, -1],  # en 1 -> de 1 (strictly best)
            [1, 1, 1, -1],  # de 0
            [1, -1, 1, -1],  # de 1
            [1, 1, 1, -1],  # de 2: distractor identical to de 0
        ],
        dtype=np.float64,
    )
    langs = ["en", "en", "de", "de", "de"]
    pids = [0, 1, 0, 1, 7]
    for scoring in ("cosine", "dot"):
        assert retrieval_accuracy(X, langs, pids, "en", "de", scoring=scoring) == 0.5
    # without the duplicate the tie disappears
    assert retrieval_accuracy(X[:4], langs[:4], pids[:4], "en", "de") == 1.0
    # a tie among wrong candidates does not matter
    X2 = np.array([[1, 0], [1, 0.1], [0, 1], [0, 1.0]], dtype=np.float64)
    assert retrieval_accuracy(X2, ["en", "de", "de", "de"], [0, 0, 1, 2], "en", "de") == 1.0


def test_retrieval_skips_sources_without_partner_and_keeps_target_distractors():
    X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.05], [0.99, 0.1]])
    langs = ["en", "en", "de", "de"]
    # en 1 has no partner (skipped); de 3 has none but stays as a distractor
    assert retrieval_accuracy(X, langs, [0, 5, 0, 9], "en", "de") == 1.0
    X[3] = [1.0, 0.0]  # the distractor now beats the translation
    assert retrieval_accuracy(X, langs, [0, 5, 0, 9], "en", "de") == 0.0


def test_csls_uses_all_source_rows_for_r_s():
    X, langs, pids = make_data(seed=6, n_src_extra=15)
    got = retrieval_accuracy(X, langs, pids, "en", "de", scoring="csls", k=2)
    assert got == pytest.approx(bf_retrieval(X, langs, pids, "en", "de", "csls", 2))


def test_torch_input_gives_numpy_result():
    X, langs, pids = make_data(seed=7)
    T = torch.from_numpy(X).clone().requires_grad_(True)
    for scoring in ("cosine", "csls", "dot"):
        assert retrieval_accuracy(T, langs, pids, "en", "de", scoring=scoring) == (
            retrieval_accuracy(X, langs, pids, "en", "de", scoring=scoring)
        )
    assert alignment_scores(T, langs, pids, "en", "de") == pytest.approx(
        alignment_scores(X, langs, pids, "en", "de")
    )
    X32 = X.astype(np.float32)
    for scoring in ("cosine", "csls"):
        assert retrieval_accuracy(
            torch.from_numpy(X32), langs, pids, "en", "de", scoring=scoring
        ) == (retrieval_accuracy(X32, langs, pids, "en", "de", scoring=scoring))
    # labels given as tensors
    assert retrieval_accuracy(X, langs, torch.from_numpy(pids), "en", "de") == (
        retrieval_accuracy(X, langs, pids, "en", "de")
    )


def test_float32_input_matches_float64_brute_force():
    X, langs, pids = make_data(seed=8)
    got = retrieval_accuracy(X.astype(np.float32), langs, pids, "en", "de", scoring="csls")
    assert got == pytest.approx(bf_retrieval(X, langs, pids, "en", "de", "csls", 10))


def test_bad_inputs_raise_clear_value_errors():
    X, langs, pids = make_data(seed=9)
    with pytest.raises(ValueError, match="languages has"):
        retrieval_accuracy(X, langs[:-1], pids, "en", "de")
    with pytest.raises(ValueError, match="pair_ids has"):
        retrieval_accuracy(X, langs, pids[:-1], "en", "de")
    with pytest.raises(ValueError, match="source language 'xx' does not occur"):
        retrieval_accuracy(X, langs, pids, "xx", "de")
    with pytest.raises(ValueError, match="target language 'xx'"):
        alignment_scores(X, langs, pids, "en", "xx")
    with pytest.raises(ValueError, match="same language"):
        retrieval_accuracy(X, langs, pids, "en", "en")
    with pytest.raises(ValueError, match="no row of source language"):
        retrieval_accuracy(X, langs, np.arange(len(X)), "en", "de")
    with pytest.raises(NoPairsError):
        alignment_scores(X, langs, np.arange(len(X)), "en", "de")
    with pytest.raises(ValueError, match="scoring must be"):
        retrieval_accuracy(X, langs, pids, "en", "de", scoring="l2")
    with pytest.raises(ValueError, match="k must be"):
        retrieval_accuracy(X, langs, pids, "en", "de", k=0)
    with pytest.raises(ValueError, match="memory_budget"):
        retrieval_accuracy(X, langs, pids, "en", "de", memory_budget=0)
    with pytest.raises(ValueError, match="pair_ids"):
        retrieval_accuracy(X, langs, None, "en", "de")
    with pytest.raises(ValueError, match="2D"):
        retrieval_accuracy(X[0], ["en"], [0], "en", "de")
    for lang in ("en", "de"):  # rows of other languages are not read
        bad = X.copy()
        row = np.flatnonzero(langs == lang)[3]
        bad[row, 1] = np.nan
        for budget in (300, 512 * 2**20):  # streamed and cached target rows
            with pytest.raises(ValueError, match=f"NaN or infinity \\(first at row {row},"):
                retrieval_accuracy(bad, langs, pids, "en", "de", memory_budget=budget)
        with pytest.raises(ValueError, match="NaN"):
            alignment_scores(bad, langs, pids, "en", "de")
    # a source pair_id on two target rows
    dup = pids.copy()
    de_rows = np.flatnonzero(langs == "de")
    dup[de_rows[0]] = dup[de_rows[1]]
    if dup[de_rows[1]] in pids[langs == "en"]:
        with pytest.raises(ValueError, match="occurs on 2 rows of target language"):
            retrieval_accuracy(X, langs, dup, "en", "de")


def test_duplicate_target_pair_id_raises():
    X = np.eye(4)
    with pytest.raises(ValueError, match="occurs on 2 rows"):
        retrieval_accuracy(X, ["en", "de", "de", "de"], [0, 0, 0, 1], "en", "de")


# -- hypothesis invariants ----------------------------------------------------------------


def _rotation(seed, d):
    Q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return Q


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), d=st.integers(2, 12), n=st.integers(5, 30))
def test_rotation_leaves_cosine_metrics_unchanged(seed, d, n):
    X, langs, pids = make_data(seed=seed, n_pairs=n, d=d)
    R = X @ _rotation(seed + 1, d)
    for scoring in ("cosine", "csls"):
        assert retrieval_accuracy(R, langs, pids, "en", "de", scoring=scoring, k=3) == (
            retrieval_accuracy(X, langs, pids, "en", "de", scoring=scoring, k=3)
        )
    a, b = (
        alignment_scores(X, langs, pids, "en", "de"),
        alignment_scores(R, langs, pids, "en", "de"),
    )
    assert a == pytest.approx(b, rel=1e-9)
    assert relational_similarity(R, langs, pids, "en", "de") == pytest.approx(
        relational_similarity(X, langs, pids, "en", "de"), abs=1e-9
    )


@settings(max_examples=25, deadline=None)
@given(
    X=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=4, max_side=12),
        elements=st.floats(-100, 100, allow_nan=False, width=32),
    ),
    data=st.data(),
)
def test_precision_at_one_is_a_share(X, data):
    n = X.shape[0]
    langs = data.draw(st.lists(st.sampled_from(["en", "de"]), min_size=n, max_size=n))
    langs[0], langs[1] = "en", "de"
    pids = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    pids[0] = pids[1] = 99  # at least one pair
    langs, pids = np.array(langs), np.array(pids)
    de_ids = pids[langs == "de"]
    if len(set(de_ids.tolist())) != len(de_ids):
        return  # duplicate pair_ids within the target language are an error
    en_ids = pids[langs == "en"]
    paired_en = en_ids[np.isin(en_ids, de_ids)]
    if len(set(paired_en.tolist())) != len(paired_en):
        return  # so are duplicates among the source rows that have a translation
    S, T, gold = split(X, langs, pids, "en", "de")
    for scoring in ("cosine", "dot", "csls"):
        p = retrieval_accuracy(X, langs, pids, "en", "de", scoring=scoring, k=2)
        assert 0.0 <= p <= 1.0
        M = bf_score_matrix(S, T, scoring, 2)
        gaps = []
        if M.shape[1] > 1:  # with one target row every query is a hit
            gaps = [M[i, j] - np.delete(M[i], j).max() for i, j in enumerate(gold) if j >= 0]
        scale = max(1.0, float(np.abs(M).max()))
        if all(g == 0 or abs(g) > 1e-9 * scale for g in gaps):  # no rounding-level near-tie
            assert p == pytest.approx(bf_hits(M, gold).mean())


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), d=st.integers(2, 16))
def test_identical_copies_are_perfectly_aligned(seed, n, d):
    E = np.random.default_rng(seed).normal(size=(n, d))
    X = np.vstack([E, E[::-1]])
    langs = ["en"] * n + ["de"] * n
    pids = list(range(n)) + list(range(n))[::-1]
    assert retrieval_accuracy(X, langs, pids, "en", "de") == 1.0
    assert retrieval_accuracy(X, langs, pids, "en", "de", scoring="csls", k=1) == 1.0
    s = alignment_scores(X, langs, pids, "en", "de")
    assert s["weak"] == 1.0 and s["strong"] == 1.0
    assert s["mean_cosine"] == pytest.approx(1.0)


# -- alignment scores ---------------------------------------------------------------------


@pytest.mark.parametrize("similarity", ["cosine", "dot", "euclidean"])
@pytest.mark.parametrize("budget", [300, 3000, 512 * 2**20])
def test_alignment_scores_match_brute_force(similarity, budget):
    X, langs, pids = make_data(seed=11, noise=0.5)
    got = alignment_scores(X, langs, pids, "en", "de", similarity=similarity, memory_budget=budget)
    ref = bf_alignment(X, langs, pids, "en", "de", similarity)
    assert got == pytest.approx(ref, rel=1e-9)
    assert got["strong"] <= got["weak"]
    assert 0 < got["weak"] < 1


def test_strong_alignment_counts_other_source_rows():
    X = np.array([[1.0, 0.0], [1.0, 0.1], [0.8, 0.6], [0.0, 1.0]])
    s = alignment_scores(X, ["en", "en", "de", "de"], [0, 1, 0, 1], "en", "de")
    assert s["weak"] == 0.5 and s["strong"] == 0.0


def test_normalized_cosine_uses_exact_mean_over_all_cross_pairs():
    X, langs, pids = make_data(seed=12)
    got = alignment_scores(X, langs, pids, "en", "de")
    S, T, _ = split(X, langs, pids, "en", "de")
    full = (unit(S) @ unit(T).T).mean()
    assert got["normalized_cosine"] == pytest.approx(got["mean_cosine"] / full, rel=1e-12)


# -- mining ------------------------------------------------------------------------------


def bf_mining(X, langs, pids, s, t, k=4, dev_fraction=0.5, random_state=0):
    S, T, gold = split(X, langs, pids, s, t)
    cos = unit(S) @ unit(T).T
    a = np.sort(cos, axis=1)[:, ::-1][:, : min(k, cos.shape[1])].sum(1) / (2 * min(k, T.shape[0]))
    b = np.sort(cos.T, axis=1)[:, ::-1][:, : min(k, S.shape[0])].sum(1) / (2 * min(k, S.shape[0]))
    margin = cos / (a[:, None] + b[None, :])
    best = margin.argmax(1)
    m = margin[np.arange(len(S)), best]
    correct = (gold >= 0) & (best == gold)
    perm = np.random.default_rng(random_state).permutation(len(S))
    n_dev = int(round(dev_fraction * len(S)))
    dev, test = perm[:n_dev], perm[n_dev:]

    def prf(idx, thr):
        keep = m[idx] >= thr
        tp = (correct[idx] & keep).sum()
        p = tp / keep.sum() if keep.sum() else 0.0
        r = tp / (gold[idx] >= 0).sum()
        return (2 * p * r / (p + r) if p + r else 0.0), p, r

    vals = np.unique(m[dev])[::-1]
    cands = [(vals[i] + vals[i + 1]) / 2 for i in range(len(vals) - 1)] + [vals[-1]]
    f1s = [prf(dev, c)[0] for c in cands]
    thr = cands[int(np.argmax(f1s))]
    f1, p, r = prf(test, thr)
    return {"f1": f1, "precision": p, "recall": r, "threshold": thr}


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_mining_matches_brute_force(k, seed):
    X, langs, pids = make_data(seed=20 + seed, n_pairs=40, n_src_extra=20, n_tgt_extra=10)
    got = bitext_mining_f1(X, langs, pids, "en", "de", k=k, random_state=seed)
    ref = bf_mining(X, langs, pids, "en", "de", k=k, random_state=seed)
    assert got == pytest.approx(ref, rel=1e-9)
    assert set(got) == {"f1", "precision", "recall", "threshold"}
    blocked = bitext_mining_f1(X, langs, pids, "en", "de", k=k, random_state=seed,
                               memory_budget=2000)  # fmt: skip
    assert blocked == pytest.approx(got, rel=1e-9)


def test_mining_easy_case_and_errors():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(60, 16))
    X = np.vstack([E, E[:40] + 0.05 * rng.normal(size=(40, 16))])
    langs = ["en"] * 60 + ["fr"] * 40
    pids = list(range(60)) + list(range(40))
    out = bitext_mining_f1(X, langs, pids, "en", "fr")
    assert out["f1"] == 1.0 and out["precision"] == 1.0 and out["recall"] == 1.0
    with pytest.raises(ValueError, match="dev_fraction"):
        bitext_mining_f1(X, langs, pids, "en", "fr", dev_fraction=1.0)
    one_pair = [0] + list(range(100, 159)) + list(range(40))
    with pytest.raises(NoPairsError, match="split"):
        bitext_mining_f1(X, langs, one_pair, "en", "fr")


# -- hubness ----------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [2000, 512 * 2**20])
def test_hubness_matches_brute_force(budget):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(150, 30))
    langs = np.array(["en"] * 70 + ["de"] * 80)
    langs = langs[rng.permutation(150)]
    got = hubness(X, langs, "en", "de", k=5, memory_budget=budget)
    S, T = X[langs == "en"], X[langs == "de"]
    cos = unit(S) @ unit(T).T
    nn = np.argsort(-cos, axis=1)[:, :5]
    counts = np.bincount(nn.ravel(), minlength=len(T))
    assert got["k_occurrence_skewness"] == pytest.approx(scipy.stats.skew(counts))
    hubs = counts > counts.mean() + 2 * counts.std()
    assert got["hub_occupancy"] == pytest.approx(counts[hubs].sum() / (len(S) * 5))
    assert got["antihub_rate"] == pytest.approx(np.mean(counts == 0))
    assert got["max_k_occurrence"] == counts.max()


def test_csls_reduces_hubness():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 100)) + 1.0  # a shared mean direction, as in real encoders
    langs = ["en"] * 300 + ["de"] * 300
    cos = hubness(X, langs, "en", "de", k=10)
    csls = hubness(X, langs, "en", "de", k=10, scoring="csls")
    assert cos["k_occurrence_skewness"] > 1.0
    assert csls["k_occurrence_skewness"] < cos["k_occurrence_skewness"]


def test_hubness_uniform_occurrence_has_zero_skew():
    X = np.vstack([np.eye(3), np.eye(3)])
    assert hubness(X, ["en"] * 3 + ["de"] * 3, "en", "de", k=1)["k_occurrence_skewness"] == 0.0


# -- isomorphism ----------------------------------------------------------------------------


def bf_eigen(X, langs, pids, s, t, k):
    S, T, gold = split(X, langs, pids, s, t)
    q = np.flatnonzero(gold >= 0)
    spectra = []
    for A in (S[q], T[gold[q]]):
        cos = unit(A) @ unit(A).T
        np.fill_diagonal(cos, -np.inf)
        kk = min(k, len(A) - 1)
        nn = np.argsort(-cos, axis=1)[:, :kk]
        Adj = np.zeros((len(A), len(A)))
        Adj[np.repeat(np.arange(len(A)), kk), nn.ravel()] = 1
        Adj = np.maximum(Adj, Adj.T)
        L = np.diag(Adj.sum(1)) - Adj
        spectra.append(np.sort(np.linalg.eigvalsh(L))[::-1])

    def kfor(e):
        for i in range(1, len(e) + 1):
            if e[:i].sum() >= 0.9 * e.sum() - 1e-9:
                return i

    kk = min(kfor(spectra[0]), kfor(spectra[1]))
    return ((spectra[0][:kk] - spectra[1][:kk]) ** 2).sum()


@pytest.mark.parametrize("k", [3, 10])
def test_eigenvector_similarity_matches_brute_force(k):
    X, langs, pids = make_data(seed=30, n_pairs=40, noise=1.0)
    got = eigenvector_similarity(X, langs, pids, "en", "de", k=k)
    assert got == pytest.approx(bf_eigen(X, langs, pids, "en", "de", k), rel=1e-8)
    assert got > 0
    assert eigenvector_similarity(X, langs, pids, "en", "de", k=k, memory_budget=900) == (
        pytest.approx(got, rel=1e-8)
    )


def test_isomorphic_copies():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(50, 8))
    X = np.vstack([E, 3.0 * E @ _rotation(1, 8)])
    langs, pids = ["en"] * 50 + ["de"] * 50, list(range(50)) * 2
    assert eigenvector_similarity(X, langs, pids, "en", "de") == pytest.approx(0.0, abs=1e-9)
    assert relational_similarity(X, langs, pids, "en", "de") == pytest.approx(1.0)
    noisy = X + np.vstack([np.zeros_like(E), rng.normal(size=E.shape)])
    assert relational_similarity(noisy, langs, pids, "en", "de") < 0.99


@pytest.mark.parametrize("n_samples", [None, 12])
def test_relational_similarity_matches_brute_force(n_samples):
    X, langs, pids = make_data(seed=31, n_pairs=30)
    X[0] = 0.0  # a zero row: cosine 0 with everything
    got = relational_similarity(X, langs, pids, "en", "de", n_samples=n_samples, random_state=3)
    S, T, gold = split(X, langs, pids, "en", "de")
    q = np.flatnonzero(gold >= 0)
    if n_samples is not None:
        q = np.sort(np.random.default_rng(3).choice(q, size=n_samples, replace=False))
    a, b = unit(S[q]) @ unit(S[q]).T, unit(T[gold[q]]) @ unit(T[gold[q]]).T
    iu = np.triu_indices(len(q), 1)
    assert got == pytest.approx(np.corrcoef(a[iu], b[iu])[0, 1], rel=1e-9)


def test_isomorphism_errors():
    X, langs, pids = make_data(seed=32)
    with pytest.raises(ValueError, match="n_samples"):
        relational_similarity(X, langs, pids, "en", "de", n_samples=2)
    few = np.where(np.isin(pids, [0, 1]), pids, 5000 + np.arange(len(pids)))
    with pytest.raises(NoPairsError, match="at least 3"):
        eigenvector_similarity(X, langs, few, "en", "de")


# -- probes -----------------------------------------------------------------------------


def test_language_id_probe():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 6))
    langs = np.array(["en"] * 80 + ["de"] * 40)
    out = language_id_accuracy(X + 4 * (langs == "de")[:, None], langs)
    assert out == {"accuracy": 1.0, "majority_baseline": pytest.approx(2 / 3), "n_languages": 2}
    neutral = language_id_accuracy(X, langs, cv=4, random_state=1)
    assert abs(neutral["accuracy"] - 2 / 3) < 0.15  # no signal: near the baseline
    assert language_id_accuracy(torch.from_numpy(X), langs, cv=4, random_state=1) == neutral
    with pytest.raises(ValueError, match="at least 2 languages"):
        language_id_accuracy(X, ["en"] * 120)
    with pytest.raises(ValueError, match="fewer than cv"):
        language_id_accuracy(X, ["en"] * 117 + ["de"] * 3)
    with pytest.raises(ValueError, match="languages has"):
        language_id_accuracy(X, langs[:-1])


def test_transfer_gap():
    rng = np.random.default_rng(0)
    y = np.tile([0, 1, 2], 60)
    langs = np.repeat(["en", "de", "fr"], 60)
    X = rng.normal(size=(180, 5)) + 3 * np.eye(5)[y]
    X[langs == "fr"] += rng.normal(size=5) * 4  # fr is shifted: worse transfer
    out = transfer_gap(X, y, langs, "en")
    assert set(out) == {"scores", "source_score", "target_mean", "gap"}
    assert set(out["scores"]) == {"en", "de", "fr"}
    assert out["gap"] == pytest.approx(out["source_score"] - out["target_mean"])
    assert out["target_mean"] == pytest.approx((out["scores"]["de"] + out["scores"]["fr"]) / 2)
    assert out["scores"]["fr"] < out["scores"]["de"]
    # the source score is cross-validated as documented
    from sklearn.linear_model import LogisticRegression

    en = langs == "en"
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    cv = cross_val_score(LogisticRegression(max_iter=1000), X[en], y[en], cv=folds).mean()
    assert out["source_score"] == pytest.approx(cv)
    # a custom classifier is cloned and used
    knn = KNeighborsClassifier(3)
    out2 = transfer_gap(X, y, langs, "en", classifier=knn)
    ref = KNeighborsClassifier(3).fit(X[en], y[en])
    assert out2["scores"]["de"] == pytest.approx(
        np.mean(ref.predict(X[langs == "de"]) == y[langs == "de"])
    )
    assert not hasattr(knn, "classes_")
    with pytest.raises(ValueError, match="source language 'xx'"):
        transfer_gap(X, y, langs, "xx")
    with pytest.raises(ValueError, match="y has"):
        transfer_gap(X, y[:-1], langs, "en")


# -- tidy table --------------------------------------------------------------------------


def test_evaluate_pairs_table():
    X, langs, pids = make_data(seed=40)
    rows = evaluate_pairs(X, langs, pids, tags={"layer": 3, "transform": "none"})
    assert len(rows) == 6 * 6  # 3 languages -> 6 ordered pairs, 6 default metrics
    assert set(rows[0]) == {"layer", "transform", "source", "target", "metric", "value"}
    got = {(r["source"], r["target"], r["metric"]): r["value"] for r in rows}
    assert got[("en", "de", "retrieval_csls")] == retrieval_accuracy(
        X, langs, pids, "en", "de", scoring="csls"
    )
    assert got[("fr", "de", "strong")] == alignment_scores(X, langs, pids, "fr", "de")["strong"]
    rows = evaluate_pairs(
        X, langs, pids, pairs=[("en", "de")], metrics=["mining_f1", "hubness"], k=2
    )
    assert [r["metric"] for r in rows] == ["mining_f1", "hubness"]
    assert rows[1]["value"] == hubness(X, langs, "en", "de", k=2)["k_occurrence_skewness"]


def test_evaluate_pairs_nan_for_pairs_without_translations():
    X, langs, pids = make_data(seed=41)
    pids = np.where(langs == "fr", 10_000 + np.arange(len(pids)), pids)
    with pytest.warns(RuntimeWarning, match="NaN"):
        rows = evaluate_pairs(X, langs, pids, metrics=["retrieval_cosine"])
    vals = {(r["source"], r["target"]): r["value"] for r in rows}
    assert np.isnan(vals[("en", "fr")]) and not np.isnan(vals[("en", "de")])


def test_evaluate_pairs_errors():
    X, langs, pids = make_data(seed=42)
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_pairs(X, langs, pids, metrics=["p@5"])
    with pytest.raises(ValueError, match="not taken by the chosen metrics"):
        evaluate_pairs(X, langs, pids, metrics=["weak"], k=3)
    with pytest.raises(ValueError, match="scoring is chosen"):
        evaluate_pairs(X, langs, pids, scoring="csls")
    with pytest.raises(ValueError, match="do not occur"):
        evaluate_pairs(X, langs, pids, pairs=[("en", "xx")])
    assert set(METRICS) >= {"retrieval_cosine", "retrieval_csls", "weak", "strong"}


def test_markdown_csv_and_frame(tmp_path, monkeypatch):
    rows = [
        {"source": "en", "target": "de", "metric": "weak", "value": 0.25},
        {"source": "en", "target": "fr", "metric": "weak", "value": float("nan"), "layer": 2},
    ]
    md = to_markdown(rows).splitlines()
    assert md[0] == "| source | target | metric | value  | layer |"
    assert md[2].startswith("| en     | de     | weak   | 0.2500 |")
    path = tmp_path / "t.csv"
    to_csv(rows, path)
    import csv

    back = list(csv.DictReader(open(path)))
    assert back[0]["value"] == "0.25" and back[0]["layer"] == "" and back[1]["layer"] == "2"
    monkeypatch.setitem(sys.modules, "pandas", None)
    X, langs, pids = make_data(seed=43)
    with pytest.raises(ImportError, match="pandas"):
        evaluate_pairs(X, langs, pids, metrics=["weak"], as_frame=True)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_duplicate_targets_tie_whatever_the_block_size(dtype):
    """A target row that is an exact copy of the gold translation ties with it (a miss),
    and the result does not depend on memory_budget: exact duplicates get scores that
    differ in the last bits depending on where they sit in a GEMM block."""
    rng = np.random.default_rng(0)
    n, d = 50, 33
    E = rng.normal(size=(n, d))
    S = E + 0.3 * rng.normal(size=(n, d))
    X = np.vstack([S, E, E[:25]]).astype(dtype)  # 25 decoys: copies of gold targets
    L = ["en"] * n + ["de"] * (n + 25)
    P = list(range(n)) * 2 + list(range(500, 525))
    ref_hits = {"cosine": None, "csls": None}
    for mb in (300, 3000, 30000, 512 * 2**20):
        for scoring in ("cosine", "csls", "dot"):
            acc = retrieval_accuracy(X, L, P, "en", "de", scoring=scoring, memory_budget=mb)
            assert acc <= 0.5  # every duplicated gold is a tie, hence a miss
            if scoring in ref_hits:
                ref_hits[scoring] = ref_hits[scoring] or acc
                assert acc == ref_hits[scoring]
        assert alignment_scores(X, L, P, "en", "de", memory_budget=mb)["weak"] <= 0.5
    # mining: ties go to the first copy (a gold row), so results agree across budgets
    f1 = {
        mb: bitext_mining_f1(X, L, P, "en", "de", memory_budget=mb)["f1"] for mb in (300, 1 << 29)
    }
    assert f1[300] == f1[1 << 29]


def test_duplicate_source_pair_ids_are_an_error():
    X = np.random.default_rng(0).normal(size=(5, 3))
    L = ["en", "en", "de", "de", "de"]
    with pytest.raises(ValueError, match="occurs on 2 rows of source language 'en'"):
        retrieval_accuracy(X, L, [0, 0, 0, 1, 2], "en", "de")


# -- probes in the tidy table -------------------------------------------------------------

PROBE_METRICS = [
    "language_id",
    "language_id_majority",
    "transfer_gap",
    "transfer_target_score",
    "transfer_source_score",
]


def _probe_data(seed=0):
    rng = np.random.default_rng(seed)
    langs = np.repeat(["en", "de", "fr"], [60, 45, 50])
    y = rng.integers(0, 3, size=langs.size)
    X = rng.normal(size=(langs.size, 5)) + 2.0 * np.eye(5)[y]
    X[langs == "de"] += 0.8 * rng.normal(size=5)
    X[langs == "fr", 0] += 2.5
    pids = np.concatenate([np.arange(60), np.arange(45), np.arange(50)])
    return X, langs, pids, y


def bf_pair_probes(X, langs, y, s, t):
    """The language-ID probe and the transfer probe on the rows of s and t, by hand."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pair = np.isin(langs, [s, t])
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0))
    lid = cross_val_score(
        probe, X[pair], langs[pair], cv=StratifiedKFold(5, shuffle=True, random_state=0)
    ).mean()
    counts = np.array([(langs == s).sum(), (langs == t).sum()])
    src, tgt = langs == s, langs == t
    clf = LogisticRegression(max_iter=1000).fit(X[src], y[src])
    target_score = np.mean(clf.predict(X[tgt]) == y[tgt])
    n_folds = min(5, np.bincount(y[src]).min())
    source_score = cross_val_score(
        LogisticRegression(max_iter=1000),
        X[src],
        y[src],
        cv=StratifiedKFold(n_folds, shuffle=True, random_state=0),
    ).mean()
    return {
        "language_id": lid,
        "language_id_majority": counts.max() / counts.sum(),
        "transfer_gap": source_score - target_score,
        "transfer_target_score": target_score,
        "transfer_source_score": source_score,
    }


def test_evaluate_pairs_language_id_and_transfer_match_sklearn():
    X, langs, pids, y = _probe_data()
    pairs = [("en", "de"), ("fr", "de"), ("de", "en")]
    rows = evaluate_pairs(X, langs, pids, pairs=pairs, metrics=PROBE_METRICS, y=y)
    assert len(rows) == len(pairs) * len(PROBE_METRICS)
    for s, t in pairs:
        ref = bf_pair_probes(X, langs, y, s, t)
        got = {r["metric"]: r["value"] for r in rows if (r["source"], r["target"]) == (s, t)}
        assert got == pytest.approx(ref, rel=1e-12)
    # the pair's rows only: a third language does not change the probe of two
    two = np.isin(langs, ["en", "de"])
    sub = evaluate_pairs(
        X[two], langs[two], pids[two], pairs=[("en", "de")], metrics=PROBE_METRICS, y=y[two]
    )
    assert [r["value"] for r in sub] == [r["value"] for r in rows[:5]]
    # y as a list and X as a tensor give the same table
    again = evaluate_pairs(
        torch.from_numpy(X), langs, pids, pairs=pairs, metrics=PROBE_METRICS, y=list(y)
    )
    assert [r["value"] for r in again] == [r["value"] for r in rows]
    assert "language_id" in METRICS and "transfer_gap" in METRICS


def test_evaluate_pairs_probe_errors():
    X, langs, pids, y = _probe_data(1)
    with pytest.raises(ValueError, match=r"need task labels: pass y="):
        evaluate_pairs(X, langs, pids, metrics=["transfer_gap"])
    with pytest.raises(ValueError, match="y has"):
        evaluate_pairs(X, langs, pids, metrics=["transfer_gap"], y=y[:-1])
    with pytest.raises(ValueError, match="not taken by the chosen metrics"):
        evaluate_pairs(X, langs, pids, metrics=["weak"], y=y)
    with pytest.raises(ValueError, match="did you mean 'language_id'"):
        evaluate_pairs(X, langs, pids, metrics=["language_id_accuracy"])
    # too few rows of a language for the folds: NaN for that pair, the table goes on
    few = np.r_[np.flatnonzero(langs != "fr"), np.flatnonzero(langs == "fr")[:3]]
    with pytest.warns(RuntimeWarning, match="NaN"):
        rows = evaluate_pairs(X[few], langs[few], pids[few], metrics=["language_id"])
    vals = {(r["source"], r["target"]): r["value"] for r in rows}
    assert np.isnan(vals[("en", "fr")]) and vals[("en", "de")] > 0.5
    # a smaller cv is passed to the probe
    rows = evaluate_pairs(X[few], langs[few], pids[few], metrics=["language_id"], cv=3)
    assert not any(np.isnan(r["value"]) for r in rows)


def test_evaluate_pairs_probes_with_dask_equal_numpy():
    da = pytest.importorskip("dask.array")
    import dask

    X, langs, pids, y = _probe_data(2)
    pairs = [("en", "de"), ("fr", "en")]
    ref = evaluate_pairs(X, langs, pids, pairs=pairs, metrics=PROBE_METRICS, y=y)
    Xd = da.from_array(X, chunks=(40, -1))
    with dask.config.set(scheduler="synchronous"):
        got = evaluate_pairs(
            Xd,
            da.from_array(langs, chunks=40),
            pids,
            pairs=pairs,
            metrics=PROBE_METRICS,
            y=da.from_array(y, chunks=40),
        )
    assert [r["value"] for r in got] == pytest.approx([r["value"] for r in ref], rel=1e-12)


def test_transfer_metrics_give_nan_for_a_sparse_pair_like_language_id():
    import warnings

    from posthoc_align.metrics import evaluate_pairs

    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 30 + [0, 1, 0])
    X = rng.normal(size=(63, 5)) + 3 * y[:, None]
    langs = ["en"] * 30 + ["de"] * 30 + ["sw"] * 3
    pids = list(range(30)) * 2 + [0, 1, 2]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rows = evaluate_pairs(
            X, langs, pids, pairs=[("en", "de"), ("sw", "en")], metrics=["transfer_gap"], y=y
        )
    values = {(r["source"], r["target"]): r["value"] for r in rows}
    assert np.isfinite(values[("en", "de")]) and np.isnan(values[("sw", "en")])
