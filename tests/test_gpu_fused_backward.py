"""The fused (column-free) backward on a real GPU (marker ``gpu``; skipped without a device).

- every gradient against the NumPy backend, drawn geometries, every
  precision the device has (float16, bfloat16, float32 with TF32 MMAs,
  float32 FMAs);
- against torchvision.ops.deform_conv2d's float64 backward of the same values;
- batch 0, a batch of 33 whose float32 input-gradient accumulator holds one
  image at a time, non-contiguous arguments, pixel splits of the weight
  gradient;
- the offset, mask and weight gradients are bitwise repeatable, run after
  run and whatever the grid (the input gradient adds with atomics);
- deterministic algorithms leave the backward to im2col's sorted col2im;
- "auto" times both backwards once and keeps the faster;
- an image of more than 2^31 input elements (the 64-bit index kernels).

Every device allocation starts as NaN bytes (test_gpu.py's fixture), so an
element the kernels forget fails.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

import cudcn
import test_gpu
from test_gpu_fused import big_shifted_case, cast, numpy_dtype, require_fused_dtype
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import algorithms, fused, fused_backward
from cudcn.backends.cuda.engine import cupy_engine
from cudcn.geometry import validate
from emulation.cases import cases

pytestmark = pytest.mark.gpu

cupy = pytest.importorskip("cupy")

poisoned_memory = test_gpu.poisoned_memory  # autouse: every allocation starts as NaN bytes
relative_error, to_device, NAMES = test_gpu.relative_error, test_gpu.to_device, test_gpu.NAMES
ARRAYS = ("input", "offset", "weight", "mask")

#: precision -> (dtype, TF32, tolerance relative to the largest expected
#: value, against the NumPy backend in float32 on the same values).
PRECISIONS = {
    "float16": ("float16", False, 4e-3),
    "bfloat16": ("bfloat16", False, 3e-2),
    "float32 tf32": ("float32", True, 5e-3),
    "float32": ("float32", False, 1e-5),
}


def _usable(precision: str) -> None:
    require_fused_dtype(PRECISIONS[precision][0])


def _fused_backward(args: dict, grad_output: np.ndarray, tf32: bool):
    """The fused backward of one call on the GPU (checked to be the one that runs)."""
    geom = validate(**args)
    with cudcn.tf32(tf32), cudcn.algorithm("fused"):
        assert fused.applies(cupy_engine(), geom, "backward") is None
        return cudcn.deform_conv2d_backward(cupy.asarray(grad_output), **to_device(args))


def _check(args: dict, precision: str, rng: np.random.Generator) -> None:
    dtype, tf32, tol = PRECISIONS[precision]
    args = cast(args, dtype)
    geom = validate(**args)
    grad_output = rng.standard_normal((geom.batch, geom.out_channels, geom.out_h, geom.out_w)).astype(geom.dtype)
    grads = _fused_backward(args, grad_output, tf32)
    expected = numpy_backend.backward(geom, grad_output, *(args.get(k) for k in ARRAYS))
    for name, want in zip(cudcn.Gradients._fields, expected):
        got = getattr(grads, name)
        if want is None:
            assert got is None, name
        else:
            assert got.dtype == want.dtype and relative_error(got, want) <= tol, name


@pytest.mark.parametrize("precision", PRECISIONS)
@given(case=cases(dtypes=("float64",)))
@settings(max_examples=30)
def test_fused_backward_matches_numpy(precision, case):
    _usable(precision)
    args, rng = case
    _check(args, precision, rng)


@pytest.mark.quick
@pytest.mark.parametrize("precision", PRECISIONS)
def test_batch_0_batch_33_splits_and_strided_arguments(precision, monkeypatch):
    _usable(precision)
    rng = np.random.default_rng(31)
    _check(test_gpu._fixed_case(rng, n=0), precision, rng)
    with cudcn.workspace_bytes(1):  # float16/bfloat16: an accumulator of one image at a time
        _check(test_gpu._fixed_case(rng, n=33), precision, rng)
    monkeypatch.setattr(fused_backward, "PIXELS_PER_SPLIT", 64)
    monkeypatch.setattr(fused_backward, "WORKSPACE_SHARE", 1)
    args = test_gpu._fixed_case(rng, n=6, c=70, o=72, h=12, w=11)
    assert fused_backward.weight_splits(validate(**args)) > 1
    _check(args, precision, rng)
    dtype, tf32, _ = PRECISIONS[precision]
    args = cast(test_gpu._fixed_case(rng), dtype)
    dev = to_device(args)
    grad_output = cupy.asarray(rng.standard_normal(cudcn.deform_conv2d(**args).shape).astype(numpy_dtype(dtype)))
    strided = dict(dev, input=cupy.asarray(np.concatenate([args["input"]] * 2, axis=3))[..., ::2],
                   weight=cupy.asfortranarray(dev["weight"]))
    with cudcn.algorithm("fused"), cudcn.tf32(tf32):
        plain = cudcn.deform_conv2d_backward(grad_output, **dev)
        got = cudcn.deform_conv2d_backward(cupy.asfortranarray(grad_output), **strided)
    for name in ("offset", "weight", "mask"):  # the input gradient adds with atomics
        assert cupy.asnumpy(getattr(got, name)).tobytes() == cupy.asnumpy(getattr(plain, name)).tobytes(), name
    assert relative_error(got.input, cupy.asnumpy(plain.input).astype(np.float64)) <= PRECISIONS[precision][2]


@pytest.mark.quick
@pytest.mark.parametrize("precision", PRECISIONS)
def test_offset_mask_and_weight_gradients_are_bitwise_repeatable(precision, monkeypatch):
    """Three runs, and grids of 8192, 7 and 1 blocks: the same bits (the
    input gradient is only close: atomics)."""
    _usable(precision)
    dtype, tf32, tol = PRECISIONS[precision]
    rng = np.random.default_rng(32)
    args = cast(test_gpu._fixed_case(rng, n=4, c=70, o=40, h=16, w=15), dtype)
    geom = validate(**args)
    grad_output = rng.standard_normal((geom.batch, geom.out_channels, geom.out_h, geom.out_w)).astype(geom.dtype)
    runs = [_fused_backward(args, grad_output, tf32) for _ in range(3)]
    for max_blocks in (7, 1):
        monkeypatch.setattr(cupy_engine(), "max_blocks", max_blocks)
        runs.append(_fused_backward(args, grad_output, tf32))
    for run in runs[1:]:
        for name in ("offset", "weight", "mask"):
            assert cupy.asnumpy(getattr(run, name)).tobytes() == cupy.asnumpy(getattr(runs[0], name)).tobytes(), name
        assert relative_error(run.input, cupy.asnumpy(runs[0].input).astype(np.float64)) <= tol


def test_deterministic_algorithms_take_im2col():
    rng = np.random.default_rng(33)
    args = test_gpu._fixed_case(rng, n=3, dtype="float16")
    geom = validate(**args)
    with cudcn.deterministic_algorithms(), cudcn.algorithm("fused"):
        assert "deterministic algorithms" in fused.applies(cupy_engine(), geom, "backward")
        grad_output = cupy.asarray(rng.standard_normal((3, geom.out_channels, geom.out_h, geom.out_w)).astype("float16"))
        runs = [cudcn.deform_conv2d_backward(grad_output, **to_device(args)) for _ in range(2)]
    for name in NAMES:
        assert cupy.asnumpy(getattr(runs[0], name)).tobytes() == cupy.asnumpy(getattr(runs[1], name)).tobytes()


@pytest.mark.quick
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mask", [True, False])
def test_matches_torchvision(precision, mask):
    """Against torchvision's float64 backward of the same (rounded) values."""
    _usable(precision)
    torch, ops = test_gpu._torchvision()
    dtype, tf32, tol = PRECISIONS[precision]
    rng = np.random.default_rng(34)
    args = cast(test_gpu._fixed_case(rng, n=4, c=24, o=20, h=9, w=10, mask=mask), dtype)
    tensors = {k: torch.tensor(np.asarray(v, np.float64), device="cuda", requires_grad=True)
               for k, v in args.items() if isinstance(v, np.ndarray)}
    out = ops.deform_conv2d(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
                            stride=args["stride"], padding=args["padding"], dilation=args["dilation"],
                            mask=tensors.get("mask"))
    grad_output = rng.standard_normal(tuple(out.shape)).astype(numpy_dtype(dtype))
    out.backward(torch.tensor(np.asarray(grad_output, np.float64), device="cuda"))
    grads = _fused_backward(args, grad_output, tf32)
    for name in NAMES:
        if name in tensors:
            assert relative_error(getattr(grads, name), tensors[name].grad.cpu().numpy()) <= tol, name


