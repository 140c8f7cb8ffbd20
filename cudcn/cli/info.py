"""``cudcn info``: versions, settings, GPUs, available backends and the kernel cache.

Everything here is optional: a framework that is not installed, a CuPy
without a driver, a machine without a GPU or a malformed setting in the
environment is reported, never an error. Frameworks are imported only inside
:func:`run`, and each probe catches its own failure so that one broken
installation does not hide the others. Everything is probed before anything
is printed, and the warnings that importing the frameworks raises (paddle's
"No ccache found", say) are listed after the report instead of landing
inside it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

import cudcn
from cudcn.cli.arguments import collected_warnings, is_installed, print_warnings

#: Packages whose versions matter to cudcn, in the order they are printed.
PACKAGES = ("numpy", "scipy", "threadpoolctl", "cupy", "ml_dtypes", "torch", "torchvision", "paddle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``cudcn info`` takes no options."""


def package_version(name: str) -> str | None:
    """The package's version, or None when it cannot be imported."""
    try:
        module = importlib.import_module(name)
    except Exception:  # not installed, or installed but broken
        return None
    return str(getattr(module, "__version__", "unknown"))


def cupy_gpus() -> tuple[list[dict], str | None]:
    """GPUs visible to CuPy as dicts (index, name, compute capability, memory),
    and a reason when there are none."""
    if not is_installed("cupy"):
        return [], "CuPy not installed"
    try:
        import cupy
    except Exception as error:  # CuPy broken
        return [], f"CuPy cannot be imported ({type(error).__name__}: {error})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # no driver, or no device
        return [], f"no CUDA driver or device ({type(error).__name__}: {error})"
    gpus = []
    for index in range(count):
        props = cupy.cuda.runtime.getDeviceProperties(index)
        name = props["name"]
        gpus.append({
            "index": index,
            "name": name.decode() if isinstance(name, bytes) else str(name),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "memory_gib": props["totalGlobalMem"] / 2**30,
        })
    return gpus, None if gpus else "CuPy sees no CUDA device"


def torch_cuda() -> str:
    """What torch says about CUDA, in words."""
    try:
        import torch
    except Exception:
        return "torch not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__}: CUDA not available (build CUDA: {torch.version.cuda})"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"torch {torch.__version__}: CUDA {torch.version.cuda}, devices: {', '.join(names)}"


def kernel_cache_dir() -> Path:
    """Where compiled kernels are cached: CuPy's cache directory.

    The CUDA backend compiles its kernels through ``cupy.RawModule``, which
    keeps the binaries under ``$CUPY_CACHE_DIR`` (default ``~/.cupy/kernel_cache``).
    """
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


