"""cudcn: deformable convolution (DCNv1 and modulated DCNv2), multi-scale
deformable attention, DCNv3 and DCNv4 for any array framework.

- :mod:`cudcn.ops`: the public functions (start here).
- :mod:`cudcn.geometry`, :mod:`cudcn.msda_geometry`,
  :mod:`cudcn.dcnv3_geometry`: the validation, one function per operator
  family.
- :mod:`cudcn.backends`: NumPy (the readable specification) and CUDA (CuPy).
- ``cudcn.torch`` / ``cudcn.paddle``: framework adapters, imported on demand.

Importing cudcn imports NumPy only: no CuPy, torch or paddle.
"""

from cudcn.config import (
    algorithm,
    are_deterministic_algorithms_enabled,
    deterministic_algorithms,
    get_algorithm,
    get_workspace_bytes,
    is_tf32_enabled,
    set_algorithm,
    set_workspace_bytes,
    tf32,
    use_deterministic_algorithms,
    use_tf32,
    workspace_bytes,
)
from cudcn.errors import ArgumentError, ArgumentTypeError, UnsupportedError
from cudcn.ops import (
    DCNv3Gradients,
    DCNv4Gradients,
    Gradients,
    MSDeformAttnGradients,
    deform_col2im,
    deform_col2im_coord,
    dcnv3,
    dcnv3_backward,
    dcnv4,
    dcnv4_backward,
    deform_conv,
    deform_conv2d,
    deform_conv2d_backward,
    deform_im2col,
    ms_deform_attn,
    ms_deform_attn_backward,
)

__version__ = "0.1.0"


def algorithm_choices() -> list:
    """What the CUDA backend's "auto" algorithm has measured and chosen in
    this process: one :class:`cudcn.backends.cuda.algorithms.Choice` per key."""
    from cudcn.backends.cuda import algorithms

    return algorithms.choices()

__all__ = [
    "algorithm",
    "algorithm_choices",
    "get_algorithm",
    "set_algorithm",
    "ArgumentError",
    "ArgumentTypeError",
    "UnsupportedError",
    "DCNv3Gradients",
    "DCNv4Gradients",
    "Gradients",
    "MSDeformAttnGradients",
    "are_deterministic_algorithms_enabled",
    "dcnv3",
    "dcnv3_backward",
    "dcnv4",
    "dcnv4_backward",
    "deterministic_algorithms",
    "deform_col2im",
    "deform_col2im_coord",
    "deform_conv",
    "deform_conv2d",
    "deform_conv2d_backward",
    "deform_im2col",
    "get_workspace_bytes",
    "is_tf32_enabled",
    "ms_deform_attn",
    "ms_deform_attn_backward",
    "set_workspace_bytes",
    "tf32",
    "use_deterministic_algorithms",
    "use_tf32",
    "workspace_bytes",
]
