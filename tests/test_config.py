"""Settings: workspace budget and deterministic algorithms."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import cudcn


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
