"""Out-of-core fits: a zarr cache larger than the workers' memory, fitted by Dask.

    python benchmarks/bench_scale.py --gb 4 --memory-limit 1GB      # the issue's setting
    python benchmarks/bench_scale.py --gb 0.5                       # a quick run

Writes a seeded float32 cache of ``--gb`` gigabytes (one layer, ``--dim`` features,
8 languages) with ``EmbeddingCache.from_arrays`` (chunk by chunk, bounded memory),
then fits ``LanguageStandardizer`` three ways and checks they agree:

1. ``dask.distributed.LocalCluster`` (process workers with ``--memory-limit`` each)
   on ``cache.to_dask(layer=0)``: block-wise float64 moments reduced in a tree;
2. one process streaming ``cache.iter_chunks`` into ``partial_fit``;
Reports rows/s, the peak RSS of each worker (polled from the client every 0.2 s),
the cluster's total memory (sampled by the scheduler), whether a worker was replaced
during the fit, the peak of the streaming process, and the largest difference between
the fitted statistics.

At 100 M rows nothing changes on the client: the statistics are L×d (and d×d for
Procrustes), so only the workers' share of the blocks grows; point the same code at
a multi-node cluster with ``--scheduler tcp://host:8786``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np


def _write_cache(path: Path, gb: float, dim: int, chunk_rows: int, seed: int):
    import dask.array as da

    from posthoc_align.cache import EmbeddingCache

    n = int(gb * 2**30 / (4 * dim))
    rng = np.random.default_rng(seed)
    langs = rng.choice([f"l{i}" for i in range(8)], size=n)
    offsets = rng.normal(scale=2.0, size=(8, dim)).astype(np.float32)
    codes = np.searchsorted(np.unique(langs), langs)
    X = da.random.default_rng(seed).standard_normal(
        (n, dim), chunks=(chunk_rows, dim), dtype=np.float32
    )
    off = da.from_array(codes, chunks=chunk_rows).map_blocks(
        lambda c: offsets[c], new_axis=1, chunks=(X.chunks[0], (dim,)), dtype=np.float32
    )
    t0 = time.perf_counter()
    cache = EmbeddingCache.from_arrays(
        path, (X + off)[:, None, :], languages=langs, chunk_rows=chunk_rows, overwrite=True
    )
    return cache, langs, time.perf_counter() - t0


def _worker_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class _WorkerPeaks:
    """Largest RSS of each worker process during a fit, polled from a client thread."""

    def __init__(self, client, interval: float = 0.2):
        import threading

        self.client, self.interval = client, interval
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for w, rss in self.client.run(_worker_rss).items():
                    self.peaks[w] = max(self.peaks.get(w, 0), rss)
            except Exception:  # noqa: BLE001 - a worker restarting mid-poll
                pass
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=0.5)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--chunk-rows", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--memory-limit", default="1GB")
    ap.add_argument("--scheduler", default=None, help="address of an existing cluster")
    ap.add_argument("--path", type=Path, default=Path("benchmarks/results/cache/scale.zarr"))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    from dask.distributed import Client, LocalCluster
    from distributed.diagnostics import MemorySampler

    from posthoc_align import LanguageStandardizer

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"python {platform.python_version()}"
    )
    cache, langs, t_write = _write_cache(a.path, a.gb, a.dim, a.chunk_rows, a.seed)
    n = cache.n_rows
    print(
        f"cache: {n:,} rows x {a.dim} float32 = {n * a.dim * 4 / 2**30:.2f} GiB, "
        f"8 languages, chunks of {a.chunk_rows} rows; written in {t_write:.1f} s"
    )

    if a.scheduler:
        client, cluster = Client(a.scheduler), None
    else:
        cluster = LocalCluster(
            n_workers=a.workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=a.memory_limit,
            dashboard_address=None,
        )
        client = Client(cluster)
    print(
        f"dask: {len(client.scheduler_info()['workers'])} workers, "
        f"memory limit {a.memory_limit} each"
    )
    ms = MemorySampler()
    X = cache.to_dask(layer=0)
    workers_before = set(client.scheduler_info()["workers"])
    poll = _WorkerPeaks(client)
    poll.start()
    with ms.sample("fit"):
        t0 = time.perf_counter()
        est_dask = LanguageStandardizer().fit(X, languages=langs)
        t_dask = time.perf_counter() - t0
    poll.stop()
    peak = ms.to_pandas()["fit"].max() / 2**30 if hasattr(ms, "to_pandas") else float("nan")
    lost = workers_before - set(client.scheduler_info()["workers"])
    print(
        f"peak RSS per worker (polled every {poll.interval} s): "
        + ", ".join(f"{v / 2**30:.2f} GiB" for v in poll.peaks.values())
        + f"; workers replaced during the fit: {len(lost)}"
    )
    client.close()
    if cluster is not None:
        cluster.close()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    est_stream = LanguageStandardizer()
    for Xc, lc, _ in cache.iter_chunks(layer=0):
        est_stream.partial_fit(Xc, languages=lc)
    t_stream = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    diff = max(
        np.abs(est_dask.means_ - est_stream.means_).max(),
        np.abs(est_dask.vars_ - est_stream.vars_).max(),
    )
    print()
    print("| path | seconds | rows/s | peak memory |")
    print("|---|---|---|---|")
    print(
        f"| LocalCluster ({a.workers} workers, {a.memory_limit} each) | {t_dask:.1f} | "
        f"{n / t_dask:,.0f} | {max(poll.peaks.values(), default=float('nan')) / 2**30:.2f} GiB "
        f"largest worker peak; {peak:.2f} GiB cluster total (sampled) |"
    )
    print(
        f"| one process, iter_chunks + partial_fit | {t_stream:.1f} | {n / t_stream:,.0f} | "
        f"{rss:.2f} GiB max RSS (was {base:.2f} before) |"
    )
    print(f"\nlargest difference between the two fits: {diff:.2e}")


if __name__ == "__main__":
    main()
