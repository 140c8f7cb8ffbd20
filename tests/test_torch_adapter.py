"""cudcn.torch.deform_conv2d on CPU tensors: the custom op, autograd, compile.

The NumPy backend is the reference: on CPU tensors the adapter must give the
core's results exactly, and its gradients must pass torch's gradcheck and
opcheck on every input.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

import pytest
from hypothesis import given

torch = pytest.importorskip("torch")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from strategies import calls  # noqa: E402

pytestmark = pytest.mark.torch

# (N, C_in, H, W, C_out, groups, offset_groups, (kh, kw), stride, padding, dilation)
GEOMETRIES = [
    (2, 4, 7, 6, 6, 2, 2, (3, 3), 1, 0, 1),
    (1, 3, 6, 8, 2, 1, 3, (2, 3), (2, 1), (1, 2), (1, 2)),
    (3, 2, 5, 5, 4, 2, 1, (1, 1), 1, 0, 1),
    (2, 6, 9, 7, 3, 3, 2, (3, 2), 2, 1, (2, 1)),
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


def make_args(geometry, dtype=torch.float64, with_mask=True, with_bias=True, seed=0):
    """Random tensors for one geometry: input, offset, weight, bias, mask, conv kwargs."""
    n, c, h, w, o, groups, offset_groups, (kh, kw), stride, padding, dilation = geometry
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)

    k = kh * kw
    input = rand(n, c, h, w)
    # Offsets up to +-2.5 pixels reach past the border; non-integer almost surely.
    offset = rand(n, 2 * offset_groups * k, out_h, out_w, scale=2.5)
    weight = rand(o, c // groups, kh, kw)
    bias = rand(o) if with_bias else None
    mask = rand(n, offset_groups * k, out_h, out_w).abs() if with_mask else None
    conv = dict(stride=stride, padding=padding, dilation=dilation)
    return input, offset, weight, bias, mask, conv


def core_forward(input, offset, weight, bias, mask, conv):
    arrays = [None if t is None else t.detach().numpy() for t in (input, offset, weight, bias, mask)]
    return torch.from_numpy(cudcn.deform_conv2d(*arrays[:4], mask=arrays[4], **conv))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_equals_core(geometry, with_mask, dtype):
    input, offset, weight, bias, mask, conv = make_args(geometry, dtype, with_mask)
    out = ct.deform_conv2d(input, offset, weight, bias, mask=mask, **conv)
    assert out.dtype == dtype
    torch.testing.assert_close(out, core_forward(input, offset, weight, bias, mask, conv), rtol=0, atol=0)


def test_backward_equals_core():
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    leaves = [t.requires_grad_() for t in (input, offset, weight, bias, mask)]
    out = ct.deform_conv2d(input, offset, weight, bias, mask=mask, **conv)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    expected = cudcn.deform_conv2d_backward(
        grad_output.numpy(), *(t.detach().numpy() for t in leaves[:4]),
        mask=leaves[4].detach().numpy(), **conv,
    )
    for leaf, name in zip(leaves, ("input", "offset", "weight", "bias", "mask")):
        torch.testing.assert_close(leaf.grad, torch.from_numpy(getattr(expected, name)), rtol=0, atol=0)


@given(calls(wild_offsets=True))
def test_drawn_calls_equal_core_forward_and_backward(call):
    """Any geometry, empty batches and far or non-finite offsets included."""
    conv = dict(stride=call.stride, padding=call.padding, dilation=call.dilation)
    arrays = [call.input, call.offset, call.weight, call.bias, call.mask]
    leaves = [None if a is None else torch.from_numpy(a.copy()).requires_grad_() for a in arrays]
    out = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    np.testing.assert_array_equal(out.detach().numpy(), cudcn.deform_conv2d(*arrays[:4], mask=arrays[4], **conv))
    grad_output = np.random.default_rng(call.seed).standard_normal(out.shape)
    out.backward(torch.from_numpy(grad_output))
    expected = cudcn.deform_conv2d_backward(grad_output, *arrays[:4], mask=arrays[4], **conv)
    for leaf, name in zip(leaves, ("input", "offset", "weight", "bias", "mask")):
        if leaf is not None:
            np.testing.assert_array_equal(leaf.grad.numpy(), getattr(expected, name), err_msg=name)


@pytest.mark.parametrize("geometry", GEOMETRIES[:2])
@pytest.mark.parametrize("with_mask,with_bias", [(True, True), (False, False)])
def test_gradcheck_every_input(geometry, with_mask, with_bias):
    n, c, h, w, *rest = geometry
    small = (min(n, 2), c, min(h, 6), min(w, 6), *rest)
    input, offset, weight, bias, mask, conv = make_args(small, with_mask=with_mask, with_bias=with_bias)
    leaves = [t.requires_grad_() for t in (input, offset, weight, bias, mask) if t is not None]

    def f(*args):
        it = iter(args)
        x, off, wt = next(it), next(it), next(it)
        b = next(it) if with_bias else None
        m = next(it) if with_mask else None
        return ct.deform_conv2d(x, off, wt, b, mask=m, **conv)

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6)


DOUBLE_BACKWARD = "double backward of cudcn's deformable convolution .* is not supported"


@pytest.mark.parametrize("with_mask", [True, False])
def test_double_backward_says_it_is_not_supported(with_mask):
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0], with_mask=with_mask)
    leaves = [t.requires_grad_() for t in (input, offset, weight, bias, mask) if t is not None]
    plain = torch.autograd.grad(ct.deform_conv2d(input, offset, weight, bias, mask=mask, **conv).sum(), leaves)
    # Gradients taken with create_graph=True are the plain ones...
    grads = torch.autograd.grad(
        ct.deform_conv2d(input, offset, weight, bias, mask=mask, **conv).sum(), leaves, create_graph=True
    )
    for g, expected in zip(grads, plain):
        assert g.requires_grad
        torch.testing.assert_close(g, expected, rtol=0, atol=0)
    # ...and differentiating them again is refused with cudcn's error.
    with pytest.raises(cudcn.UnsupportedError, match=DOUBLE_BACKWARD) as raised:
        (grads[1] ** 2).sum().backward()
    assert isinstance(raised.value, NotImplementedError) and isinstance(raised.value, RuntimeError)
    assert all(leaf.grad is None for leaf in leaves)


def test_gradgradcheck_says_double_backward_is_not_supported():
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[2])
    leaves = [t.requires_grad_() for t in (input, offset, weight)]
    with pytest.raises(cudcn.UnsupportedError, match=DOUBLE_BACKWARD):
        torch.autograd.gradgradcheck(lambda x, off, w: ct.deform_conv2d(x, off, w, **conv), leaves)


@pytest.mark.parametrize("with_mask,with_bias", [(True, True), (False, False), (True, False)])
def test_opcheck(with_mask, with_bias):
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[1], with_mask=with_mask, with_bias=with_bias)
    for t in (input, offset, weight, bias, mask):
        if t is not None:
            t.requires_grad_()
    args = (input, offset, weight, bias, mask, *(list(_pair(conv[k])) for k in ("stride", "padding", "dilation")))
    torch.library.opcheck(torch.ops.cudcn.deform_conv2d.default, args)


def test_opcheck_backward_op():
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    out = ct.deform_conv2d(input, offset, weight, bias, mask=mask, **conv)
    for deterministic in (False, True):
        args = (torch.randn_like(out), input, offset, weight, bias, mask, [1, 1], [0, 0], [1, 1], deterministic)
        torch.library.opcheck(torch.ops.cudcn.deform_conv2d_backward.default, args)


class GraphRecorder:
    """A torch.compile backend that records the forward and backward graphs it sees."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.dynamo_graphs, self.forward_graphs, self.backward_graphs = [], [], []

        def keep(graphs):
            def compiler(gm, example_inputs):
                graphs.append(gm)
                return make_boxed_func(gm.forward)

            return compiler

        self._aot = aot_autograd(fw_compiler=keep(self.forward_graphs), bw_compiler=keep(self.backward_graphs))

    def __call__(self, gm, example_inputs):
        self.dynamo_graphs.append(gm)
        return self._aot(gm, example_inputs)


