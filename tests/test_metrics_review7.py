"""Review 7: metrics at extreme scales of X, and plot_layer_curves' rows and styles.

* Cosine-based metrics (cosine, CSLS, ratio margin, kNN graphs, unit means) are
  scale-free: rows whose squared norm overflows or underflows the dtype
  (``|x| ≈ 1e20`` / ``1e-25`` in float32, ``1e160`` / ``1e-170`` in float64) give
  the result of the same rows at scale 1, not an IndexError or silent zeros.
* Dot-product and Euclidean scores that overflow or underflow raise a ValueError
  that names the problem and asks to rescale ``X``.
* ``plot_layer_curves`` plots rows without a ``metric`` column, and more than 10
  curves stay distinguishable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits

from posthoc_align.metrics import (
    alignment_scores,
    bitext_mining_f1,
    eigenvector_similarity,
    hubness,
    relational_similarity,
    retrieval_accuracy,
)
from posthoc_align.metrics._similarity import Rows, _raise_non_finite_row, row_norms


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with threadpool_limits(1):
        yield


N, D = 30, 8


def _data(dtype=np.float32):
    rng = np.random.default_rng(0)
    A = rng.normal(size=(N, D))
    B = A + 0.8 * rng.normal(size=(N, D))
    X = np.vstack([A, B]).astype(dtype)
    L = np.array(["en"] * N + ["de"] * N)
    P = np.tile(np.arange(N), 2)
    return X, L, P


def _cosine_metrics(X, L, P, **kw):
    al = alignment_scores(X, L, P, "en", "de", **kw)
    return {
        "p1": retrieval_accuracy(X, L, P, "en", "de", **kw),
        "csls": retrieval_accuracy(X, L, P, "en", "de", scoring="csls", k=5, **kw),
        "weak": al["weak"],
        "strong": al["strong"],
        "mean_cosine": al["mean_cosine"],
        "normalized_cosine": al["normalized_cosine"],
        "hub": hubness(X, L, "en", "de", k=5)["max_k_occurrence"],
        "hub_csls": hubness(X, L, "en", "de", k=5, scoring="csls")["max_k_occurrence"],
        "mining": bitext_mining_f1(X, L, P, "en", "de")["f1"],
        "eigen": eigenvector_similarity(X, L, P, "en", "de", k=5),
        "rsim": relational_similarity(X, L, P, "en", "de"),
    }


def _assert_same(got, ref, rtol):
    assert got.keys() == ref.keys()
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=rtol, err_msg=key)


@pytest.mark.parametrize(
    ("dtype", "scale"),
    [
        (np.float32, 1e20),  # squared norms overflow float32 (was: IndexError)
        (np.float32, 1e19),
        (np.float32, 1e-25),  # squared norms underflow to 0 (was: P@1 0.0, NaN)
        (np.float32, 1e-40),  # subnormal entries
        (np.float64, 1e160),
        (np.float64, 1e-170),
    ],
)
def test_cosine_metrics_do_not_depend_on_the_scale(dtype, scale):
    X, L, P = _data(dtype)
    ref = _cosine_metrics(X, L, P)
    Xs = X * dtype(scale)
    assert np.isfinite(Xs).all() and (Xs != 0).all()
    # float32 · scale rounds each entry (subnormals keep fewer digits): compare
    # within float32 rounding; the hits and counts are identical
    rtol = 1e-3 if scale == 1e-40 else 1e-5
    _assert_same(_cosine_metrics(Xs, L, P), ref, rtol)


def test_power_of_two_scale_gives_identical_cosine_results():
    # scaling by 2**70 is exact, and so is the rescaling of the rows: bit for bit
    X, L, P = _data(np.float32)
    ref = _cosine_metrics(X, L, P)
    got = _cosine_metrics(X * np.float32(2.0**70), L, P)
    assert got == ref


def test_one_huge_and_one_tiny_row_among_usual_rows():
    # only the rows out of range are rescaled; their cosines stay those of the row
    X, L, P = _data(np.float32)
    Y = X.copy()
    Y[3] *= np.float32(1e25)  # a source row
    Y[N + 7] *= np.float32(1e-30)  # a target row
    for kw in ({}, {"memory_budget": 3000}):
        _assert_same(_cosine_metrics(Y, L, P, **kw), _cosine_metrics(X, L, P, **kw), 1e-5)


def test_zero_rows_keep_cosine_zero():
    X, L, P = _data(np.float32)
    X[2] = 0.0
    X[N + 5] = 0.0
    s = alignment_scores(X, L, P, "en", "de")
    Z = X * np.float32(1e20)
    t = alignment_scores(Z, L, P, "en", "de")
    _assert_same(t, s, 1e-5)


def test_torch_input_on_the_view_path():
    X, L, P = _data(np.float32)
    ref = retrieval_accuracy(X, L, P, "en", "de")
    T = torch.from_numpy(X * np.float32(1e20))
    assert retrieval_accuracy(T, L, P, "en", "de") == ref
    assert T.abs().max() > 1e19  # the caller's rows are not rescaled in place


def test_dask_segments_with_huge_rows():
    da = pytest.importorskip("dask.array")
    X, L, P = _data(np.float32)
    ref = _cosine_metrics(X, L, P, memory_budget=1500)
    Xd = da.from_array(X * np.float32(1e20), chunks=(7, D))
    got = {
        "p1": retrieval_accuracy(Xd, L, P, "en", "de", memory_budget=1500),
        "csls": retrieval_accuracy(Xd, L, P, "en", "de", scoring="csls", k=5, memory_budget=1500),
    }
    _assert_same(got, {k: ref[k] for k in got}, 1e-6)


@pytest.mark.parametrize(("dtype", "scale"), [(np.float32, 1e20), (np.float64, 1e160)])
def test_dot_and_euclidean_overflow_raise_a_clear_error(dtype, scale):
    X, L, P = _data(dtype)
    Xs = X * dtype(scale)
    with pytest.raises(ValueError, match=r"Dot-product .* overflow .*Rescale X"):
        retrieval_accuracy(Xs, L, P, "en", "de", scoring="dot")
    with pytest.raises(ValueError, match=r"Dot-product .* overflow .*Rescale X"):
        alignment_scores(Xs, L, P, "en", "de", similarity="dot")
    with pytest.raises(ValueError, match=r"finite, but the squared row norms .*Rescale X"):
        alignment_scores(Xs, L, P, "en", "de", similarity="euclidean")


@pytest.mark.parametrize(("dtype", "scale"), [(np.float32, 1e-25), (np.float64, 1e-170)])
def test_dot_and_euclidean_underflow_raise_a_clear_error(dtype, scale):
    X, L, P = _data(dtype)
    Xs = X * dtype(scale)
    with pytest.raises(ValueError, match=r"Dot-product .* underflow .*Rescale X"):
        retrieval_accuracy(Xs, L, P, "en", "de", scoring="dot")
    with pytest.raises(ValueError, match=r"underflow .*Rescale X"):
        alignment_scores(Xs, L, P, "en", "de", similarity="euclidean")


def test_dot_at_moderate_scales_unchanged():
    # rows inside the safe range take the usual path: dot scores as before
    X, L, P = _data(np.float32)
    ref = retrieval_accuracy(X, L, P, "en", "de", scoring="dot")
    for s in (2.0**40, 2.0**-40):
        assert retrieval_accuracy(X * np.float32(s), L, P, "en", "de", scoring="dot") == ref


def test_nan_still_names_the_row():
    X, L, P = _data(np.float32)
    X = X * np.float32(1e20)
    X[N + 4, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinity \(first at row 34"):
        retrieval_accuracy(X, L, P, "en", "de")


def test_error_helper_on_a_finite_block_says_what_overflowed():
    base = torch.full((4, 3), 1e30, dtype=torch.float32)
    rows = Rows(base, np.array([5, 6, 7, 8]))
    with pytest.raises(ValueError, match=r"finite, but the squared row norms of rows 6\.\.7"):
        _raise_non_finite_row(rows, base[1:3], 1)


def test_row_norms_float64_overflow_safe():
    X, _, _ = _data(np.float64)
    base = torch.from_numpy(X * 1e160)
    got = row_norms(Rows(base, np.arange(2 * N)))
    np.testing.assert_allclose(got, np.linalg.norm(X, axis=1) * 1e160, rtol=1e-14)
    tiny = row_norms(Rows(torch.from_numpy(X * 1e-170), np.arange(2 * N)))
    np.testing.assert_allclose(tiny, np.linalg.norm(X, axis=1) * 1e-170, rtol=1e-14)


# -- plot_layer_curves -----------------------------------------------------------------


def test_layer_curves_rows_without_metric():
    pytest.importorskip("matplotlib")
    from posthoc_align.plotting import plot_layer_curves

    rows = [
        {"layer": 0, "value": 0.3, "transform": "raw"},
        {"layer": 1, "value": 0.5, "transform": "raw"},
    ]
    ax = plot_layer_curves(rows).axes[0]
    assert ax.get_ylabel() == "value"
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.3, 0.5])
    ax = plot_layer_curves(rows, metric="retrieval_cosine").axes[0]
    assert ax.get_ylabel() == "retrieval cosine"
    mixed = rows + [{"layer": 0, "value": 1.0, "metric": "a"}, {"layer": 0, "metric": "b"}]
    with pytest.raises(ValueError, match=r"several metrics \['a', 'b'\]; pass metric="):
        plot_layer_curves(mixed)


@pytest.mark.parametrize("n_lines", [11, 12, 25])
def test_layer_curves_many_lines_distinguishable(n_lines):
    pytest.importorskip("matplotlib")
    from posthoc_align.plotting import plot_layer_curves

    rng = np.random.default_rng(0)
    fig = plot_layer_curves({f"t{i}": list(rng.random(5)) for i in range(n_lines)}, metric="p1")
    lines = fig.axes[0].get_lines()
    assert len(lines) == n_lines
    looks = {(str(ln.get_color()), ln.get_marker(), ln.get_linestyle()) for ln in lines}
    assert len(looks) == n_lines
    # the first ten keep the usual look: solid lines in the colour cycle's order
    assert all(ln.get_linestyle() == "-" for ln in lines[:10])
    assert len({str(ln.get_color()) for ln in lines[:10]}) == 10
