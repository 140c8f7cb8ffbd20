"""ONNX export: deformable convolution as the standard ONNX ``DeformConv``
node; multi-scale deformable attention as standard ONNX ops (GridSample per
level, Mul, ReduceSum, ...), or as TensorRT's plugin node on request.

For the dynamo exporter through :func:`onnx_translation_table`; for the
legacy exporter through symbolics registered when this module is imported
(``import cudcn.torch`` imports it). DCNv3 and DCNv4 (dynamo exporter only):
:mod:`cudcn.torch.dcnv3_export`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from cudcn.errors import ArgumentError


# --------------------------------------------------------------------------
# ONNX export: the op as ONNX DeformConv
# --------------------------------------------------------------------------

#: The first ONNX opset with DeformConv.
ONNX_MIN_OPSET = 19


_DEFORM_CONV_STATIC = "to export to ONNX DeformConv (its group and offset_group attributes come from it)"


def _static_size(shape: Any, index: int, name: str, purpose: str = _DEFORM_CONV_STATIC) -> int:
    """shape[index] as an int, or an error saying that export needs it fixed."""
    size = None if shape is None else shape[index]
    if not isinstance(size, int):
        raise ArgumentError(f"{name} must be static {purpose}, got {size}")
    return size


def _onnx_attributes(
    input_shape: Any, offset_shape: Any, weight_shape: Any,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], opset: int | None,
) -> dict[str, Any]:
    """ONNX DeformConv's attributes for one call of the op, from its shapes
    (ints, or None / symbols where dynamic) and conv arguments.

    Raises ArgumentError for what DeformConv, as onnxruntime runs it, cannot
    express: an opset before 19, a dynamic channel or kernel size, a weight
    with 0 output channels, (H + 1) * W above 2**31 - 1.
    """
    if opset is not None and opset < ONNX_MIN_OPSET:
        raise ArgumentError(f"ONNX DeformConv needs opset_version >= {ONNX_MIN_OPSET}, got {opset}")
    in_channels = _static_size(input_shape, 1, "input.shape[1] (C_in)")
    offset_channels = _static_size(offset_shape, 1, "offset.shape[1]")
    out_channels, per_group, kernel_h, kernel_w = (
        _static_size(weight_shape, i, f"weight.shape[{i}]") for i in range(4)
    )
    if out_channels == 0:
        raise ArgumentError(
            "weight.shape[0] (C_out) must be >= 1 to export to ONNX DeformConv "
            "(onnxruntime rejects 0 output channels), got 0"
        )
    height, width = input_shape[2], input_shape[3]
    if isinstance(height, int) and isinstance(width, int) and (height + 1) * width > 2**31 - 1:
        raise ArgumentError(
            f"input (H, W) = ({height}, {width}) is too large for onnxruntime's DeformConv, "
            f"which needs (H + 1) * W <= 2**31 - 1"
        )
    return dict(
        strides=[int(v) for v in stride],
        pads=[int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])],
        dilations=[int(v) for v in dilation],
        group=in_channels // per_group,
        offset_group=offset_channels // (2 * kernel_h * kernel_w),
        kernel_shape=[kernel_h, kernel_w],
    )


def _exporter_opset() -> int | None:
    """The opset of the graph torch's dynamo exporter is recording."""
    import onnxscript

    return getattr(getattr(onnxscript.evaluator.default(), "opset", None), "version", None)


def _deform_conv2d_onnx(input, offset, weight, bias, mask, stride, padding, dilation):
    """torch.onnx's dynamo exporter: ``cudcn::deform_conv2d`` as one DeformConv node
    (inputs X, W, offset, then B and mask when the call has them)."""
    from onnxscript import opset19 as op

    opset = _exporter_opset()
    attributes = _onnx_attributes(input.shape, offset.shape, weight.shape, stride, padding, dilation, opset)
    return op.DeformConv(input, weight, offset, bias, mask, **attributes)