def _targets(graphs):
    return {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_captures_forward_and_backward(dynamic):
    torch._dynamo.reset()
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    leaves = [t.requires_grad_() for t in (input, offset, weight, bias, mask)]

    def f(x, off, w, b, m):
        return ct.deform_conv2d(x, off, w, b, mask=m, **conv).relu()

    recorder = GraphRecorder()
    compiled = torch.compile(f, fullgraph=True, backend=recorder, dynamic=dynamic)
    out = compiled(*leaves)
    out.sum().backward()
    grads = [t.grad.clone() for t in leaves]

    assert len(recorder.dynamo_graphs) == 1  # fullgraph: one graph, no break
    assert "cudcn.deform_conv2d.default" in _targets(recorder.forward_graphs)
    assert "cudcn.deform_conv2d_backward.default" in _targets(recorder.backward_graphs)

    for t in leaves:
        t.grad = None
    expected = f(*leaves)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for g, t in zip(grads, leaves):
        torch.testing.assert_close(g, t.grad)


def test_compile_with_inductor_runs():
    torch._dynamo.reset()
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[2], torch.float32)
    compiled = torch.compile(
        lambda x, off, w, b, m: ct.deform_conv2d(x, off, w, b, mask=m, **conv) * 2, fullgraph=True
    )
    out = compiled(input, offset, weight, bias, mask)
    torch.testing.assert_close(out, 2 * ct.deform_conv2d(input, offset, weight, bias, mask=mask, **conv))


