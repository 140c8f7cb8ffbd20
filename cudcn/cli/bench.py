"""``cudcn bench``: time cudcn against the peers that are present.

Every implementation computes the same modulated deformable convolution
(torchvision's semantics) on the same random arguments:

- cudcn: the NumPy backend (CPU), the CUDA backend (CuPy arrays), and the
  torch adapter on each device torch has;
- torchvision.ops.deform_conv2d (on each device, when torchvision is installed);
- paddle.vision.ops.deform_conv2d on the CPU (when paddle is installed);
- a plain pure-torch implementation built from ``grid_sample``
  (:func:`grid_sample_deform_conv2d`), on each device torch has.

For each one the table gives the median time of a forward pass and of a
forward plus backward pass (all gradients), and the largest difference of its
output from cudcn's NumPy backend in float64, so that one can see the
computations timed are the same. Implementations that cannot run here are
listed as "not available" with the reason.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import statistics
import time
import tracemalloc
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import cudcn
from cudcn.cli.arguments import CommandError, int_range, is_installed, plural, require


@dataclass(frozen=True)
class Case:
    """The convolution being timed: input (batch, in_channels, size, size)."""

    batch: int
    in_channels: int
    out_channels: int
    size: int
    kernel: int
    offset_groups: int
    modulated: bool
    dtype: str

    @property
    def padding(self) -> int:
        """'Same' padding: the output is size x size for an odd kernel (one more for an even one)."""
        return self.kernel // 2

    @property
    def out_size(self) -> int:
        """Height and width of the output."""
        return self.size + 2 * self.padding - self.kernel + 1

    @property
    def column_buffer_values(self) -> int:
        """Values in im2col's column buffer for the whole batch (N*Ho*Wo*kh*kw*C_in)."""
        return self.batch * self.out_size**2 * self.kernel**2 * self.in_channels

    def describe(self) -> str:
        """One line for people, e.g. "DCNv2 float32: batch 8, 32 -> 32 channels, 32x32 images, 3x3 kernel,
        padding 1, 1 offset group"."""
        groups = f"{self.offset_groups} offset group{'s' if self.offset_groups > 1 else ''}"
        return (f"{'DCNv2' if self.modulated else 'DCNv1'} {self.dtype}: batch {self.batch}, "
                f"{self.in_channels} -> {self.out_channels} channels, {self.size}x{self.size} images, "
                f"{self.kernel}x{self.kernel} kernel, padding {self.padding}, {groups}")


@dataclass
class Prepared:
    """One implementation, ready to run on its own copies of the arguments."""

    forward: Callable[[], Any]  # returns the output in the framework's type
    forward_backward: Callable[[], None]  # one forward and a backward for every input
    to_numpy: Callable[[Any], np.ndarray]
    synchronize: Callable[[], None]


class NotAvailable(Exception):
    """An implementation cannot run here; the message says why."""


