"""torch adapter: ``cudcn.torch.deform_conv2d``, ``ms_deform_attn``, ``dcnv3``, ``dcnv4``
and drop-in modules.

A drop-in for ``torchvision.ops.deform_conv2d`` and ``torchvision.ops.DeformConv2d``,
plus the DCNv1/DCNv2 "pack" layers that predict their own offsets (mmcv's
conventions) and a CoordConv layer; multi-scale deformable attention as
Deformable DETR's/mmcv's function (:func:`ms_deform_attn`), as mmcv's module
(:class:`MultiScaleDeformableAttention`) and as HF transformers' layer
forward (:func:`hf_ms_deform_attn_forward`); docs/msda.md tells the MSDA
specifics (level sizes read on the host, autocast, export routes). Importing
this module imports torch; ``import cudcn`` alone never does.

How a call runs:

- The function is the custom op ``cudcn::deform_conv2d`` (torch.library), with
  a fake implementation and an autograd formula, so ``torch.compile`` captures
  it whole and ``torch.library.opcheck`` passes. Its backward is the custom op
  ``cudcn::deform_conv2d_backward``.
- CUDA tensors go to CuPy through DLPack without copies (beyond making inputs
  contiguous), on the tensor's device and torch's current stream, and the CUDA
  backend runs there. CuPy allocates from torch's caching allocator during the
  call, so outputs and workspace are torch memory. Nothing waits on the host.
  Those outputs are owned through DLPack rather than by torch's allocator, so
  ``Tensor.record_stream`` does nothing on them: to use a result on another
  stream, synchronise the streams (or copy it into a tensor torch allocated).
- CPU tensors go to NumPy through DLPack without copies and the NumPy backend
  runs, so the adapter works, and is tested, without a GPU. NumPy has no
  bfloat16: a CPU bfloat16 call is computed from float32 copies made by torch
  and its results are rounded back to bfloat16.

Precision and determinism:

- float16 and bfloat16 run in their own dtype on CUDA (the CUDA backend
  accumulates in float32).
- Under ``torch.autocast`` the function casts every float16/bfloat16/float32
  argument to the autocast dtype of the input's device (as autocast does for
  convolutions; float64 is left alone), so an fp16/bf16 activation meets an
  fp32 weight without a dtype error; the result has the autocast dtype.
  (torchvision instead runs its op in float32 under autocast.)
- The CUDA input gradient adds with atomics by default, so it varies in the
  last bits from run to run. With ``torch.use_deterministic_algorithms(True)``
  (``warn_only`` or not), or with cudcn's own setting in force when the
  forward is called (``with cudcn.deterministic_algorithms(): y = layer(x)``),
  the backward runs under ``cudcn.deterministic_algorithms(True)``: the CUDA
  backend then takes its sorted, atomic-free input gradient, and every
  gradient is bitwise repeatable. cudcn's setting is read at the forward
  because autograd runs a CUDA backward in its own thread, where a
  ``with`` block around ``.backward()`` alone is not visible. The forward, the other gradients and the whole CPU path are
  deterministic anyway.
- float32 GEMMs on CUDA use TF32 (tensor cores, operands rounded to 10
  significand bits: about 1e-3 relative error) when torch allows TF32 for
  float32 matmuls (``torch.set_float32_matmul_precision("high")``,
  ``torch.backends.cuda.matmul.allow_tf32 = True``; read where the op runs)
  or cudcn's setting (``cudcn.tf32()``) is in force at the forward call.
  Off by default, as in torch.
- cudcn's algorithm (``cudcn.algorithm``) and workspace budget
  (``cudcn.workspace_bytes``) in force at the forward call hold for its
  backward too, for the same reason.
- Double backward is not supported: differentiating gradients taken with
  ``create_graph=True`` raises :class:`cudcn.UnsupportedError`.

Leaving Python: TorchScript compiles the function and the modules to calls of
the op; torch.export captures the op (a dynamic batch works); ONNX export
writes the standard ``DeformConv`` node, through
:func:`onnx_translation_table` (dynamo exporter) or the symbolic registered
at import (legacy exporter). Multi-scale deformable attention exports the
same two ways as standard ops (GridSample per level), or as TensorRT's
plugin node; torch.export and torch.compile capture its op with a dynamic
batch and number of queries (TorchScript does not take it).
DCNv3 and DCNv4 export as standard ops around ``GridSample`` (dynamo
exporter; :mod:`cudcn.torch.dcnv3_export`).

Where things are (``cudcn/torch/``):

- ``__init__.py``: the public names (and, without torch, an error that
  names the extra to install).
- ``_bridge.py``: what every op needs whatever its family: tensor checks,
  data-less NumPy stand-ins of (fake) tensors for the core's validation,
  DLPack to CuPy/NumPy arrays and back, torch's allocator and stream for
  CuPy, cudcn's settings carried from a forward to its backward, autocast.
- ``functional.py``: the custom ops (``torch.library``), their fake
  implementations and autograd, and the public functions
  (:func:`deform_conv2d`, :func:`ms_deform_attn`,
  :func:`hf_ms_deform_attn_forward`).
- ``dcnv3.py``: the same for InternImage's DCNv3 and FlashInternImage's
  DCNv4 operators, :func:`dcnv3` and :func:`dcnv4` (channels-last, no
  weight: the depthwise sampling core of the DCNv3/DCNv4 modules).
- ``modules.py``: the nn.Modules.
- ``dcnv3_modules.py``: the DCNv3 and DCNv4 modules (InternImage's and
  FlashInternImage's drop-ins).
- ``export.py``: ONNX export (the dynamo translation table, and the legacy
  exporter's symbolics, registered when ``cudcn.torch`` is imported);
  ``dcnv3_export.py``: DCNv3 and DCNv4's entries in that table.
"""

from cudcn.errors import import_framework

import_framework("torch", "torch")  # without torch, an error that names cudcn's extra

from cudcn.torch.dcnv3 import dcnv3, dcnv4  # noqa: E402
from cudcn.torch.dcnv3_modules import DCNv3, DCNv4  # noqa: E402
from cudcn.torch.export import ONNX_MIN_OPSET, onnx_translation_table  # noqa: E402
from cudcn.torch.functional import deform_conv2d, hf_ms_deform_attn_forward, ms_deform_attn  # noqa: E402
from cudcn.torch.modules import (  # noqa: E402
    CoordConv2d,
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2dPack,
    MultiScaleDeformableAttention,
    coordinate_channels,
    sampling_locations,
)

__all__ = [
    "CoordConv2d",
    "DCNv3",
    "DCNv4",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "MultiScaleDeformableAttention",
    "dcnv3",
    "dcnv4",
    "deform_conv2d",
    "hf_ms_deform_attn_forward",
    "ms_deform_attn",
    "onnx_translation_table",
    "sampling_locations",
]
