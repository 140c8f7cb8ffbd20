"""The fused (column-free) forward on a real GPU (marker ``gpu``; skipped without a device).

- against references that round the operands as the kernel does (the
  NumPy backend's columns and the weight in float16/bfloat16, or in TF32),
  and float32 without TF32 against the NumPy backend itself; drawn
  geometries, every precision the device has;
- against torchvision.ops.deform_conv2d in float64 on the same values;
- batch 0, a batch of 33 in chunks of one image, non-contiguous arguments;
- the 16-byte (cp.async, ldmatrix) and element-wise paths bitwise equal;
- an image of more than 2^31 input elements (the 64-bit index kernel);
- "auto" times im2col and fused once per key, keeps the faster, and later
  calls reuse the choice.

Every device allocation starts as NaN bytes (test_gpu.py's fixture), so an
output element the kernel forgets fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import cudcn
import test_gpu
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import algorithms, fused, launchers
from cudcn.backends.cuda.engine import cupy_engine
from cudcn.geometry import validate
from emulation.cases import cases, ml_dtypes, rounded_operands_forward

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

poisoned_memory = test_gpu.poisoned_memory  # autouse: every allocation starts as NaN bytes
relative_error, to_device = test_gpu.relative_error, test_gpu.to_device

#: precision -> (dtype, TF32, tolerance relative to the largest expected
#: value, against the rounded-operand reference; float32: against NumPy).
PRECISIONS = {
    "float16": ("float16", False, 2e-3),
    "bfloat16": ("bfloat16", False, 1.6e-2),
    # TF32 keeps 10 significand bits (ulp ~ 9.8e-4 relative): the kernel and
    # the reference round (sum w*p)*m and (w*m)*p, which may differ by an ulp.
    "float32 tf32": ("float32", True, 1.5e-3),
    "float32": ("float32", False, 1e-5),
}


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def cast(args: dict, name: str) -> dict:
    """The call's arrays in the dtype called ``name``."""
    return {k: v.astype(numpy_dtype(name)) if isinstance(v, np.ndarray) else v for k, v in args.items()}


def require_fused_dtype(name: str) -> None:
    """Skip, naming the cause, where the device or CuPy lacks the dtype for the fused kernels."""
    if name == "bfloat16":
        test_gpu.skip_without_cupy_bfloat16(numpy_dtype(name))
        if cupy_engine().capability < fused.BF16_TF32_CAPABILITY:
            pytest.skip("bfloat16 MMAs need compute capability 8.0")


def _usable(precision: str) -> None:
    require_fused_dtype(PRECISIONS[precision][0])


def _check(args: dict, precision: str) -> None:
    dtype, tf32, tol = PRECISIONS[precision]
    args = cast(args, dtype)
    geom = validate(**args)
    engine = cupy_engine()
    with cudcn.tf32(tf32), cudcn.algorithm("fused"):
        assert fused.applies(engine, geom, "forward") is None
        got = cudcn.deform_conv2d(**to_device(args))
        tensor_cores = fused.kernel(engine, geom) == "deform_fused_forward"
    assert got.dtype == geom.dtype
    if dtype == "float32" and not tensor_cores:
        expected = numpy_backend.forward(geom, *(args[k] for k in test_gpu.NAMES))
    else:
        expected = rounded_operands_forward(geom, args, tf32=dtype == "float32")
    assert relative_error(got, expected) <= tol


@pytest.mark.parametrize("precision", PRECISIONS)
@given(case=cases(dtypes=("float64",)))
@settings(max_examples=30)
def test_fused_forward_matches_numpy(precision, case):
    _usable(precision)
    args, _ = case
    _check(args, precision)


@pytest.mark.quick
@pytest.mark.parametrize("precision", PRECISIONS)
def test_batch_0_batch_33_in_chunks_and_strided_arguments(precision):
    _usable(precision)
    rng = np.random.default_rng(21)
    _check(test_gpu._fixed_case(rng, n=0), precision)
    args = test_gpu._fixed_case(rng, n=33)
    with cudcn.workspace_bytes(1):  # one image per chunk: 33 launches
        _check(args, precision)
    dtype = numpy_dtype(PRECISIONS[precision][0])
    args = {k: v.astype(dtype) if isinstance(v, np.ndarray) else v for k, v in test_gpu._fixed_case(rng).items()}
    dev = to_device(args)
    strided = dict(dev, input=cupy.asarray(np.concatenate([args["input"]] * 2, axis=3))[..., ::2],
                   weight=cupy.asfortranarray(dev["weight"]), bias=cupy.asarray(np.repeat(args["bias"], 2))[::2])
    with cudcn.algorithm("fused"), cudcn.tf32(PRECISIONS[precision][1]):
        assert relative_error(cudcn.deform_conv2d(**strided), cupy.asnumpy(cudcn.deform_conv2d(**dev))) == 0


