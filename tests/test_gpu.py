"""The CUDA backend on a real GPU (marker ``gpu``; skipped without a device).

- against the NumPy backend: float64 to 1e-10 and float32 to 1e-5 relative,
  every building block, forward and every gradient, drawn geometries;
- float16 / bfloat16: at most twice the error of a plain implementation in
  the same precision (columns and GEMM results rounded to the dtype), both
  measured against float64;
- against torchvision.ops.deform_conv2d (when torch and torchvision with
  CUDA are importable): forward and every gradient;
- every device allocation is filled with NaN bytes first, so an element a
  kernel forgets to write fails;
- no host synchronisation: behind a kernel that keeps the stream busy for
  half a second, every call returns to the host long before the stream is
  done; a non-default stream; arrays on a second GPU; tensors above 2^31
  elements;
- deterministic algorithms: the input gradient is bitwise repeatable and
  matches the atomic path;
- TF32: float32 within TF32's precision with it on;
- the backward kernels at real size with 64-bit indexing (above 2^31
  column elements), atomic and sorted.

bfloat16 runs where CuPy can hold it (probed with ``cupy.empty(1, bfloat16)``;
CuPy enables it only with ml_dtypes and NumPy >= 2.1.2), and is skipped
naming the cause otherwise.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cudcn
from cudcn.backends import layout, numpy as numpy_backend
from cudcn.backends.cuda.engine import cupy_bfloat16_problem
from cudcn.geometry import validate
from emulation.cases import cases, ml_dtypes
from reference import ShiftedGradients

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
NAMES = ("input", "offset", "weight", "bias", "mask")


@pytest.fixture(autouse=True)
def poisoned_memory():
    """Every allocation starts as 0xFF bytes: NaN in every float dtype."""
    pool = cupy.cuda.MemoryPool()

    def malloc(nbytes):
        memory = pool.malloc(nbytes)
        memory.memset_async(0xFF, nbytes)
        return memory

    cupy.cuda.set_allocator(malloc)
    try:
        yield
    finally:
        cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)
        pool.free_all_blocks()


def relative_error(got, expected) -> float:
    got = np.asarray(cupy.asnumpy(got) if isinstance(got, cupy.ndarray) else got, np.float64)
    expected = np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    if not np.isfinite(got).all():
        return float("inf")  # an unwritten (poisoned) or overflowed element
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(got - expected).max(initial=0.0)) / scale


def to_device(args: dict) -> dict:
    return {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}


def _check_call(args: dict, rng: np.random.Generator, tol: float) -> None:
    """Forward and backward of one call on the GPU against the NumPy backend."""
    dev = to_device(args)
    expected = cudcn.deform_conv2d(**args)
    got = cudcn.deform_conv2d(**dev)
    assert got.dtype == expected.dtype and isinstance(got, cupy.ndarray)
    assert relative_error(got, expected) <= tol
    grad_output = rng.standard_normal(expected.shape).astype(expected.dtype)
    expected_grads = cudcn.deform_conv2d_backward(grad_output, **args)
    grads = cudcn.deform_conv2d_backward(cupy.asarray(grad_output), **dev)
    for name in NAMES:
        e, g = getattr(expected_grads, name), getattr(grads, name)
        if e is None:
            assert g is None, name
        else:
            assert g.dtype == e.dtype, name
            assert relative_error(g, e) <= tol, name


# ---------------------------------------------------------------------------
# Against the NumPy backend.


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(case=cases(dtypes=("float32", "float64")), workspace=st.integers(1, 4000))
@settings(max_examples=30)
def test_forward_backward_match_numpy(dtype, case, workspace):
    args, rng = case
    args = {k: v.astype(dtype) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    with cudcn.workspace_bytes(workspace):
        _check_call(args, rng, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@given(case=cases(with_weight=False, dtypes=("float32", "float64")))
@settings(max_examples=30)
def test_building_blocks_match_numpy(dtype, case):
    args, rng = case
    args = {k: v.astype(dtype) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    x, offset, mask = args["input"], args["offset"], args["mask"]
    geometry = dict(kernel_size=args["kernel_size"], stride=args["stride"],
                    padding=args["padding"], dilation=args["dilation"])
    d = to_device({"x": x, "offset": offset, "mask": mask})
    tol = TOLERANCE[dtype]
    got = cudcn.deform_im2col(d["x"], d["offset"], mask=d["mask"], **geometry)
    expected = cudcn.deform_im2col(x, offset, mask=mask, **geometry)
    assert relative_error(got, expected) <= tol
    columns = rng.standard_normal(expected.shape).astype(dtype)
    got = cudcn.deform_col2im(cupy.asarray(columns), d["offset"], x.shape, mask=d["mask"], **geometry)
    assert relative_error(got, cudcn.deform_col2im(columns, offset, x.shape, mask=mask, **geometry)) <= tol
    g_off, g_mask = cudcn.deform_col2im_coord(cupy.asarray(columns), d["x"], d["offset"], mask=d["mask"], **geometry)
    e_off, e_mask = cudcn.deform_col2im_coord(columns, x, offset, mask=mask, **geometry)
    assert relative_error(g_off, e_off) <= tol
    assert (g_mask is None) == (e_mask is None)
    if e_mask is not None:
        assert relative_error(g_mask, e_mask) <= tol


def _fixed_case(rng, n=4, c=8, o=6, h=9, w=7, k=(3, 2), groups=2, offset_groups=2, dtype="float64",
                stride=(1, 2), padding=(1, 0), dilation=(1, 2), mask=True, bias=True):
    kh, kw = k
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    args = dict(
        input=rng.standard_normal((n, c, h, w)),
        offset=rng.uniform(-2, 2, (n, 2 * offset_groups * kh * kw, ho, wo)),
        weight=rng.standard_normal((o, c // groups, kh, kw)),
        bias=rng.standard_normal(o) if bias else None,
        mask=rng.uniform(0, 1, (n, offset_groups * kh * kw, ho, wo)) if mask else None,
    )
    args = {key: None if v is None else v.astype(dtype) for key, v in args.items()}
    args.update(stride=stride, padding=padding, dilation=dilation)
    return args


@pytest.mark.quick
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_empty_batch_and_a_batch_that_does_not_divide_the_chunk(dtype):
    rng = np.random.default_rng(1)
    _check_call(_fixed_case(rng, n=0, dtype=dtype), rng, TOLERANCE[dtype])
    args = _fixed_case(rng, n=33, dtype=dtype)
    per_image = 9 * 7 * 3 * 2 * 8 * 8  # more than one image per chunk, not a divisor of 33
    with cudcn.workspace_bytes(4 * per_image):
        _check_call(args, rng, TOLERANCE[dtype])


def test_non_contiguous_arguments():
    rng = np.random.default_rng(2)
    args = _fixed_case(rng)
    dev = to_device(args)
    strided = {k: (cupy.asfortranarray(v) if isinstance(v, cupy.ndarray) and v.ndim == 4 else v)
               for k, v in dev.items()}
    strided["input"] = cupy.asarray(np.concatenate([args["input"]] * 2, axis=3))[..., ::2]
    args["input"] = np.concatenate([args["input"]] * 2, axis=3)[..., ::2]
    assert not strided["input"].flags.c_contiguous
    got = cudcn.deform_conv2d(**strided)
    assert relative_error(got, cudcn.deform_conv2d(**args)) <= 1e-10


def test_non_finite_and_far_offsets_count_zero():
    rng = np.random.default_rng(3)
    args = _fixed_case(rng)
    offset = args["offset"]
    offset.flat[::5] = np.nan
    offset.flat[1::7] = np.inf
    offset.flat[2::11] = -1e300
    offset.flat[3::13] = 2.0**40
    _check_call(args, rng, 1e-10)


def on_a_non_blocking_stream(call):
    """call() on a fresh non-blocking stream, waited for; its result."""
    # The uploads ran on the legacy stream, which a non-blocking stream does not wait for.
    cupy.cuda.Stream.null.synchronize()
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        result = call()
    stream.synchronize()
    return result


def test_runs_on_a_non_default_stream():
    rng = np.random.default_rng(4)
    args = _fixed_case(rng, dtype="float32")
    dev = to_device(args)
    expected = cudcn.deform_conv2d(**args)

    def call():
        out = cudcn.deform_conv2d(**dev)
        return out, cudcn.deform_conv2d_backward(cupy.ones_like(out), **dev)

    got, grads = on_a_non_blocking_stream(call)
    assert relative_error(got, expected) <= 1e-5
    expected_grads = cudcn.deform_conv2d_backward(np.ones_like(expected), **args)
    for name in NAMES:
        assert relative_error(getattr(grads, name), getattr(expected_grads, name)) <= 1e-5, name


SPIN = r"""
extern "C" __global__ void spin(unsigned long long nanoseconds) {
  unsigned long long start, now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
  do {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  } while (now - start < nanoseconds);
}
"""


def host_returns_early(call, seconds: float = 0.5):
    """Run ``call`` on a fresh non-blocking stream behind a kernel that keeps
    that stream busy for ``seconds``; assert that the host got back from the
    call before the stream finished (so nothing in it waited for the device),
    then wait for the stream and return the call's result."""
    spin = cupy.RawKernel(SPIN, "spin")
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        spin((1,), (1,), (np.uint64(seconds * 1e9),))
        start = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - start
        busy = not stream.done
    stream.synchronize()
    assert busy, "the stream finished before the call returned: the host waited for the device"
    assert elapsed < seconds / 2, f"the call took {elapsed:.3f} s behind a {seconds} s kernel"
    return result


