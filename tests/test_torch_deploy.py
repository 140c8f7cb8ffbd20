"""Models built with cudcn.torch leave Python: TorchScript, torch.export, ONNX.

ONNX models run in onnxruntime's CPU DeformConv and are compared with eager
torch (the NumPy backend) on drawn geometries.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings

torch = pytest.importorskip("torch")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from cudcn.torch import export as onnx_rules  # noqa: E402
from strategies import calls  # noqa: E402

pytestmark = pytest.mark.torch

MODULES = [ct.DeformConv2d, ct.DeformConv2dPack, ct.ModulatedDeformConv2dPack]


def make_module(cls, seed=0):
    """A layer with 2 groups and 2 offset groups, random weights and offset predictor."""
    torch.manual_seed(seed)
    kwargs = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    if cls is ct.DeformConv2d:
        layer = cls(4, 6, (3, 2), **kwargs)
    else:
        layer = cls(4, 6, (3, 2), offset_groups=2, **kwargs)
        torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
        torch.nn.init.normal_(layer.conv_offset.bias, std=0.3)
    return layer.eval()


def module_inputs(cls, batch, seed=1):
    """Inputs of ``make_module(cls)`` for an image of 7x6: (input,) or (input, offset, mask)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 7, 6, generator=gen)
    if cls is not ct.DeformConv2d:
        return (x,)
    out_h, out_w = 4, 8  # (7 + 2 - 2 - 1) // 2 + 1, (6 + 4 - 2 - 1) // 1 + 1
    offset = 2.5 * torch.randn(batch, 2 * 2 * 6, out_h, out_w, generator=gen)
    mask = torch.rand(batch, 2 * 6, out_h, out_w, generator=gen)
    return (x, offset, mask)


# -- TorchScript --------------------------------------------------------------


