"""benchmarks/bench_msda.py runs (tiny Lq), compares the outputs first, and
writes its tables and record; its peak memory comes from a fresh process."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_msda", ROOT / "benchmarks" / "bench_msda.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_writes_its_tables_and_record(tmp_path, capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "peak_in_fresh_process", lambda name, queries: 1.0)
    monkeypatch.setattr(bench, "cupy_gpus", lambda: ([], "no GPU in this test"))
    assert bench.main(["--queries", "3", "--repeat", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "bench_msda.md").read_text()
    assert table in capsys.readouterr().out
    record = json.loads((tmp_path / "bench_msda.json").read_text())
    assert record["queries"] == 3 and record["gpu"] is None
    assert record["load_average_at_start"] is None or len(record["load_average_at_start"]) == 3
    assert record["blas"] and record["versions"]["torch"]
    names = list(record["cpu"])
    assert names[0] == bench.OURS and bench.BY_HAND in names
    for name, r in record["cpu"].items():
        assert r["max_abs_diff"] < 1e-5, name  # the same computation, timed
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0
        assert re.search(rf"\| {re.escape(name)} \| \d+ \| \d+ \| 1 \| \S+ \|", table), table
    assert "GPU: none visible to CuPy here; GPU speed is unmeasured." in table
    if bench.TRANSFORMERS in names:
        assert re.search(r"cudcn / transformers: forward \+ backward time \d+\.\d\d \(forward \d+\.\d\d\), "
                         r"peak memory 1\.00\.", table), table


def test_peak_memory_is_measured_in_a_fresh_process():
    bench = _bench()
    peak = bench.peak_in_fresh_process(bench.OURS, 2)
    # At least the value gradient (N*S*M*D float32, 19.5 MiB) is allocated above the inputs.
    assert peak is None or peak >= 2 * 19947 * 8 * 32 * 4 / 2**20