def test_no_host_synchronisation():
    rng = np.random.default_rng(9)
    args = _fixed_case(rng, dtype="float32")
    dev = to_device(args)
    geometry = dict(stride=args["stride"], padding=args["padding"], dilation=args["dilation"])
    x, offset, mask = dev["input"], dev["offset"], dev["mask"]

    def every_call():
        out = cudcn.deform_conv2d(**dev)
        grads = cudcn.deform_conv2d_backward(cupy.ones_like(out), **dev)
        columns = cudcn.deform_im2col(x, offset, (3, 2), mask=mask, **geometry)
        image = cudcn.deform_col2im(columns, offset, x.shape, (3, 2), mask=mask, **geometry)
        coord = cudcn.deform_col2im_coord(columns, x, offset, (3, 2), mask=mask, **geometry)
        return out, grads, columns, image, coord

    expected = every_call()  # compiles and loads every kernel first
    cupy.cuda.Device().synchronize()
    got = host_returns_early(every_call)
    assert relative_error(got[0], cupy.asnumpy(expected[0])) <= 1e-6
    for name in NAMES:
        assert relative_error(getattr(got[1], name), cupy.asnumpy(getattr(expected[1], name))) <= 1e-6, name
    for g, e in zip(got[2:4], expected[2:4]):
        assert relative_error(g, cupy.asnumpy(e)) <= 1e-6
    for g, e in zip(got[4], expected[4]):
        assert relative_error(g, cupy.asnumpy(e)) <= 1e-6