@pytest.mark.quick
@pytest.mark.parametrize("precision", ["float16", "bfloat16", "float32 tf32", "float32"])
def test_matches_torchvision(precision):
    """Against torchvision's float64 forward of the same (rounded) values."""
    _usable(precision)
    torch, ops = test_gpu._torchvision()
    dtype, tf32, _ = PRECISIONS[precision]
    rng = np.random.default_rng(22)
    args = test_gpu._fixed_case(rng, n=4, c=24, o=20, h=9, w=10, dtype="float64")
    args = cast(args, dtype)
    t = {k: torch.tensor(np.asarray(v, np.float64), device="cuda") for k, v in args.items() if isinstance(v, np.ndarray)}
    expected = ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], stride=args["stride"],
                                 padding=args["padding"], dilation=args["dilation"], mask=t.get("mask"))
    with cudcn.algorithm("fused"), cudcn.tf32(tf32):
        got = cudcn.deform_conv2d(**to_device(args))
    tol = {"float16": 4e-3, "bfloat16": 3e-2, "float32 tf32": 2e-3, "float32": 1e-5}[precision]
    assert relative_error(got, expected.cpu().numpy()) <= tol


@pytest.mark.quick
@pytest.mark.parametrize("precision", PRECISIONS)
def test_async_copies_and_element_loads_agree_bitwise(precision):
    """The forward's 16-byte path (cp.async on sm_80 and newer, ldmatrix
    fragments) and its element-wise path (the same arrays one element off
    16-byte alignment) give the same bits on the device, as they do under
    the emulator, whose cp.async and ldmatrix stand in for the hardware's."""
    _usable(precision)
    dtype, tf32, _ = PRECISIONS[precision]
    rng = np.random.default_rng(23)
    args = cast(test_gpu._fixed_case(rng, n=2, c=64, o=72, h=9, w=10, groups=2, offset_groups=2), dtype)
    geom = validate(**args)
    engine = cupy_engine()
    dev = to_device(args)
    with cudcn.tf32(tf32):
        name = fused.kernel(engine, geom)
        weight = launchers.fused_weight(engine, geom, dev["weight"])
        pixels = launchers.channels_last(engine, geom, dev["input"])
        outputs = []
        for shift in (0, 1):  # aligned, then one element past a 16-byte boundary
            moved_pixels = cupy.empty(pixels.size + shift, pixels.dtype)[shift:].reshape(pixels.shape)
            moved_weight = cupy.empty(weight.size + shift, weight.dtype)[shift:].reshape(weight.shape)
            moved_pixels[...], moved_weight[...] = pixels, weight
            out = cupy.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), geom.dtype)
            launchers.fused_forward(engine, geom, name, moved_pixels, dev["offset"], dev["mask"], moved_weight,
                                    dev["bias"], out)
            outputs.append(cupy.asnumpy(out))
    assert outputs[0].tobytes() == outputs[1].tobytes()


def test_auto_times_both_and_keeps_the_choice(monkeypatch):
    monkeypatch.setattr(algorithms, "_choices", {})
    rng = np.random.default_rng(23)
    args = test_gpu._fixed_case(rng, n=8, c=64, o=64, h=32, w=32, dtype="float16")
    dev = to_device(args)
    geom = validate(**args)
    with cudcn.algorithm("auto"):
        first = cudcn.deform_conv2d(**dev)
        (choice,) = algorithms.choices()
        assert set(choice.seconds) == {"im2col", "fused"} and choice.geometry == geom
        assert choice.chosen == min(choice.seconds, key=choice.seconds.get)
        again = cudcn.deform_conv2d(**dev)
        assert len(algorithms.choices()) == 1
    expected = rounded_operands_forward(geom, args, tf32=False)
    assert relative_error(first, expected) <= 4e-3 and relative_error(again, expected) <= 4e-3


def big_shifted_case(seed: int, free_gib: int):
    """x (1, 64, 6144, 6144) float16 (2.4e9 elements), offsets of one integer
    shift (rows +1, columns -2), weight (4, 64, 3, 3); skips without
    ``free_gib`` GiB of free GPU memory."""
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < free_gib * 2**30:
        pytest.skip(f"needs {free_gib} GiB of free GPU memory")
    c, h, w, o = 64, 6144, 6144, 4
    assert c * h * w > 2**31
    rng = cupy.random.default_rng(seed)
    x = rng.standard_normal((1, c, h, w), dtype=cupy.float32).astype(cupy.float16)
    offset = cupy.zeros((1, 18, h, w), cupy.float16)
    offset[:, 0::2], offset[:, 1::2] = 1.0, -2.0
    weight = rng.standard_normal((o, c, 3, 3), dtype=cupy.float32).astype(cupy.float16)
    return x, offset, weight


def test_input_above_2_to_the_31_elements():
    """One float16 image of 2.4e9 input elements: the 64-bit index kernel,
    offsets one integer shift (rows +1, columns -2), so that the output is an
    ordinary convolution, checked at pixels near the end."""
    x, offset, weight = big_shifted_case(24, free_gib=24)
    o, h, w = weight.shape[0], *x.shape[2:]
    with cudcn.algorithm("fused"):
        out = cudcn.deform_conv2d(x, offset, weight, padding=1)
    host_w = cupy.asnumpy(weight).astype(np.float64)
    for hh, ww in [(h - 1, w - 1), (h - 2, w - 3), (h - 1, 0), (h // 2, w - 1), (3, 5)]:
        expected = np.zeros(o)
        for k in range(9):
            yy, xx = hh - 1 + k // 3 + 1, ww - 1 + k % 3 - 2
            if 0 <= yy < h and 0 <= xx < w:
                expected += host_w[:, :, k // 3, k % 3] @ cupy.asnumpy(x[0, :, yy, xx]).astype(np.float64)
        got = cupy.asnumpy(out[0, :, hh, ww]).astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=4e-3, atol=4e-3 * np.abs(expected).max())
