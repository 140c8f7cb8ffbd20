"""cudcn.paddle.DCNv3 and cudcn.paddle.DCNv4 against cudcn.torch.DCNv3 and
DCNv4 (themselves checked against the references' forwards written out in
test_dcnv3_modules.py): the same state dicts (in paddle's layouts), the same
outputs and parameter gradients with copied weights, a training step, and
dygraph only."""

from __future__ import annotations

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")
torch = pytest.importorskip("torch")

import cudcn  # noqa: E402
import cudcn.paddle as cpd  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from test_dcnv3_modules import (  # noqa: E402
    DCNV3_CONFIGS,
    DCNV4_CONFIGS,
    dcnv3_reference_shapes,
    dcnv4_reference_shapes,
    ids,
    random_state,
)

pytestmark = pytest.mark.paddle

#: The Linear layers, whose weights paddle stores as (in, out).
LINEARS = ("input_proj", "output_proj", "value_proj", "offset", "mask", "offset_mask")
#: torch's BatchNorm buffers by paddle's names.
BUFFERS = {"running_mean": "_mean", "running_var": "_variance"}


def is_linear_weight(key: str) -> bool:
    return key.endswith(".weight") and key.rsplit(".", 1)[0] in LINEARS


def paddle_key(key: str) -> str:
    head, _, last = key.rpartition(".")
    return f"{head}.{BUFFERS[last]}" if last in BUFFERS else key


def to_paddle(state: dict) -> dict:
    """A torch state dict in paddle's layouts: Linear weights transposed, BatchNorm's statistics renamed."""
    return {paddle_key(k): paddle.to_tensor(v.numpy().T.copy() if is_linear_weight(k) else v.numpy())
            for k, v in state.items() if not k.endswith("num_batches_tracked")}


def pair(torch_cls, paddle_cls, config, shapes, seed=0):
    """A torch module and a paddle layer with the same random float64 weights, in eval mode."""
    state = random_state(shapes, seed)
    module = torch_cls(**config).double()
    module.load_state_dict(state, strict=True)
    paddle.set_default_dtype("float64")
    try:
        layer = paddle_cls(**config)
    finally:
        paddle.set_default_dtype("float32")
    missing, unexpected = layer.set_state_dict(to_paddle(state))
    assert not missing and not unexpected
    return module.eval(), layer.eval()


def test_state_dict_keys_and_shapes_are_the_torch_modules_in_paddles_layout():
    for config in DCNV3_CONFIGS:
        layer, shapes = cpd.DCNv3(**config), dcnv3_reference_shapes(**config)
        expected = {paddle_key(k): tuple(reversed(s)) if is_linear_weight(k) else s
                    for k, s in shapes.items() if not k.endswith("num_batches_tracked")}
        assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected, config
    for config in DCNV4_CONFIGS:
        layer, shapes = cpd.DCNv4(**config), dcnv4_reference_shapes(**config)
        expected = {k: tuple(reversed(s)) if is_linear_weight(k) else s for k, s in shapes.items()}
        assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == expected, config


def test_initialisation():
    """The predictors and the gate start at zero, the projections are
    xavier-uniform (within sqrt(6 / (2C)), not zero) with zero biases."""
    paddle.seed(0)
    layer = cpd.DCNv3(16, group=4, center_feature_scale=True)
    state = {k: v.numpy() for k, v in layer.state_dict().items()}
    for key in ("offset.weight", "offset.bias", "mask.weight", "mask.bias", "input_proj.bias", "output_proj.bias",
                "center_feature_scale_proj_weight", "center_feature_scale_proj_bias"):
        assert not state[key].any(), key
    for key in ("input_proj.weight", "output_proj.weight"):
        assert 0 < np.abs(state[key]).max() <= np.sqrt(6 / 32) and state[key].std() > 0.1, key
    layer4 = cpd.DCNv4(16, group=2, output_bias=False)
    assert not layer4.offset_mask.weight.numpy().any() and layer4.output_proj.bias is None
    assert not layer4(paddle.randn([1, 16, 16])).numpy().any()  # mask 0: output 0


