"""cudcn.torch.DCNv3 and cudcn.torch.DCNv4: drop-ins for InternImage's DCNv3
and FlashInternImage's DCNv4 modules.

The references' state-dict keys and shapes are written out here from their
definitions, and their forwards written out in plain torch (functional
calls on the state dict, the operator through ``grid_sample`` in
``torch_dcnv3_core``), in float64: the modules load those state dicts with
strict=True and equal those forwards, values and every parameter's gradient.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from dcnv3_reference import torch_dcnv3_core  # noqa: E402

pytestmark = pytest.mark.torch


def k8(group, points):
    return math.ceil(3 * group * points / 8) * 8


# -- the references' state dicts --------------------------------------------


def dcnv3_reference_shapes(channels=64, kernel_size=3, dw_kernel_size=None, group=4, norm_layer="LN",
                           center_feature_scale=False, remove_center=False, **_):
    """InternImage DCNv3's state-dict keys and shapes."""
    C, G, P = channels, group, kernel_size**2 - int(remove_center)
    dwk = kernel_size if dw_kernel_size is None else dw_kernel_size
    shapes = {"dw_conv.0.weight": (C, 1, dwk, dwk), "dw_conv.0.bias": (C,)}
    if norm_layer == "LN":
        shapes |= {"dw_conv.1.1.weight": (C,), "dw_conv.1.1.bias": (C,)}
    else:
        shapes |= {"dw_conv.1.0.weight": (C,), "dw_conv.1.0.bias": (C,), "dw_conv.1.0.running_mean": (C,),
                   "dw_conv.1.0.running_var": (C,), "dw_conv.1.0.num_batches_tracked": ()}
    shapes |= {"offset.weight": (G * P * 2, C), "offset.bias": (G * P * 2,), "mask.weight": (G * P, C),
               "mask.bias": (G * P,), "input_proj.weight": (C, C), "input_proj.bias": (C,),
               "output_proj.weight": (C, C), "output_proj.bias": (C,)}
    if center_feature_scale:
        shapes |= {"center_feature_scale_proj_weight": (G, C), "center_feature_scale_proj_bias": (G,)}
    return shapes


def dcnv4_reference_shapes(channels=64, kernel_size=3, group=4, dw_kernel_size=None, center_feature_scale=False,
                           remove_center=False, output_bias=True, without_pointwise=False, **_):
    """FlashInternImage DCNv4's state-dict keys and shapes."""
    C, G, P = channels, group, kernel_size**2 - int(remove_center)
    shapes = {}
    if dw_kernel_size is not None:
        shapes |= {"offset_mask_dw.weight": (C, 1, dw_kernel_size, dw_kernel_size), "offset_mask_dw.bias": (C,)}
    shapes |= {"offset_mask.weight": (k8(G, P), C), "offset_mask.bias": (k8(G, P),)}
    if not without_pointwise:
        shapes |= {"value_proj.weight": (C, C), "value_proj.bias": (C,), "output_proj.weight": (C, C)}
        if output_bias:
            shapes["output_proj.bias"] = (C,)
    if center_feature_scale:
        shapes |= {"center_feature_scale_proj_weight": (G, C), "center_feature_scale_proj_bias": (G,)}
    return shapes