def script_round_trip(module):
    """torch.jit.script, saved and loaded again (the op is found by name)."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated in favour of torch.export
@pytest.mark.parametrize("cls", [*MODULES, ct.CoordConv2d], ids=lambda c: c.__name__)
def test_torchscript_script_and_trace_give_the_eager_results(cls):
    module = make_module(cls) if cls is not ct.CoordConv2d else ct.CoordConv2d(4, 6, 3, padding=1).eval()
    args = module_inputs(cls, batch=2)
    expected = module(*args)
    scripted = torch.jit.script(module)
    if cls is not ct.CoordConv2d:
        assert "cudcn::deform_conv2d" in str(scripted.inlined_graph)
    traced = torch.jit.trace(module, args)
    for compiled in (scripted, script_round_trip(module), traced):
        torch.testing.assert_close(compiled(*args), expected, rtol=0, atol=0)
    other_batch = module_inputs(cls, batch=3, seed=5)  # neither specialises the batch
    for compiled in (scripted, traced):
        torch.testing.assert_close(compiled(*other_batch), module(*other_batch), rtol=0, atol=0)

    # Training through the scripted module: the op's autograd formula.
    scripted(*args).square().sum().backward()
    script_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    module(*args).square().sum().backward()
    for got, want in zip(script_grads, (p.grad for p in module.parameters())):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_function_and_its_checks():
    """A scripted function calling cudcn.torch.deform_conv2d, int and pair
    arguments; a bad call gets the eager message (the op checks), and is a
    RuntimeError as every TorchScript error."""

    def model(x, offset, weight):
        return ct.deform_conv2d(x, offset, weight, stride=(2, 1), padding=1) + ct.deform_conv2d(
            x, offset, weight, None, (2, 1), (1, 1), 1
        )

    scripted = torch.jit.script(model)
    x, offset, mask = module_inputs(ct.DeformConv2d, batch=2)
    weight = torch.randn(6, 4, 3, 3)
    offset = torch.randn(2, 18, 4, 6)
    torch.testing.assert_close(scripted(x, offset, weight), model(x, offset, weight), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"offset.shape\[1\] must be a positive multiple of 2\*kh\*kw = 18, got 17"):
        scripted(x, offset[:, :17], weight)
    layer = torch.jit.script(make_module(ct.DeformConv2d))
    with pytest.raises(RuntimeError, match=r"mask.shape\[1\] must be offset_groups\*kh\*kw = 12, got 11"):
        layer(x, *module_inputs(ct.DeformConv2d, batch=2)[1:2], mask[:, :11])


# -- torch.export -------------------------------------------------------------


def batch_dims(args):
    batch = torch.export.Dim("batch")
    return tuple({0: batch} for _ in args)


@pytest.mark.parametrize("cls", [*MODULES, ct.CoordConv2d], ids=lambda c: c.__name__)
def test_torch_export_with_a_dynamic_batch(cls):
    module = make_module(cls) if cls is not ct.CoordConv2d else ct.CoordConv2d(4, 6, 3, padding=1).eval()
    args = module_inputs(cls, batch=2)
    program = torch.export.export(module, args, dynamic_shapes=batch_dims(args))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert ("cudcn.deform_conv2d.default" in targets) == (cls is not ct.CoordConv2d)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    for batch in (2, 3, 5):
        other = module_inputs(cls, batch, seed=batch)
        expected = module(*other)
        for exported in (program.module(), loaded.module()):
            torch.testing.assert_close(exported(*other), expected, rtol=0, atol=0)


def test_torch_export_keeps_the_checks_for_static_shapes():
    """With every size static, the fake implementation checks the call at export time."""
    x, offset, _ = module_inputs(ct.DeformConv2d, batch=2)
    with pytest.raises(Exception, match=r"offset.shape\[1\] must be a positive multiple of 2\*kh\*kw = 12, got 23"):
        torch.export.export(make_module(ct.DeformConv2d), (x, offset[:, :23]))


# -- ONNX -------------------------------------------------------------------


onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx.reference import ReferenceEvaluator  # noqa: E402


def export_onnx(model, args, dynamo=True, dynamic_batch=True, **options):
    """The ONNX model (bytes) of ``model`` called with ``args``."""
    buffer = io.BytesIO()
    names = [f"arg{i}" for i in range(len(args))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo=False is deprecated; onnxscript's notes
        if dynamo:
            options.setdefault("dynamic_shapes", batch_dims(args) if dynamic_batch else None)
            torch.onnx.export(
                model, args, buffer, dynamo=True, verbose=False, input_names=names,
                custom_translation_table=ct.onnx_translation_table(), **options,
            )
        else:
            torch.onnx.export(
                model, args, buffer, dynamo=False, input_names=names,
                dynamic_axes={name: {0: "batch"} for name in names} if dynamic_batch else None, **options,
            )
    return buffer.getvalue()


def run_onnx(model_bytes, args):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return torch.from_numpy(session.run(None, feeds)[0])


def deform_conv_nodes(model_bytes):
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model, full_check=True)
    return model, [node for node in model.graph.node if node.op_type == "DeformConv"]


def attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class FunctionModel(torch.nn.Module):
    """cudcn.torch.deform_conv2d with a drawn call's weight, bias and conv arguments."""

    def __init__(self, call):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.from_numpy(call.weight))
        self.bias = None if call.bias is None else torch.nn.Parameter(torch.from_numpy(call.bias))
        self.conv = dict(stride=call.stride, padding=call.padding, dilation=call.dilation)

    def forward(self, input, offset, mask=None):
        return ct.deform_conv2d(input, offset, self.weight, self.bias, mask=mask, **self.conv)


