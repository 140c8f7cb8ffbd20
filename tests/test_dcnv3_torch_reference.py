"""DCNv3 and DCNv4 against a pure-torch implementation in the manner of
InternImage's ``dcnv3_core_pytorch`` (tests/dcnv3_reference.py; skipped
without torch):

- float64: forward and every gradient (autograd through grid_sample's CPU
  backward) equal to rounding, away from kinks, with equal pads; with
  unequal pads the pure-torch padding (W by pad_h, H by pad_w, as the
  original's F.pad) gives cudcn's result for the pads swapped;
- float16 / bfloat16: cudcn's error at most twice that of the same
  pure-torch computation done in that dtype (plus one unit in the last
  place), both against float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import cudcn
from dcnv3_reference import DCNv3Call, calls, pack, torch_dcnv3_core

torch = pytest.importorskip("torch")

FIELDS = ("input", "offset", "mask")


def _torch_result(call: DCNv3Call, grad_output, dtype=torch.float64, pads=None):
    """Output and gradients (input, offset, mask) of the pure-torch path by autograd."""
    leaves = [torch.tensor(getattr(call, f), dtype=dtype, requires_grad=True) for f in FIELDS]
    pad_h, pad_w = pads or (call.pad_h, call.pad_w)
    out = torch_dcnv3_core(*leaves, call.kernel_h, call.kernel_w, call.stride_h, call.stride_w, pad_h, pad_w,
                           call.dilation_h, call.dilation_w, call.group, call.group_channels, call.offset_scale,
                           call.remove_center)
    out.backward(torch.tensor(grad_output, dtype=dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


def _check_against_torch(call: DCNv3Call, pads=None):
    out = cudcn.dcnv3(*call.args)
    grad_output = np.random.default_rng(call.seed).standard_normal(out.shape)
    expected, expected_grads = _torch_result(call, grad_output, pads=pads)
    assert tuple(expected.shape) == out.shape
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12, atol=1e-12)
    grads = cudcn.dcnv3_backward(grad_output, *call.args)
    for name, e in zip(FIELDS, expected_grads):
        np.testing.assert_allclose(getattr(grads, name), e.numpy(), rtol=1e-11, atol=1e-11, err_msg=name)
    # DCNv4 on the packed arguments, the same.
    offset_mask = pack(call.offset, call.mask, call.group)
    np.testing.assert_allclose(cudcn.dcnv4(call.input, offset_mask, *call.scalars), expected.numpy(),
                               rtol=1e-12, atol=1e-12)


@given(calls(min_batch=1, equal_pads=True))
def test_matches_pure_torch_with_equal_pads(call):
    """Every drawn geometry with pad_h = pad_w (the modules' only use)."""
    _check_against_torch(call)


@given(calls(min_batch=1))
def test_pure_torch_padding_equals_cudcn_with_the_pads_swapped(call):
    """dcnv3_core_pytorch's F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    pads W by pad_h and H by pad_w: the pure-torch call with pads (a, b)
    is cudcn's call with pads (b, a). cudcn pads as InternImage's CUDA op."""
    _check_against_torch(call, pads=(call.pad_w, call.pad_h))


def relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(got - expected).max(initial=0.0)) / scale


HALF = [("float16", torch.float16)]
try:
    import ml_dtypes

    HALF.append((ml_dtypes.bfloat16, torch.bfloat16))
except ImportError:
    pass


@pytest.mark.parametrize(("dtype", "torch_dtype"), HALF, ids=[str(t) for _, t in HALF])
@pytest.mark.parametrize("seed", range(4))
def test_half_precision_error_at_most_twice_plain(dtype, torch_dtype, seed):
    """Forward and gradients in float16/bfloat16 against float64 on the same
    (rounded) inputs: cudcn's error is at most twice that of the plain
    pure-torch computation in that dtype, plus one unit in the last place."""
    rng = np.random.default_rng(seed)
    n, height, width, G, D = 2, 12, 11, 4, 6
    call = DCNv3Call(
        input=rng.standard_normal((n, height, width, G * D)).astype(dtype),
        offset=rng.uniform(-2, 2, (n, height, width, G * 9 * 2)).astype(dtype),
        mask=rng.dirichlet(np.ones(9), (n, height, width, G)).reshape(n, height, width, G * 9).astype(dtype),
        kernel_h=3, kernel_w=3, pad_h=1, pad_w=1, group=G, group_channels=D, offset_scale=1.0, seed=seed)
    grad_output = rng.standard_normal((n, height, width, G * D)).astype(dtype)
    exact = call.with_arrays(**{f: getattr(call, f).astype(np.float64) for f in FIELDS})

    out = cudcn.dcnv3(*call.args)
    grads = cudcn.dcnv3_backward(grad_output, *call.args)
    reference = cudcn.dcnv3(*exact.args)
    reference_grads = cudcn.dcnv3_backward(grad_output.astype(np.float64), *exact.args)

    # The plain computation: the same pure-torch code on the same values, in the dtype.
    single = call.with_arrays(**{f: getattr(call, f).astype(np.float32) for f in FIELDS})
    plain, plain_grads = _torch_result(single, grad_output.astype(np.float32), dtype=torch_dtype)
    ulp = float(np.finfo(np.float16).eps) if torch_dtype == torch.float16 else 2.0**-7
    checks = [("out", out, plain, reference)] + [
        (f, getattr(grads, f), p, getattr(reference_grads, f)) for f, p in zip(FIELDS, plain_grads)]
    for name, ours, theirs, expected in checks:
        assert np.asarray(ours).dtype == np.dtype(dtype)
        ours_error = relative_error(np.asarray(ours, np.float64), expected)
        plain_error = relative_error(theirs.to(torch.float64).numpy(), expected)
        assert ours_error <= 2 * plain_error + ulp, f"{name}: {ours_error:.2e} vs plain {plain_error:.2e}"
