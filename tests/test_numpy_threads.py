"""The NumPy backend shares a chunk's images out among threads, one part per CPU."""

from __future__ import annotations

import numpy as np
import pytest

import cudcn
from cudcn.backends.numpy import dcn as numpy_backend
from cudcn.backends.numpy import parallel
from cudcn.geometry import validate

FIELDS = ("input", "offset", "weight", "bias", "mask")


def _geometry(batch: int, size: int):
    """3 -> 3 channels, 3x3, padding 1: size*size*9*3 column values per image."""
    return validate(input=np.zeros((batch, 3, size, size)), offset=np.zeros((batch, 18, size, size)),
                    weight=np.zeros((3, 3, 3, 3)), padding=1)


@pytest.mark.parametrize(("cpus", "chunk", "batch", "expected"), [
    (2, slice(0, 5), 5, [(0, 2), (2, 5)]),
    (4, slice(4, 8), 7, [(4, 5), (5, 6), (6, 7)]),  # a chunk past the end, fewer images than CPUs
    (1, slice(0, 3), 3, [(0, 3)]),
])
def test_parts_cover_the_chunk(monkeypatch, cpus, chunk, batch, expected):
    monkeypatch.setattr(parallel, "cpu_count", lambda: cpus)
    geom = _geometry(batch, 128)  # 442368 values per image
    assert [(p.start, p.stop) for p in numpy_backend._parts(geom, chunk)] == expected


def test_little_work_stays_in_one_thread(monkeypatch):
    monkeypatch.setattr(parallel, "cpu_count", lambda: 4)
    assert len(numpy_backend._parts(_geometry(8, 8), slice(0, 8))) == 1  # 13824 values in all
    assert len(numpy_backend._parts(_geometry(8, 64), slice(0, 8))) == 4
    assert len(numpy_backend._parts(_geometry(3, 64), slice(0, 3))) == 2  # 331776 values: two parts' worth


@pytest.mark.parametrize("cpus", [2, 3])
def test_results_do_not_depend_on_the_threads(monkeypatch, cpus):
    rng = np.random.default_rng(7)
    args = dict(
        input=rng.standard_normal((5, 4, 6, 6)), offset=rng.standard_normal((5, 36, 6, 6)) * 2,
        weight=rng.standard_normal((6, 2, 3, 3)), bias=rng.standard_normal(6), mask=rng.random((5, 18, 6, 6)),
    )
    grad_output = rng.standard_normal((5, 6, 6, 6))
    monkeypatch.setattr(parallel, "cpu_count", lambda: 1)
    out = cudcn.deform_conv2d(**args, padding=1)
    grads = cudcn.deform_conv2d_backward(grad_output, **args, padding=1)
    monkeypatch.setattr(parallel, "cpu_count", lambda: cpus)
    monkeypatch.setattr(numpy_backend, "_MIN_PART_VALUES", 1)
    with cudcn.workspace_bytes(4 * 36 * 9 * 4 * 8):  # chunks of four images, shared out among the threads
        np.testing.assert_allclose(cudcn.deform_conv2d(**args, padding=1), out, rtol=1e-13, atol=1e-13)
        threaded = cudcn.deform_conv2d_backward(grad_output, **args, padding=1)
    for name in FIELDS:
        # Only the weight and bias gradients sum over images, in another order.
        np.testing.assert_allclose(getattr(threaded, name), getattr(grads, name), rtol=1e-13, atol=1e-13)


def test_blas_runs_one_thread_per_part_and_is_restored(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        _check_blas_threads(monkeypatch, threadpoolctl)


def _check_blas_threads(monkeypatch, threadpoolctl):
    monkeypatch.setattr(parallel, "cpu_count", lambda: 2)
    monkeypatch.setattr(numpy_backend, "_MIN_PART_VALUES", 1)
    assert _blas_threads_seen(monkeypatch, threadpoolctl, batch=2) == [{1}, {1}]  # one per part while they run


@pytest.mark.parametrize(("batch", "min_part_values", "expected"), [
    (2, 10**6, [{1}]),  # little work, one part: BLAS's threads would cost more than they give
    (1, 100, [{2}]),  # one image with work for two: BLAS's own threads are the only parallelism
])
def test_blas_threads_of_a_single_part(monkeypatch, batch, min_part_values, expected):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    monkeypatch.setattr(parallel, "cpu_count", lambda: 2)
    monkeypatch.setattr(numpy_backend, "_MIN_PART_VALUES", min_part_values)  # 27*25 column values per image
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        assert _blas_threads_seen(monkeypatch, threadpoolctl, batch) == expected


def _blas_threads_seen(monkeypatch, threadpoolctl, batch: int) -> list[set[int]]:
    """The BLAS thread counts each part of a forward saw; checks they are restored after."""
    before = [(lib["filepath"], lib["num_threads"]) for lib in threadpoolctl.threadpool_info()]
    assert any(threads == 2 for _, threads in before)
    seen = []
    real_part = numpy_backend._forward_part

    def spy(*args):
        seen.append({lib["num_threads"] for lib in threadpoolctl.threadpool_info() if lib["user_api"] == "blas"})
        return real_part(*args)

    monkeypatch.setattr(numpy_backend, "_forward_part", spy)
    rng = np.random.default_rng(0)
    cudcn.deform_conv2d(rng.standard_normal((batch, 3, 5, 5)), rng.standard_normal((batch, 18, 5, 5)),
                        rng.standard_normal((4, 3, 3, 3)), padding=1)
    assert [(lib["filepath"], lib["num_threads"]) for lib in threadpoolctl.threadpool_info()] == before
    return seen