def test_empty_batch():
    geometry = (0, *GEOMETRIES[0][1:])
    input, offset, weight, bias, mask, conv = make_args(geometry)
    leaves = [t.requires_grad_() for t in (input, offset, weight, bias, mask)]
    out = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    assert out.shape == (0, 6, 5, 4)
    out.sum().backward()
    for t in leaves:
        assert t.grad.shape == t.shape
    assert torch.count_nonzero(leaves[2].grad) == 0  # no images, no weight gradient


def test_non_contiguous_inputs_and_inputs_untouched():
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    expected = ct.deform_conv2d(input, offset, weight, bias, mask=mask, **conv)

    wide_offset = torch.cat((offset, torch.randn_like(offset)), dim=1)
    sliced_offset = wide_offset[:, : offset.shape[1]]  # a slice: not contiguous
    channels_last = input.to(memory_format=torch.channels_last)
    transposed_weight = weight.transpose(2, 3).contiguous().transpose(2, 3)
    assert not (sliced_offset.is_contiguous() or channels_last.is_contiguous() or transposed_weight.is_contiguous())

    leaves = [t.detach().requires_grad_() for t in (channels_last, sliced_offset, transposed_weight, bias, mask)]
    before = [t.detach().clone() for t in leaves]
    strides = [t.stride() for t in leaves]
    out = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    for t, b, s in zip(leaves, before, strides):
        assert torch.equal(t.detach(), b) and t.stride() == s  # never modified
        assert t.grad.shape == t.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    """float16 runs through NumPy's float16; bfloat16 through float32 copies.

    Either way the NumPy backend computes in float32 and rounds once at the
    end, so the result is the float32 result rounded to the dtype.
    """
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0], dtype)
    leaves = [t.requires_grad_() for t in (input, offset, weight, bias, mask)]
    out = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    assert out.dtype == dtype
    reference = ct.deform_conv2d(*(t.detach().float() for t in leaves[:4]), mask=leaves[4].detach().float(), **conv)
    torch.testing.assert_close(out, reference.to(dtype), rtol=0, atol=0)
    out.float().square().sum().backward()
    for t in leaves:
        assert t.grad.dtype == dtype and torch.isfinite(t.grad).all()


def test_autocast_casts_to_the_autocast_dtype():
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ct.deform_conv2d(input.bfloat16(), offset, weight, bias, mask=mask, **conv)
    assert out.dtype == torch.bfloat16
    expected = ct.deform_conv2d(*(t.bfloat16() for t in (input, offset, weight, bias)), mask=mask.bfloat16(), **conv)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_autocast_leaves_float64_alone():
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0], torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ct.deform_conv2d(input, offset, weight, bias, mask=mask, **conv)
    assert out.dtype == torch.float64


def test_deterministic_algorithms_cpu_runs_and_repeats():
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        grads = []
        for _ in range(2):
            leaves = [t.detach().requires_grad_() for t in (input, offset, weight, bias, mask)]
            ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv).sum().backward()
            grads.append([t.grad for t in leaves])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.fixture
def determinism_seen_by_backend(monkeypatch):
    """A list that records, per backend backward call, whether cudcn's
    deterministic setting was on (a spy, so it runs on the CPU)."""
    seen = []
    backend = cudcn.backends.load("numpy")
    backward = backend.backward

    def spy(*args, **kwargs):
        seen.append(cudcn.are_deterministic_algorithms_enabled())
        return backward(*args, **kwargs)

    monkeypatch.setattr(backend, "backward", spy)
    return seen


def test_deterministic_algorithms_reach_the_backend(determinism_seen_by_backend):
    """torch.use_deterministic_algorithms(True) runs the backward under
    cudcn.deterministic_algorithms(True) (the CUDA backend's sorted input
    gradient); otherwise cudcn's own setting stands. Checked by a spy on the
    backend call, so it runs on the CPU."""
    seen = determinism_seen_by_backend
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for mode, warn_only in ((False, False), (True, False), (True, True)):
            torch.use_deterministic_algorithms(mode, warn_only=warn_only)
            leaves = [t.detach().requires_grad_() for t in (input, offset, weight, bias, mask)]
            ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    assert seen == [False, True, True]
    assert not cudcn.are_deterministic_algorithms_enabled()  # scoped to the call


