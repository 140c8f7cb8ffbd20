"""ONNX export of ``cudcn::dcnv3`` and ``cudcn::dcnv4`` (torch's dynamo exporter).

Two routes, chosen by :func:`cudcn.torch.onnx_translation_table`'s ``dcnv3``:

``"onnx"`` (default): the operator decomposed into standard ONNX ops
that any runtime has (onnxruntime included; GridSample needs opset 16):

1. Pad the NHWC input, H by pad_h and W by pad_w (the CUDA op's padding);
   view it as N*G images of D channels (Reshape, Transpose).
2. Build each point's place in the padded image from the output pixel's
   reference point (Range over Ho and Wo), the constant kernel grid (w-major,
   the centre left out with remove_center) and the offsets, the grid and
   offsets times offset_scale; normalise by the padded size for
   GridSample's align_corners=0.
3. GridSample (bilinear, zeros) over the N*G images, times the mask, and a
   ReduceSum over the P points; back to (N, Ho, Wo, G*D).

DCNv4 first cuts offset_mask into its offsets and mask (Slice, Reshape).
Every size is read from the tensors in the graph, so the batch, H and W may
all be dynamic; G, D, the kernel and the other scalars are the call's
constants. float16 and bfloat16 graphs build the sampling grid in float32
(bfloat16 ones also pad, sample and sum in float32, then round: onnxruntime
has no bfloat16 Pad or GridSample);
float64 graphs in float64.

``"tensorrt"``: one ``mmdeploy::TRTDCNv3`` node (inputs input, offset, mask;
int attributes kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
dilation_h, dilation_w, group, group_channels, im2col_step, remove_center and
the float offset_scale), as InternImage's ``DCNv3Function.symbolic`` writes
it, for the TensorRT plugin InternImage ships to be built into mmdeploy.
That plugin computes float32 only, gets its output size right for stride 1
only and ignores remove_center: exporting anything else this way raises
:class:`cudcn.ArgumentError`. DCNv4 goes the same way, its offset_mask cut
into offsets and mask first. Nothing here runs such a graph (onnxruntime
has no TRTDCNv3).
"""

from __future__ import annotations

from typing import Any

from cudcn.dcnv3_geometry import SCALARS
from cudcn.errors import ArgumentError

#: How :func:`cudcn.torch.onnx_translation_table` may write DCNv3 and DCNv4.
ROUTES = ("onnx", "tensorrt")


