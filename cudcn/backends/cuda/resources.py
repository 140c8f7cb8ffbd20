"""What each kernel instantiation takes from an SM, and the occupancy that allows.

**Resources** come from NVRTC itself: cudcn's module is compiled to a cubin
for a real architecture exactly as at run time
(:func:`cudcn.backends.cuda.compile.runtime_options`), with
``--ptxas-options=-v`` added, and ptxas's log (inside NVRTC) gives for each
entry function its registers per thread, stack frame and spill stores and
loads (bytes), static shared memory and named barriers. NVRTC is the
compiler that builds the kernels at run time, so the numbers describe the
code a GPU would run, and nothing beyond the CUDA extras needs installing
(a standalone ptxas may be of another CUDA version than the NVRTC CuPy
loads, and compiles PTX rather than the source).

**Occupancy** is the theoretical one of the CUDA Occupancy Calculator: the
resident blocks per SM that registers, shared memory, warps, the block
limit and barriers allow, for the block and dynamic shared memory of the
launches (:func:`cudcn.backends.cuda.kernels.block_shape`, which every
launcher uses), times the block's warps over the SM's maximum warps. It is
an upper bound on what a profiler reports as achieved occupancy.

Notation: ``regs`` registers per thread (ptxas), ``threads`` per block,
``W = ceil(threads / 32)`` warps per block, ``smem`` static + dynamic shared
bytes per block. The rules (the CUDA Occupancy Calculator's, as the CUDA
toolkit implements them in ``cuda_occupancy.h``,
``cudaOccMaxActiveBlocksPerMultiprocessor``; the per-architecture limits
from the CUDA C++ Programming Guide's table "Technical Specifications per
Compute Capability"):

- warps: ``floor(max warps per SM / W)`` (64 warps = 2048 threads on sm_80
  and sm_90; a block of more than 1024 threads cannot launch);
- blocks: at most 32 resident blocks per SM (sm_80, sm_90);
- registers: allocated per warp, ``regs x 32`` rounded up to the allocation
  unit of 256 registers; the register file (64K 32-bit registers) is split
  over 4 sub-partitions (schedulers), each holding
  ``floor(16384 / registers per warp)`` warps, so the SM holds 4 times that
  many warps and ``floor(that / W)`` blocks; a block whose warps, rounded
  up to a multiple of 4, need more than 64K registers cannot launch, nor
  can a thread above 255 registers;
- shared memory: per block ``smem`` plus 1 KiB reserved by the driver (from
  sm_80 on), rounded up to the allocation unit of 128 bytes;
  ``floor(shared memory per SM / that)`` blocks, with 164 KiB per SM on
  sm_80 (A100) and 228 KiB on sm_90 (H100) under the default carveout
  preference; a block may take at most 163 KiB (sm_80) or 227 KiB (sm_90)
  -- above 48 KiB only by opting in, which the engine does;
- barriers (sm_90 on): each resident block slot brings 2 named barriers, so
  ``floor(2 x 32 / barriers per block)`` blocks.

The blocks per SM are the smallest of these limits; the report names the
limiter. Tests (tests/test_resources.py) check these rules on hand-worked
cases and against ``cuda_occupancy.h`` itself where the CUDA headers are
installed, and hold the budgets of :func:`budget_problems`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cudcn.backends.cuda import compile as nvrtc_compile
from cudcn.backends.cuda import kernels
from cudcn.backends.cuda.engine import CupyEngine

#: The NVRTC option that makes its ptxas print each entry function's resources.
PTXAS_VERBOSE = "--ptxas-options=-v"
WARP = 32


@dataclass(frozen=True)
class Resources:
    """One entry function's resources, as ptxas reports them (bytes unless said)."""

    registers: int  # per thread
    stack_frame: int  # local memory per thread: spills and local arrays
    spill_stores: int
    spill_loads: int
    shared_bytes: int  # static shared memory per block
    barriers: int  # named barriers (bar.sync ids)


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, Resources]:
    """Resources per mangled entry name from ptxas's ``-v`` log (NVRTC's
    program log, or a standalone ptxas's output).

    Each entry's lines run from its "Compiling entry function" line to the
    next; a quantity ptxas leaves out (shared memory, barriers when none) is 0.
    """
    entries = {}
    starts = list(_ENTRY.finditer(log))
    for here, after in zip(starts, starts[1:] + [None]):
        text = log[here.end():after.start() if after else len(log)]
        frame, used = _FRAME.search(text), _USED.search(text)
        if frame is None or used is None:
            raise ValueError(f"ptxas's log for {here.group(1)} gives no registers or stack frame:\n{text}")
        barriers, smem = _BARRIERS.search(text), _SMEM.search(text)
        entries[here.group(1)] = Resources(
            registers=int(used.group(1)), stack_frame=int(frame.group(1)), spill_stores=int(frame.group(2)),
            spill_loads=int(frame.group(3)), shared_bytes=int(smem.group(1)) if smem else 0,
            barriers=int(barriers.group(1)) if barriers else 0,
        )
    return entries


