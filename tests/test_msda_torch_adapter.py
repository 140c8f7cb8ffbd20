"""cudcn.torch.ms_deform_attn on CPU tensors: the custom op, autograd,
autocast, settings, torch.compile and torch.export.

The NumPy backend is the reference: on CPU tensors the adapter must give the
core's results exactly, whichever way the levels come (an integer tensor,
read on the host, or Python ints), and its gradients must pass gradcheck and
opcheck on every differentiable input.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
from hypothesis import given

torch = pytest.importorskip("torch")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from cudcn.torch import functional  # noqa: E402
from msda_reference import calls  # noqa: E402
from test_torch_adapter import GraphRecorder, _targets  # noqa: E402

pytestmark = pytest.mark.torch

SHAPES = [(4, 5), (2, 3), (1, 1)]
STARTS = [0, 20, 26]
PIXELS = 27
FIELDS = ("value", "sampling_locations", "attention_weights")


def make_args(batch=2, queries=7, heads=2, channels=3, points=3, dtype=torch.float64, seed=0):
    """value, sampling_locations, attention_weights for SHAPES; locations up to
    a pixel outside the levels, away from integer pixel coordinates (kinks)."""
    gen = torch.Generator().manual_seed(seed)
    levels = len(SHAPES)
    value = torch.randn(batch, PIXELS, heads, channels, generator=gen, dtype=torch.float64)
    extent = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64).view(levels, 1, 2)
    shape = (batch, queries, heads, levels, points, 2)
    cell = (torch.rand(shape, generator=gen, dtype=torch.float64) * (extent + 2)).floor() - 1  # -1 .. size
    pixel = cell + 0.1 + 0.8 * torch.rand(shape, generator=gen, dtype=torch.float64)
    locations = (pixel + 0.5) / extent
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=torch.float64) * 2 - 1
    return [t.to(dtype) for t in (value, locations, weights)]


def level_tensors():
    return torch.tensor(SHAPES), torch.tensor(STARTS)


def core(value, locations, weights, grad_output=None):
    """The NumPy backend's output (and gradients) for the same call."""
    args = (value.detach().numpy(), np.array(SHAPES), np.array(STARTS),
            locations.detach().numpy(), weights.detach().numpy())
    if grad_output is None:
        return torch.from_numpy(cudcn.ms_deform_attn(*args))
    return [torch.from_numpy(g) for g in cudcn.ms_deform_attn_backward(grad_output.numpy(), *args)]


# Every way to give the levels: tensors, Python ints (level_start_index as a
# tensor that is not read, as ints, or None).
LEVELS = {
    "tensors": lambda: level_tensors(),
    "ints": lambda: (SHAPES, torch.tensor(STARTS)),
    "ints, starts as ints": lambda: ([list(p) for p in SHAPES], STARTS),
    "ints, no starts": lambda: (tuple(SHAPES), None),
}


@pytest.mark.parametrize("levels", list(LEVELS))
def test_equals_the_numpy_backend_exactly(levels):
    value, locations, weights = leaves = [t.requires_grad_() for t in make_args()]
    out = ct.ms_deform_attn(value, *LEVELS[levels](), locations, weights)
    assert out.shape == (2, 7, 6) and out.dtype == torch.float64
    torch.testing.assert_close(out, core(value, locations, weights), rtol=0, atol=0)
    grad_output = torch.randn_like(out)
    out.backward(grad_output)
    for leaf, expected, field in zip(leaves, core(value, locations, weights, grad_output), FIELDS):
        torch.testing.assert_close(leaf.grad, expected, rtol=0, atol=0, msg=field)


@given(call=calls(kinks=0.0))
def test_drawn_calls_equal_the_numpy_backend(call):
    value, locations, weights = (torch.tensor(a) for a in (call.value, call.sampling_locations,
                                                           call.attention_weights))
    for levels in (torch.tensor(call.spatial_shapes), call.shapes):
        out = ct.ms_deform_attn(value, levels, torch.tensor(call.level_start_index), locations, weights)
        np.testing.assert_array_equal(out.numpy(), cudcn.ms_deform_attn(*call.args))


@pytest.mark.parametrize("levels", ["tensors", "ints"])
def test_gradcheck_on_every_differentiable_input(levels):
    value, locations, weights = (t.requires_grad_() for t in make_args(batch=2, queries=3))
    spatial_shapes, level_start_index = LEVELS[levels]()
    assert torch.autograd.gradcheck(
        lambda v, loc, a: ct.ms_deform_attn(v, spatial_shapes, level_start_index, loc, a),
        (value, locations, weights), eps=1e-6, atol=1e-7,
    )


