"""The column-free algorithm: implicit GEMM on tensor cores, no column buffer.

Forward (``kernels/dcn_fused_forward.cu``): a block of 128 threads owns 64
output pixels x 64 output channels of one convolution group. For each
kernel point and each slice of an offset group's channels (64 bytes: 32
channels in 16-bit types, 16 in float32), its threads copy the channels at
their pixels' four corners and the slice's weights by ``cp.async`` while
the warps multiply the previous slice, then blend bilinear x mask into a
swizzled shared-memory tile (the bilinear taps computed once per kernel
point and offset group, kept in registers across the slices) beside the
weight tile, and each of its 4 warps multiplies a 32 x 32 part into
float32 registers (``ldmatrix`` fragments); the epilogue adds the bias and
writes the NCHW output once. The operands are:

- float16: float16 tiles, ``mma.m16n8k16`` (sm_75 and newer);
- bfloat16: bfloat16 tiles, ``mma.m16n8k16`` (sm_80 and newer);
- float32 with :func:`cudcn.config.tf32` on (and sm_80 or newer): float32
  tiles, each value rounded to TF32 as its fragment is loaded,
  ``mma.m16n8k8``: about 1e-3 relative error, as the im2col path's TF32
  GEMM;
- float32 otherwise: the same tiles in float32, multiplied by scalar FMAs
  in float32 (full float32 precision, no tensor cores);
- float64: not here (the im2col path computes it).

Workspace: the kernel reads the input channels-last, so each chunk of
images is copied to (n, H*W, C) first; a chunk's copy stays under
1/:data:`STAGING_SHARE` of the workspace budget (at least one image), or
takes as many images as a launch of
:data:`~cudcn.backends.cuda.launchers.FUSED_TARGET_BLOCKS` blocks needs, up
to 1/:data:`TARGET_SHARE` of it (:func:`staging_chunks`). With the weight in
the kernel's layout (groups, K, O/groups, C/groups) that is all: a few
percent of the im2col path's workspace at the benchmark shapes
(tests/test_workspace.py). Every chunk is one launch; the batch need not
divide into chunks evenly (their sizes differ by one at most), and the
output is written in place.

Backward: :mod:`cudcn.backends.cuda.fused_backward` (the same operands and
capability rules; not with deterministic algorithms on, see there).
"""

from __future__ import annotations

from typing import Any

from cudcn import config
from cudcn.backends.cuda import fused_backward, kernels, launchers
from cudcn.backends.cuda.engine import Engine
from cudcn.geometry import Geometry

#: A chunk's channels-last copy stays under 1/STAGING_SHARE of the workspace
#: budget, or under 1/TARGET_SHARE where more images are needed to give a
#: launch FUSED_TARGET_BLOCKS blocks.
STAGING_SHARE = 128
TARGET_SHARE = 32

#: Compute capabilities the operand types need: float16 MMAs since sm_75,
#: bfloat16 and TF32 MMAs since sm_80.
F16_CAPABILITY = 75
BF16_TF32_CAPABILITY = 80


def applies(engine: Engine, geom: Geometry, direction: str) -> str | None:
    """None when the fused algorithm can run this call on the engine's device, else why not."""
    dtype = geom.dtype.name
    if dtype == "float64":
        return "float64 has no fused kernel: im2col computes it"
    if dtype == "bfloat16" and engine.capability < BF16_TF32_CAPABILITY:
        return f"bfloat16 MMAs need compute capability 8.0, this device has {_version(engine.capability)}"
    if dtype == "float16" and engine.capability < F16_CAPABILITY:
        return f"float16 MMAs need compute capability 7.5, this device has {_version(engine.capability)}"
    if direction == "backward":
        return fused_backward.why_not(geom) or launchers.fused_fits(geom)
    return launchers.fused_fits(geom)


def _version(capability: int) -> str:
    return f"{capability // 10}.{capability % 10}"


def tensor_cores(engine: Engine, geom: Geometry) -> bool:
    """Whether this call multiplies on tensor cores: not float32 without TF32
    (or on a device without TF32 MMAs), which takes scalar FMAs."""
    return not (geom.dtype.name == "float32"
                and not (config.is_tf32_enabled() and engine.capability >= BF16_TF32_CAPABILITY))


def kernel(engine: Engine, geom: Geometry) -> str:
    """The forward kernel for this call: tensor cores, or scalar FMAs (:func:`tensor_cores`)."""
    return "deform_fused_forward" if tensor_cores(engine, geom) else "deform_fused_forward_fma"


def staging_chunks(geom: Geometry) -> list[slice]:
    """The batch in chunks (one launch each, :func:`launchers.fused_chunks`):
    as many images as 1/STAGING_SHARE of the budget holds, and, where that
    gives a launch fewer than FUSED_TARGET_BLOCKS blocks, as many as reach
    it within 1/TARGET_SHARE of the budget."""
    per_image = max(geom.in_channels * geom.height * geom.width * geom.dtype.itemsize, 1)
    budget = config.get_workspace_bytes()
    _, out_tiles, _ = launchers.fused_grid(geom, 1)
    pixel_tiles = -(-launchers.FUSED_TARGET_BLOCKS // out_tiles)
    wanted = -(-pixel_tiles * kernels.FUSED_PIXELS // max(geom.out_pixels, 1))
    return launchers.fused_chunks(geom.batch, budget // STAGING_SHARE // per_image, wanted,
                                  budget // TARGET_SHARE // per_image)


def forward(engine: Engine, geom: Geometry, input: Any, offset: Any, weight: Any, bias: Any, mask: Any) -> Any:
    """Output (N, C_out, Ho, Wo) in the input's dtype."""
    xp = engine.xp
    out = xp.empty((geom.batch, geom.out_channels, geom.out_h, geom.out_w), geom.dtype)
    if out.size == 0:
        return out
    name = kernel(engine, geom)
    tiles = launchers.fused_weight(engine, geom, weight)
    bias = None if bias is None else xp.ascontiguousarray(bias)
    parts = staging_chunks(geom)
    # One staging buffer for every chunk (a smaller one uses part of it).
    most = max(part.stop - part.start for part in parts)
    staging = xp.empty((most, geom.height * geom.width, geom.in_channels), geom.dtype)
    for part in parts:
        n = part.stop - part.start
        pixels = launchers.channels_last(engine, geom, input[part], staging[:n])
        off = xp.ascontiguousarray(offset[part])
        m = None if mask is None else xp.ascontiguousarray(mask[part])
        launchers.fused_forward(engine, geom, name, pixels, off, m, tiles, bias, out[part])
    return out


def backward(engine: Engine, geom: Geometry, grad_output: Any, input: Any, offset: Any, weight: Any, mask: Any):
    """Gradients (input, offset, weight, bias or None, mask or None): :func:`cudcn.backends.cuda.fused_backward.backward`."""
    return fused_backward.backward(engine, geom, grad_output, input, offset, weight, mask,
                                   tensor_cores=tensor_cores(engine, geom))
