"""Time cudcn's CUDA backend against torchvision.ops.deform_conv2d on a GPU.

For each shape and precision (float32 with TF32 off and on, float16,
bfloat16): forward and backward, CUDA events, warm-up, the median of several
repetitions over rotating input sets (so that no run finds its inputs in L2
from the previous one), and the peak device memory each library allocates
above its inputs. Both libraries see the same data (shared through DLPack);
"float32 tf32" runs cudcn under ``cudcn.tf32()`` and torch under
``torch.set_float32_matmul_precision("high")`` with
``torch.backends.cudnn.allow_tf32`` (off for "float32"). Prints Markdown
tables with the ratios cudcn / torchvision last and, with --output, writes
them and a JSON record (environment included).

The first table times cudcn's default algorithm ("auto"). The third times
the forward of each algorithm -- im2col, fused and "auto" (which measures
both on its first call and keeps the faster: the table names its choice) --
beside torchvision and cuDNN's plain convolution of the same shape
(``torch.nn.functional.conv2d``, ``torch.backends.cudnn.benchmark`` on: the
floor a deformable convolution can approach), with each algorithm's peak
memory. The fourth does the same for the backward (all five gradients),
beside torchvision's, with the fused forward + backward over torchvision's
and the fused peak (forward or backward) over torchvision's.

    PYTHONPATH=. python benchmarks/bench_gpu.py [--quick] [--output DIR]

Needs CuPy and a GPU; torchvision is timed when torch with CUDA and
torchvision are importable (it has no bfloat16 kernel, so those rows show cudcn
only).

A second table times cudcn's sampling steps alone, through the public
building blocks (each includes its layout pass): ``deform_im2col``,
``deform_col2im`` and ``deform_col2im_coord``. The repository keeps only the
current kernels; to time two versions, run this script once per checkout of
the library, the same script each time:

    PYTHONPATH=<checkout of the other version> python benchmarks/bench_gpu.py --output old
    PYTHONPATH=. python benchmarks/bench_gpu.py --output new

The record names the cudcn it imported (directory and git commit).

``--quick`` (the quick GPU validation): the first shape only, each
precision once, 5 repetitions.

Where ``benchmarks/gpu_model.py`` exists, a last table puts the performance
model's prediction beside each measurement it predicts (labelled predicted;
the record keeps both), else says "no model". The model's interface:
``predict(shape, precision) -> dict``, with ``shape`` a value of
:data:`SHAPES` (N, C_in, C_out, H, W, k, offset_groups) and ``precision`` a
key of :data:`PRECISIONS`, returning predicted milliseconds keyed
``"<library>.<measurement>"`` after this script's own names: ``cudcn.``
forward_ms, backward_ms, im2col_ms, col2im_ms, col2im_coord_ms,
{im2col,fused,auto}_{forward,backward}_ms; ``torchvision.`` forward_ms,
backward_ms; ``cudnn.forward_ms`` (any subset).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

import cudcn

# name -> (N, C_in, C_out, H, W, k, offset_groups)
SHAPES = {
    "N16 C256->256 64x64 3x3": (16, 256, 256, 64, 64, 3, 1),
    "N8 C64->64 128x128 3x3": (8, 64, 64, 128, 128, 3, 1),
    "N32 C128->128 32x32 3x3 G4": (32, 128, 128, 32, 32, 3, 4),
}
#: precision name -> (dtype, TF32 for float32 GEMMs)
PRECISIONS = {
    "float32": ("float32", False),
    "float32 tf32": ("float32", True),
    "float16": ("float16", False),
    "bfloat16": ("bfloat16", False),
}
ROTATE = 3
#: The performance model, where it exists (see the module docstring).
MODEL = Path(__file__).resolve().parent / "gpu_model.py"


class PeakTracker:
    """A CuPy allocator that counts bytes in use and their peak."""

    def __init__(self, cupy) -> None:
        self.cupy = cupy
        self.pool = cupy.get_default_memory_pool()
        self.in_use = 0
        self.peak = 0

    def malloc(self, nbytes: int):
        memory = self.pool.malloc(nbytes)
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)
        # The returned pointer owns a _Release; when the last reference to the
        # pointer goes, the pool block goes back and the count drops.
        owner = _Release(self, memory, nbytes)
        unowned = self.cupy.cuda.UnownedMemory(memory.ptr, nbytes, owner)
        return self.cupy.cuda.MemoryPointer(unowned, 0)

    def reset(self) -> None:
        self.peak = self.in_use


class _Release:
    def __init__(self, tracker: PeakTracker, memory, nbytes: int) -> None:
        self.tracker, self.memory, self.nbytes = tracker, memory, nbytes

    def __del__(self) -> None:
        self.tracker.in_use -= self.nbytes


def make_inputs(cupy, shape, dtype, seed):
    n, c, o, h, w, k, g = shape
    rng = cupy.random.default_rng(seed)

    def normal(*size, scale=1.0):
        return (rng.standard_normal(size, dtype=cupy.float32) * scale).astype(dtype)

    return dict(
        input=normal(n, c, h, w),
        offset=normal(n, 2 * g * k * k, h, w, scale=2.0),
        mask=rng.uniform(0, 1, (n, g * k * k, h, w), dtype=cupy.float32).astype(dtype),
        weight=normal(o, c, k, k, scale=(c * k * k) ** -0.5),
        bias=normal(o),
    )


def time_cupy(cupy, fn, sets, warmup, repeat):
    """Median milliseconds of fn(set) over rotating sets, CUDA events."""
    for i in range(warmup):
        fn(sets[i % len(sets)])
    times = []
    for i in range(repeat):
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        fn(sets[i % len(sets)])
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def time_torch(torch, fn, sets, warmup, repeat, prepare=None):
    """Like time_cupy with torch events; prepare(set) runs untimed before each call."""
    for i in range(warmup):
        s = sets[i % len(sets)]
        fn(s, prepare(s) if prepare else None)
    times = []
    for i in range(repeat):
        s = sets[i % len(sets)]
        state = prepare(s) if prepare else None
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(s, state)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def cudcn_forward(s):
    return cudcn.deform_conv2d(s["input"], s["offset"], s["weight"], s["bias"], padding=1, mask=s["mask"])


def peak_mb(cupy, tracker, fn, s) -> float:
    """MiB that one call of fn(s) allocates above what is allocated before it, at its peak."""
    cupy.cuda.get_current_stream().synchronize()
    tracker.reset()
    base = tracker.in_use
    fn(s)
    cupy.cuda.get_current_stream().synchronize()
    return (tracker.peak - base) / 2**20


def cudcn_backward(cupy, sets):
    """backward(s): every gradient of set s, with a grad_output of ones made once per set."""
    grads = {id(s): cupy.ones_like(cudcn_forward(s)) for s in sets}

    def backward(s):
        return cudcn.deform_conv2d_backward(
            grads[id(s)], s["input"], s["offset"], s["weight"], s["bias"], padding=1, mask=s["mask"]
        )

    return backward


def bench_cudcn(cupy, tracker, sets, warmup, repeat):
    backward = cudcn_backward(cupy, sets)
    result = {}
    for name, fn in (("forward", cudcn_forward), ("backward", backward)):
        result[f"{name}_ms"] = time_cupy(cupy, fn, sets, warmup, repeat)
        result[f"{name}_peak_mb"] = peak_mb(cupy, tracker, fn, sets[0])
    return result


ALGORITHMS = ("im2col", "fused", "auto")


def bench_algorithms(cupy, tracker, sets, warmup, repeat):
    """Forward and backward milliseconds and peak MiB of each algorithm; what
    "auto" chose for each direction (auto_chose, auto_backward_chose)."""
    backward = cudcn_backward(cupy, sets)
    result = {}
    for name in ALGORITHMS:
        with cudcn.algorithm(name):
            for direction, fn in (("forward", cudcn_forward), ("backward", backward)):
                result[f"{name}_{direction}_ms"] = time_cupy(cupy, fn, sets, warmup, repeat)
                result[f"{name}_{direction}_peak_mb"] = peak_mb(cupy, tracker, fn, sets[0])
    x = sets[0]["input"]
    for direction, prefix in (("forward", "auto_"), ("backward", "auto_backward_")):
        chosen = [c for c in cudcn.algorithm_choices()
                  if c.direction == direction and dict(c.settings)["tf32"] == cudcn.is_tf32_enabled()
                  and c.geometry.dtype == x.dtype
                  and (c.geometry.batch, c.geometry.in_channels, c.geometry.height, c.geometry.width) == x.shape]
        result[prefix + "chose"] = chosen[-1].chosen if chosen else "im2col (only candidate)"
        result[prefix + "seconds"] = chosen[-1].seconds if chosen else {}
    return result


def bench_cudnn(torch, sets, warmup, repeat):
    """cuDNN's plain convolution of the same shape (no offsets, no mask): forward ms and peak MiB."""
    import torch.nn.functional as F

    tsets = [{k: torch.from_dlpack(s[k]) for k in ("input", "weight", "bias")} for s in sets]

    def forward(s, _):
        with torch.no_grad():
            return F.conv2d(s["input"], s["weight"], s["bias"], padding=1)

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # cuDNN's fastest algorithm for the shape, chosen at warm-up
    try:
        result = {"forward_ms": time_torch(torch, forward, tsets, warmup, repeat)}
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        forward(tsets[0], None)
        torch.cuda.synchronize()
        result["forward_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    finally:
        torch.backends.cudnn.benchmark = before
    return result


def bench_sampling(cupy, sets, k, warmup, repeat):
    """Milliseconds of the sampling building blocks (public column layout)."""
    first = sets[0]
    columns = cudcn.deform_im2col(first["input"], first["offset"], k, padding=1, mask=first["mask"])
    grads = {id(s): cupy.ones_like(columns) for s in sets}
    del columns
    steps = {
        "im2col": lambda s: cudcn.deform_im2col(s["input"], s["offset"], k, padding=1, mask=s["mask"]),
        "col2im": lambda s: cudcn.deform_col2im(grads[id(s)], s["offset"], s["input"].shape, k, padding=1,
                                                mask=s["mask"]),
        "col2im_coord": lambda s: cudcn.deform_col2im_coord(grads[id(s)], s["input"], s["offset"], k, padding=1,
                                                            mask=s["mask"]),
    }
    return {f"{name}_ms": time_cupy(cupy, fn, sets, warmup, repeat) for name, fn in steps.items()}


def bench_torchvision(torch, ops, sets, warmup, repeat):
    tsets = [{k: torch.from_dlpack(v) for k, v in s.items()} for s in sets]

    def forward(s, _):
        with torch.no_grad():
            return ops.deform_conv2d(s["input"], s["offset"], s["weight"], s["bias"], padding=1, mask=s["mask"])

    def prepare(s):
        leaves = {k: v.detach().requires_grad_(True) for k, v in s.items()}
        out = ops.deform_conv2d(
            leaves["input"], leaves["offset"], leaves["weight"], leaves["bias"], padding=1, mask=leaves["mask"]
        )
        return out, torch.ones_like(out)

    def backward(s, state):
        out, grad = state
        out.backward(grad)

    result = {"forward_ms": time_torch(torch, forward, tsets, warmup, repeat)}
    result["backward_ms"] = time_torch(torch, backward, tsets, warmup, repeat, prepare)
    for name, fn, prep in (("forward", forward, None), ("backward", backward, prepare)):
        state = prep(tsets[0]) if prep else None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(tsets[0], state)
        torch.cuda.synchronize()
        result[f"{name}_peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        del state
    return result


def forward_difference(torch, ops, s) -> float:
    """Relative max difference of the two forwards (a sanity check)."""
    ours = cudcn.deform_conv2d(s["input"], s["offset"], s["weight"], s["bias"], padding=1, mask=s["mask"])
    t = {k: torch.from_dlpack(v) for k, v in s.items()}
    with torch.no_grad():
        theirs = ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], padding=1, mask=t["mask"])
    a = torch.from_dlpack(ours).double()
    b = theirs.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@contextlib.contextmanager
