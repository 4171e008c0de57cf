"""Benchmark EmbeddingCache.build: peak memory and rows/s, against the encoder alone.

Each measurement runs in a fresh child process so ``ru_maxrss`` means something:

- ``encode only``: the encoder over every chunk, results dropped (the baseline);
- ``build``: the same encoder through :meth:`EmbeddingCache.build` (encode + write);
- ``build (tracemalloc)``: the same build again under tracemalloc, for the peak of
  Python/numpy allocations (slower; its time is not reported);
- ``iter_chunks``: streaming the last layer back;
- ``scaling`` (``--sizes``): ``build`` again at each corpus size, same chunk, recording the RSS
  after every chunk (through ``progress``), to show that memory does not grow with the corpus.

RSS growth is measured from just before the timed part, after imports, inputs and the model:
the peak (``VmHWM``, reset there through ``/proc/self/clear_refs`` when Linux allows it, else
``ru_maxrss``) minus the RSS at that point. The per-chunk curve holds, after each chunk, the
current RSS and the peak so far (both as growth); its summary skips the first ``--warmup``
chunks (allocator and first-batch warm-up) and reports the growth after the first kept chunk,
after the last one and the largest.

With ``--real`` every model weight is read once before the baseline (``_page_in``): the model
is memory-mapped from its safetensors file, and its 366 MiB word-embedding matrix would
otherwise be paged in (and counted in RSS) bit by bit as the corpus reaches more of the
vocabulary, which looks like growth with the corpus but is the model's own memory.
The fake encoder returns random float32 arrays of shape ``(n, layers + 1, dim)``; with
``--real`` (and ``posthoc_align.encoders.load_offline_encoder`` and
``posthoc_align.datasets.load_bible`` importable) the same runs use the offline
multilingual-e5-small on Bible verses; ``--no-pool-in-hooks`` runs that encoder with
``pool_in_hooks=False`` (every hidden state of a batch returned, then pooled: the path before
pooling moved inside the forward pass), for a before/after comparison on the same code.

Usage::

    python benchmarks/bench_cache.py                      # 20,000 rows, 13 x 384, float32
    python benchmarks/bench_cache.py --dtype float16
    python benchmarks/bench_cache.py --real --verses 300  # 300 verses x (en, fr, de)
    python benchmarks/bench_cache.py --real --sizes 700,3334 --memory-only  # 2,100 vs 10,002 rows
    python benchmarks/bench_cache.py --real --sizes 1000 --memory-only --no-pool-in-hooks
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


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mb() -> float:
    """Current RSS (MiB); the peak so far where /proc is missing."""
    rss = _status_mb("VmRSS")
    return _maxrss_mb() if rss is None else rss


def _reset_peak() -> bool:
    """Reset the peak RSS to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _peak_mb() -> float:
    """Peak RSS (MiB) since the last ``_reset_peak``, or of the process."""
    hwm = _status_mb("VmHWM")
    return _maxrss_mb() if hwm is None else hwm


def _inputs(args: argparse.Namespace):
    if args.real:
        from posthoc_align.datasets.bible import load_bible
        from posthoc_align.encoders import load_offline_encoder

        bible = load_bible(
            ("en", "fr", "de"), testament="new", n_verses=args.verses, random_state=0
        )
        encoder = load_offline_encoder(
            batch_size=args.batch_size, pool_in_hooks=not args.no_pool_in_hooks
        )
        _page_in(encoder)
        return encoder, list(bible.data), bible.languages, bible.pair_ids
    n = args.rows
    texts = [f"sentence number {i}" for i in range(n)]
    languages = np.array(["en", "fr", "de", "zh"])[np.arange(n) % 4]
    return RandomEncoder(args.layers, args.dim), texts, languages, np.arange(n) // 4


def _page_in(encoder) -> None:
    """Read every weight once, before the baseline.

    ``from_pretrained`` maps ``model.safetensors`` into memory, and the kernel reads a page in
    (counted in RSS as file-backed memory) only when it is first used: the 366 MiB word-embedding
    matrix of e5-small (250k tokens) comes in row by row as the corpus uses more of the
    vocabulary, so without this the RSS grows with the corpus by up to the model's size. Those
    pages are the model's, clean and reclaimable, not the build's.
    """
    import torch

    with torch.no_grad():
        for param in encoder.model.parameters():
            param.sum()


