"""Speed and memory of multi-scale deformable attention: cudcn through its
torch op against HF transformers' pure-torch path and grid_sample by hand.

A Deformable-DETR encoder layer: N=2, four levels 100x150, 50x75, 25x38,
13x19 (S = 19947), M=8 heads, D=32, L=4, P=4, Lq=S; random locations in
[0, 1] and softmax-normalised attention weights.

CPU (float32): forward, and forward + backward (the gradients of value,
sampling_locations and attention_weights, through autograd), of

- cudcn (torch op): ``cudcn.torch.ms_deform_attn`` on CPU tensors, which
  runs the NumPy backend (levels as Python ints, as transformers passes them);
- transformers (pure torch): transformers' ``MultiScaleDeformableAttention``
  (one grid_sample per level, then one weighted sum of the stacked samples);
- grid_sample by hand: one grid_sample per level, weighted and added level
  by level (written here);

timed in this process on the same inputs, interleaved round by round
(``cudcn.cli.bench.median_ms``), after comparing their outputs. Peak memory:
each implementation runs forward + backward once in a fresh process that
first builds the inputs; the peak resident set of that call above the
resident set with the inputs ready is reported (Linux: the high-water mark
is reset through /proc/self/clear_refs, then VmHWM - VmRSS). It counts
NumPy's and torch's allocations alike (tracemalloc sees only NumPy's).

GPU, when CuPy sees one (torch on CUDA, float32, float16, bfloat16): cudcn
(the CUDA backend, when it has MSDA) against transformers' pure-torch path,
timed with CUDA events (medians of interleaved rounds), peak memory
``torch.cuda.max_memory_allocated`` above the inputs (cudcn allocates from
torch's caching allocator, so it is counted too).

    python benchmarks/bench_msda.py [--repeat 5] [--warmup 1] [--queries N] [--out benchmarks/results]

Writes bench_msda.md (the tables) and bench_msda.json (the figures, date,
machine, load average, threads, BLAS and versions) to --out, and prints the
tables. Timings on a shared machine are indicative only: look at the load
average recorded with them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cudcn.cli.arguments import nonnegative_int, positive_int
from cudcn.cli.bench import median_ms
from cudcn.cli.info import cupy_gpus, load_average, load_text, machine_record

SHAPES = ((100, 150), (50, 75), (25, 38), (13, 19))
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4
OURS, TRANSFORMERS, BY_HAND = "cudcn (torch op)", "transformers (pure torch)", "grid_sample by hand"
NAMES = (OURS, TRANSFORMERS, BY_HAND)
GPU_DTYPES = ("float32", "float16", "bfloat16")


def arguments(queries: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """The encoder layer's arrays (float32); Lq = S unless ``queries`` is given."""
    rng = np.random.default_rng(seed)
    shapes = np.array(SHAPES)
    pixels = int((shapes[:, 0] * shapes[:, 1]).sum())
    queries = pixels if queries is None else queries
    levels = len(SHAPES)
    logits = rng.standard_normal((BATCH, queries, HEADS, levels * POINTS), dtype=np.float32)
    weights = np.exp(logits)
    weights /= weights.sum(-1, keepdims=True)
    return dict(
        value=rng.standard_normal((BATCH, pixels, HEADS, CHANNELS), dtype=np.float32),
        sampling_locations=rng.random((BATCH, queries, HEADS, levels, POINTS, 2), dtype=np.float32),
        attention_weights=weights.reshape(BATCH, queries, HEADS, levels, POINTS),
    )


def grid_sample_by_hand(value, sampling_locations, attention_weights):
    """MSDA from torch's grid_sample, level by level (N, Lq, M*D)."""
    import torch.nn.functional as F

    batch, _, heads, channels = value.shape
    _, queries, _, _, points, _ = sampling_locations.shape
    out = None
    first = 0
    for level, (height, width) in enumerate(SHAPES):
        images = value[:, first:first + height * width].permute(0, 2, 3, 1).reshape(
            batch * heads, channels, height, width)
        first += height * width
        grid = (2 * sampling_locations[:, :, :, level] - 1).transpose(1, 2).reshape(batch * heads, queries, points, 2)
        samples = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weights = attention_weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, queries, points)
        part = (samples * weights).sum(-1)  # (N*M, D, Lq)
        out = part if out is None else out + part
    return out.view(batch, heads * channels, queries).transpose(1, 2)


