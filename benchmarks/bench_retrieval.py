"""Benchmark: block-wise retrieval P@1 (cosine, CSLS) against a naive full-matrix baseline.

Each measurement runs in a fresh worker process, so its peak memory (``ru_maxrss``
minus the resident size once the data exist) is its own. The naive baseline is
numpy with the whole ``n × n`` similarity matrix; it runs at a size that fits
(``--baseline-n``), where the block-wise engine also runs so that the two can be
compared on the same machine, data and size. The block-wise engine alone then runs
at ``--n`` (and at 200,000 with ``--big``).

Usage::

    python benchmarks/bench_retrieval.py                  # 20k baseline, 50k x 50k x 384
    python benchmarks/bench_retrieval.py --big            # also 200k x 200k
    python benchmarks/bench_retrieval.py --n 5000 --baseline-n 2000   # quick
    python benchmarks/bench_retrieval.py --n 200000 --baseline-n 0 --queries 5000 \
        --scorings cosine     # 5,000 queries against 200k targets: memory at 200k scale
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def make_data(n: int, d: int, queries: int | None = None, seed: int = 0):
    """Source rows E and target rows E + noise, float32.

    With ``queries``, only the first ``queries`` source rows keep a partner; the
    others get their own pair_ids, so they are not queried (but still count in
    CSLS's r_S) while every target row stays in the search.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    E = rng.standard_normal((n, d), dtype=np.float32)
    T = E + 4.0 * rng.standard_normal((n, d), dtype=np.float32)
    X = np.concatenate([E, T])
    del E, T
    languages = np.repeat(np.array(["src", "tgt"]), n)
    src_ids = np.arange(n)
    if queries is not None and queries < n:
        src_ids[queries:] = -1 - src_ids[queries:]
    pair_ids = np.concatenate([src_ids, np.arange(n)])
    return X, languages, pair_ids


def naive(X, n: int, scoring: str, k: int) -> float:
    """Full n×n numpy similarity matrix; same tie rule (strictly greater)."""
    import numpy as np

    S = X[:n] / np.linalg.norm(X[:n], axis=1, keepdims=True)
    T = X[n:] / np.linalg.norm(X[n:], axis=1, keepdims=True)
    M = S @ T.T
    if scoring == "csls":
        r_s = -np.partition(-M, k - 1, axis=0)[:k].mean(axis=0)  # per target, over sources
        M *= 2
        M -= r_s[None, :]
    gold = M[np.arange(n), np.arange(n)].copy()
    M[np.arange(n), np.arange(n)] = -np.inf
    return float(np.mean(gold > M.max(axis=1)))


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    X, languages, pair_ids = make_data(spec["n"], spec["d"], spec.get("queries"))
    from posthoc_align.metrics import retrieval_accuracy

    base_rss = _rss_bytes()
    t0 = time.perf_counter()
    if spec["method"] == "naive":
        p1 = naive(X, spec["n"], spec["scoring"], spec["k"])
    else:
        p1 = retrieval_accuracy(
            X,
            languages,
            pair_ids,
            "src",
            "tgt",
            scoring=spec["scoring"],
            k=spec["k"],
            memory_budget=spec["budget"],
            device="cpu",
        )
    seconds = time.perf_counter() - t0
    return {**spec, "p1": p1, "seconds": seconds,
            "peak_extra_mib": max(0, _peak_bytes() - base_rss) / 2**20,
            "data_mib": X.nbytes / 2**20}  # fmt: skip


def run(spec: dict) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(spec["threads"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"worker failed for {spec}:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    import numpy as np
    import torch

    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown CPU"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (
        f"machine: {cpu}, {os.cpu_count()} logical CPUs, {platform.system()} "
        f"{platform.release()}\npython {platform.python_version()}, numpy {np.__version__}, "
        f"torch {torch.__version__}; threads per run: {threads}; "
        f"load average at start: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="rows per language, block-wise run")
    ap.add_argument("--baseline-n", type=int, default=20_000, help="rows per language, naive")
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--budget-mib", type=int, default=512)
    ap.add_argument("--big", action="store_true", help="also run 200,000 x 200,000")
    ap.add_argument(
        "--queries", type=int, default=None,
        help="block-wise runs: query only this many source rows (all target rows searched)",
    )  # fmt: skip
    ap.add_argument("--scorings", default="cosine,csls", help="comma-separated")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    print(machine(args.threads))
    print(f"float32 data, d={args.d}, CSLS k={args.k}, memory_budget={args.budget_mib} MiB")
    print(
        "each row: one call in a fresh process (cold: no warm-up, no repeats, for both methods)\n"
    )
    common = {"d": args.d, "k": args.k, "threads": args.threads, "budget": args.budget_mib * 2**20}
    header = f"{'method':<10}{'scoring':<8}{'queries x targets':>20}"
    header += f"{'P@1':>8}{'seconds':>10}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))

    def show(r: dict) -> None:
        q = r.get("queries")
        size = f"{min(q, r['n']) if q else r['n']:,} x {r['n']:,}"
        print(f"{r['method']:<10}{r['scoring']:<8}{size:>20}{r['p1']:>8.4f}"
              f"{r['seconds']:>10.2f}{r['peak_extra_mib']:>10.0f}", flush=True)  # fmt: skip

    scorings = args.scorings.split(",")
    ratios = []
    for scoring in scorings if args.baseline_n else ():
        res = {}
        for method in ("naive", "blockwise"):
            res[method] = run({**common, "n": args.baseline_n, "method": method,
                               "scoring": scoring})  # fmt: skip
            show(res[method])
        if abs(res["naive"]["p1"] - res["blockwise"]["p1"]) > 1e-3:
            print(f"  warning: P@1 differs ({res['naive']['p1']} vs {res['blockwise']['p1']})")
        ratios.append((scoring, res))
    sizes = [args.n] + ([200_000] if args.big and args.n != 200_000 else [])
    for n in sizes:
        for scoring in scorings:
            spec = {**common, "n": n, "method": "blockwise", "scoring": scoring}
            show(run({**spec, "queries": args.queries}))
    if ratios:
        print(f"\nat {args.baseline_n:,} x {args.baseline_n:,} (same machine, data, threads):")
    for scoring, res in ratios:
        nv, bw = res["naive"], res["blockwise"]
        print(f"  {scoring:<7} time naive/blockwise = {nv['seconds'] / bw['seconds']:.2f}, "
              f"peak memory naive/blockwise = "
              f"{nv['peak_extra_mib'] / max(bw['peak_extra_mib'], 1):.1f}")  # fmt: skip
    print("peak MiB: high-water RSS of the worker minus its RSS once the data exist.")


if __name__ == "__main__":
    main()