def measure(source: str, names: Sequence[str], arch: int, label: str = "cudcn.cu",
            options: tuple[str, ...] = ()) -> dict[str, Resources]:
    """Resources of the instantiations ``names`` of ``source`` compiled by
    NVRTC for sm_<arch> with cudcn's run-time options (and ``options``).

    Raises ``cupy.cuda.compiler.CompileException`` (with NVRTC's log) when
    the source does not compile, RuntimeError where CuPy could not compile at
    all (no CUDA headers).
    """
    from cupy.cuda import compiler

    program = compiler._NVRTCProgram(source, label, name_expressions=list(names), method="cubin")
    log = io.StringIO()
    _, lowered = program.compile(nvrtc_compile.runtime_options(arch) + (PTXAS_VERBOSE, *options), log_stream=log)
    entries = parse_ptxas_log(log.getvalue())
    missing = [name for name in names if lowered[name] not in entries]
    if missing:
        raise ValueError(f"ptxas's log names no entry for {missing}:\n{log.getvalue()}")
    return {name: entries[lowered[name]] for name in names}


@dataclass(frozen=True)
class GPU:
    """An SM's limits, as the occupancy calculator uses them (see the module docstring)."""

    name: str
    arch: int  # compute capability, e.g. 90
    shared_per_sm: int  # bytes, default carveout preference (the most shared memory)
    shared_per_block_optin: int  # bytes, the most a block may opt in to
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    registers_per_sm: int = 64 * 1024
    registers_per_block: int = 64 * 1024
    registers_per_thread: int = 255
    register_unit: int = 256  # registers are allocated per warp in units of this
    sub_partitions: int = 4  # the register file's partitions, one per warp scheduler
    shared_reserved: int = 1024  # bytes the driver reserves per block (sm_80 on)
    shared_unit: int = 128  # shared memory is allocated per block in units of this
    barriers_per_block_slot: int = 2  # named barriers that come with each of blocks_per_sm (sm_90)

    @property
    def warps_per_sm(self) -> int:
        return self.threads_per_sm // WARP


#: The GPUs the report computes occupancy for, by compute capability: an
#: A100 (sm_80) and an H100 (sm_90).
GPUS = {
    80: GPU("A100", 80, shared_per_sm=164 * 1024, shared_per_block_optin=163 * 1024),
    90: GPU("H100", 90, shared_per_sm=228 * 1024, shared_per_block_optin=227 * 1024),
}