def test_arrays_on_a_second_gpu():
    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    rng = np.random.default_rng(5)
    args = _fixed_case(rng)
    with cupy.cuda.Device(1):
        dev = to_device(args)
    with cupy.cuda.Device(0):
        got = cudcn.deform_conv2d(**dev)
    with cupy.cuda.Device(1):
        grad_output = cupy.ones_like(got)
    with cupy.cuda.Device(0):
        grads = cudcn.deform_conv2d_backward(grad_output, **dev)
    assert got.device.id == 1 and grads.offset.device.id == 1
    assert relative_error(got, cudcn.deform_conv2d(**args)) <= 1e-10


# ---------------------------------------------------------------------------
# Deterministic algorithms.


@pytest.mark.quick
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_deterministic_backward_is_bitwise_repeatable(dtype):
    """Many sampling points on few pixels (so atomics would collide): the
    deterministic backward gives the same bits every run and matches the
    atomic path."""
    rng = np.random.default_rng(10)
    args = _fixed_case(rng, n=6, c=16, o=8, h=6, w=5, dtype=dtype)
    dev = to_device(args)
    grad_output = cupy.asarray(rng.standard_normal(cudcn.deform_conv2d(**args).shape).astype(dtype))
    atomic = cudcn.deform_conv2d_backward(grad_output, **dev)
    runs = []
    with cudcn.deterministic_algorithms():
        for _ in range(3):
            runs.append(cudcn.deform_conv2d_backward(grad_output, **dev))
    tol = {"float64": 1e-10, "float32": 1e-5, "float16": 4e-3}[dtype]
    for name in NAMES:
        first = cupy.asnumpy(getattr(runs[0], name))
        for run in runs[1:]:
            assert first.tobytes() == cupy.asnumpy(getattr(run, name)).tobytes(), name
        assert relative_error(getattr(atomic, name), first.astype(np.float64)) <= tol, name