def onnx_translation_table(ms_deform_attn: str = "onnx", *, dcnv3: str = "onnx") -> dict[Any, Any]:
    """cudcn's ops for torch's dynamo exporter.

    ``torch.onnx.export(model, args, f, dynamo=True,
    custom_translation_table=cudcn.torch.onnx_translation_table())`` exports

    - every call of :func:`deform_conv2d` (and so of the modules) as a
      standard ``DeformConv`` node (opset >= 19);
    - every call of :func:`ms_deform_attn` (and so of
      :class:`MultiScaleDeformableAttention` and of transformers' layer
      patched with :func:`hf_ms_deform_attn_forward`) as standard ops that
      onnxruntime runs (``ms_deform_attn="onnx"``, opset >= 16: one
      GridSample per level, see :func:`_msda_graph`), or as one node of
      TensorRT's ``MultiscaleDeformableAttnPlugin_TRT``
      (``ms_deform_attn="tensorrt"``, for TensorRT only: see
      :func:`_msda_tensorrt_graph`);
    - every call of :func:`cudcn.torch.dcnv3` and :func:`cudcn.torch.dcnv4`
      (and so of the DCNv3/DCNv4 modules) as standard ops (Pad, GridSample,
      Mul, ReduceSum; opset >= 16) that onnxruntime runs (``dcnv3="onnx"``),
      or as the ``mmdeploy::TRTDCNv3`` custom node of InternImage's TensorRT
      plugin (``dcnv3="tensorrt"``: float32, stride 1, no remove_center).
      See :mod:`cudcn.torch.dcnv3_export`.

    Needs onnxscript (torch's exporter needs it anyway).
    """
    from cudcn.torch.dcnv3_export import dcnv3_translation_table

    routes = {"onnx": _ms_deform_attn_onnx, "tensorrt": _ms_deform_attn_tensorrt}
    if ms_deform_attn not in routes:
        raise ArgumentError(f"ms_deform_attn must be one of {', '.join(map(repr, routes))}, got {ms_deform_attn!r}")
    return {
        torch.ops.cudcn.deform_conv2d.default: _deform_conv2d_onnx,
        torch.ops.cudcn.ms_deform_attn.default: routes[ms_deform_attn],
        **dcnv3_translation_table(dcnv3),
    }


def _deform_conv2d_symbolic(g, input, offset, weight, bias, mask, stride, padding, dilation):
    """torch.onnx's legacy (TorchScript, dynamo=False) exporter: the same DeformConv node.

    stride, padding and dilation arrive as lists of ints (parse_args below).
    """
    # The traced node's shapes: ONNX shape inference can lose static channel
    # counts (a Concat under a dynamic batch) that the trace still knows.
    traced = g.original_node
    shapes = [traced.inputsAt(i).type().varyingSizes() for i in range(3)]  # input, offset, weight
    attributes = _onnx_attributes(*shapes, stride, padding, dilation, g.opset)
    inputs = [input, weight, offset]
    if not mask.node().mustBeNone():
        inputs += [bias, mask]  # an absent bias stays an empty input
    elif not bias.node().mustBeNone():
        inputs.append(bias)
    return g.op("DeformConv", *inputs, **{f"{key}_i": value for key, value in attributes.items()})


# The legacy exporter is deprecated; where a torch no longer has it, nothing to register.
if hasattr(torch.onnx, "register_custom_op_symbolic"):
    from torch.onnx.symbolic_helper import parse_args

    torch.onnx.register_custom_op_symbolic(
        "cudcn::deform_conv2d",
        parse_args("v", "v", "v", "v", "v", "is", "is", "is")(_deform_conv2d_symbolic),
        ONNX_MIN_OPSET,
    )


# --------------------------------------------------------------------------
# ONNX export: multi-scale deformable attention
# --------------------------------------------------------------------------

#: The first ONNX opset with GridSample (the legacy exporter refuses a lower one).
MSDA_MIN_OPSET = 16

#: ONNX's int64 and int32 (TensorProto data types).
_INT64, _INT32 = 7, 6

#: TensorRT's MSDA plugin (the node's op_type), the custom domain the node
#: is put in (TensorRT's ONNX parser finds plugins by op_type alone) and the
#: plugin version asked for (2: IPluginV3).
TRT_PLUGIN, TRT_DOMAIN, TRT_PLUGIN_VERSION = "MultiscaleDeformableAttnPlugin_TRT", "trt.plugins", "2"