def compare(module, layer, x, call_torch, call_paddle, seed):
    """Outputs and every parameter's gradient (Linear weights transposed)."""
    out = call_torch(module, torch.from_numpy(x))
    paddle_out = call_paddle(layer, paddle.to_tensor(x))
    np.testing.assert_allclose(paddle_out.numpy(), out.detach().numpy(), rtol=1e-10, atol=1e-10)
    grad = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(torch.from_numpy(grad))
    paddle_out.backward(paddle.to_tensor(grad))
    torch_grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    trained = {k: p for k, p in layer.named_parameters() if not p.stop_gradient}  # not BatchNorm's statistics
    assert set(trained) == set(torch_grads)
    for key, param in trained.items():
        expected = torch_grads[key].T if is_linear_weight(key) else torch_grads[key]
        np.testing.assert_allclose(param.grad.numpy(), expected, rtol=1e-9, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("config", DCNV3_CONFIGS, ids=ids(DCNV3_CONFIGS))
def test_dcnv3_layer_equals_the_torch_module(config):
    module, layer = pair(ct.DCNv3, cpd.DCNv3, config, dcnv3_reference_shapes(**config))
    x = np.random.default_rng(1).standard_normal((2, 6, 5, config["channels"]))
    compare(module, layer, x, lambda m, t: m(t), lambda m, t: m(t), 1)


@pytest.mark.parametrize("config", DCNV4_CONFIGS, ids=ids(DCNV4_CONFIGS))
def test_dcnv4_layer_equals_the_torch_module(config):
    module, layer = pair(ct.DCNv4, cpd.DCNv4, config, dcnv4_reference_shapes(**config))
    x = np.random.default_rng(2).standard_normal((2, 30, config["channels"]))
    compare(module, layer, x, lambda m, t: m(t, shape=(6, 5)), lambda m, t: m(t, shape=(6, 5)), 2)


def test_training_step():
    """float32: every parameter gets a finite gradient, the zero predictors
    move, and the loss falls over three SGD steps."""
    paddle.seed(0)
    for layer, x, target in (
        (cpd.DCNv3(8, group=2, center_feature_scale=True, norm_layer="BN"), paddle.randn([2, 5, 5, 8]),
         paddle.randn([2, 5, 5, 8])),
        (cpd.DCNv4(8, group=2, dw_kernel_size=3), paddle.randn([2, 25, 8]), paddle.randn([2, 25, 8])),
    ):
        optimizer = paddle.optimizer.SGD(learning_rate=0.05, parameters=layer.parameters())
        losses = []
        for _ in range(3):
            loss = paddle.nn.functional.mse_loss(layer(x), target)
            loss.backward()
            for name, param in layer.named_parameters():
                if param.stop_gradient:
                    continue  # BatchNorm's statistics
                assert param.grad is not None and np.isfinite(param.grad.numpy()).all(), name
            optimizer.step()
            optimizer.clear_grad()
            losses.append(float(loss))
        assert losses[-1] < losses[0]
        predictor = layer.offset if isinstance(layer, cpd.DCNv3) else layer.offset_mask
        assert np.abs(predictor.weight.numpy()).sum() > 0


def test_batch_zero_and_square_tokens():
    layer = cpd.DCNv3(6, group=2)
    assert layer(paddle.zeros([0, 3, 4, 6])).shape == [0, 3, 4, 6]
    assert cpd.DCNv4(6, group=2)(paddle.randn([1, 9, 6])).shape == [1, 9, 6]


def test_errors():
    with pytest.raises(cudcn.ArgumentError, match="channels = 10 must be divisible by group = 4"):
        cpd.DCNv3(10, group=4)
    with pytest.raises(cudcn.ArgumentError, match=r"x.shape\[3\] \(C\) must be channels = 8, got 6"):
        cpd.DCNv3(8, group=2)(paddle.randn([1, 4, 4, 6]))
    with pytest.raises(cudcn.ArgumentTypeError, match=r"x must be a paddle.Tensor \(N, H, W, C\), got ndarray"):
        cpd.DCNv3(8, group=2)(np.zeros((1, 4, 4, 8), np.float32))
    with pytest.raises(cudcn.ArgumentError, match=r"x.shape\[1\] \(L\) = 12 is not a square number"):
        cpd.DCNv4(8, group=2)(paddle.randn([1, 12, 8]))
    with pytest.raises(cudcn.ArgumentError, match=r"DCNv4 predicts its offsets at every input pixel"):
        cpd.DCNv4(8, group=2, stride=2)(paddle.randn([1, 16, 8]))


def test_static_graph_is_refused_with_a_clear_error():
    layer = cpd.DCNv3(8, group=2)
    paddle.enable_static()
    try:
        program = paddle.static.Program()
        with paddle.static.program_guard(program):
            x = paddle.static.data("x", [1, 4, 4, 8], "float32")
            with pytest.raises(cudcn.UnsupportedError, match=r"cudcn.paddle.DCNv3 runs in dygraph only"):
                layer(x)
    finally:
        paddle.disable_static()
    static = paddle.jit.to_static(cpd.DCNv4(8, group=2), full_graph=True)
    with pytest.raises(Exception) as raised:
        static(paddle.randn([1, 16, 8]))
    assert "cudcn.paddle.DCNv4 runs in dygraph only" in str(raised.value)
