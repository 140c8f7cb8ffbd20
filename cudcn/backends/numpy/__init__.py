"""NumPy backend: cudcn's readable specification, sampling as sparse matrices.

- :mod:`~cudcn.backends.numpy.sampling`: the bilinear-sampling core every
  operator shares (points -> a sparse matrix S with four entries per point,
  and the pieces of every gradient);
- :mod:`~cudcn.backends.numpy.dcn`: deformable convolution (DCNv1/v2):
  im2col = S·X, a GEMM, col2im = Sᵀ·G;
- :mod:`~cudcn.backends.numpy.msda`: multi-scale deformable attention: the
  output is S·X with a row of S per (image, query, head), no GEMM;
- :mod:`~cudcn.backends.numpy.dcnv3`: DCNv3 and DCNv4: the output is S·X
  with a row of S per (image, output pixel, group), no GEMM;
- :mod:`~cudcn.backends.numpy.parallel`: the threads a call's parts run in.

This package is the backend interface of :mod:`cudcn.backends` for NumPy
arrays.
"""

from cudcn.backends.numpy import dcnv3, msda
from cudcn.backends.numpy.dcn import backward, col2im, col2im_coord, forward, im2col

dcnv3_forward = dcnv3.forward
dcnv3_backward = dcnv3.backward
ms_deform_attn_forward = msda.forward
ms_deform_attn_backward = msda.backward

__all__ = [
    "backward", "col2im", "col2im_coord", "dcnv3_backward", "dcnv3_forward", "forward", "im2col",
    "ms_deform_attn_backward", "ms_deform_attn_forward",
]
