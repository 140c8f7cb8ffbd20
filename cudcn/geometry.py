"""The one validation function, and the geometry it produces.

Every entry point (the public functions, the building blocks, the torch and
paddle adapters) calls :func:`validate` exactly once. It checks array kinds,
dtypes, shapes and the stride/padding/dilation arguments, and returns a
:class:`Geometry`: a small immutable record that the backends trust without
checking again.

Notation used throughout cudcn:

=========  ===========================================================
N          batch size
C_in, C    input channels
C_out, O   output channels
H, W       input height and width
kh, kw     kernel height and width; K = kh * kw kernel points
Ho, Wo     output height and width; L = Ho * Wo output pixels
groups     convolution groups (C_in / weight.shape[1])
G          offset groups (offset.shape[1] / (2 * K))
=========  ===========================================================
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cudcn.backends import array_kind
from cudcn.errors import ArgumentError, ArgumentTypeError

#: Floating dtypes cudcn accepts, by NumPy name (bfloat16 is ml_dtypes').
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


#: The kernels index rows, columns and shape arguments in 32 bits: stride,
#: dilation and the padded input size (H + 2*pad_h, W + 2*pad_w) stay below
#: this, which bounds every sampling position of the regular grid.
MAX_EXTENT = 2**31 - 1

#: Stands for an array argument the caller did not pass at all; an explicit
#: None for a required array is an error.
_ABSENT: Any = object()


# Comparing dtype objects is much cheaper than reading dtype.name, which
# stays as the fallback for bfloat16 (ml_dtypes is optional).
_FLOAT_DTYPE_OBJECTS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Geometry:
    """Everything a backend needs to know about one call, already checked.

    Hashable, and a key of the caches of per-signature work (its hash is
    computed once).
    """

    kind: str  # "numpy" or "cupy": which backend runs the call
    dtype: np.dtype
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int  # 0 for the building blocks, which have no weight
    groups: int
    offset_groups: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dil_h: int
    dil_w: int
    out_h: int
    out_w: int
    has_mask: bool
    has_bias: bool

    def __hash__(self) -> int:
        # The dataclass hash would hash all fields on every lookup; this one
        # is kept (the fields never change).
        cached = self.__dict__.get("_hash")
        if cached is None:
            cached = hash(tuple(getattr(self, f) for f in self.__dataclass_fields__))
            object.__setattr__(self, "_hash", cached)
        return cached

    def __getstate__(self) -> dict[str, Any]:
        # String hashes differ from process to process: a copy hashes anew.
        return {f: getattr(self, f) for f in self.__dataclass_fields__}

    @functools.cached_property
    def dtype_name(self) -> str:
        """``dtype.name`` (which NumPy computes anew on every read), kept."""
        return self.dtype.name

    @property
    def kernel_points(self) -> int:
        """K = kh * kw."""
        return self.kernel_h * self.kernel_w

    @property
    def out_pixels(self) -> int:
        """L = Ho * Wo."""
        return self.out_h * self.out_w

    @property
    def columns_shape(self) -> tuple[int, int, int, int]:
        """Shape of the column buffer: (N, Ho*Wo, kh*kw, C_in)."""
        return (self.batch, self.out_pixels, self.kernel_points, self.in_channels)


def int_pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each in [minimum, 2**31 - 1], as a pair of ints.

    Also checks the adapters' layer constructor arguments (kernel_size,
    stride, ...), so that a layer rejects what a call would.
    """
    items = value if isinstance(value, (tuple, list)) else (value,)
    if len(items) == 1:
        items = (items[0], items[0])
    ok = len(items) == 2 and all(
        not isinstance(v, (bool, np.bool_)) and _is_int(v) for v in items
    )
    if not ok:
        raise ArgumentError(f"{name} must be an int or a pair of ints, got {value!r}")
    pair = (operator.index(items[0]), operator.index(items[1]))
    if min(pair) < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value!r}")
    if max(pair) > MAX_EXTENT:
        raise ArgumentError(
            f"{name} must be in [{minimum}, 2**31 - 1] (the kernels index in 32 bits), got {value!r}"
        )
    return pair


