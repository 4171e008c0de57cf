"""alignment_profile on tiny random encoder and decoder models built here."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, PreTrainedTokenizerFast

from posthoc_align import LanguageMeanCentering
from posthoc_align.encoders import HFEncoder
from posthoc_align.profile import alignment_profile, best_layers

EN = [
    "the cat sat",
    "a big dog",
    "the red house",
    "a small tree",
    "the blue mat",
    "a dog ran",
    "the cat ran",
    "a red tree",
    "the big mat",
    "a blue house",
]
FR = [
    "le chat assis",
    "un grand chien",
    "la maison rouge",
    "un petit arbre",
    "le tapis bleu",
    "un chien courut",
    "le chat courut",
    "un arbre rouge",
    "le grand tapis",
    "une maison bleue",
]
WORDS = sorted({w for s in EN + FR for w in s.split()})


def _tok(specials, template=None, **kw):
    vocab = {w: i for i, w in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[-1]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        b, e = template
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A {e}", special_tokens=[(b, vocab[b]), (e, vocab[e])]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw), len(vocab)


@pytest.fixture(scope="module")
def dataset():
    from sklearn.utils import Bunch

    return Bunch(
        data=EN + FR,
        languages=np.array(["en"] * 10 + ["fr"] * 10),
        pair_ids=np.tile(np.arange(10), 2),
    )


def _bert():
    tok, v = _tok(
        ["[PAD]", "[CLS]", "[SEP]", "[UNK]"],
        ("[CLS]", "[SEP]"),
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=v,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return HFEncoder(BertModel(cfg, add_pooling_layer=False), tok, show_progress_bar=False)


def _gpt2():
    tok, v = _tok(["<|endoftext|>"], eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(1)
    cfg = GPT2Config(
        vocab_size=v, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return HFEncoder(GPT2Model(cfg), tok, pooling="last", show_progress_bar=False)


@pytest.mark.parametrize("make", [_bert, _gpt2], ids=["bert", "gpt2"])
def test_profile_tiny_models(make, dataset, tmp_path):
    enc = make()
    rows = alignment_profile(
        enc,
        dataset,
        metrics=("retrieval_cosine", "weak"),
        test_fraction=0.5,
        plot_path=str(tmp_path / "p.png"),
    )
    layers = {r["layer"] for r in rows}
    assert layers == set(range(enc.n_layers + 1))
    assert {r["transform"] for r in rows} == {"raw", "centring", "LSAR", "Procrustes"}
    assert all(0.0 <= r["value"] <= 1.0 for r in rows)
    assert (tmp_path / "p.png").stat().st_size > 1000
    best = best_layers(rows, "retrieval_cosine")
    assert set(best) == {"raw", "centring", "LSAR", "Procrustes"}


def test_profile_matches_manual_computation(rng):
    from posthoc_align.demo import heldout_split
    from posthoc_align.metrics import retrieval_accuracy

    X = rng.normal(size=(40, 3, 5))
    L = np.repeat(["en", "fr"], 20)
    P = np.tile(np.arange(20), 2)
    X[L == "fr"] += 2.0
    rows = alignment_profile(
        None, (X, L, P), transforms={"c": LanguageMeanCentering()}, metrics=("retrieval_cosine",)
    )
    train, test = heldout_split(P, 0.5, 0)
    c = LanguageMeanCentering().fit(X[train][:, 1], languages=L[train])
    ref = retrieval_accuracy(
        c.transform(X[test][:, 1], languages=L[test]), L[test], P[test], "en", "fr"
    )
    got = [r["value"] for r in rows if r["transform"] == "c" and r["layer"] == 1]
    assert got == [pytest.approx(ref)]


def test_profile_bad_input(rng):
    X = rng.normal(size=(10, 2, 3))
    with pytest.raises(ValueError, match="source language 'xx'"):
        alignment_profile(
            None, (X, np.repeat(["en", "fr"], 5), np.tile(np.arange(5), 2)), source="xx"
        )
    with pytest.raises(ValueError, match="has no 'data'"):
        alignment_profile(None, {"languages": []})


def test_profile_takes_width_changing_transforms(rng):
    from posthoc_align.axes import LanguageAxes
    from posthoc_align.demo import heldout_split
    from posthoc_align.metrics import retrieval_accuracy

    X = rng.normal(size=(60, 2, 6))
    L = np.repeat(["en", "fr", "de"], 20)
    P = np.tile(np.arange(20), 3)
    axes = LanguageAxes(mode="keep_neutral", n_neutral=4)
    rows = alignment_profile(
        None, (X, L, P), transforms={"kn": axes}, metrics=("retrieval_cosine",)
    )
    train, test = heldout_split(P, 0.5, 0)
    fitted = LanguageAxes(mode="keep_neutral", n_neutral=4).fit(X[train][:, 0], languages=L[train])
    Z = fitted.transform(X[test][:, 0])
    assert Z.shape[1] == 4
    ref = retrieval_accuracy(Z, L[test], P[test], "en", "fr")
    got = [
        r["value"]
        for r in rows
        if r["transform"] == "kn" and r["layer"] == 0 and r["target"] == "fr"
    ]
    assert got == [pytest.approx(ref)]


# -- pivots, the shape of X, the probes ---------------------------------------------------


def _three_languages(rng, n=40, n_layers=3, d=8):
    E = rng.normal(size=(n, n_layers, d))
    X = np.concatenate([E, E + 0.2 * rng.normal(size=E.shape), E + 0.2 * rng.normal(size=E.shape)])
    X[n : 2 * n] = X[n : 2 * n] @ np.linalg.qr(rng.normal(size=(d, d)))[0]  # fr is rotated
    L = np.repeat(["en", "fr", "de"], n)
    P = np.tile(np.arange(n), 3)
    return X, L, P


def bf_p_at_1(Z, L, P, s, t):
    """Share of source rows whose translation has the strictly highest cosine."""
    S, T = Z[L == s], Z[L == t]
    ps, pt = P[L == s], P[L == t]
    C = (S / np.linalg.norm(S, axis=1, keepdims=True)) @ (
        T / np.linalg.norm(T, axis=1, keepdims=True)
    ).T
    hits = []
    for i, p in enumerate(ps):
        j = np.flatnonzero(pt == p)[0]
        hits.append(C[i, j] > np.delete(C[i], j).max() + 1e-12)
    return np.mean(hits)


def test_profile_keeps_pivot_none_and_moves_a_set_pivot_to_the_source(rng):
    from posthoc_align import GeneralizedProcrustes, ProcrustesAligner
    from posthoc_align.demo import heldout_split

    X, L, P = _three_languages(rng)
    transforms = {"GPA": GeneralizedProcrustes(), "Proc": ProcrustesAligner(pivot="de")}
    rows = alignment_profile(
        None, (X, L, P), transforms=transforms, metrics=("retrieval_cosine",), source="fr"
    )
    train, test = heldout_split(P, 0.5, 0)
    for layer in range(3):
        gpa = GeneralizedProcrustes().fit(X[train][:, layer], languages=L[train], pair_ids=P[train])
        proc = ProcrustesAligner(pivot="fr").fit(
            X[train][:, layer], languages=L[train], pair_ids=P[train]
        )
        for name, est in (("GPA", gpa), ("Proc", proc)):
            Z = est.transform(X[test][:, layer], languages=L[test])
            for t in ("en", "de"):
                got = [
                    r["value"]
                    for r in rows
                    if (r["transform"], r["layer"], r["target"]) == (name, layer, t)
                ]
                assert got == [pytest.approx(bf_p_at_1(Z, L[test], P[test], "fr", t))]
    assert transforms["Proc"].pivot == "de"  # the caller's estimator is not changed


def test_profile_needs_the_layers_axis(rng):
    X, L, P = _three_languages(rng)
    with pytest.raises(ValueError, match=r"got shape \(120, 8\).*X\[:, None, :\]"):
        alignment_profile(None, (X[:, 0], L, P))
    with pytest.raises(ValueError, match="languages has shape"):
        alignment_profile(None, (X, L[:-1], P))


def test_profile_language_id_and_transfer_on_heldout_rows(rng):
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from posthoc_align.demo import heldout_split

    n = 60
    y_group = rng.integers(0, 2, size=n)  # a task label per translation group
    E = rng.normal(size=(n, 2, 5)) + 1.5 * y_group[:, None, None]
    X = np.concatenate([E + 0.5 * rng.normal(size=E.shape), E + 0.5 * rng.normal(size=E.shape)])
    X[n:] += 1.0  # fr is shifted: language information the centring removes
    L = np.repeat(["en", "fr"], n)
    P = np.tile(np.arange(n), 2)
    y = np.tile(y_group, 2)
    names = [
        "language_id",
        "language_id_majority",
        "transfer_gap",
        "transfer_target_score",
        "transfer_source_score",
    ]
    rows = alignment_profile(
        None, (X, L, P), transforms={"c": LanguageMeanCentering()}, metrics=names, y=y
    )
    train, test = heldout_split(P, 0.5, 0)
    Lt, yt = L[test], y[test]
    for layer in range(2):
        c = LanguageMeanCentering().fit(X[train][:, layer], languages=L[train])
        for name, Z in (
            ("raw", X[test][:, layer]),
            ("c", c.transform(X[test][:, layer], languages=Lt)),
        ):
            probe = make_pipeline(
                StandardScaler(), LogisticRegression(max_iter=1000, random_state=0)
            )
            folds = StratifiedKFold(5, shuffle=True, random_state=0)
            lid = cross_val_score(probe, Z, Lt, cv=folds).mean()
            en, fr = Lt == "en", Lt == "fr"
            clf = LogisticRegression(max_iter=1000).fit(Z[en], yt[en])
            target = np.mean(clf.predict(Z[fr]) == yt[fr])
            k = min(5, np.bincount(yt[en]).min())
            source = cross_val_score(
                LogisticRegression(max_iter=1000),
                Z[en],
                yt[en],
                cv=StratifiedKFold(k, shuffle=True, random_state=0),
            ).mean()
            ref = dict(zip(names, [lid, 0.5, source - target, target, source], strict=True))
            got = {
                r["metric"]: r["value"]
                for r in rows
                if (r["transform"], r["layer"]) == (name, layer)
            }
            assert got == pytest.approx(ref, rel=1e-12)
    lid = {r["transform"]: r["value"] for r in rows if r["metric"] == "language_id"}
    assert lid["c"] < lid["raw"]  # centring removes the language shift


def test_profile_probe_errors_come_before_any_fitting(rng):
    X, L, P = _three_languages(rng)

    class Exploding(LanguageMeanCentering):
        def fit(self, *a, **k):
            raise AssertionError("fitted before the metrics were checked")

    with pytest.raises(ValueError, match=r"need task labels: pass y="):
        alignment_profile(None, (X, L, P), transforms={"x": Exploding()}, metrics=["transfer_gap"])
    with pytest.raises(ValueError, match="y has shape"):
        alignment_profile(
            None, (X, L, P), transforms={"x": Exploding()}, metrics=["transfer_gap"], y=np.zeros(10)
        )
