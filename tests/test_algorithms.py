"""The CUDA backend's algorithm setting and "auto"'s measure-once choice.

Runs the real selection code with a NumPy engine and stand-in algorithms
(the fused kernels are checked on their own under emulation): which one runs
for each setting, that "auto" times every applicable algorithm once per key,
keeps the faster and returns its result, and that the choice is visible.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import types

import numpy as np
import pytest

import cudcn
from cudcn.backends.cuda import algorithms
from cudcn.geometry import SignatureCache, validate


class NumpyEngine:
    xp = np


def _stand_in(name: str, seconds: float, applies=lambda engine, geom, direction: None):
    """An algorithm that records its calls, sleeps, and returns its name."""
    calls = []

    def forward(engine, geom, *arrays):
        calls.append(("forward", geom.dtype.name))
        time.sleep(seconds)
        return name

    def backward(engine, geom, *arrays):
        calls.append(("backward", geom.dtype.name))
        time.sleep(seconds)
        return name

    module = types.SimpleNamespace(forward=forward, backward=backward)
    return algorithms.Algorithm(name, module, applies), calls


@pytest.fixture
def registry(monkeypatch):
    reference, reference_calls = _stand_in("im2col", 0.02)
    fused, fused_calls = _stand_in("fused", 0.0, applies=lambda e, g, d: None if g.dtype != np.float64 else "no float64")
    monkeypatch.setattr(algorithms, "REFERENCE", reference)
    monkeypatch.setattr(algorithms, "REGISTRY", {"im2col": reference, "fused": fused})
    monkeypatch.setattr(algorithms, "_choices", {})
    monkeypatch.setattr(algorithms, "_applicable", SignatureCache())
    return {"im2col": reference_calls, "fused": fused_calls}


def _geometry(dtype=np.float32, batch=2):
    x = np.zeros((batch, 4, 5, 5), dtype)
    return validate(input=x, offset=np.zeros((batch, 18, 5, 5), dtype), weight=np.zeros((3, 4, 3, 3), dtype), padding=1)


def test_explicit_settings_pick_their_algorithm(registry):
    geom = _geometry()
    with cudcn.algorithm("im2col"):
        assert algorithms.run("forward", NumpyEngine(), geom) == "im2col"
    with cudcn.algorithm("fused"):
        assert algorithms.run("backward", NumpyEngine(), geom) == "fused"
        # Where the fused algorithm does not apply, the reference runs.
        assert algorithms.run("forward", NumpyEngine(), _geometry(np.float64)) == "im2col"
    assert algorithms.choices() == []


def test_auto_times_each_candidate_once_per_key_and_keeps_the_faster(registry):
    geom = _geometry()
    assert cudcn.get_algorithm() == "auto"
    assert algorithms.run("forward", NumpyEngine(), geom) == "fused"
    assert registry["im2col"] == [("forward", "float32")] * 2  # warm-up and timed run
    assert registry["fused"] == [("forward", "float32")] * 2
    (choice,) = algorithms.choices()
    assert choice.chosen == "fused" and choice.direction == "forward" and choice.geometry == geom
    assert choice.seconds["im2col"] > choice.seconds["fused"]
    for _ in range(3):  # remembered: only the winner runs, once per call
        assert algorithms.run("forward", NumpyEngine(), geom) == "fused"
    assert len(registry["im2col"]) == 2 and len(registry["fused"]) == 5
    # A new key measures again: another direction, batch, dtype or setting.
    algorithms.run("backward", NumpyEngine(), geom)
    algorithms.run("forward", NumpyEngine(), _geometry(batch=3))
    with cudcn.deterministic_algorithms():
        algorithms.run("forward", NumpyEngine(), geom)
    with cudcn.workspace_bytes(12345):
        algorithms.run("forward", NumpyEngine(), geom)
    assert len(algorithms.choices()) == 5
    assert cudcn.algorithm_choices() == algorithms.choices()


def test_auto_with_one_candidate_measures_nothing(registry):
    assert algorithms.run("forward", NumpyEngine(), _geometry(np.float64)) == "im2col"
    assert registry["im2col"] == [("forward", "float64")] and registry["fused"] == []
    assert algorithms.choices() == []


def test_auto_keeps_the_reference_when_it_is_faster(registry, monkeypatch):
    slow, _ = _stand_in("fused", 0.05)
    monkeypatch.setitem(algorithms.REGISTRY, "fused", slow)
    assert algorithms.run("forward", NumpyEngine(), _geometry()) == "im2col"
    assert algorithms.choices()[0].chosen == "im2col"


def test_algorithm_setting_validation_and_scope():
    assert cudcn.get_algorithm() == "auto"
    with pytest.raises(ValueError, match="name must be one of 'auto', 'fused', 'im2col', got 'fast'"):
        cudcn.set_algorithm("fast")
    with pytest.raises(ValueError, match="name must be one of"):
        with cudcn.algorithm(None):
            pass
    seen = []
    with cudcn.algorithm("im2col"):
        thread = threading.Thread(target=lambda: seen.append(cudcn.get_algorithm()))
        thread.start()
        thread.join()
        assert cudcn.get_algorithm() == "im2col"
    assert seen == ["auto"] and cudcn.get_algorithm() == "auto"
    cudcn.set_algorithm("fused")
    try:
        assert cudcn.get_algorithm() == "fused"
    finally:
        cudcn.set_algorithm("auto")


@pytest.mark.parametrize("value, expected", [("fused", "fused"), ("im2col", "im2col"), ("fast", None)])
def test_environment_variable(value, expected):
    import os
    import subprocess
    import sys

    code = "import cudcn\nprint('imported', flush=True)\nprint(cudcn.get_algorithm())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=dict(os.environ, CUDCN_ALGORITHM=value))
    if expected is None:
        assert result.stdout == "imported\n" and result.returncode == 1
        assert "CUDCN_ALGORITHM must be one of 'auto', 'fused', 'im2col', got 'fast'" in result.stderr
    else:
        assert result.stdout.split() == ["imported", expected]


def _stream(capturing: bool):
    return types.SimpleNamespace(get_current_stream=lambda: types.SimpleNamespace(is_capturing=lambda: capturing))


class CapturingEngine:
    """An engine whose current stream is being captured into a CUDA graph,
    and which cannot capture GEMMs (as CuPy's cuBLAS wrapper)."""

    xp = types.SimpleNamespace(cuda=_stream(True))


class GemmCapturingEngine(CapturingEngine):
    """A capturing engine that can capture GEMMs too (libcublas called directly)."""

    captures_gemms = True


def test_under_graph_capture_auto_runs_its_choice_for_the_key(registry):
    """Nothing can be timed while a stream is captured: "auto" runs what it
    measured for the key before the capture, whichever it chose."""
    geom = _geometry()
    algorithms.run("forward", NumpyEngine(), geom)  # measured: fused is faster here
    assert algorithms.choices()[0].chosen == "fused"
    calls = {name: len(c) for name, c in registry.items()}
    assert algorithms.run("forward", GemmCapturingEngine(), geom) == "fused"
    assert registry["fused"][calls["fused"]:] == [("forward", "float32")] and len(registry["im2col"]) == calls["im2col"]
    # The same key with im2col measured faster: im2col runs under capture.
    key = next(iter(algorithms._choices))
    algorithms._choices[key] = _with_choice(algorithms._choices[key], "im2col")
    assert algorithms.run("forward", GemmCapturingEngine(), geom) == "im2col"
    assert len(algorithms.choices()) == 1  # nothing measured under capture


def _with_choice(choice, chosen):
    """``choice`` as if "auto" had measured ``chosen`` faster."""
    return dataclasses.replace(choice, chosen=chosen)


def test_under_graph_capture_an_unmeasured_key_runs_the_reference_untimed(registry):
    assert algorithms.run("forward", GemmCapturingEngine(), _geometry()) == "im2col"
    assert registry["im2col"] == [("forward", "float32")] and registry["fused"] == []
    assert algorithms.choices() == []


def test_without_gemm_capture_the_column_free_algorithm_stands_in(registry):
    """Where the engine cannot capture GEMMs, im2col (measured or not)
    gives way to the column-free algorithm; where that does not apply
    either, the call says why instead of failing inside CuPy."""
    geom = _geometry()
    assert algorithms.run("forward", CapturingEngine(), geom) == "fused"
    algorithms.run("forward", NumpyEngine(), _geometry(batch=3))
    key = next(iter(algorithms._choices))
    algorithms._choices[key] = _with_choice(algorithms._choices[key], "im2col")
    assert algorithms.run("forward", CapturingEngine(), _geometry(batch=3)) == "fused"
    with pytest.raises(cudcn.UnsupportedError, match=r"cannot be captured into a CUDA graph.*no column-free "
                                                     r"algorithm applies \(no float64\)"):
        algorithms.run("forward", CapturingEngine(), _geometry(np.float64))
    with cudcn.algorithm("im2col"), pytest.raises(cudcn.UnsupportedError, match="the algorithm setting is 'im2col'"):
        algorithms.run("forward", CapturingEngine(), geom)


def test_under_graph_capture_the_explicit_settings_stand(registry):
    geom = _geometry()
    with cudcn.algorithm("im2col"):
        assert algorithms.run("forward", GemmCapturingEngine(), geom) == "im2col"
    with cudcn.algorithm("fused"):
        assert algorithms.run("backward", CapturingEngine(), geom) == "fused"
        assert algorithms.run("forward", GemmCapturingEngine(), _geometry(np.float64)) == "im2col"
    assert algorithms.choices() == []


def test_what_applies_is_worked_out_once_per_key(registry, monkeypatch):
    """The rules run on a key's first call only; another dtype is another key."""
    seen = []
    rule = algorithms.REGISTRY["fused"].applies

    def counted(engine, geom, direction):
        seen.append(geom.dtype.name)
        return rule(engine, geom, direction)

    monkeypatch.setitem(algorithms.REGISTRY, "fused", algorithms.Algorithm("fused", algorithms.REGISTRY["fused"].module,
                                                                           counted))
    with cudcn.algorithm("fused"):
        for _ in range(3):
            algorithms.run("forward", NumpyEngine(), _geometry())
        algorithms.run("forward", NumpyEngine(), _geometry(np.float64))
    assert seen == ["float32", "float64"]
