"""torchvision.ops.deform_conv2d, the anchor of cudcn's semantics: forward and
all five gradients, through the torch adapter, on drawn geometries.

Runs where torchvision's compiled op loads (torchvision's C++ CPU op needs
the CUDA build of torch, which runs without a GPU: CI installs it); skipped
elsewhere, with the reason. Offsets include zero offsets with padding (points
exactly on row and column -1, the start of every Pack layer) and points on
every integer border position.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from strategies import calls, offsets_on_kinks

torch = pytest.importorskip("torch")


def _torchvision_ops():
    try:
        import torchvision.ops

        # PyPI's torchvision beside a CPU build of torch imports but has no op.
        torchvision.ops.deform_conv2d(
            torch.zeros(1, 1, 1, 1), torch.zeros(1, 2, 1, 1), torch.zeros(1, 1, 1, 1)
        )
        return torchvision.ops
    except Exception as error:  # not installed, or its compiled ops do not load
        pytest.skip(f"torchvision's deform_conv2d cannot run here: {type(error).__name__}: {error}",
                    allow_module_level=True)


tv_ops = _torchvision_ops()
import cudcn.torch as ct  # noqa: E402

FIELDS = ("input", "offset", "weight", "bias", "mask")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _run(function, tensors, call):
    leaves = {name: t.clone().requires_grad_(True) for name, t in tensors.items() if t is not None}
    out = function(
        leaves["input"], leaves["offset"], leaves["weight"], leaves.get("bias"),
        stride=call.stride, padding=call.padding, dilation=call.dilation, mask=leaves.get("mask"),
    )
    grad_output = torch.from_numpy(np.random.default_rng(call.seed).standard_normal(tuple(out.shape)))
    out.backward(grad_output.to(out))
    return out.detach(), {name: t.grad for name, t in leaves.items()}


@pytest.mark.parametrize("device", DEVICES)
@given(call=calls(), offsets=st.sampled_from(["drawn", "zero", "border"]))
def test_forward_and_every_gradient_match_torchvision(device, call, offsets):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    rng = np.random.default_rng(call.seed)
    if offsets == "zero":
        call.offset = np.zeros_like(call.offset)
    elif offsets == "border":
        call.offset = offsets_on_kinks(call, rng, fraction=0.7)
    tensors = {
        name: None if getattr(call, name) is None else torch.from_numpy(getattr(call, name)).to(device)
        for name in FIELDS
    }
    out_tv, grads_tv = _run(tv_ops.deform_conv2d, tensors, call)
    out_cu, grads_cu = _run(ct.deform_conv2d, tensors, call)
    torch.testing.assert_close(out_cu, out_tv, rtol=1e-12, atol=1e-12)
    for name in grads_tv:
        torch.testing.assert_close(grads_cu[name], grads_tv[name], rtol=1e-11, atol=1e-11, msg=name)


def test_zero_offsets_with_padding_give_torchvisions_offset_gradient():
    """The example of the report: every padded border samples row or column -1."""
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64)
    w = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    off = torch.zeros(1, 18, 4, 4, dtype=torch.float64, requires_grad=True)
    g_tv = torch.autograd.grad(tv_ops.deform_conv2d(x, off, w, padding=1).sum(), off)[0]
    g_cu = torch.autograd.grad(ct.deform_conv2d(x, off, w, padding=1).sum(), off)[0]
    assert (g_tv != 0).sum() > 0
    torch.testing.assert_close(g_cu, g_tv, rtol=1e-14, atol=1e-14)