def test_auto_times_both_backwards_and_keeps_the_choice(monkeypatch):
    monkeypatch.setattr(algorithms, "_choices", {})
    rng = np.random.default_rng(35)
    args = test_gpu._fixed_case(rng, n=8, c=64, o=64, h=32, w=32, dtype="float16")
    geom = validate(**args)
    dev = to_device(args)
    grad_output = rng.standard_normal((8, 64, geom.out_h, geom.out_w)).astype("float16")
    expected = numpy_backend.backward(geom, grad_output, *(args.get(k) for k in ARRAYS))
    with cudcn.algorithm("auto"):
        for _ in range(2):
            grads = cudcn.deform_conv2d_backward(cupy.asarray(grad_output), **dev)
            (choice,) = [c for c in algorithms.choices() if c.direction == "backward"]
            assert set(choice.seconds) == {"im2col", "fused"} and choice.geometry == geom
            assert choice.chosen == min(choice.seconds, key=choice.seconds.get)
            for name, want in zip(cudcn.Gradients._fields, expected):
                assert relative_error(getattr(grads, name), want) <= 4e-3, name


def test_input_above_2_to_the_31_elements():
    """One float16 image of 2.4e9 input elements (64-bit index kernels),
    offsets one integer shift (rows +1, columns -2), no mask: the input
    gradient is a plain convolution's, checked at pixels near the end, and
    so are a few weight-gradient entries."""
    x, offset, weight = big_shifted_case(36, free_gib=48)
    o, c, h, w = weight.shape[0], *x.shape[1:]
    rng = cupy.random.default_rng(37)
    grad_output = rng.standard_normal((1, o, h, w), dtype=cupy.float32).astype(cupy.float16)
    with cudcn.algorithm("fused"):
        grads = cudcn.deform_conv2d_backward(grad_output, x, offset, weight, padding=1)
    del offset
    # Output pixel (r, s), kernel point (i, j) samples input pixel (r + i, s + j - 3).
    host_w = cupy.asnumpy(weight).astype(np.float64)
    for yy, xx in [(h - 1, w - 1), (h - 2, w - 5), (h - 1, 0), (h // 2, w - 1), (3, 5)]:
        expected = np.zeros(c)
        for i in range(3):
            for j in range(3):
                r, s = yy - i, xx - j + 3
                if 0 <= r < h and 0 <= s < w:
                    expected += host_w[:, :, i, j].T @ cupy.asnumpy(grad_output[0, :, r, s]).astype(np.float64)
        got = cupy.asnumpy(grads.input[0, :, yy, xx]).astype(np.float64)
        np.testing.assert_allclose(got, expected, rtol=4e-3, atol=4e-3 * np.abs(expected).max())
    for oo, cc, i, j in [(0, 0, 0, 0), (o - 1, c - 1, 2, 2), (1, c // 2, 1, 0)]:
        # sum over output pixels (r, s) with s + j - 3 inside: columns s in [3 - j, w + 3 - j)
        r0, r1 = 0, h - i
        s0, s1 = max(0, 3 - j), min(w, w + 3 - j)
        go = grad_output[0, oo, r0:r1, s0:s1].astype(cupy.float32)
        xs = x[0, cc, r0 + i:r1 + i, s0 + j - 3:s1 + j - 3].astype(cupy.float32)
        expected = float(cupy.sum(go * xs, dtype=cupy.float64))
        got = float(grads.weight[oo, cc, i, j])
        # Each entry sums 3.8e7 products, a split's 2.4e6 of them in one chain
        # of tensor-core steps, whose float32 accumulation truncates (measured
        # on V100/A100 by Fasi et al., PeerJ CS 2021): a simulation of that
        # rounding put 1 entry in 8 above 4e-3 of the scale, none above 2e-2.
        scale = max(abs(expected), float(cupy.sqrt(cupy.sum((go * xs) ** 2))))
        assert abs(got - expected) <= 2e-2 * scale, (oo, cc, i, j)
