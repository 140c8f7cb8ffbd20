"""Every malformed multi-scale deformable attention call raises a clear error naming the argument."""

from __future__ import annotations

import re
import sys
import types

import numpy as np
import pytest

import cudcn
from cudcn.msda_geometry import validate_msda

SHAPES = np.array([[4, 5], [2, 3]])  # S = 26


def good(**changes):
    """A valid call: N=2, S=26 over two levels, M=3 heads, D=4, Lq=7, P=2."""
    rng = np.random.default_rng(0)
    kwargs = dict(
        value=rng.standard_normal((2, 26, 3, 4)),
        spatial_shapes=SHAPES.copy(),
        level_start_index=np.array([0, 20]),
        sampling_locations=rng.random((2, 7, 3, 2, 2, 2)),
        attention_weights=rng.random((2, 7, 3, 2, 2)),
    )
    kwargs.update(changes)
    return kwargs


def test_the_good_call_is_good():
    assert cudcn.ms_deform_attn(**good()).shape == (2, 7, 12)
    assert cudcn.ms_deform_attn(**good(), im2col_step=1).shape == (2, 7, 12)
    geom = validate_msda(**good(spatial_shapes=SHAPES.astype(np.uint8), level_start_index=np.array([0, 20], np.int32)))
    assert geom.shapes == ((4, 5), (2, 3)) and geom.starts == (0, 20)
    assert all(type(v) is int for pair in geom.shapes for v in pair)
    assert (geom.batch, geom.pixels, geom.heads, geom.channels, geom.queries, geom.levels, geom.points) == (2, 26, 3, 4, 7, 2, 2)


VALUE_ERRORS = [
    # (changes, message)
    (dict(value=np.zeros((2, 26, 12))), "value must be a 4-D array (N, S, M, D), got 3-D with shape (2, 26, 12)"),
    (dict(value=np.zeros((2, 25, 3, 4))),
     "value.shape[1] must be S, the pixels of all levels (sum of H_l*W_l of spatial_shapes) = 26, got 25"),
    (dict(spatial_shapes=np.array([[4, 5], [2, 4]]), level_start_index=np.array([0, 20])),
     "value.shape[1] must be S, the pixels of all levels (sum of H_l*W_l of spatial_shapes) = 28, got 26"),
    (dict(value=np.zeros((2, 26, 0, 4)), sampling_locations=np.zeros((2, 7, 0, 2, 2, 2)),
          attention_weights=np.zeros((2, 7, 0, 2, 2))), "value.shape[2] (M, the heads) must be >= 1, got 0"),
    (dict(value=np.zeros((2, 26, 3, 0))), "value.shape[3] (D, the channels per head) must be >= 1, got 0"),
    (dict(spatial_shapes=np.array([4, 5, 2, 3])), "spatial_shapes must be a 2-D array (L, 2) of (H_l, W_l), got 1-D"),
    (dict(spatial_shapes=np.array([[4, 5, 1], [2, 3, 1]])), "spatial_shapes.shape must be (L, 2) with L >= 1 levels, got (2, 3)"),
    (dict(spatial_shapes=np.zeros((0, 2), np.int64)), "spatial_shapes.shape must be (L, 2) with L >= 1 levels, got (0, 2)"),
    (dict(spatial_shapes=np.array([[4, 5], [0, 3]])), "spatial_shapes must hold positive (H_l, W_l), got [[4, 5], [0, 3]]"),
    (dict(spatial_shapes=np.array([[4, 5], [-2, -3]])), "spatial_shapes must hold positive (H_l, W_l), got [[4, 5], [-2, -3]]"),
    (dict(level_start_index=np.array([0, 21])),
     "level_start_index must be the first pixel of each level, the cumulative sum of H_l*W_l = [0, 20], got [0, 21]"),
    (dict(level_start_index=np.array([20, 0])),
     "level_start_index must be the first pixel of each level, the cumulative sum of H_l*W_l = [0, 20], got [20, 0]"),
    (dict(level_start_index=np.array([0])), "level_start_index.shape[0] must be L, the levels of spatial_shapes = 2, got 1"),
    (dict(level_start_index=np.array([[0, 20]])), "level_start_index must be a 1-D array (L,), got 2-D"),
    (dict(sampling_locations=np.zeros((2, 7, 3, 2, 2))), "sampling_locations must be a 6-D array (N, Lq, M, L, P, 2), got 5-D"),
    (dict(sampling_locations=np.zeros((1, 7, 3, 2, 2, 2))), "sampling_locations.shape[0] must be value.shape[0] (N) = 2, got 1"),
    (dict(sampling_locations=np.zeros((2, 7, 4, 2, 2, 2))), "sampling_locations.shape[2] must be value.shape[2] (M) = 3, got 4"),
    (dict(sampling_locations=np.zeros((2, 7, 3, 3, 2, 2))),
     "sampling_locations.shape[3] must be the levels of spatial_shapes (L) = 2, got 3"),
    (dict(sampling_locations=np.zeros((2, 7, 3, 2, 2, 3))), "sampling_locations.shape[5] must be 2, the (x, y) of a location = 2, got 3"),
    (dict(sampling_locations=np.zeros((2, 7, 3, 2, 0, 2)), attention_weights=np.zeros((2, 7, 3, 2, 0))),
     "sampling_locations.shape[4] (P, the points) must be >= 1, got 0"),
    (dict(attention_weights=np.zeros((2, 7, 3, 2))), "attention_weights must be a 5-D array (N, Lq, M, L, P), got 4-D"),
    (dict(attention_weights=np.zeros((2, 7, 3, 2, 3))),
     "attention_weights.shape must be (N, Lq, M, L, P) = (2, 7, 3, 2, 2) (as sampling_locations), got (2, 7, 3, 2, 3)"),
    (dict(attention_weights=np.zeros((2, 6, 3, 2, 2))),
     "attention_weights.shape must be (N, Lq, M, L, P) = (2, 7, 3, 2, 2) (as sampling_locations), got (2, 6, 3, 2, 2)"),
]


