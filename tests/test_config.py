"""Settings: workspace budget and deterministic algorithms."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import cudcn

ROOT = Path(__file__).resolve().parents[1]


def test_workspace_budget_validation_and_round_trip():
    before = cudcn.get_workspace_bytes()
    try:
        cudcn.set_workspace_bytes(1234)
        assert cudcn.get_workspace_bytes() == 1234
        for bad in (0, -5, 1.5, True, "10"):
            with pytest.raises(ValueError, match="nbytes must be a positive int"):
                cudcn.set_workspace_bytes(bad)
    finally:
        cudcn.set_workspace_bytes(before)
    with cudcn.workspace_bytes(99):
        assert cudcn.get_workspace_bytes() == 99
    assert cudcn.get_workspace_bytes() == before


def test_deterministic_setting_is_scoped_and_per_thread():
    assert not cudcn.are_deterministic_algorithms_enabled()
    seen = []
    with cudcn.deterministic_algorithms():
        assert cudcn.are_deterministic_algorithms_enabled()
        thread = threading.Thread(target=lambda: seen.append(cudcn.are_deterministic_algorithms_enabled()))
        thread.start()
        thread.join()
        with cudcn.deterministic_algorithms(False):
            assert not cudcn.are_deterministic_algorithms_enabled()
        assert cudcn.are_deterministic_algorithms_enabled()
    assert not cudcn.are_deterministic_algorithms_enabled()
    assert seen == [False]
    with pytest.raises(TypeError, match="mode must be a bool, got 1"):
        cudcn.use_deterministic_algorithms(1)


def test_numpy_backend_is_bitwise_repeatable():
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((3, 4, 9, 9)), rng.standard_normal((3, 18, 9, 9)) * 3, rng.standard_normal((5, 4, 3, 3)))
    grad_output = rng.standard_normal((3, 5, 9, 9))
    with cudcn.deterministic_algorithms():
        first = cudcn.deform_conv2d_backward(grad_output, *args, padding=1)
        second = cudcn.deform_conv2d_backward(grad_output, *args, padding=1)
    for a, b in zip(first, second):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_temporary_workspace_budget_is_per_thread():
    """Two threads in overlapping `with workspace_bytes(...)` blocks each see
    their own budget, and the process-wide budget is untouched afterwards."""
    before = cudcn.get_workspace_bytes()
    inside = threading.Barrier(2)
    seen = {}

    def worker(name, nbytes):
        with cudcn.workspace_bytes(nbytes):
            inside.wait()  # both blocks are open now
            seen[name] = cudcn.get_workspace_bytes()
            inside.wait()  # neither closes before both have looked
        seen[name + " after"] = cudcn.get_workspace_bytes()

    threads = [threading.Thread(target=worker, args=(n, b)) for n, b in (("a", 1000), ("b", 2000))]
    with cudcn.workspace_bytes(77):  # the main thread's own temporary budget
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert cudcn.get_workspace_bytes() == 77
    assert seen == {"a": 1000, "b": 2000, "a after": before, "b after": before}
    assert cudcn.get_workspace_bytes() == before


def test_temporary_budget_decides_the_chunking_of_its_thread_only():
    from cudcn.config import images_per_chunk

    result = {}
    with cudcn.workspace_bytes(100):
        thread = threading.Thread(target=lambda: result.setdefault("other", images_per_chunk(100, 8)))
        thread.start()
        thread.join()
        assert images_per_chunk(100, 8) == 1
    assert result["other"] == min(8, cudcn.get_workspace_bytes() // 100)


def _run_with_environment(code: str, value: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDCN_WORKSPACE_BYTES=value)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("value, nbytes", [
    ("268435456", 268435456), ("256MB", 256 * 10**6), ("256 MiB", 256 * 2**20),
    ("1GiB", 2**30), ("1.5kib", 1536), ("12b", 12),
])
def test_workspace_environment_variable_takes_sizes_with_units(value, nbytes):
    result = _run_with_environment("import cudcn; print(cudcn.get_workspace_bytes())", value)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == nbytes


@pytest.mark.parametrize("value", ["-5", "0", "256M", "abc", "1.5", ""])
def test_bad_workspace_environment_variable_fails_at_first_use_not_at_import(value):
    code = (
        "import numpy as np, cudcn\n"
        "print('imported', flush=True)\n"
        "cudcn.deform_conv2d(np.ones((1, 1, 3, 3)), np.zeros((1, 2, 3, 3)), np.ones((1, 1, 1, 1)))\n"
    )
    result = _run_with_environment(code, value)
    assert result.stdout == "imported\n"
    assert result.returncode == 1
    assert f"cudcn.errors.ArgumentError: CUDCN_WORKSPACE_BYTES must be a positive size in bytes such as 268435456, 256MB or 1GiB, got {value!r}" in result.stderr
