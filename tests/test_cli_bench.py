"""``cudcn bench``: its pure-torch peer computes what cudcn computes, and the
subcommand writes its table, CSV, JSON and plot."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cudcn
from cudcn import cli
from cudcn.cli import bench

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
ROOT = Path(__file__).resolve().parents[1]


#: (N, C_in, C_out, H, W, kh, kw, groups, offset groups, stride, padding, dilation, mask?, bias?)
GEOMETRIES = [
    (2, 4, 6, 5, 6, 2, 3, 2, 2, (1, 2), (1, 0), (2, 1), True, True),
    (1, 3, 2, 7, 4, 3, 3, 1, 1, 1, 1, 1, False, True),
    (2, 4, 4, 6, 6, 3, 1, 1, 4, 2, (0, 2), (1, 2), True, False),
    (1, 2, 2, 1, 5, 1, 3, 2, 1, 1, 0, 1, True, True),  # a single row: W or H of 1
]


def _call(geometry, seed):
    """float64 arguments with offsets of a few pixels whose fraction stays in
    [0.1, 0.9], away from the kinks of bilinear interpolation."""
    n, c, o, h, w, kh, kw, groups, og, stride, padding, dilation, has_mask, has_bias = geometry
    rng = np.random.default_rng(seed)
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    shape = (n, 2 * og * kh * kw, ho, wo)
    arrays = dict(
        input=rng.standard_normal((n, c, h, w)),
        offset=rng.integers(-3, 4, shape) + rng.uniform(0.1, 0.9, shape) * rng.choice([-1.0, 1.0], shape),
        weight=rng.standard_normal((o, c // groups, kh, kw)),
        bias=rng.standard_normal(o) if has_bias else None,
        mask=rng.uniform(0.1, 1.0, (n, og * kh * kw, ho, wo)) if has_mask else None,
    )
    return arrays, dict(stride=stride, padding=padding, dilation=dilation)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_grid_sample_reference_matches_cudcn(geometry):
    arrays, options = _call(geometry, seed=len(str(geometry)))
    tensors = {k: None if v is None else torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    out = bench.grid_sample_deform_conv2d(**tensors, **options)
    np.testing.assert_allclose(out.detach().numpy(), cudcn.deform_conv2d(**arrays, **options),
                               rtol=1e-10, atol=1e-10)

    grad_output = np.random.default_rng(1).standard_normal(out.shape)
    out.backward(torch.tensor(grad_output))
    expected = cudcn.deform_conv2d_backward(grad_output, **arrays, **options)
    for name, tensor in tensors.items():
        if tensor is not None:
            np.testing.assert_allclose(tensor.grad.numpy(), getattr(expected, name),
                                       rtol=1e-9, atol=1e-9, err_msg=name)


def test_bench_writes_table_csv_json_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = {"csv": tmp_path / "b.csv", "json": tmp_path / "b.json", "plot": tmp_path / "b.png"}
    argv = ["bench", "--batch", "2", "--in-channels", "4", "--out-channels", "4", "--size", "6",
            "--repeat", "1", "--warmup", "0"]
    for flag, path in paths.items():
        argv += [f"--{flag}", str(path)]
    assert cli.main(argv) == 0

    printed = capsys.readouterr().out
    assert "cudcn (numpy backend)" in printed and "pure torch (grid_sample)" in printed
    rows = list(csv.DictReader(open(paths["csv"])))
    by_name = {(r["implementation"], r["device"]): r for r in rows}
    assert by_name[("cudcn (numpy backend)", "cpu")]["status"] == "ok"
    reference = by_name[("pure torch (grid_sample)", "cpu")]
    assert reference["status"] == "ok" and float(reference["max_rel_diff"]) < 1e-5
    saved = json.loads(paths["json"].read_text())
    assert saved["case"]["size"] == 6 and len(saved["rows"]) == len(rows)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prints_a_readable_header_and_the_files_it_wrote(tmp_path, capsys, monkeypatch):
    csv_path, json_path = tmp_path / "b.csv", tmp_path / "b.json"
    argv = ["bench", "--batch", "1", "--in-channels", "2", "--out-channels", "2", "--size", "4",
            "--repeat", "1", "--warmup", "0", "--v1", "--csv", str(csv_path), "--json", str(json_path)]
    pauses = []

    def median_ms(timed, warmup, repeat, settle_s=0.0):  # the pause the header names is the one taken
        pauses.append(settle_s)
        return [0.0] * len(timed)

    monkeypatch.setattr(bench, "median_ms", median_ms)
    assert cli.main(argv) == 0
    assert pauses == [bench.SETTLE_S]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("DCNv1 float32: batch 1, 2 -> 2 channels, 4x4 images, 3x3 kernel, padding 1, 1 offset group; "
                        "medians of 1 round over every implementation in turn, after 0 warm-up rounds, "
                        f"a {bench.SETTLE_S} s pause before each timed call, in ms")
    assert lines[-2:] == [f"wrote {csv_path} (csv)", f"wrote {json_path} (json)"]
    assert not any("Case(" in line for line in lines)


def _fake_implementations(log: list[str], failing: str | None = None):
    """Two implementations that log their calls; ``failing``'s forward + backward raises."""
    def prepared(name):
        def forward():
            log.append(f"{name} forward")
            return np.zeros(1)

        def forward_backward():
            log.append(f"{name} forward_backward")
            if name == failing:
                raise RuntimeError("no backward here")

        return bench.Prepared(forward, forward_backward, lambda a: np.asarray(a, np.float64), lambda: None)

    return lambda case, args: [(name, "cpu", lambda name=name: prepared(name)) for name in ("a", "b")]


