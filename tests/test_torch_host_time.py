"""The torch door's host time, checked without timing: routes, one validation, no stale geometry.

- Plain eager calls run an ``autograd.Function`` (no ``torch.library``
  dispatch); calls under a dispatch or torch function mode, on meta tensors,
  under the profiler or inside vmap go through the custom op; both give the
  same results and gradients.
- One validation per call through the door: the checks run once for a new
  signature (forward and backward together: the backward takes the
  forward's geometry), never for a known one, whichever route.
- A kept geometry is never another call's: another shape, dtype, stride,
  mask presence, device or memory layout gives that call's own results.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from cudcn import geometry  # noqa: E402
from cudcn.geometry import SignatureCache  # noqa: E402
from cudcn.torch import _bridge, functional  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

pytestmark = pytest.mark.torch


def _args(n=2, c=4, o=3, size=5, dtype=torch.float64, mask=True, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)

    return dict(
        input=rand(n, c, size, size), offset=rand(n, 18, size, size) * 2.5, weight=rand(o, c, 3, 3),
        bias=rand(o) if bias else None, mask=rand(n, 9, size, size).abs() if mask else None,
    )


def _leaves(args):
    return {k: None if v is None else v.detach().clone().requires_grad_() for k, v in args.items()}


def _forward_backward(args, **conv):
    """Output and the gradients of every tensor given, through cudcn.torch."""
    leaves = _leaves(args)
    out = ct.deform_conv2d(**leaves, **{"padding": 1, **conv})
    out.backward(torch.ones_like(out))
    return out.detach(), [None if t is None else t.grad for t in leaves.values()]


def _core(args, **conv):
    """The same from the NumPy core, as tensors."""
    arrays = {k: None if v is None else v.numpy() for k, v in args.items()}
    conv = {"padding": 1, **conv}
    out = cudcn.deform_conv2d(**arrays, **conv)
    grads = cudcn.deform_conv2d_backward(np.ones_like(out), **arrays, **conv)
    order = (grads.input, grads.offset, grads.weight, grads.bias, grads.mask)
    return torch.from_numpy(out), [None if g is None else torch.from_numpy(np.ascontiguousarray(g)) for g in order]


def _assert_same(got, expected):
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[1], expected[1]):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.fixture
def routes(monkeypatch):
    """Which route each call took: "op" (the custom op) or "function" (the eager autograd.Function)."""
    taken = []
    op, function = functional._deform_conv2d_op, functional._DeformConv2dFunction.apply

    def through_op(*args):
        taken.append("op")
        return op(*args)

    def through_function(*args):
        taken.append("function")
        return function(*args)

    monkeypatch.setattr(functional, "_deform_conv2d_op", through_op)
    monkeypatch.setattr(functional._DeformConv2dFunction, "apply", through_function)
    return taken


@pytest.fixture
def checks(monkeypatch):
    """Calls of the core's checks (a spy), with every kept geometry forgotten."""
    calls = []
    check = geometry._check

    def spy(*args):
        calls.append(args)
        return check(*args)

    monkeypatch.setattr(geometry, "_check", spy)
    monkeypatch.setattr(geometry, "_geometries", SignatureCache())
    monkeypatch.setattr(functional, "_geometries", SignatureCache())
    return calls


