"""Speed and memory of DCNv3 and DCNv4: cudcn against the pure-torch path
in the manner of InternImage's ``dcnv3_core_pytorch``.

The four stages of InternImage-T (N=2, 3x3 kernel, stride 1, pad 1):
56x56 C=64 G=4, 28x28 C=128 G=8, 14x14 C=256 G=16, 7x7 C=512 G=32; offsets
uniform in [-2, 2] pixels and a softmax-normalised mask, as the DCNv3
module makes them. DCNv4 gets the same offsets and mask packed into its
offset_mask. Both run through cudcn.torch (``ct.dcnv3`` / ``ct.dcnv4``,
autograd included), so the two sides see the same tensors.

The pure-torch path is ``torch_dcnv3_core`` of tests/dcnv3_reference.py:
F.pad of the NHWC input, one grid_sample over N*G images, mask and sum; for
DCNv4 it first slices offset_mask into offsets and mask (DCNv4 has no
pure-torch reference of its own; its tests compare with DCNv3's).

Time: forward, and forward + backward (every gradient), medians of
interleaved rounds (``cudcn.cli.bench.median_ms``: each round calls every
implementation once, in turn, so a change of load falls on all alike);
outputs are compared first.

Memory, CPU: each implementation runs forward + backward in a fresh
process. After a warm-up call on a small input (lazy imports, thread
pools) and with the inputs ready, the kernel's high-water mark of the
resident set is reset (Linux ``/proc/self/clear_refs``); the peak reported
is VmHWM - VmRSS afterwards, which counts torch's and NumPy's allocations
alike. Where the mark cannot be reset the peak may include the warm-up's.
GPU (float16, bfloat16, float32, when torch sees a CUDA device):
``torch.cuda.max_memory_allocated`` above the inputs (cudcn's CuPy
allocations come from torch's allocator, so they count).

    python benchmarks/bench_dcnv3.py [--repeat 5] [--stages 0 1 2 3] [--threads N] [--out benchmarks/results] [--no-gpu]

Writes bench_dcnv3.md (the tables) and bench_dcnv3.json (the figures,
date, machine, load averages, threads, BLAS kernel, versions) to --out and
prints the tables. On a shared machine the figures are indicative only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import cudcn
from cudcn.cli.bench import median_ms
from cudcn.cli.info import load_average, load_text, machine_record

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dcnv3_reference import pack, torch_dcnv3_core, unpack  # noqa: E402

#: (size, channels, groups) of InternImage-T's stages.
STAGES = ((56, 64, 4), (28, 128, 8), (14, 256, 16), (7, 512, 32))
BATCH, KERNEL, POINTS = 2, 3, 9
SCALARS = dict(kernel_h=KERNEL, kernel_w=KERNEL, stride_h=1, stride_w=1, pad_h=1, pad_w=1, dilation_h=1,
               dilation_w=1, offset_scale=1.0)
OPERATORS = ("DCNv3", "DCNv4")
OURS, PURE = "cudcn", "pure torch"
GPU_DTYPES = ("float16", "bfloat16", "float32")


def stage_label(stage: int) -> str:
    size, channels, groups = STAGES[stage]
    return f"{size}x{size} C={channels} G={groups}"


def arrays(stage: int, seed: int = 0, size: int | None = None) -> dict:
    """One stage's float32 arrays: input, offset, mask and DCNv4's offset_mask
    (``size`` overrides the stage's H = W)."""
    stage_size, channels, groups = STAGES[stage]
    size = stage_size if size is None else size
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((BATCH, size, size, groups, POINTS), dtype=np.float32)
    mask = np.exp(logits)
    mask /= mask.sum(-1, keepdims=True)
    offset = rng.uniform(-2, 2, (BATCH, size, size, groups * POINTS * 2)).astype(np.float32)
    mask = mask.reshape(BATCH, size, size, groups * POINTS)
    return dict(input=rng.standard_normal((BATCH, size, size, channels), dtype=np.float32), offset=offset,
                mask=mask, offset_mask=pack(offset, mask, groups))


def implementations(stage: int, operator: str, device: str = "cpu", dtype: str = "float32",
                    size: int | None = None) -> dict:
    """{name: (forward, forward + backward)} on ``device`` in ``dtype``; each
    returns what it computed (the output, or the gradients)."""
    import torch

    import cudcn.torch as ct

    _, channels, groups = STAGES[stage]
    scalars = dict(SCALARS, group=groups, group_channels=channels // groups)
    names = ("input", "offset_mask") if operator == "DCNv4" else ("input", "offset", "mask")
    tensors = {k: torch.from_numpy(v).to(device, getattr(torch, dtype)) for k, v in arrays(stage, size=size).items()
               if k in names}
    grad_output = torch.ones_like(tensors["input"])

    def ours(**t):
        return ct.dcnv4(**t, **scalars) if operator == "DCNv4" else ct.dcnv3(**t, **scalars)

    def pure(**t):
        if operator == "DCNv4":
            offset, mask = unpack(t["offset_mask"], groups, POINTS)
            t = dict(input=t["input"], offset=offset.contiguous(), mask=mask.contiguous())
        return torch_dcnv3_core(**t, **scalars)

    def timed(function):
        def forward():
            with torch.no_grad():
                return function(**tensors)

        def step():
            leaves = {k: t.detach().requires_grad_() for k, t in tensors.items()}
            function(**leaves).backward(grad_output)
            return [leaf.grad for leaf in leaves.values()]

        return forward, step

    return {OURS: timed(ours), PURE: timed(pure)}


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_high_water_mark() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def use_threads(count: int | None) -> None:
    """Run on ``count`` CPUs (None: all there are): this process's CPU
    affinity, which sets cudcn's NumPy backend's threads, and torch's threads."""
    import torch

    if count is None:
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:count])
    torch.set_num_threads(count)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=count)  # BLAS and OpenMP pools, for the rest of the process
    except ImportError:
        pass