def tf32(torch, mode: bool):
    """TF32 for float32 products in cudcn and (when present) torch's matmuls
    and cuDNN convolutions, restored after."""
    if torch is not None:
        before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
        torch.set_float32_matmul_precision("high" if mode else "highest")
        torch.backends.cudnn.allow_tf32 = mode
    try:
        with cudcn.tf32(mode):
            yield
    finally:
        if torch is not None:
            torch.set_float32_matmul_precision(before[0])
            torch.backends.cudnn.allow_tf32 = before[1]


def environment(cupy, torch) -> dict:
    """Date, machine and versions, for the record."""
    runtime = cupy.cuda.runtime
    commit = git_commit(Path(__file__).resolve().parent)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode(),
        "driver": runtime.driverGetVersion(), "cuda_runtime": runtime.runtimeGetVersion(),
        "python": platform.python_version(), "numpy": np.__version__, "cupy": cupy.__version__,
        "torch": getattr(torch, "__version__", None), "cudcn": cudcn.__version__, "commit": commit or None,
        "cudcn_from": cudcn_source(),
    }


def cudcn_source() -> str:
    """Where the timed cudcn was imported from: its directory and git commit."""
    where = Path(cudcn.__file__).resolve().parent
    return f"{where} ({git_commit(where) or 'no git'})"


