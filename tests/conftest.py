import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _backends():
    out = ["numpy", "torch"]
    out.append("numpy-torch-kernels")  # CPU with the numba loops off: the torch kernels
    if torch.cuda.is_available():
        out.append("cuda")
    return out


@pytest.fixture(params=["loops", "torch"])
def kernels(request, monkeypatch):
    """Run a test with the numba CPU loops (when installed) and with the torch kernels."""
    if request.param == "torch":
        monkeypatch.setenv("POSTHOC_ALIGN_NUMBA", "0")
    return request.param


@pytest.fixture(params=_backends())
def to_backend(request, monkeypatch):
    """Convert a numpy array to the backend under test; returns (convert, to_numpy)."""
    kind = request.param
    if kind == "numpy-torch-kernels":
        monkeypatch.setenv("POSTHOC_ALIGN_NUMBA", "0")
        kind = "numpy"

    def convert(a):
        if kind == "numpy":
            return a
        t = torch.from_numpy(np.ascontiguousarray(a))
        return t.cuda() if kind == "cuda" else t

    def back(a):
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    convert.kind = kind
    return convert, back


def make_multilingual(rng, n_per_lang=40, d=6, langs=("en", "fr", "de"), offset_scale=3.0):
    """Rows per language = shared signal + language offset; all languages share pair ids."""
    base = rng.normal(size=(n_per_lang, d))
    X, L, P = [], [], []
    for lang in langs:
        off = rng.normal(scale=offset_scale, size=d)
        X.append(base + off + 0.1 * rng.normal(size=base.shape))
        L += [lang] * n_per_lang
        P += list(range(n_per_lang))
    return np.vstack(X), np.array(L), np.array(P)


@pytest.fixture
def multilingual():
    """Factory for (X, languages, pair_ids) with planted language offsets."""
    return make_multilingual


@pytest.fixture(scope="module")
def cluster_client():
    """A 2-worker, 1-thread-each process ``LocalCluster`` and its client (per module)."""
    distributed = pytest.importorskip("dask.distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client
