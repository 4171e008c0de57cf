"""The posthoc-align command line on a synthetic cache (no model needed)."""

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
