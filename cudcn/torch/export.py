"""ONNX export: cudcn's op as the standard ONNX ``DeformConv`` node.

For the dynamo exporter through :func:`onnx_translation_table`; for the
legacy exporter through a symbolic registered when this module is imported
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


def _static_size(shape: Any, index: int, name: str) -> int:
    """shape[index] as an int, or an error saying that export needs it fixed."""
    size = None if shape is None else shape[index]
    if not isinstance(size, int):
        raise ArgumentError(
            f"{name} must be static to export to ONNX DeformConv (its group and "
            f"offset_group attributes come from it), got {size}"
        )
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


def _deform_conv2d_onnx(input, offset, weight, bias, mask, stride, padding, dilation):
    """torch.onnx's dynamo exporter: ``cudcn::deform_conv2d`` as one DeformConv node
    (inputs X, W, offset, then B and mask when the call has them)."""
    import onnxscript
    from onnxscript import opset19 as op

    # The exporter records ops into a graph of its target opset.
    opset = getattr(getattr(onnxscript.evaluator.default(), "opset", None), "version", None)
    attributes = _onnx_attributes(input.shape, offset.shape, weight.shape, stride, padding, dilation, opset)
    return op.DeformConv(input, weight, offset, bias, mask, **attributes)


def onnx_translation_table(*, dcnv3: str = "standard") -> dict[Any, Any]:
    """cudcn's ops in ONNX, for torch's dynamo exporter.

    ``torch.onnx.export(model, args, f, dynamo=True,
    custom_translation_table=cudcn.torch.onnx_translation_table())`` exports
    every call of :func:`deform_conv2d` (and so of the modules) as a standard
    ``DeformConv`` node (opset >= 19). Needs onnxscript (torch's exporter
    needs it anyway).

    ``dcnv3`` says how :func:`cudcn.torch.dcnv3` and :func:`cudcn.torch.dcnv4`
    (and so the DCNv3/DCNv4 modules) are written: "standard", as standard
    ops (Pad, GridSample, Mul, ReduceSum; opset >= 16) that onnxruntime runs;
    "tensorrt", as the ``mmdeploy::TRTDCNv3`` custom node of InternImage's
    TensorRT plugin (float32, stride 1, no remove_center). See
    :mod:`cudcn.torch.dcnv3_export`.
    """
    table = {torch.ops.cudcn.deform_conv2d.default: _deform_conv2d_onnx}
    # ---- DCNv3 / DCNv4 (cudcn/torch/dcnv3_export.py) ----
    from cudcn.torch.dcnv3_export import dcnv3_translation_table

    table.update(dcnv3_translation_table(dcnv3))
    # ---- end DCNv3 / DCNv4 ----
    return table


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