def git_commit(folder: Path) -> str:
    """The checkout's short commit, else CUDCN_COMMIT (a copy of the tree
    without .git, or a machine without git, has none to ask), else ''."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=folder).stdout.strip()
    except OSError:  # no git on this machine
        commit = ""
    return commit or os.environ.get("CUDCN_COMMIT", "")


def _torchvision():
    try:
        import torch
        import torchvision.ops as ops
    except ImportError:
        return None, None
    return (torch, ops) if torch.cuda.is_available() else (None, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="first shape only (each precision), fewer repetitions")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--output", type=Path, help="directory for bench_gpu.md and bench_gpu.json")
    args = parser.parse_args(argv)

    import cupy

    tracker = PeakTracker(cupy)
    cupy.cuda.set_allocator(tracker.malloc)
    torch, ops = _torchvision()
    record = environment(cupy, torch)
    shapes = dict(list(SHAPES.items())[:1]) if args.quick else SHAPES
    repeat = 5 if args.quick else args.repeat
    precisions = dict(PRECISIONS)
    problem = _bfloat16_problem(cupy)
    if problem:
        print(f"bfloat16 left out: {problem}")
        del precisions["bfloat16"]

    rows = []
    for shape_name, shape in shapes.items():
        n, c, o, h, w, k, g = shape
        gflop = 2 * n * h * w * o * c * k * k / 1e9
        for precision, (dtype, use_tf32) in precisions.items():
            sets = [make_inputs(cupy, shape, _dtype(dtype), seed) for seed in range(ROTATE)]
            with tf32(torch, use_tf32):
                ours = bench_cudcn(cupy, tracker, sets, args.warmup, repeat)
                ours.update(bench_sampling(cupy, sets, k, args.warmup, repeat))
                ours.update(bench_algorithms(cupy, tracker, sets, args.warmup, repeat))
                theirs, diff, cudnn = None, None, None
                if torch is not None and dtype != "bfloat16":
                    theirs = bench_torchvision(torch, ops, sets, args.warmup, repeat)
                    diff = forward_difference(torch, ops, sets[0])
                if torch is not None:
                    cudnn = bench_cudnn(torch, sets, args.warmup, repeat)
            rows.append(dict(shape=shape_name, dtype=precision, gflop=gflop, cudcn=ours, torchvision=theirs,
                             cudnn=cudnn, forward_rel_diff=diff))
            del sets
            cupy.get_default_memory_pool().free_all_blocks()

    model = load_model()
    for row in rows:
        row["model"] = predict(model, row)
    table = "\n\n".join([render(rows, record), render_sampling(rows), render_algorithms(rows),
                           render_backward_algorithms(rows), render_model(rows, model is not None)])
    print(table)
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        (args.output / "bench_gpu.md").write_text(table + "\n")
        (args.output / "bench_gpu.json").write_text(json.dumps({"environment": record, "rows": rows}, indent=2))
    return 0


def load_model(path: Path = MODEL):
    """The performance model (benchmarks/gpu_model.py) as a module, or None where the file is absent."""
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("gpu_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def predict(model, row: dict) -> dict:
    """The model's predicted milliseconds for one row ({} without a model;
    {"error": ...} when it fails, which never stops the benchmark)."""
    if model is None:
        return {}
    try:
        return {str(k): float(v) for k, v in model.predict(SHAPES[row["shape"]], row["dtype"]).items()}
    except Exception as error:  # a model under development: report, go on
        return {"error": f"{type(error).__name__}: {error}"}


def measured(row: dict, key: str) -> float | None:
    """The measurement "<library>.<name>" of a row, or None."""
    library, _, name = key.partition(".")
    value = (row.get(library) or {}).get(name)
    return value if isinstance(value, (int, float)) else None


def render_model(rows: list[dict], have_model: bool) -> str:
    """The last table: each prediction beside its measurement, or "no model"."""
    if not have_model:
        return f"Performance model: no model ({MODEL.parent.name}/{MODEL.name} not present)."
    lines = [
        f"Performance model ({MODEL.parent.name}/{MODEL.name}): predicted milliseconds (not measured) beside "
        "the measurement; ratio = measured / predicted:",
        "",
        "| shape | precision | measurement | predicted ms | measured ms | measured/predicted |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        predictions = r.get("model") or {}
        if "error" in predictions:
            lines.append(f"| {r['shape']} | {r['dtype']} | model failed: {predictions['error']} | - | - | - |")
            continue
        for key, predicted in predictions.items():
            value = measured(r, key)
            ratio = "-" if value is None or not predicted else f"{value / predicted:.2f}"
            lines.append(f"| {r['shape']} | {r['dtype']} | {key} | {predicted:.3f} "
                         f"| {'-' if value is None else format(value, '.3f')} | {ratio} |")
    return "\n".join(lines)


def _bfloat16_problem(cupy) -> str | None:
    """Why CuPy cannot hold bfloat16 here (a probe), or None."""
    if importlib.util.find_spec("ml_dtypes") is None:
        return "ml_dtypes is not installed"
    try:
        cupy.empty(1, _dtype("bfloat16"))
    except Exception as error:
        from cudcn.backends.cuda.engine import cupy_bfloat16_problem

        return cupy_bfloat16_problem() or str(error)
    return None


def _dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def render(rows: list[dict], record: dict) -> str:
    """The Markdown table: times, peaks, and the ratios cudcn / torchvision (below 1: cudcn better)."""
    def fmt(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    def ratio(ours, theirs):
        return None if theirs is None or not theirs else ours / theirs

    lines = [
        f"GPU: {record['gpu']}; driver {record['driver']}, CUDA runtime {record['cuda_runtime']}; "
        f"CuPy {record['cupy']}, torch {record['torch']}; cudcn {record['cudcn']} ({record['commit']}); "
        f"{record['date']}",
        "median of CUDA-event timings; peak = device memory allocated above the inputs; "
        "ratios = cudcn / torchvision",
        "",
        "| shape | precision | cudcn fwd ms | tv fwd ms | cudcn bwd ms | tv bwd ms | cudcn fwd TFLOP/s "
        "| cudcn peak fwd/bwd MB | tv peak fwd/bwd MB | fwd ratio | fwd+bwd ratio | peak ratio | fwd rel. diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours, theirs = r["cudcn"], r["torchvision"] or {}
        tflops = r["gflop"] / ours["forward_ms"]  # GFLOP / ms = TFLOP/s
        both = ours["forward_ms"] + ours["backward_ms"]
        their_both = theirs["forward_ms"] + theirs["backward_ms"] if theirs else None
        peak = max(ours["forward_peak_mb"], ours["backward_peak_mb"])
        their_peak = max(theirs["forward_peak_mb"], theirs["backward_peak_mb"]) if theirs else None
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {ours['forward_ms']:.3f} | {fmt(theirs.get('forward_ms'), '.3f')} "
            f"| {ours['backward_ms']:.3f} | {fmt(theirs.get('backward_ms'), '.3f')} | {tflops:.1f} "
            f"| {ours['forward_peak_mb']:.0f} / {ours['backward_peak_mb']:.0f} "
            f"| {fmt(theirs.get('forward_peak_mb'), '.0f')} / {fmt(theirs.get('backward_peak_mb'), '.0f')} "
            f"| {fmt(ratio(ours['forward_ms'], theirs.get('forward_ms')))} | {fmt(ratio(both, their_both))} "
            f"| {fmt(ratio(peak, their_peak))} | {fmt(r['forward_rel_diff'], '.1e')} |"
        )
    return "\n".join(lines)


def render_sampling(rows: list[dict]) -> str:
    """The second table: cudcn's sampling steps alone."""
    lines = [
        "cudcn's sampling steps alone (public building blocks, each with its layout pass):",
        "",
        "| shape | precision | im2col ms | col2im ms | col2im_coord ms |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ours = r["cudcn"]
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {ours['im2col_ms']:.3f} | {ours['col2im_ms']:.3f} "
            f"| {ours['col2im_coord_ms']:.3f} |"
        )
    return "\n".join(lines)


