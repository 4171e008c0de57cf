"""Benchmark EmbeddingCache.build: peak memory and rows/s, against the encoder alone.

Each measurement runs in a fresh child process so ``ru_maxrss`` means something:

- ``encode only``: the encoder over every chunk, results dropped (the baseline);
- ``build``: the same encoder through :meth:`EmbeddingCache.build` (encode + write);
- ``build (tracemalloc)``: the same build again under tracemalloc, for the peak of
  Python/numpy allocations (slower; its time is not reported);
- ``iter_chunks``: streaming the last layer back.

``ru_maxrss`` growth is measured from just before the timed part, after imports and inputs.
The fake encoder returns random float32 arrays of shape ``(n, layers + 1, dim)``; with
``--real`` (and ``posthoc_align.encoders.load_offline_encoder`` and
``posthoc_align.datasets.load_bible`` importable) the same runs use the offline
multilingual-e5-small on Bible verses.

Usage::

    python benchmarks/bench_cache.py                      # 20,000 rows, 13 x 384, float32
    python benchmarks/bench_cache.py --dtype float16
    python benchmarks/bench_cache.py --real --verses 300  # 300 verses x (en, fr, de)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class RandomEncoder:
    """Fake encoder: random float32 states, at numpy speed."""

    def __init__(self, n_layers: int, dim: int) -> None:
        self.model_id, self.pooling, self.prefix, self.max_length = "random", "mean", None, 512
        self.n_layers, self.hidden_size = n_layers, dim
        self.rng = np.random.default_rng(0)

    def encode(self, texts, pooling=None, layers="all"):
        return self.rng.standard_normal(
            (len(texts), self.n_layers + 1, self.hidden_size), np.float32
        )


def _maxrss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / (1024 * 1024 if sys.platform == "darwin" else 1024)


def _inputs(args: argparse.Namespace):
    if args.real:
        from posthoc_align.datasets.bible import load_bible
        from posthoc_align.encoders import load_offline_encoder

        bible = load_bible(
            ("en", "fr", "de"), testament="new", n_verses=args.verses, random_state=0
        )
        encoder = load_offline_encoder(batch_size=args.batch_size)
        return encoder, list(bible.data), bible.languages, bible.pair_ids
    n = args.rows
    texts = [f"sentence number {i}" for i in range(n)]
    languages = np.array(["en", "fr", "de", "zh"])[np.arange(n) % 4]
    return RandomEncoder(args.layers, args.dim), texts, languages, np.arange(n) // 4


def _child(args: argparse.Namespace) -> dict:
    from posthoc_align.cache import EmbeddingCache

    path = Path(args.path)
    if args.task == "iter":
        cache = EmbeddingCache(path)
        result = {"rows": cache.n_rows, "dim": cache.dim, "layers": cache.n_layers}
        before = _maxrss_mb()
        t0 = time.perf_counter()
        total = 0.0
        for X, _, _ in cache.iter_chunks(layer=-1):
            total += float(X[:, 0].sum())
        result["seconds"] = time.perf_counter() - t0
    else:
        encoder, texts, languages, pair_ids = _inputs(args)
        shutil.rmtree(path, ignore_errors=True)
        result = {"rows": len(texts), "dim": encoder.hidden_size, "layers": encoder.n_layers + 1}
        before = _maxrss_mb()
        tracing = args.task == "build-traced"
        if tracing:
            tracemalloc.start()
        t0 = time.perf_counter()
        if args.task == "encode":
            for a in range(0, len(texts), args.chunk_rows):
                encoder.encode(texts[a : a + args.chunk_rows], layers="all")
        else:
            EmbeddingCache.build(
                path,
                encoder,
                texts,
                languages=languages,
                pair_ids=pair_ids,
                chunk_rows=args.chunk_rows,
                dtype=args.dtype,
                progress=False,
            )
        result["seconds"] = time.perf_counter() - t0
        if tracing:
            result["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
            tracemalloc.stop()
    result["rss_growth_mb"] = _maxrss_mb() - before
    result["maxrss_mb"] = _maxrss_mb()
    if args.task.startswith("build"):
        result["store_mb"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    return result


def _run(task: str, args: argparse.Namespace, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--path", str(path)]
    for key in ("rows", "layers", "dim", "chunk_rows", "dtype", "verses", "batch_size"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.real:
        cmd.append("--real")
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{task} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _machine() -> str:
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        threads = torch.get_num_threads()
    except ImportError:
        gpu, threads = "torch not installed", "?"
    import zarr

    return (
        f"{platform.platform()} | {platform.processor() or platform.machine()} | "
        f"{os.cpu_count()} CPUs (torch threads {threads}) | {gpu}\n"
        f"Python {platform.python_version()}, numpy {np.__version__}, zarr {zarr.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--layers", type=int, default=12, help="transformer layers (+1 stored)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--real", action="store_true", help="offline e5-small on Bible verses")
    parser.add_argument("--verses", type=int, default=300, help="--real: verses per language")
    parser.add_argument("--batch-size", type=int, default=64, help="--real: encoder batch size")
    parser.add_argument("--dir", default=None, help="where stores go (default: a temp folder)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        args.task = args.child
        print(json.dumps(_child(args)))
        return

    if args.real:
        try:
            from posthoc_align.datasets.bible import load_bible  # noqa: F401
            from posthoc_align.encoders import load_offline_encoder  # noqa: F401
        except ImportError as exc:
            sys.exit(f"--real needs posthoc_align.encoders and posthoc_align.datasets: {exc}")

    print(_machine())
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "bench.zarr"
    try:
        enc = _run("encode", args, path)
        build = _run("build", args, path)
        traced = _run("build-traced", args, path)
        read = _run("iter", args, path)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    n, L, d = build["rows"], build["layers"], build["dim"]
    itemsize = 2 if args.dtype == "float16" else 4
    chunk_mb = args.chunk_rows * L * d * 4 / 1e6
    data_mb = n * L * d * itemsize / 1e6
    source = "offline e5-small on Bible verses" if args.real else "fake random encoder"
    print(
        f"{source}: {n} rows x {L} layers x {d} dims, {args.dtype}, chunk_rows={args.chunk_rows} "
        f"(one float32 chunk = {chunk_mb:.1f} MB; all rows = {data_mb:.0f} MB, "
        f"on disk {build['store_mb']:.0f} MB)"
    )
    print(f"{'':22s}{'seconds':>9s}{'rows/s':>10s}{'RSS growth MB':>15s}{'max RSS MB':>12s}")
    for name, r in (
        ("encode only", enc),
        ("build", build),
        ("iter_chunks(-1)", read),
    ):
        print(
            f"{name:22s}{r['seconds']:9.2f}{n / r['seconds']:10.0f}"
            f"{r['rss_growth_mb']:15.1f}{r['maxrss_mb']:12.1f}"
        )
    print(
        f"build / encode-only time: {build['seconds'] / enc['seconds']:.2f}x; "
        f"write cost {(build['seconds'] - enc['seconds']) / n * 1e6:.1f} us/row"
    )
    print(
        f"tracemalloc peak during build: {traced['traced_peak_mb']:.1f} MB "
        f"= {traced['traced_peak_mb'] / chunk_mb:.1f} float32 chunks "
        f"({traced['traced_peak_mb'] / data_mb * 100:.1f}% of the data)"
    )


if __name__ == "__main__":
    main()