# ----------------------------------------------------------------------------
# The pure-torch reference


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def grid_sample_deform_conv2d(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: Any | None = None,
) -> Any:
    """Deformable convolution in plain torch: ``grid_sample`` then a contraction.

    Same arguments and semantics as ``torchvision.ops.deform_conv2d`` (and
    :func:`cudcn.deform_conv2d`); gradients come from torch's autograd.

    ``grid_sample`` with ``align_corners=False`` puts pixel ``i`` of a row of
    ``W`` pixels at the normalised coordinate ``(2*i + 1)/W - 1``; mapping the
    sampling point ``x`` (in pixels) to ``(2*x + 1)/W - 1`` therefore samples
    exactly at ``x`` with pixel centres on integers, for every W (including 1,
    where ``align_corners=True`` would divide by zero). ``padding_mode="zeros"``
    makes every corner outside the image count 0, as torchvision does.
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = input.shape
    out_channels, c_per_group, kh, kw = weight.shape
    groups = c // c_per_group
    k = kh * kw
    offset_groups = offset.shape[1] // (2 * k)
    out_h, out_w = offset.shape[-2:]
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)

    # Regular sampling grid of every (output row, output column, kernel point).
    points = torch.arange(k, device=input.device)
    i, j = points // kw, points % kw
    rows = torch.arange(out_h, device=input.device) * sh - ph
    cols = torch.arange(out_w, device=input.device) * sw - pw
    base_y = (rows[:, None, None] + i * dh).to(input.dtype)  # (Ho, 1, K)
    base_x = (cols[None, :, None] + j * dw).to(input.dtype)  # (1, Wo, K)

    # offset (N, G*K*2, Ho, Wo) -> (N, G, Ho, Wo, K) for rows and for columns
    off = offset.reshape(n, offset_groups, k, 2, out_h, out_w).permute(0, 1, 3, 4, 5, 2)
    y = base_y + off[:, :, 0]
    x = base_x + off[:, :, 1]
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)
    grid = grid.reshape(n * offset_groups, out_h, out_w * k, 2)

    sampled = F.grid_sample(
        input.reshape(n * offset_groups, c // offset_groups, h, w), grid,
        mode="bilinear", padding_mode="zeros", align_corners=False,
    )  # (N*G, C/G, Ho, Wo*K)
    sampled = sampled.reshape(n, offset_groups, c // offset_groups, out_h, out_w, k)
    if mask is not None:
        m = mask.reshape(n, offset_groups, k, out_h, out_w).permute(0, 1, 3, 4, 2)
        sampled = sampled * m[:, :, None]

    columns = sampled.reshape(n, groups, c_per_group, out_h, out_w, k)
    kernel = weight.reshape(groups, out_channels // groups, c_per_group, k)
    out = torch.einsum("ngchwk,gock->ngohw", columns, kernel)
    out = out.reshape(n, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.reshape(1, -1, 1, 1)
    return out


# ----------------------------------------------------------------------------
# Arguments and implementations


def make_arguments(case: Case, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float64 arguments; offsets of a few pixels, away from integers."""
    rng = np.random.default_rng(seed)
    n, c, o, s, kk, g = (case.batch, case.in_channels, case.out_channels,
                         case.size, case.kernel, case.offset_groups)
    k, so = kk * kk, case.out_size
    args = {
        "input": rng.standard_normal((n, c, s, s)),
        "offset": rng.uniform(-2, 2, (n, 2 * g * k, so, so)) + 0.25,
        "weight": rng.standard_normal((o, c, kk, kk)) / np.sqrt(c * k),
        "bias": rng.standard_normal(o),
    }
    if case.modulated:
        args["mask"] = rng.uniform(0, 1, (n, g * k, so, so))
    return args


def _torch_device_list() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _torch_prepared(fn, case: Case, args: dict, device: str) -> Prepared:
    """Wrap a torch function f(input, offset, weight, bias, stride, padding, dilation, mask)."""
    import torch

    dtype = getattr(torch, case.dtype)
    tensors = {k: torch.tensor(v, dtype=dtype, device=device) for k, v in args.items()}
    leaves = {k: t.clone().requires_grad_(True) for k, t in tensors.items()}
    grad_out = torch.ones((case.batch, case.out_channels, case.out_size, case.out_size), dtype=dtype, device=device)

    def call(t):
        return fn(t["input"], t["offset"], t["weight"], t.get("bias"), stride=1,
                  padding=case.padding, dilation=1, mask=t.get("mask"))

    def forward():
        with torch.no_grad():
            return call(tensors)

    def forward_backward():
        for t in leaves.values():
            t.grad = None
        call(leaves).backward(grad_out)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return Prepared(forward, forward_backward, lambda t: t.detach().cpu().double().numpy(), sync)


def _cudcn_arrays(case: Case, args: dict, xp) -> Prepared:
    """cudcn's own entry points on NumPy or CuPy arrays."""
    arrays = {k: xp.asarray(v.astype(case.dtype)) for k, v in args.items()}
    grad_out = xp.ones((case.batch, case.out_channels, case.out_size, case.out_size), case.dtype)
    geometry = dict(stride=1, padding=case.padding, dilation=1)

    def forward():
        return cudcn.deform_conv2d(**arrays, **geometry)

    def forward_backward():
        cudcn.deform_conv2d(**arrays, **geometry)
        cudcn.deform_conv2d_backward(grad_out, **arrays, **geometry)

    if xp is np:
        return Prepared(forward, forward_backward, lambda a: np.asarray(a, np.float64), lambda: None)
    return Prepared(forward, forward_backward, lambda a: a.get().astype(np.float64),
                    xp.cuda.get_current_stream().synchronize)