_MSDA_STATIC = "to export multi-scale deformable attention to ONNX (the graph's reshapes fix it)"


def _msda_sizes(value_shape: Any, locations_shape: Any) -> tuple[int, int, int, int]:
    """(M, D, L, P): export fixes them (they are a model's architecture)."""
    return (
        _static_size(value_shape, 2, "value.shape[2] (M, the heads)", _MSDA_STATIC),
        _static_size(value_shape, 3, "value.shape[3] (D, the channels per head)", _MSDA_STATIC),
        _static_size(locations_shape, 3, "sampling_locations.shape[3] (L, the levels)", _MSDA_STATIC),
        _static_size(locations_shape, 4, "sampling_locations.shape[4] (P, the points)", _MSDA_STATIC),
    )


def _ints(op: Any, part: Any) -> Any:
    """A list of ints (or an int) as an ONNX int64 constant; an ONNX value as it is."""
    if isinstance(part, int):
        part = [part]
    return op.Constant(value_ints=part) if isinstance(part, list) else part


def _concat(op: Any, *parts: Any) -> Any:
    """int64 parts (ints, lists of ints, or ONNX values of shape (k,)) end to
    end: a list where all are known, else an ONNX value."""
    if all(isinstance(part, (int, list)) for part in parts):
        return [x for part in parts for x in ([part] if isinstance(part, int) else part)]
    return op.Concat(*(_ints(op, part) for part in parts), axis=0)


def _add(op: Any, a: Any, b: Any) -> Any:
    return a + b if isinstance(a, int) and isinstance(b, int) else op.Add(_ints(op, a), _ints(op, b))


def _mul(op: Any, a: Any, b: Any) -> Any:
    return a * b if isinstance(a, int) and isinstance(b, int) else op.Mul(_ints(op, a), _ints(op, b))


def _level_sizes(op: Any, spatial_shapes: Any, level_start_index: Any, level_shapes: Any,
                 levels: int) -> list[tuple[Any, Any, Any]]:
    """(H_l, W_l, s_l) of each level: ints where export knows them (the op's
    level_shapes), else int64 ONNX values of shape (1,) (read from the level
    tensors, or torch.export's symbols for sizes it keeps dynamic)."""
    if level_shapes is None:
        flat = op.Reshape(op.Cast(spatial_shapes, to=_INT64), _ints(op, -1))
        starts = op.Cast(level_start_index, to=_INT64)

        def pick(t: Any, i: int) -> Any:
            return op.Slice(t, _ints(op, i), _ints(op, i + 1))

        return [(pick(flat, 2 * l), pick(flat, 2 * l + 1), pick(starts, l)) for l in range(levels)]
    if len(level_shapes) != 2 * levels:
        raise ArgumentError(
            f"level_shapes must hold 2*L = {2 * levels} sizes (L from sampling_locations.shape[3]), "
            f"got {len(level_shapes)}"
        )
    sizes = [size if isinstance(size, int) else op.Reshape(size, _ints(op, 1)) for size in level_shapes]
    result, start = [], 0
    for l in range(levels):
        height, width = sizes[2 * l], sizes[2 * l + 1]
        result.append((height, width, start))
        start = _add(op, start, _mul(op, height, width))
    return result


