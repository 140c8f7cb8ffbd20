"""References for DCNv3 and DCNv4, sharing nothing with cudcn.

- ``oracle_forward`` / ``oracle_backward``: the formula, Python loops over
  every (image, output pixel, group, point), channels as a vector, float64;
- ``torch_dcnv3_core``: a pure-torch implementation in the manner of
  InternImage's ``dcnv3_core_pytorch`` (``F.pad`` of the NHWC input, then
  ``grid_sample`` on it), written here from the formula, in the tensors'
  dtype (the original builds its grid in float32 whatever the input's);
- ``pack`` / ``to_deform_conv2d``: DCNv4's offset_mask from DCNv3's offset
  and mask, and a DCNv3 call as a depthwise ``deform_conv2d`` call;
- ``softmax_mask`` / ``softmax_mask_gradient``: the DCNv3 module's softmax
  over each group's P points and its Jacobian (for the fused ``softmax``);
- ``calls()``: hypothesis-drawn DCNv3 calls; ``fixed_call()`` a seeded one.

The formula: point p of output pixel (h, w), group g is kernel column i and
row j, in the order i outer, j inner (w-major), the centre left out with
remove_center; with (dx, dy) = offset[n, h, w, g*2P + 2p : + 2],
c_w = dil_w*(kw-1)//2 and c_h = dil_h*(kh-1)//2 it samples the input at

    x = w*stride_w - pad_w + c_w + (i*dil_w - c_w + dx) * offset_scale
    y = h*stride_h - pad_h + c_h + (j*dil_h - c_h + dy) * offset_scale

bilinearly between the four pixels around it (floor and floor + 1; a pixel
outside the input is 0), times mask[n, h, w, g*P + p], on channels
g*D .. g*D + D - 1. The derivative in y is the slope between rows floor(y)
and floor(y) + 1: at an integer, the one-sided derivative towards +1. A
non-finite point samples 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from hypothesis import strategies as st

from msda_reference import _cell as corners  # (row, col, weight, d/dy, d/dx) of the four pixels around (y, x)

SCALARS = ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w",
           "group", "group_channels", "offset_scale", "im2col_step", "remove_center")


@dataclass
class DCNv3Call:
    input: np.ndarray  # (N, H, W, G*D)
    offset: np.ndarray  # (N, Ho, Wo, G*P*2)
    mask: np.ndarray  # (N, Ho, Wo, G*P)
    kernel_h: int
    kernel_w: int
    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 0
    pad_w: int = 0
    dilation_h: int = 1
    dilation_w: int = 1
    group: int = 1
    group_channels: int = 1
    offset_scale: float = 1.0
    im2col_step: int = 256
    remove_center: bool = False
    seed: int = 0

    @property
    def scalars(self) -> tuple:
        """kernel_h .. remove_center, in DCNv3Function's order."""
        return tuple(getattr(self, name) for name in SCALARS)

    @property
    def args(self) -> tuple:
        """cudcn.dcnv3's positional arguments."""
        return (self.input, self.offset, self.mask, *self.scalars)

    @property
    def points(self) -> int:
        return self.kernel_h * self.kernel_w - int(self.remove_center)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (*self.offset.shape[:3], self.input.shape[3])

    def kernel_grid(self) -> list[tuple[int, int]]:
        """(i, j) per point: column i outer, row j inner, the centre left out with remove_center."""
        centre = (self.kernel_w // 2, self.kernel_h // 2)
        return [(i, j) for i in range(self.kernel_w) for j in range(self.kernel_h)
                if not (self.remove_center and (i, j) == centre)]

    def with_arrays(self, **arrays) -> DCNv3Call:
        return replace(self, **arrays)


def output_size(size, kernel, stride, pad, dilation) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def points(call: DCNv3Call):
    """Every (n, h, w, g, p) with its sampling point (y, x) and mask value, float64."""
    n_batch, out_h, out_w, _ = call.offset.shape
    P = call.points
    c_h = call.dilation_h * (call.kernel_h - 1) // 2
    c_w = call.dilation_w * (call.kernel_w - 1) // 2
    for n in range(n_batch):
        for h in range(out_h):
            for w in range(out_w):
                for g in range(call.group):
                    for p, (i, j) in enumerate(call.kernel_grid()):
                        dx = float(call.offset[n, h, w, g * 2 * P + 2 * p])
                        dy = float(call.offset[n, h, w, g * 2 * P + 2 * p + 1])
                        x = (w * call.stride_w - call.pad_w + c_w) + (i * call.dilation_w - c_w + dx) * call.offset_scale
                        y = (h * call.stride_h - call.pad_h + c_h) + (j * call.dilation_h - c_h + dy) * call.offset_scale
                        yield (n, h, w, g, p), y, x, float(call.mask[n, h, w, g * P + p])


def oracle_forward(call: DCNv3Call) -> np.ndarray:
    """(N, Ho, Wo, G*D), float64."""
    image = np.asarray(call.input, np.float64)
    height, width = image.shape[1:3]
    D = call.group_channels
    out = np.zeros(call.out_shape)
    for (n, h, w, g, _), y, x, m in points(call):
        if not (math.isfinite(y) and math.isfinite(x)):
            continue
        channels = slice(g * D, (g + 1) * D)
        for r, c, weight, _, _ in corners(y, x):
            if 0 <= r < height and 0 <= c < width:
                out[n, h, w, channels] += m * weight * image[n, r, c, channels]
    return out


def oracle_backward(call: DCNv3Call, grad_output: np.ndarray):
    """(grad_input, grad_offset, grad_mask), float64."""
    image = np.asarray(call.input, np.float64)
    grad_output = np.asarray(grad_output, np.float64)
    height, width = image.shape[1:3]
    D, P = call.group_channels, call.points
    grad_input = np.zeros(image.shape)
    grad_offset = np.zeros(call.offset.shape)
    grad_mask = np.zeros(call.mask.shape)
    for (n, h, w, g, p), y, x, m in points(call):
        if not (math.isfinite(y) and math.isfinite(x)):
            continue
        channels = slice(g * D, (g + 1) * D)
        go = grad_output[n, h, w, channels]
        for r, c, weight, weight_dy, weight_dx in corners(y, x):
            if not (0 <= r < height and 0 <= c < width):
                continue
            product = float(np.dot(go, image[n, r, c, channels]))
            grad_mask[n, h, w, g * P + p] += weight * product
            grad_offset[n, h, w, g * 2 * P + 2 * p] += call.offset_scale * m * weight_dx * product
            grad_offset[n, h, w, g * 2 * P + 2 * p + 1] += call.offset_scale * m * weight_dy * product
            grad_input[n, r, c, channels] += m * weight * go
    return grad_input, grad_offset, grad_mask


# --------------------------------------------------------------------------
# DCNv4's packing, and DCNv3 as a depthwise deform_conv2d
# --------------------------------------------------------------------------


def pack(offset: np.ndarray, mask: np.ndarray, group: int, channels: int | None = None, fill=0.0) -> np.ndarray:
    """offset_mask (N, Ho, Wo, K8): per group its 2P offsets then its P mask
    values, the groups back to back, then ``fill`` up to ``channels``
    (default: G*3P rounded up to a multiple of 8)."""
    n, out_h, out_w, points = *offset.shape[:3], mask.shape[3] // group
    blocks = np.concatenate([offset.reshape(n, out_h, out_w, group, 2 * points),
                             mask.reshape(n, out_h, out_w, group, points)], -1)
    blocks = blocks.reshape(n, out_h, out_w, group * 3 * points)
    width = -(-blocks.shape[-1] // 8) * 8 if channels is None else channels
    packed = np.full((n, out_h, out_w, width), fill, offset.dtype)
    packed[..., :blocks.shape[-1]] = blocks
    return packed


def unpack(offset_mask: np.ndarray, group: int, points: int) -> tuple[np.ndarray, np.ndarray]:
    """(offset, mask) from offset_mask: the inverse of :func:`pack`."""
    n, out_h, out_w = offset_mask.shape[:3]
    blocks = offset_mask[..., :group * 3 * points].reshape(n, out_h, out_w, group, 3 * points)
    return (blocks[..., :2 * points].reshape(n, out_h, out_w, group * 2 * points),
            blocks[..., 2 * points:].reshape(n, out_h, out_w, group * points))


def softmax_mask(mask: np.ndarray, group: int) -> np.ndarray:
    """The DCNv3 module's softmax of mask (N, Ho, Wo, G*P) over each group's P
    points, in the mask's dtype (float64 here), as a new array."""
    blocks = mask.reshape(*mask.shape[:3], group, mask.shape[3] // group)
    if blocks.size == 0:
        return mask.copy()
    e = np.exp(blocks - blocks.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).reshape(mask.shape)


def softmax_mask_gradient(soft: np.ndarray, grad_soft: np.ndarray, group: int) -> np.ndarray:
    """The gradient by the mask given that by its softmax ``soft``:
    s_p * (d_p - sum_q s_q d_q) per (pixel, group)."""
    s = soft.reshape(*soft.shape[:3], group, soft.shape[3] // group)
    d = grad_soft.reshape(s.shape)
    return (s * (d - (s * d).sum(axis=-1, keepdims=True))).reshape(soft.shape)


def tap_order(call: DCNv3Call) -> list[int | None]:
    """For each torchvision tap k = j*kw + i (h-major), the DCNv3 point p
    (w-major) that it is, or None for the centre removed by remove_center."""
    where = {ij: p for p, ij in enumerate(call.kernel_grid())}
    return [where.get((i, j)) for j in range(call.kernel_h) for i in range(call.kernel_w)]


def to_deform_conv2d(call: DCNv3Call) -> dict:
    """The DCNv3 call (offset_scale 1) as deform_conv2d's keyword arguments:
    NCHW input, depthwise all-ones weight (groups = channels), offset groups
    = group, offsets reordered to h-major (y, x) taps; a removed centre is a
    tap with offset 0 and mask 0."""
    n, out_h, out_w = call.offset.shape[:3]
    G, P, K = call.group, call.points, call.kernel_h * call.kernel_w
    offset = call.offset.reshape(n, out_h, out_w, G, P, 2)
    mask = call.mask.reshape(n, out_h, out_w, G, P)
    tv_offset = np.zeros((n, out_h, out_w, G, K, 2), call.offset.dtype)
    tv_mask = np.zeros((n, out_h, out_w, G, K), call.mask.dtype)
    for k, p in enumerate(tap_order(call)):
        if p is not None:
            tv_offset[..., k, 0], tv_offset[..., k, 1] = offset[..., p, 1], offset[..., p, 0]
            tv_mask[..., k] = mask[..., p]
    channels = call.input.shape[3]
    tv_offset, tv_mask = tv_offset.reshape(n, out_h, out_w, G * K * 2), tv_mask.reshape(n, out_h, out_w, G * K)
    return dict(
        input=np.ascontiguousarray(call.input.transpose(0, 3, 1, 2)),
        offset=np.ascontiguousarray(tv_offset.transpose(0, 3, 1, 2)),
        weight=np.ones((channels, 1, call.kernel_h, call.kernel_w), call.input.dtype),
        mask=np.ascontiguousarray(tv_mask.transpose(0, 3, 1, 2)),
        stride=(call.stride_h, call.stride_w), padding=(call.pad_h, call.pad_w),
        dilation=(call.dilation_h, call.dilation_w),
    )


def from_deform_conv2d_gradients(call: DCNv3Call, grads) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """deform_conv2d's (input, offset, mask) gradients back in DCNv3's layout."""
    n, out_h, out_w = call.offset.shape[:3]
    G, P = call.group, call.points
    K = call.kernel_h * call.kernel_w
    tv_offset = grads.offset.transpose(0, 2, 3, 1).reshape(n, out_h, out_w, G, K, 2)
    tv_mask = grads.mask.transpose(0, 2, 3, 1).reshape(n, out_h, out_w, G, K)
    offset = np.empty((n, out_h, out_w, G, P, 2))
    mask = np.empty((n, out_h, out_w, G, P))
    for k, p in enumerate(tap_order(call)):
        if p is not None:
            offset[..., p, 0], offset[..., p, 1] = tv_offset[..., k, 1], tv_offset[..., k, 0]
            mask[..., p] = tv_mask[..., k]
    return (grads.input.transpose(0, 2, 3, 1), offset.reshape(call.offset.shape), mask.reshape(call.mask.shape))


# --------------------------------------------------------------------------
# Pure torch, in the manner of dcnv3_core_pytorch
# --------------------------------------------------------------------------


def torch_dcnv3_core(input, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                     dilation_h, dilation_w, group, group_channels, offset_scale, remove_center=False):
    """DCNv3 on torch tensors (N, H, W, G*D) through ``grid_sample`` on the padded input.

    Pads as ``dcnv3_core_pytorch`` does, ``F.pad(input, [0, 0, pad_h, pad_h,
    pad_w, pad_w])``: W by pad_h and H by pad_w, so that with unequal pads it
    computes cudcn's result for the pads swapped. The grid is in the
    tensors' dtype. Output (N, Ho, Wo, G*D), Ho and Wo from the offset.
    """
    import torch
    import torch.nn.functional as F

    n, _, _, channels = input.shape
    padded = F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])
    padded_h, padded_w = padded.shape[1:3]
    out_h, out_w = offset.shape[1:3]
    G, D = group, group_channels
    centre = (kernel_w // 2, kernel_h // 2)
    grid = [(i, j) for i in range(kernel_w) for j in range(kernel_h) if not (remove_center and (i, j) == centre)]
    P = len(grid)
    c_h, c_w = dilation_h * (kernel_h - 1) // 2, dilation_w * (kernel_w - 1) // 2
    options = dict(dtype=offset.dtype, device=offset.device)
    grid_x = torch.tensor([i * dilation_w - c_w for i, _ in grid], **options)
    grid_y = torch.tensor([j * dilation_h - c_h for _, j in grid], **options)
    centre_x = (torch.arange(out_w, **options) * stride_w + c_w).view(1, 1, out_w, 1, 1)
    centre_y = (torch.arange(out_h, **options) * stride_h + c_h).view(1, out_h, 1, 1, 1)

    shifts = offset.view(n, out_h, out_w, G, P, 2)
    x = centre_x + (grid_x + shifts[..., 0]) * offset_scale  # pixels of the padded input
    y = centre_y + (grid_y + shifts[..., 1]) * offset_scale
    # grid_sample(align_corners=False) reads pixel (g + 1) * size / 2 - 0.5 at grid value g.
    locations = torch.stack([(2 * x + 1) / padded_w - 1, (2 * y + 1) / padded_h - 1], -1)
    locations = locations.view(n, out_h * out_w, G, P, 2).transpose(1, 2).reshape(n * G, out_h * out_w, P, 2)

    images = padded.view(n, padded_h * padded_w, channels).transpose(1, 2).reshape(n * G, D, padded_h, padded_w)
    samples = F.grid_sample(images, locations, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.view(n, out_h * out_w, G, P).transpose(1, 2).reshape(n * G, 1, out_h * out_w, P)
    out = (samples * weights).sum(-1)  # (N*G, D, Ho*Wo)
    return out.view(n, channels, out_h * out_w).transpose(1, 2).reshape(n, out_h, out_w, channels).contiguous()


# --------------------------------------------------------------------------
# Drawn calls
# --------------------------------------------------------------------------


def place_points(call: DCNv3Call, targets_x: np.ndarray, targets_y: np.ndarray) -> np.ndarray:
    """The offsets that put each point at (targets_y, targets_x), (N, Ho, Wo, G, P) each:
    offset = (target - reference point) / offset_scale - kernel grid (exact on
    integer targets when offset_scale is a power of two)."""
    n, out_h, out_w = call.offset.shape[:3]
    c_h = call.dilation_h * (call.kernel_h - 1) // 2
    c_w = call.dilation_w * (call.kernel_w - 1) // 2
    grid = np.array(call.kernel_grid())
    ref_x = (np.arange(out_w) * call.stride_w - call.pad_w + c_w).reshape(1, 1, out_w, 1, 1)
    ref_y = (np.arange(out_h) * call.stride_h - call.pad_h + c_h).reshape(1, out_h, 1, 1, 1)
    dx = (targets_x - ref_x) / call.offset_scale - (grid[:, 0] * call.dilation_w - c_w)
    dy = (targets_y - ref_y) / call.offset_scale - (grid[:, 1] * call.dilation_h - c_h)
    return np.stack([dx, dy], -1).reshape(call.offset.shape)


def fixed_call(batch: int = 2, height: int = 5, width: int = 6, group: int = 2, channels: int = 5,
               kernel_h: int = 3, kernel_w: int = 3, stride: int = 1, pad=1, dilation: int = 1, scale: float = 0.5,
               remove_center: bool = False, seed: int = 0) -> DCNv3Call:
    """A DCNv3 call in float64 (pad an int or (pad_h, pad_w)) whose points lie
    in (-1.5, size + 0.5), a tenth of the coordinates exactly on a kink (an
    integer from -1 to the size; exact when scale is a power of two)."""
    rng = np.random.default_rng(seed)
    pad_h, pad_w = (pad, pad) if isinstance(pad, int) else pad
    out_h = output_size(height, kernel_h, stride, pad_h, dilation)
    out_w = output_size(width, kernel_w, stride, pad_w, dilation)
    points = kernel_h * kernel_w - int(remove_center)
    call = DCNv3Call(
        input=rng.standard_normal((batch, height, width, group * channels)),
        offset=np.zeros((batch, out_h, out_w, group * points * 2)),
        mask=rng.uniform(-1, 1, (batch, out_h, out_w, group * points)),
        kernel_h=kernel_h, kernel_w=kernel_w, stride_h=stride, stride_w=stride, pad_h=pad_h, pad_w=pad_w,
        dilation_h=dilation, dilation_w=dilation, group=group, group_channels=channels, offset_scale=scale,
        remove_center=remove_center, seed=seed)
    shape = (batch, out_h, out_w, group, points)
    targets = []
    for size in (width, height):
        kink = rng.random(shape) < 0.1
        targets.append(np.where(kink, rng.integers(-1, size + 1, shape), rng.uniform(-1.5, size + 0.5, shape)))
    call.offset = place_points(call, *targets)
    return call


@st.composite
def calls(draw, max_batch: int = 2, max_kernel: int = 7, kinks: float = 0.0, min_batch: int = 0,
          scales=(1.0, 0.5, 0.7, 1.5, 2.0), max_channels: int = 5, max_out: int = 4, equal_pads: bool = False,
          channels=None, max_group: int = 3):
    """A drawn DCNv3 call in float64.

    Kernels 1..max_kernel each side (rectangular, even), stride 1..3,
    pads 0..3 (unequal unless ``equal_pads``), dilation 1..2, remove_center on odd square kernels,
    group 1..max_group, group_channels 1..max_channels (or one of ``channels``), batch from min_batch, an
    output of at most max_out x max_out pixels, offset_scale from
    ``scales``. Each sampling point lands at an integer in [-2, size + 1]
    plus a fraction in [0.1, 0.9] (away from kinks, up to 2 pixels outside
    the input); with ``kinks`` > 0 that share of the coordinates is an
    integer in [-1, size] instead (exact when offset_scale is a power of two).
    """
    kh, kw = draw(st.integers(1, max_kernel)), draw(st.integers(1, max_kernel))
    remove_center = kh == kw and kh % 2 == 1 and kh > 1 and draw(st.booleans())
    stride = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pad = draw(st.integers(0, 3)), draw(st.integers(0, 3))
    if equal_pads:
        pad = (pad[0], pad[0])
    dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    sizes = []
    for k, s, p, d in zip((kh, kw), stride, pad, dilation):
        least = max(1, d * (k - 1) + 1 - 2 * p)  # one output pixel
        most = d * (k - 1) + 1 - 2 * p + (max_out - 1) * s  # max_out output pixels
        sizes.append(draw(st.integers(least, max(least, most))))
    height, width = sizes
    out_h, out_w = (output_size(*a) for a in zip(sizes, (kh, kw), stride, pad, dilation))
    batch = draw(st.integers(min_batch, max_batch))
    group = draw(st.integers(1, max_group))
    per_group = draw(st.integers(1, max_channels) if channels is None else st.sampled_from(channels))
    scale = draw(st.sampled_from(scales))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)

    P = kh * kw - int(remove_center)
    call = DCNv3Call(
        input=rng.standard_normal((batch, height, width, group * per_group)),
        offset=np.zeros((batch, out_h, out_w, group * P * 2)),
        mask=rng.uniform(-1, 1, (batch, out_h, out_w, group * P)),
        kernel_h=kh, kernel_w=kw, stride_h=stride[0], stride_w=stride[1], pad_h=pad[0], pad_w=pad[1],
        dilation_h=dilation[0], dilation_w=dilation[1], group=group, group_channels=per_group,
        offset_scale=scale, remove_center=remove_center, seed=seed,
    )
    shape = (batch, out_h, out_w, group, P)
    targets = []
    for size in (width, height):
        target = rng.integers(-2, size + 2, shape) + rng.uniform(0.1, 0.9, shape)
        on_kink = rng.random(shape) < kinks
        targets.append(np.where(on_kink, rng.integers(-1, size + 1, shape), target))
    call.offset = place_points(call, *targets)
    return call
