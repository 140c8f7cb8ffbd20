"""The CUDA kernel sources and their instantiations; the per-device loader.

The kernels live in ``kernels/*.cu`` (shipped in the wheel as
``cudcn/kernels``). They are C++ templates over

- the element type ``T`` of input, offset and mask (float16, bfloat16,
  float32, float64, spelt ``dcn_half``, ``dcn_bfloat16``, ``float``,
  ``double`` in the source),
- the column type ``TCol`` (see :data:`TYPES`),
- the accumulator type ``TAcc`` of the input gradient, and
- the index type ``Index`` (``int``, or ``long long`` for big tensors);
- for the column-free kernels, an operand policy (``FusedF16``,
  ``FusedBF16``, ``FusedTF32``, ``FusedFMA``: which multiply-add consumes the
  tiles, see kernels/dcn_fused_sampling.cuh) in place of ``TCol``.

Each instantiation is named by a C++ expression such as
``deform_im2col<float, float, int>``; the same string is handed to
``cupy.RawModule(name_expressions=...)``, to NVRTC by ``cudcn compile`` and to
the host-emulation harness of the test suite, and looked up by it.

This module imports no CuPy until :func:`module` is called.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Kernel sources, in the order they are joined into one module.
SOURCES = (
    "dcn_im2col.cu", "dcn_col2im.cu", "dcn_col2im_sorted.cu", "dcn_col2im_coord.cu", "dcn_layout.cu",
    "dcn_fused_forward.cu", "dcn_fused_backward.cu", "msda.cu", "dcnv3.cu", "sorted_gather.cu",
)
COMMON_HEADER = "dcn_common.cuh"
#: The headers a kernel may include, in the order they are inlined (a
#: header includes only those before it): what every kernel shares (types,
#: conversions, memory helpers), the tensor-core MMA wrappers, the
#: bilinear-sampling core of every operator family, and the tiles and
#: sampling of the column-free kernels.
HEADERS = (COMMON_HEADER, "dcn_mma.cuh", "sampling.cuh", "dcn_fused_sampling.cuh")

#: The index types, narrow first.
INDEX_TYPES = ("int", "long long")

#: Threads per block of every launch, and the cap on blocks per launch (the
#: kernels loop over the rest with a grid stride). BLOCK is also the kernels'
#: launch bound (``DCN_BLOCK_THREADS`` in kernels/dcn_common.cuh).
BLOCK = 256
MAX_BLOCKS = 8192


@dataclass(frozen=True)
class KernelTypes:
    """C++ types of one dtype's kernels, and the NumPy dtypes of the buffers."""

    value: str  # input, offset, mask, outputs
    column: str  # column buffer (what the GEMM reads)
    accum: str  # input-gradient accumulator (atomics), the compute type
    column_dtype: str
    accum_dtype: str


#: dtype name -> kernel types. Columns keep the dtype: float16 and bfloat16
#: columns halve the column traffic, and cuBLAS multiplies them on tensor
#: cores, summing in float32.
TYPES = {
    "float16": KernelTypes("dcn_half", "dcn_half", "float", "float16", "float32"),
    "bfloat16": KernelTypes("dcn_bfloat16", "dcn_bfloat16", "float", "bfloat16", "float32"),
    "float32": KernelTypes("float", "float", "float", "float32", "float32"),
    "float64": KernelTypes("double", "double", "double", "float64", "float64"),
}


def channels_per_lane(dtype: str) -> int:
    """Channels one lane moves per step in the sampling kernels: 16 bytes of
    the wider of the input and column types (``ChannelsPerLane`` in
    kernels/dcn_common.cuh)."""
    def bits(name: str) -> int:  # float16, bfloat16, float32, float64
        return int(name.removeprefix("b").removeprefix("float"))

    return 128 // max(bits(dtype), bits(TYPES[dtype].column_dtype))


#: The column-free kernels' block tile (``FusedTile`` in
#: kernels/dcn_fused_sampling.cuh): output pixels and output channels per
#: block, and threads per block.
FUSED_PIXELS = 64
FUSED_OUT_CHANNELS = 64
FUSED_THREADS = 128

#: Operand policies of the column-free kernels on tensor cores, per dtype.
_MMA_POLICIES = {"float16": "FusedF16", "bfloat16": "FusedBF16", "float32": "FusedTF32"}

