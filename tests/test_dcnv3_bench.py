"""benchmarks/bench_dcnv3_cpu.py runs, compares the outputs first and prints its table (the smallest stage)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torch")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dcnv3_cpu", ROOT / "benchmarks" / "bench_dcnv3_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_prints_its_table(capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "peak_in_fresh_process", lambda name, stage: 1.0)
    bench.main(["--stages", "3", "--repeat", "1"])
    out = capsys.readouterr().out
    differences = [float(d) for d in re.findall(r"max \|pure torch - cudcn\| = (\S+)", out)]
    assert len(differences) == 1 and differences[0] < 1e-4, out
    assert re.search(r"\| 7x7 C=512 G=32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \| \d+\.\d\d \| 1 \| 1 \| 1\.00 \|", out), out


def test_peak_memory_is_measured_in_a_fresh_process():
    bench = _bench()
    peak = bench.peak_in_fresh_process(bench.NAMES[0], 3)
    # At least the input gradient (N*7*7*512 float32) is allocated above the inputs.
    assert peak is None or peak >= 2 * 7 * 7 * 512 * 4 / 2**20