def _msda_graph(op: Any, shapes: tuple[Any, Any], value: Any, spatial_shapes: Any, level_start_index: Any,
                sampling_locations: Any, attention_weights: Any, level_shapes: Any, opset: int) -> Any:
    """Multi-scale deformable attention in standard ONNX ops, as
    ``ms_deform_attn_core_pytorch`` computes it: per level, the value's
    pixels as images (N*M, D, H_l, W_l) sampled by GridSample
    (align_corners=0, zeros: pixel x*W_l - 0.5, as the op) at the
    level's locations, (N*M, Lq, P, 2) mapped to [-1, 1]; then the samples
    of all levels times the weights, summed over (level, point).

    ``op`` makes the nodes: an onnxscript opset (dynamo exporter) or
    :class:`_LegacyOps` (legacy exporter); ``shapes`` are value's and
    sampling_locations' (ints, or None or symbols where dynamic). The batch
    and the queries stay dynamic; M, D, L and P are fixed; the level sizes
    are constants where the op has them as ints, else computed in the graph.
    """
    heads, channels, levels, points = _msda_sizes(*shapes)
    dtype_of = sampling_locations
    two = op.CastLike(op.Constant(value_float=2.0), dtype_of)
    one = op.CastLike(op.Constant(value_float=1.0), dtype_of)
    grids = op.Transpose(op.Sub(op.Mul(sampling_locations, two), one), perm=[0, 2, 1, 3, 4, 5])  # (N, M, Lq, L, P, 2)
    queries = op.Shape(sampling_locations, start=1, end=2)
    grid_shape = op.Concat(_ints(op, -1), queries, _ints(op, [points, 2]), axis=0)
    mode = "bilinear" if opset < 20 else "linear"  # GridSample-20 renamed the mode
    samples = []
    for l, (height, width, start) in enumerate(_level_sizes(op, spatial_shapes, level_start_index,
                                                            level_shapes, levels)):
        end = _add(op, start, _mul(op, height, width))
        pixels = op.Slice(value, _ints(op, start), _ints(op, end), _ints(op, 1))  # (N, H_l*W_l, M, D)
        image_shape = _ints(op, _concat(op, [-1, channels], height, width))
        images = op.Reshape(op.Transpose(pixels, perm=[0, 2, 3, 1]), image_shape)  # (N*M, D, H_l, W_l)
        grid = op.Reshape(op.Gather(grids, op.Constant(value_int=l), axis=3), grid_shape)  # (N*M, Lq, P, 2)
        samples.append(op.GridSample(images, grid, align_corners=0, mode=mode, padding_mode="zeros"))
    weights_shape = op.Concat(_ints(op, [-1, 1]), queries, _ints(op, levels * points), axis=0)
    weights = op.Reshape(op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4]), weights_shape)  # (N*M, 1, Lq, L*P)
    samples = op.Concat(*samples, axis=3) if levels > 1 else samples[0]  # (N*M, D, Lq, L*P)
    out = op.ReduceSum(op.Mul(samples, weights), _ints(op, 3), keepdims=0)  # (N*M, D, Lq)
    out = op.Reshape(out, _ints(op, [-1, heads * channels, 0]))  # (N, M*D, Lq): 0 keeps Lq
    return op.Transpose(out, perm=[0, 2, 1])


def _msda_tensorrt_graph(op: Any, plugin: Any, shapes: tuple[Any, Any], value: Any, spatial_shapes: Any,
                         level_start_index: Any, sampling_locations: Any, attention_weights: Any,
                         level_shapes: Any) -> Any:
    """One ``MultiscaleDeformableAttnPlugin_TRT`` node (``plugin`` makes it):
    inputs value, spatial_shapes and level_start_index as INT32 (TensorRT's
    plugin wants them so), sampling_locations, attention_weights; its output
    (N, Lq, M, D) reshaped to the op's (N, Lq, M*D)."""
    levels = _msda_sizes(*shapes)[2]
    if level_shapes is not None:
        sizes = _level_sizes(op, None, None, level_shapes, levels)
        spatial_shapes = op.Reshape(_ints(op, _concat(op, *(s for h, w, _ in sizes for s in (h, w)))),
                                    _ints(op, [levels, 2]))
        level_start_index = _ints(op, _concat(op, *(start for _, _, start in sizes)))
    out = plugin(value, op.Cast(spatial_shapes, to=_INT32), op.Cast(level_start_index, to=_INT32),
                 sampling_locations, attention_weights)  # (N, Lq, M, D)
    return op.Reshape(out, _ints(op, [0, 0, -1]))


def _msda_opset() -> tuple[Any, int]:
    """The onnxscript opset to record with, and the exporter's opset number
    (the dynamo exporter records opset 18 at least, whatever was asked)."""
    import onnxscript

    opset = _exporter_opset() or 20
    return (onnxscript.opset20 if opset >= 20 else onnxscript.opset16), opset


def _ms_deform_attn_onnx(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         im2col_step, level_shapes):
    """torch.onnx's dynamo exporter: ``cudcn::ms_deform_attn`` as standard ops (:func:`_msda_graph`)."""
    op, opset = _msda_opset()
    return _msda_graph(op, (value.shape, sampling_locations.shape), value, spatial_shapes, level_start_index,
                       sampling_locations, attention_weights, level_shapes, opset)


