"""CPU speed and memory of DCNv3: cudcn's NumPy backend against the
pure-torch path in the manner of InternImage's ``dcnv3_core_pytorch``.

The four stages of InternImage-T (float32, N=2, 3x3 kernel, stride 1, pad
1): 56x56 C=64 G=4, 28x28 C=128 G=8, 14x14 C=256 G=16, 7x7 C=512 G=32;
offsets uniform in [-2, 2] pixels and a softmax-normalised mask, as the
DCNv3 module makes it. The pure-torch path is ``torch_dcnv3_core`` of
tests/dcnv3_reference.py (F.pad of the NHWC input, one grid_sample over
N*G images, mask and sum; its grid in float32 as the original's).
Forward, and forward + backward (every gradient; cudcn's backward is a
separate call that rebuilds its sampling matrix), timed in this process on
the same inputs, interleaved round by round (``cudcn.cli.bench.median_ms``);
the outputs are compared first. Peak memory: each implementation runs
forward + backward once in a fresh process, and the peak resident set above
the one with the inputs ready is reported (Linux: VmHWM - VmRSS), which
counts torch's allocations and NumPy's alike.

    python benchmarks/bench_dcnv3_cpu.py [--repeat 5] [--stages 0 1 2 3]

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_msda import _status_kib  # noqa: E402
from dcnv3_reference import torch_dcnv3_core  # noqa: E402

#: (size, channels, groups) of InternImage-T's stages.
STAGES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))
BATCH, KERNEL, POINTS = 2, 3, 9
NAMES = ("cudcn (numpy backend)", "pure torch (dcnv3_core_pytorch)")


def arguments(stage: int, seed: int = 0) -> dict:
    """One stage's arrays (float32) and scalars."""
    size, channels, groups = STAGES[stage]
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((BATCH, size, size, groups, POINTS), dtype=np.float32)
    mask = np.exp(logits)
    mask /= mask.sum(-1, keepdims=True)
    return dict(
        input=rng.standard_normal((BATCH, size, size, channels), dtype=np.float32),
        offset=rng.uniform(-2, 2, (BATCH, size, size, groups * POINTS * 2)).astype(np.float32),
        mask=mask.reshape(BATCH, size, size, groups * POINTS),
        kernel_h=KERNEL, kernel_w=KERNEL, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
        dilation_w=1, group=groups, group_channels=channels // groups, offset_scale=1.0,
    )


def implementations(args: dict) -> dict:
    """name -> (forward, forward + backward)."""
    import torch

    grad_output = np.ones(args["input"].shape, np.float32)

    def cudcn_forward():
        return cudcn.dcnv3(**args)

    def cudcn_step():
        cudcn.dcnv3(**args)
        return cudcn.dcnv3_backward(grad_output, **args)

    tensors = {k: torch.from_numpy(args[k]) for k in ("input", "offset", "mask")}
    scalars = {k: v for k, v in args.items() if k not in tensors}
    torch_grad = torch.from_numpy(grad_output)

    def torch_forward():
        with torch.no_grad():
            return torch_dcnv3_core(**tensors, **scalars).numpy()

    def torch_step():
        leaves = {k: t.clone().requires_grad_() for k, t in tensors.items()}
        torch_dcnv3_core(**leaves, **scalars).backward(torch_grad)
        return [leaf.grad for leaf in leaves.values()]

    return {NAMES[0]: (cudcn_forward, cudcn_step), NAMES[1]: (torch_forward, torch_step)}


def peak_in_fresh_process(name: str, stage: int) -> float | None:
    """MiB above the inputs that forward + backward of ``name`` peaks at, in a
    new process (None where /proc is not there)."""
    if not Path("/proc/self/status").exists():
        return None
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_dcnv3_cpu as b\n"
        "fns = b.implementations(b.arguments(int(sys.argv[3])))\n"
        "_, step = fns[sys.argv[2]]\n"
        "before = b._status_kib('VmRSS') * 1024; step()\n"
        "print((b._status_kib('VmHWM') * 1024 - before) / 2**20)\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), name, json.dumps(stage)],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="+", default=list(range(len(STAGES))))
    options = parser.parse_args(argv)
    load_at_start = load_average()

    rows = []
    for stage in options.stages:
        args = arguments(stage)
        fns = implementations(args)
        reference = cudcn.dcnv3(**args)
        difference = float(np.abs(fns[NAMES[1]][0]() - reference).max())
        print(f"stage {stage}: max |pure torch - cudcn| = {difference:.1e}")
        timed = [(fns[n][k], lambda: None) for k in (0, 1) for n in NAMES]
        medians = median_ms(timed, warmup=1, repeat=options.repeat)
        peaks = [peak_in_fresh_process(n, stage) for n in NAMES]
        rows.append((stage, medians, peaks))

    import torch

    record = machine_record(("numpy", "scipy", "torch"))
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v)
    print(f"\n{record['date']}, {record['machine']}, {record['cpu_count']} CPUs, {load_text(load_at_start)} "
          f"at the start, {load_text(load_average())} at the end; threads: torch {torch.get_num_threads()}; "
          f"{versions}.")
    print(f"DCNv3 N={BATCH} {KERNEL}x{KERNEL} pad 1, float32; medians of {options.repeat} interleaved rounds, ms; "
          f"peak memory above the inputs, MiB\n")
    print("| stage | cudcn fwd | torch fwd | cudcn fwd+bwd | torch fwd+bwd | time ratio (fwd+bwd) "
          "| cudcn peak | torch peak | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for stage, medians, peaks in rows:
        size, channels, groups = STAGES[stage]
        memory = "-" if None in peaks else f"{peaks[0] / max(peaks[1], 1e-9):.2f}"
        peak = ["-" if p is None else f"{p:.0f}" for p in peaks]
        print(f"| {size}x{size} C={channels} G={groups} | {medians[0]:.1f} | {medians[1]:.1f} | {medians[2]:.1f} "
              f"| {medians[3]:.1f} | {medians[2] / medians[3]:.2f} | {peak[0]} | {peak[1]} | {memory} |")


if __name__ == "__main__":
    main()
