"""CUDA-graph capture of a forward and a backward (marker ``gpu``; skipped without a device).

With each algorithm setting -- "im2col" (its GEMMs through libcublas
itself, CuPy's wrapper refusing a capturing stream), "fused", and "auto"
(its choice measured before the capture) -- one forward and one backward
are captured with CuPy's stream capture, new inputs are copied into the
captured arrays and the graph is replayed: the replay equals eager calls on
those inputs. The same through ``torch.cuda.graph`` with cudcn.torch's
module, forward and backward.

Tolerances rather than bitwise equality: a captured GEMM runs on another
cuBLAS handle and workspace, which may pick another kernel, and the input
gradient adds with atomics.
"""

from __future__ import annotations

import numpy as np
import pytest

import cudcn
from cudcn.backends.cuda import algorithms

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

TOLERANCE = {"float32": 1e-4, "float16": 5e-3}
NAMES = ("input", "offset", "weight", "bias", "mask")


def _arguments(seed: int, dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, c, o, size = 2, 16, 8, 12
    return {
        "input": rng.standard_normal((n, c, size, size)).astype(dtype),
        "offset": (rng.uniform(-2, 2, (n, 18, size, size)) + 0.25).astype(dtype),
        "weight": (rng.standard_normal((o, c, 3, 3)) / 12).astype(dtype),
        "bias": rng.standard_normal(o).astype(dtype),
        "mask": rng.uniform(0, 1, (n, 9, size, size)).astype(dtype),
        "grad_output": rng.standard_normal((n, o, size, size)).astype(dtype),
    }


def _call(arrays: dict) -> list:
    """Output and every gradient of one forward and one backward."""
    args = {k: arrays[k] for k in NAMES}
    out = cudcn.deform_conv2d(**args, padding=1)
    return [out, *cudcn.deform_conv2d_backward(arrays["grad_output"], **args, padding=1)]


def _assert_close(got: list, expected: list, dtype: str) -> None:
    for a, b in zip(got, expected):
        a64, b64 = cupy.asnumpy(a).astype(np.float64), cupy.asnumpy(b).astype(np.float64)
        scale = max(float(np.abs(b64).max()), 1.0)
        np.testing.assert_allclose(a64, b64, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * scale)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("algorithm", ["im2col", "fused", "auto"])
def test_a_captured_forward_and_backward_replay_as_eager_calls(algorithm, dtype):
    algorithms.clear_choices()  # "auto" measures this key afresh, before the capture
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryAsyncPool()  # allocations a capture can record
    with cupy.cuda.using_allocator(pool.malloc), stream, cudcn.algorithm(algorithm):
        arrays = {k: cupy.asarray(v) for k, v in _arguments(0, dtype).items()}
        _call(arrays)  # compiles, measures "auto", makes the capture's cuBLAS handle
        stream.begin_capture()
        captured = _call(arrays)
        graph = stream.end_capture()
        for name, values in _arguments(1, dtype).items():  # new inputs where the graph reads them
            arrays[name][...] = cupy.asarray(values)
        graph.launch(stream)
        stream.synchronize()
        replayed = [cupy.asnumpy(a) for a in captured]
        expected = _call(arrays)
        stream.synchronize()
    _assert_close(replayed, expected, dtype)


def test_capture_without_gemms_falls_back_or_says_why(monkeypatch):
    """Where GEMMs cannot be captured, "auto" runs the column-free algorithm
    (float32), and float64, which has no other, says why."""
    from cudcn.backends.cuda import engine as cuda_engine

    monkeypatch.setattr(cuda_engine.CupyEngine, "captures_gemms", property(lambda self: False))
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryAsyncPool()
    with cupy.cuda.using_allocator(pool.malloc), stream:
        arrays = {k: cupy.asarray(v) for k, v in _arguments(0, "float32").items()}
        expected = _call(arrays)
        stream.begin_capture()
        captured = _call(arrays)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        _assert_close(captured, expected, "float32")
        wide = {k: v.astype(cupy.float64) for k, v in arrays.items()}
        stream.begin_capture()
        try:
            with pytest.raises(cudcn.UnsupportedError, match="cannot be captured into a CUDA graph"):
                cudcn.deform_conv2d(**{k: wide[k] for k in NAMES}, padding=1)
        finally:
            stream.end_capture()


def test_torch_cuda_graph_captures_the_module():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import cudcn.torch as ct

    layer = ct.DeformConv2d(16, 8, 3, padding=1).cuda()
    first, second = _arguments(0, "float32"), _arguments(1, "float32")
    static = {k: torch.tensor(first[k], device="cuda", requires_grad=k != "grad_output")
              for k in ("input", "offset", "mask", "grad_output")}

    def step():
        out = layer(static["input"], static["offset"], static["mask"])
        out.backward(static["grad_output"])
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch's guide asks
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    for t in (*static.values(), *layer.parameters()):
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    with torch.no_grad():
        for k in static:
            static[k].copy_(torch.tensor(second[k]))
    graph.replay()
    torch.cuda.synchronize()
    got = [static_out.clone(), static["input"].grad.clone(), static["offset"].grad.clone(),
           static["mask"].grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone()]
    leaves = {k: static[k].detach().clone().requires_grad_() for k in ("input", "offset", "mask")}
    eager = ct.DeformConv2d(16, 8, 3, padding=1).cuda()
    eager.load_state_dict(layer.state_dict())
    out = eager(leaves["input"], leaves["offset"], leaves["mask"])
    out.backward(static["grad_output"])
    expected = [out, leaves["input"].grad, leaves["offset"].grad, leaves["mask"].grad, eager.weight.grad,
                eager.bias.grad]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b.detach(), rtol=1e-4, atol=1e-4 * max(float(b.abs().max()), 1.0))
