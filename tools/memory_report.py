"""Memory transactions of the kernels, counted by the emulator (no GPU needed).

Runs one forward and one backward call of an algorithm on the kernels of
kernels/ compiled for the host (tests/emulation), with the emulator's memory
accounting on, and prints per kernel and access site: warp requests, 32-byte
sectors per request of global memory against the ideal (the bytes / 32), and
shared-memory wavefronts per request with the worst conflict degree; then
the budgets that tests/test_memory_transactions.py holds (deformable
convolution), tests/test_msda_emulated.py holds (``--operator msda``:
multi-scale deformable attention, its forward and backward) and
tests/test_dcnv3_emulated.py holds (``--operator dcnv3``: DCNv3/DCNv4).

    PYTHONPATH=. python tools/memory_report.py                              # float16, im2col and fused
    PYTHONPATH=. python tools/memory_report.py --dtype float32 --no-tf32 --algorithm fused
    PYTHONPATH=. python tools/memory_report.py --kernel deform_col2im --channels 128
    PYTHONPATH=. python tools/memory_report.py --kernel deform_col2im --arch 90   # sm_90's vector atomics
    PYTHONPATH=. python tools/memory_report.py --operator msda --dtype float32 --channels 32
    PYTHONPATH=. python tools/memory_report.py --operator dcnv3 --dtype float16 --channels 16 --softmax

Counted, not measured: the emulator's model of a warp's requests
(tests/emulation/emulate.h, "Memory accounting"); caches are not modelled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from emulation import harness  # noqa: E402
from emulation import transactions as tx  # noqa: E402

DTYPES = ("float16", "bfloat16", "float32", "float64")


def arguments(dtype_name: str, batch: int, channels: int, out_channels: int, size: int, kernel: int,
              offset_groups: int, seed: int = 0) -> dict:
    """One call's arguments: offsets in (-2, 2), mask and bias, padding kernel // 2."""
    dtype = numpy_dtype(dtype_name)
    rng = np.random.default_rng(seed)
    points = offset_groups * kernel * kernel
    arrays = {
        "input": rng.standard_normal((batch, channels, size, size)),
        "offset": rng.uniform(-2, 2, (batch, 2 * points, size, size)),
        "weight": rng.standard_normal((out_channels, channels, kernel, kernel)),
        "bias": rng.standard_normal(out_channels),
        "mask": rng.uniform(0, 1, (batch, points, size, size)),
    }
    return dict({k: v.astype(dtype) for k, v in arrays.items()}, padding=kernel // 2)


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def msda_arguments(dtype_name: str, batch: int, channels: int, size: int, seed: int = 0) -> dict:
    """One multi-scale deformable attention call: 8 queries, 2 heads, levels
    size x size and size/2 x size/2, 4 points, locations in (-0.1, 1.1)."""
    dtype = numpy_dtype(dtype_name)
    rng = np.random.default_rng(seed)
    shapes = np.array([[size, size], [max(size // 2, 1)] * 2])
    pixels = int((shapes[:, 0] * shapes[:, 1]).sum())
    queries, heads, points = 8, 2, 4
    return dict(
        value=rng.standard_normal((batch, pixels, heads, channels)).astype(dtype),
        spatial_shapes=shapes, level_start_index=np.array([0, size * size]),
        sampling_locations=rng.uniform(-0.1, 1.1, (batch, queries, heads, 2, points, 2)).astype(dtype),
        attention_weights=rng.uniform(-1, 1, (batch, queries, heads, 2, points)).astype(dtype),
    )


def account_gather(library: harness.Library, family, geom, arrays: list, deterministic: bool) -> list[tx.LaunchStats]:
    """Every launch of one forward and backward (grad_output all ones) of a
    gather family's launchers (``family``: cudcn.backends.cuda.msda or
    dcnv3), accounted and merged."""
    import cudcn

    engine = harness.EmulatedEngine(library, stats=True)
    out = family.forward(engine, geom, *arrays)
    with cudcn.deterministic_algorithms(deterministic):
        family.backward(engine, geom, np.ones(out.shape, out.dtype), *arrays)
    return tx.merge(engine.stats)


def account_msda(library: harness.Library, args: dict, deterministic: bool) -> list[tx.LaunchStats]:
    """Every launch of one MSDA forward and backward, accounted and merged."""
    from cudcn.backends.cuda import msda
    from cudcn.msda_geometry import validate_msda

    arrays = [args[k] for k in ("value", "sampling_locations", "attention_weights")]
    return account_gather(library, msda, validate_msda(**args), arrays, deterministic)


def dcnv3_arguments(dtype_name: str, batch: int, channels: int, size: int, kernel: int, seed: int = 0) -> dict:
    """One DCNv3 call: 2 groups of ``channels`` channels, size x size, a
    kernel x kernel window with padding kernel // 2, offsets in (-2, 2)."""
    dtype = numpy_dtype(dtype_name)
    rng = np.random.default_rng(seed)
    group, points = 2, kernel * kernel
    return dict(
        input=rng.standard_normal((batch, size, size, group * channels)).astype(dtype),
        offset=rng.uniform(-2, 2, (batch, size, size, group * points * 2)).astype(dtype),
        mask=rng.uniform(0, 1, (batch, size, size, group * points)).astype(dtype),
        kernel_h=kernel, kernel_w=kernel, stride_h=1, stride_w=1, pad_h=kernel // 2, pad_w=kernel // 2,
        dilation_h=1, dilation_w=1, group=group, group_channels=channels,
    )


def account_dcnv3(library: harness.Library, args: dict, deterministic: bool, softmax: bool) -> list[tx.LaunchStats]:
    """Every launch of one DCNv3 forward and backward, accounted and merged."""
    from cudcn.backends.cuda import dcnv3
    from cudcn.dcnv3_geometry import validate_dcnv3

    arrays = [args[k] for k in ("input", "offset", "mask")]
    return account_gather(library, dcnv3, validate_dcnv3(**args, softmax=softmax), arrays, deterministic)


def budgets(stats: list[tx.LaunchStats]) -> list[str]:
    """The budgets that apply to the kernels in stats, each with what was counted."""
    lines = []
    for launch in stats:
        kernel = launch.kernel.split("<")[0]
        checks = []
        if kernel in ("msda_forward", "dcnv3_forward"):
            checks.append(("load sectors / ideal", tx.load_excess(launch), tx.LOAD_EXCESS))
        if kernel in ("deform_col2im", "msda_backward", "dcnv3_backward") and launch.select("global", "atomic"):
            checks.append(("atomic sectors/request/4B", tx.atomic_sectors(launch), tx.ATOMIC_SECTORS))
        if kernel in ("deform_im2col", "deform_col2im", "deform_col2im_coord"):
            checks.append(("load sectors / ideal", tx.load_excess(launch), tx.LOAD_EXCESS))
        if kernel.startswith(("deform_fused", "fused_backward")):
            checks.append(("shared store conflict", tx.store_conflict(launch), tx.STORE_CONFLICT))
            checks.append(("fragment load conflict", tx.fragment_conflict(launch), tx.FRAGMENT_CONFLICT))
        for name, value, budget in checks:
            verdict = "ok" if value <= budget else "OVER BUDGET"
            lines.append(f"{launch.kernel:48s} {name:24s} {value:6.2f} (budget {budget:g})  {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operator", choices=("dcn", "msda", "dcnv3"), default="dcn",
                        help="deformable convolution (default), multi-scale deformable attention or DCNv3")
    parser.add_argument("--dtype", choices=DTYPES, default="float16")
    parser.add_argument("--deterministic", action="store_true",
                        help="msda, dcnv3: the sorted value (input) gradient")
    parser.add_argument("--softmax", action="store_true", help="dcnv3: the mask's softmax fused")
    parser.add_argument("--algorithm", choices=("im2col", "fused", "both"), default="both")
    parser.add_argument("--direction", choices=("forward", "backward", "both"), default="both")
    parser.add_argument("--no-tf32", dest="tf32", action="store_false", help="float32 by FMAs, not TF32 MMAs")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--out-channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=8, help="height and width")
    parser.add_argument("--kernel-size", type=int, default=3)
    parser.add_argument("--offset-groups", type=int, default=1)
    parser.add_argument("--kernel", default="", help="only kernels whose name contains this")
    parser.add_argument("--arch", type=int, choices=harness.ARCHS, default=0,
                        help="the architecture whose code paths the kernels take (0: those every one has)")
    options = parser.parse_args(argv)
    if harness.compiler() is None:
        parser.error("no C++ compiler (g++) for the kernel emulation")
    if options.dtype == "float64" and options.algorithm == "fused":
        parser.error("float64 has no fused kernel")

    if options.operator == "msda":
        stats = account_msda(harness.build(), msda_arguments(options.dtype, options.batch, options.channels,
                                                             options.size), options.deterministic)
        stats = [s for s in stats if options.kernel in s.kernel]
        print(f"{options.dtype}, multi-scale deformable attention: batch {options.batch}, 8 queries, 2 heads of "
              f"{options.channels} channels, levels {options.size}x{options.size} and half that, 4 points; "
              "counted by the emulator, not measured on a GPU")
        return _print(stats)
    if options.operator == "dcnv3":
        stats = account_dcnv3(harness.build(), dcnv3_arguments(options.dtype, options.batch, options.channels,
                                                               options.size, options.kernel_size),
                              options.deterministic, options.softmax)
        stats = [s for s in stats if options.kernel in s.kernel]
        print(f"{options.dtype}, DCNv3: batch {options.batch}, 2 groups of {options.channels} channels, "
              f"{options.size}x{options.size}, {options.kernel_size}x{options.kernel_size}"
              f"{', softmax fused' if options.softmax else ''}; counted by the emulator, not measured on a GPU")
        return _print(stats)
    args = arguments(options.dtype, options.batch, options.channels, options.out_channels, options.size,
                     options.kernel_size, options.offset_groups)
    algorithms = ("im2col", "fused") if options.algorithm == "both" else (options.algorithm,)
    directions = ("forward", "backward") if options.direction == "both" else (options.direction,)
    library = harness.build(arch=options.arch)
    stats = []
    for algorithm in algorithms:
        if algorithm == "fused" and options.dtype == "float64":
            continue
        for direction in directions:
            stats += tx.account_call(library, direction, args, algorithm, options.tf32)
    stats = [s for s in tx.merge(stats) if options.kernel in s.kernel]
    print(f"{options.dtype}, batch {options.batch}, {options.channels} -> {options.out_channels} channels, "
          f"{options.size}x{options.size}, {options.kernel_size}x{options.kernel_size}, "
          f"{options.offset_groups} offset group(s), {f'sm_{options.arch} paths' if options.arch else 'portable paths'}; "
          f"counted by the emulator, not measured on a GPU")
    return _print(stats)


def _print(stats: list[tx.LaunchStats]) -> int:
    print(tx.table(stats))
    lines = budgets(stats)
    if lines:
        print()
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
