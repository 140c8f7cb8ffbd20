"""cudcn.torch.dcnv3 and cudcn.torch.dcnv4 on CPU tensors: the custom ops,
autograd, compile, export.

The NumPy backend is the reference: on CPU tensors the adapter gives the
core's results exactly, and its gradients pass torch's gradcheck and opcheck.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given

torch = pytest.importorskip("torch")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from dcnv3_reference import SCALARS, DCNv3Call, calls, pack  # noqa: E402
from test_torch_adapter import GraphRecorder, _targets  # noqa: E402

pytestmark = pytest.mark.torch

FIELDS = ("input", "offset", "mask")


def make_call(batch=2, dtype=np.float64, remove_center=False, seed=0) -> DCNv3Call:
    """3x2 kernel (or 3x3 with remove_center), stride (1, 2), pads (1, 0),
    dilation (2, 1), G=2, D=3, 6x7 input, offset_scale 0.7."""
    rng = np.random.default_rng(seed)
    kh, kw = (3, 3) if remove_center else (3, 2)
    P = kh * kw - int(remove_center)
    out_h, out_w = 6 + 2 - 2 * (kh - 1), (7 - (kw - 1) - 1) // 2 + 1
    return DCNv3Call(
        input=rng.standard_normal((batch, 6, 7, 6)).astype(dtype),
        offset=rng.uniform(-2.5, 2.5, (batch, out_h, out_w, 2 * P * 2)).astype(dtype),
        mask=rng.random((batch, out_h, out_w, 2 * P)).astype(dtype),
        kernel_h=kh, kernel_w=kw, stride_h=1, stride_w=2, pad_h=1, pad_w=0, dilation_h=2, dilation_w=1,
        group=2, group_channels=3, offset_scale=0.7, remove_center=remove_center, seed=seed)


def tensors(call: DCNv3Call, requires_grad=True, packed=False):
    """(input, offset, mask) or (input, offset_mask) as leaf tensors."""
    arrays = [call.input, pack(call.offset, call.mask, call.group)] if packed else [getattr(call, f) for f in FIELDS]
    return [torch.tensor(a, requires_grad=requires_grad) for a in arrays]


def run(call: DCNv3Call, leaves, packed=False):
    function = ct.dcnv4 if packed else ct.dcnv3
    return function(*leaves, *call.scalars)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@given(call=calls(min_batch=1, max_kernel=4))
def test_drawn_calls_equal_core_forward_and_backward(packed, call):
    leaves = tensors(call, packed=packed)
    out = run(call, leaves, packed)
    grad_output = np.random.default_rng(call.seed).standard_normal(out.shape)
    out.backward(torch.tensor(grad_output))
    np.testing.assert_array_equal(out.detach().numpy(), cudcn.dcnv3(*call.args))
    if packed:
        expected = cudcn.dcnv4_backward(grad_output, leaves[0].detach().numpy(), leaves[1].detach().numpy(),
                                        *call.scalars)
    else:
        expected = cudcn.dcnv3_backward(grad_output, *call.args)
    for leaf, e in zip(leaves, expected):
        np.testing.assert_array_equal(leaf.grad.numpy(), e)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("remove_center", [False, True])
def test_gradcheck_every_input(packed, remove_center):
    call = make_call(batch=1, remove_center=remove_center)
    leaves = tensors(call, packed=packed)
    assert torch.autograd.gradcheck(lambda *t: run(call, t, packed), leaves)


DOUBLE_BACKWARD = "double backward of cudcn's DCNv[34] .* is not supported"


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_double_backward_says_it_is_not_supported(packed):
    call = make_call()
    leaves = tensors(call, packed=packed)
    plain = torch.autograd.grad(run(call, leaves, packed).sum(), leaves)
    grads = torch.autograd.grad(run(call, leaves, packed).sum(), leaves, create_graph=True)
    for g, expected in zip(grads, plain):
        assert g.requires_grad
        torch.testing.assert_close(g, expected, rtol=0, atol=0)
    with pytest.raises(cudcn.UnsupportedError, match=DOUBLE_BACKWARD):
        (grads[1] ** 2).sum().backward()


def test_opcheck_every_op():
    call = make_call()
    scalars = list(call.scalars)
    three, two = tensors(call), tensors(call, packed=True)
    torch.library.opcheck(torch.ops.cudcn.dcnv3.default, (*three, *scalars))
    torch.library.opcheck(torch.ops.cudcn.dcnv4.default, (*two, *scalars))
    grad_output = torch.randn(call.out_shape, dtype=torch.float64)
    three, two = tensors(call, requires_grad=False), tensors(call, requires_grad=False, packed=True)
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.cudcn.dcnv3_backward.default, (grad_output, *three, *scalars, deterministic))
        torch.library.opcheck(torch.ops.cudcn.dcnv4_backward.default, (grad_output, *two, *scalars, deterministic))


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_fullgraph_captures_forward_and_backward(packed, dynamic):
    torch._dynamo.reset()
    call = make_call()
    leaves = tensors(call, packed=packed)
    function, scalars = (ct.dcnv4 if packed else ct.dcnv3), call.scalars

    def f(*t):
        return function(*t, *scalars).relu()

    recorder = GraphRecorder()
    out = torch.compile(f, fullgraph=True, backend=recorder, dynamic=dynamic)(*leaves)
    out.sum().backward()
    grads = [t.grad.clone() for t in leaves]
    name = "dcnv4" if packed else "dcnv3"
    # fullgraph: one graph, no break. (With dynamic=True dynamo first traces
    # offset_scale as a symbolic float, then restarts with it specialised: the
    # first attempt reaches the backend as an empty graph.)
    assert len([gm for gm in recorder.dynamo_graphs if len(gm.graph.nodes)]) == 1
    assert f"cudcn.{name}.default" in _targets(recorder.forward_graphs)
    assert f"cudcn.{name}_backward.default" in _targets(recorder.backward_graphs)
    for t in leaves:
        t.grad = None
    expected = f(*leaves)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    for g, t in zip(grads, leaves):
        torch.testing.assert_close(g, t.grad)


def test_compile_with_inductor_runs():
    torch._dynamo.reset()
    call = make_call(dtype=np.float32)
    leaves = tensors(call, requires_grad=False)
    scalars = call.scalars
    compiled = torch.compile(lambda *t: ct.dcnv3(*t, *scalars) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(*leaves), 2 * run(call, leaves))


def test_wrong_arguments_under_compile_get_the_core_message():
    torch._dynamo.reset()
    call = make_call()
    x, offset, mask = tensors(call, requires_grad=False)
    scalars = call.scalars
    compiled = torch.compile(lambda *t: ct.dcnv3(*t, *scalars), fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"mask.shape must be \(N, Ho, Wo, group\*P\) = \(2, 4, 3, 12\)"):
        compiled(x, offset, mask[..., :-1])


class _DCNv3(torch.nn.Module):
    def __init__(self, call: DCNv3Call):
        super().__init__()
        self.scalars = call.scalars

    def forward(self, input, offset, mask):
        return ct.dcnv3(input, offset, mask, *self.scalars)


class _DCNv4(_DCNv3):
    def forward(self, input, offset_mask):
        return ct.dcnv4(input, offset_mask, *self.scalars)


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_torch_export_with_a_dynamic_batch(packed):
    call = make_call()
    leaves = tensors(call, requires_grad=False, packed=packed)
    batch = torch.export.Dim("batch")
    program = torch.export.export((_DCNv4 if packed else _DCNv3)(call), tuple(leaves),
                                  dynamic_shapes=tuple({0: batch} for _ in leaves))
    other = tensors(make_call(batch=3, seed=1), requires_grad=False, packed=packed)
    torch.testing.assert_close(program.module()(*other), run(call, other, packed), rtol=0, atol=0)


def test_torch_export_keeps_the_checks_for_static_shapes():
    call = make_call()
    x, offset, mask = tensors(call, requires_grad=False)
    with pytest.raises(Exception, match=r"offset.shape must be \(N, Ho, Wo, group\*P\*2\)"):
        torch.export.export(_DCNv3(call), (x, offset[..., :-2], mask))


def test_empty_batch():
    call = make_call(batch=0)
    for packed in (False, True):
        leaves = tensors(call, packed=packed)
        out = run(call, leaves, packed)
        assert out.shape == (0, 4, 3, 6)
        out.sum().backward()
        assert [t.grad.shape for t in leaves] == [t.shape for t in leaves]


def test_non_contiguous_inputs_and_inputs_untouched():
    call = make_call()
    x, offset, mask = (t.detach() for t in tensors(call))
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (x, offset, mask)]
    assert not strided[0].is_contiguous()
    before = [t.detach().clone() for t in strided]
    out = run(call, strided)
    out.sum().backward()
    torch.testing.assert_close(out, run(call, [x, offset, mask]), rtol=0, atol=0)
    for t, b in zip(strided, before):
        assert torch.equal(t.detach(), b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    """float16 and bfloat16, forward and backward (DCNv4's own op has no bf16
    backward): the float32 computation, rounded once."""
    call = make_call(dtype=np.float32)
    for packed in (False, True):
        leaves = [t.detach().to(dtype).requires_grad_() for t in tensors(call, packed=packed)]
        out = run(call, leaves, packed)
        assert out.dtype == dtype
        out.float().sum().backward()
        single = [t.detach().float().requires_grad_() for t in leaves]
        expected = run(call, single, packed)
        expected.sum().backward()
        torch.testing.assert_close(out, expected.to(dtype), rtol=0, atol=0)
        for t, s in zip(leaves, single):
            assert t.grad.dtype == dtype
            torch.testing.assert_close(t.grad, s.grad.to(dtype), rtol=0, atol=0)


def test_autocast_casts_to_the_autocast_dtype():
    call = make_call(dtype=np.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(call, tensors(call, requires_grad=False))
    assert out.dtype == torch.bfloat16


@pytest.fixture
def settings_seen_by_backend(monkeypatch):
    """Per core backward call: (deterministic, workspace bytes) in force."""
    seen = []
    for name in ("dcnv3_backward", "dcnv4_backward"):
        backward = getattr(cudcn, name)

        def spy(*args, backward=backward, **kwargs):
            seen.append((cudcn.are_deterministic_algorithms_enabled(), cudcn.get_workspace_bytes()))
            return backward(*args, **kwargs)

        monkeypatch.setattr(cudcn, name, spy)
    return seen


def test_settings_at_the_forward_reach_a_backward_in_another_thread(settings_seen_by_backend):
    """autograd runs a CUDA backward in its own thread: cudcn's deterministic
    setting and workspace budget at the forward travel with the graph, and
    torch.use_deterministic_algorithms(True) reaches the backward too
    (simulated with backward() in a fresh thread)."""
    call = make_call()
    for packed in (False, True):
        with cudcn.deterministic_algorithms(True), cudcn.workspace_bytes(4096):
            loss = run(call, tensors(call, packed=packed), packed).sum()
        thread = threading.Thread(target=loss.backward)
        thread.start()
        thread.join()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run(call, tensors(call)).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    default = cudcn.get_workspace_bytes()
    assert settings_seen_by_backend == [(True, 4096), (True, 4096), (True, default)]


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(offset=lambda a: a[..., :-1]), ValueError,
         r"offset.shape must be \(N, Ho, Wo, group\*P\*2\) = \(2, 4, 3, 24\) \(P = kh\*kw - remove_center = 6\)"),
        (dict(input=lambda a: a[..., :-1]), ValueError, r"input.shape\[3\] \(C\) must be group\*group_channels"),
        (dict(mask=lambda a: a.float()), TypeError, r"mask.dtype must equal input.dtype = float64, got float32"),
        (dict(mask=lambda a: a.bfloat16()), TypeError, r"mask.dtype must equal input.dtype = float64, got bfloat16"),
        (dict(offset=lambda a: a.numpy()), TypeError, r"offset must be a torch.Tensor, got ndarray"),
        (dict(mask=lambda a: a.to("meta")), ValueError, r"mask is on meta but input is on cpu"),
        (dict(group=lambda v: 3), ValueError, r"group\*group_channels = 3\*3 = 9, got 6"),
        (dict(remove_center=lambda v: True), ValueError, r"remove_center needs a square kernel of odd size"),
        (dict(offset_scale=lambda v: "1"), ValueError, r"offset_scale must be a real number, got '1'"),
    ],
)
def test_wrong_arguments_get_the_core_message(change, error, match):
    call = make_call()
    x, offset, mask = tensors(call, requires_grad=False)
    args = dict(input=x, offset=offset, mask=mask, **dict(zip(SCALARS, call.scalars)))
    (name, edit), = change.items()
    args[name] = edit(args[name])
    with pytest.raises(error, match=match):
        ct.dcnv3(**args)


def test_dcnv4_wrong_packing_gets_the_core_message():
    call = make_call()
    x, offset_mask = tensors(call, requires_grad=False, packed=True)
    with pytest.raises(ValueError, match=r"offset_mask.shape\[3\] \(K8\) must be a multiple of 8 and at least"):
        ct.dcnv4(x, offset_mask[..., :-3], *call.scalars)


def test_meta_tensors_give_the_output_shape():
    call = make_call()
    for packed in (False, True):
        meta = [t.detach().to("meta") for t in tensors(call, packed=packed)]
        out = run(call, meta, packed)
        assert out.device.type == "meta" and tuple(out.shape) == call.out_shape