def test_deterministic_col2im_matches_numpy():
    rng = np.random.default_rng(12)
    args = _fixed_case(rng, n=3, dtype="float32")
    geometry = dict(kernel_size=(3, 2), stride=args["stride"], padding=args["padding"], dilation=args["dilation"])
    offset = args["offset"]
    offset.flat[::9] = np.nan
    offset.flat[1::11] = 1e30
    columns = cudcn.deform_im2col(args["input"], offset, mask=args["mask"], **geometry)
    columns = rng.standard_normal(columns.shape).astype(np.float32)
    expected = cudcn.deform_col2im(columns, offset, args["input"].shape, mask=args["mask"], **geometry)
    with cudcn.deterministic_algorithms():
        got = [cudcn.deform_col2im(cupy.asarray(columns), cupy.asarray(offset), args["input"].shape,
                                   mask=cupy.asarray(args["mask"]), **geometry) for _ in range(2)]
    assert relative_error(got[0], expected) <= 1e-5
    assert cupy.asnumpy(got[0]).tobytes() == cupy.asnumpy(got[1]).tobytes()


# ---------------------------------------------------------------------------
# float16 and bfloat16: at most twice the error of a plain implementation.


def _round(a, dtype):
    return np.asarray(a).astype(dtype).astype(np.float32)