#: The column-free kernels: launchable name -> (template, operand policy per
#: dtype). float32 has two of each: tensor cores in TF32, or scalar FMAs in
#: float32. float64 has none (im2col computes it).
FUSED_KERNELS = {
    "deform_fused_forward": ("deform_fused_forward", _MMA_POLICIES),
    "deform_fused_forward_fma": ("deform_fused_forward", {"float32": "FusedFMA"}),
    "fused_backward_data": ("fused_backward_data", _MMA_POLICIES),
    "fused_backward_data_fma": ("fused_backward_data", {"float32": "FusedFMA"}),
    "fused_backward_weight": ("fused_backward_weight", _MMA_POLICIES),
    "fused_backward_weight_fma": ("fused_backward_weight", {"float32": "FusedFMA"}),
}


def name_expression(kernel: str, dtype: str, index: str) -> str:
    """The instantiation of ``kernel`` (a launchable name) for a dtype name and an index type."""
    t = TYPES[dtype]
    if kernel in FUSED_KERNELS:
        template, policies = FUSED_KERNELS[kernel]
        return f"{template}<{t.value}, {policies[dtype]}, {index}>"
    args = {
        "deform_im2col": (t.value, t.column),
        "deform_col2im": (t.value, t.column, t.accum),
        "deform_col2im_keys": (t.value,),
        "deform_col2im_gather": (t.value, t.column, t.accum),
        "deform_col2im_coord": (t.value, t.column),
        "to_channels_last": (t.value,),
        "from_channels_last": (t.accum, t.value),
        "layout_copies": (t.value, t.value),
        "layout_copies_from_accum": (t.accum, t.value),
        "fused_weight_split_sum": (t.value,),
        "msda_forward": (t.value,),
        "msda_backward": (t.value, t.accum),
        "msda_value_keys": (t.value,),
        "dcnv3_softmax_stats": (t.value,),
        "dcnv3_forward": (t.value,),
        "dcnv3_backward": (t.value, t.accum),
        "dcnv3_softmax_backward": (t.value, t.accum),
        "dcnv3_input_keys": (t.value,),
        "sorted_gather": (t.value, t.accum),
        "accum_to_storage": (t.accum, t.value),
    }[kernel]
    if kernel == "layout_copies_from_accum":
        kernel = "layout_copies"  # the same template, from the accumulator type
    return f"{kernel}<{', '.join(args + (index,))}>"


#: Every launchable kernel name.
KERNELS = (
    "deform_im2col", "deform_col2im", "deform_col2im_keys", "deform_col2im_gather",
    "deform_col2im_coord", "to_channels_last", "from_channels_last", "layout_copies",
    "layout_copies_from_accum", "fused_weight_split_sum", *FUSED_KERNELS,
    "msda_forward", "msda_backward", "msda_value_keys",
    "dcnv3_softmax_stats", "dcnv3_forward", "dcnv3_backward", "dcnv3_softmax_backward", "dcnv3_input_keys",
    "sorted_gather", "accum_to_storage",
)


def has_kernel(kernel: str, dtype: str) -> bool:
    """Whether ``kernel`` has an instantiation for ``dtype``."""
    return kernel not in FUSED_KERNELS or dtype in FUSED_KERNELS[kernel][1]


def instantiations(dtype: str) -> list[tuple[str, str, str]]:
    """(kernel, index type, name expression) of every instantiation one dtype
    needs: each kernel it has, both index types; each name once (where the
    accumulator type is the dtype, layout_copies_from_accum is layout_copies)."""
    found: dict[str, tuple[str, str, str]] = {}
    for index in INDEX_TYPES:
        for k in KERNELS:
            if has_kernel(k, dtype):
                name = name_expression(k, dtype, index)
                found.setdefault(name, (k, index, name))
    return list(found.values())


def name_expressions(dtype: str) -> list[str]:
    """Every instantiation one dtype needs (each kernel it has, both index types)."""
    return [name for _, _, name in instantiations(dtype)]


#: Kernels whose blocks are whole warps: the sampling kernels give each
#: sampling point (DCN), (image, query, head) (MSDA) or (image, output
#: pixel, group) (DCNv3) a group of lanes of one warp (their loops are
#: warp-uniform, their sums warp shuffles); the layout passes give each warp
#: rows of a tile.
WARP_KERNELS = ("deform_im2col", "deform_col2im", "deform_col2im_coord", "to_channels_last", "from_channels_last",
                "layout_copies", "layout_copies_from_accum", "msda_forward", "msda_backward",
                "dcnv3_forward", "dcnv3_backward")