@pytest.mark.parametrize("changes, message", VALUE_ERRORS, ids=[m[:50] for _, m in VALUE_ERRORS])
def test_value_errors(changes, message):
    with pytest.raises(cudcn.ArgumentError, match=re.escape(message)):
        cudcn.ms_deform_attn(**good(**changes))
    with pytest.raises(cudcn.ArgumentError, match=re.escape(message)):
        cudcn.ms_deform_attn_backward(np.zeros((2, 7, 12)), **good(**changes))


TYPE_ERRORS = [
    (dict(value=np.zeros((2, 26, 3, 4), np.int64)), "value.dtype must be one of float16, bfloat16, float32, float64, got int64"),
    (dict(sampling_locations=np.zeros((2, 7, 3, 2, 2, 2), np.float32)),
     "sampling_locations.dtype must equal value.dtype = float64, got float32"),
    (dict(attention_weights=np.zeros((2, 7, 3, 2, 2), np.float16)),
     "attention_weights.dtype must equal value.dtype = float64, got float16"),
    (dict(spatial_shapes=SHAPES.astype(np.float64)), "spatial_shapes.dtype must be an integer dtype, got float64"),
    (dict(spatial_shapes=SHAPES.astype(bool)), "spatial_shapes.dtype must be an integer dtype, got bool"),
    (dict(level_start_index=np.array([0.0, 20.0])), "level_start_index.dtype must be an integer dtype, got float64"),
    (dict(spatial_shapes=[[4, 5], [2, 3]]), "spatial_shapes must be a numpy.ndarray or cupy.ndarray, got builtins.list"),
    (dict(value=[[[[0.0]]]]), "value must be a numpy.ndarray or cupy.ndarray, got builtins.list"),
    (dict(value=None), "value must be an array (N, S, M, D), got None"),
    (dict(spatial_shapes=None), "spatial_shapes must be an integer array (L, 2) of (H_l, W_l), got None"),
    (dict(level_start_index=None), "level_start_index must be an integer array (L,), got None"),
    (dict(sampling_locations=None), "sampling_locations must be an array (N, Lq, M, L, P, 2), got None"),
    (dict(attention_weights=None), "attention_weights must be an array (N, Lq, M, L, P), got None"),
]


@pytest.mark.parametrize("changes, message", TYPE_ERRORS, ids=[m[:50] for _, m in TYPE_ERRORS])
def test_type_errors(changes, message):
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape(message)):
        cudcn.ms_deform_attn(**good(**changes))


@pytest.mark.parametrize("step", [0, -1, 2.0, True, None, "64"])
def test_im2col_step_must_be_a_positive_int(step):
    with pytest.raises(cudcn.ArgumentError, match=re.escape(f"im2col_step must be a positive int, got {step!r}")):
        cudcn.ms_deform_attn(**good(), im2col_step=step)