def test_cudcn_deterministic_setting_reaches_a_backward_in_another_thread(determinism_seen_by_backend):
    """cudcn's own setting is per thread, and autograd runs a CUDA backward in
    its own device thread: the setting in force at the forward call must
    still reach the backend. Simulated on the CPU by running backward() in a
    fresh thread."""
    seen = determinism_seen_by_backend
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    for setting in (False, True):
        leaves = [t.detach().requires_grad_() for t in (input, offset, weight, bias, mask)]
        with cudcn.deterministic_algorithms(setting):
            loss = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv).sum()
        thread = threading.Thread(target=loss.backward)
        thread.start()
        thread.join()
    assert seen == [False, True]


def test_algorithm_and_workspace_at_the_forward_reach_a_backward_in_another_thread(monkeypatch):
    """Like the deterministic setting: a CUDA backward runs in autograd's own
    thread, so the algorithm and workspace budget in force at the forward
    travel with the graph (simulated with backward() in a fresh thread)."""
    seen = []
    backend = cudcn.backends.load("numpy")
    backward = backend.backward

    def spy(*args, **kwargs):
        seen.append((cudcn.get_algorithm(), cudcn.get_workspace_bytes()))
        return backward(*args, **kwargs)

    monkeypatch.setattr(backend, "backward", spy)
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    leaves = [t.detach().requires_grad_() for t in (input, offset, weight, bias, mask)]
    with cudcn.algorithm("im2col"), cudcn.workspace_bytes(4096):
        loss = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv).sum()
    thread = threading.Thread(target=loss.backward)
    thread.start()
    thread.join()
    assert seen == [("im2col", 4096)]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(offset=lambda a: a[:, :-1]), ValueError, r"offset.shape\[1\] must be a positive multiple of 2\*kh\*kw = 18, got 35"),
        (dict(mask=lambda a: a[:, :-1]), ValueError, r"mask.shape\[1\] must be offset_groups\*kh\*kw = 18, got 17"),
        (dict(bias=lambda a: a[:-1]), ValueError, r"bias.shape must be \(C_out,\) = \(6,\), got \(5,\)"),
        (dict(weight=lambda a: a[:, :, :2, :2]), ValueError, r"offset.shape\[1\] must be a positive multiple of 2\*kh\*kw = 8, got 36"),
        (dict(input=lambda a: a[0]), ValueError, r"input must be a 4-D array"),
        (dict(offset=lambda a: a[:1]), ValueError, r"offset.shape\[0\] must be input.shape\[0\] \(N\) = 2, got 1"),
        (dict(weight=lambda a: a.float()), TypeError, r"weight.dtype must equal input.dtype = float64, got float32"),
        (dict(weight=lambda a: a.bfloat16()), TypeError, r"weight.dtype must equal input.dtype = float64, got bfloat16"),
        (dict(input=lambda a: a.long()), TypeError, r"input.dtype must be one of float16, bfloat16, float32, float64, got int64"),
        (dict(bias=lambda a: a.numpy()), TypeError, r"bias must be a torch.Tensor, got ndarray"),
        (dict(weight=lambda a: a.to("meta")), ValueError, r"weight is on meta but input is on cpu; pass tensors on one device"),
        (dict(stride=lambda a: 1.5), ValueError, r"stride must be an int or a pair of ints, got 1.5"),
        (dict(padding=lambda a: -1), ValueError, r"padding must be >= 0, got -1"),
        (dict(dilation=lambda a: (1, 2, 3)), ValueError, r"dilation must be an int or a pair of ints, got \(1, 2, 3\)"),
    ],
)
def test_wrong_arguments_get_the_core_message(change, error, match):
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    args = dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask, **conv)
    (name, edit), = change.items()
    args[name] = edit(args[name])
    with pytest.raises(error, match=match):
        ct.deform_conv2d(**args)


def test_meta_tensors_give_the_output_shape():
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[3])
    meta = [t.to("meta") for t in (input, offset, weight, bias, mask)]
    out = ct.deform_conv2d(*meta[:4], mask=meta[4], **conv)
    assert out.device.type == "meta" and out.shape == core_forward(input, offset, weight, bias, mask, conv).shape


def test_wrong_arguments_under_compile_get_the_core_message():
    torch._dynamo.reset()
    input, offset, weight, bias, mask, conv = make_args(GEOMETRIES[0])
    compiled = torch.compile(lambda x, off, w: ct.deform_conv2d(x, off, w, **conv), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"offset.shape\[1\] must be a positive multiple of 2\*kh\*kw = 18, got 35"):
        compiled(input, offset[:, :-1], weight)


def test_import_cudcn_torch_imports_no_other_framework():
    code = (
        "import sys, cudcn.torch; "
        "loaded = [m for m in ('paddle', 'cupy') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