def output_size(size: Any, kernel: Any, stride: Any, padding: Any, dilation: Any) -> Any:
    """A convolution's output size along one axis:
    ``(size + 2*padding - dilation*(kernel - 1) - 1) // stride + 1``.

    Arithmetic only, nothing checked: also for symbolic sizes (torch.compile)
    and for the adapters' checks before :func:`validate`.
    """
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _is_int(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def check_ndim(array: Any, name: str, ndim: int, layout: str) -> None:
    if array.ndim != ndim:
        raise ArgumentError(
            f"{name} must be a {ndim}-D array {layout}, "
            f"got {array.ndim}-D with shape {tuple(array.shape)}"
        )


def check_dim(name: str, got: int, expected: int, meaning: str) -> None:
    if got != expected:
        raise ArgumentError(f"{name} must be {meaning} = {expected}, got {got}")


def check_shape(name: str, got: Any, expected: tuple[int, ...], layout: str, note: str = "") -> None:
    """A whole shape, named by its layout:
    ``{name}.shape must be {layout} = {expected}{note}, got {got}``."""
    if tuple(got) != tuple(expected):
        raise ArgumentError(f"{name}.shape must be {layout} = {tuple(expected)}{note}, got {tuple(got)}")


def check_int(value: Any, name: str, minimum: int) -> int:
    """An int (not a bool) in [minimum, 2**31 - 1] (the kernels' 32-bit
    arguments), as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not _is_int(value):
        raise ArgumentError(f"{name} must be an int, got {value!r}")
    number = operator.index(value)
    if number < minimum:
        raise ArgumentError(f"{name} must be >= {minimum}, got {value!r}")
    if number > MAX_EXTENT:
        raise ArgumentError(f"{name} must be < 2**31 (the kernels index in 32 bits), got {value!r}")
    return number


def check_im2col_step(im2col_step: Any) -> None:
    """A positive int: accepted for compatibility with the reference
    implementations, ignored (cudcn has no batch-divisibility rule)."""
    try:
        step = operator.index(im2col_step)
    except TypeError:
        step = None
    if step is None or isinstance(im2col_step, (bool, np.bool_)) or step < 1:
        raise ArgumentError(f"im2col_step must be a positive int, got {im2col_step!r}")


def check_float_arrays(arrays: Mapping[str, Any], nm: Callable[[str], str]) -> tuple[str, np.dtype]:
    """The one array kind and floating dtype of ``arrays`` (argument key ->
    array, in the order errors should name them), or a clear error naming an
    argument: not an array, of another kind, not floating, of another dtype,
    or (CuPy) on another device. ``nm`` turns a key into its name in errors.
    """
    kinds = {key: array_kind(value, nm(key)) for key, value in arrays.items()}
    first = next(iter(kinds))
    for key, kind in kinds.items():
        if kind != kinds[first]:
            raise ArgumentTypeError(
                f"{nm(key)} is a {kind} array but {nm(first)} is a "
                f"{kinds[first]} array; pass arrays of one kind"
            )
    for key, value in arrays.items():
        if value.dtype not in _FLOAT_DTYPE_OBJECTS and value.dtype.name not in FLOAT_DTYPES:
            raise ArgumentTypeError(
                f"{nm(key)}.dtype must be one of {', '.join(FLOAT_DTYPES)}, "
                f"got {value.dtype.name}"
            )
    for key, value in arrays.items():
        if value.dtype != arrays[first].dtype:
            raise ArgumentTypeError(
                f"{nm(key)}.dtype must equal {nm(first)}.dtype = "
                f"{arrays[first].dtype.name}, got {value.dtype.name}"
            )

    if kinds[first] == "cupy":
        devices = {key: value.device.id for key, value in arrays.items()}
        for key, device in devices.items():
            if device != devices[first]:
                raise ArgumentError(
                    f"{nm(key)} is on GPU {device} but {nm(first)} is on GPU "
                    f"{devices[first]}; pass arrays on one device"
                )
    return kinds[first], arrays[first].dtype


class SignatureCache:
    """A bounded map from call signatures to what was worked out for them.

    A signature is a hashable key made only of what the work depends on --
    array types, dtypes, shapes, devices, the int arguments -- never of
    array contents. When full, the oldest entry goes (first in, first out).
    Dictionary reads and writes are atomic in CPython, so threads may share
    one; two threads missing at once both do the work, harmlessly.
    """

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._items: dict[Any, Any] = {}

    def get(self, key: Any) -> Any:
        """The value stored for ``key``, or None (also when ``key`` cannot be hashed)."""
        try:
            return self._items.get(key)
        except TypeError:
            return None

    def put(self, key: Any, value: Any) -> None:
        """Keep ``value`` for ``key`` (nothing when ``key`` cannot be hashed)."""
        try:
            hash(key)
        except TypeError:
            return
        items = self._items
        while len(items) >= self.size:
            try:
                del items[next(iter(items))]
            except (KeyError, StopIteration, RuntimeError):  # another thread got there first
                break
        items[key] = value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class _Unkeyed(Exception):
    """A call that cannot be keyed by its signature (it is validated in full)."""


def int_args_key(value: Any) -> Any:
    """An int argument (or a tuple of them, or None) as a hashable part of a
    signature: the value itself when it is made of Python ints only (bool,
    NumPy integers and everything else are left to the checks). Raises
    :class:`_Unkeyed` otherwise."""
    if value is None or type(value) is int:
        return value
    if type(value) in (tuple, list) and all(type(v) is int for v in value):
        return tuple(value)
    raise _Unkeyed


def pair_key(value: Any) -> Any:
    """An argument :func:`int_pair` reads (stride, padding, dilation,
    kernel_size) as part of a signature: 1, (1,) and [1, 1] alike as (1, 1),
    as :func:`int_pair` reads them (so that an adapter's lists and the
    user's ints share a signature)."""
    key = int_args_key(value)
    if type(key) is int:
        return key, key
    if type(key) is tuple and len(key) == 1:
        return key * 2
    return key


def _array_key(array: Any) -> Any:
    """An array argument's part of a signature: type, dtype, shape (and GPU)."""
    if array is None or array is _ABSENT:
        return array
    kind = type(array)
    if kind is np.ndarray:
        return kind, array.dtype, array.shape
    try:  # a CuPy array; anything else is left to the checks
        return kind, array.dtype, array.shape, array.device.id
    except AttributeError:
        raise _Unkeyed from None


#: Geometries of the calls validated so far, by signature.
_geometries = SignatureCache()


def validate(
    *,
    input: Any = _ABSENT,
    offset: Any = _ABSENT,
    weight: Any = _ABSENT,
    bias: Any = None,
    mask: Any = None,
    grad_output: Any = _ABSENT,
    columns: Any = _ABSENT,
    input_shape: Any = None,
    kernel_size: Any = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    names: Mapping[str, str] | None = None,
) -> Geometry:
    """Check one call and describe it, once per signature.

    Either ``input`` or ``input_shape`` (for col2im) gives (N, C_in, H, W);
    either ``weight`` or ``kernel_size`` (for the building blocks) gives the
    kernel. ``offset`` is always needed. An array argument left out is not
    part of the call; passing None for ``input``, ``offset``, ``weight``,
    ``grad_output`` or ``columns`` is an error (bias and mask may be None).
    ``names`` renames arguments in error messages, so that an adapter can
    report ``x`` where the core says ``input``.

    Raises:
        ArgumentTypeError (a TypeError): an argument is None or not an array
            of a supported kind, the arrays mix kinds, or a dtype is not
            floating or differs.
        ArgumentError (a ValueError): a shape, size or geometry argument is
            wrong.
        Both are RuntimeErrors too, as torchvision's shape errors are.

    A call whose signature -- array types, dtypes, shapes, GPU, the int
    arguments -- was checked before gets the same Geometry without checking
    again: nothing checked depends on the arrays' contents. (Calls that
    cannot be keyed, e.g. with NumPy integers for stride, are checked in
    full each time; calls that fail are never stored.) ``names`` only
    changes error messages, so it is not part of the signature.
    """
    try:
        key = (
            _array_key(input), _array_key(offset), _array_key(weight), _array_key(bias), _array_key(mask),
            _array_key(grad_output), _array_key(columns), int_args_key(input_shape), pair_key(kernel_size),
            pair_key(stride), pair_key(padding), pair_key(dilation),
        )
    except _Unkeyed:
        key = None
    else:
        found = _geometries.get(key)
        if found is not None:
            return found
    geom = _check(input, offset, weight, bias, mask, grad_output, columns, input_shape, kernel_size,
                  stride, padding, dilation, names)
    if key is not None:
        _geometries.put(key, geom)
    return geom


def _check(input: Any, offset: Any, weight: Any, bias: Any, mask: Any, grad_output: Any, columns: Any,
           input_shape: Any, kernel_size: Any, stride: Any, padding: Any, dilation: Any,
           names: Mapping[str, str] | None) -> Geometry:
    """:func:`validate`'s checks (its arguments, in order)."""
    names = dict(names or {})

    def nm(key: str) -> str:
        return names.get(key, key)

    required = {
        "input": (input, "(N, C_in, H, W)"),
        "offset": (offset, "(N, 2*offset_groups*kh*kw, Ho, Wo)"),
        "weight": (weight, "(C_out, C_in/groups, kh, kw)"),
        "grad_output": (grad_output, "(N, C_out, Ho, Wo)"),
        "columns": (columns, "(N, Ho*Wo, kh*kw, C_in)"),
    }
    for key, (value, layout) in required.items():
        if value is None:
            raise ArgumentTypeError(f"{nm(key)} must be an array {layout}, got None")
    if offset is _ABSENT:
        raise ArgumentTypeError(f"{nm('offset')} is required: an array (N, 2*offset_groups*kh*kw, Ho, Wo)")
    if input is _ABSENT:
        input = None
    if weight is _ABSENT:
        weight = None

    arrays = {
        "input": input,
        "offset": offset,
        "weight": weight,
        "bias": bias,
        "mask": mask,
        "grad_output": grad_output,
        "columns": columns,
    }
    arrays = {key: value for key, value in arrays.items() if value is not None and value is not _ABSENT}

    # Array kinds and dtypes first: shapes mean nothing on a list.
    kind, dtype = check_float_arrays(arrays, nm)

    # Input size.
    if input is not None:
        check_ndim(input, nm("input"), 4, "(N, C_in, H, W)")
        batch, in_channels, height, width = map(int, input.shape)
    else:
        shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
        if shape is None or len(shape) != 4 or not all(
            _is_int(v) and not isinstance(v, bool) and v >= 0 for v in shape
        ):
            raise ArgumentError(
                f"{nm('input_shape')} must be 4 non-negative ints "
                f"(N, C_in, H, W), got {input_shape!r}"
            )
        batch, in_channels, height, width = map(int, shape)

    # Kernel and convolution groups.
    groups, out_channels = 1, 0
    if weight is not None:
        check_ndim(weight, nm("weight"), 4, "(C_out, C_in/groups, kh, kw)")
        out_channels, per_group, kernel_h, kernel_w = map(int, weight.shape)
        if per_group < 1 or in_channels % per_group:
            raise ArgumentError(
                f"{nm('input')}.shape[1] = {in_channels} must be a positive "
                f"multiple of {nm('weight')}.shape[1] = {per_group} (C_in/groups)"
            )
        groups = in_channels // per_group
        if out_channels % groups:
            raise ArgumentError(
                f"{nm('weight')}.shape[0] = {out_channels} (C_out) must be "
                f"divisible by groups = {groups}"
            )
    else:
        kernel_h, kernel_w = int_pair(kernel_size, nm("kernel_size"), 0)
    if kernel_h < 1 or kernel_w < 1:
        raise ArgumentError(
            f"kernel size must be at least 1x1, got {kernel_h}x{kernel_w}"
        )
    if in_channels < 1:
        raise ArgumentError(f"{nm('input')}.shape[1] (C_in) must be >= 1, got {in_channels}")

    stride_h, stride_w = int_pair(stride, nm("stride"), 1)
    pad_h, pad_w = int_pair(padding, nm("padding"), 0)
    dil_h, dil_w = int_pair(dilation, nm("dilation"), 1)
    if max(height + 2 * pad_h, width + 2 * pad_w) > MAX_EXTENT:
        raise ArgumentError(
            f"the padded input size (H + 2*pad_h, W + 2*pad_w) = "
            f"({height + 2 * pad_h}, {width + 2 * pad_w}) must stay below 2**31 (the "
            f"kernels index in 32 bits); (H, W) = ({height}, {width}), "
            f"{nm('padding')} = ({pad_h}, {pad_w})"
        )
    out_h = output_size(height, kernel_h, stride_h, pad_h, dil_h)
    out_w = output_size(width, kernel_w, stride_w, pad_w, dil_w)
    if out_h < 1 or out_w < 1:
        raise ArgumentError(
            f"output size (Ho, Wo) = ({out_h}, {out_w}) must be at least 1x1; "
            f"input (H, W) = ({height}, {width}), kernel ({kernel_h}, {kernel_w}), "
            f"stride ({stride_h}, {stride_w}), padding ({pad_h}, {pad_w}), "
            f"dilation ({dil_h}, {dil_w})"
        )
    if height * width > MAX_EXTENT or out_h * out_w > MAX_EXTENT:
        raise ArgumentError(
            f"an image must have fewer than 2**31 pixels (the kernels index pixels in "
            f"32 bits): input H*W = {height * width}, output Ho*Wo = {out_h * out_w}"
        )

    # Offset: (N, 2*G*K, Ho, Wo).
    kernel_points = kernel_h * kernel_w
    check_ndim(offset, nm("offset"), 4, "(N, 2*offset_groups*kh*kw, Ho, Wo)")
    check_dim(f"{nm('offset')}.shape[0]", offset.shape[0], batch, f"{nm('input')}.shape[0] (N)")
    channels = int(offset.shape[1])
    if channels < 1 or channels % (2 * kernel_points):
        raise ArgumentError(
            f"{nm('offset')}.shape[1] must be a positive multiple of "
            f"2*kh*kw = {2 * kernel_points}, got {channels}"
        )
    offset_groups = channels // (2 * kernel_points)
    if in_channels % offset_groups:
        raise ArgumentError(
            f"{nm('input')}.shape[1] = {in_channels} (C_in) must be divisible "
            f"by offset_groups = {offset_groups} "
            f"({nm('offset')}.shape[1] / (2*kh*kw))"
        )
    if tuple(offset.shape[2:]) != (out_h, out_w):
        raise ArgumentError(
            f"{nm('offset')}.shape[2:] must be the output size (Ho, Wo) = "
            f"({out_h}, {out_w}), got {tuple(offset.shape[2:])}"
        )

    if mask is not None:
        check_ndim(mask, nm("mask"), 4, "(N, offset_groups*kh*kw, Ho, Wo)")
        check_dim(f"{nm('mask')}.shape[0]", mask.shape[0], batch, f"{nm('input')}.shape[0] (N)")
        check_dim(
            f"{nm('mask')}.shape[1]",
            mask.shape[1],
            offset_groups * kernel_points,
            "offset_groups*kh*kw",
        )
        if tuple(mask.shape[2:]) != (out_h, out_w):
            raise ArgumentError(
                f"{nm('mask')}.shape[2:] must be the output size (Ho, Wo) = "
                f"({out_h}, {out_w}), got {tuple(mask.shape[2:])}"
            )

    if bias is not None:
        if weight is None:
            raise ArgumentError(f"{nm('bias')} needs a weight")
        if tuple(bias.shape) != (out_channels,):
            raise ArgumentError(
                f"{nm('bias')}.shape must be (C_out,) = ({out_channels},), "
                f"got {tuple(bias.shape)}"
            )

    if grad_output is not _ABSENT:
        expected = (batch, out_channels, out_h, out_w)
        if tuple(grad_output.shape) != expected:
            raise ArgumentError(
                f"{nm('grad_output')}.shape must be (N, C_out, Ho, Wo) = "
                f"{expected}, got {tuple(grad_output.shape)}"
            )

    if columns is not _ABSENT:
        expected = (batch, out_h * out_w, kernel_points, in_channels)
        if tuple(columns.shape) != expected:
            raise ArgumentError(
                f"{nm('columns')}.shape must be (N, Ho*Wo, kh*kw, C_in) = "
                f"{expected}, got {tuple(columns.shape)}"
            )

    return Geometry(
        kind=kind,
        dtype=dtype,
        batch=batch,
        in_channels=in_channels,
        height=height,
        width=width,
        out_channels=out_channels,
        groups=groups,
        offset_groups=offset_groups,
        kernel_h=kernel_h,
        kernel_w=kernel_w,
        stride_h=stride_h,
        stride_w=stride_w,
        pad_h=pad_h,
        pad_w=pad_w,
        dil_h=dil_h,
        dil_w=dil_w,
        out_h=out_h,
        out_w=out_w,
        has_mask=mask is not None,
        has_bias=bias is not None,
    )