class Passing(TorchDispatchMode):
    """A dispatch mode that only passes calls on (as FlopCounterMode would)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class PassingFunctions(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------
# Routes


def test_plain_eager_calls_skip_the_custom_op(routes):
    args = _args()
    _assert_same(_forward_backward(args), _core(args))
    assert routes == ["function"]


@pytest.mark.parametrize("context", ["dispatch mode", "function mode", "profiler"])
def test_modes_and_the_profiler_see_the_custom_op(routes, context):
    args = _args()
    expected = _forward_backward(args)
    routes.clear()
    contexts = {"dispatch mode": Passing, "function mode": PassingFunctions,
                "profiler": lambda: torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])}
    with contexts[context]() as active:
        got = _forward_backward(args)
    _assert_same(got, expected)
    assert routes == ["op"]
    if context == "profiler":
        assert "cudcn::deform_conv2d" in {event.name for event in active.events()}


def test_meta_tensors_and_transforms_go_through_the_custom_op(routes):
    args = _args()
    meta = {k: v.to("meta") for k, v in args.items()}
    assert ct.deform_conv2d(**meta, padding=1).shape == (2, 3, 5, 5)
    assert routes == ["op"]
    assert not _bridge.eager([args["input"].to("meta")])
    assert _bridge.eager([args["input"], None])
    seen = []

    def inside(x):
        seen.append(_bridge.eager([x]))
        return x

    torch.func.vmap(inside)(args["input"])
    assert seen == [False]


def test_inplace_change_after_the_forward_is_caught():
    """The eager route saves its tensors as autograd does (version counters)."""
    leaves = _leaves(_args())
    out = ct.deform_conv2d(**leaves, padding=1)
    with torch.no_grad():
        leaves["weight"].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@pytest.mark.parametrize("layout", ["contiguous", "a transposed input", "bfloat16"])
def test_the_backward_reuses_the_forwards_arrays_where_they_are_the_tensors_memory(monkeypatch, layout):
    """Forward: five tensors to arrays. Backward: grad_output alone where
    every array was the tensor's own memory; all five again where one was a
    copy (a non-contiguous input, a CPU bfloat16 tensor), so that no copy is
    held from the forward to the backward. The gradients are the same."""
    dtype = torch.bfloat16 if layout == "bfloat16" else torch.float64
    args = _args(dtype=dtype)
    if layout == "a transposed input":
        args["input"] = args["input"].transpose(2, 3).contiguous().transpose(2, 3)
    leaves = _leaves(args)
    calls = []
    counted = lambda t: calls.append(t) or _bridge.to_array(t)  # noqa: E731
    monkeypatch.setattr(functional, "to_array", counted)
    out = ct.deform_conv2d(**leaves, padding=1)
    assert len(calls) == 5
    out.backward(torch.ones_like(out))
    assert len(calls) == (6 if layout == "contiguous" else 10)
    grads = [leaves[k].grad for k in ("input", "offset", "weight", "mask")]
    monkeypatch.setattr(functional, "same_memory", lambda t: False)
    again = _leaves(args)
    ct.deform_conv2d(**again, padding=1).backward(torch.ones_like(out))
    for name, grad in zip(("input", "offset", "weight", "mask"), grads):
        assert torch.equal(again[name].grad, grad), name


def test_no_grad_saves_nothing(routes):
    args = _leaves(_args())
    with torch.no_grad():
        out = ct.deform_conv2d(**args, padding=1)
    assert out.grad_fn is None and not out.requires_grad


# ---------------------------------------------------------------------------
# One validation per call


def test_forward_and_backward_check_a_signature_once(checks):
    args = _args()
    _forward_backward(args)
    assert len(checks) == 1  # the backward took the forward's geometry
    _forward_backward(args)
    _forward_backward(_args(seed=1))  # other numbers, same signature
    assert len(checks) == 1


def test_the_module_checks_once(checks):
    layer = ct.DeformConv2d(4, 3, 3, padding=1).double()
    args = _args()
    for _ in range(3):
        layer(args["input"], args["offset"], args["mask"]).sum().backward()
    assert len(checks) == 1


@pytest.mark.parametrize("context", ["dispatch mode", "direct op"])
def test_the_custom_op_checks_once_too(checks, context):
    """The public function, the op's implementation and its fake one share
    the kept geometry: one check for a new signature."""
    args = _args()
    if context == "dispatch mode":
        with Passing():
            _forward_backward(args)
    else:
        leaves = _leaves(args)
        out = torch.ops.cudcn.deform_conv2d(leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"],
                                           leaves["mask"], [1, 1], [1, 1], [1, 1])
        out.sum().backward()
    assert len(checks) == 2  # the forward's signature, and the backward op's (with grad_output)
    _forward_backward(args)
    assert len(checks) == 2


# ---------------------------------------------------------------------------
# Kept geometries are never another call's


@pytest.mark.parametrize("change", ["shape", "dtype", "stride", "mask", "bias", "contiguity"])
def test_a_changed_call_gets_its_own_results(change):
    args, conv = _args(), {}
    _forward_backward(args)  # its geometry is kept
    changed = dict(args)
    if change == "shape":
        changed = _args(n=3, size=6)
    elif change == "dtype":
        changed = {k: v.float() for k, v in args.items()}
    elif change == "stride":
        conv = {"stride": 2}
        changed["offset"], changed["mask"] = args["offset"][..., ::2, ::2], args["mask"][..., ::2, ::2]
    elif change in ("mask", "bias"):
        changed[change] = None
    else:  # the same shapes, laid out otherwise
        changed = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() == 4 else v
                   for k, v in args.items()}
        assert not changed["input"].is_contiguous()
    got = _forward_backward(changed, **conv)
    expected = _core({k: None if v is None else v.contiguous() for k, v in changed.items()}, **conv)
    assert torch.equal(got[0], expected[0].to(got[0].dtype))
    for a, b in zip(got[1], expected[1]):
        assert (a is None and b is None) or torch.equal(a, b.to(a.dtype))


def test_the_device_is_part_of_the_signature():
    args = _args()
    on_cpu = _bridge.signature(tuple(args.values()), (1, 1, 1))
    on_meta = _bridge.signature(tuple(v.to("meta") for v in args.values()), (1, 1, 1))
    assert on_cpu != on_meta and on_cpu == _bridge.signature(tuple(args.values()), (1, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.zeros(2, 3), torch.zeros(3, 3)])
    assert _bridge.signature((nested,), ()) is None  # no shape: checked in full


class CudaStandIn:
    """What backend_geometry reads of a CUDA tensor."""

    is_cuda = True


def test_a_cuda_call_gets_the_cuda_backends_geometry():
    args = {k: v.numpy() for k, v in _args().items()}
    geom = geometry.validate(**args, padding=1)
    assert geom.kind == "numpy"
    on_gpu = _bridge.backend_geometry(geom, CudaStandIn())
    assert on_gpu.kind == "cupy" and on_gpu.dtype == geom.dtype and on_gpu.batch == geom.batch
    assert _bridge.backend_geometry(geom, torch.zeros(1)) is geom
