"""One prepared script for a GPU machine: correctness against the CPU, and timings.

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-smoke     # here: same code on CPU, tiny sizes

1. Correctness: every estimator fitted on numpy/CPU and on CUDA tensors
   (``device="cuda"``) gives the same learned arrays and transforms (≤ 1e-5), and
   every metric gives the same value.
2. Timings, CPU beside GPU in the same run: fit and transform at 200,000 × 768 ×
   8 languages (float32), retrieval P@1 (cosine and CSLS) at 200,000 × 200,000 × 384,
   and encoding throughput of an e5-small-sized BERT (random weights: the real
   weights cannot travel to the device machine; speed does not depend on them).
Prints one Markdown table; ``--out`` writes it to a file.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

import posthoc_align as pa
from posthoc_align import metrics


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeat=3):
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def _data(n, d, n_lang, seed=0):
    rng = np.random.default_rng(seed)
    per = n // n_lang
    base = rng.standard_normal((per, d), dtype=np.float32)
    langs = np.repeat([f"l{i}" for i in range(n_lang)], per)
    langs[:per] = "en"
    X = np.concatenate(
        [base + rng.normal(scale=2, size=d).astype(np.float32) for _ in range(n_lang)]
    )
    X += 0.3 * rng.standard_normal(X.shape, dtype=np.float32)
    return X, langs, np.tile(np.arange(per), n_lang)


def correctness(dev: str, n: int, d: int) -> list[str]:
    X, L, P = _data(n, d, 4)
    Xt = torch.from_numpy(X).to(dev)
    stack = np.stack([X, X[:, ::-1].copy(), X * 2], axis=1)
    out = []
    cases = [
        (pa.LanguageMeanCentering, {}, ["means_"]),
        (pa.LanguageStandardizer, {}, ["means_", "vars_"]),
        (pa.LanguageStandardizer, {"mode": "batch"}, []),
        (pa.LSAR, {}, ["singular_values_"]),
        (pa.ProcrustesAligner, {"pivot": "en"}, ["rotations_"]),
    ]
    for cls, kw, attrs in cases:
        fit_kw = (
            {"languages": L, "pair_ids": P} if cls is pa.ProcrustesAligner else {"languages": L}
        )
        tr_kw = {} if cls is pa.LSAR else {"languages": L}
        cpu = cls(device="cpu", **kw).fit(X.astype(np.float64), **fit_kw)
        gpu = cls(device=dev, **kw).fit(Xt, **fit_kw)
        err = max([np.abs(getattr(cpu, a) - getattr(gpu, a)).max() for a in attrs] + [0.0])
        Z = gpu.transform(Xt, **tr_kw)
        assert isinstance(Z, torch.Tensor) and Z.device.type == torch.device(dev).type
        terr = np.abs(Z.cpu().numpy() - cpu.transform(X.astype(np.float64), **tr_kw)).max()
        scale = max(1.0, np.abs(X).max())
        ok = err / scale < 1e-5 and terr / scale < 1e-4
        out.append(
            f"| {cls.__name__}{kw or ''} | {err:.1e} | {terr:.1e} | {'ok' if ok else 'FAIL'} |"
        )
    ra_c = pa.RotateAlign(layers=(-1,), device="cpu").fit(stack, languages=L, pair_ids=P)
    ra_g = pa.RotateAlign(layers=(-1,), device=dev).fit(
        torch.from_numpy(stack).to(dev), languages=L, pair_ids=P
    )
    e = np.abs(ra_c.estimators_[0].rotations_ - ra_g.estimators_[0].rotations_).max()
    out.append(f"| RotateAlign | {e:.1e} | – | {'ok' if e < 1e-4 else 'FAIL'} |")
    for scoring in ("cosine", "csls"):
        a = metrics.retrieval_accuracy(X, L, P, "en", "l1", scoring=scoring, device="cpu")
        b = metrics.retrieval_accuracy(Xt, L, P, "en", "l1", scoring=scoring, device=dev)
        out.append(
            f"| retrieval {scoring} | {abs(a - b):.1e} | – | "
            f"{'ok' if abs(a - b) < 1e-6 else 'FAIL'} |"
        )
    a = metrics.alignment_scores(X, L, P, "en", "l1", device="cpu")
    b = metrics.alignment_scores(Xt, L, P, "en", "l1", device=dev)
    e = max(abs(a[k] - b[k]) for k in a)
    out.append(f"| alignment_scores | {e:.1e} | – | {'ok' if e < 1e-5 else 'FAIL'} |")
    return out


def timings(devices: list[str], n: int, d: int, n_lang: int, n_ret: int) -> list[str]:
    X, L, P = _data(n, d, n_lang)
    rows = []
    for name, make, kw in [
        ("LanguageMeanCentering", lambda dv: pa.LanguageMeanCentering(device=dv), {}),
        ("LanguageStandardizer", lambda dv: pa.LanguageStandardizer(device=dv), {}),
        ("LSAR", lambda dv: pa.LSAR(device=dv), {}),
        ("ProcrustesAligner", lambda dv: pa.ProcrustesAligner(device=dv), {"pair_ids": P}),
    ]:
        cells = []
        for dv in devices:
            Xd = torch.from_numpy(X).to(dv)
            est = make(dv)
            tf = _time(lambda est=est, Xd=Xd, kw=kw: est.fit(Xd, languages=L, **kw))
            tkw = {} if name == "LSAR" else {"languages": L}
            tt = _time(lambda est=est, Xd=Xd, tkw=tkw: est.transform(Xd, **tkw))
            cells.append(f"{tf:.3f} / {tt:.3f}")
        rows.append(f"| {name} fit / transform ({n:,}×{d}×{n_lang}) | " + " | ".join(cells) + " |")
    Xr, Lr, Pr = _data(2 * n_ret, 384, 2)
    for scoring in ("cosine", "csls"):
        cells = []
        for dv in devices:
            Xd = torch.from_numpy(Xr).to(dv)
            t = _time(
                lambda Xd=Xd, dv=dv, scoring=scoring: metrics.retrieval_accuracy(
                    Xd, Lr, Pr, "en", "l1", scoring=scoring, device=dv
                ),
                repeat=1,
            )
            cells.append(f"{t:.2f}")
        rows.append(
            f"| retrieval P@1 {scoring} ({n_ret:,}×{n_ret:,}×384) | " + " | ".join(cells) + " |"
        )
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=250037,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=1536,
    )
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(5, 250000, (256, 48))
    cells = []
    for dv in devices:
        m = model.to(dv)
        batch = ids.to(dv)

        def run(m=m, batch=batch):
            with torch.inference_mode():
                for s in range(0, batch.shape[0], 32):
                    out = m(input_ids=batch[s : s + 32], output_hidden_states=True)
                    torch.stack([h.mean(1) for h in out.hidden_states], 1).cpu()

        t = _time(run, repeat=1)
        cells.append(f"{batch.shape[0] / t:,.0f} texts/s")
    rows.append(
        "| encode, e5-small size, 48 tokens, all 13 layers, batch 32 | " + " | ".join(cells) + " |"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: tiny sizes on the CPU")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not a.cpu_smoke:
        print("no CUDA GPU visible to torch; run with --cpu-smoke to exercise the script")
        return
    dev = "cuda" if has_gpu else "cpu"
    name = torch.cuda.get_device_name(0) if has_gpu else platform.processor()
    lines = [
        f"device: {name}; torch {torch.__version__}; CPU threads {torch.get_num_threads()}",
        "",
        "| check | max abs diff (fit) | max abs diff (transform) | result |",
        "|---|---|---|---|",
    ]
    lines += correctness(dev, 4000 if has_gpu else 400, 64)
    sizes = (200_000, 768, 8, 200_000) if has_gpu else (4000, 64, 4, 2000)
    devices = ["cpu", "cuda"] if has_gpu else ["cpu"]
    lines += [
        "",
        "| timing (s, best of 3) | " + " | ".join(devices) + " |",
        "|---|" + "---|" * len(devices),
    ]
    lines += timings(devices, *sizes)
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