def test_opcheck_forward_and_backward_ops():
    value, locations, weights = (t.requires_grad_() for t in make_args())
    shapes, starts = level_tensors()
    flat = [size for pair in SHAPES for size in pair]
    for args in ((value, shapes, starts, locations, weights, 64, None),
                 (value, None, None, locations, weights, 64, flat)):
        torch.library.opcheck(torch.ops.cudcn.ms_deform_attn.default, args)
    grad_output = torch.randn(2, 7, 6, dtype=torch.float64)
    value, locations, weights = make_args()  # the backward op is not differentiable
    for deterministic in (False, True):
        args = (grad_output, value, shapes, starts, locations, weights, 64, None, deterministic)
        torch.library.opcheck(torch.ops.cudcn.ms_deform_attn_backward.default, args)


def test_a_level_tensor_is_read_on_the_host_once_per_forward_and_backward(monkeypatch):
    """Eager calls read spatial_shapes (and level_start_index) once, before
    the op; the forward and backward ops then have the sizes as ints. Python
    ints are never read."""
    reads = []
    host = functional._host_integers
    monkeypatch.setattr(functional, "_host_integers", lambda t: reads.append(t) or host(t))
    value, locations, weights = (t.requires_grad_() for t in make_args())
    ct.ms_deform_attn(value, *level_tensors(), locations, weights).sum().backward()
    assert len(reads) == 2  # spatial_shapes and level_start_index, once each
    ct.ms_deform_attn(value, SHAPES, torch.tensor(STARTS), locations, weights).sum().backward()
    assert len(reads) == 2


def test_level_tensors_may_stay_on_the_cpu_and_are_checked():
    value, locations, weights = make_args()
    shapes, starts = level_tensors()
    with pytest.raises(cudcn.ArgumentError, match=re.escape(
            "spatial_shapes is on meta but value is on cpu; pass it on value's device or on the CPU")):
        ct.ms_deform_attn(value, shapes.to("meta"), starts, locations, weights)
    with pytest.raises(cudcn.ArgumentError, match=re.escape(
            "level_start_index must be the first pixel of each level, the cumulative sum of "
            "H_l*W_l = [0, 20, 26], got [0, 20, 25]")):
        ct.ms_deform_attn(value, shapes, torch.tensor([0, 20, 25]), locations, weights)
    with pytest.raises(cudcn.ArgumentError, match=re.escape("got [0, 21, 26]")):
        ct.ms_deform_attn(value, SHAPES, [0, 21, 26], locations, weights)  # ints are checked
    # A tensor beside Python-int shapes is not read (transformers' convention).
    ct.ms_deform_attn(value, SHAPES, torch.tensor([0, 21, 26]), locations, weights)
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("spatial_shapes.dtype must be an integer dtype, got float32")):
        ct.ms_deform_attn(value, shapes.float(), starts, locations, weights)
    with pytest.raises(cudcn.ArgumentError, match=re.escape(
            "value.shape[1] must be S, the pixels of all levels (sum of H_l*W_l of spatial_shapes) = 26, got 27")):
        ct.ms_deform_attn(value, SHAPES[:2], None, locations[:, :, :, :2], weights[:, :, :, :2])


@pytest.mark.parametrize("bad, error, message", [
    (5, cudcn.ArgumentTypeError,
     "spatial_shapes must be an integer tensor (L, 2) or a sequence of (H_l, W_l) pairs of ints, got int"),
    ([(4, 5, 1)], cudcn.ArgumentError, "got an entry (4, 5, 1)"),
    ([(4, 5.0)], cudcn.ArgumentTypeError, "got an entry of float 5.0"),
    ([(4, True)], cudcn.ArgumentTypeError, "got an entry of bool True"),
    ([(4, 5), (2, 3), (1, 0)], cudcn.ArgumentError, "spatial_shapes must hold positive (H_l, W_l), got"),
])
def test_malformed_python_shapes(bad, error, message):
    value, locations, weights = make_args()
    with pytest.raises(error, match=re.escape(message)):
        ct.ms_deform_attn(value, bad, None, locations, weights)


def test_malformed_tensors_name_the_argument():
    value, locations, weights = make_args()
    with pytest.raises(cudcn.ArgumentTypeError, match="^value must be a torch.Tensor, got ndarray$"):
        ct.ms_deform_attn(value.numpy(), SHAPES, None, locations, weights)
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape(
            "attention_weights.dtype must equal value.dtype = float64, got float32")):
        ct.ms_deform_attn(value, SHAPES, None, locations, weights.float())
    with pytest.raises(cudcn.ArgumentError, match=re.escape("sampling_locations.shape[2] must be")):
        ct.ms_deform_attn(value, level_tensors()[0], level_tensors()[1], locations[:, :, :1], weights)
    with pytest.raises(cudcn.ArgumentError, match=re.escape("im2col_step must be a positive int, got 0")):
        ct.ms_deform_attn(value, SHAPES, None, locations, weights, im2col_step=0)


