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
