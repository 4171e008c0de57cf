"""The posthoc-align command line on a synthetic cache (no model needed)."""

import zlib

import numpy as np
import pytest

from posthoc_align.cache import EmbeddingCache
from posthoc_align.cli import main


@pytest.fixture
def cache_path(tmp_path, rng):
    n, layers, d = 40, 3, 8
    base = rng.normal(size=(n, layers, d))
    X = np.concatenate([base, base + 2.0, base[:, :, ::-1] - 1.0]).astype(np.float32)
    langs = np.repeat(["en", "fr", "de"], n)
    pids = np.tile(np.arange(n), 3)
    path = tmp_path / "c.zarr"
    EmbeddingCache.from_arrays(path, X, languages=langs, pair_ids=pids)
    return path


def test_fit_evaluate_plot(cache_path, tmp_path, capsys):
    out = tmp_path / "rot"
    assert main(["fit", "--cache", str(cache_path), "--method", "procrustes", "-o", str(out)]) == 0
    assert (out / "config.json").is_file()
    table = tmp_path / "t.csv"
    assert (
        main(
            [
                "evaluate",
                "--cache",
                str(cache_path),
                "--transform",
                str(out),
                "--heldout",
                "--metrics",
                "retrieval_cosine",
                "-o",
                str(table),
            ]
        )
        == 0
    )
    lines = table.read_text().splitlines()
    assert (
        lines[0].split(",")[:4] == ["layer", "transform", "source", "target"] or "layer" in lines[0]
    )
    values = [float(line.split(",")[-1]) for line in lines[1:]]
    assert len(values) == 3 * 2 and min(values) > 0.9  # planted translations are exact
    assert main(["evaluate", "--cache", str(cache_path), "--layers", "0"]) == 0
    assert "retrieval_cosine" in capsys.readouterr().out
    png = tmp_path / "m.png"
    pytest.importorskip("matplotlib")
    assert (
        main(
            [
                "plot",
                "--cache",
                str(cache_path),
                "--transform",
                str(out),
                "--kind",
                "map",
                "--layer",
                "1",
                "-o",
                str(png),
            ]
        )
        == 0
    )
    assert png.stat().st_size > 1000