def test_any_batch_whatever_im2col_step_and_empty_calls():
    value, locations, weights = make_args(batch=3)
    out = ct.ms_deform_attn(value, SHAPES, None, locations, weights, im2col_step=2)
    torch.testing.assert_close(out, core(value, locations, weights), rtol=0, atol=0)
    for batch, queries in ((0, 7), (2, 0)):
        leaves = [t.requires_grad_() for t in make_args(batch=batch, queries=queries)]
        out = ct.ms_deform_attn(leaves[0], *level_tensors(), *leaves[1:])
        assert out.shape == (batch, queries, 6)
        out.sum().backward()
        assert all(t.grad.shape == t.shape for t in leaves)


def test_non_contiguous_inputs_are_not_modified():
    value, locations, weights = make_args()
    expected = core(value, locations, weights)
    wide = torch.cat((locations, locations), dim=-1)[..., :2]  # a slice: not contiguous
    transposed = weights.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (wide.is_contiguous() or transposed.is_contiguous())
    leaves = [t.detach().requires_grad_() for t in (value, wide, transposed)]
    before = [t.detach().clone() for t in leaves]
    out = ct.ms_deform_attn(leaves[0], *level_tensors(), *leaves[1:])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert all(torch.equal(t.detach(), b) for t, b in zip(leaves, before))


DOUBLE_BACKWARD = "double backward of cudcn's multi-scale deformable attention .* is not supported"


def test_double_backward_says_it_is_not_supported():
    leaves = [t.requires_grad_() for t in make_args()]
    plain = torch.autograd.grad(ct.ms_deform_attn(leaves[0], SHAPES, None, *leaves[1:]).square().sum(), leaves)
    grads = torch.autograd.grad(ct.ms_deform_attn(leaves[0], SHAPES, None, *leaves[1:]).square().sum(), leaves,
                                create_graph=True)
    for g, expected in zip(grads, plain):
        torch.testing.assert_close(g, expected, rtol=0, atol=0)
    with pytest.raises(cudcn.UnsupportedError, match=DOUBLE_BACKWARD):
        (grads[1] ** 2).sum().backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_on_cpu(dtype):
    """Each dtype runs in itself (bfloat16 through float32 copies); results and
    gradients keep the dtype and equal the float32 computation rounded once."""
    leaves = [t.requires_grad_() for t in make_args(dtype=dtype)]
    out = ct.ms_deform_attn(leaves[0], *level_tensors(), *leaves[1:])
    assert out.dtype == dtype
    reference = ct.ms_deform_attn(leaves[0].detach().float(), SHAPES, None, *(t.detach().float() for t in leaves[1:]))
    torch.testing.assert_close(out, reference.to(dtype), rtol=0, atol=0)
    out.float().square().sum().backward()
    assert all(t.grad.dtype == dtype and torch.isfinite(t.grad).all() for t in leaves)


