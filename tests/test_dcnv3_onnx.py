"""ONNX export of cudcn.torch.dcnv3 / dcnv4 and the DCNv3 / DCNv4 modules
(torch's dynamo exporter, cudcn.torch.onnx_translation_table).

The standard route's graphs hold standard ops only and run in onnxruntime,
compared with eager torch (the NumPy backend) on drawn and chosen
geometries, with a dynamic batch (and dynamic H, W for the module). The
TensorRT route's graphs are checked for structure only (no TensorRT here).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from hypothesis import given, settings

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from dcnv3_reference import DCNv3Call, calls, pack  # noqa: E402

pytestmark = pytest.mark.torch

#: What the standard route may write.
STANDARD_OPS = {"Pad", "Reshape", "Transpose", "Shape", "Concat", "Mul", "Add", "Sub", "Div", "Range", "Cast",
                "CastLike", "Squeeze", "Unsqueeze", "Slice", "Constant", "GridSample", "ReduceSum"}


class Function(torch.nn.Module):
    """ct.dcnv3 (or ct.dcnv4 on the packed offsets and mask) with a call's scalars."""

    def __init__(self, call: DCNv3Call, packed: bool = False):
        super().__init__()
        self.scalars, self.packed = call.scalars, packed

    def forward(self, input, offset, mask=None):  # DCNv4: offset is offset_mask, no mask
        if self.packed:
            return ct.dcnv4(input, offset, *self.scalars)
        return ct.dcnv3(input, offset, mask, *self.scalars)


class Functions(torch.nn.Module):
    """Several calls in one graph (one export): a flat list of their tensors in, their outputs out."""

    def __init__(self, cases: list[tuple[DCNv3Call, bool]]):
        super().__init__()
        self.functions = torch.nn.ModuleList(Function(call, packed) for call, packed in cases)
        self.counts = [2 if packed else 3 for _, packed in cases]

    def forward(self, tensors):
        outputs, start = [], 0
        for function, count in zip(self.functions, self.counts):
            outputs.append(function(*tensors[start:start + count]))
            start += count
        return tuple(outputs)


def arguments(call: DCNv3Call, packed: bool, dtype=torch.float32):
    arrays = [call.input, pack(call.offset, call.mask, call.group)] if packed else [call.input, call.offset, call.mask]
    return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(dtype) for a in arrays)


def check_cases(cases: list[tuple[DCNv3Call, bool]]):
    """Export the calls as one graph with a dynamic batch: standard ops only,
    a Pad (H by pad_h, W by pad_w) and a GridSample per call, and
    onnxruntime equal to eager at the exported batch, 1, twice it and 0."""
    model = Functions(cases).eval()
    flat = [t for call, packed in cases for t in arguments(call, packed)]
    batch = torch.export.Dim("batch")
    model_bytes = export(model, (flat,), dynamic_shapes=([{0: batch} for _ in flat],))
    graph = checked(model_bytes)
    assert {node.domain for node in graph.graph.node} == {""}
    assert {node.op_type for node in graph.graph.node} <= STANDARD_OPS
    samplers = [node for node in graph.graph.node if node.op_type == "GridSample"]
    assert len(samplers) == len(cases)
    for node in samplers:
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["align_corners"] == 0 and attributes["padding_mode"] == b"zeros"
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    constants |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node
                  if n.op_type == "Constant"}
    pads = sorted(list(constants[n.input[1]]) for n in graph.graph.node if n.op_type == "Pad")
    assert pads == sorted([0, c.pad_h, c.pad_w, 0, 0, c.pad_h, c.pad_w, 0] for c, _ in cases)
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # a dynamic batch
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        for batched in (flat, [a[:1] for a in flat], [torch.cat((a, a)) for a in flat], [a[:0] for a in flat]):
            outputs = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), batched)})
            for out, expected in zip(outputs, model(batched), strict=True):
                torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-5)


def export(model, args, dynamic_shapes="batch", route="onnx"):
    """The ONNX model (bytes); a dynamic batch by default."""
    if dynamic_shapes == "batch":
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, buffer, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes,
                          custom_translation_table=ct.onnx_translation_table(dcnv3=route))
    return buffer.getvalue()


def run(model_bytes, args):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0])


def checked(model_bytes):
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model, full_check=True)
    return model


def check_batches(model_bytes, model, args):
    """onnxruntime equals eager at the exported batch, 1, twice it, and 0."""
    with torch.no_grad():
        for batched in (args, tuple(a[:1] for a in args), tuple(torch.cat((a, a)) for a in args),
                        tuple(a[:0] for a in args)):
            torch.testing.assert_close(run(model_bytes, batched), model(*batched), rtol=1e-5, atol=1e-5)


# -- the standard route ---------------------------------------------------------


