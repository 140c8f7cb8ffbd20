"""DCNv3 and DCNv4 on a real GPU (marker ``gpu``; skipped without a device).

- CuPy arrays against the NumPy backend on the same values, forward and
  every gradient, in float64 (1e-10), float32 (1e-5), float16 (4e-3) and
  bfloat16 (3e-2, where CuPy holds it), relative to the largest value: fixed
  shapes (DCNv4's packed offset_mask with NaN in its padding, the fused
  softmax, D = 1 and odd D, a 7x7 kernel with remove_center, unequal pads)
  and drawn geometries, atomic and deterministic input gradients;
- every device allocation starts as NaN bytes (test_gpu.py's fixture), so an
  element a kernel forgets fails;
- torch CUDA tensors through cudcn.torch.dcnv3 and dcnv4 against the same
  call on the CPU, in every dtype: DCNv4's bfloat16 backward works (the
  reference op's raises);
- deterministic algorithms: the input gradient is bitwise the same run after
  run where many points share pixels, and equals the atomic one to rounding;
- no host synchronisation (behind a busy stream, the calls return at once),
  a non-default stream, non-finite and far offsets;
- an input of 2^31 elements (the 64-bit index kernels), forward and
  backward, checked at pixel centres near its end against sums worked on the host.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cudcn
import test_gpu
from dcnv3_reference import DCNv3Call, calls, fixed_call, pack

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

poisoned_memory = test_gpu.poisoned_memory  # autouse: every allocation starts as NaN bytes
relative_error = test_gpu.relative_error

TOLERANCE = {"float64": 1e-10, "float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}
DTYPES = tuple(TOLERANCE)
FIELDS = ("input", "offset", "mask")


_dtype = test_gpu.device_dtype


def _call(dtype_name: str, batch=2, height=9, width=11, group=4, channels=16, **shape) -> DCNv3Call:
    """dcnv3_reference.fixed_call on the host, in a dtype: by default
    InternImage's 3x3 with 4 groups of 16 channels, offset_scale 0.5."""
    call = fixed_call(batch=batch, height=height, width=width, group=group, channels=channels, **shape)
    return _in_dtype(call, _dtype(dtype_name))


def _in_dtype(call: DCNv3Call, dtype: np.dtype) -> DCNv3Call:
    with np.errstate(over="ignore"):
        return call.with_arrays(**{f: getattr(call, f).astype(dtype) for f in FIELDS})


def _grad_output(call: DCNv3Call) -> np.ndarray:
    return np.random.default_rng(call.seed + 1).standard_normal(call.out_shape).astype(call.input.dtype)


def _check(call: DCNv3Call, dtype_name: str, deterministic: bool = False, softmax: bool = False,
           packed: bool = False) -> None:
    """Forward and backward on the device against the NumPy backend on the same values."""
    tol = TOLERANCE[dtype_name]
    grad_output = _grad_output(call)
    if packed:
        offset_mask = pack(call.offset, call.mask, call.group, fill=np.nan)
        args = (call.input, offset_mask, *call.scalars)
        expected = cudcn.dcnv4(*args)
        expected_grads = cudcn.dcnv4_backward(grad_output, *args)
        dev = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in args)
        with cudcn.deterministic_algorithms(deterministic):
            got = cudcn.dcnv4(*dev)
            grads = cudcn.dcnv4_backward(cupy.asarray(grad_output), *dev)
        names = ("input", "offset_mask")
        assert not cupy.asnumpy(grads.offset_mask)[..., call.group * 3 * call.points:].any()
    else:
        expected = cudcn.dcnv3(*call.args, softmax=softmax)
        expected_grads = cudcn.dcnv3_backward(grad_output, *call.args, softmax=softmax)
        dev = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in call.args)
        with cudcn.deterministic_algorithms(deterministic):
            got = cudcn.dcnv3(*dev, softmax=softmax)
            grads = cudcn.dcnv3_backward(cupy.asarray(grad_output), *dev, softmax=softmax)
        names = FIELDS
    assert isinstance(got, cupy.ndarray) and got.dtype == expected.dtype and got.shape == expected.shape
    assert relative_error(got, expected) <= tol
    for name in names:
        g, e = getattr(grads, name), getattr(expected_grads, name)
        assert isinstance(g, cupy.ndarray) and g.dtype == e.dtype and g.shape == e.shape, name
        assert relative_error(g, e) <= tol, name