def implementations(case: Case, args: dict) -> list[tuple[str, str, Callable[[], Prepared]]]:
    """(name, device, preparer) of everything worth trying; a preparer raises
    NotAvailable (or ImportError) when it cannot run here."""
    found: list[tuple[str, str, Callable[[], Prepared]]] = []
    found.append(("cudcn (numpy backend)", "cpu", lambda: _cudcn_arrays(case, args, np)))

    def cupy_backend():
        if not is_installed("cupy"):
            raise NotAvailable("CuPy not installed")
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() == 0:
                raise NotAvailable("no CUDA device")
        except NotAvailable:
            raise
        except Exception as error:
            raise NotAvailable(f"no CuPy or no CUDA device ({type(error).__name__}: {error})") from error
        return _cudcn_arrays(case, args, cupy)

    found.append(("cudcn (cuda backend)", "cuda", cupy_backend))

    try:
        devices = _torch_device_list()
    except ImportError:
        devices = []
        for name in ("cudcn (torch adapter)", "torchvision", "pure torch (grid_sample)"):
            found.append((name, "-", _unavailable("torch not installed")))

    def torch_peer(module_name: str, attribute: str, device: str):
        def prepare():
            package = module_name.split(".")[0]
            if package != "cudcn" and not is_installed(package):
                raise NotAvailable(f"{package} not installed")
            try:
                module = importlib.import_module(module_name)
            except Exception as error:  # not importable here, e.g. built for another torch
                raise NotAvailable(f"cannot import {module_name} ({type(error).__name__}: {error})") from error
            return _torch_prepared(getattr(module, attribute), case, args, device)
        return prepare

    for device in devices:
        found.append(("cudcn (torch adapter)", device, torch_peer("cudcn.torch", "deform_conv2d", device)))
        found.append(("torchvision", device, torch_peer("torchvision.ops", "deform_conv2d", device)))
        found.append(("pure torch (grid_sample)", device,
                      lambda device=device: _torch_prepared(grid_sample_deform_conv2d, case, args, device)))
    if devices and "cuda" not in devices:
        found.append(("torchvision", "cuda", _unavailable("torch sees no CUDA device")))
    found.append(("paddle", "cpu", lambda: _paddle_prepared(case, args)))
    return found


def _unavailable(reason: str):
    def prepare():
        raise NotAvailable(reason)
    return prepare


def _paddle_prepared(case: Case, args: dict) -> Prepared:
    """paddle.vision.ops.deform_conv2d on the CPU."""
    if not is_installed("paddle"):
        raise NotAvailable("paddle not installed")
    if case.out_channels % case.offset_groups:
        raise NotAvailable("paddle's op needs out_channels divisible by the offset groups")
    with warnings.catch_warnings():
        # paddle warns on import that it found no ccache, which concerns
        # building C++ extensions for paddle, not this benchmark.
        warnings.filterwarnings("ignore", message="No ccache found")
        import paddle
        from paddle.vision.ops import deform_conv2d
    paddle.set_device("cpu")

    tensors = {k: paddle.to_tensor(v.astype(case.dtype)) for k, v in args.items()}
    leaves = {k: paddle.to_tensor(v.astype(case.dtype), stop_gradient=False) for k, v in args.items()}
    grad_out = paddle.ones([case.batch, case.out_channels, case.out_size, case.out_size], dtype=case.dtype)

    def call(t):
        return deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], stride=1,
                             padding=case.padding, dilation=1,
                             deformable_groups=case.offset_groups, mask=t.get("mask"))

    def forward():
        with paddle.no_grad():
            return call(tensors)

    def forward_backward():
        for t in leaves.values():
            t.clear_gradient()
        call(leaves).backward(grad_out)

    return Prepared(forward, forward_backward, lambda t: t.numpy().astype(np.float64), lambda: None)


# ----------------------------------------------------------------------------
# Timing and reporting


#: Untimed pause before each timed call of ``cudcn bench`` and the CPU
#: benchmark, longer than the libraries' idle threads spin (median_ms):
#: without it, a call timed right after a torch call shares the cores with
#: torch's spinning OpenMP threads (measured: about 7 ms of CPU after each).
SETTLE_S = 0.15


