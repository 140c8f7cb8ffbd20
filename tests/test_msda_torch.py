"""Multi-scale deformable attention against torch (skipped without torch):

- a pure-torch implementation on grid_sample written here
  (tests/msda_reference.py) and HF transformers' own pure-torch
  ``MultiScaleDeformableAttention`` (when importable): forward and every
  gradient to rounding in float64, away from kinks (autograd through
  grid_sample's CPU backward);
- float16 / bfloat16: at most twice the error of the same pure-torch
  computation done in that precision (plus one unit in the last place),
  both measured against float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given

import cudcn
from msda_reference import MSDACall, calls, floats_as, torch_grid_sample, transformers_detr

torch = pytest.importorskip("torch")

FIELDS = ("value", "sampling_locations", "attention_weights")


def _hf_function():
    """transformers' pure-torch MSDA as a function of the argument tuple, or None."""
    detr, _ = transformers_detr()
    if detr is None:
        return None
    module = detr.MultiScaleDeformableAttention()

    def run(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        shapes_list = [tuple(int(s) for s in pair) for pair in spatial_shapes.tolist()]
        return module(value, spatial_shapes, shapes_list, level_start_index, sampling_locations,
                      attention_weights, 64)

    return run


HF = _hf_function()
IMPLEMENTATIONS = {
    "grid_sample here": lambda v, shapes, starts, loc, a: torch_grid_sample(
        v, [tuple(int(s) for s in pair) for pair in shapes.tolist()], loc, a),
    "transformers": HF,
}


def _torch_result(implementation, call, grad_output, dtype=torch.float64):
    """Output and gradients (value, sampling_locations, attention_weights) by autograd."""
    leaves = [torch.tensor(a, dtype=dtype, requires_grad=True)
              for a in (call.value, call.sampling_locations, call.attention_weights)]
    value, locations, weights = leaves
    out = implementation(value, torch.tensor(call.spatial_shapes), torch.tensor(call.level_start_index),
                         locations, weights)
    out.backward(torch.tensor(grad_output, dtype=dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@given(call=calls(min_batch=1))
def test_matches_torch_in_float64(name, call):
    implementation = IMPLEMENTATIONS[name]
    if implementation is None:
        pytest.skip(transformers_detr()[1])
    if call.sampling_locations.shape[1] == 0:
        return  # grid_sample refuses an empty grid; tests/test_msda_numpy.py covers Lq = 0
    out = cudcn.ms_deform_attn(*call.args)
    grad_output = np.random.default_rng(call.seed).standard_normal(out.shape)
    expected, expected_grads = _torch_result(implementation, call, grad_output)
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-12, atol=1e-12)
    grads = cudcn.ms_deform_attn_backward(grad_output, *call.args)
    for field, e in zip(FIELDS, expected_grads):
        np.testing.assert_allclose(getattr(grads, field), e.numpy(), rtol=1e-11, atol=1e-11, err_msg=field)


def relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    return float(np.abs(got - expected).max(initial=0.0)) / scale


HALF = [("float16", torch.float16)]
try:
    import ml_dtypes

    HALF.append((ml_dtypes.bfloat16, torch.bfloat16))
except ImportError:
    pass


@pytest.mark.parametrize(("dtype", "torch_dtype"), HALF, ids=[str(t) for _, t in HALF])
@pytest.mark.parametrize("seed", range(4))
def test_half_precision_error_at_most_twice_plain(dtype, torch_dtype, seed):
    """Forward and gradients in float16/bfloat16 against float64 on the same
    (rounded) inputs: cudcn's error is at most twice that of the plain
    pure-torch computation in that dtype, plus one unit in the last place."""
    rng = np.random.default_rng(seed)
    shapes = np.array([[12, 15], [6, 8], [3, 4]])
    starts = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]])
    n, queries, heads, channels, points = 2, 40, 2, 8, 4
    value = rng.standard_normal((n, int(starts[-1] + 12), heads, channels)).astype(dtype)
    locations = rng.uniform(-0.05, 1.05, (n, queries, heads, 3, points, 2)).astype(dtype)
    weights = rng.dirichlet(np.ones(3 * points), (n, queries, heads)).reshape(n, queries, heads, 3, points).astype(dtype)
    grad_output = rng.standard_normal((n, queries, heads * channels)).astype(dtype)
    args = (value, shapes, starts, locations, weights)
    exact_args = floats_as(np.float64, args)

    out = cudcn.ms_deform_attn(*args)
    grads = cudcn.ms_deform_attn_backward(grad_output, *args)
    reference = cudcn.ms_deform_attn(*exact_args)
    reference_grads = cudcn.ms_deform_attn_backward(grad_output.astype(np.float64), *exact_args)

    # The plain computation: the same pure-torch code on the same values, in the dtype.
    same = MSDACall(*floats_as(np.float32, args), seed=seed)
    plain, plain_grads = _torch_result(IMPLEMENTATIONS["grid_sample here"], same, grad_output.astype(np.float32),
                                       dtype=torch_dtype)
    ulp = float(np.finfo(np.float16).eps) if torch_dtype == torch.float16 else 2.0**-7
    checks = [("out", out, plain, reference)] + [
        (f, getattr(grads, f), p, getattr(reference_grads, f)) for f, p in zip(FIELDS, plain_grads)]
    for name, ours, theirs, exact in checks:
        assert np.asarray(ours).dtype == np.dtype(dtype)
        ours_error = relative_error(np.asarray(ours, np.float64), exact)
        plain_error = relative_error(theirs.to(torch.float64).numpy(), exact)
        assert ours_error <= 2 * plain_error + ulp, f"{name}: {ours_error:.2e} vs plain {plain_error:.2e}"
