"""CPU speed and memory of multi-scale deformable attention: cudcn's NumPy
backend against HF transformers' pure-torch path.

A Deformable-DETR encoder layer (float32): N=2, four levels 100x150, 50x75,
25x38, 13x19 (S = 19947), M=8 heads, D=32, L=4, P=4, Lq=S; random locations
in [0, 1] and softmax-normalised attention weights. Forward, and forward +
backward (every gradient; cudcn's backward is a separate call that rebuilds
its sampling matrix), timed in this process on the same inputs, interleaved
round by round (``cudcn.cli.bench.median_ms``); the outputs are compared
first. Peak memory: each implementation runs forward + backward once in a
fresh process, and the peak resident set above the one with the inputs
ready is reported (Linux: VmHWM - VmRSS from /proc/self/status), which
counts torch's allocations and NumPy's alike.

    python benchmarks/bench_msda_cpu.py [--repeat 5] [--queries N]

Prints a short table with the machine, load averages, threads and versions.
Nothing is written: on a shared machine the figures are indicative only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import cudcn
from cudcn.cli.bench import median_ms
from cudcn.cli.info import load_average, load_text, machine_record

SHAPES = ((100, 150), (50, 75), (25, 38), (13, 19))
BATCH, HEADS, CHANNELS, POINTS = 2, 8, 32, 4
NAMES = ("cudcn (numpy backend)", "transformers (pure torch)")


def arguments(queries: int | None, seed: int = 0) -> dict:
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
        spatial_shapes=shapes,
        level_start_index=np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]]),
        sampling_locations=rng.random((BATCH, queries, HEADS, levels, POINTS, 2), dtype=np.float32),
        attention_weights=weights.reshape(BATCH, queries, HEADS, levels, POINTS),
    )


def implementations(args: dict) -> dict:
    """name -> (forward, forward + backward); transformers' only where it imports."""
    grad_output = np.ones((BATCH, args["sampling_locations"].shape[1], HEADS * CHANNELS), np.float32)

    def cudcn_forward():
        return cudcn.ms_deform_attn(**args)

    def cudcn_step():
        cudcn.ms_deform_attn(**args)
        return cudcn.ms_deform_attn_backward(grad_output, **args)

    found = {NAMES[0]: (cudcn_forward, cudcn_step)}
    try:
        import torch
        from transformers.models.deformable_detr.modeling_deformable_detr import MultiScaleDeformableAttention
    except ImportError:
        return found
    module = MultiScaleDeformableAttention()
    shapes_list = [tuple(s) for s in SHAPES]
    tensors = {k: torch.from_numpy(v) for k, v in args.items()}
    torch_grad = torch.from_numpy(grad_output)

    def call(value, locations, weights):
        return module(value, tensors["spatial_shapes"], shapes_list, tensors["level_start_index"],
                      locations, weights, 64)

    def torch_forward():
        with torch.no_grad():
            return call(tensors["value"], tensors["sampling_locations"], tensors["attention_weights"]).numpy()

    def torch_step():
        leaves = [tensors[k].clone().requires_grad_() for k in ("value", "sampling_locations", "attention_weights")]
        call(*leaves).backward(torch_grad)
        return [leaf.grad for leaf in leaves]

    found[NAMES[1]] = (torch_forward, torch_step)
    return found


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_in_fresh_process(name: str, queries: int | None) -> float | None:
    """MiB above the inputs that forward + backward of ``name`` peaks at, in a
    new process (None where /proc is not there)."""
    if not Path("/proc/self/status").exists():
        return None
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_msda_cpu as b\n"
        "fns = b.implementations(b.arguments(json.loads(sys.argv[3])))\n"
        "_, step = fns[sys.argv[2]]\n"
        "before = b._status_bytes('VmRSS'); step()\n"
        "print((b._status_bytes('VmHWM') - before) / 2**20)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), name, json.dumps(queries)],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--queries", type=int, default=None, help="Lq (default: S, the encoder)")
    options = parser.parse_args(argv)
    load_at_start = load_average()

    args = arguments(options.queries)
    fns = implementations(args)
    reference = cudcn.ms_deform_attn(**args)
    for name, (forward, _) in fns.items():
        difference = float(np.abs(forward() - reference).max())
        print(f"{name}: max |out - cudcn's| = {difference:.1e}")
    names = list(fns)
    timed = [(fns[n][0], lambda: None) for n in names] + [(fns[n][1], lambda: None) for n in names]
    medians = median_ms(timed, warmup=1, repeat=options.repeat)
    peaks = {n: peak_in_fresh_process(n, options.queries) for n in names}

    record = machine_record(("numpy", "scipy", "torch", "transformers"))
    threads = f"torch {sys.modules['torch'].get_num_threads()}" if "torch" in sys.modules else ""
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
    print(f"\n{record['date']}, {record['machine']}, {record['cpu_count']} CPUs, {load_text(load_at_start)} "
          f"at the start, {load_text(load_average())} at the end; threads: {threads or '-'}; {versions}.")
    queries = args["sampling_locations"].shape[1]
    print(f"MSDA N={BATCH} levels {SHAPES} M={HEADS} D={CHANNELS} P={POINTS} Lq={queries}, float32; "
          f"medians of {options.repeat} interleaved rounds, ms; peak memory above the inputs, MiB\n")
    print("| implementation | forward | forward + backward | peak memory (fwd + bwd) |")
    print("|---|---|---|---|")
    for i, name in enumerate(names):
        peak = "-" if peaks[name] is None else f"{peaks[name]:.0f}"
        print(f"| {name} | {medians[i]:.0f} | {medians[len(names) + i]:.0f} | {peak} |")
    if len(names) == 2:
        ratio = medians[2] / medians[3]
        memory = "-" if None in peaks.values() else f"{peaks[names[0]] / peaks[names[1]]:.2f}"
        print(f"\ncudcn / transformers: time {ratio:.2f} (forward {medians[0] / medians[1]:.2f}), memory {memory}")


if __name__ == "__main__":
    main()