FIXED = {
    # name: _call's keywords and the check's
    "InternImage 3x3, G=4, D=16": (dict(), dict()),
    "DCNv4 packed, NaN padding": (dict(), dict(packed=True)),
    "softmax fused": (dict(), dict(softmax=True)),
    "7x7 remove_center, D=33, unequal pads": (dict(group=2, channels=33, kernel_h=7, kernel_w=7, pad=(3, 2),
                                                   remove_center=True, seed=1), dict()),
    "D=1, 2x5 kernel, stride 2, dilation 2": (dict(group=3, channels=1, kernel_h=2, kernel_w=5, stride=2,
                                                   dilation=2, pad=(2, 0), seed=2), dict()),
    "D=6, P odd: DCNv4's pairs unaligned": (dict(group=3, channels=6, kernel_h=1, kernel_w=3, pad=(0, 1), seed=3),
                                            dict(packed=True)),
}


@pytest.mark.quick
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_matches_numpy_in_every_dtype(dtype_name, deterministic):
    """The fixed cases (DCNv4 packed, softmax, 7x7, D = 1 and odd D, stride,
    dilation, unequal pads, offset_scale 0.5) against the NumPy backend."""
    for name, (shape, options) in FIXED.items():
        _check(_call(dtype_name, **shape), dtype_name, deterministic, **options)


@pytest.mark.parametrize("dtype_name", DTYPES)
@given(call=calls(kinks=0.2, channels=(1, 3, 6, 16, 20, 33)), deterministic=st.booleans(), softmax=st.booleans(),
       packed=st.booleans())
@settings(max_examples=30)
def test_drawn_geometries_match_numpy(dtype_name, call, deterministic, softmax, packed):
    """Kernels 1-7 (rectangular, even), stride, dilation, unequal pads,
    remove_center, offset_scale 0.5-2, batch 0-2, group_channels 1-33, points
    outside the input and on kinks; DCNv3 (with or without softmax) or DCNv4."""
    _check(_in_dtype(call, _dtype(dtype_name)), dtype_name, deterministic, softmax and not packed, packed)


def test_non_finite_and_far_offsets_count_zero():
    call = _call("float64", seed=4)
    flat = call.offset.reshape(-1)
    flat[::5] = np.nan
    flat[1::7] = np.inf
    flat[2::11] = -1e300
    flat[3::13] = 2.0**40
    for deterministic in (False, True):
        _check(call, "float64", deterministic)
        _check(call, "float64", deterministic, softmax=True)


@pytest.mark.quick
@pytest.mark.parametrize("dtype_name", ["float64", "float32", "float16"])
def test_deterministic_input_gradient_is_bitwise_repeatable(dtype_name):
    """Many points on a few pixels (so that atomics would collide): the same
    bits every run, the NumPy backend's values, and the atomic path's to
    rounding; the offset and mask gradients are bitwise repeatable either way."""
    call = _call(dtype_name, batch=2, height=4, width=4, group=2, channels=32, kernel_h=5, kernel_w=5, pad=(8, 8),
                 seed=5)
    dev = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in call.args)
    grad_output = cupy.asarray(_grad_output(call))
    atomic = cudcn.dcnv3_backward(grad_output, *dev)
    with cudcn.deterministic_algorithms():
        runs = [cudcn.dcnv3_backward(grad_output, *dev) for _ in range(3)]
    for name in FIELDS:
        first = cupy.asnumpy(getattr(runs[0], name))
        for run in runs[1:]:
            assert first.tobytes() == cupy.asnumpy(getattr(run, name)).tobytes(), name
        assert relative_error(getattr(atomic, name), first.astype(np.float64)) <= TOLERANCE[dtype_name], name
    expected = cudcn.dcnv3_backward(_grad_output(call), *call.args)
    for name in FIELDS:
        assert relative_error(getattr(runs[0], name), getattr(expected, name)) <= TOLERANCE[dtype_name], name


