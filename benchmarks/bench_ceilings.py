"""One command: fit, transform, retrieval and encoding beside the machine's ceiling and the loop.

For each stage this prints our time, the *ceiling* — the bare torch operation that moves the same
bytes or does the same flops, measured on the same device in the same run — and the
*research-code baseline*, a straightforward re-implementation as papers' code does it (a Python
loop over languages with boolean masks, a full similarity matrix, an unsorted encoding loop).

===========  ================================  =========================================  ==============================================
stage        ours                              ceiling (same bytes / flops)               research-code baseline
===========  ================================  =========================================  ==============================================
fit          estimator ``fit``                 ``X.sum(0)`` (mean/variance fits), one      per-language boolean-mask loop (means, SVD
                                               ``A.T @ B`` of the pair shape (Procrustes)  of A.T B after dict matching of pair ids)
transform    estimator ``transform``           ``torch.sub(X, v, out=buf)`` (elementwise), per-language masked subtract / matmul
                                               ``torch.matmul(X, W, out=buf)`` (rotation)
retrieval    ``metrics.retrieval_accuracy``    blocked ``Q @ T.T`` of the same shape        full n×n similarity, argmax; CSLS with
                                               (no top-k, no bookkeeping)                  ``topk`` over the full matrix
encoding     ``HFEncoder.encode`` (all layers) the bare forward pass over the same length-  sentence-transformers (last layer) when
                                               sorted, pre-tokenised batches                installed, else an unsorted plain loop
===========  ================================  =========================================  ==============================================

Usage::

    python benchmarks/bench_ceilings.py                    # ~2-4 minutes on 2 cores
    python benchmarks/bench_ceilings.py --device cuda      # on a GPU machine
    python benchmarks/bench_ceilings.py --tiny             # seconds: a smoke run

Each time is the best of ``--repeat`` runs after a warm-up. The machine, sizes and threads are
printed first; ``--output FILE`` also writes the table as Markdown.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import posthoc_align as pa  # noqa: E402
from posthoc_align import metrics  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, device: str, repeat: int) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def loop_repeat(repeat: int) -> int:
    """Timed runs of the (slow) research-code baselines: half of ``repeat``, at least 1."""
    return max(1, repeat // 2)


def make_data(n: int, d: int, n_lang: int, seed: int = 0):
    """Translations of one signal with one offset and one rotation-free noise per language."""
    rng = np.random.default_rng(seed)
    per = n // n_lang
    base = rng.standard_normal((per, d), dtype=np.float32)
    names = ["en"] + [f"l{i:02d}" for i in range(1, n_lang)]
    X = np.concatenate(
        [base + rng.normal(scale=2, size=d).astype(np.float32) for _ in range(n_lang)]
    )
    X += 0.3 * rng.standard_normal(X.shape, dtype=np.float32)
    return X, np.repeat(names, per), np.tile(np.arange(per), n_lang)


# ---------------------------------------------------------------- research-code baselines
def loop_means(X, L):
    return {lang: X[L == lang].mean(0) for lang in np.unique(L)}


def loop_center(X, L, means):
    out = X.copy()
    for lang, mu in means.items():
        m = L == lang
        out[m] = X[m] - mu
    return out


def loop_std_fit(X, L):
    return {lang: (X[L == lang].mean(0), X[L == lang].std(0) + 1e-6) for lang in np.unique(L)}


def loop_std(X, L, stats):
    out = X.copy()
    for lang, (mu, sd) in stats.items():
        m = L == lang
        out[m] = (X[m] - mu) / sd
    return out


def loop_lsar_fit(X, L):
    M = np.stack(list(loop_means(X, L).values()))
    _, _, Vt = np.linalg.svd(M - M.mean(0), full_matrices=False)
    return Vt[: len(M) - 1]


def loop_procrustes_fit(X, L, P, pivot="en"):
    piv = {p: i for i, p in zip(np.flatnonzero(L == pivot), P[L == pivot], strict=True)}
    mu_piv = X[L == pivot].mean(0)
    out = {}
    for lang in np.unique(L):
        if lang == pivot:
            continue
        rows = np.flatnonzero(L == lang)
        src = [i for i in rows if P[i] in piv]
        A = X[src] - X[rows].mean(0)
        B = X[[piv[P[i]] for i in src]] - mu_piv
        U, _, Vt = np.linalg.svd(A.T @ B)
        out[lang] = (X[rows].mean(0), U @ Vt)
    out[pivot] = (mu_piv, np.eye(X.shape[1], dtype=X.dtype))
    return out


def loop_rotate(X, L, fitted):
    out = np.empty_like(X)
    for lang, (mu, W) in fitted.items():
        m = L == lang
        out[m] = (X[m] - mu) @ W
    return out


def full_matrix_retrieval(Q, T, scoring, k=10):
    Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    T = T / np.linalg.norm(T, axis=1, keepdims=True)
    S = torch.from_numpy(Q @ T.T)
    if scoring == "csls":
        r_q = S.topk(k, dim=1).values.mean(1)
        r_t = S.topk(k, dim=0).values.mean(0)
        S = 2 * S - r_q[:, None] - r_t[None, :]
    return float((S.argmax(1).numpy() == np.arange(len(Q))).mean())


# ---------------------------------------------------------------- stages
def fit_transform_rows(X, L, P, device: str, repeat: int) -> list[list]:
    Xd = torch.from_numpy(X).to(device)
    n, d = X.shape
    buf = torch.empty_like(Xd)
    v = Xd[0].clone()
    W = torch.linalg.qr(torch.randn(d, d, device=device))[0].to(Xd.dtype)
    n_pairs = int((L != "en").sum())
    A, B = Xd[-n_pairs:], Xd[:n_pairs]
    t = functools.partial(best_time, device=device, repeat=repeat)
    torch_ceil = {
        "sum": lambda: Xd.sum(0),
        "gemm": lambda: A.T @ B,
        "sub": lambda: torch.sub(Xd, v, out=buf),
        "rot": lambda: torch.matmul(Xd, W, out=buf),
    }
    names = {
        "sum": "X.sum(0)",
        "gemm": "A.T @ B",
        "sub": "sub(X, v, out=)",
        "rot": "matmul(X, W, out=)",
    }
    ceil = {key: t(fn) for key, fn in torch_ceil.items()}
    if device == "cpu":  # the machine's ceiling: the faster of torch and numpy, named
        An, Bn, vn, Wn = A.numpy(), B.numpy(), v.numpy(), W.numpy()
        nbuf = np.empty_like(X)
        numpy_ceil = {
            "sum": lambda: X.sum(0),
            "gemm": lambda: An.T @ Bn,
            "sub": lambda: np.subtract(X, vn, out=nbuf),
            "rot": lambda: np.matmul(X, Wn, out=nbuf),
        }
        for key, fn in numpy_ceil.items():
            tn = t(fn)
            lib = "numpy" if tn < ceil[key] else "torch"
            ceil[key] = min(tn, ceil[key])
            names[key] = f"{names[key]} ({lib})"
    loops = {  # the loop baselines run on the host, numpy (as research code does)
        "LanguageMeanCentering": (
            lambda: loop_means(X, L),
            lambda f: loop_center(X, L, f),
        ),
        "LanguageStandardizer": (lambda: loop_std_fit(X, L), lambda f: loop_std(X, L, f)),
        "LSAR": (
            lambda: loop_lsar_fit(X, L),
            lambda V: X - (X @ V.T) @ V,
        ),
        "ProcrustesAligner": (
            lambda: loop_procrustes_fit(X, L, P),
            lambda f: loop_rotate(X, L, f),
        ),
    }
    rows = []
    for name, est, fit_ceil, tr_ceil in [
        ("LanguageMeanCentering", pa.LanguageMeanCentering(device=device), "sum", "sub"),
        ("LanguageStandardizer", pa.LanguageStandardizer(device=device), "sum", "sub"),
        ("LSAR", pa.LSAR(device=device), "sum", "sub"),
        ("ProcrustesAligner", pa.ProcrustesAligner(device=device), "gemm", "rot"),
    ]:
        fit_kw = {"languages": L, **({"pair_ids": P} if "Procrustes" in name else {})}
        tr_kw = {} if name == "LSAR" else {"languages": L}
        ours_fit = t(lambda est=est, fit_kw=fit_kw: est.fit(Xd, **fit_kw))
        ours_tr = t(lambda est=est, tr_kw=tr_kw: est.transform(Xd, **tr_kw))
        lfit, ltr = loops[name]
        fitted = lfit()
        # speed is not bought with wrong answers: ours must give the loop's output
        got = est.transform(Xd, **tr_kw)
        got = got.cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
        want = ltr(fitted)
        err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
        if err > 1e-4:
            raise AssertionError(f"{name}: ours differs from the loop baseline ({err:.1e})")
        loop_fit = best_time(lfit, "cpu", loop_repeat(repeat))
        loop_tr = best_time(lambda ltr=ltr, fitted=fitted: ltr(fitted), "cpu", loop_repeat(repeat))
        shape = f"{n:,}×{d}, {len(np.unique(L))} langs"
        rows.append(
            ["fit", f"{name} ({shape})", ours_fit, names[fit_ceil], ceil[fit_ceil], loop_fit]
        )
        rows.append(["transform", f"{name} ({shape})", ours_tr, names[tr_ceil], ceil[tr_ceil], loop_tr])  # fmt: skip
    return rows


def retrieval_rows(n: int, device: str, repeat: int) -> list[list]:
    X, L, P = make_data(2 * n, 384, 2)
    Q, T = X[:n], X[n:]
    Xd = torch.from_numpy(X).to(device)
    Qd = torch.nn.functional.normalize(Xd[:n], dim=1)
    Td = torch.nn.functional.normalize(Xd[n:], dim=1)

    def gemm(step=8192):
        for s in range(0, n, step):
            Qd[s : s + step] @ Td.T

    ceiling = best_time(gemm, device, repeat)
    rows = []
    for scoring in ("cosine", "csls"):
        ours_fn = functools.partial(
            metrics.retrieval_accuracy, Xd, L, P, "en", "l01", scoring=scoring, device=device
        )
        ours = best_time(ours_fn, device, repeat)
        base_fn = functools.partial(full_matrix_retrieval, Q, T, scoring)
        base = best_time(base_fn, "cpu", loop_repeat(repeat))
        a, b = ours_fn(), base_fn()
        if abs(a - b) > 1e-3:
            raise AssertionError(f"retrieval {scoring}: ours {a} != baseline {b}")
        gemm_name = f"Q @ T.T ({'×2 ' if scoring == 'csls' else ''}blocked)"
        rows.append(
            ["retrieval", f"P@1 {scoring} ({n:,}×{n:,}×384)", ours, gemm_name,
             ceiling * (2 if scoring == "csls" else 1), base]
        )  # fmt: skip
    return rows


def encoding_rows(n_texts: int, device: str, repeat: int, tiny: bool) -> list[list]:
    from bench_encode import load_texts

    from posthoc_align.encoders import HFEncoder

    if tiny:
        from transformers import BertConfig, BertModel, BertTokenizerFast

        vocab = Path(os.environ.get("TMPDIR", "/tmp")) / "bench_ceilings_vocab.txt"
        vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz")))  # fmt: skip
        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64)).eval()  # fmt: skip
        enc = HFEncoder(model, BertTokenizerFast(vocab_file=str(vocab)), device=device,
                        show_progress_bar=False)  # fmt: skip
        what = "tiny random BERT"
        texts, source = load_texts(n_texts, "stdlib")
    else:
        from posthoc_align.encoders import load_offline_encoder

        enc = load_offline_encoder(device=device, show_progress_bar=False)
        what = "offline multilingual-e5-small"
        texts, source = load_texts(n_texts, "auto")
    bs = enc.batch_size
    tok, model, prefix = enc.tokenizer, enc.model, enc.prefix or ""
    order = np.argsort([len(t) for t in texts], kind="stable")
    batches = [
        tok([prefix + texts[i] for i in order[s : s + bs]], padding=True, truncation=True,
            max_length=enc.max_length, return_tensors="pt").to(enc.device)
        for s in range(0, len(texts), bs)
    ]  # fmt: skip

    def bare():
        with torch.inference_mode():
            for b in batches:
                model(**b)

    ceiling = best_time(bare, device, repeat)
    ours = best_time(lambda: enc.encode(texts), device, repeat)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from sentence_transformers import SentenceTransformer, models
        if tiny:
            raise ImportError("tiny model: plain loop")
        st = SentenceTransformer(
            modules=[models.Transformer(enc.model.name_or_path),
                     models.Pooling(model.config.hidden_size, "mean")], device=device,
        )  # fmt: skip
        prefixed = [prefix + t for t in texts]
        base_name = "sentence-transformers"
        base = best_time(
            lambda: st.encode(prefixed, batch_size=bs, show_progress_bar=False), device, repeat
        )
    except ImportError:
        base_name = "plain unsorted loop"

        def loop():
            with torch.inference_mode():
                for s in range(0, len(texts), bs):
                    b = tok([prefix + t for t in texts[s : s + bs]], padding=True,
                            truncation=True, return_tensors="pt").to(enc.device)  # fmt: skip
                    h = model(**b).last_hidden_state
                    m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
                    ((h * m).sum(1) / m.sum(1)).cpu()

        base = best_time(loop, device, repeat)
    n_layers = model.config.num_hidden_layers + 1
    return [
        ["encoding", f"{what}, {len(texts)} {source.split(' (')[0]}, all {n_layers} layers, "
         f"batch {bs}", ours, "bare forward, sorted, pre-tokenised", ceiling, base,
         base_name],
    ]  # fmt: skip


def machine(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpu = f"; GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else ""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}{gpu}; "
        f"load average {load}; torch {torch.__version__}, numpy {np.__version__}"
    )


def to_markdown(rows: list[list]) -> str:
    out = [
        "| stage | case | ours (s) | ceiling | ceiling (s) | ours / ceiling | baseline (s) | "
        "baseline / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        stage, case, ours, cname, ceil, base = r[:6]
        bname = f" ({r[6]})" if len(r) > 6 else ""
        out.append(
            f"| {stage} | {case} | {ours:.4f} | {cname} | {ceil:.4f} | {ours / ceil:.2f}× | "
            f"{base:.4f}{bname} | {base / ours:.1f}× |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--n", type=int, default=200_000, help="rows for fit/transform")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--languages", type=int, default=8)
    ap.add_argument("--n-retrieval", type=int, default=20_000, help="queries = targets")
    ap.add_argument("--n-texts", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", nargs="*", choices=["fit", "retrieval", "encoding"], default=None)
    ap.add_argument("--tiny", action="store_true", help="smoke run at tiny sizes")
    ap.add_argument("--output", type=Path, default=None, help="also write the table here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tiny:
        a.n, a.d, a.languages, a.n_retrieval, a.n_texts, a.repeat = 2000, 32, 4, 300, 16, 1
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    only = set(a.only or ["fit", "retrieval", "encoding"])
    header = [
        f"machine: {machine(a.device)}",
        f"device: {a.device}; fit/transform {a.n:,} × {a.d} float32, {a.languages} languages; "
        f"retrieval {a.n_retrieval:,} × {a.n_retrieval:,} × 384; encoding {a.n_texts} texts; "
        f"ours and ceilings best of {a.repeat} after a warm-up, research-code baselines best of "
        f"{loop_repeat(a.repeat)}; on the CPU each ceiling is the faster of torch and numpy",
        "",
    ]
    print("\n".join(header), flush=True)
    rows: list[list] = []
    if "fit" in only:
        rows += fit_transform_rows(*make_data(a.n, a.d, a.languages), a.device, a.repeat)
    if "retrieval" in only:
        rows += retrieval_rows(a.n_retrieval, a.device, a.repeat)
    if "encoding" in only:
        rows += encoding_rows(a.n_texts, a.device, a.repeat, a.tiny)
    table = to_markdown(rows)
    print(table)
    if a.output:
        a.output.write_text("\n".join(header) + "\n" + table + "\n")
    return table


if __name__ == "__main__":
    main()