def _plain(args: dict, grad_output: np.ndarray, dtype) -> dict:
    """Forward and gradients computed in float32 with every intermediate
    (columns, GEMM results, column gradients) rounded to the dtype: the
    straightforward implementation in that precision."""
    geom = validate(**{k: args[k] for k in ("input", "offset", "weight", "bias", "mask",
                                              "stride", "padding", "dilation")})
    f32 = {k: (v.astype(np.float32) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    block = validate(input=f32["input"], offset=f32["offset"], mask=f32["mask"],
                     kernel_size=(geom.kernel_h, geom.kernel_w), stride=args["stride"],
                     padding=args["padding"], dilation=args["dilation"])
    n, L = geom.batch, geom.out_pixels
    g, og = geom.groups, geom.out_channels // geom.groups
    columns = _round(numpy_backend.im2col(block, f32["input"], f32["offset"], f32["mask"]), dtype)
    matrix = layout.weight_matrix(geom, f32["weight"], np.float32)
    y = _round(np.matmul(layout.grouped_columns(geom, columns), matrix), dtype)
    out = y.reshape(g, n, L, og).transpose(1, 0, 3, 2).reshape(n, -1, geom.out_h, geom.out_w)
    if f32["bias"] is not None:
        out = out + f32["bias"].reshape(1, -1, 1, 1)
    go = grad_output.astype(np.float32).reshape(n, g, og, L).transpose(1, 0, 3, 2).reshape(g, n * L, og)
    grad_matrix = np.matmul(layout.grouped_columns(geom, columns).transpose(0, 2, 1), go)
    grad_columns = _round(layout.ungrouped_columns(geom, np.matmul(go, matrix.transpose(0, 2, 1)), n), dtype)
    grad_offset, grad_mask = numpy_backend.col2im_coord(block, grad_columns, f32["input"], f32["offset"], f32["mask"])
    return {
        "out": out,
        "input": numpy_backend.col2im(block, grad_columns, f32["offset"], f32["mask"]),
        "offset": grad_offset,
        "weight": layout.weight_from_matrix(geom, grad_matrix),
        "bias": None if f32["bias"] is None else go.sum(axis=1).reshape(-1),
        "mask": grad_mask,
    }


HALF_TYPES = [np.dtype(np.float16)] + ([np.dtype(ml_dtypes.bfloat16)] if ml_dtypes else [])


def skip_without_cupy_bfloat16(dtype) -> None:
    """Skip, naming the cause, where CuPy cannot hold bfloat16 arrays."""
    if dtype.name != "bfloat16":
        return
    try:
        cupy.empty(1, dtype)
    except Exception as error:
        pytest.skip(f"CuPy has no bfloat16 here: {cupy_bfloat16_problem() or error}")


def device_dtype(name: str) -> np.dtype:
    """The dtype called ``name``; skips, naming the cause, where it cannot
    live on the device (bfloat16 without ml_dtypes or without CuPy's
    support)."""
    if name != "bfloat16":
        return np.dtype(name)
    if ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16)
    skip_without_cupy_bfloat16(dtype)
    return dtype


@pytest.mark.quick
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=[t.name for t in HALF_TYPES])
@pytest.mark.parametrize("seed", range(4))
def test_half_precision_error_at_most_twice_plain(dtype, seed):
    skip_without_cupy_bfloat16(dtype)
    rng = np.random.default_rng(seed)
    args = _fixed_case(rng, n=3, c=16, o=12, h=11, w=10, dtype=dtype, bias=seed % 2 == 0, mask=seed < 2)
    exact = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    reference = cudcn.deform_conv2d(**exact)
    grad_output = rng.standard_normal(reference.shape).astype(dtype)
    reference_grads = cudcn.deform_conv2d_backward(grad_output.astype(np.float64), **exact)
    plain = _plain(args, grad_output, dtype)

    dev = to_device(args)
    got = cudcn.deform_conv2d(**dev)
    grads = cudcn.deform_conv2d_backward(cupy.asarray(grad_output), **dev)
    assert got.dtype == dtype

    # One unit in the last place of the dtype, relative: a floor for the bound
    # where the plain error happens to be zero.
    ulp = float(np.finfo(dtype).eps) if dtype == np.float16 else 2.0**-7  # bfloat16: 8-bit significand
    checks = [("out", got, reference)] + [
        (name, getattr(grads, name), getattr(reference_grads, name)) for name in NAMES
    ]
    for name, g, ref in checks:
        if ref is None:
            assert g is None
            continue
        ours = relative_error(g, ref)
        theirs = relative_error(np.asarray(plain[name], np.float64).astype(dtype), ref)
        assert ours <= 2 * theirs + ulp, f"{name}: {ours:.2e} vs plain {theirs:.2e}"


# ---------------------------------------------------------------------------
# Against torchvision.


def _torchvision():
    try:
        import torch
        import torchvision.ops
    except ImportError:
        pytest.skip("torch and torchvision are not importable")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    return torch, torchvision.ops


