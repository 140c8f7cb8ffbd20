"""`cudcn check`: the NumPy backend against the oracle and finite differences."""

from __future__ import annotations

import numpy as np

from cudcn import cli
from cudcn.cli import check as selfcheck


def test_check_passes_and_prints_a_table(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "forward vs oracle" in out and "backward vs finite diff." in out
    assert "FAIL" not in out


def test_check_fails_on_a_wrong_backend(monkeypatch, capsys):
    """A backend that is off by a little must make the command exit 1."""
    import cudcn.backends.numpy_backend as numpy_backend

    real_forward = numpy_backend.forward

    def skewed_forward(*args):
        return real_forward(*args) * (1 + 1e-6)

    monkeypatch.setattr(numpy_backend, "forward", skewed_forward)
    assert cli.main(["check"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cases_keep_offsets_off_integer_kinks():
    case = selfcheck.make_case("small", np.float64, np.random.default_rng(0))
    fraction = np.abs(case["offset"] - np.round(case["offset"]))
    assert fraction.min() >= 0.09