def random_state(shapes, seed=0, dtype=torch.float64, offset_keys=("offset.", "offset_mask.")):
    """Random values of the given shapes; the offset predictors' scaled so
    that the offsets are a pixel or two; BatchNorm's variance positive."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(3)
            continue
        value = torch.randn(shape, generator=gen, dtype=dtype)
        if key.endswith("running_var"):
            value = value.abs() + 0.5
        if key.startswith(offset_keys):
            value = value * 0.5
        state[key] = value
    return state


# -- the references' forwards, written out -----------------------------------


def activation(name):
    return {"GELU": F.gelu, "ReLU": F.relu, "SiLU": F.silu}[name]


def blend(state, out, projected, query, G, D):
    """out*(1 - s) + projected*s, s = sigmoid(linear(query)) per group, repeated over its D channels."""
    gate = torch.sigmoid(F.linear(query, state["center_feature_scale_proj_weight"],
                                  state["center_feature_scale_proj_bias"]))
    gate = gate[..., None].expand(*gate.shape, D).reshape(*gate.shape[:-1], G * D)
    return out * (1 - gate) + projected * gate


def dcnv3_reference_forward(state, input, channels=64, kernel_size=3, dw_kernel_size=None, stride=1, pad=1,
                            dilation=1, group=4, offset_scale=1.0, act_layer="GELU", norm_layer="LN",
                            center_feature_scale=False, remove_center=False):
    """InternImage's DCNv3.forward (eval mode) on a state dict: input (N, H, W, C)."""
    n, height, width, C = input.shape
    G, D, P = group, channels // group, kernel_size**2 - int(remove_center)
    dwk = kernel_size if dw_kernel_size is None else dw_kernel_size
    x = F.linear(input, state["input_proj.weight"], state["input_proj.bias"])
    x1 = F.conv2d(input.permute(0, 3, 1, 2), state["dw_conv.0.weight"], state["dw_conv.0.bias"],
                  padding=(dwk - 1) // 2, groups=C)
    if norm_layer == "LN":
        x1 = F.layer_norm(x1.permute(0, 2, 3, 1), (C,), state["dw_conv.1.1.weight"], state["dw_conv.1.1.bias"], 1e-6)
    else:
        x1 = F.batch_norm(x1, state["dw_conv.1.0.running_mean"], state["dw_conv.1.0.running_var"],
                          state["dw_conv.1.0.weight"], state["dw_conv.1.0.bias"], False, 0.1, 1e-5).permute(0, 2, 3, 1)
    x1 = activation(act_layer)(x1)
    offset = F.linear(x1, state["offset.weight"], state["offset.bias"])
    mask = F.linear(x1, state["mask.weight"], state["mask.bias"]).view(n, height, width, G, P)
    mask = torch.softmax(mask, -1).reshape(n, height, width, G * P)
    out = torch_dcnv3_core(x, offset, mask, kernel_size, kernel_size, stride, stride, pad, pad, dilation, dilation,
                           G, D, offset_scale, remove_center)
    if center_feature_scale:
        out = blend(state, out, x, x1, G, D)  # the gate reads the dw_conv features
    return F.linear(out, state["output_proj.weight"], state["output_proj.bias"])


def unpack(offset_mask, group, points):
    n, height, width = offset_mask.shape[:3]
    blocks = offset_mask[..., :group * 3 * points].reshape(n, height, width, group, 3 * points)
    return (blocks[..., :2 * points].reshape(n, height, width, group * 2 * points),
            blocks[..., 2 * points:].reshape(n, height, width, group * points))


def dcnv4_reference_forward(state, input, shape=None, channels=64, kernel_size=3, stride=1, pad=1, dilation=1,
                            group=4, offset_scale=1.0, dw_kernel_size=None, center_feature_scale=False,
                            remove_center=False, output_bias=True, without_pointwise=False):
    """FlashInternImage's DCNv4.forward on a state dict: input (N, L, C)."""
    n, tokens, C = input.shape
    height, width = shape if shape is not None else (int(tokens**0.5),) * 2
    G, D, P = group, channels // group, kernel_size**2 - int(remove_center)
    x = input if without_pointwise else F.linear(input, state["value_proj.weight"], state["value_proj.bias"])
    x = x.reshape(n, height, width, C)
    predictor_input = input
    if dw_kernel_size is not None:
        image = input.reshape(n, height, width, C).permute(0, 3, 1, 2)
        predictor_input = F.conv2d(image, state["offset_mask_dw.weight"], state["offset_mask_dw.bias"],
                                   padding=(dw_kernel_size - 1) // 2, groups=C).permute(0, 2, 3, 1)
    offset_mask = F.linear(predictor_input, state["offset_mask.weight"], state["offset_mask.bias"])
    offset, mask = unpack(offset_mask.reshape(n, height, width, -1), G, P)
    out = torch_dcnv3_core(x, offset, mask, kernel_size, kernel_size, stride, stride, pad, pad, dilation, dilation,
                           G, D, offset_scale, remove_center)
    if center_feature_scale:
        out = blend(state, out, x, out, G, D)  # the gate reads the DCN output
    out = out.reshape(n, tokens, C)
    if without_pointwise:
        return out
    return F.linear(out, state["output_proj.weight"], state.get("output_proj.bias"))


# -- configurations ------------------------------------------------------------

DCNV3_CONFIGS = [
    dict(channels=12, group=3),  # D = 4
    dict(channels=10, group=2, kernel_size=5, pad=2, offset_scale=0.7, act_layer="ReLU", norm_layer="BN"),
    dict(channels=12, group=4, remove_center=True, center_feature_scale=True, dw_kernel_size=5, act_layer="SiLU"),
    dict(channels=6, group=1, kernel_size=3, pad=2, dilation=2, center_feature_scale=True),
    dict(channels=9, group=3, kernel_size=1, pad=0, offset_scale=2.0),
]
DCNV4_CONFIGS = [
    dict(channels=12, group=3),  # D = 4, no multiple of 16
    dict(channels=10, group=2, kernel_size=5, pad=2, offset_scale=0.7, dw_kernel_size=3, output_bias=False),
    dict(channels=12, group=4, remove_center=True, center_feature_scale=True),
    dict(channels=6, group=2, kernel_size=3, pad=2, dilation=2, without_pointwise=True, center_feature_scale=True),
    dict(channels=18, group=6, kernel_size=7, pad=3),  # K8 = 888: G*3*P = 882 rounded up
]


def ids(configs):
    return [",".join(f"{k}={v}" for k, v in c.items()) for c in configs]


def loaded(cls, config, shapes, seed=0):
    module = cls(**config).double()
    state = random_state(shapes, seed)
    module.load_state_dict(state, strict=True)
    return module.eval(), state


# -- state dicts ---------------------------------------------------------------


@pytest.mark.parametrize("config", DCNV3_CONFIGS, ids=ids(DCNV3_CONFIGS))
def test_dcnv3_state_dict_is_the_references(config):
    expected = dcnv3_reference_shapes(**config)
    module = ct.DCNv3(**config)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
    module.load_state_dict(random_state(expected), strict=True)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        module.load_state_dict(random_state(expected | {"offset_mask.weight": (4, 4)}), strict=True)


@pytest.mark.parametrize("config", DCNV4_CONFIGS, ids=ids(DCNV4_CONFIGS))
def test_dcnv4_state_dict_is_the_references(config):
    expected = dcnv4_reference_shapes(**config)
    module = ct.DCNv4(**config)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
    module.load_state_dict(random_state(expected), strict=True)


def test_published_checkpoint_shapes():
    """InternImage-T's stage-1 DCNv3 and FlashInternImage-T/B's DCNv4 (no
    output bias; S/B/L with offset_mask_dw): the keys their checkpoints hold."""
    assert set(ct.DCNv3(64, group=4).state_dict()) == set(dcnv3_reference_shapes(64, group=4))
    t = ct.DCNv4(64, group=4, output_bias=False).state_dict()
    assert "output_proj.bias" not in t and t["offset_mask.weight"].shape == (112, 64)
    b = ct.DCNv4(112, group=7, dw_kernel_size=3, output_bias=False).state_dict()
    assert b["offset_mask_dw.weight"].shape == (112, 1, 3, 3) and b["offset_mask.weight"].shape == (192, 112)


# -- initialisation ------------------------------------------------------------


def test_dcnv3_initialisation_is_the_references_draw_for_draw():
    """With one seed, the module's parameters are those of the reference's
    construction order: dw conv (torch's default), LayerNorm, offset, mask,
    input_proj, output_proj (default inits, drawn), then offset and mask
    zeroed and the projections xavier-uniform with zero biases."""
    C, G, P = 12, 3, 9
    torch.manual_seed(5)
    module = ct.DCNv3(C, group=G, center_feature_scale=True)
    torch.manual_seed(5)
    conv, norm = torch.nn.Conv2d(C, C, 3, padding=1, groups=C), torch.nn.LayerNorm(C, eps=1e-6)
    offset, mask, input_proj, output_proj = (torch.nn.Linear(C, n) for n in (G * P * 2, G * P, C, C))
    for linear in (input_proj, output_proj):
        torch.nn.init.xavier_uniform_(linear.weight)
    expected = {
        "dw_conv.0.weight": conv.weight, "dw_conv.0.bias": conv.bias, "dw_conv.1.1.weight": norm.weight,
        "dw_conv.1.1.bias": norm.bias, "offset.weight": torch.zeros(G * P * 2, C), "offset.bias": torch.zeros(G * P * 2),
        "mask.weight": torch.zeros(G * P, C), "mask.bias": torch.zeros(G * P), "input_proj.weight": input_proj.weight,
        "input_proj.bias": torch.zeros(C), "output_proj.weight": output_proj.weight, "output_proj.bias": torch.zeros(C),
        "center_feature_scale_proj_weight": torch.zeros(G, C), "center_feature_scale_proj_bias": torch.zeros(G),
    }
    state = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value.detach(), rtol=0, atol=0, msg=key)


def test_dcnv4_initialisation_is_the_references_draw_for_draw():
    C, G = 16, 2
    torch.manual_seed(3)
    module = ct.DCNv4(C, group=G, dw_kernel_size=3, output_bias=False)
    torch.manual_seed(3)
    conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C)
    torch.nn.Linear(C, k8(G, 9))
    value_proj, output_proj = torch.nn.Linear(C, C), torch.nn.Linear(C, C, bias=False)
    for linear in (value_proj, output_proj):
        torch.nn.init.xavier_uniform_(linear.weight)
    state = module.state_dict()
    torch.testing.assert_close(state["offset_mask_dw.weight"], conv.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(state["value_proj.weight"], value_proj.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(state["output_proj.weight"], output_proj.weight.detach(), rtol=0, atol=0)
    assert not state["offset_mask.weight"].any() and not state["value_proj.bias"].any()


def test_modules_at_initialisation():
    """DCNv3's zero predictors give offsets 0 and the mask 1/P: the output is
    output_proj(mean over the 3x3 window of input_proj(input), zero padded);
    DCNv4's mask starts at 0, so its output is output_proj's bias (0)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 4, 8, dtype=torch.float64)
    module = ct.DCNv3(8, group=2).double()
    projected = module.input_proj(x).permute(0, 3, 1, 2)
    window_mean = F.avg_pool2d(projected, 3, 1, 1, count_include_pad=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(module(x), module.output_proj(window_mean))
    dcnv4 = ct.DCNv4(8, group=2).double()
    assert not dcnv4(x.reshape(2, 20, 8), shape=(5, 4)).any()


# -- forwards --------------------------------------------------------------------


@pytest.mark.parametrize("config", DCNV3_CONFIGS, ids=ids(DCNV3_CONFIGS))
def test_dcnv3_equals_the_reference_forward_and_gradients(config):
    module, state = loaded(ct.DCNv3, config, dcnv3_reference_shapes(**config))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, config["channels"], generator=gen, dtype=torch.float64)
    out = module(x)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    leaves = {k: v.clone().requires_grad_(not k.endswith(buffers)) for k, v in state.items()}
    expected = dcnv3_reference_forward(leaves, x, **config)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)

    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad)
    expected.backward(grad)
    params = dict(module.named_parameters())
    for key, leaf in leaves.items():
        if key in params:
            torch.testing.assert_close(params[key].grad, leaf.grad, rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize("config", DCNV4_CONFIGS, ids=ids(DCNV4_CONFIGS))
def test_dcnv4_equals_the_reference_forward_and_gradients(config):
    module, state = loaded(ct.DCNv4, config, dcnv4_reference_shapes(**config))
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 30, config["channels"], generator=gen, dtype=torch.float64)
    out = module(x, shape=(6, 5))
    leaves = {k: v.clone().requires_grad_() for k, v in state.items()}
    expected = dcnv4_reference_forward(leaves, x, (6, 5), **config)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.abs().max() > 0.1

    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad)
    expected.backward(grad)
    for key, param in module.named_parameters():
        torch.testing.assert_close(param.grad, leaves[key].grad, rtol=1e-10, atol=1e-10, msg=key)


def test_dcnv4_square_tokens_without_shape_and_batch_zero():
    config = DCNV4_CONFIGS[0]
    module, state = loaded(ct.DCNv4, config, dcnv4_reference_shapes(**config))
    x = torch.randn(1, 16, 12, dtype=torch.float64)
    torch.testing.assert_close(module(x), dcnv4_reference_forward(state, x, **config))
    assert module(x[:0]).shape == (0, 16, 12)
    dcnv3 = ct.DCNv3(12, group=3).double()
    assert dcnv3(torch.randn(0, 4, 4, 12, dtype=torch.float64)).shape == (0, 4, 4, 12)


def test_modules_under_autocast_and_in_float32():
    torch.manual_seed(0)
    module = ct.DCNv3(8, group=2)
    module.load_state_dict(random_state(dcnv3_reference_shapes(8, group=2), dtype=torch.float32))
    x = torch.randn(1, 4, 4, 8)
    full = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module(x)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.05)


# -- errors ------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "kwargs", "message"), [
    (ct.DCNv3, dict(channels=10, group=4), "channels = 10 must be divisible by group = 4"),
    (ct.DCNv3, dict(kernel_size=4, remove_center=True), "remove_center needs an odd kernel_size"),
    (ct.DCNv3, dict(dw_kernel_size=2), "dw_kernel_size must be odd"),
    (ct.DCNv3, dict(act_layer="Tanh"), "act_layer must be one of 'ReLU', 'SiLU', 'GELU', got 'Tanh'"),
    (ct.DCNv3, dict(norm_layer="GN"), "norm_layer must be one of 'LN', 'BN', got 'GN'"),
    (ct.DCNv3, dict(kernel_size=0), "kernel_size must be >= 1, got 0"),
    (ct.DCNv3, dict(offset_scale=float("nan")), "offset_scale must be finite"),
    (ct.DCNv3, dict(center_feature_scale=1), "center_feature_scale must be True or False, got 1"),
    (ct.DCNv4, dict(channels=12, group=5), "channels = 12 must be divisible by group = 5"),
    (ct.DCNv4, dict(pad=-1), "pad must be >= 0, got -1"),
    (ct.DCNv4, dict(output_bias=None), "output_bias must be True or False, got None"),
])
def test_constructor_errors(cls, kwargs, message):
    with pytest.raises((cudcn.ArgumentError, cudcn.ArgumentTypeError), match=message.replace("(", r"\(").replace(")", r"\)")):
        cls(**kwargs)


def test_dcnv4_ignores_other_keyword_arguments_as_the_reference():
    module = ct.DCNv4(16, group=2, act_layer="GELU", norm_layer="LN")
    assert set(module.state_dict()) == set(dcnv4_reference_shapes(16, group=2))


def test_forward_errors_name_the_problem():
    with pytest.raises(cudcn.ArgumentError, match=r"input.shape\[3\] \(C\) must be channels = 8, got 6"):
        ct.DCNv3(8, group=2)(torch.randn(1, 4, 4, 6))
    with pytest.raises(cudcn.ArgumentError, match=r"input must be a 4-D tensor \(N, H, W, C\), got shape \(4, 4, 8\)"):
        ct.DCNv3(8, group=2)(torch.randn(4, 4, 8))
    with pytest.raises(cudcn.ArgumentError, match=r"DCNv3 predicts its offsets at every input pixel.*stride 2.*give \(3, 3\)"):
        ct.DCNv3(8, group=2, stride=2)(torch.randn(1, 5, 5, 8))
    with pytest.raises(cudcn.ArgumentError, match=r"input.shape\[1\] \(L\) = 12 is not a square number: pass shape=\(H, W\)"):
        ct.DCNv4(8, group=2)(torch.randn(1, 12, 8))
    with pytest.raises(cudcn.ArgumentError, match=r"shape \(H, W\) = \(3, 5\) must have H\*W = input.shape\[1\] \(L\) = 12, got 15"):
        ct.DCNv4(8, group=2)(torch.randn(1, 12, 8), shape=(3, 5))
    with pytest.raises(cudcn.ArgumentError, match=r"DCNv4 predicts its offsets.*pad 0"):
        ct.DCNv4(8, group=2, pad=0)(torch.randn(1, 12, 8), shape=(3, 4))


def test_training_step_moves_the_offsets():
    """One SGD step on a float32 module: every parameter gets a finite
    gradient (the zero-initialised predictors included) and the loss falls."""
    torch.manual_seed(0)
    for module, x, call in (
        (ct.DCNv3(8, group=2, center_feature_scale=True), torch.randn(2, 5, 5, 8), lambda m, x: m(x)),
        (ct.DCNv4(8, group=2, dw_kernel_size=3), torch.randn(2, 25, 8), lambda m, x: m(x)),
    ):
        target = torch.randn_like(x)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.05)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = F.mse_loss(call(module, x), target)
            loss.backward()
            losses.append(loss.item())
            for name, param in module.named_parameters():
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
            optimizer.step()
        assert losses[-1] < losses[0]
        predictor = module.offset if isinstance(module, ct.DCNv3) else module.offset_mask
        assert predictor.weight.abs().sum() > 0  # moved away from zero


def test_module_is_compiled_whole():
    module = ct.DCNv3(8, group=2).double().eval()
    module.load_state_dict(random_state(dcnv3_reference_shapes(8, group=2)))
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), module(x))


def test_numpy_backend_is_what_the_modules_run(monkeypatch):
    """The module's operator output is cudcn.dcnv3 on the NumPy arrays, exactly."""
    module = ct.DCNv3(6, group=2).double()
    module.load_state_dict(random_state(dcnv3_reference_shapes(6, group=2)))
    seen = {}
    original = ct.dcnv3_modules.dcnv3

    def spy(*args):
        seen["args"], seen["out"] = args, original(*args)
        return seen["out"]

    monkeypatch.setattr(ct.dcnv3_modules, "dcnv3", spy)
    module(torch.randn(1, 3, 4, 6, dtype=torch.float64))
    arrays = [a.detach().numpy() for a in seen["args"][:3]]
    np.testing.assert_array_equal(seen["out"].detach().numpy(), cudcn.dcnv3(*arrays, *seen["args"][3:]))