def measure_peak(name: str, stage: int, operator: str, threads: int | None = None) -> dict:
    """In this process: warm up on a 3x3 image of the stage's channels, reset
    the high-water mark, and measure one forward + backward of ``name`` at ``stage``."""
    use_threads(threads)
    implementations(stage, operator, size=3)[name][1]()
    _, step = implementations(stage, operator)[name]
    reset = _reset_high_water_mark()
    before = _status_bytes("VmRSS")
    step()
    return {"peak_mib": (_status_bytes("VmHWM") - before) / 2**20, "high_water_mark_reset": reset}


def peak_in_fresh_process(name: str, stage: int, operator: str, threads: int | None = None) -> float | None:
    """MiB above the inputs that forward + backward of ``name`` peaks at, in a
    new process (None where /proc is not there)."""
    if not Path("/proc/self/status").exists():
        return None
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import bench_dcnv3 as b\n"
            "print(json.dumps(b.measure_peak(*json.loads(sys.argv[2]))))\n")
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), json.dumps([name, stage, operator, threads])],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def max_difference(fns: dict) -> float:
    import torch

    outputs = [fns[name][0]().double().cpu() for name in (OURS, PURE)]
    return float(torch.max(torch.abs(outputs[0] - outputs[1])))


def measure_cpu(stages: list[int], repeat: int, threads: int | None = None) -> list[dict]:
    rows = []
    for stage in stages:
        for operator in OPERATORS:
            fns = implementations(stage, operator)
            difference = max_difference(fns)
            timed = [(fns[n][k], lambda: None) for k in (0, 1) for n in (OURS, PURE)]
            medians = median_ms(timed, warmup=1, repeat=repeat)
            row = {"stage": stage_label(stage), "operator": operator, "max_abs_difference": difference,
                   "forward_ms": {OURS: medians[0], PURE: medians[1]},
                   "forward_backward_ms": {OURS: medians[2], PURE: medians[3]}}
            row["peak_mib"] = {n: peak_in_fresh_process(n, stage, operator, threads) for n in (OURS, PURE)}
            rows.append(row)
            print(f"measured {operator} {row['stage']} on the CPU (max |difference| {difference:.1e})", file=sys.stderr)
    return rows


def measure_gpu(stages: list[int], repeat: int) -> list[dict]:
    """fp16, bf16, fp32 on the current CUDA device; an implementation that
    cannot run there (cudcn has no CUDA DCNv3 kernels yet) is reported as such."""
    import torch

    sync = torch.cuda.synchronize
    rows = []
    for dtype in GPU_DTYPES:
        for stage in stages:
            for operator in OPERATORS:
                fns = implementations(stage, operator, "cuda", dtype)
                row = {"dtype": dtype, "stage": stage_label(stage), "operator": operator, "status": {},
                       "forward_ms": {}, "forward_backward_ms": {}, "peak_mib": {}}
                ready = {}
                for name, (forward, step) in fns.items():
                    try:
                        forward(), step()
                        sync()
                    except Exception as error:  # e.g. no CUDA kernels for this operator yet
                        row["status"][name] = f"not available: {type(error).__name__}: {error}"[:200]
                        continue
                    row["status"][name] = "ok"
                    ready[name] = (forward, step)
                    before = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                    step()
                    sync()
                    row["peak_mib"][name] = (torch.cuda.max_memory_allocated() - before) / 2**20
                names = list(ready)
                medians = median_ms([(ready[n][k], sync) for k in (0, 1) for n in names], warmup=2, repeat=repeat)
                for i, name in enumerate(names):
                    row["forward_ms"][name] = medians[i]
                    row["forward_backward_ms"][name] = medians[len(names) + i]
                rows.append(row)
    return rows