#: The layout passes' tile (``kLayoutTile`` in kernels/dcn_layout.cu): a
#: block transposes LAYOUT_TILE x LAYOUT_TILE elements at a time.
LAYOUT_TILE = 32
#: A layout copy that needs no tile moves LAYOUT_CHUNK elements per block at
#: a time (``kLayoutChunk``).
LAYOUT_CHUNK = LAYOUT_TILE * LAYOUT_TILE


def block_shape(kernel: str, block: int = BLOCK) -> tuple[int, int]:
    """(threads per block, dynamic shared-memory bytes) of every launch of
    ``kernel`` (a launchable name), for an engine whose grid-stride block is
    ``block`` (:data:`BLOCK` on a GPU; the emulator's engines take smaller ones).

    The column-free kernels are written for blocks of :data:`FUSED_THREADS`
    (``FusedTile::kThreads``); the sampling and layout kernels
    (:data:`WARP_KERNELS`) take ``block`` rounded up to whole warps, the
    others ``block`` as it is.
    No kernel takes dynamic shared memory. Every launch's shape comes from
    here (:func:`cudcn.backends.cuda.engine.kernel_launch`), and so does the
    resource report's occupancy (:mod:`cudcn.backends.cuda.resources`).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; kernels: {', '.join(KERNELS)}")
    if kernel in FUSED_KERNELS:
        return FUSED_THREADS, 0
    if kernel in WARP_KERNELS:
        return -(-block // 32) * 32, 0
    return block, 0


def kernel_dir() -> Path:
    """Where the .cu files are: inside the installed package, else the checkout."""
    package = Path(__file__).resolve().parents[2]  # cudcn/
    for candidate in (package / "kernels", package.parent / "kernels"):
        if (candidate / COMMON_HEADER).is_file():
            return candidate
    raise FileNotFoundError(
        f"cudcn's CUDA sources ({COMMON_HEADER}, {', '.join(SOURCES)}) were found "
        f"neither in {package / 'kernels'} nor in {package.parent / 'kernels'}"
    )


_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def translation_unit(files: Iterable[Path], headers: Path) -> str:
    """Kernel files as one text, each header they include inlined once, first.

    ``headers`` is the directory of :data:`HEADERS`; a file may include those
    alone. Inlining (rather than an include path) makes the text CuPy hashes
    for its on-disk cache cover every line that is compiled, so editing a
    header can never leave a stale kernel in the cache.
    """
    texts = {path.name: path.read_text() for path in files}
    needed: set[str] = set()

    def inline(match: re.Match, where: str) -> str:
        name = match.group(1)
        if name not in HEADERS:
            raise ValueError(f"{where} includes {name!r}; only {', '.join(HEADERS)} may be included")
        needed.add(name)
        return f"// (#include \"{name}\": inlined above)"

    bodies = [
        f"// ---- {name}\n" + _LOCAL_INCLUDE.sub(lambda m, n=name: inline(m, n), text)
        for name, text in texts.items()
    ]
    parts: list[str] = []
    for header in reversed(HEADERS):  # a header may include only those before it
        if header in needed:
            text = (headers / header).read_text()
            parts.insert(0, _LOCAL_INCLUDE.sub(lambda m, n=header: inline(m, n), text))
    return "\n".join(parts + bodies)


def source(directory: Path | None = None) -> str:
    """All kernels of :data:`SOURCES` as one translation unit."""
    directory = directory or kernel_dir()
    return translation_unit([directory / name for name in SOURCES], directory)


#: The options cudcn hands to ``cupy.RawModule``. CuPy adds its own (header
#: directories, ``-ftz=true``: float32 subnormals flush to zero, the
#: architecture); ``cudcn compile`` compiles with all of them
#: (:func:`cudcn.backends.cuda.compile.runtime_options`).
MODULE_OPTIONS = ("--std=c++17",)

_loader = None


def module(dtype: str) -> Any:
    """The compiled ``cupy.RawModule`` of one dtype on the current device.

    Memoised per device (``cupy.memoize(for_each_device=True)``); compiled
    code also lands in CuPy's on-disk kernel cache.
    """
    global _loader
    if _loader is None:
        import cupy

        @cupy.memoize(for_each_device=True)
        def load(dtype_name: str) -> Any:
            return cupy.RawModule(
                code=source(), options=MODULE_OPTIONS, name_expressions=name_expressions(dtype_name)
            )

        _loader = load
    return _loader(dtype)