def test_bench_times_the_implementations_in_the_same_rounds(monkeypatch):
    """Each round calls every implementation's forward, then every forward +
    backward, so that a change in load falls on all alike (medians are taken
    over the rounds)."""
    log: list[str] = []
    monkeypatch.setattr(bench, "implementations", _fake_implementations(log))
    monkeypatch.setattr(bench.cudcn, "deform_conv2d", lambda **kwargs: np.ones(1))
    rows = bench.benchmark(bench.Case(1, 2, 2, 4, 3, 1, True, "float32"), warmup=1, repeat=2)
    one_round = ["a forward", "b forward", "a forward_backward", "b forward_backward"]
    assert log == ["a forward", "b forward"] + one_round * 3  # the output check, then 1 warm-up and 2 rounds
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["forward_ms"] >= 0 and r["forward_backward_ms"] >= 0 for r in rows)


def test_bench_peer_failing_while_timed_is_reported_and_the_others_timed(monkeypatch):
    log: list[str] = []
    monkeypatch.setattr(bench, "implementations", _fake_implementations(log, failing="a"))
    monkeypatch.setattr(bench.cudcn, "deform_conv2d", lambda **kwargs: np.ones(1))
    rows = bench.benchmark(bench.Case(1, 2, 2, 4, 3, 1, True, "float32"), warmup=0, repeat=3)
    assert rows[0]["status"] == "failed: RuntimeError: no backward here" and rows[0]["forward_ms"] is None
    assert rows[1]["status"] == "ok" and rows[1]["forward_backward_ms"] is not None
    assert log.count("a forward_backward") == 1 and log.count("b forward_backward") == 3


def test_bench_keeps_paddles_import_warning_to_itself(tmp_path):
    """paddle warns on import that it found no ccache (about building its C++
    extensions); cudcn bench does not pass that on."""
    pytest.importorskip("paddle")
    result = subprocess.run(
        [sys.executable, "-m", "cudcn", "bench", "--batch", "1", "--in-channels", "2", "--out-channels", "2",
         "--size", "4", "--repeat", "1", "--warmup", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ccache" not in result.stderr + result.stdout
    assert any(line.startswith("paddle ") and line.rstrip().endswith("ok") for line in result.stdout.splitlines())


def test_median_ms_pauses_untimed_before_each_timed_call():
    """The settle pause comes before every timed call and is not part of its time."""
    import time

    started = []
    medians = bench.median_ms([(lambda: started.append(time.perf_counter()), lambda: None)] * 2,
                              warmup=0, repeat=3, settle_s=0.05)
    assert len(started) == 6
    assert all(later - earlier >= 0.05 for earlier, later in zip(started, started[1:]))
    assert all(ms < 50 for ms in medians)