def render_algorithms(rows: list[dict]) -> str:
    """The third table: each algorithm's forward beside torchvision and cuDNN's plain convolution."""
    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    lines = [
        "Forward by algorithm (ms; peak MiB above the inputs); auto = what \"auto\" chose on its first call; "
        "cuDNN = torch.nn.functional.conv2d of the same shape without offsets; ratios = fused / other:",
        "",
        "| shape | precision | im2col ms | fused ms | auto ms (chose) | tv ms | cuDNN ms | fused/tv | fused/cuDNN "
        "| im2col peak | fused peak | cuDNN peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours, theirs, cudnn = r["cudcn"], r["torchvision"] or {}, r.get("cudnn") or {}
        fused = ours["fused_forward_ms"]
        tv, conv = theirs.get("forward_ms"), cudnn.get("forward_ms")
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {ours['im2col_forward_ms']:.3f} | {fused:.3f} "
            f"| {ours['auto_forward_ms']:.3f} ({ours['auto_chose']}) | {fmt(tv)} | {fmt(conv)} "
            f"| {fmt(fused / tv if tv else None, '.2f')} | {fmt(fused / conv if conv else None, '.2f')} "
            f"| {ours['im2col_forward_peak_mb']:.0f} | {ours['fused_forward_peak_mb']:.0f} "
            f"| {fmt(cudnn.get('forward_peak_mb'), '.0f')} |"
        )
    return "\n".join(lines)