def median_ms(timed: Sequence[tuple[Callable[[], Any], Callable[[], None]]],
              warmup: int = 1, repeat: int = 5, settle_s: float = 0.0) -> list[float]:
    """Median wall time in milliseconds of each (function, synchronise) pair.

    The calls are interleaved: each round calls every function once, in turn,
    so that a change in the machine's load during the run falls on all of them
    alike. Each call is timed from a synchronised start to its synchronised end.
    With settle_s, each timed call waits that long first (untimed): the idle
    threads of the previous call's library spin for a while before they sleep
    (torch's OpenMP threads about 10 ms, OpenBLAS's about 0.1 s), and would
    otherwise take a core from the call being timed.
    """
    for _ in range(warmup):
        for fn, sync in timed:
            fn()
            sync()
    times: list[list[float]] = [[] for _ in timed]
    for _ in range(repeat):
        for (fn, sync), series in zip(timed, times):
            sync()
            if settle_s:
                time.sleep(settle_s)
            start = time.perf_counter()
            fn()
            sync()
            series.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(series) for series in times]


def peak_traced_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the memory tracemalloc traces (NumPy's arrays included) during
    fn(), above what was allocated before; a first, untraced call keeps
    imports and caches out of it."""
    fn()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        if not was_tracing:
            tracemalloc.stop()


def benchmark(case: Case, warmup: int = 1, repeat: int = 5, seed: int = 0,
              settle_s: float = 0.0) -> list[dict]:
    """One row per implementation: name, device, forward_ms, forward_backward_ms,
    max_rel_diff (output vs cudcn's NumPy backend in float64), status.

    Every implementation that runs is timed in the same rounds (median_ms):
    a round calls each one's forward, then each one's forward + backward, so
    that a change in the machine's load falls on all of them alike; with
    settle_s, a pause before each timed call (median_ms)."""
    args = make_arguments(case, seed)
    reference = cudcn.deform_conv2d(**args, stride=1, padding=case.padding, dilation=1)
    scale = float(np.abs(reference).max())
    rows, ready = [], {}
    for name, device, prepare in implementations(case, args):
        row = {"implementation": name, "device": device, "forward_ms": None,
               "forward_backward_ms": None, "max_rel_diff": None, "status": "ok"}
        try:
            prepared = prepare()
            output = prepared.to_numpy(prepared.forward())
            row["max_rel_diff"] = float(np.abs(output - reference).max()) / scale
            ready[len(rows)] = prepared
        except (NotAvailable, ImportError) as error:
            row["status"] = f"not available: {error}"
        except Exception as error:  # a peer failing must not stop the others
            row["status"] = f"failed: {type(error).__name__}: {error}"
        rows.append(row)
    failures: dict[int, Exception] = {}

    def guarded(index: int, fn: Callable[[], Any]) -> Callable[[], None]:
        """fn, which records its first exception instead of raising it, and
        is not called again after one."""
        def call() -> None:
            if index not in failures:
                try:
                    fn()
                except Exception as error:  # a peer failing must not stop the others
                    failures[index] = error
        return call

    timed = [(guarded(i, p.forward), p.synchronize) for i, p in ready.items()]
    timed += [(guarded(i, p.forward_backward), p.synchronize) for i, p in ready.items()]
    medians = median_ms(timed, warmup, repeat, settle_s)
    for index, forward, forward_backward in zip(ready, medians, medians[len(ready):]):
        if index in failures:
            error = failures[index]
            rows[index]["status"] = f"failed: {type(error).__name__}: {error}"
        else:
            rows[index]["forward_ms"], rows[index]["forward_backward_ms"] = forward, forward_backward
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows as a fixed-width text table."""
    lines = [f"{'implementation':26} {'device':6} {'forward ms':>11} {'fwd+bwd ms':>11} {'rel. diff':>10}  status"]
    for r in rows:
        def num(v, fmt):
            return f"{v:{fmt}}" if v is not None else "-"
        lines.append(f"{r['implementation']:26} {r['device']:6} {num(r['forward_ms'], '11.2f'):>11} "
                     f"{num(r['forward_backward_ms'], '11.2f'):>11} {num(r['max_rel_diff'], '10.1e'):>10}  {r['status']}")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], case: Case, path: Path) -> None:
    """Horizontal bars: forward and forward+backward median times of the implementations that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = [r for r in rows if r["status"] == "ok"]
    labels = [f"{r['implementation']} [{r['device']}]" for r in ran]
    y = np.arange(len(ran))
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(ran) + 1.5))
    ax.barh(y - 0.2, [r["forward_ms"] for r in ran], height=0.4, label="forward")
    ax.barh(y + 0.2, [r["forward_backward_ms"] for r in ran], height=0.4, label="forward + backward")
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time (ms, log scale)")
    ax.set_title(case.describe(), fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


#: The largest column buffer (values, float64 arguments) a case may have: the
#: slowest peers take minutes beyond it.
MAX_COLUMN_BUFFER_VALUES = 2**27


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int_range(1, 256), default=8, help="images per batch, 1 to 256 (default 8)")
    parser.add_argument("--in-channels", type=int_range(1, 1024), default=32,
                        help="input channels, 1 to 1024 (default 32)")
    parser.add_argument("--out-channels", type=int_range(1, 1024), default=32,
                        help="output channels, 1 to 1024 (default 32)")
    parser.add_argument("--size", type=int_range(1, 512), default=32,
                        help="image height and width, 1 to 512 (default 32)")
    parser.add_argument("--kernel", type=int_range(1, 9), default=3, help="kernel height and width, 1 to 9 (default 3)")
    parser.add_argument("--offset-groups", type=int_range(1, 1024), default=1,
                        help="offset groups, a divisor of --in-channels (default 1)")
    parser.add_argument("--v1", action="store_true", help="no mask (DCNv1) instead of DCNv2")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="default float32")
    parser.add_argument("--warmup", type=int_range(0, 100), default=1,
                        help="untimed rounds first, 0 to 100 (default 1)")
    parser.add_argument("--repeat", type=int_range(1, 100), default=5,
                        help="timed rounds, 1 to 100; medians are reported (default 5)")
    parser.add_argument("--csv", type=Path, help="write the table as CSV to this file (its folder must exist)")
    parser.add_argument("--json", type=Path, help="write the case and the table as JSON to this file")
    parser.add_argument("--plot", type=Path, help="draw the timings into this PNG file (needs matplotlib)")


def _check_request(args: argparse.Namespace, case: Case) -> None:
    """Everything that can be wrong with the request, found before the benchmark runs."""
    if case.in_channels % case.offset_groups:
        raise CommandError(f"--offset-groups must divide --in-channels = {case.in_channels}, "
                           f"got {case.offset_groups}")
    if case.column_buffer_values > MAX_COLUMN_BUFFER_VALUES:
        raise CommandError(f"the case's column buffer (batch x size^2 x kernel^2 x in-channels) would hold "
                           f"{case.column_buffer_values:,} values; cudcn bench takes up to "
                           f"{MAX_COLUMN_BUFFER_VALUES:,}: use a smaller --batch, --size, --kernel or --in-channels")
    if args.plot is not None:
        require({"matplotlib": "matplotlib"}, "--plot",
                'pip install matplotlib (or an extra that brings it: pip install "cudcn[demo]")')
    for flag, path in _outputs(args):
        if path.is_dir():
            raise CommandError(f"{flag} expects a file name, got the folder {str(path)!r}")
        if not path.parent.is_dir():
            raise CommandError(f"{flag}: the folder {str(path.parent)!r} does not exist")


def _outputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """(flag, path) of the files asked for."""
    return [(flag, path) for flag, path in (("--csv", args.csv), ("--json", args.json), ("--plot", args.plot))
            if path is not None]


def run(args: argparse.Namespace) -> int:
    case = Case(args.batch, args.in_channels, args.out_channels, args.size, args.kernel,
                args.offset_groups, not args.v1, args.dtype)
    _check_request(args, case)
    rows = benchmark(case, warmup=args.warmup, repeat=args.repeat, settle_s=SETTLE_S)
    print(f"{case.describe()}; medians of {plural(args.repeat, 'round')} over every implementation in turn, "
          f"after {plural(args.warmup, 'warm-up round')}, a {SETTLE_S} s pause before each timed call, in ms")
    print(format_table(rows))
    print("rel. diff: largest |output - cudcn numpy float64| / largest |output|")
    try:
        if args.csv:
            write_csv(rows, args.csv)
        if args.json:
            args.json.write_text(json.dumps({"case": asdict(case), "rows": rows}, indent=2) + "\n")
        if args.plot:
            plot(rows, case, args.plot)
    except OSError as error:
        raise CommandError(f"cannot write {error.filename!r}: {error.strerror}") from None
    for flag, path in _outputs(args):
        print(f"wrote {path} ({flag.removeprefix('--')})")
    failed = [r for r in rows if r["status"].startswith("failed")]
    return 1 if failed else 0