@settings(max_examples=max(6, settings.default.max_examples // 3))
@given(calls(dtype=np.float32, min_batch=2, max_batch=3))
def test_onnx_export_runs_in_onnxruntime_and_matches_eager(call):
    model = FunctionModel(call).eval()
    args = tuple(torch.from_numpy(a) for a in (call.input, call.offset, call.mask) if a is not None)
    model_bytes = export_onnx(model, args)

    onnx_model, (node,) = deform_conv_nodes(model_bytes)
    assert onnx_model.opset_import[0].version >= 19
    initializers = {i.name for i in onnx_model.graph.initializer}
    assert node.input[:3] == ["arg0", node.input[1], "arg1"] and node.input[1] in initializers  # X, W, offset
    assert len(node.input) == (5 if call.mask is not None else 4 if call.bias is not None else 3)
    if call.bias is not None:
        assert node.input[3] in initializers
    elif call.mask is not None:
        assert node.input[3] == ""  # no B
    if call.mask is not None:
        assert node.input[4] == "arg2"
    (ph, pw), kh, kw = call.padding, *call.kernel_size
    assert attributes(node) == dict(
        strides=list(call.stride), pads=[ph, pw, ph, pw], dilations=list(call.dilation),
        group=call.groups, offset_group=call.offset_groups, kernel_shape=[kh, kw],
    )
    batch_input = onnx_model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_input.dim_param and not batch_input.dim_value  # a dynamic batch

    with torch.no_grad():
        for batched in (args, tuple(a[:1] for a in args), tuple(torch.cat((a, a)) for a in args), tuple(a[:0] for a in args)):
            torch.testing.assert_close(run_onnx(model_bytes, batched), model(*batched), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_onnx_export_of_the_modules(cls, dynamo):
    """Both exporters, a dynamic batch; DCNv1 has no mask input, DCNv2 has."""
    module = make_module(cls)
    model_bytes = export_onnx(module, module_inputs(cls, batch=2), dynamo=dynamo)
    _, (node,) = deform_conv_nodes(model_bytes)
    assert len(node.input) == (3 + 1 + (cls is not ct.DeformConv2dPack))  # X, W, offset, B, mask
    assert attributes(node)["group"] == 2 and attributes(node)["offset_group"] == 2
    with torch.no_grad():
        for batch in (1, 3):
            args = module_inputs(cls, batch, seed=batch)
            torch.testing.assert_close(run_onnx(model_bytes, args), module(*args), rtol=1e-5, atol=1e-5)
        # ONNX's own reference implementation of the operator agrees too.
        reference = ReferenceEvaluator(onnx.load_from_string(model_bytes))
        args = module_inputs(cls, 1, seed=7)
        result = reference.run(None, dict(zip(reference.input_names, (a.numpy() for a in args))))[0]
        torch.testing.assert_close(torch.from_numpy(result), module(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_export_without_bias_leaves_an_empty_input(dynamo):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=gen)

    class Model(torch.nn.Module):
        def forward(self, x, offset, mask):
            return ct.deform_conv2d(x, offset, weight, None, padding=1, mask=mask)

    args = (torch.randn(2, 4, 5, 5, generator=gen), torch.randn(2, 18, 5, 5, generator=gen), torch.rand(2, 9, 5, 5, generator=gen))
    model_bytes = export_onnx(Model(), args, dynamo=dynamo, dynamic_batch=False)
    _, (node,) = deform_conv_nodes(model_bytes)
    assert node.input[3] == "" and len(node.input) == 5
    torch.testing.assert_close(run_onnx(model_bytes, args), Model()(*args), rtol=1e-5, atol=1e-5)


def cause_chain(error):
    while error is not None:
        yield error
        error = error.__cause__


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_onnx_export_errors_name_what_deform_conv_cannot_express(dynamo):
    module = make_module(ct.DeformConv2d)
    args = module_inputs(ct.DeformConv2d, batch=2)
    with pytest.raises(Exception, match=r"opset_version >= 19, got 18|opset version 18 is not supported.*version 19"):
        export_onnx(module, args, dynamo=dynamo, opset_version=18)

    empty = ct.DeformConv2d(4, 0, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2).eval()
    assert empty(*args).shape == (2, 0, 4, 8)  # fine in torch,
    with pytest.raises(Exception) as raised:  # but not in onnxruntime
        export_onnx(empty, args, dynamo=dynamo)
    assert any(
        isinstance(e, cudcn.ArgumentError) and "weight.shape[0] (C_out) must be >= 1 to export to ONNX DeformConv" in str(e)
        for e in cause_chain(raised.value)
    ), raised.value


def test_onnx_attributes_respect_onnxruntimes_index_range():
    """onnxruntime indexes the image in 32 bits: (H + 1) * W <= 2**31 - 1
    (checked on the shapes alone: such an input is too large for a test)."""
    conv = ([1, 1], [0, 0], [1, 1])
    assert onnx_rules._onnx_attributes([1, 1, 2**16 - 2, 2**15], [1, 2, 1, 1], [1, 1, 1, 1], *conv, 19)["group"] == 1
    with pytest.raises(ValueError, match=re.escape("input (H, W) = (65535, 32768) is too large for onnxruntime's DeformConv")):
        onnx_rules._onnx_attributes([1, 1, 2**16 - 1, 2**15], [1, 2, 1, 1], [1, 1, 1, 1], *conv, 19)


def test_onnx_export_needs_static_channels():
    """group and offset_group are attributes: a dynamic channel count cannot be exported."""

    class Model(torch.nn.Module):
        def forward(self, x, offset, weight):
            return ct.deform_conv2d(x, offset, weight)

    channels = torch.export.Dim("channels")
    args = (torch.randn(2, 3, 5, 5), torch.randn(2, 18, 3, 3), torch.randn(4, 3, 3, 3))
    with pytest.raises(Exception) as raised:
        export_onnx(Model(), args, dynamic_batch=False, dynamic_shapes=({1: channels}, None, {1: channels}))
    assert any(
        isinstance(e, cudcn.ArgumentError) and "input.shape[1] (C_in) must be static to export to ONNX DeformConv" in str(e)
        for e in cause_chain(raised.value)
    ), raised.value