def test_runs_on_a_non_default_stream():
    call = _call("float32", seed=6)
    dev = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in call.args)
    expected = cudcn.dcnv3(*call.args, softmax=True)

    def run():
        out = cudcn.dcnv3(*dev, softmax=True)
        return out, cudcn.dcnv3_backward(cupy.ones_like(out), *dev, softmax=True)

    got, grads = test_gpu.on_a_non_blocking_stream(run)
    assert relative_error(got, expected) <= 1e-5
    expected_grads = cudcn.dcnv3_backward(np.ones_like(expected), *call.args, softmax=True)
    for name in FIELDS:
        assert relative_error(getattr(grads, name), getattr(expected_grads, name)) <= 1e-5, name


def test_no_host_synchronisation():
    """Forward, atomic and deterministic backward (the sort and its
    searchsorted included), with and without softmax, DCNv4 too, return to
    the host while the stream is still busy."""
    call = _call("float32", seed=7)
    dev = tuple(cupy.asarray(a) if isinstance(a, np.ndarray) else a for a in call.args)
    packed = (dev[0], cupy.asarray(pack(call.offset, call.mask, call.group)), *call.scalars)

    def every_call():
        results = []
        for softmax in (False, True):
            out = cudcn.dcnv3(*dev, softmax=softmax)
            results.append(out)
            results.append(cudcn.dcnv3_backward(cupy.ones_like(out), *dev, softmax=softmax))
            with cudcn.deterministic_algorithms():
                results.append(cudcn.dcnv3_backward(cupy.ones_like(out), *dev, softmax=softmax))
        out = cudcn.dcnv4(*packed)
        results += [out, cudcn.dcnv4_backward(cupy.ones_like(out), *packed)]
        return results

    expected = every_call()  # compiles and loads every kernel first
    cupy.cuda.Device().synchronize()
    got = test_gpu.host_returns_early(every_call)
    for g, e in zip(got, expected):
        for a, b in zip(g if isinstance(g, tuple) else (g,), e if isinstance(e, tuple) else (e,)):
            assert relative_error(a, cupy.asnumpy(b)) <= 1e-5


# ---------------------------------------------------------------------------
# torch CUDA tensors through the adapter: the op dispatches by device.