def backend_status(gpus: list[dict], no_gpu_reason: str | None = None) -> dict[str, str]:
    """Array backends and framework adapters: name -> "available" or why not
    (no_gpu_reason: why CuPy sees no GPU, from :func:`cupy_gpus`)."""
    status = {"numpy": "available (reference, CPU)"}
    if not gpus:
        status["cuda (cupy)"] = f"not available: {no_gpu_reason or 'no CUDA device'}"
    else:
        try:
            importlib.import_module(cudcn.backends._MODULES["cupy"])
            status["cuda (cupy)"] = "available"
        except Exception as error:  # backend module missing or failing to import
            status["cuda (cupy)"] = f"not available: {type(error).__name__}: {error}"
    for adapter, framework in (("torch", "torch"), ("paddle", "paddle")):
        if package_version(framework) is None:
            status[f"{adapter} adapter"] = f"not available: {framework} not installed"
            continue
        try:
            importlib.import_module(f"cudcn.{adapter}")
            status[f"{adapter} adapter"] = "available"
        except Exception as error:
            status[f"{adapter} adapter"] = f"not available: {type(error).__name__}: {error}"
    return status


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_average() -> list[float] | None:
    """The system's load averages over 1, 5 and 15 minutes (None where the
    system does not report them): how busy a shared machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def load_text(load: list[float] | None) -> str:
    """"load average 1.9, 1.6, 1.6 (1, 5, 15 min)", or "load average unknown"."""
    if load is None:
        return "load average unknown"
    return f"load average {', '.join(f'{x:.1f}' for x in load)} (1, 5, 15 min)"


def machine_record(distributions: tuple[str, ...]) -> dict[str, Any]:
    """When and where a measurement ran, for the files that store it: date
    (UTC), machine (architecture and CPU model), CPU count, Python and the
    versions of cudcn (the one imported) and of the named distributions
    (None when not installed)."""

    def version(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {cpu_model()}".strip(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {"cudcn": cudcn.__version__} | {d: version(d) for d in distributions},
    }


def settings() -> dict[str, str]:
    """cudcn's settings as this process sees them, in words; a malformed
    environment variable is reported with cudcn's own error message."""
    from cudcn.backends.cuda.algorithms import REGISTRY

    def read(getter, describe) -> str:
        try:
            return describe(getter())
        except cudcn.ArgumentError as error:  # a malformed environment variable
            return f"error: {error} (calls that read this setting raise this error)"

    def flag(variable: str, on: bool) -> str:
        text = os.environ.get(variable)
        if text is None:
            source = f"{variable} not set"
        elif text in ("0", "1"):
            source = f"{variable}={text}"
        else:
            source = f"{variable}={text!r}, which is not 1: off"
        return f"{'on' if on else 'off'} ({source})"

    return {
        "workspace budget": read(cudcn.get_workspace_bytes,
                                 lambda n: f"{n / 2**20:.0f} MiB for column buffers ({n} bytes)"),
        "CUDA algorithm": read(cudcn.get_algorithm,
                               lambda name: f"{name} (algorithms: {', '.join(REGISTRY)}; what \"auto\" "
                                            "chose in a process: cudcn.algorithm_choices())"),
        "deterministic": flag("CUDCN_DETERMINISTIC", cudcn.are_deterministic_algorithms_enabled()),
        "TF32": flag("CUDCN_TF32", cudcn.is_tf32_enabled()),
    }


def gather() -> dict[str, Any]:
    """Everything the report shows (imports every framework that is installed)."""
    gpus, reason = cupy_gpus()
    return {
        "settings": settings(),
        "packages": {name: np.__version__ if name == "numpy" else package_version(name) for name in PACKAGES},
        "gpus": gpus,
        "no_gpu_reason": reason,
        "torch_cuda": torch_cuda(),
        "backends": backend_status(gpus, reason),
    }


def run(args: argparse.Namespace) -> int:
    """Print the report; always succeeds."""
    with collected_warnings() as caught:
        report = gather()

    print(f"cudcn {cudcn.__version__} (from {Path(cudcn.__file__).parent})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"{os.cpu_count()} CPUs: {cpu_model()}")

    print("\nsettings")
    for name, state in report["settings"].items():
        print(f"  {name:18} {state}")

    print("\npackages")
    for name, version in report["packages"].items():
        print(f"  {name:18} {version or 'not installed'}")

    print("\nGPUs (as CuPy sees them)")
    for gpu in report["gpus"]:
        print(f"  [{gpu['index']}] {gpu['name']}, compute capability {gpu['compute_capability']}, "
              f"{gpu['memory_gib']:.1f} GiB")
    if report["no_gpu_reason"]:
        print(f"  none: {report['no_gpu_reason']}")
    print(f"  {report['torch_cuda']}")

    print("\nbackends")
    for name, state in report["backends"].items():
        print(f"  {name:18} {state}")

    cache = kernel_cache_dir()
    print(f"\nkernel cache: {cache} ({'exists' if cache.is_dir() else 'not created yet'})")
    print_warnings(caught, "importing the packages above")
    sys.stdout.flush()
    return 0