def chosen_call(kernel=(3, 3), stride=(1, 1), pad=(1, 1), dilation=(1, 1), remove_center=False, scale=1.0,
                size=(7, 6), group=2, group_channels=3, seed=0) -> DCNv3Call:
    """Points spread up to 3 pixels from the kernel grid, some outside the image."""
    rng = np.random.default_rng(seed)
    out_h, out_w = ((s + 2 * p - d * (k - 1) - 1) // st + 1 for s, k, st, p, d in zip(size, kernel, stride, pad, dilation))
    P = kernel[0] * kernel[1] - int(remove_center)
    return DCNv3Call(
        input=rng.standard_normal((2, *size, group * group_channels)),
        offset=rng.uniform(-3, 3, (2, out_h, out_w, group * P * 2)),
        mask=rng.uniform(-1, 1, (2, out_h, out_w, group * P)),
        kernel_h=kernel[0], kernel_w=kernel[1], stride_h=stride[0], stride_w=stride[1], pad_h=pad[0], pad_w=pad[1],
        dilation_h=dilation[0], dilation_w=dilation[1], group=group, group_channels=group_channels,
        offset_scale=scale, remove_center=remove_center, seed=seed)


CHOSEN = {
    "3x3": chosen_call(),
    "remove_center 3x3": chosen_call(remove_center=True, scale=0.7),
    "remove_center 5x5": chosen_call(kernel=(5, 5), pad=(2, 2), remove_center=True),
    "stride 2": chosen_call(stride=(2, 2), size=(9, 8)),
    "stride (2, 1) dilation (1, 2)": chosen_call(stride=(2, 1), dilation=(1, 2), pad=(1, 2)),
    "dilation 2": chosen_call(dilation=(2, 2), pad=(2, 2)),
    "unequal pads": chosen_call(pad=(2, 0), scale=1.5),
    "rectangular 3x2": chosen_call(kernel=(3, 2), pad=(1, 0)),
    "rectangular 1x4, even": chosen_call(kernel=(1, 4), pad=(0, 1), group=3, group_channels=5),
    "2x2, no pad": chosen_call(kernel=(2, 2), pad=(0, 0), group=1, group_channels=1),
}


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_chosen_geometries_run_in_onnxruntime_and_match_eager(packed):
    """remove_center, stride 2, dilation 2, unequal pads, rectangular and even kernels."""
    check_cases([(call, packed) for call in CHOSEN.values()])


@settings(max_examples=max(4, settings.default.max_examples // 5))
@given(call=calls(min_batch=2, max_kernel=4))
def test_drawn_calls_run_in_onnxruntime_and_match_eager(call):
    check_cases([(call, False), (call, True)])


class InBfloat16(torch.nn.Module):
    """A call in bfloat16 on float32 inputs (onnxruntime's Python API takes no bfloat16 arrays)."""

    def __init__(self, call: DCNv3Call, packed: bool):
        super().__init__()
        self.function = Function(call, packed)

    def forward(self, input, offset, mask=None):
        cast = [t if t is None else t.bfloat16() for t in (input, offset, mask)]
        return self.function(*cast).float()


@pytest.mark.parametrize("packed", [False, True], ids=["dcnv3", "dcnv4"])
def test_float64_float16_and_bfloat16_graphs(packed):
    """A float64 graph builds its grid in float64 (rounding-level agreement);
    a float16 graph samples float16 images on a float32 grid; a bfloat16
    graph pads, samples and sums in float32 and rounds to bfloat16."""
    call = CHOSEN["stride (2, 1) dilation (1, 2)"]
    model = Function(call, packed).eval()
    args = arguments(call, packed, torch.float64)
    torch.testing.assert_close(run(export(model, args), args), model(*args), rtol=1e-12, atol=1e-12)
    args = arguments(call, packed, torch.float16)
    out = run(export(model, args), args)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, model(*args), rtol=2e-3, atol=2e-3)
    model = InBfloat16(call, packed).eval()
    args = arguments(call, packed)
    model_bytes = export(model, args)
    assert "GridSample" in {n.op_type for n in checked(model_bytes).graph.node}
    torch.testing.assert_close(run(model_bytes, args), model(*args), rtol=0.02, atol=0.02)


def test_export_does_not_need_an_input_of_any_given_size():
    """Every size is read from the tensors: H, W, Ho and Wo may be dynamic too
    (here H and W are, for a call whose offsets keep the image size)."""
    call = chosen_call(size=(6, 5))
    model, args = Function(call).eval(), arguments(call, False)
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    spatial = {0: batch, 1: height, 2: width}
    model_bytes = export(model, args, dynamic_shapes=(spatial, spatial, spatial))
    dims = onnx.load_from_string(model_bytes).graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param for d in dims[:3])
    for size in ((6, 5), (3, 8), (1, 1)):
        other = chosen_call(size=size, seed=sum(size))
        other_args = arguments(other, False)
        with torch.no_grad():
            torch.testing.assert_close(run(model_bytes, other_args), model(*other_args), rtol=1e-5, atol=1e-5)


def random_module(cls, seed=0, **kwargs):
    """The module's own initialisation, but the predictors and gate (zero
    there) random: offsets of a pixel or two, a mask and a gate that vary."""
    torch.manual_seed(seed)
    module = cls(**kwargs)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith(("offset.", "mask.", "offset_mask.", "center_feature_scale_proj")):
                param.copy_(torch.randn_like(param) * 0.5)
    return module.eval()


def test_whole_dcnv3_module_exports_with_dynamic_batch_and_size():
    module = random_module(ct.DCNv3, channels=12, group=3, center_feature_scale=True, dw_kernel_size=5)
    x = torch.randn(2, 6, 7, 12)
    spatial = {0: torch.export.Dim("batch"), 1: torch.export.Dim("height"), 2: torch.export.Dim("width")}
    model_bytes = export(module, (x,), dynamic_shapes=(spatial,))
    model = checked(model_bytes)
    ops = {node.op_type for node in model.graph.node}
    assert "GridSample" in ops and "Softmax" in ops and "Conv" in ops and all(n.domain == "" for n in model.graph.node)
    with torch.no_grad():
        for shape in ((2, 6, 7), (1, 4, 4), (3, 9, 5), (0, 5, 5)):
            x = torch.randn(*shape, 12)
            torch.testing.assert_close(run(model_bytes, (x,)), module(x), rtol=1e-5, atol=1e-5)


def test_whole_dcnv4_module_exports_with_dynamic_batch():
    module = random_module(ct.DCNv4, channels=12, group=2, kernel_size=5, pad=2, dw_kernel_size=3,
                           center_feature_scale=True, remove_center=True)

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dcn = module

        def forward(self, x):
            return self.dcn(x, shape=(5, 6))

    model, x = Tokens().eval(), torch.randn(2, 30, 12)
    model_bytes = export(model, (x,))
    graph = checked(model_bytes)
    assert all(n.domain == "" for n in graph.graph.node) and "GridSample" in {n.op_type for n in graph.graph.node}
    check_batches(model_bytes, model, (x,))


# -- the TensorRT route -----------------------------------------------------------


def test_tensorrt_route_writes_one_trtdcnv3_node():
    module = random_module(ct.DCNv3, channels=8, group=2)
    model = checked(export(module, (torch.randn(2, 5, 5, 8),), route="tensorrt"))
    (node,) = [n for n in model.graph.node if n.domain == "mmdeploy"]
    assert node.op_type == "TRTDCNv3" and len(node.input) == 3 and "GridSample" not in {n.op_type for n in model.graph.node}
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attributes == dict(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
                              dilation_w=1, group=2, group_channels=4, im2col_step=256, remove_center=0,
                              offset_scale=pytest.approx(1.0))
    assert any(d.domain == "mmdeploy" and d.version == 1 for d in model.opset_import)
    # The mask input is the module's softmax, an ordinary op before the node.
    producers = {out: n.op_type for n in model.graph.node for out in n.output}
    assert producers[node.input[2]] in {"Softmax", "Reshape"}


def test_tensorrt_route_for_dcnv4_unpacks_offset_mask_first():
    call = chosen_call(scale=0.5)
    model = checked(export(Function(call, packed=True).eval(), arguments(call, True), route="tensorrt"))
    (node,) = [n for n in model.graph.node if n.op_type == "TRTDCNv3"]
    value_info = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
    offset_dims = [d.dim_value for d in value_info[node.input[1]].type.tensor_type.shape.dim[1:]]
    assert offset_dims == [7, 6, 2 * 9 * 2]


def cause_chain(error):
    while error is not None:
        yield error
        error = error.__cause__


@pytest.mark.parametrize(("call", "dtype", "message"), [
    (chosen_call(stride=(2, 2), size=(9, 8)), torch.float32, r"stride 1 only: its output size is wrong for others \(got \(2, 2\)\)"),
    (chosen_call(remove_center=True), torch.float32, "no remove_center: the plugin ignores it"),
    (chosen_call(), torch.float64, r"float32 only \(got DOUBLE\)"),
], ids=["stride 2", "remove_center", "float64"])
def test_tensorrt_route_refuses_what_the_plugin_gets_wrong(call, dtype, message):
    with pytest.raises(Exception) as raised:
        export(Function(call).eval(), arguments(call, False, dtype), route="tensorrt")
    errors = [e for e in cause_chain(raised.value) if isinstance(e, cudcn.ArgumentError)]
    assert errors and "mmdeploy::TRTDCNv3" in str(errors[0]), raised.value
    assert __import__("re").search(message, str(errors[0])), errors[0]


def test_unknown_route_is_refused():
    with pytest.raises(cudcn.ArgumentError, match="dcnv3 must be one of 'onnx', 'tensorrt', got 'trt'"):
        ct.onnx_translation_table(dcnv3="trt")
