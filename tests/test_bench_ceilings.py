"""Smoke test: the one-command ceiling benchmark runs end to end (tiny sizes, CPU)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ceilings.py"


def test_bench_ceilings_tiny(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_ceilings", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_ceilings"] = mod
    spec.loader.exec_module(mod)
    out = tmp_path / "table.md"
    table = mod.main(["--tiny", "--output", str(out)])
    stages = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert stages.count("fit") == 4 and stages.count("transform") == 4
    assert stages.count("retrieval") == 2 and stages.count("encoding") == 1
    assert "ours / ceiling" in out.read_text()
