"""`cudcn check`: the NumPy backend against the oracle and finite
differences, and every adapter that is installed against the NumPy backend."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

from cudcn import cli
from cudcn.cli import check as selfcheck

CHECKS = ("forward", "grad input", "grad offset", "grad weight", "grad bias", "grad mask")


def _rows(out: str, target: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith(f"{target:12} ")]


def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "forward vs oracle" in out and "backward vs finite diff." in out
    assert "FAIL" not in out
    assert re.search(r"^(\d+) passed, 0 failed$", out, re.MULTILINE)


@pytest.mark.parametrize("framework", ["torch", "paddle"])
def test_check_covers_each_installed_adapter_forward_and_all_gradients(capsys, framework):
    pytest.importorskip(framework)
    assert cli.main(["check"]) == 0
    rows = _rows(capsys.readouterr().out, f"{framework} cpu")
    for case in selfcheck.CASES:
        for dtype in ("float64", "float32"):
            for what in CHECKS:
                assert sum(re.search(rf"\s{dtype}\s+{case}\s+{what}\s.*\sok$", row) is not None
                           for row in rows) == 1, (case, dtype, what)


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    """A backend that is off by a little must make the command exit 1."""
    import cudcn.backends.numpy as numpy_backend

    real_forward = numpy_backend.forward

    def skewed_forward(*args):
        return real_forward(*args) * (1 + 1e-6)

    monkeypatch.setattr(numpy_backend, "forward", skewed_forward)
    assert cli.main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_fails_on_a_wrong_adapter_gradient(monkeypatch, capsys):
    """An adapter whose offset gradient is off makes exactly those rows fail,
    and --quiet prints only them."""
    torch = pytest.importorskip("torch")
    import cudcn.torch as adapter

    real = adapter.deform_conv2d

    class SkewOffsetGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, offset):
            return offset.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * 1.01

    def skewed(input, offset, *args, **kwargs):
        return real(input, SkewOffsetGradient.apply(offset), *args, **kwargs)

    monkeypatch.setattr(adapter, "deform_conv2d", skewed)
    assert cli.main(["check", "--quiet"]) == 1
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if line.endswith("FAIL")]
    assert len(failed) == 4 and all(line.startswith("torch cpu") and "grad offset" in line for line in failed)
    assert " ok" not in out  # quiet: the passing rows are left out
    assert re.search(r"^\d+ passed, 4 failed$", out, re.MULTILINE)


def test_check_says_why_a_target_is_not_checked(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "paddle", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "paddle adapter: not checked: paddle not installed" in out
    assert "cuda (cupy): not checked: CuPy not installed" in out
    assert not _rows(out, "paddle cpu")


def test_cases_keep_offsets_off_integer_kinks():
    case = selfcheck.make_case("small", np.float64, np.random.default_rng(0))
    fraction = np.abs(case["offset"] - np.round(case["offset"]))
    assert fraction.min() >= 0.09
