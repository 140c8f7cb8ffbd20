"""``cudcn info``: versions, GPUs, available backends and the kernel cache.

Everything here is optional: a framework that is not installed, a CuPy
without a driver or a machine without a GPU is reported, never an error.
Frameworks are imported only inside :func:`run`, and each probe catches its
own failure so that one broken installation does not hide the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from pathlib import Path

import numpy as np

import cudcn

#: Packages whose versions matter to cudcn, in the order they are printed.
PACKAGES = ("numpy", "cupy", "torch", "torchvision", "paddle", "ml_dtypes")


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
    try:
        import cupy
    except Exception as error:  # CuPy missing or broken
        return [], f"CuPy not importable ({type(error).__name__})"
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


def backend_status(gpus: list[dict]) -> dict[str, str]:
    """Array backends and framework adapters: name -> "available" or why not."""
    status = {"numpy": "available (reference, CPU)"}
    if not gpus:
        status["cuda (cupy)"] = "not available: no CUDA device"
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


def run(args: argparse.Namespace) -> int:
    """Print the report; always succeeds."""
    print(f"cudcn {cudcn.__version__} (from {Path(cudcn.__file__).parent})")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"workspace budget for column buffers: {cudcn.get_workspace_bytes() / 2**20:.0f} MiB")
    from cudcn.backends.cuda.algorithms import REGISTRY

    print(f"CUDA algorithm setting: {cudcn.get_algorithm()} (algorithms: {', '.join(REGISTRY)}; "
          "what \"auto\" chose in a process: cudcn.algorithm_choices())")

    print("\npackages")
    for name in PACKAGES:
        version = np.__version__ if name == "numpy" else package_version(name)
        print(f"  {name:12} {version or 'not installed'}")

    print("\nGPUs (as CuPy sees them)")
    gpus, reason = cupy_gpus()
    for gpu in gpus:
        print(f"  [{gpu['index']}] {gpu['name']}, compute capability {gpu['compute_capability']}, "
              f"{gpu['memory_gib']:.1f} GiB")
    if reason:
        print(f"  none: {reason}")
    print(f"  {torch_cuda()}")

    print("\nbackends")
    for name, state in backend_status(gpus).items():
        print(f"  {name:16} {state}")

    cache = kernel_cache_dir()
    print(f"\nkernel cache: {cache} ({'exists' if cache.is_dir() else 'not created yet'})")
    sys.stdout.flush()
    return 0
