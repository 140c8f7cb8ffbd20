"""CUDA backend: cudcn's kernels (``kernels/*.cu``) through CuPy, GEMMs through cuBLAS.

The package, from the bottom up:

- :mod:`~cudcn.backends.cuda.kernels`: the kernel sources, their template
  instantiations and the per-device ``cupy.RawModule`` loader;
- :mod:`~cudcn.backends.cuda.compile`: NVRTC compilation of every
  instantiation without a GPU (behind ``cudcn compile``);
- :mod:`~cudcn.backends.cuda.engine`: where steps run (CuPy on a GPU; NumPy
  and host-compiled kernels in the test suite);
- :mod:`~cudcn.backends.cuda.launchers`: one launcher per kernel family;
- :mod:`~cudcn.backends.cuda.im2col_gemm`: the reference algorithm, im2col + cuBLAS GEMM;
- :mod:`~cudcn.backends.cuda.algorithms`: which algorithm runs a call ("auto" measures);
- :mod:`~cudcn.backends.cuda.gathers`: what the gather kernel families share (lane
  groups, the sorted deterministic gradient, kernels/sorted_gather.cu);
- :mod:`~cudcn.backends.cuda.msda`: multi-scale deformable attention (kernels/msda.cu);
- :mod:`~cudcn.backends.cuda.dcnv3`: DCNv3 and DCNv4 (kernels/dcnv3.cu).

This module is the backend interface of :mod:`cudcn.backends`: CuPy arrays,
run on their own device and CuPy's current stream there.
"""

from __future__ import annotations

from typing import Any

from cudcn.backends.cuda import algorithms, dcnv3, im2col_gemm, msda
from cudcn.backends.cuda.engine import cupy_engine
from cudcn.dcnv3_geometry import DCNv3Geometry
from cudcn.geometry import Geometry
from cudcn.msda_geometry import MSDAGeometry


def forward(geom: Geometry, input: Any, offset: Any, weight: Any, bias: Any, mask: Any) -> Any:
    """Output (N, C_out, Ho, Wo) in the input's dtype."""
    with input.device:
        return algorithms.run("forward", cupy_engine(), geom, input, offset, weight, bias, mask)


def backward(geom: Geometry, grad_output: Any, input: Any, offset: Any, weight: Any, mask: Any):
    """Gradients (input, offset, weight, bias or None, mask or None)."""
    with input.device:
        return algorithms.run("backward", cupy_engine(), geom, grad_output, input, offset, weight, mask)


def im2col(geom: Geometry, input: Any, offset: Any, mask: Any) -> Any:
    """Columns (N, Ho*Wo, kh*kw, C_in), mask applied."""
    with input.device:
        return im2col_gemm.im2col_public(cupy_engine(), geom, input, offset, mask)


def col2im(geom: Geometry, columns: Any, offset: Any, mask: Any) -> Any:
    """Input gradient (N, C_in, H, W) from column gradients (N, Ho*Wo, kh*kw, C_in)."""
    with columns.device:
        return im2col_gemm.col2im_public(cupy_engine(), geom, columns, offset, mask)


def col2im_coord(geom: Geometry, columns: Any, input: Any, offset: Any, mask: Any):
    """Offset gradient (N, 2GK, Ho, Wo) and mask gradient (N, GK, Ho, Wo) or None."""
    with input.device:
        return im2col_gemm.col2im_coord_public(cupy_engine(), geom, columns, input, offset, mask)


def ms_deform_attn_forward(geom: MSDAGeometry, value: Any, sampling_locations: Any, attention_weights: Any) -> Any:
    """Multi-scale deformable attention: output (N, Lq, M*D) in the value's dtype."""
    with value.device:
        return msda.forward(cupy_engine(), geom, value, sampling_locations, attention_weights)


def ms_deform_attn_backward(geom: MSDAGeometry, grad_output: Any, value: Any, sampling_locations: Any,
                            attention_weights: Any):
    """Gradients (value, sampling_locations, attention_weights) of multi-scale deformable attention."""
    with value.device:
        return msda.backward(cupy_engine(), geom, grad_output, value, sampling_locations, attention_weights)


def dcnv3_forward(geom: DCNv3Geometry, input: Any, offset: Any, mask: Any) -> Any:
    """DCNv3/DCNv4: output (N, Ho, Wo, G*D) in the input's dtype (DCNv4: offset and mask both offset_mask)."""
    with input.device:
        return dcnv3.forward(cupy_engine(), geom, input, offset, mask)


def dcnv3_backward(geom: DCNv3Geometry, grad_output: Any, input: Any, offset: Any, mask: Any):
    """DCNv3/DCNv4: gradients (input, offset, mask); DCNv4's offset and mask gradient one packed array."""
    with input.device:
        return dcnv3.backward(cupy_engine(), geom, grad_output, input, offset, mask)