@pytest.mark.quick
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("mask", [True, False])
def test_matches_torchvision(dtype, mask):
    torch, ops = _torchvision()
    rng = np.random.default_rng(6)
    args = _fixed_case(rng, n=5, c=8, o=4, dtype=dtype, mask=mask)
    tensors = {k: torch.tensor(v, device="cuda", requires_grad=True)
               for k, v in args.items() if isinstance(v, np.ndarray)}
    out_t = ops.deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                              stride=args["stride"], padding=args["padding"], dilation=args["dilation"],
                              mask=tensors.get("mask"))
    grad_output = rng.standard_normal(tuple(out_t.shape)).astype(dtype)
    out_t.backward(torch.tensor(grad_output, device="cuda"))

    dev = to_device(args)
    out = cudcn.deform_conv2d(**dev)
    grads = cudcn.deform_conv2d_backward(cupy.asarray(grad_output), **dev)
    tol = 1e-10 if dtype == "float64" else 1e-4
    assert relative_error(out, out_t.detach().cpu().numpy()) <= tol
    for name in NAMES:
        if name in tensors:
            assert relative_error(getattr(grads, name), tensors[name].grad.cpu().numpy()) <= tol, name


# ---------------------------------------------------------------------------
# 64-bit indexing.


def test_tensors_above_2_to_the_31_elements():
    """One image whose column buffer has 2.4e9 elements (> 2^31): im2col and
    the im2col forward pick the 64-bit index kernels; checked at points near
    the end. (The fused forward's own big-input test is in test_gpu_fused.py.)"""
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    c, h, w, o = 64, 2048, 2048, 4
    rng = cupy.random.default_rng(8)
    x = rng.standard_normal((1, c, h, w), dtype=cupy.float32).astype(cupy.float16)
    offset = cupy.zeros((1, 18, h, w), cupy.float16)
    offset[:, 0::2] = 1.0  # rows +1
    offset[:, 1::2] = -2.0  # columns -2: an ordinary convolution, shifted
    assert h * w * 9 * c > 2**31
    with cudcn.workspace_bytes(16 * 2**30):
        columns = cudcn.deform_im2col(x, offset, 3, padding=1)
        host_x = cupy.asnumpy(x).astype(np.float32)
        positions = [(h - 1, w - 1), (h - 2, w - 3), (h - 1, 0), (h // 2, w - 1), (3, 5)]
        for hh, ww in positions:
            l = hh * w + ww
            got = cupy.asnumpy(columns[0, l]).astype(np.float32)  # (9, C)
            for k in range(9):
                yy, xx = hh - 1 + k // 3 + 1, ww - 1 + k % 3 - 2
                expected = host_x[0, :, yy, xx] if 0 <= yy < h and 0 <= xx < w else np.zeros(c)
                np.testing.assert_array_equal(got[k], expected.astype(np.float16).astype(np.float32))
        del columns
        weight = rng.standard_normal((o, c, 3, 3), dtype=cupy.float32).astype(cupy.float16)
        with cudcn.algorithm("im2col"):  # "auto" might choose the fused forward
            out = cudcn.deform_conv2d(x, offset, weight, padding=1)
        host_w = cupy.asnumpy(weight).astype(np.float32)
        padded = np.pad(host_x[0], ((0, 0), (1, 1), (1, 1)))
        for hh, ww in positions:
            expected = np.zeros(o, np.float32)
            for k in range(9):
                yy, xx = hh + k // 3 + 1, ww + k % 3 - 2  # in padded coordinates
                if 0 <= yy < h + 2 and 0 <= xx < w + 2:
                    expected += host_w[:, :, k // 3, k % 3] @ padded[:, yy, xx]
            got = cupy.asnumpy(out[0, :, hh, ww]).astype(np.float32)
            np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "sorted"])
def test_backward_above_2_to_the_31_elements(deterministic):
    """The backward at real size with 64-bit indexing: one image whose column
    buffer has 2.4e9 elements, offsets one integer shift (rows +1, columns
    -2) so that every gradient is a sum of shifted products
    (tests/reference.py): the input, offset and mask gradients at pixels near
    the end of their tensors, the weight gradient in full."""
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 32 * 2**30:
        pytest.skip("needs 32 GiB of free GPU memory")
    c, h, w, o = 64, 2048, 2048, 4
    assert h * w * 9 * c > 2**31
    rng = cupy.random.default_rng(11)
    x = rng.standard_normal((1, c, h, w), dtype=cupy.float32).astype(cupy.float16)
    offset = cupy.zeros((1, 18, h, w), cupy.float16)
    offset[:, 0::2], offset[:, 1::2] = 1.0, -2.0
    mask = rng.uniform(0.5, 1.0, (1, 9, h, w), dtype=cupy.float32).astype(cupy.float16)
    weight = (rng.standard_normal((o, c, 3, 3), dtype=cupy.float32) * 0.1).astype(cupy.float16)
    grad_output = rng.standard_normal((1, o, h, w), dtype=cupy.float32).astype(cupy.float16)
    bias = cupy.zeros(o, cupy.float16)
    # im2col's kernels (the fused backward's big-input test is in test_gpu_fused_backward.py).
    with cudcn.workspace_bytes(16 * 2**30), cudcn.deterministic_algorithms(deterministic), \
            cudcn.algorithm("im2col"):
        grads = cudcn.deform_conv2d_backward(grad_output, x, offset, weight, bias, padding=1, mask=mask)
    reference = ShiftedGradients(x[0], weight, grad_output[0], mask[0], 1, -2)

    def assert_near(got, expected, what):
        got, expected = cupy.asnumpy(got).astype(np.float64), cupy.asnumpy(expected)
        scale = max(float(np.abs(expected).max()), 1e-3)
        assert np.abs(got - expected).max() <= 2e-2 * scale, what

    assert_near(grads.weight, reference.weight_gradient(), "weight")
    for y, xx in [(h - 1, w - 1), (h - 1, 0), (h - 2, w - 3), (h // 2, w - 1), (5, 7)]:
        assert_near(grads.input[0, :, y, xx], reference.input_gradient(y, xx), f"input at {(y, xx)}")
    # Output pixels whose samples all lie inside the image (h' <= H-3, w' >= 3).
    for hh, ww in [(h - 3, w - 1), (h - 3, 3), (h // 2, w - 1), (h - 4, w // 2)]:
        offset_grad, mask_grad = reference.offset_and_mask_gradients(hh, ww)
        assert_near(grads.offset[0, :, hh, ww].reshape(9, 2), offset_grad, f"offset at {(hh, ww)}")
        assert_near(grads.mask[0, :, hh, ww], mask_grad, f"mask at {(hh, ww)}")
    assert_near(grads.bias, grad_output.astype(cupy.float64).sum(axis=(0, 2, 3)), "bias")


# ---------------------------------------------------------------------------
# TF32.


def test_tf32_keeps_float32_within_tf32_precision():
    """With TF32 on, float32 forward and gradients stay within TF32's
    precision of float64 (about 1e-3 relative); with it off, float32's."""
    rng = np.random.default_rng(13)
    args = _fixed_case(rng, n=4, c=32, o=16, h=12, w=11, groups=1, offset_groups=1, dtype="float32")
    exact = {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in args.items()}
    reference = cudcn.deform_conv2d(**exact)
    grad_output = rng.standard_normal(reference.shape).astype(np.float32)
    reference_grads = cudcn.deform_conv2d_backward(grad_output.astype(np.float64), **exact)
    dev = to_device(args)
    for setting, tol in ((False, 1e-5), (True, 5e-3)):
        with cudcn.tf32(setting):
            out = cudcn.deform_conv2d(**dev)
            grads = cudcn.deform_conv2d_backward(cupy.asarray(grad_output), **dev)
        assert relative_error(out, reference) <= tol, setting
        for name in NAMES:
            assert relative_error(getattr(grads, name), getattr(reference_grads, name)) <= tol, (setting, name)
