"""A performance model of cudcn's CUDA path and torchvision's deform_conv2d on an H100.

Every number it prints is **predicted by a model, not measured**. It turns
what the instruments count without a GPU into predicted milliseconds:

- bytes and 32-byte sectors per kernel and access kind (global loads,
  stores, atomics; shared-memory wavefronts), counted by the cooperative
  emulator (``tests/emulation``, ``EmulatedEngine(stats=True)``) on the real
  kernel source at two small sizes of each benchmark shape and scaled to
  the full shape by a fitted law (:func:`fit_law`);
- the launch sequence (kernels, grids, GEMMs, the backend's own array
  operations) of each algorithm from a dry run of the real backend code at
  the full shape (``tests/emulation/dry_run.py``, ``record=True``);
- occupancy from the resource report (ptxas through NVRTC, sm_90,
  ``cudcn/backends/cuda/resources.py``) and the loads each warp has in
  flight, read from the SASS (:func:`load_batches`);
- torchvision's algorithm (im2col in NCHW, chunks of up to 32 images, a
  GEMM per chunk and group, col2im with atomics, col2im_coord; no bfloat16)
  modelled from its source the same way: its warps' addresses are simulated
  in NumPy at the full shape (:func:`torchvision_counts`); cuDNN's plain
  convolution is the floor (FLOPs at the GEMM rate, minimum bytes).

Run (from the repository root):

    PYTHONPATH=. python benchmarks/gpu_model.py             # predictions from the stored counts
    PYTHONPATH=. python benchmarks/gpu_model.py --count     # count again (g++, NVRTC, ptxas, nvdisasm;
                                                            #   ~50 min on 2 busy cores), rewrite
                                                            #   benchmarks/results/gpu_model.* and the docs' quote
    PYTHONPATH=. python benchmarks/gpu_model.py --calibrate OUT/bench_gpu.json   # predicted beside measured
    PYTHONPATH=. python benchmarks/gpu_model.py --check     # are the stored counts those of today's kernels?

After a kernel, launcher or chunking change, ``--count`` re-reads every
instrument: the predictions follow the code, nothing is typed in. The
hardware constants below are the only numbers written by hand (each with
its source); ``--calibrate`` on the first GPU run says which of them to
correct.

Operators are table entries (:data:`OPERATORS`, :class:`Operator`): their
benchmark, how to run one call on an engine, their FLOPs, peer and floor;
counting, scaling and timing are shared.

Interface (benchmarks/bench_gpu.py, tools/gpu_validation.sh quick mode):
``predict(shape, precision)`` with ``shape`` a value of bench_gpu's
``SHAPES`` and ``precision`` a key of its ``PRECISIONS`` returns predicted
milliseconds keyed ``"<library>.<measurement>"`` after bench_gpu's names.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
STORED = RESULTS / "gpu_model.json"
LABEL = "predicted by a model, not measured"

# ----------------------------------------------------------------------------
# Hardware: the only numbers typed in, each with its source.


@dataclass(frozen=True)
class Hardware:
    """One GPU as the model sees it (rates per second, sizes in bytes, times in seconds)."""

    name: str
    sms: int
    clock: float  # Hz, sustained under load
    dram_peak: float  # bytes/s, datasheet
    dram: float  # bytes/s, achievable by a streaming kernel
    l2_bytes: int
    l2: float  # bytes/s, L2 hits, all SMs
    l1_per_sm_clock: int  # bytes per clock per SM (L1 / shared memory)
    latency_l1: float
    latency_l2: float
    latency_dram: float  # under load
    atomic_sectors: float  # 32-byte sectors/s that L2 atomics (RED) update
    tensor16: float  # FLOP/s dense float16/bfloat16 tensor cores
    tf32: float  # FLOP/s dense TF32 tensor cores
    fp32: float  # FLOP/s float32 FMA, CUDA cores
    gemm_efficiency: float  # of the peak, cuBLAS/cuDNN on large products (wgmma)
    mma_sync_efficiency: float  # of the peak, mma.sync from registers (cudcn's fused kernels)
    fma_efficiency: float  # of the fp32 peak, a hand-written FMA loop
    launch_device: float  # per kernel launch on the device (gap, ramp, drain)
    launch_host_cupy: float  # host time per CuPy launch (kernel, elementwise op, cuBLAS call)
    call_host_cudcn: float  # host time per cudcn call beyond its launches
    launch_host_torch: float  # host time per torch operator launch

    @property
    def l1(self) -> float:
        return self.l1_per_sm_clock * self.sms * self.clock


H100 = Hardware(
    name="H100 SXM", sms=132, clock=1.755e9, dram_peak=3.35e12, dram=2.9e12, l2_bytes=50 * 2**20,
    l2=6.0e12, l1_per_sm_clock=128, latency_l1=40e-9, latency_l2=200e-9, latency_dram=450e-9,
    atomic_sectors=1.2e11, tensor16=989e12, tf32=494e12, fp32=67e12, gemm_efficiency=0.75,
    mma_sync_efficiency=0.6, fma_efficiency=0.7, launch_device=3e-6, launch_host_cupy=10e-6,
    call_host_cudcn=30e-6, launch_host_torch=5e-6,
)
#: The other GPU lent for validation: the same chip with HBM3e.
H200 = replace(H100, name="H200 SXM", dram_peak=4.8e12, dram=4.2e12)
HARDWARE = {"H100": H100, "H200": H200}

SOURCES = """\
- NVIDIA H100 Tensor Core GPU datasheet and Hopper architecture whitepaper: 132 SMs (SXM5), HBM3
  3.35 TB/s, 50 MB L2, dense float16/bfloat16 989 TFLOP/s, TF32 494, float32 67; H200: HBM3e 4.8 TB/s.