TORCH_TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-2, "bfloat16": 1e-1}


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("dtype_name", DTYPES)
def test_torch_cuda_tensors_equal_the_cpu(dtype_name, packed):
    """cudcn.torch.dcnv3 / dcnv4 with autograd on CUDA tensors against the
    same call on the CPU (float64 there): forward and every gradient; for
    DCNv4 in bfloat16 the backward that DCNv4's own op refuses."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    import cudcn.torch as ct

    call = _call("float64", seed=8)
    dtype = getattr(torch, dtype_name)
    arrays = [call.input, pack(call.offset, call.mask, call.group)] if packed else [call.input, call.offset,
                                                                                     call.mask]
    cpu = [torch.from_numpy(a).requires_grad_() for a in arrays]
    gpu = [t.detach().to("cuda", dtype).requires_grad_() for t in cpu]
    op = ct.dcnv4 if packed else ct.dcnv3
    out = op(*gpu, *call.scalars)
    # The CPU reference sees the values the GPU sees (rounded to the dtype).
    reference = [t.detach().to(dtype).double().requires_grad_() for t in cpu]
    expected = op(*reference, *call.scalars)
    assert out.dtype == dtype and out.device.type == "cuda"
    tolerance = TORCH_TOLERANCE[dtype_name]
    scale = float(expected.abs().max())
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance * scale)
    grad_output = torch.randn_like(expected).to(dtype)
    out.backward(grad_output.cuda())
    expected.backward(grad_output.double())
    for g, c in zip(gpu, reference):
        scale = float(c.grad.abs().max())
        torch.testing.assert_close(g.grad.double().cpu(), c.grad, rtol=tolerance, atol=tolerance * scale)


# ---------------------------------------------------------------------------
# 64-bit indexing.


def test_input_above_2_to_the_31_elements():
    """One image of 4096 x 4096 pixels, 4 groups of 32 channels: 2^31 float32
    elements (the 64-bit index kernels). A 1x1 kernel with stride 512 (8 x 8
    output pixels); every point sits exactly on a pixel centre near the end
    of the input, so the output is mask x that pixel, the input gradient
    there a sum of mask x grad_output, and the offset gradient the one-sided
    slope towards the next column and row."""
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    side, group, channels, stride = 4096, 4, 32, 512
    assert side * side * group * channels >= 2**31
    out_side = (side - 1) // stride + 1
    rng = np.random.default_rng(9)
    input = cupy.random.default_rng(9).standard_normal((1, side, side, group * channels), dtype=cupy.float32)
    rows = rng.integers(side - 40, side - 1, (out_side, out_side, group))
    cols = rng.integers(side - 40, side - 1, (out_side, out_side, group))
    # Point of output pixel (h, w): (h*stride + dy, w*stride + dx), offset_scale 1, no padding.
    offset = np.stack([cols - np.arange(out_side)[None, :, None] * stride,
                       rows - np.arange(out_side)[:, None, None] * stride], -1).reshape(1, out_side, out_side, -1)
    mask = rng.uniform(0.5, 1.0, (1, out_side, out_side, group))
    scalars = (1, 1, stride, stride, 0, 0, 1, 1, group, channels)
    dev_offset, dev_mask = cupy.asarray(offset, cupy.float32), cupy.asarray(mask, cupy.float32)
    out = cudcn.dcnv3(input, dev_offset, dev_mask, *scalars)
    grad_output = rng.standard_normal(out.shape).astype(np.float32)
    grads = cudcn.dcnv3_backward(cupy.asarray(grad_output), input, dev_offset, dev_mask, *scalars)

    m = mask.astype(np.float32).astype(np.float64)
    g = grad_output.astype(np.float64).reshape(out_side, out_side, group, channels)
    got = cupy.asnumpy(out).astype(np.float64).reshape(out_side, out_side, group, channels)
    got_offset = cupy.asnumpy(grads.offset).astype(np.float64).reshape(out_side, out_side, group, 2)
    got_mask = cupy.asnumpy(grads.mask).astype(np.float64).reshape(out_side, out_side, group)

    def pixel(r: int, c: int, k: int) -> np.ndarray:
        return cupy.asnumpy(input[0, r, c, k * channels:(k + 1) * channels]).astype(np.float64)

    expected_input: dict[tuple[int, int, int], np.ndarray] = {}
    for h in range(out_side):
        for w in range(out_side):
            for k in range(group):
                r, c = int(rows[h, w, k]), int(cols[h, w, k])
                here = pixel(r, c, k)
                np.testing.assert_allclose(got[h, w, k], m[0, h, w, k] * here, rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(got_mask[h, w, k], g[h, w, k] @ here, rtol=1e-4, atol=1e-4)
                slope = m[0, h, w, k] * np.array([g[h, w, k] @ (pixel(r, c + 1, k) - here),
                                                  g[h, w, k] @ (pixel(r + 1, c, k) - here)])
                np.testing.assert_allclose(got_offset[h, w, k], slope, rtol=1e-4, atol=1e-4 * np.abs(slope).max())
                key = (r, c, k)
                expected_input[key] = expected_input.get(key, 0) + m[0, h, w, k] * g[h, w, k]
    for (r, c, k), expected in expected_input.items():
        got_input = cupy.asnumpy(grads.input[0, r, c, k * channels:(k + 1) * channels]).astype(np.float64)
        np.testing.assert_allclose(got_input, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # Pixels no point touches keep a zero gradient (the last and the first pixel included).
    assert not cupy.asnumpy(grads.input[0, -1, -1]).any() and not cupy.asnumpy(grads.input[0, 0, 0]).any()