def environment(load_at_start: list[float] | None) -> dict:
    """Date, machine, versions, threads, the BLAS library and kernel, load averages, GPU."""
    import torch

    from cudcn.backends.numpy.parallel import cpu_count

    record = machine_record(("numpy", "scipy", "torch", "cupy-cuda13x"))
    threads, blas = {"cudcn (numpy backend)": cpu_count(), "torch": torch.get_num_threads()}, []
    try:
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            threads[f"{pool['internal_api']} ({pool['prefix']})"] = pool["num_threads"]
            if pool["user_api"] == "blas":
                blas.append(f"{pool['internal_api']} {pool.get('version')}, kernel {pool.get('architecture')}")
    except ImportError:
        blas.append("unknown (threadpoolctl not installed)")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return record | {"threads": threads, "blas": "; ".join(blas), "gpu_device": gpu,
                     "load_average_at_start": load_at_start, "load_average_at_end": load_average()}


def _ratio(row: dict, key: str) -> str:
    times = row[key]
    return f"{times[OURS] / times[PURE]:.2f}" if OURS in times and PURE in times else "-"


def _cell(row: dict, name: str) -> str:
    if name not in row["forward_backward_ms"]:
        return "-"
    return f"{row['forward_backward_ms'][name]:.1f} ({row['forward_ms'][name]:.1f})"


def markdown(env: dict, repeat: int, cpu: list[dict], gpu: list[dict]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    threads = ", ".join(f"{k} {v}" for k, v in env["threads"].items())
    lines = [
        "# DCNv3 and DCNv4 at InternImage-T's stages: cudcn against pure torch",
        "",
        f"{env['date']}, {env['machine']}, {env['cpu_count']} CPUs; {load_text(env['load_average_at_start'])} "
        f"at the start, {load_text(env['load_average_at_end'])} at the end; threads: {threads}; "
        f"BLAS: {env['blas']}; {versions}.",
        f"N={BATCH}, {KERNEL}x{KERNEL}, stride 1, pad 1. Medians of {repeat} interleaved rounds; "
        "forward + backward (forward alone in parentheses), ms; ratio = cudcn / pure torch.",
        "",
        "**CPU, float32**",
        "",
        "| operator | stage | cudcn | pure torch | time ratio (fwd+bwd) | time ratio (fwd) "
        "| cudcn peak, MiB | pure torch peak, MiB | memory ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in cpu:
        peaks = row.get("peak_mib", {})
        shown = [f"{peaks[n]:.0f}" if peaks.get(n) is not None else "-" for n in (OURS, PURE)]
        memory = f"{peaks[OURS] / peaks[PURE]:.2f}" if peaks.get(OURS) and peaks.get(PURE) else "-"
        lines.append(f"| {row['operator']} | {row['stage']} | {_cell(row, OURS)} | {_cell(row, PURE)} "
                     f"| {_ratio(row, 'forward_backward_ms')} | {_ratio(row, 'forward_ms')} "
                     f"| {shown[0]} | {shown[1]} | {memory} |")
    lines += ["", "Peak memory: forward + backward in a fresh process, resident set above the inputs "
              "after a warm-up on a 3x3 image (high-water mark reset)."]
    if gpu:
        lines += ["", f"**GPU: {env['gpu_device']}**", "",
                  "| dtype | operator | stage | cudcn | pure torch | time ratio (fwd+bwd) | cudcn peak, MiB "
                  "| pure torch peak, MiB |", "|---|---|---|---|---|---|---|---|"]
        for row in gpu:
            peaks = [f"{row['peak_mib'][n]:.1f}" if n in row["peak_mib"] else "-" for n in (OURS, PURE)]
            lines.append(f"| {row['dtype']} | {row['operator']} | {row['stage']} | {_cell(row, OURS)} "
                         f"| {_cell(row, PURE)} | {_ratio(row, 'forward_backward_ms')} | {peaks[0]} | {peaks[1]} |")
        missing = sorted({f"{n}: {s}" for row in gpu for n, s in row["status"].items() if s != "ok"})
        lines += [""] + [f"- {m}" for m in missing]
    else:
        lines += ["", "No GPU table: torch sees no CUDA device here."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stages", type=int, nargs="+", default=list(range(len(STAGES))),
                        choices=range(len(STAGES)))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for bench_dcnv3.md and bench_dcnv3.json (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPUs to run on, for cudcn and torch alike (default: all this process may use)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU table even where a GPU is visible")
    options = parser.parse_args(argv)
    load_at_start = load_average()

    import torch

    use_threads(options.threads)
    cpu = measure_cpu(options.stages, options.repeat, options.threads)
    gpu = measure_gpu(options.stages, options.repeat) if torch.cuda.is_available() and not options.no_gpu else []
    env = environment(load_at_start)
    table = markdown(env, options.repeat, cpu, gpu)
    print(table)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "bench_dcnv3.md").write_text(table)
    record = env | {"repeat": options.repeat, "cpu": cpu, "gpu": gpu}  # rows; the device is gpu_device
    (options.out / "bench_dcnv3.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