@dataclass(frozen=True)
class Occupancy:
    """Theoretical occupancy of one launch shape on one GPU."""

    blocks: int  # resident blocks per SM
    warps: int  # resident warps per SM
    fraction: float  # warps / the SM's maximum warps
    limiter: str  # what sets `blocks`: warps, blocks, registers, shared memory or barriers


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def occupancy(gpu: GPU, registers: int, threads: int, shared_bytes: int = 0, barriers: int = 0) -> Occupancy:
    """Resident blocks and warps per SM of a kernel using ``registers`` per
    thread, launched in blocks of ``threads`` with ``shared_bytes`` of
    static + dynamic shared memory per block and ``barriers`` named barriers
    (the rules of the module docstring). 0 blocks where the block cannot
    launch at all."""
    warps = -(-threads // WARP)
    per_warp = _round_up(registers * WARP, gpu.register_unit)
    shared = _round_up(shared_bytes + gpu.shared_reserved, gpu.shared_unit)
    too_big = (threads > 1024 or registers > gpu.registers_per_thread
               or per_warp * _round_up(warps, gpu.sub_partitions) > gpu.registers_per_block
               or shared_bytes > gpu.shared_per_block_optin)
    limits = {  # in the calculator's order of precedence for naming the limiter
        "warps": gpu.warps_per_sm // warps,
        "registers": (gpu.registers_per_sm // gpu.sub_partitions // per_warp * gpu.sub_partitions // warps
                      if per_warp else gpu.blocks_per_sm),
        "shared memory": gpu.shared_per_sm // shared,
        "blocks": gpu.blocks_per_sm,
    }
    if gpu.arch >= 90 and barriers:
        limits["barriers"] = gpu.barriers_per_block_slot * gpu.blocks_per_sm // barriers
    blocks = 0 if too_big else min(limits.values())
    limiter = "launch limits" if too_big else min(limits, key=limits.get)
    return Occupancy(blocks, blocks * warps, blocks * warps / gpu.warps_per_sm, limiter)


#: Theoretical occupancy floors on sm_90 (H100): the column-free kernels
#: (MMA tiles, many registers by design) at least 25%, every other kernel
#: (the sampling kernels im2col, col2im, col2im_coord, the sorted col2im's
#: keys and gather, the layout passes, the split sum) at least 50%.
FUSED_FLOOR = 0.25
OTHER_FLOOR = 0.5
BUDGET_ARCH = 90


def occupancy_floor(kernel: str) -> float:
    """The least theoretical occupancy on sm_90 that ``kernel`` (a launchable name) must reach."""
    return FUSED_FLOOR if kernel in kernels.FUSED_KERNELS else OTHER_FLOOR


@dataclass(frozen=True)
class Row:
    """One instantiation on one architecture: its resources, launch shape and occupancy."""

    kernel: str  # launchable name
    dtype: str
    index: str
    name: str  # name expression
    arch: int
    resources: Resources
    threads: int  # per block
    dynamic_shared_bytes: int
    occupancy: Occupancy | None  # None for an architecture without a GPU in GPUS


def budget_problems(row: Row) -> list[str]:
    """What ``row`` breaks of the budgets: no spills and no other local
    memory (stack frame) anywhere; on sm_90, the occupancy floor of its
    kernel (:func:`occupancy_floor`)."""
    r = row.resources
    problems = []
    if r.spill_stores or r.spill_loads:
        problems.append(f"spills {r.spill_stores} B stored, {r.spill_loads} B loaded")
    if r.stack_frame:
        problems.append(f"{r.stack_frame} B stack frame (local memory)")
    if row.arch == BUDGET_ARCH and row.occupancy is not None:
        floor = occupancy_floor(row.kernel)
        if row.occupancy.fraction < floor:
            problems.append(f"occupancy {row.occupancy.fraction:.1%} < {floor:.0%}")
    return problems


def rows_for(source: str, dtype: str, arch: int, block: int = CupyEngine.block,
             instantiations: Iterable[tuple[str, str, str]] | None = None, label: str | None = None,
             options: tuple[str, ...] = ()) -> list[Row]:
    """A :class:`Row` per instantiation of one dtype (default: every one
    :func:`cudcn.backends.cuda.kernels.instantiations` lists) on sm_<arch>,
    launched as an engine with grid-stride block ``block`` (the GPU engine's)
    launches them."""
    items = list(instantiations if instantiations is not None else kernels.instantiations(dtype))
    measured = measure(source, [name for _, _, name in items], arch, label or f"cudcn_{dtype}.cu", options)
    gpu = GPUS.get(arch)
    rows = []
    for kernel, index, name in items:
        threads, dynamic = kernels.block_shape(kernel, block)
        r = measured[name]
        occ = None if gpu is None else occupancy(gpu, r.registers, threads, r.shared_bytes + dynamic, r.barriers)
        rows.append(Row(kernel, dtype, index, name, arch, r, threads, dynamic, occ))
    return rows


HEADER = ("| kernel | dtype | index | arch | regs | spill st/ld B | stack B | smem B (static+dyn) | block "
          "| blocks/SM | occupancy | limited by | budget |")


def table(rows: Sequence[Row]) -> str:
    """The report as a Markdown table: a line per row, budget problems in the last column."""
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for row in rows:
        r, occ = row.resources, row.occupancy
        gpu = GPUS.get(row.arch)
        where = f"sm_{row.arch}" + (f" {gpu.name}" if gpu else "")
        occupancy_cells = ("-", "-", "no GPU model") if occ is None else (
            str(occ.blocks), f"{occ.fraction:.1%} ({occ.warps} warps)", occ.limiter)
        problems = budget_problems(row)
        lines.append(
            f"| {row.kernel} | {row.dtype} | {row.index} | {where} | {r.registers} "
            f"| {r.spill_stores}/{r.spill_loads} | {r.stack_frame} | {r.shared_bytes}+{row.dynamic_shared_bytes} "
            f"| {row.threads} | {' | '.join(occupancy_cells)} | {'; '.join(problems) or 'ok'} |"
        )
    return "\n".join(lines)
