"""benchmarks/bench_msda_cpu.py runs, compares the outputs first and prints its table (tiny Lq)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_msda_cpu", ROOT / "benchmarks" / "bench_msda_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_prints_its_table(capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "peak_in_fresh_process", lambda name, queries: 1.0)
    bench.main(["--queries", "2", "--repeat", "1"])
    out = capsys.readouterr().out
    differences = [float(d) for d in re.findall(r"max \|out - cudcn's\| = (\S+)", out)]
    assert differences and max(differences) < 1e-5, out
    assert re.search(r"\| cudcn \(numpy backend\) \| \d+ \| \d+ \| 1 \|", out), out
    if len(differences) == 2:  # transformers is importable
        assert re.search(r"\| transformers \(pure torch\) \| \d+ \| \d+ \| 1 \|", out), out
        assert re.search(r"cudcn / transformers: time \d+\.\d\d \(forward \d+\.\d\d\), memory 1\.00", out), out


def test_peak_memory_is_measured_in_a_fresh_process():
    bench = _bench()
    peak = bench.peak_in_fresh_process(bench.NAMES[0], 2)
    # At least the value gradient (N*S*M*D float32) is allocated above the inputs.
    assert peak is None or peak >= 2 * 19947 * 8 * 32 * 4 / 2**20