def implementations(device: str = "cpu") -> dict[str, Callable[..., Any]]:
    """name -> f(value, sampling_locations, attention_weights); transformers'
    only where it imports."""
    import torch

    import cudcn.torch as ct

    shapes_list = [tuple(s) for s in SHAPES]
    found = {
        OURS: lambda v, loc, a: ct.ms_deform_attn(v, shapes_list, None, loc, a),
        BY_HAND: grid_sample_by_hand,
    }
    try:
        from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
    except Exception as error:  # not installed, or its torchvision was built for another torch
        print(f"transformers left out: {type(error).__name__}: {error}", file=sys.stderr)
        return found
    module = MultiScaleDeformableAttention()
    shapes = torch.tensor(SHAPES, device=device)
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    found[TRANSFORMERS] = lambda v, loc, a: module(v, shapes, shapes_list, starts, loc, a, 64)
    return {name: found[name] for name in NAMES if name in found}


def steps(fn: Callable[..., Any], tensors: dict[str, Any]) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """(forward without autograd, forward + backward of every input) of fn on tensors."""
    import torch

    grad_output = None

    def forward():
        with torch.no_grad():
            return fn(*tensors.values())

    def forward_backward():
        nonlocal grad_output
        leaves = [t.detach().requires_grad_() for t in tensors.values()]
        out = fn(*leaves)
        if grad_output is None:
            grad_output = torch.ones_like(out)
        out.backward(grad_output)
        return [leaf.grad for leaf in leaves]

    return forward, forward_backward


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_above_inputs(name: str, queries: int | None) -> float:
    """In this (fresh) process: MiB by which forward + backward of ``name``
    raises the resident set above its level with the inputs ready."""
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in arguments(queries).items()}
    _, step = steps(implementations()[name], tensors)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def peak_in_fresh_process(name: str, queries: int | None) -> float | None:
    """:func:`peak_rss_above_inputs` in a new Python process (None where
    /proc does not offer it)."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_msda as b; "
            "print(b.peak_rss_above_inputs(sys.argv[2], json.loads(sys.argv[3])))")
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), name, json.dumps(queries)],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def measure_cpu(queries: int | None, warmup: int, repeat: int, memory: bool = True) -> dict[str, dict]:
    """name -> forward_ms, forward_backward_ms, max_abs_diff (output vs
    cudcn's), peak_mib (or None)."""
    import torch

    tensors = {k: torch.from_numpy(v) for k, v in arguments(queries).items()}
    fns = implementations()
    prepared = {name: steps(fn, tensors) for name, fn in fns.items()}
    reference = prepared[OURS][0]()
    differences = {name: float((forward() - reference).abs().max()) for name, (forward, _) in prepared.items()}
    names = list(prepared)
    nothing = lambda: None  # noqa: E731 (the CPU needs no synchronisation)
    timed = [(prepared[n][0], nothing) for n in names] + [(prepared[n][1], nothing) for n in names]
    medians = median_ms(timed, warmup, repeat)
    return {
        name: {
            "forward_ms": medians[i],
            "forward_backward_ms": medians[len(names) + i],
            "max_abs_diff": differences[name],
            "peak_mib": peak_in_fresh_process(name, queries) if memory else None,
        }
        for i, name in enumerate(names)
    }


def measure_gpu(queries: int | None, warmup: int, repeat: int) -> dict[str, dict[str, dict]]:
    """dtype -> name -> forward_ms, forward_backward_ms, max_abs_diff,
    peak_mib, or status "not available: ..." (cudcn without CUDA MSDA)."""
    import torch

    results: dict[str, dict[str, dict]] = {}
    for dtype_name in GPU_DTYPES:
        dtype = getattr(torch, dtype_name)
        tensors = {k: torch.from_numpy(v).to("cuda", dtype) for k, v in arguments(queries).items()}
        fns = {name: fn for name, fn in implementations("cuda").items() if name != BY_HAND}
        ready, row = {}, {}
        for name, fn in fns.items():
            forward, forward_backward = steps(fn, tensors)
            try:
                row[name] = {"output": forward().float()}
                forward_backward()
            except Exception as error:  # the CUDA backend may not have MSDA yet
                row[name] = {"status": f"not available: {type(error).__name__}: {error}"}
                continue
            ready[name] = (forward, forward_backward)
        reference = row.get(TRANSFORMERS, {}).get("output")
        for name in ready:
            output = row[name].pop("output")
            row[name]["max_abs_diff"] = None if reference is None else float((output - reference).abs().max())
            row[name]["status"] = "ok"
        names = list(ready)
        timed = [(ready[n][0], torch.cuda.synchronize) for n in names]
        timed += [(ready[n][1], torch.cuda.synchronize) for n in names]
        medians = median_ms(timed, warmup, repeat)
        for i, name in enumerate(names):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            ready[name][1]()
            torch.cuda.synchronize()
            row[name] |= {"forward_ms": medians[i], "forward_backward_ms": medians[len(names) + i],
                          "peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
        results[dtype_name] = row
    return results


def environment(warmup: int, repeat: int, load_at_start: list[float] | None) -> dict:
    """Date, machine, versions, threads and BLAS (with its CPU kernel), rounds,
    and the load average at the start and the end."""
    import torch

    threads = {"torch": torch.get_num_threads()}
    blas = []
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            if pool["user_api"] == "blas":
                blas.append(f"{pool['internal_api']} {pool.get('version') or ''} ({pool['prefix']}, "
                            f"kernel {pool.get('architecture') or 'unknown'}, {pool['num_threads']} threads)")
    except ImportError:
        blas.append("unknown (threadpoolctl not installed)")
    gpus, _ = cupy_gpus()
    record = machine_record(("numpy", "scipy", "torch", "transformers", "cupy-cuda13x"))
    return record | {
        "threads": threads, "blas": blas, "gpus": [g.get("name") for g in gpus], "warmup": warmup, "repeat": repeat,
        "load_average_at_start": load_at_start, "load_average_at_end": load_average(),
    }


def markdown(env: dict, queries: int, cpu: dict[str, dict], gpu: dict[str, dict[str, dict]] | None) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        "# Multi-scale deformable attention: Deformable-DETR encoder layer",
        "",
        f"N={BATCH}, levels {', '.join(f'{h}×{w}' for h, w in SHAPES)}, M={HEADS}, D={CHANNELS}, "
        f"L={len(SHAPES)}, P={POINTS}, Lq={queries}.",
        "",
        f"{env['date']}, {env['machine']}, {env['cpu_count']} CPUs, {load_text(env['load_average_at_start'])} "
        f"at the start, {load_text(env['load_average_at_end'])} at the end; torch threads "
        f"{env['threads']['torch']}; BLAS {'; '.join(env['blas']) or 'unknown'}; {versions}.",
        "",
        f"CPU, float32: medians of {env['repeat']} interleaved rounds (after {env['warmup']} warm-up), ms; "
        "peak resident memory of forward + backward above the inputs, in a fresh process, MiB:",
        "",
        "| implementation | forward | forward + backward | peak memory | max abs diff to cudcn |",
        "|---|---|---|---|---|",
    ]
    for name, r in cpu.items():
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {name} | {r['forward_ms']:.0f} | {r['forward_backward_ms']:.0f} | {peak} "
                     f"| {r['max_abs_diff']:.1e} |")
    if TRANSFORMERS in cpu:
        ours, theirs = cpu[OURS], cpu[TRANSFORMERS]
        memory = ("-" if None in (ours["peak_mib"], theirs["peak_mib"])
                  else f"{ours['peak_mib'] / theirs['peak_mib']:.2f}")
        lines += ["", f"cudcn / transformers: forward + backward time "
                      f"{ours['forward_backward_ms'] / theirs['forward_backward_ms']:.2f} "
                      f"(forward {ours['forward_ms'] / theirs['forward_ms']:.2f}), peak memory {memory}."]
    if gpu is None:
        lines += ["", "GPU: none visible to CuPy here; GPU speed is unmeasured."]
    else:
        lines += ["", f"GPU ({', '.join(env['gpus'])}): CUDA-event medians, ms; peak "
                      "torch.cuda.max_memory_allocated above the inputs, MiB:", "",
                  "| dtype | implementation | forward | forward + backward | peak memory | max abs diff to transformers |",
                  "|---|---|---|---|---|---|"]
        for dtype_name, row in gpu.items():
            for name, r in row.items():
                if r["status"] != "ok":
                    lines.append(f"| {dtype_name} | {name} | {r['status']} | | | |")
                    continue
                diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
                lines.append(f"| {dtype_name} | {name} | {r['forward_ms']:.2f} | {r['forward_backward_ms']:.2f} "
                             f"| {r['peak_mib']:.0f} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=positive_int, default=5, help="timed rounds; medians are reported")
    parser.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed rounds first")
    parser.add_argument("--queries", type=positive_int, default=None, help="Lq (default: S, the encoder)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for bench_msda.md and bench_msda.json (default benchmarks/results)")
    options = parser.parse_args(argv)
    load_at_start = load_average()

    queries = options.queries or sum(h * w for h, w in SHAPES)
    cpu = measure_cpu(options.queries, options.warmup, options.repeat)
    gpus, _ = cupy_gpus()
    gpu = measure_gpu(options.queries, options.warmup, options.repeat) if gpus else None
    env = environment(options.warmup, options.repeat, load_at_start)
    table = markdown(env, queries, cpu, gpu)
    print(table)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "bench_msda.md").write_text(table)
    record = env | {"queries": queries, "cpu": cpu, "gpu": gpu}
    (options.out / "bench_msda.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