@pytest.mark.parametrize("step", [1, 3, 64, np.int64(5)])
def test_im2col_step_is_ignored(step):
    """No batch-divisibility rule: N = 2 with any step (mmcv requires N % step == 0)."""
    np.testing.assert_array_equal(cudcn.ms_deform_attn(**good(), im2col_step=step), cudcn.ms_deform_attn(**good()))


def test_grad_output_errors():
    with pytest.raises(cudcn.ArgumentError, match=re.escape("grad_output must be a 3-D array (N, Lq, M*D), got 4-D")):
        cudcn.ms_deform_attn_backward(np.zeros((2, 7, 3, 4)), **good())
    with pytest.raises(cudcn.ArgumentError, match=re.escape("grad_output.shape must be (N, Lq, M*D) = (2, 7, 12), got (2, 7, 13)")):
        cudcn.ms_deform_attn_backward(np.zeros((2, 7, 13)), **good())
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("grad_output.dtype must equal value.dtype = float64, got float32")):
        cudcn.ms_deform_attn_backward(np.zeros((2, 7, 12), np.float32), **good())
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("grad_output must be an array (N, Lq, M*D), got None")):
        cudcn.ms_deform_attn_backward(None, **good())


def test_adapter_names_appear_in_messages():
    with pytest.raises(cudcn.ArgumentError, match=re.escape("input_flatten.shape[1] must be S")):
        cudcn.ms_deform_attn(**good(value=np.zeros((2, 25, 3, 4))), names={"value": "input_flatten"})


def test_errors_are_also_runtime_errors():
    with pytest.raises(RuntimeError):
        cudcn.ms_deform_attn(**good(level_start_index=np.array([0, 19])))
    with pytest.raises(RuntimeError):
        cudcn.ms_deform_attn(**good(spatial_shapes=SHAPES.astype(np.float32)))


class _StandInCupyArray:
    """Plays a CuPy array: shape, dtype, device, and .get() for the host copy."""

    device = types.SimpleNamespace(id=0)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape, self.ndim, self.dtype = array.shape, array.ndim, array.dtype

    def get(self) -> np.ndarray:
        return self.array


def test_a_backend_without_msda_gives_a_clear_error(monkeypatch):
    """Kinds are told apart through sys.modules; a stand-in module plays CuPy,
    and the CUDA backend, its MSDA functions taken away, plays a backend that
    lacks the family. spatial_shapes and level_start_index are read on the
    host (.get())."""
    import cudcn.backends.cuda as cuda_backend

    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=_StandInCupyArray))
    monkeypatch.delattr(cuda_backend, "ms_deform_attn_forward")
    monkeypatch.delattr(cuda_backend, "ms_deform_attn_backward")
    on_device = {k: _StandInCupyArray(v) for k, v in good().items()}
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape(
            "value is a cupy array, and cudcn's cupy backend has no ms_deform_attn_forward yet; pass NumPy arrays")):
        cudcn.ms_deform_attn(**on_device)
    with pytest.raises(cudcn.ArgumentTypeError, match="no ms_deform_attn_backward yet"):
        cudcn.ms_deform_attn_backward(_StandInCupyArray(np.zeros((2, 7, 12))), **on_device)
    # The levels may also stay on the host: they are only read.
    with pytest.raises(cudcn.ArgumentTypeError, match="no ms_deform_attn_forward yet"):
        cudcn.ms_deform_attn(**dict(on_device, spatial_shapes=SHAPES, level_start_index=np.array([0, 20])))
    # Shapes are still checked first, with the levels read from the device arrays.
    with pytest.raises(cudcn.ArgumentError, match=re.escape("level_start_index must be the first pixel")):
        cudcn.ms_deform_attn(**dict(on_device, level_start_index=_StandInCupyArray(np.array([0, 3]))))


def test_numpy_mixed_with_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(ndarray=_StandInCupyArray))
    kwargs = good()
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape(
            "sampling_locations is a cupy array but value is a numpy array; pass arrays of one kind")):
        cudcn.ms_deform_attn(**dict(kwargs, sampling_locations=_StandInCupyArray(kwargs["sampling_locations"])))


def test_errors_leave_arguments_untouched():
    kwargs = good(level_start_index=np.array([0, 21]))
    copies = {k: v.copy() for k, v in kwargs.items()}
    with pytest.raises(ValueError):
        cudcn.ms_deform_attn(**kwargs)
    for key, copy in copies.items():
        np.testing.assert_array_equal(kwargs[key], copy)
