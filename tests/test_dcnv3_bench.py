"""benchmarks/bench_dcnv3.py runs (the smallest stage), compares the outputs
first, writes its table and record, and measures peak memory in a fresh
process."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torch")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_dcnv3", ROOT / "benchmarks" / "bench_dcnv3.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_benchmark_writes_its_table_and_record(tmp_path, capsys, monkeypatch):
    bench = _bench()
    monkeypatch.setattr(bench, "peak_in_fresh_process", lambda name, stage, operator, threads=None: 2.0 if name == bench.OURS else 4.0)
    assert bench.main(["--stages", "3", "--repeat", "1", "--out", str(tmp_path), "--no-gpu"]) == 0
    table = (tmp_path / "bench_dcnv3.md").read_text()
    assert table in capsys.readouterr().out
    for operator in ("DCNv3", "DCNv4"):
        assert re.search(rf"\| {operator} \| 7x7 C=512 G=32 \| [\d.]+ \([\d.]+\) \| [\d.]+ \([\d.]+\) \| \d+\.\d\d \| "
                         r"\d+\.\d\d \| 2 \| 4 \| 0\.50 \|", table), table
    assert "load average" in table and ("BLAS: openblas" in table or "BLAS: unknown" in table)
    record = json.loads((tmp_path / "bench_dcnv3.json").read_text())
    assert [row["operator"] for row in record["cpu"]] == ["DCNv3", "DCNv4"]
    for row in record["cpu"]:
        assert row["max_abs_difference"] < 1e-4  # the two sides computed the same
        assert row["forward_backward_ms"][bench.OURS] > 0 and row["forward_backward_ms"][bench.PURE] > 0
    assert record["load_average_at_start"] is None or len(record["load_average_at_start"]) == 3
    assert record["gpu"] == []


def test_peak_memory_is_measured_in_a_fresh_process():
    """(On one CPU there: the child process sets its own affinity, not ours.)"""
    bench = _bench()
    for name in (bench.OURS, bench.PURE):
        peak = bench.peak_in_fresh_process(name, 3, "DCNv3", threads=1)
        # At least the input gradient (N*7*7*512 float32) is allocated above the inputs.
        assert peak is None or peak >= 2 * 7 * 7 * 512 * 4 / 2**20, (name, peak)


def test_gpu_table_renders_what_could_not_run():
    """The GPU table's rendering on made-up rows: cudcn without CUDA kernels
    is reported as not available, pure torch's figures are shown."""
    bench = _bench()
    env = {"date": "d", "machine": "m", "cpu_count": 1, "load_average_at_start": None, "load_average_at_end": None,
           "threads": {"torch": 1}, "blas": "b", "versions": {"cudcn": "0"}, "gpu_device": "NVIDIA H100"}
    row = {"dtype": "bfloat16", "stage": "7x7 C=512 G=32", "operator": "DCNv4",
           "status": {bench.OURS: "not available: ArgumentTypeError: no dcnv3_forward yet", bench.PURE: "ok"},
           "forward_ms": {bench.PURE: 0.25}, "forward_backward_ms": {bench.PURE: 0.75}, "peak_mib": {bench.PURE: 3.0}}
    table = bench.markdown(env, 3, [], [row])
    assert "**GPU: NVIDIA H100**" in table
    assert "| bfloat16 | DCNv4 | 7x7 C=512 G=32 | - | 0.8 (0.2) | - | - | 3.0 |" in table
    assert "- cudcn: not available: ArgumentTypeError: no dcnv3_forward yet" in table


@pytest.mark.gpu
def test_benchmark_on_a_gpu(tmp_path):
    bench = _bench()
    assert bench.main(["--stages", "3", "--repeat", "3", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench_dcnv3.json").read_text())
    assert {(row["dtype"], row["operator"]) for row in record["gpu"]} == {
        (d, o) for d in bench.GPU_DTYPES for o in ("DCNv3", "DCNv4")}
    assert all(row["status"][bench.PURE] == "ok" for row in record["gpu"])