def test_errors_exit_2(tmp_path, capsys, cache_path):
    assert (
        main(
            [
                "fit",
                "--cache",
                str(tmp_path / "none"),
                "--method",
                "center",
                "-o",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert main(["evaluate", "--cache", str(cache_path), "--source", "xx"]) == 2
    assert "not in the cache" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--cache", str(cache_path), "--method", "nope", "-o", "x"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0


def test_bad_layers_and_fractions_exit_2_with_one_line(tmp_path, capsys, cache_path):
    for layers in ("7", "-5"):
        assert main(["evaluate", "--cache", str(cache_path), f"--layers={layers}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "out of range" in err and "-3..2" in err
    png = str(tmp_path / "m.png")
    assert (
        main(["plot", "--cache", str(cache_path), "--kind", "map", "--layer", "9", "-o", png]) == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of range" in err
    for frac in ("1.5", "-1", "0", "1.0", "x"):
        with pytest.raises(SystemExit) as exc:
            main(["fit", "--cache", str(cache_path), "--method", "center",
                  "--train-fraction", frac, "-o", str(tmp_path / "t")])  # fmt: skip
        assert exc.value.code == 2
        assert "(0, 1)" in capsys.readouterr().err
    out = str(tmp_path / "t")
    assert main(["fit", "--cache", str(cache_path), "--method", "center",
                 "--train-fraction", "0.999", "-o", out]) == 2  # fmt: skip
    assert "no held-out rows" in capsys.readouterr().err


def test_demo_without_the_pivot_fails_before_encoding(tmp_path, capsys):
    # no model, no data read: the check comes first
    assert main(["demo", "--languages", "fr,de", "--cache-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must include the pivot 'en'" in err
    assert not (tmp_path / "d").exists()


# -- negative layer lists, output extensions ---------------------------------------------------
def _first_column(path):
    return sorted({int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]})


def test_layers_take_a_negative_list_as_a_separate_value(cache_path, tmp_path, capsys):
    # documented as "comma-separated layer indices (negative from the last)", but argparse
    # took "-2,-1" for an option ("expected one argument")
    out = str(tmp_path / "t")
    for layers in (["--layers", "-2,-1"], ["--layers=-2,-1"], ["--layers", "-1, -2"]):
        assert main(["fit", "--cache", str(cache_path), "--method", "center", *layers,
                     "-o", out]) == 0  # fmt: skip
        assert "layers=[-" in capsys.readouterr().out
    table = tmp_path / "t.csv"
    for layers in (["--layers", "-2,-1"], ["--layers=-2,-1"], ["--layer", "-2,-1"]):
        assert main(["evaluate", "--cache", str(cache_path), *layers, "--metrics",
                     "retrieval_cosine", "-o", str(table)]) == 0  # fmt: skip
        assert _first_column(table) == [1, 2]
    assert main(["evaluate", "--cache", str(cache_path), "--layers", "-1", "--metrics",
                 "retrieval_cosine", "-o", str(table)]) == 0  # fmt: skip
    assert _first_column(table) == [2]
    assert main(["evaluate", "--cache", str(cache_path), "--layers", "-5,-1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of range" in err


def test_attach_layer_values():
    from posthoc_align.cli import _attach_layer_values

    assert _attach_layer_values(["fit", "--layers", "-2,-1", "-o", "x"]) == [
        "fit",
        "--layers=-2,-1",
        "-o",
        "x",
    ]
    assert _attach_layer_values(["plot", "--layer", "-1"]) == ["plot", "--layer=-1"]
    assert _attach_layer_values(["fit", "--lay", "-3,-1"]) == ["fit", "--lay=-3,-1"]
    for argv in (
        ["fit", "--layers", "all"],
        ["fit", "--layers", "0,-1"],
        ["fit", "--layers", "-o", "x"],  # an option, not a value: argparse reports it
        ["fit", "--", "--layers", "-1,-2"],
        ["fit", "--layers"],
    ):
        assert _attach_layer_values(argv) == argv


def test_evaluate_refuses_an_unsupported_output_extension(cache_path, tmp_path, capsys):
    # "-o out.xlsx" silently wrote CSV
    args = [
        "evaluate",
        "--cache",
        str(cache_path),
        "--layers",
        "0",
        "--metrics",
        "retrieval_cosine",
    ]
    for name in ("out.xlsx", "out.json", "out"):
        assert main([*args, "-o", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "supported: .csv, .md" in err
        assert not (tmp_path / name).exists()
    assert main([*args, "-o", str(tmp_path / "t.MD")]) == 0
    assert (tmp_path / "t.MD").read_text().startswith("|")
    assert main([*args, "-o", str(tmp_path / "t.csv")]) == 0
    assert (tmp_path / "t.csv").read_text().startswith("layer")


# -- encode --overwrite / --append, and the cache's advice in CLI terms -------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny random BERT and a word-level tokenizer saved to a folder (no download)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = "the cat dog sleeps barks le chat chien dort aboie a big small".split()
    specials = ["[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"]
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def _error_line(err, command="encode"):
    """The error line (model loading may write progress bars to stderr before it)."""
    lines = err.replace("\r", "\n").strip().splitlines()
    assert lines[-1].startswith(f"posthoc-align {command}: error: "), err
    return lines[-1]


def _tsv(path, rows):
    path.write_text("".join(f"{lang}\t{pid}\t{text}\n" for lang, pid, text in rows))
    return path


@pytest.mark.filterwarnings("ignore:this CPU has no native bfloat16")
def test_encode_overwrite_and_append_flags(tmp_path, tiny_model_dir, capsys):
    first = _tsv(tmp_path / "a.tsv", [("en", 0, "the cat sleeps"), ("fr", 0, "le chat dort")])
    second = _tsv(
        tmp_path / "b.tsv",
        [("en", 1, "the dog barks"), ("fr", 1, "le chien aboie"), ("en", 2, "a big dog")],
    )
    out = tmp_path / "c.zarr"
    enc = ["encode", "--model", str(tiny_model_dir), "--no-progress", "-o", str(out)]
    assert main([*enc, "--tsv", str(first)]) == 0
    capsys.readouterr()
    # other texts into a finished cache: refused, with the CLI's flags as the remedy
    assert main([*enc, "--tsv", str(second)]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "--append" in err and "--overwrite" in err
    assert "=True" not in err and "=False" not in err
    assert main([*enc, "--tsv", str(second), "--append"]) == 0
    cache = EmbeddingCache(out)
    assert cache.n_rows == 5 and list(cache.languages) == ["en", "fr", "en", "fr", "en"]
    # appending rows computed in bfloat16 to this float32 cache is refused
    assert main([*enc, "--tsv", str(first), "--append", "--bf16"]) == 2
    err = _error_line(capsys.readouterr().err)
    assert "compute_dtype: cache has 'float32', now 'bfloat16'" in err and "--overwrite" in err
    assert EmbeddingCache(out).n_rows == 5
    assert main([*enc, "--tsv", str(second), "--overwrite"]) == 0
    assert EmbeddingCache(out).n_rows == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([*enc, "--tsv", str(second), "--overwrite", "--append"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


class _Interrupting:
    """An encoder that fails on its second call (an interrupted build)."""

    model_id, pooling, prefix, max_length, n_layers, hidden_size = "fake", "mean", None, 8, 2, 4

    def __init__(self):
        self.calls = 0

    def encode(self, texts, layers="all"):
        self.calls += 1
        if self.calls == 2:
            raise KeyboardInterrupt
        return np.ones((len(texts), 3, 4), dtype=np.float32)


def test_cache_errors_give_cli_advice(tmp_path, capsys):
    from posthoc_align.cli import _cli_advice

    path = tmp_path / "part.zarr"
    with pytest.raises(KeyboardInterrupt):
        EmbeddingCache.build(path, _Interrupting(), ["a", "b", "c"], chunk_rows=2)
    for command in ("fit", "evaluate"):
        args = ["--cache", str(path)] + (
            ["--method", "center", "-o", "x"] if command == "fit" else []
        )
        assert main([command, *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "incomplete" in err
        assert (
            "'posthoc-align encode'" in err and "EmbeddingCache" not in err and "=True" not in err
        )
    messages = {
        "x is a finished cache of 2 rows, but 3 texts were given. Pass append=True to add "
        "them, overwrite=True to replace it, or another path.": {
            "encode": "Pass --append to add them, --overwrite to replace it",
            "demo": "Pass --overwrite to replace it",
        },
        "Cannot resume the cache at x: its interrupted build was an append starting at row 4; "
        "resume it with append=True.": {"encode": "resume it with --append."},
        "Cannot resume the cache at x: its interrupted build was not an append; resume it "
        "with append=False.": {"encode": "resume it without --append."},
        "Cannot resume x: text 0 (store row 0) differs from the text encoded there before "
        "('a'...). Pass the same texts in the same order, or pass overwrite=True to start "
        "again.": {"encode": "pass --overwrite to start", "demo": "pass --overwrite to start"},
        "The cache at x could not read rows 0..3 of embeddings: a chunk file is damaged (...). "
        "Rebuild it with EmbeddingCache.build(..., overwrite=True).": {
            "fit": "Rebuild it with 'posthoc-align encode' ... --overwrite."
        },
        "x is a truncated embedding cache: ... Copy the whole folder again, or rebuild it "
        "(delete the folder, or pass overwrite=True).": {
            "encode": "(delete the folder, or pass --overwrite)",
            "plot": "(delete the folder, or rerun 'posthoc-align encode' with --overwrite)",
        },
    }
    for msg, expected in messages.items():
        for command, part in expected.items():
            got = _cli_advice(msg, command)
            assert part in got, (command, got)
            assert "=True" not in got and "=False" not in got, (command, got)


# -- the demo: its cache is keyed by its settings -----------------------------------------------
class _Log(list):
    """The texts encoded so far, and the fake Bible's text suffix (``tag``)."""


class _DemoEncoder:
    """Stands in for the offline e5 encoder: 5 layers of 8 dims, deterministic per text."""

    model_id, pooling, prefix, max_length, n_layers, hidden_size = "fake-e5", "mean", None, 64, 4, 8

    def __init__(self, log, dtype=None):
        self.log, self.cast_weights = log, False
        self.compute_dtype = dtype or "float32"

    def encode(self, texts, layers="all"):
        self.log.extend(texts)
        out = []
        for t in texts:
            lang, verse = t.split(" ", 1)
            base = np.random.default_rng(zlib.crc32(verse.encode())).normal(size=(5, 8))
            shift = np.random.default_rng(len(lang) + ord(lang[0])).normal(size=8)
            out.append(base + shift)
        return np.asarray(out, dtype=np.float32)


@pytest.fixture
def fake_demo(monkeypatch):
    """run_demo with a fake Bible and encoder: returns the list of texts encoded so far."""
    from sklearn.utils import Bunch

    import posthoc_align.datasets
    import posthoc_align.encoders

    log, tag = _Log(), {"text": ""}

    def load_bible(languages, testament=None, n_verses=None, random_state=0):
        verses = np.arange(n_verses) * 7 + random_state
        langs = np.repeat(languages, n_verses)
        pids = np.tile(verses, len(languages))
        data = [f"{lang} verse {v}{tag['text']}" for lang, v in zip(langs, pids, strict=True)]
        return Bunch(data=data, languages=langs, pair_ids=pids, target=pids % 3)

    monkeypatch.setattr(posthoc_align.datasets, "load_bible", load_bible)
    monkeypatch.setattr(
        posthoc_align.encoders,
        "load_offline_encoder",
        lambda batch_size=32, dtype=None, show_progress_bar=None: _DemoEncoder(log, dtype),
    )
    log.tag = tag
    return log


@pytest.mark.filterwarnings("ignore:fewer pivot pairs than dimensions")
def test_demo_reruns_with_other_settings_into_the_same_cache_dir(tmp_path, fake_demo, capsys):
    # a second run with other --n-verses/--languages failed: the one bible.zarr was finished
    # with other rows, and the error told a CLI user to pass append=True/overwrite=True
    d = tmp_path / "demo"
    base = ["demo", "--cache-dir", str(d), "--no-progress"]
    runs = [
        (["--languages", "en,fr,de", "--n-verses", "8"], "bible-8v-en-fr-de-seed0.zarr", 24),
        (["--languages", "en,fr,de", "--n-verses", "6"], "bible-6v-en-fr-de-seed0.zarr", 18),
        (["--languages", "en,fr", "--n-verses", "6"], "bible-6v-en-fr-seed0.zarr", 12),
        (
            ["--languages", "en,fr", "--n-verses", "6", "--seed", "1"],
            "bible-6v-en-fr-seed1.zarr",
            12,
        ),
        (
            ["--languages", "en,fr", "--n-verses", "6", "--bf16"],
            "bible-6v-en-fr-seed0-bf16.zarr",
            12,
        ),
    ]
    for args, name, rows in runs:
        before = len(fake_demo)
        assert main([*base, *args]) == 0, capsys.readouterr().err
        assert len(fake_demo) - before == rows  # each encoded its own cache
        cache = EmbeddingCache(d / name)
        assert cache.n_rows == rows
        assert (d / "transforms" / name.removesuffix(".zarr") / "LSAR").is_dir()
        assert "| layer |" in capsys.readouterr().out
    bf = EmbeddingCache(d / "bible-6v-en-fr-seed0-bf16.zarr")
    assert bf.attrs["compute_dtype"] == "bfloat16"
    # the same settings again: the cache is reused, nothing is encoded
    before = len(fake_demo)
    assert main([*base, "--languages", "en,fr,de", "--n-verses", "8"]) == 0
    assert len(fake_demo) == before and "reusing" in capsys.readouterr().out
    assert main([*base, "--languages", "en,fr,de", "--n-verses", "8", "--overwrite"]) == 0
    assert len(fake_demo) == before + 24
    # a cache of these settings holding other texts (another data version): CLI advice
    fake_demo.tag["text"] = " (revised)"
    assert main([*base, "--languages", "en,fr,de", "--n-verses", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "=True" not in err
    assert main([*base, "--languages", "en,fr,de", "--n-verses", "8", "--overwrite"]) == 0


def test_demo_cache_name():
    from posthoc_align.demo import DEMO_LANGUAGES, demo_cache_name

    assert demo_cache_name(1000, DEMO_LANGUAGES) == "bible-1000v-en-fr-de-ru-zh-sw-hi-seed0.zarr"
    assert demo_cache_name(20, ["en", "fr"], 3, "bfloat16") == "bible-20v-en-fr-seed3-bf16.zarr"
    odd = demo_cache_name(20, ["en", "fr/../x"])
    assert odd.startswith("bible-20v-") and "/" not in odd and odd.endswith(".zarr")
    assert odd != demo_cache_name(20, ["en", "fr/../y"])
    long = demo_cache_name(20, [f"l{i}" for i in range(40)])
    assert len(long) < 40


def test_evaluate_transfer_metrics_use_the_cache_labels(tmp_path, capsys):
    from posthoc_align.cache import EmbeddingCache
    from posthoc_align.metrics import evaluate_pairs

    rng = np.random.default_rng(0)
    y = np.tile([0, 1], 30)
    X = (rng.normal(size=(60, 2, 8)) + 3 * y[:, None, None]).astype(np.float32)
    langs, pids = ["en"] * 30 + ["de"] * 30, list(range(30)) * 2
    EmbeddingCache.from_arrays(tmp_path / "l.zarr", X, langs, pids, labels=y)
    out = tmp_path / "t.csv"
    args = ["evaluate", "--cache", str(tmp_path / "l.zarr"), "--layers", "1"]
    assert main([*args, "--metrics", "transfer_gap", "-o", str(out)]) == 0
    ref = evaluate_pairs(X[:, 1], langs, pids, pairs=[("en", "de")], metrics=["transfer_gap"], y=y)
    assert f"{ref[0]['value']}" in out.read_text()
    EmbeddingCache.from_arrays(tmp_path / "n.zarr", X, langs, pids)
    assert main(["evaluate", "--cache", str(tmp_path / "n.zarr"), "--metrics", "transfer_gap"]) == 2
    assert "stores none" in capsys.readouterr().err
