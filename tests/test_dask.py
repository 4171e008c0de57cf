"""Dask arrays: block-wise fits equal the numpy fit; transforms are lazy."""

import numpy as np
import pytest

import posthoc_align as pa

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")


def _data(rng, n=300, d=6):
    L = rng.choice(["en", "fr", "de", "sw"], size=n)
    X = rng.normal(size=(n, d)) + 5 * (L[:, None] == "fr") - 3 * (L[:, None] == "de")
    return X, L


def _paired(rng, n=60, d=5):
    base = rng.normal(size=(n, d))
    X = np.vstack([base, base[:, ::-1] + 2.0, base * np.resize([1.0, -1.0], d) - 1.0])
    X = X + 0.05 * rng.normal(size=X.shape)
    L = np.repeat(["en", "fr", "de"], n)
    P = np.tile(np.arange(n), 3)
    perm = rng.permutation(len(X))
    return X[perm], L[perm], P[perm]


ESTIMATORS = [
    pa.LanguageMeanCentering(),
    pa.LanguageStandardizer(),
    pa.LSAR(),
]


@pytest.mark.parametrize("est", ESTIMATORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("chunks", [7, 50, 300])
def test_fit_equals_numpy(est, chunks, rng):
    X, L = _data(rng)
    ref = est.__class__(**est.get_params()).fit(X, languages=L)
    with dask.config.set(scheduler="synchronous"):
        got = est.__class__(**est.get_params()).fit(
            da.from_array(X, chunks=(chunks, -1)), languages=da.from_array(L, chunks=chunks)
        )
        kw = {} if isinstance(est, pa.LSAR) else {"languages": L}
        out = got.transform(da.from_array(X, chunks=(chunks, 3)), **kw)
        assert isinstance(out, da.Array)
        out = out.compute()
    for attr in ("means_", "vars_", "components_"):
        if hasattr(ref, attr):
            np.testing.assert_allclose(getattr(got, attr), getattr(ref, attr), atol=1e-10)
    np.testing.assert_allclose(out, ref.transform(X, **kw), atol=1e-10)


@pytest.mark.parametrize("chunks", [9, 64, 180])
def test_procrustes_equals_numpy(chunks, rng):
    X, L, P = _paired(rng)
    ref = pa.ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    with dask.config.set(scheduler="synchronous"):
        got = pa.ProcrustesAligner().fit(
            da.from_array(X, chunks=(chunks, -1)), languages=L, pair_ids=P
        )
        out = got.transform(da.from_array(X, chunks=chunks), languages=L).compute()
    np.testing.assert_allclose(got.rotations_, ref.rotations_, atol=1e-10)
    np.testing.assert_allclose(out, ref.transform(X, languages=L), atol=1e-10)


def test_partial_fit_dask_chunks_add_up(rng):
    X, L = _data(rng)
    ref = pa.LanguageStandardizer().fit(X, languages=L)
    inc = pa.LanguageStandardizer()
    with dask.config.set(scheduler="synchronous"):
        inc.partial_fit(da.from_array(X[:120], chunks=40), languages=L[:120])
        inc.partial_fit(X[120:200], languages=L[120:200])  # numpy batches mix in
        inc.partial_fit(da.from_array(X[200:], chunks=33), languages=L[200:])
    np.testing.assert_allclose(inc.vars_, ref.vars_, atol=1e-10)


def test_rotate_align_on_dask_layers(rng):
    n = 40
    en = rng.normal(size=(n, 3, 4))
    X = np.concatenate([en, en[:, :, ::-1] + 1])
    L, P = ["en"] * n + ["fr"] * n, list(range(n)) * 2
    ref = pa.RotateAlign(layers=(-1,)).fit(X, languages=L, pair_ids=P)
    with dask.config.set(scheduler="synchronous"):
        Xd = da.from_array(X, chunks=(16, -1, -1))
        got = pa.RotateAlign(layers=(-1,)).fit(Xd, languages=L, pair_ids=P)
        out = got.transform(Xd, languages=L).compute()
    np.testing.assert_allclose(out, ref.transform(X, languages=L), atol=1e-10)


def test_bad_dask_input(rng):
    X, L = _data(rng)
    with dask.config.set(scheduler="synchronous"):
        bad = X.copy()
        bad[150, 2] = np.nan
        with pytest.raises(ValueError, match="NaN or infinity"):
            pa.LanguageMeanCentering().fit(da.from_array(bad, chunks=50), languages=L)
        with pytest.raises(ValueError, match="languages has 299 entries"):
            pa.LanguageMeanCentering().fit(da.from_array(X, chunks=50), languages=L[:-1])
        est = pa.LanguageMeanCentering().fit(da.from_array(X, chunks=50), languages=L)
        with pytest.raises(ValueError, match="expecting 6 features"):
            est.partial_fit(da.from_array(X[:, :3], chunks=50), languages=L)


def test_local_cluster_processes(rng, cluster_client):
    X, L, P = _paired(rng, n=200, d=8)
    ref_c = pa.LanguageStandardizer().fit(X, languages=L)
    ref_p = pa.ProcrustesAligner().fit(X, languages=L, pair_ids=P)
    Xd = da.from_array(X, chunks=(64, -1))
    got_c = pa.LanguageStandardizer().fit(Xd, languages=L)
    got_p = pa.ProcrustesAligner().fit(Xd, languages=L, pair_ids=P)
    out = got_p.transform(Xd, languages=L).compute()
    np.testing.assert_allclose(got_c.vars_, ref_c.vars_, atol=1e-10)
    np.testing.assert_allclose(got_p.rotations_, ref_p.rotations_, atol=1e-10)
    np.testing.assert_allclose(out, ref_p.transform(X, languages=L), atol=1e-10)


def _die_once(block, marker):
    """Kill the worker process the first time this block is computed."""
    import os

    if block.shape[0] and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
    return block


def test_worker_killed_mid_fit_never_gives_wrong_statistics(rng, tmp_path, cluster_client):
    """A worker dies while computing a block: the task is retried elsewhere, and the
    result equals the numpy fit (or the fit raises) -- never silently wrong."""
    X, L = _data(rng, n=400)
    ref = pa.LanguageStandardizer().fit(X, languages=L)
    marker = str(tmp_path / "died")
    Xd = da.from_array(X, chunks=(50, -1)).map_blocks(_die_once, marker, dtype=X.dtype)
    from dask.distributed import KilledWorker

    try:
        got = pa.LanguageStandardizer().fit(Xd, languages=L)
    except KilledWorker:  # giving up is acceptable; wrong numbers are not
        return
    assert (tmp_path / "died").exists()  # the kill really happened
    np.testing.assert_allclose(got.vars_, ref.vars_, atol=1e-10)
    np.testing.assert_allclose(got.means_, ref.means_, atol=1e-10)
