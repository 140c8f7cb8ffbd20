"""The adapters' bridges, as an operator family other than deformable
convolution uses them: its own tensor names, optional tensors, integer
tensors (shapes, indices) beside floating ones, settings carried to a
backward in another thread."""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest

import cudcn


# ---------------------------------------------------------------------------
# torch


@pytest.fixture
def bridge():
    pytest.importorskip("torch")
    from cudcn.torch import _bridge

    return _bridge


@pytest.mark.torch
def test_torch_checks_follow_the_first_tensor_and_spare_integer_tensors(bridge):
    import torch

    value = torch.zeros(2, 10, 3, 4, dtype=torch.bfloat16)
    shapes = torch.tensor([[2, 3], [2, 2]])
    weights = torch.zeros(2, 5, 3, dtype=torch.bfloat16)
    tensors = {"value": value, "spatial_shapes": shapes, "attention_weights": weights, "mask": None}
    given = bridge.check_tensors(tensors, optional=("mask",), integer=("spatial_shapes",))
    assert list(given) == ["value", "spatial_shapes", "attention_weights"]
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape(
            "spatial_shapes.dtype must equal value.dtype = bfloat16, got int64")):
        bridge.check_tensors(tensors, optional=("mask",))
    with pytest.raises(cudcn.ArgumentTypeError, match="^mask must be a torch.Tensor, got None$"):
        bridge.check_tensors(tensors, integer=("spatial_shapes",))
    with pytest.raises(cudcn.ArgumentError, match=re.escape(
            "attention_weights is on meta but value is on cpu; pass tensors on one device")):
        bridge.check_tensors({"value": value, "attention_weights": weights.to("meta")})


@pytest.mark.torch
def test_torch_stand_ins_carry_shape_and_dtype_without_data(bridge):
    import torch

    tensors = {
        "value": torch.empty(2, 10, 3, 4, dtype=torch.bfloat16, device="meta"),  # no data at all
        "level_start_index": torch.empty(2, dtype=torch.int64, device="meta"),
        "bias": None,
    }
    stand_ins = bridge.stand_ins(tensors, optional=("bias",), integer=("level_start_index",))
    assert {name: (a.shape, a.dtype) for name, a in stand_ins.items()} == {
        "value": ((2, 10, 3, 4), np.float32),  # NumPy has no bfloat16
        "level_start_index": ((2,), np.int64),
    }
    assert all(a.strides == (0,) * a.ndim for a in stand_ins.values())


@pytest.mark.torch
def test_torch_settings_reach_a_backward_in_another_thread(bridge):
    import torch

    with cudcn.deterministic_algorithms(), cudcn.tf32(), cudcn.algorithm("im2col"), cudcn.workspace_bytes(2**20):
        saved = bridge.settings_at_forward()
    assert saved == (True, True, "im2col", 2**20)
    seen = []

    def backward(settings):
        with bridge.backward_settings(*settings):
            seen.append((cudcn.are_deterministic_algorithms_enabled(), cudcn.is_tf32_enabled(),
                         cudcn.get_algorithm(), cudcn.get_workspace_bytes()))

    for settings in (saved, bridge.ForwardSettings(False, False, "", 0)):
        thread = threading.Thread(target=backward, args=(settings,))
        thread.start()
        thread.join()
    assert seen[0] == (True, True, "im2col", 2**20)
    assert seen[1] == (False, False, cudcn.get_algorithm(), cudcn.get_workspace_bytes())  # the thread's own
    # torch's determinism setting, read where the backward runs, asks for the deterministic path too.
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with bridge.backward_settings(False, False):
            assert cudcn.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


# ---------------------------------------------------------------------------
# paddle


@pytest.mark.paddle
def test_paddle_checks_follow_the_first_tensor_and_spare_integer_tensors():
    paddle = pytest.importorskip("paddle")
    from cudcn.paddle import _bridge

    value = paddle.zeros([2, 10, 3, 4], dtype="bfloat16")
    shapes = paddle.to_tensor([[2, 3], [2, 2]], dtype="int64")
    layouts = {"value": "(N, S, M, D)", "spatial_shapes": "(L, 2)", "mask": "(N, Lq, M, L, P)"}
    tensors = {"value": value, "spatial_shapes": shapes, "mask": None}
    given = _bridge.check_tensors(tensors, layouts, optional=("mask",), integer=("spatial_shapes",))
    assert list(given) == ["value", "spatial_shapes"]
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape(
            "spatial_shapes.dtype must equal value.dtype = bfloat16, got int64")):
        _bridge.check_tensors(tensors, layouts, optional=("mask",))
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("mask must be a paddle.Tensor (N, Lq, M, L, P), got None")):
        _bridge.check_tensors(tensors, layouts, integer=("spatial_shapes",))
    assert _bridge.stand_in("spatial_shapes", shapes, [2, 2]).dtype == np.int64