def test_autocast_casts_to_the_autocast_dtype_and_leaves_float64_alone():
    value, locations, weights = make_args(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ct.ms_deform_attn(value.bfloat16(), SHAPES, None, locations, weights)
    assert out.dtype == torch.bfloat16
    expected = ct.ms_deform_attn(value.bfloat16(), SHAPES, None, locations.bfloat16(), weights.bfloat16())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    value, locations, weights = make_args(dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ct.ms_deform_attn(value, SHAPES, None, locations, weights).dtype == torch.float64


@pytest.fixture
def backward_settings_seen(monkeypatch):
    """Per core MSDA backward: cudcn's deterministic setting and workspace budget."""
    seen = []
    backward = cudcn.ms_deform_attn_backward

    def spy(*args, **kwargs):
        seen.append((cudcn.are_deterministic_algorithms_enabled(), cudcn.get_workspace_bytes()))
        return backward(*args, **kwargs)

    monkeypatch.setattr(cudcn, "ms_deform_attn_backward", spy)
    return seen


def test_deterministic_setting_reaches_the_backward(backward_settings_seen):
    """torch.use_deterministic_algorithms(True), or cudcn's setting at the
    forward, holds for the backward, also when autograd runs it in another
    thread (as for a CUDA backward)."""
    value, locations, weights = make_args()
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        for mode in (False, True):
            torch.use_deterministic_algorithms(mode)
            leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
            ct.ms_deform_attn(leaves[0], *level_tensors(), *leaves[1:]).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)
    for setting in (False, True):
        leaves = [t.detach().requires_grad_() for t in (value, locations, weights)]
        with cudcn.deterministic_algorithms(setting), cudcn.workspace_bytes(2**20):
            loss = ct.ms_deform_attn(leaves[0], SHAPES, None, *leaves[1:]).sum()
        thread = threading.Thread(target=loss.backward)
        thread.start()
        thread.join()
    assert [d for d, _ in backward_settings_seen] == [False, True, False, True]
    assert [w for _, w in backward_settings_seen[2:]] == [2**20, 2**20]


@pytest.mark.parametrize("levels", ["tensors", "ints"])
def test_compile_fullgraph_with_a_dynamic_batch_and_queries(levels):
    torch._dynamo.reset()
    spatial_shapes, level_start_index = LEVELS[levels]()

    def f(value, locations, weights):
        return ct.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights).relu()

    recorder = GraphRecorder()
    compiled = torch.compile(f, fullgraph=True, backend=recorder, dynamic=True)
    # Sizes other than 0 and 1 (which torch.compile specialises) and 2 and 3
    # (the sizes of spatial_shapes, with which they would be assumed equal).
    for batch, queries in ((4, 7), (5, 6), (6, 9)):
        leaves = [t.requires_grad_() for t in make_args(batch=batch, queries=queries, seed=batch)]
        out = compiled(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        expected = f(*leaves)
        expected_grads = torch.autograd.grad(expected.square().sum(), leaves)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert len(recorder.dynamo_graphs) == 1  # one graph for every batch and query count
    assert "cudcn.ms_deform_attn.default" in _targets(recorder.forward_graphs)
    assert "cudcn.ms_deform_attn_backward.default" in _targets(recorder.backward_graphs)


def test_compile_with_inductor_runs():
    torch._dynamo.reset()
    value, locations, weights = make_args(dtype=torch.float32)
    compiled = torch.compile(lambda v, loc, a: ct.ms_deform_attn(v, SHAPES, None, loc, a) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(value, locations, weights), 2 * core(value, locations, weights).float())


class WithShapeTensors(torch.nn.Module):
    """Levels as tensors made in the forward (constants of the exported graph)."""

    def forward(self, value, locations, weights):
        return ct.ms_deform_attn(value, torch.tensor(SHAPES), torch.tensor(STARTS), locations, weights)


class WithShapeInts(torch.nn.Module):
    """Levels as Python ints (transformers' spatial_shapes_list)."""

    def forward(self, value, locations, weights):
        return ct.ms_deform_attn(value, SHAPES, None, locations, weights)


class WithShapeInputs(torch.nn.Module):
    """Levels as inputs of the exported graph."""

    def forward(self, value, spatial_shapes, level_start_index, locations, weights):
        return ct.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)


def dynamic_shapes(model):
    batch, queries = torch.export.Dim("batch"), torch.export.Dim("queries")
    levels = (None, None) if isinstance(model, WithShapeInputs) else ()
    return ({0: batch}, *levels, {0: batch, 1: queries}, {0: batch, 1: queries})


def model_inputs(model, **sizes):
    value, locations, weights = make_args(**sizes)
    return (value, *level_tensors(), locations, weights) if isinstance(model, WithShapeInputs) else (
        value, locations, weights)


@pytest.mark.parametrize("model", [WithShapeTensors(), WithShapeInts(), WithShapeInputs()],
                         ids=lambda m: type(m).__name__)
def test_torch_export_with_a_dynamic_batch_and_queries(model):
    program = torch.export.export(model, model_inputs(model), dynamic_shapes=dynamic_shapes(model))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "cudcn.ms_deform_attn.default" in ops
    for batch, queries in ((3, 5), (1, 11)):
        args = model_inputs(model, batch=batch, queries=queries, seed=batch)
        torch.testing.assert_close(program.module()(*args), model(*args), rtol=0, atol=0)


def test_fake_and_meta_tensors_give_the_shape_and_check_what_they_can():
    value, locations, weights = (t.to("meta") for t in make_args())
    assert ct.ms_deform_attn(value, SHAPES, None, locations, weights).shape == (2, 7, 6)
    assert ct.ms_deform_attn(value, *(t.to("meta") for t in level_tensors()), locations, weights).shape == (2, 7, 6)
    with pytest.raises(cudcn.ArgumentError, match=re.escape("value.shape[1] must be S")):
        ct.ms_deform_attn(value[:, :26], SHAPES, None, locations, weights)  # sizes known: checked
    with pytest.raises(cudcn.ArgumentError, match=re.escape("sampling_locations must be a 6-D array")):
        ct.ms_deform_attn(value, *(t.to("meta") for t in level_tensors()), locations[0], weights)