- Achievable HBM bandwidth 2.9 TB/s (the issue's 2.8-3.0; streaming copies reach ~85-90% of peak).
- L2 hit bandwidth ~6 TB/s and latencies (L1 ~40 ns, L2 hit ~200 ns, HBM ~450 ns under load) from the
  microbenchmarks of Chips and Cheese, "Nvidia's H100: Funny L2, and Tons of Bandwidth" (2023, H100 PCIe,
  scaled to 132 SMs) and Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU Architecture"
  (arXiv:2402.13499) / "Dissecting the NVIDIA Hopper Architecture through Microbenchmarking and
  Multiple Level Analysis" (arXiv:2501.12084); sustained clock 1.755 GHz (Chips and Cheese's boost).
- L1/shared memory 128 bytes per clock per SM (32 banks of 4 bytes): CUDA C++ Programming Guide.
- L2 atomic throughput 1.2e11 sectors/s: an estimate (about one RED sector per L2 slice and clock),
  the least certain constant (x2 either way); the calibration should set it first.
- mma.sync reaches ~60% of the dense tensor peak on Hopper (wgmma is the full-rate path: HOPPER.md's
  "a matrix kernel whose SASS shows only HMMA ... is on a slower path"; Luo et al. 2025); cuBLAS and
  cuDNN 75% on large products.
- Launch costs from the issue: ~3 us per kernel on the device, ~10 us per CuPy launch on the host;
  cudcn's own host time per call 30 us, a torch operator ~5 us (estimates; the host-time benchmark
  should replace them)."""

ASSUMPTIONS = """\
What is modelled:
- A kernel's time is the largest of its terms: HBM (the distinct bytes of the arrays a launch is
  handed, each read or written once: L2 catches every re-read inside a launch), L2 (the counted
  sectors of its loads and stores x 32 B), L1 (the sectors of its loads, per warp request), atomics
  (the counted atomic sectors), latency (Little's law: each warp's dependent round trips x the
  latency / the warps resident at once), math (FLOPs at the unit's rate) and shared memory
  (counted wavefronts, one per SM per clock); a launch adds its device overhead, and a call takes at
  least its host time (launches x host cost + a per-call cost).
- Round trips: a warp request of a load costs 1/b round trips, where b is the number of global loads
  its SASS issues before the first use of one of them (the batch; read from the SASS of each
  instantiation, matched to the emulator's access sites by line information); latency = a mix of
  the HBM and L2 latencies by the share of the loaded sectors that the HBM term covers.
- Warps resident at once: the resource report's occupancy on sm_90, or fewer where the launch's
  grid does not fill 132 SMs (the fused kernels' small grids).
- Counts at the full shape: per kernel and counter, counts = a x pixels + b x images (pixels =
  N*Ho*Wo; per image: the top and bottom rows, where corners fall outside, and per-launch costs),
  fitted exactly to the emulator's counts at one image of 8 and of 16 rows of the shape's full
  width with the benchmark's distributions (offsets normal with sigma 2, mask uniform); kernels
  the small sizes do not launch (the weight gradient's split sum) are modelled from their arrays'
  bytes as coalesced streams.
- GEMMs (cuBLAS, torchvision's addmm): the larger of FLOPs at 75% of the unit's peak and A, B, C
  (and C again when added to) once through HBM. The backend's own array operations (fills, copies,
  casts, sums) are streams of the bytes the dry run records; a transposing copy reads a sector per
  element through L2.
- torchvision: its kernels' warp addresses simulated at the full shape; its blocks of 512 threads
  (16 warps, 8 rows of one channel plane) re-read their corners from L1, so its L2 traffic is the
  distinct sectors per block; full occupancy assumed (small register counts); col2im_coord's offset
  and mask loads, repeated in its channel loop, hit L1. cudcn's blocks cover 1-2 output pixels of
  one plane (sampling kernels) or are re-gathered across blocks (fused), so their counted
  per-request sectors are taken as L2 traffic: an upper bound.
What is not modelled: L1 hits of cudcn's kernels; caches beyond the L2-reuse rule above (evictions,
  reuse across kernels); tail effects (partial waves); instruction issue limits (address arithmetic,
  the float32 FMA path beyond its FLOPs, bfloat16's software rounding); bank conflicts beyond the
  counted wavefronts; contention of atomics on one address; clocks under power limits; cuBLAS's
  choice of kernels (split-K, tile shapes) and its efficiency on thin products.
Error bar: +-50% per kernel and per call (the issue's static reading was +-50%); ratios between the
  libraries are firmer where both are bound by the same term. The first GPU run calibrates it."""

# ----------------------------------------------------------------------------
# The benchmark's shapes and precisions (benchmarks/bench_gpu.py, read, not copied).


@functools.cache
def _bench_gpu() -> Any:
    """benchmarks/bench_gpu.py as a module (it imports cudcn and NumPy only)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", HERE / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shapes() -> dict[str, tuple[int, ...]]:
    """name -> (N, C_in, C_out, H, W, k, offset_groups): the benchmark's shapes."""
    return dict(_bench_gpu().SHAPES)


def precisions() -> dict[str, tuple[str, bool]]:
    """name -> (dtype, TF32): the benchmark's precisions."""
    return dict(_bench_gpu().PRECISIONS)


def _emulation_path() -> None:
    """Make tests/emulation (the emulator and the dry-run engine) importable."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def _dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


# ----------------------------------------------------------------------------
# Instrument 1: the SASS -- how many global loads a warp has in flight.

#: SASS opcodes (their first part) that end a batch of loads: control flow
#: and waits.
_BATCH_ENDS = {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSYNC", "WARPSYNC", "BAR", "DEPBAR"}
#: Global loads: LDG, generic LD, and cp.async's LDGSTS (which waits at DEPBAR).
_LOADS = ("LDG", "LDGSTS", "LD")
#: Opcodes without a destination register (their first operand is read).
_NO_DESTINATION = {"ST", "STG", "STS", "STL", "RED", "REDG", "BRA", "EXIT", "BAR", "LDGSTS", "DEPBAR", "RET",
                   "CALL", "BSYNC", "BSSY", "WARPSYNC", "NOP", "MEMBAR", "FENCE", "ERRBAR", "CCTL", "YIELD"}
_INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*);")
_LINE_INFO = re.compile(r'//## File "(?:[^"]*/)?([^"/]+)", line (\d+)')
_FUNCTION = re.compile(r"^\.text\.(\S+):", re.M)
_REGISTER = re.compile(r"\bR(\d+)\b(?:\.64)?")


def _registers(operand: str, width: int = 1) -> set[int]:
    found = set()
    for match in _REGISTER.finditer(operand):
        first = int(match.group(1))
        span = 2 if match.group(0).endswith(".64") else width
        found.update(range(first, first + span))
    return found


def load_batches(sass: str) -> dict[str, list[tuple[tuple[str, ...], int]]]:
    """Per function (mangled name) of ``nvdisasm -c -gi`` output: each global
    load's line-information chain ("file:line", the innermost first, then
    the lines it is inlined at) and its batch -- how many global loads the warp issued
    since the last wait before the first instruction that reads one of their
    registers (or a branch, barrier or wait): loads issued together, whose
    latencies overlap."""
    functions = {}
    starts = list(_FUNCTION.finditer(sass))
    for start, after in zip(starts, starts[1:] + [None]):
        text = sass[start.end():after.start() if after else len(sass)]
        loads: list[tuple[tuple[str, ...], int]] = []
        chain: tuple[str, ...] = ()
        pending: set[int] = set()
        batch: list[int] = []  # indices into loads
        reading_chain = False

        def close() -> None:
            for i in batch:
                loads[i] = (loads[i][0], len(batch))
            batch.clear()
            pending.clear()

        for line in text.splitlines():
            info = _LINE_INFO.search(line)
            if info:
                where = f"{info.group(1)}:{info.group(2)}"
                chain = chain + (where,) if reading_chain else (where,)
                reading_chain = True
                continue
            match = _INSTRUCTION.search(line)
            if not match:
                continue
            reading_chain = False
            opcode, suffix, operands = match.groups()
            parts = [p.strip() for p in operands.split(",")] if operands.strip() else []
            has_destination = opcode not in _NO_DESTINATION and bool(parts)
            read = set().union(*(_registers(p) for p in parts[1 if has_destination else 0:])) if parts else set()
            if read & pending:
                close()
            if opcode in _LOADS:
                width = 4 if ".128" in suffix else 2 if ".64" in suffix else 1
                loads.append((chain, 0))
                batch.append(len(loads) - 1)
                if has_destination:
                    pending.update(_registers(parts[0], width))
            elif has_destination:
                pending.difference_update(_registers(parts[0]))
            if opcode in _BATCH_ENDS:
                close()
        close()
        functions[start.group(1)] = loads
    return functions


def sass_round_trips(names: list[str], arch: int = 90) -> dict[str, dict[str, float]]:
    """Per instantiation: round trips per warp request of each global-load
    site, keyed "file:line" or "caller_file:caller_line > file:line" as the
    emulator names sites (:attr:`emulation.transactions.SiteStats.site`);
    "*file:line" keys average over every caller and "caller > *" over every
    load a kernel line makes (for a site whose loads the compiler filed
    under a neighbouring line). Compiled as at run time
    (NVRTC, cudcn's options), with the kernel files included by name rather
    than inlined (so that line information names them) and line information
    on: neither changes an instruction. Assembled by a standalone ptxas
    (NVRTC's own cubin is not one nvdisasm reads), read by nvdisasm."""
    from cupy.cuda import compiler

    from cudcn.backends.cuda import compile as nvrtc_compile
    from cudcn.backends.cuda import kernels

    ptxas, nvdisasm = _tool("ptxas"), _tool("nvdisasm")
    if ptxas is None or nvdisasm is None:
        raise RuntimeError("reading the SASS needs ptxas and nvdisasm (CUDA wheels, PATH or triton's copies)")
    source = "".join(f'#include "{name}"\n' for name in kernels.SOURCES)
    program = compiler._NVRTCProgram(source, "cudcn.cu", name_expressions=list(names), method="ptx")
    options = nvrtc_compile.runtime_options(arch) + ("-lineinfo", f"-I{kernels.kernel_dir()}")
    ptx, mapping = program.compile(options)
    with tempfile.TemporaryDirectory() as folder:
        ptx_file, cubin = Path(folder) / "cudcn.ptx", Path(folder) / "cudcn.cubin"
        ptx_file.write_text(ptx.decode() if isinstance(ptx, bytes) else ptx)
        subprocess.run([ptxas, f"-arch=sm_{arch}", "-lineinfo", str(ptx_file), "-o", str(cubin)], check=True)
        sass = subprocess.run([nvdisasm, "-c", "-gi", str(cubin)], check=True, capture_output=True,
                              text=True).stdout
    batches = load_batches(sass)
    result = {}
    for name in names:
        per_site: dict[str, list[float]] = {}
        for chain, batch in batches.get(mapping[name], []):
            # The emulator's site: the line that called dcn_load, and the
            # outermost line (in the kernel) when helpers lie between.
            here = chain[1] if len(chain) > 1 else chain[0]
            caller = chain[-1] if len(chain) > 2 else None
            keys = [here if caller is None else f"{caller} > {here}", f"*{here}", f"{caller or here} > *"]
            for key in keys:
                per_site.setdefault(key, []).append(1.0 / max(batch, 1))
        result[name] = {key: sum(v) / len(v) for key, v in per_site.items()}
    return result


def _tool(name: str) -> str | None:
    """A CUDA binary utility: PATH, the CUDA wheels (cuda.pathfinder), triton's copy."""
    found = shutil.which(name)
    if found:
        return found
    try:
        from cuda.pathfinder import find_nvidia_binary_utility

        found = find_nvidia_binary_utility(name)
    except Exception:  # not installed, or it has none
        found = None
    if found:
        return found
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if candidate.is_file():
            return str(candidate)
    return None


# ----------------------------------------------------------------------------
# Instrument 2: the emulator's memory accounting, at small sizes, scaled.

#: (images, image height) at which the emulator counts each benchmark shape's
#: kernels, at the shape's full width (warps of the NCHW kernels cover parts
#: of a row, so the width stays), its channels, kernel size and groups: the
#: rows between 8 and 16 add interior pixels only (offsets of sigma 2 reach
#: about 3 rows past an edge), and pixel counts stay multiples of the fused
#: kernels' 64-pixel tiles; the second image separates what each image costs
#: from what each call costs (the weight's copy into its GEMM layout).
SIZES = ((1, 8), (1, 16), (2, 8))
#: What the model reads of each kernel's accounting (summed over its access sites).
COUNTERS = ("load_requests", "load_sectors", "load_trips", "store_requests", "store_sectors",
            "atomic_requests", "atomic_sectors", "shared_wavefronts")


def sizes(op: "Operator", shape: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(N, H, W) of the emulated calls of a benchmark shape."""
    return [(images, rows, op.extent(shape)[2]) for images, rows in SIZES]


def basis(n: int, h: int, w: int) -> list[int]:
    """The law's variables for n images of h x w (stride 1, 'same' padding):
    output pixels, images (each image's top and bottom rows, where corners
    fall outside) and 1 (what a call costs once, whatever its size)."""
    return [n * h * w, n, 1]


def fit_law(rows: list[list[int]], values: list[float]) -> list[float]:
    """(a, b, c) with value = a*pixels + b*images + c at each of the rows
    ((a, b) for counts stored with two-term rows)."""
    return [float(x) for x in np.linalg.solve(np.array(rows, float), np.array(values, float))]


def scale(law: dict, pixels: int, images: int) -> dict[str, float]:
    """A kernel's counters at another size: each counter's fitted law
    (:func:`fit_law` on the stored counts) there, never below 0."""
    at = np.array([pixels, images, 1][:len(law["basis"][0])], float)
    return {name: max(0.0, float(np.dot(fit_law(law["basis"], values), at)))
            for name, values in law["counts"].items()}


def _emulate(library: Any, op: "Operator", args: dict, algorithm: str, direction: str,
             tf32: bool) -> tuple[list, Counter]:
    """One call of an algorithm on the emulated kernels: (accounting merged per kernel, launches per kernel)."""
    import cudcn
    from emulation.harness import EmulatedEngine
    from emulation.transactions import merge

    engine = EmulatedEngine(library, stats=True)
    with cudcn.tf32(tf32):
        op.call(engine, algorithm, direction, args)
    return merge(engine.stats), Counter(name for name, _ in engine.launches)


def kernel_counters(launch: Any, trips: dict[str, float]) -> tuple[dict[str, float], int]:
    """The model's counters of one kernel's merged accounting, and the load
    requests whose site the SASS reading did not find (each then counted as
    its own round trip)."""
    counts = dict.fromkeys(COUNTERS, 0.0)
    unmatched = 0
    for s in launch.sites:
        if s.space == "shared":
            counts["shared_wavefronts"] += s.wavefronts
            continue
        counts[f"{s.op}_requests"] += s.requests
        counts[f"{s.op}_sectors"] += s.sectors
        if s.op == "load":
            caller = f"{s.caller_file}:{s.caller_line}" if s.caller_file else f"{s.file}:{s.line}"
            key = next((k for k in (s.site, f"*{s.file}:{s.line}", f"{caller} > *") if k in trips), None)
            if key is None:
                unmatched += s.requests
            counts["load_trips"] += s.requests * trips.get(key, 1.0)
    return counts, unmatched


def _normal_index(name: str) -> str:
    """The 32-bit-index instantiation of a name expression (the access pattern does not depend on it)."""
    return re.sub(r", long long>$", ", int>", name)


def count_calls(library: Any, op: "Operator", shape: tuple[int, ...], calls: list[tuple[str, str, str]],
                trips: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Per call (precision, algorithm, direction): each kernel's counters at
    :func:`sizes` with the law's basis, ready for :func:`scale`."""
    result = {}
    for precision, algorithm, direction in calls:
        dtype, tf32 = op.precisions()[precision]
        runs = []
        for n, h, w in sizes(op, shape):
            stats, launches = _emulate(library, op, op.arguments(shape, dtype, n, h, w), algorithm, direction, tf32)
            runs.append(((n, h, w), {s.kernel: s for s in stats}, launches))
        kernels = {}
        for name in runs[0][1]:
            rows, values, unmatched = [], {c: [] for c in COUNTERS}, 0
            for (n, h, w), stats, launches in runs:
                counts, missing = kernel_counters(stats[name], trips.get(_normal_index(name), {}))
                unmatched += missing
                rows.append(basis(n, h, w))
                for c in COUNTERS:
                    values[c].append(counts[c])
            kernels[_normal_index(name)] = {"basis": rows, "counts": values, "unmatched_load_requests": unmatched}
        result[f"{precision}|{algorithm}|{direction}"] = kernels
    return result


# ----------------------------------------------------------------------------
# Instrument 3: a dry run of the backend at the full shape -- launches, GEMMs,
# the backend's own array operations.

def dry_run(op: "Operator", shape: tuple[int, ...], precision: str, algorithm: str, direction: str) -> dict:
    """What one call does at the full shape, without running it: each launch
    (kernel, grid, block, bytes of the arrays it is handed), each GEMM and
    each array operation of the backend's own. ``algorithm`` one of the
    operator's, or "public" with ``direction`` one of its building blocks."""
    import cudcn

    _emulation_path()
    from emulation.dry_run import DryRunEngine

    dtype, tf32 = op.precisions()[precision]
    engine = DryRunEngine(record=True)
    args = op.arguments(shape, dtype, *op.extent(shape), empty=True)
    args = {k: engine.adopt(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    with cudcn.tf32(tf32):
        op.call(engine, algorithm, direction, args)
    return {
        "launches": [{"kernel": _normal_index(name), "grid": list(launch.grid), "block": list(launch.block),
                      "footprint": footprint}
                     for (name, launch), footprint in zip(engine.launches, engine.footprints)],
        "gemms": engine.gemm_calls,
        "host_ops": [asdict(x) for x in engine.device_ops],
    }


# ----------------------------------------------------------------------------
# Instrument 4: the resource report -- occupancy on sm_90.


def occupancy(names: Iterable[str], arch: int = 90) -> dict[str, dict]:
    """Per instantiation: registers, shared memory, block, resident blocks and warps per SM (sm_90)."""
    from cudcn.backends.cuda import kernels, resources

    wanted = set(names)
    result = {}
    for dtype in kernels.TYPES:
        items = [item for item in kernels.instantiations(dtype) if item[2] in wanted]
        if not items:
            continue
        for row in resources.rows_for(kernels.source(), dtype, arch, instantiations=items):
            result[row.name] = {"registers": row.resources.registers, "shared_bytes": row.resources.shared_bytes,
                                "threads": row.threads, "blocks_per_sm": row.occupancy.blocks,
                                "warps_per_sm": row.occupancy.warps, "limiter": row.occupancy.limiter}
    return result


# ----------------------------------------------------------------------------
# torchvision's algorithm (torchvision/csrc/ops/cuda/deform_conv2d_kernel.cu,
# read, not copied): its kernels' warp addresses simulated in NumPy at the
# full shape, its GEMMs and array operations listed from its host code.

#: torchvision's launch: 512 threads a block; at most 32 images per chunk
#: (the largest divisor of the batch not above 32).
TV_THREADS = 512
TV_MAX_PARALLEL = 32
WARP = 32


def tv_parallel_images(batch: int) -> int:
    return next((d for d in range(min(batch, TV_MAX_PARALLEL), 1, -1) if batch % d == 0), 1)


def _warps(ids: np.ndarray) -> np.ndarray:
    """Per-thread sector ids (threads, ...) in launch order as warps (warps, 32 * ...); -1 pads."""
    threads = ids.shape[0]
    padded = -(-threads // WARP) * WARP
    if padded != threads:
        ids = np.concatenate([ids, np.full((padded - threads, *ids.shape[1:]), -1, ids.dtype)])
    return ids.reshape(padded // WARP, -1)


def _distinct(rows: np.ndarray) -> np.ndarray:
    """Distinct non-negative values per row."""
    s = np.sort(rows, axis=1)
    new = np.ones(s.shape, bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    return (new & (s >= 0)).sum(axis=1)


def _requests(ids: np.ndarray) -> tuple[int, int]:
    """(warp requests, sectors) of one access site: ids (threads,) sector per thread, -1 for none."""
    rows = _warps(ids)
    return int((rows >= 0).any(axis=1).sum()), int(_distinct(rows).sum())


def _block_distinct(*ids: np.ndarray) -> int:
    """Distinct sectors per block of TV_THREADS threads over every listed access (columns of each), summed."""
    stacked = np.concatenate([i.reshape(i.shape[0], -1) for i in ids], axis=1)
    threads = stacked.shape[0]
    padded = -(-threads // TV_THREADS) * TV_THREADS
    if padded != threads:
        stacked = np.concatenate([stacked, np.full((padded - threads, stacked.shape[1]), -1, stacked.dtype)])
    return int(_distinct(stacked.reshape(padded // TV_THREADS, -1)).sum())


def _sectors(element: np.ndarray, itemsize: int, valid: np.ndarray | None = None) -> np.ndarray:
    ids = (element.astype(np.int64) * itemsize) // 32
    return ids if valid is None else np.where(valid, ids, -1)


def torchvision_counts(shape: tuple[int, ...], dtype: str, seed: int = 0) -> dict:
    """torchvision's forward and backward at the full shape: its kernels'
    counters (simulated warp addresses), GEMMs and array operations, in the
    form :func:`call_time` reads (counts already at the full shape)."""
    n, c, o, h, w, k, g = shape
    b = _dtype(dtype).itemsize
    K, L, cg = k * k, h * w, c // g
    pad = k // 2
    rng = np.random.default_rng(seed)
    offsets = 2.0 * rng.standard_normal((n, g, K, 2, h, w))  # as the benchmark draws them
    image, oy, ox = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    image, oy, ox = image.ravel(), oy.ravel(), ox.ravel()  # threads (b, y, x): one channel plane's
    pixel = oy * w + ox
    threads = n * L

    im2col = dict.fromkeys(("load_requests", "load_sectors", "l2_load_sectors", "store_requests", "store_sectors",
                            "load_trips", "l1_trips", "atomic_requests", "atomic_sectors"), 0.0)
    col2im, coord = dict(im2col), dict(im2col)
    for group in range(g):
        corner_ids, offset_ids, mask_ids, atomic_sites = [], [], [], []
        for kp in range(K):
            i, j = divmod(kp, k)
            dy, dx = offsets[:, group, kp, 0].ravel(), offsets[:, group, kp, 1].ravel()
            y, x = oy - pad + i + dy, ox - pad + j + dx
            at = ((image * g + group) * 2 * K + 2 * kp) * L + pixel
            offset_ids += [_sectors(at, b), _sectors(at + L, b)]
            mask_ids.append(_sectors(((image * g + group) * K + kp) * L + pixel, b))
            plane = image * c * L  # channel 0 of the group's planes; every channel alike
            inside = (y > -1) & (y < h) & (x > -1) & (x < w)
            y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
            corners = []
            for cy, cx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                valid = inside & (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
                corners.append(_sectors(plane + cy * w + cx, b, valid))
            corner_ids.append(np.stack(corners, axis=1))
            # col2im: 9 candidate pixels around the truncated point, each an atomic site.
            ty, tx = np.trunc(y).astype(np.int64), np.trunc(x).astype(np.int64)
            for ey in (-1, 0, 1):
                for ex in (-1, 0, 1):
                    py, px = ty + ey, tx + ex
                    valid = ((py >= 0) & (py < h) & (px >= 0) & (px < w)
                             & (np.abs(y - py) < 1) & (np.abs(x - px) < 1))
                    atomic_sites.append(_sectors(plane + py * w + px, b, valid))
            # col2im_coord, the (kp, direction) threads: per channel, the column
            # (contiguous), four corners (in range, no point test) and, for the
            # row direction with a mask, the bilinear sample's four (L1 hits).
            coordinate = []
            for cy, cx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
                valid = (cy >= 0) & (cy < h) & (cx >= 0) & (cx < w)
                coordinate.append(_sectors(plane + cy * w + cx, b, valid))
            for direction in (0, 1):
                for ids in (*offset_ids[-2:], mask_ids[-1]):
                    r, sectors = _requests(ids)
                    coord["load_requests"] += r * cg
                    coord["load_sectors"] += sectors * cg
                coord["l2_load_sectors"] += _block_distinct(*offset_ids[-2:], mask_ids[-1])
                column = _sectors(np.arange(threads), b)
                for ids in [column, *coordinate] + (coordinate if direction == 0 else []):
                    r, sectors = _requests(ids)
                    coord["load_requests"] += r * cg
                    coord["load_sectors"] += sectors * cg
                coord["l2_load_sectors"] += (_requests(column)[1] + _block_distinct(*coordinate)) * cg
                coord["load_trips"] += (threads / WARP) * (cg + 1)
                coord["l1_trips"] += (threads / WARP) * cg
                coord["store_requests"] += threads / WARP * (1 + (direction == 0))
                coord["store_sectors"] += _requests(_sectors(np.arange(threads), b))[1] * (1 + (direction == 0))
            # col2im's loads: offsets, mask, column (one round trip); atomics.
            for ids in (*offset_ids[-2:], mask_ids[-1], _sectors(np.arange(threads), b)):
                r, sectors = _requests(ids)
                col2im["load_requests"] += r * cg
                col2im["load_sectors"] += sectors * cg
            col2im["l2_load_sectors"] += (_block_distinct(*offset_ids[-2:], mask_ids[-1])
                                          + _requests(_sectors(np.arange(threads), b))[1]) * cg
            col2im["load_trips"] += threads / WARP * cg
            for ids in atomic_sites[-9:]:
                r, sectors = _requests(ids)
                col2im["atomic_requests"] += r * cg
                col2im["atomic_sectors"] += sectors * cg
        # im2col: per kernel point, the offsets and mask, then the four
        # corners (two round trips), then a coalesced column store.
        for ids in offset_ids + mask_ids:
            r, sectors = _requests(ids)
            im2col["load_requests"] += r * cg
            im2col["load_sectors"] += sectors * cg
        for ids in corner_ids:
            for q in range(4):
                r, sectors = _requests(ids[:, q])
                im2col["load_requests"] += r * cg
                im2col["load_sectors"] += sectors * cg
        im2col["l2_load_sectors"] += (_block_distinct(*offset_ids, *mask_ids) + _block_distinct(*corner_ids)) * cg
        im2col["load_trips"] += threads / WARP * K * 2 * cg
        column_sectors = _requests(_sectors(np.arange(threads), b))[1]
        im2col["store_requests"] += threads / WARP * K * cg
        im2col["store_sectors"] += column_sectors * K * cg
    return _torchvision_calls(shape, dtype, im2col, col2im, coord)


def _torchvision_calls(shape: tuple[int, ...], dtype: str, im2col: dict, col2im: dict, coord: dict) -> dict:
    """torchvision's forward and backward as lists of work (kernels with
    counters at the full shape, GEMMs, array operations), from its host code:
    one chunk of up to 32 images at a time, one GEMM per chunk (one
    convolution group here), zero-filled buffers, the output copied out of
    its chunk layout and the bias added; the backward recomputes the columns
    for the weight gradient."""
    n, c, o, h, w, k, g = shape
    b = _dtype(dtype).itemsize
    K, L = k * k, h * w
    per = tv_parallel_images(n)
    chunks = n // per
    columns = c * K * per * L * b  # one chunk's column buffer
    out, image = n * o * L * b, n * c * L * b
    offset, mask = n * 2 * g * K * L * b, n * g * K * L * b

    def kernel(name: str, counts: dict, threads_per_launch: int, footprint: int) -> dict:
        return {"kind": "kernel", "name": f"torchvision {name}", "launches": chunks,
                "blocks": -(-threads_per_launch // TV_THREADS), "threads": TV_THREADS,
                "warps_per_sm": 64, "footprint": footprint, "counts": counts}

    def gemm(m: int, nn: int, kk: int) -> dict:
        return {"kind": "gemm", "m": m, "n": nn, "k": kk, "batch": 1, "operand_dtype": dtype, "out_dtype": dtype,
                "tf32": False, "reads_c": False, "shared_a": False, "shared_b": False}

    def op(kind: str, read: int, written: int) -> dict:
        return {"kind": "op", "op": kind, "read": read, "written": written, "strided": False}

    im2col_work = kernel("im2col", im2col, c * per * L, image + offset + mask + columns * chunks)
    forward = [op("zeros", 0, out), op("zeros", 0, out), op("zeros", 0, columns)]
    for _ in range(chunks):
        forward += [dict(im2col_work, launches=1, footprint=im2col_work["footprint"] / chunks,
                         counts={x: v / chunks for x, v in im2col.items()}), gemm(o, per * L, c * K)]
    forward += [op("copy", out, out), op("add", out, out)]
    backward = [op("zeros", 0, image), op("zeros", 0, offset), op("zeros", 0, mask)]
    for _ in range(chunks):
        backward += [op("zeros", 0, columns), op("copy", out // chunks, out // chunks), gemm(c * K, per * L, o)]
        backward.append(kernel("col2im_coord", {x: v / chunks for x, v in coord.items()}, per * 2 * g * K * L,
                               (columns * chunks + image + 2 * offset + 2 * mask) / chunks) | {"launches": 1})
        backward.append(kernel("col2im", {x: v / chunks for x, v in col2im.items()}, c * K * per * L,
                               (columns * chunks + offset + mask + image) / chunks) | {"launches": 1})
    weight = o * c * K * b
    backward += [op("zeros", 0, weight), op("copy", out, out)]
    for _ in range(chunks):
        backward += [dict(im2col_work, launches=1, footprint=im2col_work["footprint"] / chunks,
                          counts={x: v / chunks for x, v in im2col.items()}), gemm(o, c * K, per * L),
                     op("add", 2 * weight, weight), op("copy", weight, weight)]
    backward += [op("reduce", out, o * b), op("fill", 0, o * b), op("mul", 2 * o * b, o * b)]
    return {"forward": forward, "backward": backward}


# ----------------------------------------------------------------------------
# The time model.

TERMS = ("HBM", "L2", "L1", "atomics", "latency", "math", "shared", "launch")


def _rate(hw: Hardware, operand: str, tf32: bool) -> float:
    if operand in ("float16", "bfloat16"):
        return hw.tensor16
    if operand == "float32":
        return hw.tf32 if tf32 else hw.fp32
    return hw.fp32 / 2  # float64: no benchmark row uses it


def kernel_time(hw: Hardware, work: dict) -> dict:
    """Seconds of one kernel (all its launches in a call): every term, the
    largest (plus the launches' device overhead) and which term that is.

    work: launches, blocks (per launch), threads (per block), warps_per_sm
    (resident, from the occupancy), footprint (bytes of the arrays, all
    launches), counts (:data:`COUNTERS`, all launches; torchvision's also
    l2_load_sectors and l1_trips), and for the fused kernels flops and math
    ("tensor16" or "tf32": mma.sync at its share of the peak; "fp32": FMAs)."""
    counts = dict.fromkeys(COUNTERS, 0.0) | work["counts"]
    warps_per_block = -(-work["threads"] // WARP)
    fill = min(1.0, work["blocks"] / hw.sms)  # SMs a launch occupies
    resident = min(hw.sms * work["warps_per_sm"], work["blocks"] * warps_per_block)
    l2_sectors = counts.get("l2_load_sectors", counts["load_sectors"]) + counts["store_sectors"]
    from_hbm = min(1.0, work["footprint"] / max(32.0 * l2_sectors, 1.0))
    latency = from_hbm * hw.latency_dram + (1 - from_hbm) * hw.latency_l2
    terms = {
        "HBM": work["footprint"] / hw.dram,
        "L2": 32 * l2_sectors / hw.l2,
        "L1": 32 * counts["load_sectors"] / hw.l1,
        "atomics": counts["atomic_sectors"] / hw.atomic_sectors,
        "latency": (counts["load_trips"] * latency + counts.get("l1_trips", 0.0) * hw.latency_l1) / max(resident, 1),
        "math": 0.0,
        "shared": counts["shared_wavefronts"] / (hw.sms * fill * hw.clock),
    }
    if work.get("flops"):
        peak = {"tensor16": hw.tensor16, "tf32": hw.tf32, "fp32": hw.fp32}[work["math"]]
        efficiency = hw.fma_efficiency if work["math"] == "fp32" else hw.mma_sync_efficiency
        terms["math"] = work["flops"] / (peak * efficiency * fill)
    dominant = max(terms, key=terms.get)
    launch = work["launches"] * hw.launch_device
    if launch > terms[dominant]:
        dominant = "launch"
    return {"terms": terms, "seconds": terms[max(terms, key=terms.get)] + launch, "dominant": dominant}


def gemm_time(hw: Hardware, gemm: dict) -> dict:
    """A cuBLAS GEMM: FLOPs at the library's share of the peak, or A, B and C once through HBM."""
    operand, out = _dtype(gemm["operand_dtype"]).itemsize, _dtype(gemm["out_dtype"]).itemsize
    m, n, k, batch = gemm["m"], gemm["n"], gemm["k"], gemm["batch"]
    flops = 2.0 * m * n * k * batch
    moved = (m * k * operand * (1 if gemm["shared_a"] else batch) + k * n * operand * (1 if gemm["shared_b"] else batch)
             + m * n * out * batch * (2 if gemm["reads_c"] else 1))
    rate = _rate(hw, gemm["operand_dtype"], gemm["tf32"]) * hw.gemm_efficiency
    terms = {"math": flops / rate, "HBM": moved / hw.dram}
    dominant = max(terms, key=terms.get)
    return {"terms": terms, "seconds": terms[dominant] + hw.launch_device, "dominant": dominant}


def op_time(hw: Hardware, op: dict) -> dict:
    """An array operation (fill, copy, cast, sum): a stream of its bytes; a
    transposing copy reads a 32-byte sector per (4-byte) element through L2."""
    terms = {"HBM": (op["read"] + op["written"]) / hw.dram,
             "L2": (8 * op["read"] if op["strided"] else op["read"] + op["written"]) / hw.l2}
    dominant = max(terms, key=terms.get)
    return {"terms": terms, "seconds": terms[dominant] + hw.launch_device, "dominant": dominant}


def call_time(hw: Hardware, works: list[dict], library: str) -> dict:
    """A call's predicted seconds: its work on the device, one after the
    other, or its host time where that is longer (the device then waits)."""
    rows = []
    for work in works:
        timed = {"kernel": kernel_time, "gemm": gemm_time, "op": op_time}[work["kind"]](hw, work)
        rows.append({"name": work.get("name") or work.get("op") or f"GEMM {work['m']}x{work['n']}x{work['k']}",
                     "kind": work["kind"], "launches": work.get("launches", 1), **timed})
    device = sum(r["seconds"] for r in rows)
    launches = sum(r["launches"] for r in rows)
    host = (hw.call_host_cudcn + launches * hw.launch_host_cupy if library == "cudcn"
            else launches * hw.launch_host_torch)
    return {"seconds": max(device, host), "device": device, "host": host, "launches": launches,
            "bound": "host" if host > device else "device", "rows": rows}


def _fused_flops(name: str, shape: tuple[int, ...]) -> tuple[float, str] | None:
    """MMA FLOPs of a column-free kernel over a whole call, from the tiles
    it multiplies (kernels.py's FUSED_PIXELS x FUSED_OUT_CHANNELS blocks,
    32-channel slices in the forward, 64-channel slices and 32-channel
    output steps in the backward; one convolution group), and its unit."""
    from cudcn.backends.cuda import kernels

    template = name.split("<")[0]
    if template not in ("deform_fused_forward", "fused_backward_data", "fused_backward_weight"):
        return None
    n, c, o, h, w, k, g = shape
    tile_p, tile_o, step = kernels.FUSED_PIXELS, kernels.FUSED_OUT_CHANNELS, 32
    up = lambda value, unit: -(-value // unit) * unit  # noqa: E731
    pixels, points, per_group = up(n * h * w, tile_p), k * k, c // g
    if template == "deform_fused_forward":
        flops = 2.0 * pixels * up(o, tile_o) * points * g * up(per_group, step)
    elif template == "fused_backward_data":
        flops = 2.0 * pixels * points * g * up(per_group, tile_o) * up(o, step)
    else:
        flops = 2.0 * up(o, tile_p) * g * up(per_group, tile_o) * points * n * h * w
    policy = name.split(", ")[1]
    return flops, {"FusedF16": "tensor16", "FusedBF16": "tensor16", "FusedTF32": "tf32", "FusedFMA": "fp32"}[policy]


def cudcn_works(op: "Operator", call: dict, laws: dict, kernels_info: dict, shape: tuple[int, ...]) -> list[dict]:
    """A cudcn call (its dry run) as work: each kernel's launches with its
    counts scaled to the full shape, its GEMMs, its array operations."""
    n, h, w = op.extent(shape)
    works: list[dict] = []
    by_kernel: dict[str, list[dict]] = {}
    for launch in call["launches"]:
        by_kernel.setdefault(launch["kernel"], []).append(launch)
    for name, launches in by_kernel.items():
        info = kernels_info.get(name, {})
        footprint = float(sum(x["footprint"] for x in launches))
        if name in laws:
            counts = scale(laws[name], n * h * w, n)
        else:  # not launched at the emulated sizes: a coalesced stream of its arrays
            sectors = footprint / 32
            counts = dict.fromkeys(COUNTERS, 0.0) | {"load_sectors": sectors, "load_requests": sectors / 4,
                                                     "load_trips": sectors / 4 * info.get("mean_trips", 1.0)}
        blocks = sum(math.prod(x["grid"]) for x in launches) / len(launches)
        work = {"kind": "kernel", "name": name, "launches": len(launches), "blocks": blocks,
                "threads": math.prod(launches[0]["block"]), "warps_per_sm": info.get("warps_per_sm", 64),
                "footprint": footprint, "counts": counts, "emulated": name in laws}
        fused = op.flops(name, shape)
        if fused:
            work["flops"], work["math"] = fused
        works.append(work)
    works += [{"kind": "gemm", **gemm} for gemm in call["gemms"]]
    works += [{"kind": "op", "op": x["kind"], **{k: v for k, v in x.items() if k != "kind"}} for x in call["host_ops"]]
    return works


def cudnn_time(hw: Hardware, shape: tuple[int, ...], dtype: str, tf32: bool) -> dict:
    """cuDNN's plain convolution of the shape (the floor): its FLOPs at the
    library's share of the peak, or input, weight and output once through HBM."""
    n, c, o, h, w, k, _ = shape
    b = _dtype(dtype).itemsize
    terms = {"math": 2.0 * n * h * w * o * c * k * k / (_rate(hw, dtype, tf32) * hw.gemm_efficiency),
             "HBM": (n * c * h * w + o * c * k * k + n * o * h * w) * b / hw.dram}
    dominant = max(terms, key=terms.get)
    return {"terms": terms, "seconds": terms[dominant] + hw.launch_device, "dominant": dominant}


# ----------------------------------------------------------------------------
# The operators the model covers: one table entry each.


@dataclass(frozen=True)
class Operator:
    """What the model needs to know of one operator: its benchmark (shapes and
    precisions), how to make and run one call through the CUDA backend (on
    any engine: the emulator's, the dry run's), its FLOPs on tensor cores,
    its peer library's and its floor's times, and its goals. Everything
    else -- counting, scaling, timing, the report -- is shared."""

    name: str
    shapes: Callable[[], dict]  # name -> shape, the benchmark's
    precisions: Callable[[], dict]  # name -> (dtype, TF32)
    extent: Callable[[tuple], tuple[int, int, int]]  # (images, rows, width) of the output
    arguments: Callable[..., dict]  # (shape, dtype, n, h, w, seed=0, empty=False) -> the call's arguments
    call: Callable[[Any, str, str, dict], Any]  # (engine, algorithm, direction or building block, arguments)
    algorithms: tuple[str, ...]
    public: dict[str, str]  # building block timed alone -> the direction whose kernels' counts it shares
    flops: Callable[[str, tuple], Any]  # (kernel, shape) -> (FLOPs, unit) of its MMAs, or None
    peer: str  # the library compared with, and its work per dtype it has
    peer_dtypes: tuple[str, ...]
    peer_work: Callable[[tuple, str], dict]  # (shape, dtype) -> {"forward": [...], "backward": [...]}
    floor: str  # the floor's name, and its time
    floor_time: Callable[[Hardware, tuple, str, bool], dict]
    goals: tuple = ()  # (label, direction or "both", precisions, largest ratio to the peer)
    stored: str = "gpu_model"  # benchmarks/results/<stored>.json and .md


def _dcn_arguments(shape: tuple[int, ...], dtype: str, n: int, h: int, w: int, seed: int = 0,
                   empty: bool = False) -> dict:
    """deform_conv2d's arguments (and a grad_output) at n images of h x w,
    drawn as the benchmark draws them (bench_gpu.make_inputs: offsets normal
    with sigma 2, mask uniform), or left empty (a dry run reads no value)."""
    _, c, o, _, _, k, g = shape
    sizes_of = dict(input=(n, c, h, w), offset=(n, 2 * g * k * k, h, w), mask=(n, g * k * k, h, w),
                    weight=(o, c, k, k), bias=(o,), grad_output=(n, o, h, w))
    if empty:
        arrays = {key: np.empty(size, _dtype(dtype)) for key, size in sizes_of.items()}
    else:
        rng = np.random.default_rng(seed)
        arrays = dict(
            input=rng.standard_normal(sizes_of["input"]), offset=2.0 * rng.standard_normal(sizes_of["offset"]),
            mask=rng.uniform(0, 1, sizes_of["mask"]),
            weight=rng.standard_normal(sizes_of["weight"]) * (c * k * k) ** -0.5,
            bias=rng.standard_normal(o), grad_output=np.ones(sizes_of["grad_output"]),
        )
        arrays = {key: v.astype(_dtype(dtype)) for key, v in arrays.items()}
    return dict(arrays, padding=k // 2)


def _dcn_call(engine: Any, algorithm: str, direction: str, args: dict) -> Any:
    """One deform_conv2d call on an engine: ``algorithm`` "im2col" or
    "fused" and ``direction`` "forward" or "backward" through the algorithm
    registry, or "public" and a building block as cudcn.deform_im2col,
    deform_col2im and deform_col2im_coord call it."""
    import cudcn
    from cudcn.backends.cuda import algorithms, im2col_gemm
    from cudcn.geometry import validate

    operands = {k: args[k] for k in ("input", "offset", "weight", "bias", "mask", "padding")}
    geom = validate(**operands)
    x, offset, mask = args["input"], args["offset"], args["mask"]
    if algorithm == "public":
        columns = engine.xp.empty(geom.columns_shape, x.dtype)
        return {"im2col": lambda: im2col_gemm.im2col_public(engine, geom, x, offset, mask),
                "col2im": lambda: im2col_gemm.col2im_public(engine, geom, columns, offset, mask),
                "col2im_coord": lambda: im2col_gemm.col2im_coord_public(engine, geom, columns, x, offset, mask),
                }[direction]()
    with cudcn.algorithm(algorithm):
        if direction == "forward":
            return algorithms.run("forward", engine, geom, x, offset, args["weight"], args["bias"], mask)
        return algorithms.run("backward", engine, geom, args["grad_output"], x, offset, args["weight"], mask)


DEFORM_CONV2D = Operator(
    name="deform_conv2d", shapes=shapes, precisions=precisions,
    extent=lambda shape: (shape[0], shape[3], shape[4]),  # stride 1, 'same' padding
    arguments=_dcn_arguments, call=_dcn_call, algorithms=("im2col", "fused"),
    public={"im2col": "forward", "col2im": "backward", "col2im_coord": "backward"},
    flops=_fused_flops,
    peer="torchvision", peer_dtypes=("float32", "float16"), peer_work=torchvision_counts,
    floor="cudnn", floor_time=cudnn_time,
    goals=(
        ("forward <= 0.5x torchvision (fp16/bf16)", "forward", ("float16", "bfloat16"), 0.5),
        ("forward <= 0.8x torchvision (fp32)", "forward", ("float32", "float32 tf32"), 0.8),
        ("fwd+bwd <= 0.7x torchvision (fp16/bf16)", "both", ("float16", "bfloat16"), 0.7),
        ("fwd+bwd <= 1.0x torchvision (fp32)", "both", ("float32", "float32 tf32"), 1.0),
    ),
)
#: Every operator the model covers (MSDA, DCNv3: an entry each once their CUDA kernels exist).
OPERATORS = {op.name: op for op in (DEFORM_CONV2D,)}


def _operator(record: dict) -> Operator:
    return OPERATORS[record.get("operator", DEFORM_CONV2D.name)]


# ----------------------------------------------------------------------------
# Predictions.

DIRECTIONS = ("forward", "backward")


def hardware(name: str | None = None) -> Hardware:
    """The GPU to predict for: ``name`` ("H100" or "H200"), else
    CUDCN_MODEL_GPU, else the device CuPy sees where CuPy is already imported
    (an H200 is an H200, anything else is modelled as an H100)."""
    name = name or os.environ.get("CUDCN_MODEL_GPU")
    if name is None and "cupy" in sys.modules:
        try:
            cupy = sys.modules["cupy"]
            device = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()
            name = "H200" if "H200" in device else "H100"
        except Exception:  # no device: the default
            name = None
    return HARDWARE[name or "H100"]


@functools.cache
def stored(operator: str = DEFORM_CONV2D.name) -> dict:
    """An operator's stored counts (benchmarks/results/gpu_model.json for deform_conv2d)."""
    return json.loads((RESULTS / f"{OPERATORS[operator].stored}.json").read_text())


def _with_tf32(works: list[dict], tf32: bool) -> list[dict]:
    return [dict(w, tf32=tf32 and w["operand_dtype"] == "float32") if w["kind"] == "gemm" else w for w in works]


def predict_case(counts: dict, shape_name: str, precision: str, hw: Hardware) -> dict:
    """Every timed call of one shape and precision: {call: call_time(...)} and
    the flat milliseconds, keyed as the benchmark names its measurements."""
    op = _operator(counts)
    entry = counts["shapes"][shape_name]
    shape = tuple(entry["shape"])
    dtype, tf32 = op.precisions()[precision]
    calls = {}
    for algorithm in op.algorithms:
        for direction in DIRECTIONS:
            key = f"{precision}|{algorithm}|{direction}"
            if key in entry["calls"]:
                works = cudcn_works(op, entry["calls"][key], entry["laws"][key], counts["kernels"], shape)
                calls[f"cudcn {algorithm} {direction}"] = call_time(hw, works, "cudcn")
    for block, direction in op.public.items():
        works = cudcn_works(op, entry["calls"][f"{precision}|public|{block}"],
                            entry["laws"][f"{precision}|{op.algorithms[0]}|{direction}"], counts["kernels"], shape)
        calls[f"cudcn {block} alone"] = call_time(hw, works, "cudcn")
    if dtype in entry["peer"]:
        for direction in DIRECTIONS:
            works = _with_tf32(entry["peer"][dtype][direction], tf32)
            calls[f"{op.peer} {direction}"] = call_time(hw, works, op.peer)
    ms: dict[str, Any] = {}
    for direction in DIRECTIONS:
        options = {a: calls[f"cudcn {a} {direction}"]["seconds"]
                   for a in op.algorithms if f"cudcn {a} {direction}" in calls}
        for algorithm, seconds in options.items():
            ms[f"cudcn.{algorithm}_{direction}_ms"] = 1e3 * seconds
        chosen = min(options, key=options.get)
        ms[f"cudcn.auto_{direction}_ms"] = ms[f"cudcn.{direction}_ms"] = 1e3 * options[chosen]
        ms[f"cudcn.auto_{direction}_chose"] = chosen
        if f"{op.peer} {direction}" in calls:
            ms[f"{op.peer}.{direction}_ms"] = 1e3 * calls[f"{op.peer} {direction}"]["seconds"]
    for block in op.public:
        ms[f"cudcn.{block}_ms"] = 1e3 * calls[f"cudcn {block} alone"]["seconds"]
    ms[f"{op.floor}.forward_ms"] = 1e3 * op.floor_time(hw, shape, dtype, tf32)["seconds"]
    return {"ms": ms, "calls": calls}


def predict(shape: tuple[int, ...], precision: str, hardware_name: str | None = None,
            operator: str = DEFORM_CONV2D.name) -> dict[str, float]:
    """Predicted milliseconds ("<library>.<measurement>" after
    benchmarks/bench_gpu.py's names) of one benchmark shape (a value of its
    SHAPES) and precision (a key of its PRECISIONS), from the stored counts;
    predicted by a model, not measured."""
    counts = stored(operator)
    names = [name for name, entry in counts["shapes"].items() if tuple(entry["shape"]) == tuple(shape)]
    if not names:
        raise KeyError(f"no stored counts for shape {tuple(shape)}: run benchmarks/gpu_model.py --count")
    if precision not in OPERATORS[operator].precisions():
        raise KeyError(f"precision {precision!r} is not one of {', '.join(OPERATORS[operator].precisions())}")
    ms = predict_case(counts, names[0], precision, hardware(hardware_name))["ms"]
    return {key: value for key, value in ms.items() if isinstance(value, float)}


def predictions(counts: dict, hw: Hardware) -> dict:
    """Every shape and precision's predictions, in milliseconds, per call and per kernel (JSON-ready)."""
    result = {}
    for shape_name in counts["shapes"]:
        result[shape_name] = {}
        for precision in _operator(counts).precisions():
            case = predict_case(counts, shape_name, precision, hw)
            calls = {}
            for call, timed in case["calls"].items():
                rows = {}
                for row in timed["rows"]:  # kernels by template; GEMMs and array operations each as one row
                    grouped = {"gemm": "cuBLAS GEMMs", "op": "array operations"}
                    name = grouped.get(row["kind"], row["name"].split("<")[0])
                    into = rows.setdefault(name, {"launches": 0, "ms": 0.0, "terms_ms": dict.fromkeys(TERMS, 0.0),
                                                  "dominant": Counter()})
                    into["launches"] += row["launches"]
                    into["ms"] += 1e3 * row["seconds"]
                    into["dominant"][row["dominant"]] += row["seconds"]
                    for term, seconds in row["terms"].items():
                        into["terms_ms"][term] += 1e3 * seconds
                for into in rows.values():
                    into["dominant"] = into["dominant"].most_common(1)[0][0]
                calls[call] = {"ms": 1e3 * timed["seconds"], "device_ms": 1e3 * timed["device"],
                               "host_ms": 1e3 * timed["host"], "launches": timed["launches"], "bound": timed["bound"],
                               "kernels": rows}
            result[shape_name][precision] = {"ms": case["ms"], "calls": calls}
    return result


# ----------------------------------------------------------------------------
# Goals (issue 17, model-predicted) and the report.


def _peer_reference(op: Operator, result: dict, precision: str) -> tuple[dict, str]:
    """The peer's predicted times for a precision: where it has no kernel of
    that dtype (torchvision and bfloat16), its float16 ones."""
    if f"{op.peer}.forward_ms" in result[precision]["ms"]:
        return result[precision]["ms"], precision
    return result["float16"]["ms"], "float16"


def goal_rows(op: Operator, result: dict) -> list[dict]:
    """Each goal at each shape and precision: cudcn ("auto") over the peer, predicted pass or fail."""
    rows = []
    for shape_name, cases in result.items():
        for label, direction, chosen, limit in op.goals:
            for precision in chosen:
                ours = cases[precision]["ms"]
                theirs, against = _peer_reference(op, cases, precision)
                directions = DIRECTIONS if direction == "both" else (direction,)
                mine = sum(ours[f"cudcn.{d}_ms"] for d in directions)
                peer = sum(theirs[f"{op.peer}.{d}_ms"] for d in directions)
                rows.append({"goal": label, "shape": shape_name, "precision": precision, "cudcn_ms": mine,
                             "peer_ms": peer, "against": f"{op.peer} {_short(against)}", "ratio": mine / peer,
                             "limit": limit, "passes": mine / peer <= limit})
    first = next(iter(result))
    if len(op.algorithms) > 1 and "float16" in result[first]:
        ms = result[first]["float16"]["ms"]
        second, reference = (f"cudcn.{a}_forward_ms" for a in reversed(op.algorithms[:2]))
        if second in ms:
            rows.append({"goal": f"{op.algorithms[1]} faster than {op.algorithms[0]} (fp16 forward)", "shape": first,
                         "precision": "float16", "cudcn_ms": ms[second], "peer_ms": ms[reference],
                         "against": op.algorithms[0], "ratio": ms[second] / ms[reference], "limit": 1.0,
                         "passes": ms[second] < ms[reference]})
    return rows


def _short(precision: str) -> str:
    return {"float32": "fp32", "float32 tf32": "fp32 tf32", "float16": "fp16", "bfloat16": "bf16"}[precision]


def render(record: dict) -> str:
    """The stored report (benchmarks/results/gpu_model.md) from the stored record."""
    op = _operator(record)
    result = record["predictions"]
    first, second = op.algorithms[0], op.algorithms[-1]
    peer = {"torchvision": "tv"}.get(op.peer, op.peer)
    lines = [
        f"# GPU performance model of {op.name}: {LABEL}",
        "",
        f"Every time below is **{LABEL}**: `benchmarks/gpu_model.py` on an {record['hardware']['name']}, from",
        f"counts taken without a GPU (kernel sources {record['counted']['kernels']}). Error bar +-50%.",
        "Regenerate: `PYTHONPATH=. python benchmarks/gpu_model.py --count`; compare with a GPU run:",
        "`--calibrate OUT/bench_gpu.json`.",
        "",
        "## Goals of issue 17 (predicted)",
        "",
        f"cudcn = its default algorithm (\"auto\": the faster of {' and '.join(op.algorithms)} by the model); a",
        f"precision {op.peer} has no kernel for (bfloat16) is set against its float16.",
        "",
        "| goal | shape | precision | cudcn ms | against ms | ratio | limit | predicted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in goal_rows(op, result):
        lines.append(f"| {row['goal']} | {row['shape']} | {_short(row['precision'])} | {row['cudcn_ms']:.3f} "
                     f"| {row['peer_ms']:.3f} ({row['against']}) | {row['ratio']:.2f} | {row['limit']:g} "
                     f"| {'pass' if row['passes'] else 'FAIL'} (predicted) |")
    lines += ["", "## Totals (ms, predicted)", "",
              f"| shape | precision | {first} fwd | {second} fwd | auto fwd | {peer} fwd | {op.floor} fwd "
              f"| {first} bwd | {second} bwd | auto bwd | {peer} bwd | auto fwd/{peer} | auto fwd+bwd/{peer} |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda ms, key: f"{ms[key]:.3f}" if key in ms else "-"  # noqa: E731
    for shape_name, cases in result.items():
        for precision, case in cases.items():
            ms = case["ms"]
            theirs, against = _peer_reference(op, cases, precision)
            note = "" if against == precision else f" ({_short(against)})"
            forward, backward = theirs[f"{op.peer}.forward_ms"], theirs[f"{op.peer}.backward_ms"]
            lines.append(
                f"| {shape_name} | {_short(precision)} | {fmt(ms, f'cudcn.{first}_forward_ms')} "
                f"| {fmt(ms, f'cudcn.{second}_forward_ms')} "
                f"| {ms['cudcn.forward_ms']:.3f} ({ms['cudcn.auto_forward_chose']}) "
                f"| {forward:.3f}{note} | {ms[f'{op.floor}.forward_ms']:.3f} "
                f"| {fmt(ms, f'cudcn.{first}_backward_ms')} | {fmt(ms, f'cudcn.{second}_backward_ms')} "
                f"| {ms['cudcn.backward_ms']:.3f} ({ms['cudcn.auto_backward_chose']}) | {backward:.3f}{note} "
                f"| {ms['cudcn.forward_ms'] / forward:.2f} "
                f"| {(ms['cudcn.forward_ms'] + ms['cudcn.backward_ms']) / (forward + backward):.2f} |")
    lines += ["", "## Per kernel (ms, predicted, and the dominant term)", "",
              "Terms: HBM (distinct bytes), L2 (counted sectors), L1 (sectors per request), atomics, latency",
              "(dependent round trips over resident warps), math, shared (wavefronts), launch. A call's total",
              "adds its rows; where its host time is longer, the total is the host time (marked).", ""]
    for shape_name, cases in result.items():
        for call in next(iter(cases.values()))["calls"]:
            if call.endswith("alone"):
                continue
            present = [p for p in cases if call in cases[p]["calls"]]
            lines += [f"### {shape_name}, {call}", "",
                      "| kernel | " + " | ".join(_short(p) for p in present) + " |",
                      "|---|" + "---|" * len(present)]
            names = list(dict.fromkeys(n for p in present for n in cases[p]["calls"][call]["kernels"]))
            for name in names:
                cells = []
                for p in present:
                    row = cases[p]["calls"][call]["kernels"].get(name)
                    cells.append("-" if row is None else f"{row['ms']:.3f} {row['dominant']} (x{row['launches']})")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            totals = []
            for p in present:
                timed = cases[p]["calls"][call]
                totals.append(f"**{timed['ms']:.3f}**" + (" host" if timed["bound"] == "host" else ""))
            lines += ["| total | " + " | ".join(totals) + " |", ""]
    lines += ["## Hardware constants", "", "| constant | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in record["hardware"].items()]
    lines += ["", "Sources:", "", record["sources"], "", "## Assumptions", "", record["assumptions"], ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Counting, checking, calibrating.


def kernel_digest() -> str:
    """A digest of the kernel sources (kernels/*.cu, *.cuh): what the stored counts were taken of."""
    from cudcn.backends.cuda import kernels

    digest = hashlib.sha256()
    for path in sorted(kernels.kernel_dir().glob("*.cu*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _calls_to_run(op: Operator) -> list[tuple[str, str, str]]:
    return [(p, a, d) for p in op.precisions() for a in op.algorithms for d in DIRECTIONS]


def _dry_runs(op: Operator, shape: tuple[int, ...]) -> dict[str, dict]:
    runs = {f"{p}|{a}|{d}": dry_run(op, shape, p, a, d) for p, a, d in _calls_to_run(op)}
    runs.update({f"{p}|public|{block}": dry_run(op, shape, p, "public", block)
                 for p in op.precisions() for block in op.public})
    return runs


def count(op: Operator = DEFORM_CONV2D, shape_names: Iterable[str] | None = None,
          progress: Callable[[str], None] = print) -> dict:
    """Read every instrument and return the record to store (its counts; :func:`complete` adds the predictions)."""
    _emulation_path()
    from emulation import harness

    chosen = {name: shape for name, shape in op.shapes().items() if shape_names is None or name in shape_names}
    record: dict[str, Any] = {"label": LABEL, "operator": op.name, "shapes": {}, "kernels": {}}
    for name, shape in chosen.items():
        record["shapes"][name] = {"shape": list(shape), "calls": _dry_runs(op, shape), "laws": {}, "peer": {}}
    names = sorted({x["kernel"] for entry in record["shapes"].values() for call in entry["calls"].values()
                    for x in call["launches"]})
    progress(f"resources and SASS of {len(names)} instantiations (sm_90)")
    info = occupancy(names)
    try:
        trips = sass_round_trips(names)
        sass = "read"
    except (RuntimeError, subprocess.CalledProcessError) as error:
        progress(f"no SASS reading ({error}): every load request is its own round trip")
        trips, sass = {}, f"not read: {error}"
    for kernel in names:
        sites = [v for key, v in trips.get(kernel, {}).items() if not key.startswith("*") and "> *" not in key]
        record["kernels"][kernel] = info[kernel] | {"mean_trips": sum(sites) / len(sites) if sites else 1.0}
    library = harness.build()
    for name, shape in chosen.items():
        entry = record["shapes"][name]
        for precision, algorithm, direction in _calls_to_run(op):
            key = f"{precision}|{algorithm}|{direction}"
            same = f"float32|{algorithm}|{direction}"
            if algorithm == op.algorithms[0] and precision == "float32 tf32" and same in entry["laws"]:
                entry["laws"][key] = entry["laws"][same]  # the same kernels; only the GEMMs differ
                continue
            progress(f"{name}: emulating {key} at {sizes(op, shape)} (N, H, W)")
            entry["laws"].update(count_calls(library, op, shape, [(precision, algorithm, direction)], trips))
        for dtype in op.peer_dtypes:
            progress(f"{name}: {op.peer} {dtype}")
            entry["peer"][dtype] = op.peer_work(shape, dtype)
    record["counted"] = {"kernels": kernel_digest(), "sizes": [list(s) for s in SIZES], "arch": "sm_90",
                         "sass": sass, "nvrtc": _nvrtc_version()}
    return record


def complete(record: dict, hw: Hardware = H100) -> dict:
    """The record with its hardware, sources, assumptions and predictions (from its counts)."""
    record = dict(record, hardware=asdict(hw), sources=SOURCES, assumptions=ASSUMPTIONS)
    record["predictions"] = predictions(record, hw)
    return record


def _nvrtc_version() -> str:
    try:
        from cupy_backends.cuda.libs import nvrtc

        return ".".join(map(str, nvrtc.getVersion()))
    except Exception:  # no CuPy or no NVRTC
        return "unknown"


def write(record: dict, folder: Path = RESULTS) -> None:
    """The record as <stored>.json and its report as <stored>.md."""
    folder.mkdir(parents=True, exist_ok=True)
    name = _operator(record).stored
    (folder / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (folder / f"{name}.md").write_text(render(record) + "\n")


#: Where docs/gpu-validation.md quotes the stored report, and which of its sections.
DOCS = ROOT / "docs" / "gpu-validation.md"
QUOTED = ("Goals of issue 17 (predicted)", "Totals (ms, predicted)")
_QUOTE = re.compile(r"(<!-- quote: benchmarks/results/gpu_model\.md \(goals, totals\) -->\n)(.*?)(<!-- end quote -->)",
                    re.S)


def quotable(report: str) -> str:
    """The sections of the stored report that the docs quote, each under a bold title."""
    parts = []
    for title in QUOTED:
        body = report.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0].strip("\n")
        parts.append(f"**{title}**\n\n{body}\n")
    return "\n".join(parts)


def quote_into_docs(report: str, docs: Path = DOCS) -> bool:
    """Rewrite the docs' quote of the report; whether it changed."""
    text = docs.read_text()
    if not _QUOTE.search(text):
        raise LookupError(f"{docs.name} has no quote markers for the model's goals and totals")
    updated = _QUOTE.sub(lambda m: m.group(1) + quotable(report) + m.group(3), text)
    docs.write_text(updated)
    return updated != text


def check(record: dict) -> list[str]:
    """What has changed since the record was counted: the kernel sources,
    and any call's launches, GEMMs or array operations (a fresh dry run)."""
    problems = []
    if record["counted"]["kernels"] != kernel_digest():
        problems.append(f"kernel sources changed since the counts "
                        f"({record['counted']['kernels']} -> {kernel_digest()})")
    for name, entry in record["shapes"].items():
        fresh = _dry_runs(_operator(record), tuple(entry["shape"]))
        changed = [key for key in fresh if json.loads(json.dumps(fresh[key])) != entry["calls"].get(key)]
        if changed:
            problems.append(f"{name}: launches changed in {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}")
    return problems


def calibration(bench: dict, hw: Hardware | None = None) -> list[dict]:
    """Each measurement of a bench_gpu.json record beside its prediction."""
    gpu = bench.get("environment", {}).get("gpu", "")
    hw = hw or HARDWARE["H200" if "H200" in gpu else "H100"]
    rows = []
    for row in bench["rows"]:
        predicted = predict_case(stored(), row["shape"], row["dtype"], hw)["ms"]
        for key, value in predicted.items():
            library, _, measurement = key.partition(".")
            measured = (row.get(library) or {}).get(measurement)
            if isinstance(value, float) and isinstance(measured, (int, float)):
                rows.append({"shape": row["shape"], "precision": row["dtype"], "key": key, "predicted_ms": value,
                             "measured_ms": float(measured), "measured_over_predicted": measured / value})
    return rows


def render_calibration(rows: list[dict]) -> str:
    lines = [f"Calibration: measured beside {LABEL}", "",
             "| shape | precision | measurement | predicted ms | measured ms | measured/predicted |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['precision']} | {r['key']} | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} "
              f"| {r['measured_over_predicted']:.2f} |" for r in rows]
    by_library: dict[str, list[float]] = {}
    for r in rows:
        by_library.setdefault(r["key"].split(".")[0], []).append(math.log(r["measured_over_predicted"]))
    lines.append("")
    lines += [f"{library}: geometric mean measured/predicted {math.exp(sum(v) / len(v)):.2f} over {len(v)} measurements"
              for library, v in by_library.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", action="store_true",
                        help="read every instrument again and rewrite the stored results")
    parser.add_argument("--operator", choices=sorted(OPERATORS), default=DEFORM_CONV2D.name)
    parser.add_argument("--shape", action="append",
                        help="with --count: count only this shape (repeatable), keeping the others' stored counts")
    parser.add_argument("--check", action="store_true", help="say whether the stored counts are today's")
    parser.add_argument("--calibrate", type=Path, metavar="BENCH_JSON", help="a bench_gpu.json to compare with")
    parser.add_argument("--gpu", choices=sorted(HARDWARE), help="the GPU to predict for (default H100)")
    parser.add_argument("--quote", action="store_true", help="copy the stored goals and totals into the docs")
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for gpu_model.json and .md (--count)")
    args = parser.parse_args(argv)
    op = OPERATORS[args.operator]
    if args.shape and not set(args.shape) <= set(op.shapes()):
        parser.error(f"--shape: choose from {', '.join(op.shapes())}")
    if args.count:
        fresh = count(op, args.shape, progress=lambda text: print(text, file=sys.stderr, flush=True))
        if args.shape:  # the other shapes' counts as stored
            old = stored(op.name)
            fresh["shapes"] = {name: fresh["shapes"].get(name, entry) for name, entry in old["shapes"].items()}
            fresh["kernels"] = old["kernels"] | fresh["kernels"]
        record = complete(fresh)
        write(record, args.output)
        if args.output == RESULTS and op is DEFORM_CONV2D:
            quote_into_docs(render(record) + "\n")
        print(render(record))
        return 0
    if args.quote:
        changed = quote_into_docs((RESULTS / "gpu_model.md").read_text())
        print(f"{DOCS.relative_to(ROOT)}: {'updated' if changed else 'already up to date'}")
        return 0
    if args.check:
        problems = check(stored(op.name))
        print("\n".join(problems) if problems else "the stored counts are those of the current kernels and launchers")
        return 1 if problems else 0
    if args.calibrate:
        print(render_calibration(calibration(json.loads(args.calibrate.read_text()), args.gpu and HARDWARE[args.gpu])))
        return 0
    print(render(complete(stored(op.name), hardware(args.gpu))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
