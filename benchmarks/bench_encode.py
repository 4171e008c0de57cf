"""Benchmark HFEncoder.encode (all 13 layers) on the offline multilingual-e5-small.

Three runs over the same texts, batch size and process:

- ``HFEncoder fp32``: length-sorted batches, every layer pooled on the device;
- ``HFEncoder bf16``: the same under ``torch.autocast(bfloat16)``;
- a baseline: ``sentence_transformers`` encoding the same converted model (mean pooling,
  last layer) when it is importable, else a plain loop (batches in input order,
  ``model(**batch, output_hidden_states=True)``, mean pooling of the last layer only).

Texts are Bible verses (``posthoc_align.datasets.load_bible``, en/fr/ru/zh) when the data is
installed, else ~300 sentences from the docstrings of the standard library. The report gives the
machine, threads, sizes, texts/s, the ratio to the baseline, and the cosine of bf16 to fp32 per
layer. Each figure is the best of ``--repeats`` runs (the machine may be shared); bf16 runs once
on CPUs without native bf16, where it is several times slower than fp32.

Usage::

    python benchmarks/bench_encode.py                  # 256 texts, batch 32 (< 3 minutes)
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


def baseline(encoder, texts: list[str], batch_size: int):
    """sentence-transformers when importable, else a plain unsorted loop; last layer, mean."""
    try:
        from sentence_transformers import SentenceTransformer, models
    except ImportError:
        import torch

        model, tok, prefix = encoder.model, encoder.tokenizer, encoder.prefix or ""

        def run():
            out = []
            with torch.inference_mode():
                for start in range(0, len(texts), batch_size):
                    chunk = [prefix + t for t in texts[start : start + batch_size]]
                    batch = tok(
                        chunk, padding=True, truncation=True, max_length=512, return_tensors="pt"
                    )
                    last = model(**batch, output_hidden_states=True).hidden_states[-1]
                    mask = batch["attention_mask"].unsqueeze(-1).float()
                    out.append(((last * mask).sum(1) / mask.sum(1)).numpy())
            return np.concatenate(out)

        return "plain loop (unsorted, output_hidden_states, mean of last layer)", run
    folder = encoder.model.name_or_path
    st = SentenceTransformer(
        modules=[models.Transformer(folder), models.Pooling(384, "mean")], device="cpu"
    )
    prefixed = [(encoder.prefix or "") + t for t in texts]
    return "sentence-transformers encode (mean, last layer)", lambda: st.encode(
        prefixed, batch_size=batch_size, convert_to_numpy=True
    )


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
    return (
        f"{cpu} ({torch.backends.cpu.get_cpu_capability()}, native bf16: "
        f"{'yes' if _cpu_bf16() else 'no'}); {os.cpu_count()} logical CPUs; load average {load}; "
        f"{platform.platform()}"
    )


def busy() -> bool:
    return hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="number of texts")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--source", choices=["auto", "bible", "stdlib"], default="auto")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--convert", action="store_true", help="also time a fresh conversion")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    import torch
    import transformers

    from posthoc_align.encoders import HFEncoder, load_offline_encoder
    from posthoc_align.encoders.hf import _cpu_bf16

    if args.threads:
        torch.set_num_threads(args.threads)
    texts, source = load_texts(args.n, args.source)

    results: dict = {
        "machine": machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if args.convert:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            load_offline_encoder(cache_dir=tmp)
            results["conversion_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fp32 = load_offline_encoder(batch_size=args.batch_size, show_progress_bar=False)
    results["load_s"] = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no native bf16" is reported in the machine line
        bf16 = HFEncoder(fp32.model, fp32.tokenizer, batch_size=args.batch_size, dtype="bfloat16",
                         prefix=fp32.prefix, show_progress_bar=False)  # fmt: skip
    n_tokens = [len(ids) for ids in fp32.tokenizer([fp32.prefix + t for t in texts])["input_ids"]]
    name, run_baseline = baseline(fp32, texts, args.batch_size)

    fp32.encode(texts[: args.batch_size])  # warm-up: first-call allocations and kernels
    bf16.encode(texts[: args.batch_size])
    t_base, base = best_time(run_baseline, args.repeats)
    t_fp32, X32 = best_time(lambda: fp32.encode(texts), args.repeats)
    # Without native bf16 (AVX2 CPUs) autocast is several times slower: one run is enough.
    bf16_repeats = args.repeats if bf16.device.type != "cpu" or _cpu_bf16() else 1
    t_bf16, X16 = best_time(lambda: bf16.encode(texts), bf16_repeats)

    def cos(a, b):
        return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)

    per_layer = cos(X32, X16)  # (texts, layers)
    check = cos(X32[:, -1], np.asarray(base, dtype=np.float32))
    print(f"machine      {results['machine']}")
    if busy():
        print(
            "WARNING      load average above the CPU count: other processes share the CPUs, timings are unreliable"
        )
    print(f"threads      torch {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); "
          f"torch {torch.__version__}, transformers {transformers.__version__}")  # fmt: skip
    print(
        f"model        {fp32.model_id[:40]}... ({fp32.n_layers} layers, hidden {fp32.hidden_size})"
    )
    print(f"texts        {len(texts)} {source}; tokens/text mean {np.mean(n_tokens):.1f}, "
          f"max {max(n_tokens)}; batch size {args.batch_size}; best of {args.repeats} "
          f"(bf16: {bf16_repeats})")  # fmt: skip
    if "conversion_s" in results:
        print(f"conversion   {results['conversion_s']:.1f} s (fresh cache folder)")
    print(
        f"load         {results['load_s']:.1f} s (load_offline_encoder, cache present after first run)"
    )
    print()
    print(f"{'method':<66} {'s':>7} {'texts/s':>9} {'vs base':>8}")
    rows = [(f"baseline: {name}", t_base), ("HFEncoder fp32, all 13 layers", t_fp32),
            ("HFEncoder bf16 autocast, all 13 layers", t_bf16)]  # fmt: skip
    for label, seconds in rows:
        print(f"{label:<66} {seconds:7.2f} {len(texts) / seconds:9.1f} {t_base / seconds:7.2f}x")
    print()
    print(f"last layer, HFEncoder fp32 vs baseline: min cosine {check.min():.6f}")
    print("bf16 vs fp32 cosine per layer (min over texts / mean):")
    for layer in range(per_layer.shape[1]):
        print(
            f"  layer {layer:2d}: {per_layer[:, layer].min():.6f} / {per_layer[:, layer].mean():.6f}"
        )
    results.update(
        texts=len(texts), source=source, batch_size=args.batch_size, baseline=name,
        seconds={"baseline": t_base, "fp32": t_fp32, "bf16": t_bf16},
        texts_per_s={"baseline": len(texts) / t_base, "fp32": len(texts) / t_fp32, "bf16": len(texts) / t_bf16},
        bf16_min_cosine_per_layer=per_layer.min(0).tolist(),
    )  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