def _ms_deform_attn_tensorrt(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                             im2col_step, level_shapes):
    """torch.onnx's dynamo exporter: ``cudcn::ms_deform_attn`` as TensorRT's
    plugin node (:func:`_msda_tensorrt_graph`)."""
    import onnxscript

    op, _ = _msda_opset()
    if value.dtype is not None and value.dtype.name not in ("FLOAT", "FLOAT16"):
        raise ArgumentError(f"TensorRT's {TRT_PLUGIN} takes float32 or float16, got value of {value.dtype.name}")
    plugin = onnxscript.values.Op(onnxscript.values.Opset(TRT_DOMAIN, 1), TRT_PLUGIN, _trt_plugin_schema())

    def node(*inputs: Any) -> Any:
        return plugin(*inputs, plugin_version=TRT_PLUGIN_VERSION, plugin_namespace="")

    return _msda_tensorrt_graph(op, node, (value.shape, sampling_locations.shape), value, spatial_shapes,
                                level_start_index, sampling_locations, attention_weights, level_shapes)


def _trt_plugin_schema() -> Any:
    """The plugin node's ONNX schema, which onnxscript records nodes by: TensorRT's
    five inputs (float32 or float16, the level tensors INT32), its output
    (N, Lq, M, D) and its two optional string attributes."""
    from onnx.defs import OpSchema

    floating = "T"
    return OpSchema(
        TRT_PLUGIN, TRT_DOMAIN, 1,
        inputs=[
            OpSchema.FormalParameter("value", floating),
            OpSchema.FormalParameter("spatial_shapes", "tensor(int32)"),
            OpSchema.FormalParameter("level_start_index", "tensor(int32)"),
            OpSchema.FormalParameter("sampling_locations", floating),
            OpSchema.FormalParameter("attention_weights", floating),
        ],
        outputs=[OpSchema.FormalParameter("output", floating)],
        type_constraints=[(floating, ["tensor(float)", "tensor(float16)"], "the plugin's float types")],
        attributes=[
            OpSchema.Attribute("plugin_version", OpSchema.AttrType.STRING, "the plugin's version"),
            OpSchema.Attribute("plugin_namespace", OpSchema.AttrType.STRING, "the plugin's namespace"),
        ],
    )


class _LegacyOps:
    """The legacy exporter's graph context as an onnxscript-like opset, so
    that :func:`_msda_graph` serves both exporters: ``ops.Name(*inputs,
    **attributes)`` adds a node, attributes typed by their Python values."""

    def __init__(self, g: Any) -> None:
        self.g = g

    def __getattr__(self, op_type: str) -> Any:
        def node(*inputs: Any, **attributes: Any) -> Any:
            if op_type == "Constant":
                ((kind, value),) = attributes.items()
                dtype = torch.float32 if kind == "value_float" else torch.int64
                return self.g.op("Constant", value_t=torch.tensor(value, dtype=dtype))
            typed = {f"{key}_{'s' if isinstance(value, str) else 'i'}": value for key, value in attributes.items()}
            return self.g.op(op_type, *inputs, **typed)

        return node


def _ms_deform_attn_symbolic(g, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                             im2col_step, level_shapes):
    """torch.onnx's legacy exporter: the standard-ops graph of :func:`_msda_graph`."""
    from torch.onnx import symbolic_helper

    traced = g.original_node
    shapes = tuple(traced.inputsAt(i).type().varyingSizes() for i in (0, 3))  # value, sampling_locations
    levels = None if level_shapes.node().mustBeNone() else symbolic_helper._parse_arg(level_shapes, "is")
    return _msda_graph(_LegacyOps(g), shapes, value, spatial_shapes, level_start_index, sampling_locations,
                       attention_weights, levels, g.opset)


if hasattr(torch.onnx, "register_custom_op_symbolic"):
    torch.onnx.register_custom_op_symbolic("cudcn::ms_deform_attn", _ms_deform_attn_symbolic, MSDA_MIN_OPSET)
