"""``cudcn bench``: its pure-torch peer computes what cudcn computes, and the
subcommand writes its table, CSV, JSON and plot."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import cudcn
from cudcn import cli
from cudcn.cli import bench

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


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


def test_median_ms_pauses_untimed_before_each_timed_call():
    """The settle pause comes before every timed call and is not part of its time."""
    import time

    started = []
    medians = bench.median_ms([(lambda: started.append(time.perf_counter()), lambda: None)] * 2,
                              warmup=0, repeat=3, settle_s=0.05)
    assert len(started) == 6
    assert all(later - earlier >= 0.05 for earlier, later in zip(started, started[1:]))
    assert all(ms < 50 for ms in medians)