def render_backward_algorithms(rows: list[dict]) -> str:
    """The fourth table: each algorithm's backward beside torchvision's; the
    fused forward + backward and the fused peak over torchvision's."""
    def fmt(value, spec=".3f"):
        return "-" if value is None else format(value, spec)

    lines = [
        "Backward by algorithm (ms; peak MiB above the inputs); auto = what \"auto\" chose on its first call; "
        "fwd+bwd = fused forward + fused backward over torchvision's; peak = the larger of forward and backward:",
        "",
        "| shape | precision | im2col ms | fused ms | auto ms (chose) | tv ms | fused/tv | fwd+bwd fused/tv "
        "| im2col peak | fused peak | tv peak | fused/tv peak |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ours, theirs = r["cudcn"], r["torchvision"] or {}
        fused = ours["fused_backward_ms"]
        tv = theirs.get("backward_ms")
        both = ours["fused_forward_ms"] + fused
        their_both = tv + theirs["forward_ms"] if tv else None
        peak = max(ours["fused_forward_peak_mb"], ours["fused_backward_peak_mb"])
        their_peak = max(theirs["forward_peak_mb"], theirs["backward_peak_mb"]) if theirs else None
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {ours['im2col_backward_ms']:.3f} | {fused:.3f} "
            f"| {ours['auto_backward_ms']:.3f} ({ours['auto_backward_chose']}) | {fmt(tv)} "
            f"| {fmt(fused / tv if tv else None, '.2f')} | {fmt(both / their_both if their_both else None, '.2f')} "
            f"| {ours['im2col_backward_peak_mb']:.0f} | {ours['fused_backward_peak_mb']:.0f} "
            f"| {fmt(theirs.get('backward_peak_mb'), '.0f')} | {fmt(peak / their_peak if their_peak else None, '.2f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
