"""cudcn.paddle.ms_deform_attn and MultiScaleDeformableAttention.

The function must give the NumPy backend's results and gradients exactly
(through PyLayer, dygraph); the layer must compute what
cudcn.torch.MultiScaleDeformableAttention (mmcv's module, tested against
mmcv's forward) computes with the same weights, and train.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given

paddle = pytest.importorskip("paddle")

import cudcn  # noqa: E402
import cudcn.paddle as cpd  # noqa: E402
from msda_reference import calls  # noqa: E402

pytestmark = pytest.mark.paddle

FIELDS = ("value", "sampling_locations", "attention_weights")


def leaves(call, dtype="float64"):
    return [paddle.to_tensor(a.astype(dtype), stop_gradient=False)
            for a in (call.value, call.sampling_locations, call.attention_weights)]


@given(call=calls(min_batch=1))
def test_function_equals_the_numpy_backend_exactly(call):
    grad_output = np.random.default_rng(call.seed).standard_normal(
        (call.value.shape[0], call.sampling_locations.shape[1], call.value.shape[2] * call.value.shape[3]))
    expected = cudcn.ms_deform_attn(*call.args)
    expected_grads = cudcn.ms_deform_attn_backward(grad_output, *call.args)
    for levels in ((paddle.to_tensor(call.spatial_shapes), paddle.to_tensor(call.level_start_index)),
                   (call.shapes, None)):
        value, locations, weights = tensors = leaves(call)
        out = cpd.ms_deform_attn(value, *levels, locations, weights)
        np.testing.assert_array_equal(out.numpy(), expected)
        out.backward(paddle.to_tensor(grad_output))
        for t, field in zip(tensors, FIELDS):
            np.testing.assert_array_equal(t.grad.numpy(), getattr(expected_grads, field), err_msg=field)


@given(call=calls(min_batch=1, max_batch=1))
def test_inputs_that_stop_gradients_get_none(call):
    value, locations, weights = leaves(call)
    value.stop_gradient = True
    cpd.ms_deform_attn(value, call.shapes, None, locations, weights).sum().backward()
    assert value.grad is None
    assert locations.grad.shape == locations.shape and weights.grad.shape == weights.shape


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_dtypes(dtype):
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (2, 2)]
    value = rng.standard_normal((2, 16, 2, 4))
    locations = rng.uniform(0, 1, (2, 5, 2, 2, 3, 2))
    weights = rng.uniform(-1, 1, (2, 5, 2, 2, 3))
    tensors = [paddle.to_tensor(a, dtype=dtype, stop_gradient=False) for a in (value, locations, weights)]
    out = cpd.ms_deform_attn(tensors[0], shapes, None, *tensors[1:])
    assert out.dtype == tensors[0].dtype
    reference = cpd.ms_deform_attn(*(t.astype("float32") for t in tensors[:1]), shapes, None,
                                   *(t.astype("float32") for t in tensors[1:]))
    np.testing.assert_array_equal(out.astype("float32").numpy(), reference.astype(dtype).astype("float32").numpy())
    out.astype("float32").square().sum().backward()
    assert all(t.grad.dtype == t.dtype and bool(paddle.isfinite(t.grad.astype("float32")).all()) for t in tensors)


def test_double_backward_says_it_is_not_supported():
    rng = np.random.default_rng(1)
    value, locations, weights = (paddle.to_tensor(a, stop_gradient=False) for a in (
        rng.standard_normal((1, 5, 1, 2)), rng.uniform(0, 1, (1, 3, 1, 1, 2, 2)), rng.uniform(0, 1, (1, 3, 1, 1, 2))))
    grads = paddle.grad(cpd.ms_deform_attn(value, [(1, 5)], None, locations, weights).square().sum(),
                        [value, locations, weights], create_graph=True)
    with pytest.raises((OSError, cudcn.UnsupportedError), match=(
            "UnsupportedError: double backward of cudcn's multi-scale deformable attention .* is not supported")):
        (grads[1] ** 2).sum().backward()


def test_errors_name_the_argument():
    value = paddle.zeros([1, 5, 1, 2])
    locations, weights = paddle.zeros([1, 3, 1, 1, 2, 2]), paddle.zeros([1, 3, 1, 1, 2])
    with pytest.raises(cudcn.ArgumentError, match=re.escape("the cumulative sum of H_l*W_l = [0], got [1]")):
        cpd.ms_deform_attn(value, paddle.to_tensor([[1, 5]]), [1], locations, weights)
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("spatial_shapes.dtype must be an integer dtype")):
        cpd.ms_deform_attn(value, paddle.to_tensor([[1.0, 5.0]]), None, locations, weights)
    with pytest.raises(cudcn.ArgumentTypeError, match=re.escape("value must be a paddle.Tensor (N, S, M, D), got ndarray")):
        cpd.ms_deform_attn(value.numpy(), [(1, 5)], None, locations, weights)
    with pytest.raises(cudcn.ArgumentError, match=re.escape("value.shape[1] must be S")):
        cpd.ms_deform_attn(value, [(2, 5)], None, locations, weights)


def test_a_static_graph_is_refused_clearly():
    paddle.enable_static()
    try:
        with paddle.static.program_guard(paddle.static.Program(), paddle.static.Program()):
            value = paddle.static.data("value", [1, 5, 1, 2], "float32")
            locations = paddle.static.data("locations", [1, 3, 1, 1, 2, 2], "float32")
            weights = paddle.static.data("weights", [1, 3, 1, 1, 2], "float32")
            with pytest.raises(cudcn.UnsupportedError, match="runs in dygraph mode only"):
                cpd.ms_deform_attn(value, [(1, 5)], None, locations, weights)
    finally:
        paddle.disable_static()


SHAPES = [(4, 5), (2, 3), (1, 1)]
PIXELS = 27


def layer_inputs(seed=0, box=False):
    rng = np.random.default_rng(seed)
    reference = rng.uniform(0, 1, (2, 7, 3, 4 if box else 2))
    if box:
        reference[..., 2:] = reference[..., 2:] * 0.5 + 0.1
    return dict(query=rng.standard_normal((7, 2, 16)), value=rng.standard_normal((PIXELS, 2, 16)),
                query_pos=rng.standard_normal((7, 2, 16)), reference_points=reference,
                key_padding_mask=rng.random((2, PIXELS)) < 0.2)


@pytest.mark.parametrize("box", [False, True])
def test_the_layer_computes_what_the_torch_module_computes(box):
    torch = pytest.importorskip("torch")
    import cudcn.torch as ct

    paddle.seed(0)
    layer = cpd.MultiScaleDeformableAttention(16, 4, 3, 2, dropout=0.0)
    layer.to(dtype="float64")
    with paddle.no_grad():
        for p in layer.parameters():
            p.set_value(p + 0.05 * paddle.randn(p.shape, dtype=p.dtype))
    module = ct.MultiScaleDeformableAttention(16, 4, 3, 2, dropout=0.0).double()
    # paddle's Linear stores (in, out): the transpose of torch's weight.
    module.load_state_dict({k: torch.from_numpy(v.numpy().T.copy() if k.endswith("weight") else v.numpy())
                            for k, v in layer.state_dict().items()})
    arrays = layer_inputs(box=box)
    shapes = np.array(SHAPES)
    starts = np.array([0, 20, 26])
    paddle_args = {k: paddle.to_tensor(v, stop_gradient=k == "key_padding_mask") for k, v in arrays.items()}
    torch_args = {k: torch.tensor(v, requires_grad=k != "key_padding_mask") for k, v in arrays.items()}
    out = layer(**paddle_args, spatial_shapes=paddle.to_tensor(shapes), level_start_index=paddle.to_tensor(starts))
    expected = module(**torch_args, spatial_shapes=torch.tensor(shapes), level_start_index=torch.tensor(starts))
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch_params = dict(module.named_parameters())
    for name, p in layer.named_parameters():
        theirs = torch_params[name].grad.numpy()
        np.testing.assert_allclose(p.grad.numpy(), theirs.T if name.endswith("weight") else theirs,
                                   rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(paddle_args["query"].grad.numpy(), torch_args["query"].grad.numpy(), rtol=1e-10, atol=1e-12)


def test_the_layer_has_mmcvs_parameters_and_initialisation():
    torch = pytest.importorskip("torch")
    import cudcn.torch as ct

    layer = cpd.MultiScaleDeformableAttention()
    module = ct.MultiScaleDeformableAttention()
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {k: tuple(reversed(v.shape)) for k, v in module.state_dict().items()}
    np.testing.assert_allclose(layer.sampling_offsets.bias.numpy(), module.sampling_offsets.bias.detach().numpy(),
                               rtol=1e-6, atol=1e-6)  # float32 cos/sin may differ by an ulp between frameworks
    for name in ("sampling_offsets.weight", "attention_weights.weight", "attention_weights.bias",
                 "value_proj.bias", "output_proj.bias"):
        assert not layer.state_dict()[name].numpy().any(), name
    bound = (6.0 / (256 + 256)) ** 0.5
    assert 0 < np.abs(layer.value_proj.weight.numpy()).max() <= bound
    with pytest.raises(cudcn.ArgumentError, match=re.escape("embed_dims = 30 must be divisible by num_heads = 8")):
        cpd.MultiScaleDeformableAttention(30, 8)


def test_a_training_step():
    paddle.seed(1)
    layer = cpd.MultiScaleDeformableAttention(16, 4, 3, 2, dropout=0.0, batch_first=True)
    with paddle.no_grad():
        for p in layer.parameters():
            p.set_value(p + 0.05 * paddle.randn(p.shape, dtype=p.dtype))
    arrays = layer_inputs()
    query = paddle.to_tensor(arrays["query"].transpose(1, 0, 2), dtype="float32")
    value = paddle.to_tensor(arrays["value"].transpose(1, 0, 2), dtype="float32")
    reference = paddle.to_tensor(arrays["reference_points"], dtype="float32")
    target = paddle.randn(query.shape)
    optimizer = paddle.optimizer.SGD(learning_rate=0.1, parameters=layer.parameters())
    losses = []
    for _ in range(5):
        loss = paddle.nn.functional.mse_loss(
            layer(query, value=value, reference_points=reference, spatial_shapes=SHAPES), target)
        loss.backward()
        assert all(p.grad is not None and bool(p.grad.abs().max() > 0) for p in layer.parameters())
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