class _Call:
    """One call's scalars (kernel_h .. remove_center) by name, plus P."""

    def __init__(self, scalars: tuple) -> None:
        for name, value in zip(SCALARS, scalars):
            setattr(self, name, value)
        self.remove_center = bool(self.remove_center)
        self.points = self.kernel_h * self.kernel_w - int(self.remove_center)

    def kernel_grid(self) -> tuple[list[float], list[float]]:
        """(x, y) of each point around the reference point, before offset_scale:
        column i outer, row j inner, the centre left out with remove_center."""
        c_w = self.dilation_w * (self.kernel_w - 1) // 2
        c_h = self.dilation_h * (self.kernel_h - 1) // 2
        centre = (self.kernel_w // 2, self.kernel_h // 2)
        grid = [(i, j) for i in range(self.kernel_w) for j in range(self.kernel_h)
                if not (self.remove_center and (i, j) == centre)]
        return [float(i * self.dilation_w - c_w) for i, _ in grid], [float(j * self.dilation_h - c_h) for _, j in grid]


def _opset_version() -> int | None:
    """The opset torch's exporter is writing (None when it does not say)."""
    import onnxscript

    return getattr(getattr(onnxscript.evaluator.default(), "opset", None), "version", None)


def _ints(op, values: list[int]):
    return op.Constant(value_ints=[int(v) for v in values])


def _floats(op, values: list[float], like):
    return op.CastLike(op.Constant(value_floats=[float(v) for v in values]), like)


def _size(op, tensor, axis: int):
    """tensor.shape[axis] as a 1-element int64 tensor (dynamic sizes too)."""
    return op.Shape(tensor, start=axis, end=axis + 1)


def _points(op, call: _Call, offset, grid_like, padded):
    """GridSample's grid (N, Ho, Wo, G, P, 2) from offset (N, Ho, Wo, G, P, 2)
    ((x, y) pairs), in padded pixels normalised for align_corners=0:
    (2*pixel + 1) / padded size - 1."""
    offset = op.CastLike(offset, grid_like)
    zero, one, two = (op.Squeeze(_floats(op, [v], grid_like)) for v in (0.0, 1.0, 2.0))
    scale = _floats(op, [call.offset_scale], grid_like)
    grid_x, grid_y = call.kernel_grid()
    last = _ints(op, [5])
    coordinates = []
    for component, axis, stride, dilation, kernel, grid in (
        (0, 2, call.stride_w, call.dilation_w, call.kernel_w, grid_x),  # x: along Wo
        (1, 1, call.stride_h, call.dilation_h, call.kernel_h, grid_y),  # y: along Ho
    ):
        count = op.CastLike(op.Squeeze(_size(op, offset, axis)), grid_like)
        centre = _floats(op, [dilation * (kernel - 1) // 2], grid_like)
        reference = op.Add(op.Mul(op.Range(zero, count, one), _floats(op, [stride], grid_like)), centre)
        # (1, 1, Wo, 1, 1) or (1, Ho, 1, 1, 1), against (N, Ho, Wo, G, P).
        reference = op.Reshape(reference, _ints(op, [1, 1, -1, 1, 1] if axis == 2 else [1, -1, 1, 1, 1]))
        shift = op.Squeeze(op.Slice(offset, _ints(op, [component]), _ints(op, [component + 1]), last), last)
        pixel = op.Add(reference, op.Mul(op.Add(_floats(op, grid, grid_like), shift), scale))
        extent = op.CastLike(_size(op, padded, axis), grid_like)  # the padded W or H
        coordinates.append(op.Sub(op.Div(op.Add(op.Mul(pixel, two), one), extent), one))
    return op.Concat(*(op.Unsqueeze(c, last) for c in coordinates), axis=5)


def _standard(call: _Call, input, offset, mask):
    """The standard-ops graph for input (N, H, W, G*D), offset (N, Ho, Wo, G, P, 2)
    and mask (N, Ho, Wo, G, P): output (N, Ho, Wo, G*D)."""
    from onnxscript import opset16 as op

    import onnx

    version = _opset_version()
    G, D, P = call.group, call.group_channels, call.points
    # onnxruntime has no bfloat16 Pad or GridSample: a bfloat16 graph pads, samples and sums in float32.
    bfloat16 = input.dtype == onnx.TensorProto.BFLOAT16
    source = op.Cast(input, to=onnx.TensorProto.FLOAT) if bfloat16 else input
    padded = op.Pad(source, _ints(op, [0, call.pad_h, call.pad_w, 0, 0, call.pad_h, call.pad_w, 0]))
    n, out_h, out_w = (_size(op, offset, axis) for axis in range(3))
    # N*G images of D channels: (N*G, D, Hp, Wp).
    images = op.Reshape(op.Transpose(op.Reshape(padded, _ints(op, [0, 0, 0, G, D])), perm=[0, 3, 4, 1, 2]),
                        op.Concat(op.Mul(n, _ints(op, [G])), _ints(op, [D]), _size(op, padded, 1),
                                  _size(op, padded, 2), axis=0))
    # The grid in float32, or float64 for a float64 graph.
    grid_like = input if input.dtype == onnx.TensorProto.DOUBLE else op.Constant(value_float=0.0)
    points = _points(op, call, offset, grid_like, padded)  # (N, Ho, Wo, G, P, 2)
    wide = op.Concat(op.Mul(n, _ints(op, [G])), out_h, op.Mul(out_w, _ints(op, [P])), _ints(op, [2]), axis=0)
    points = op.Reshape(op.Transpose(points, perm=[0, 3, 1, 2, 4, 5]), wide)  # (N*G, Ho, Wo*P, 2)
    # GridSample-20 renamed "bilinear" to "linear" (torch's exporter writes opset 18 or later).
    mode = "linear" if version is not None and version >= 20 else "bilinear"
    samples = op.GridSample(images, points, align_corners=0, mode=mode, padding_mode="zeros")  # (N*G, D, Ho, Wo*P)
    weights = op.Reshape(op.Transpose(mask, perm=[0, 3, 1, 2, 4]),
                         op.Concat(op.Mul(n, _ints(op, [G])), _ints(op, [1]), out_h, op.Mul(out_w, _ints(op, [P])), axis=0))
    weighted = op.Reshape(op.Mul(samples, op.CastLike(weights, samples)),
                          op.Concat(n, _ints(op, [G, D]), out_h, out_w, _ints(op, [P]), axis=0))
    summed = op.ReduceSum(weighted, _ints(op, [5]), keepdims=0)  # (N, G, D, Ho, Wo)
    out = op.Transpose(summed, perm=[0, 3, 4, 1, 2])  # (N, Ho, Wo, G, D)
    out = op.Reshape(out, op.Concat(n, out_h, out_w, _ints(op, [G * D]), axis=0))
    return op.CastLike(out, input) if bfloat16 else out


def _split(op, call: _Call, offset_mask):
    """DCNv4's offset_mask (N, Ho, Wo, K8) as offset (N, Ho, Wo, G, P, 2) and
    mask (N, Ho, Wo, G, P): per group [2P offsets | P mask], then padding."""
    G, P = call.group, call.points
    used = op.Slice(offset_mask, _ints(op, [0]), _ints(op, [G * 3 * P]), _ints(op, [3]))
    blocks = op.Reshape(used, _ints(op, [0, 0, 0, G, 3 * P]))
    offset = op.Reshape(op.Slice(blocks, _ints(op, [0]), _ints(op, [2 * P]), _ints(op, [4])),
                        _ints(op, [0, 0, 0, G, P, 2]))
    mask = op.Slice(blocks, _ints(op, [2 * P]), _ints(op, [3 * P]), _ints(op, [4]))
    return offset, mask


# --------------------------------------------------------------------------
# The TensorRT route: mmdeploy::TRTDCNv3
# --------------------------------------------------------------------------

#: TRTDCNv3's int attributes, in the order InternImage's symbolic writes them.
_TRT_INT_ATTRIBUTES = ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h",
                       "dilation_w", "group", "group_channels", "im2col_step", "remove_center")


def _trt_opset():
    """The ``mmdeploy`` opset with TRTDCNv3's schema, registered with onnx on
    first use (onnxscript records a node only for an op it has a schema of)."""
    import onnxscript
    from onnx import defs

    if not defs.has("TRTDCNv3", "mmdeploy"):
        parameter, attribute = defs.OpSchema.FormalParameter, defs.OpSchema.Attribute
        kind = defs.OpSchema.AttrType
        defs.register_schema(defs.OpSchema(
            "TRTDCNv3", "mmdeploy", 1,
            doc="InternImage's DCNv3 as mmdeploy's TensorRT plugin TRTDCNv3 computes it (float32).",
            inputs=[parameter("input", "T"), parameter("offset", "T"), parameter("mask", "T")],
            outputs=[parameter("output", "T")],
            type_constraints=[("T", ["tensor(float)"], "float32 only, as the plugin")],
            attributes=[attribute(name, kind.INT, "") for name in _TRT_INT_ATTRIBUTES]
            + [attribute("offset_scale", kind.FLOAT, "")],
        ))
    return onnxscript.values.Opset("mmdeploy", 1)


def _trt_node(call: _Call, input, offset, mask):
    import onnx

    problems = []
    if input.dtype != onnx.TensorProto.FLOAT:
        problems.append(f"float32 only (got {onnx.TensorProto.DataType.Name(input.dtype)})")
    if (call.stride_h, call.stride_w) != (1, 1):
        problems.append(f"stride 1 only: its output size is wrong for others (got ({call.stride_h}, {call.stride_w}))")
    if call.remove_center:
        problems.append("no remove_center: the plugin ignores it and samples the centre")
    if problems:
        raise ArgumentError("the TensorRT route (mmdeploy::TRTDCNv3) cannot express this call: "
                            + "; ".join(problems) + "; export with dcnv3='onnx' instead")
    attributes = {name: int(getattr(call, name)) for name in _TRT_INT_ATTRIBUTES}
    return _trt_opset().TRTDCNv3(input, offset, mask, offset_scale=float(call.offset_scale), **attributes)


# --------------------------------------------------------------------------
# The translation functions
# --------------------------------------------------------------------------


def _dcnv3_standard(input, offset, mask, *scalars):
    """input, offset, mask, then the op's scalars (kernel_h .. remove_center)."""
    from onnxscript import opset16 as op

    call = _Call(scalars)
    G, P = call.group, call.points
    return _standard(call, input, op.Reshape(offset, _ints(op, [0, 0, 0, G, P, 2])),
                     op.Reshape(mask, _ints(op, [0, 0, 0, G, P])))


def _dcnv4_standard(input, offset_mask, *scalars):
    from onnxscript import opset16 as op

    call = _Call(scalars)
    return _standard(call, input, *_split(op, call, offset_mask))


def _dcnv3_tensorrt(input, offset, mask, *scalars):
    return _trt_node(_Call(scalars), input, offset, mask)


def _dcnv4_tensorrt(input, offset_mask, *scalars):
    from onnxscript import opset16 as op

    call = _Call(scalars)
    offset, mask = _split(op, call, offset_mask)
    G, P = call.group, call.points
    return _trt_node(call, input, op.Reshape(offset, _ints(op, [0, 0, 0, G * P * 2])),
                     op.Reshape(mask, _ints(op, [0, 0, 0, G * P])))


def dcnv3_translation_table(route: str = "onnx") -> dict[Any, Any]:
    """``cudcn::dcnv3`` and ``cudcn::dcnv4`` for torch's dynamo exporter, by ``route``
    ("onnx" or "tensorrt"; see the module docstring)."""
    import torch

    if route not in ROUTES:
        raise ArgumentError(f"dcnv3 must be one of {', '.join(map(repr, ROUTES))}, got {route!r}")
    functions = {"onnx": (_dcnv3_standard, _dcnv4_standard), "tensorrt": (_dcnv3_tensorrt, _dcnv4_tensorrt)}
    dcnv3, dcnv4 = functions[route]
    return {torch.ops.cudcn.dcnv3.default: dcnv3, torch.ops.cudcn.dcnv4.default: dcnv4}
