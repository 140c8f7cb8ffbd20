"""paddle adapter: ``cudcn.paddle.deform_conv2d``, ``ms_deform_attn``, ``dcnv3``, ``dcnv4``
and drop-in layers.

A drop-in for ``paddle.vision.ops.deform_conv2d`` and
``paddle.vision.ops.DeformConv2D``, plus the DCNv1/DCNv2 "pack" layers that
predict their own offsets and a CoordConv layer, mirroring :mod:`cudcn.torch`;
multi-scale deformable attention as a function (:func:`ms_deform_attn`,
dygraph only) and as mmcv's module (:class:`MultiScaleDeformableAttention`).
Importing this module imports paddle; ``import cudcn`` alone never does.

How a call runs (dygraph, paddle's default mode):

- Autograd goes through a ``paddle.autograd.PyLayer`` whose forward and
  backward call the core's :func:`cudcn.deform_conv2d` and
  :func:`cudcn.deform_conv2d_backward`.
- GPU tensors go to CuPy through DLPack without copies (beyond making inputs
  contiguous), on the tensor's device and paddle's current stream, and the
  CUDA backend runs there; results come back through DLPack. CuPy takes its
  memory (workspace and results) from paddle's allocator, as paddle tensors,
  so paddle sees and reuses it; CuPy's own memory pool is not used.
- CPU tensors go to NumPy through DLPack without copies and the NumPy backend
  runs. NumPy has no bfloat16: a CPU bfloat16 call is computed from float32
  copies and its results are rounded back to bfloat16.

Static graph (``paddle.jit.to_static``, ``paddle.jit.save``, or
``paddle.enable_static()``): the function checks the call as in dygraph and
then emits paddle's own ``deform_conv2d`` op into the graph, so a saved
model runs in ``paddle.jit.load`` and Paddle Inference without cudcn. The
results are paddle's op's: the same values (to rounding), but in that mode

- out_channels must be divisible by deformable_groups (paddle's op requires
  it; cudcn raises a ValueError naming both when the graph is built);
- the dtypes are those paddle's op has kernels for on the place (float32 and
  float64 on the CPU);
- a graph trained in static mode gets paddle's offset gradient at row or
  column -1 (0, see below);
- sizes the graph leaves unknown (-1, e.g. a batch or image size declared
  None in an InputSpec) are checked by paddle's op when the graph runs.

Differences from paddle's op: at a sampling point exactly on row or column
-1 the offset gradient is torchvision's one-sided slope towards row (column)
0, where paddle's op (like mmcv) returns 0; out_channels need not be
divisible by deformable_groups; float16 (and on GPU bfloat16) inputs run in their own
dtype; paddle's automatic mixed precision does not cast for this function, so
all floating arguments must share one dtype.

Double backward is not supported: differentiating gradients taken with
``create_graph=True`` raises cudcn.UnsupportedError in the backward, which
paddle hands on as an OSError carrying its message.

Errors name the arguments as paddle does (``x`` for the input): a malformed
call raises :class:`cudcn.ArgumentTypeError` (a TypeError: None or a wrong
type where a tensor or an int is required, e.g. ``groups=2.0``, as paddle's
op does) or :class:`cudcn.ArgumentError` (a ValueError: shapes, sizes,
stride/padding/dilation); both are also RuntimeErrors.

Where things are (``cudcn/paddle/``):

- ``__init__.py``: the public names (and, without paddle, an error that
  names the extra to install).
- ``_bridge.py``: what every op needs whatever its family: checks of int
  and tensor arguments, data-less NumPy stand-ins for the core's
  validation, DLPack to CuPy/NumPy arrays and back, paddle's memory and
  stream for CuPy.
- ``functional.py``: the autograd layers (``PyLayer``) and the public
  :func:`deform_conv2d` and :func:`ms_deform_attn`.
- ``dcnv3.py``: :func:`dcnv3` and :func:`dcnv4` (InternImage's DCNv3 and
  FlashInternImage's DCNv4 operators, channels-last), their autograd
  layers; dygraph only.
- ``dcnv3_layers.py``: the DCNv3 and DCNv4 layers (InternImage's and
  FlashInternImage's modules; dygraph only).
- ``_static.py``: the static-graph path (shapes paddle leaves unknown, and
  paddle's own op emitted into the graph).
- ``layers.py``: the layers.
"""

from cudcn.errors import import_framework

import_framework("paddle", "paddlepaddle")  # without paddle, an error that names cudcn's extra

from cudcn.paddle.dcnv3 import dcnv3, dcnv4  # noqa: E402
from cudcn.paddle.dcnv3_layers import DCNv3, DCNv4  # noqa: E402
from cudcn.paddle.functional import LAYOUTS, NAMES, deform_conv2d, ms_deform_attn  # noqa: E402
from cudcn.paddle.layers import (  # noqa: E402
    CoordConv2D,
    DeformConv2D,
    DeformConv2DPack,
    ModulatedDeformConv2DPack,
    MultiScaleDeformableAttention,
    coordinate_channels,
    sampling_locations,
)

__all__ = [
    "CoordConv2D",
    "DCNv3",
    "DCNv4",
    "DeformConv2D",
    "DeformConv2DPack",
    "ModulatedDeformConv2DPack",
    "MultiScaleDeformableAttention",
    "dcnv3",
    "dcnv4",
    "deform_conv2d",
    "ms_deform_attn",
    "sampling_locations",
]