def _max_tokens(encoder, texts: list[str]) -> int | None:
    """Longest text in tokens (prefix and special tokens included), tokenized 1,024 at a time."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:
        return None
    prefix = getattr(encoder, "prefix", None) or ""
    longest = 0
    for a in range(0, len(texts), 1024):
        ids = tokenizer([prefix + t for t in texts[a : a + 1024]])["input_ids"]
        longest = max(longest, *map(len, ids))
    return min(longest, encoder._max_tokens()) if hasattr(encoder, "_max_tokens") else longest


def _child(args: argparse.Namespace) -> dict:
    from posthoc_align.cache import EmbeddingCache

    path = Path(args.path)
    if args.task == "iter":
        cache = EmbeddingCache(path)
        result = {"rows": cache.n_rows, "dim": cache.dim, "layers": cache.n_layers}
        before, reset = _rss_mb(), _reset_peak()
        base_peak = _peak_mb()  # = before where the peak could be reset
        t0 = time.perf_counter()
        total = 0.0
        for X, _, _ in cache.iter_chunks(layer=-1):
            total += float(X[:, 0].sum())
        result["seconds"] = time.perf_counter() - t0
    else:
        encoder, texts, languages, pair_ids = _inputs(args)
        shutil.rmtree(path, ignore_errors=True)
        result = {"rows": len(texts), "dim": encoder.hidden_size, "layers": encoder.n_layers + 1}
        if args.task == "build-curve":
            result["max_tokens"] = _max_tokens(encoder, texts)
        curve: list[tuple[int, float, float]] = []

        def record(done: int, total: int) -> None:  # after each chunk: current and peak RSS
            curve.append(
                (
                    done,
                    _rss_mb() - before,
                    _peak_mb() - base_peak,
                    (_status_mb("RssAnon") or 0) - anon0,
                    (_status_mb("RssFile") or 0) - file0,
                )
            )

        anon0, file0 = _status_mb("RssAnon") or 0, _status_mb("RssFile") or 0
        before, reset = _rss_mb(), _reset_peak()
        base_peak = _peak_mb()  # = before where the peak could be reset
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
                progress=record if args.task == "build-curve" else False,
            )
        result["seconds"] = time.perf_counter() - t0
        if tracing:
            result["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 1e6
            tracemalloc.stop()
        if curve:
            result["curve"] = curve
    # without a reset, the growth of the process's peak (model loading may hide some)
    result["rss_growth_mb"] = _peak_mb() - base_peak
    result["maxrss_mb"] = _maxrss_mb()
    result["peak_reset"] = reset
    if args.task.startswith("build"):
        result["store_mb"] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    return result


def _run(task: str, args: argparse.Namespace, path: Path, size: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", task, "--path", str(path)]
    for key in ("rows", "layers", "dim", "chunk_rows", "dtype", "verses", "batch_size"):
        value = size if size is not None and key == ("verses" if args.real else "rows") else None
        cmd += [f"--{key.replace('_', '-')}", str(value or getattr(args, key))]
    if args.real:
        cmd.append("--real")
    if args.no_pool_in_hooks:
        cmd.append("--no-pool-in-hooks")
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
    parser.add_argument(
        "--no-pool-in-hooks",
        action="store_true",
        help="--real: HFEncoder(pool_in_hooks=False), all hidden states returned then pooled",
    )
    parser.add_argument("--verses", type=int, default=300, help="--real: verses per language")
    parser.add_argument("--batch-size", type=int, default=64, help="--real: encoder batch size")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated corpus sizes (rows, or --real verses per language) for the scaling "
        "runs: build at each, same chunk_rows, RSS recorded after every chunk",
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="only the scaling runs (--sizes, or the size)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="chunks left out of the per-chunk RSS summary"
    )
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

    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else []
    if args.memory_only and not sizes:
        sizes = [args.verses if args.real else args.rows]
    print(_machine())
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_cache_"))
    work.mkdir(parents=True, exist_ok=True)
    path = work / "bench.zarr"
    try:
        if not args.memory_only:
            _main_table(args, path)
        if sizes:
            _scaling(args, path, sizes)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def _source(args: argparse.Namespace) -> str:
    return "offline e5-small on Bible verses" if args.real else "fake random encoder"


def _main_table(args: argparse.Namespace, path: Path) -> None:
    enc = _run("encode", args, path)
    build = _run("build", args, path)
    traced = _run("build-traced", args, path)
    read = _run("iter", args, path)
    n, L, d = build["rows"], build["layers"], build["dim"]
    itemsize = 2 if args.dtype == "float16" else 4
    chunk_mb = args.chunk_rows * L * d * 4 / 1e6
    data_mb = n * L * d * itemsize / 1e6
    print(
        f"{_source(args)}: {n} rows x {L} layers x {d} dims, {args.dtype}, "
        f"chunk_rows={args.chunk_rows} (one float32 chunk = {chunk_mb:.1f} MB; all rows = "
        f"{data_mb:.0f} MB, on disk {build['store_mb']:.0f} MB)"
    )
    print(f"{'':22s}{'seconds':>9s}{'rows/s':>10s}{'RSS growth MiB':>16s}{'max RSS MiB':>13s}")
    for name, r in (
        ("encode only", enc),
        ("build", build),
        ("iter_chunks(-1)", read),
    ):
        print(
            f"{name:22s}{r['seconds']:9.2f}{n / r['seconds']:10.0f}"
            f"{r['rss_growth_mb']:16.1f}{r['maxrss_mb']:13.1f}"
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


def _scaling(args: argparse.Namespace, path: Path, sizes: list[int]) -> None:
    """``build`` at each corpus size (fresh process, same chunk): RSS growth vs corpus size."""
    runs = [_run("build-curve", args, path, size) for size in sizes]
    L, d = runs[0]["layers"], runs[0]["dim"]
    chunk_mib = args.chunk_rows * L * d * 4 / 2**20
    print(
        f"\nscaling: {_source(args)}, {L} layers x {d} dims, {args.dtype}, chunk_rows="
        f"{args.chunk_rows} (one float32 chunk = {chunk_mib:.1f} MiB), batch_size="
        f"{args.batch_size if args.real else '-'}"
        f"{', pool_in_hooks=False' if args.real and args.no_pool_in_hooks else ''}"
        "; one fresh process per size. Per-chunk RSS "
        f"growth after each chunk, first {args.warmup} chunk(s) left out: current RSS "
        "first/last/max, peak so far first/last, anonymous memory (RssAnon) first/last/max, "
        "file-backed (RssFile) after the last chunk."
    )
    print(
        f"{'rows':>7s}{'tokens':>7s}{'chunks':>7s}{'store MiB':>10s}{'seconds':>9s}"
        f"{'peak growth MiB':>16s}{'current first/last/max':>24s}{'peak first/last':>17s}"
        f"{'anon first/last/max':>21s}{'file last':>10s}"
    )
    for r in runs:
        curve = r["curve"]
        kept = curve[args.warmup :] or curve
        cur = [c[1] for c in kept]
        print(
            f"{r['rows']:7d}{r['max_tokens'] or '-':>7}{len(curve):7d}"
            f"{r['store_mb'] * 1e6 / 2**20:10.0f}{r['seconds']:9.0f}{r['rss_growth_mb']:16.0f}"
            f"{f'{cur[0]:.0f}/{cur[-1]:.0f}/{max(cur):.0f}':>24s}"
            f"{f'{kept[0][2]:.0f}/{kept[-1][2]:.0f}':>17s}"
            f"{f'{kept[0][3]:.0f}/{kept[-1][3]:.0f}/{max(c[3] for c in kept):.0f}':>21s}"
            f"{kept[-1][4]:10.0f}"
        )
    for r in runs:
        values = [f"{c[1]:.0f}" for c in r["curve"]]
        step = max(1, len(values) // 40)
        print(
            f"  {r['rows']} rows, current RSS growth after every {step} chunk(s):",
            " ".join(values[::step]),
        )
    if len(runs) > 1:
        a, b = runs[0], runs[-1]
        print(
            f"{b['rows'] / a['rows']:.1f}x the rows ({b['store_mb'] / a['store_mb']:.1f}x the store): "
            f"peak RSS growth {a['rss_growth_mb']:.0f} -> {b['rss_growth_mb']:.0f} MiB "
            f"({b['rss_growth_mb'] - a['rss_growth_mb']:+.1f} MiB = "
            f"{(b['rss_growth_mb'] - a['rss_growth_mb']) / chunk_mib:+.1f} chunks)"
        )
    if not all(r["peak_reset"] for r in runs):
        print("(peak RSS could not be reset here: peaks are the whole process's, loading included)")


if __name__ == "__main__":
    main()
