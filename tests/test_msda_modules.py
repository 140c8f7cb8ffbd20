"""cudcn.torch.MultiScaleDeformableAttention as a drop-in for mmcv's module.

mmcv is not installed here: its constructor, parameter names and shapes,
initialisation and forward are written down in this file from its
documented behaviour (mmcv 2.x), as plain torch on grid_sample, and the
module must match them.
"""

from __future__ import annotations

import math
import re
import warnings

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from msda_reference import torch_grid_sample  # noqa: E402

pytestmark = pytest.mark.torch

SHAPES = [(6, 7), (3, 4), (2, 2), (1, 1)]
PIXELS = sum(h * w for h, w in SHAPES)


def mmcv_state_dict(embed_dims=32, num_heads=4, num_levels=4, num_points=3, value_proj_ratio=1.0, seed=0):
    """A state dict with mmcv's keys and shapes, random values."""
    gen = torch.Generator().manual_seed(seed)
    samples = num_heads * num_levels * num_points
    value_dims = int(embed_dims * value_proj_ratio)
    shapes = {
        "sampling_offsets.weight": (samples * 2, embed_dims), "sampling_offsets.bias": (samples * 2,),
        "attention_weights.weight": (samples, embed_dims), "attention_weights.bias": (samples,),
        "value_proj.weight": (value_dims, embed_dims), "value_proj.bias": (value_dims,),
        "output_proj.weight": (embed_dims, value_dims), "output_proj.bias": (embed_dims,),
    }
    return {key: torch.randn(shape, generator=gen) * 0.3 for key, shape in shapes.items()}


def mmcv_forward(state, num_heads, num_levels, num_points, query, value=None, identity=None, query_pos=None,
                 key_padding_mask=None, reference_points=None, spatial_shapes=None, batch_first=False,
                 dropout=0.0, training=False):
    """mmcv's MultiScaleDeformableAttention.forward on its CPU path, in plain torch."""
    if value is None:
        value = query
    if identity is None:
        identity = query
    if query_pos is not None:
        query = query + query_pos
    if not batch_first:
        query, value = query.permute(1, 0, 2), value.permute(1, 0, 2)
    bs, num_query, _ = query.shape
    _, num_value, _ = value.shape
    assert (spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum() == num_value
    value = F.linear(value, state["value_proj.weight"], state["value_proj.bias"])
    if key_padding_mask is not None:
        value = value.masked_fill(key_padding_mask[..., None], 0.0)
    value = value.view(bs, num_value, num_heads, -1)
    offsets = F.linear(query, state["sampling_offsets.weight"], state["sampling_offsets.bias"]).view(
        bs, num_query, num_heads, num_levels, num_points, 2)
    weights = F.linear(query, state["attention_weights.weight"], state["attention_weights.bias"]).view(
        bs, num_query, num_heads, num_levels * num_points).softmax(-1).view(
        bs, num_query, num_heads, num_levels, num_points)
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        locations = (reference_points[:, :, None, :, None, :2]
                     + offsets / num_points * reference_points[:, :, None, :, None, 2:] * 0.5)
    output = torch_grid_sample(value, spatial_shapes.tolist(), locations, weights)
    output = F.linear(output, state["output_proj.weight"], state["output_proj.bias"])
    if not batch_first:
        output = output.permute(1, 0, 2)
    return F.dropout(output, dropout, training) + identity


def mmcv_sampling_offsets_bias(num_heads, num_levels, num_points):
    """mmcv's init_weights for sampling_offsets.bias, in float32 torch ops."""
    thetas = torch.arange(num_heads, dtype=torch.float32) * (2.0 * math.pi / num_heads)
    grid = torch.stack([thetas.cos(), thetas.sin()], -1)
    grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(num_heads, 1, 1, 2).repeat(1, num_levels, num_points, 1)
    for i in range(num_points):
        grid[:, :, i, :] *= i + 1
    return grid.view(-1)


def inputs(batch=2, queries=9, embed_dims=32, levels=4, box=False, batch_first=False, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)

    def sequence(length):
        shape = (batch, length, embed_dims) if batch_first else (length, batch, embed_dims)
        return torch.randn(shape, generator=gen, dtype=dtype)

    reference = torch.rand(batch, queries, levels, 4 if box else 2, generator=gen, dtype=dtype)
    if box:
        reference[..., 2:] = reference[..., 2:] * 0.5 + 0.1
    mask = torch.rand(batch, PIXELS, generator=gen) < 0.2
    return dict(query=sequence(queries), value=sequence(PIXELS), query_pos=sequence(queries),
                reference_points=reference, key_padding_mask=mask)


def levels():
    shapes = torch.tensor(SHAPES)
    return shapes, torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])


def test_constructor_defaults_submodules_and_attributes_are_mmcvs():
    module = ct.MultiScaleDeformableAttention()
    assert (module.embed_dims, module.num_heads, module.num_levels, module.num_points, module.im2col_step,
            module.batch_first, module.norm_cfg, module.init_cfg) == (256, 8, 4, 4, 64, False, None, None)
    assert module.dropout.p == 0.1
    assert [name for name, _ in module.named_children()] == [
        "dropout", "sampling_offsets", "attention_weights", "value_proj", "output_proj"]
    expected = {key: tuple(t.shape) for key, t in mmcv_state_dict(256, 8, 4, 4).items()}
    assert {key: tuple(t.shape) for key, t in module.state_dict().items()} == expected


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_an_mmcv_state_dict_loads_strictly(ratio):
    state = mmcv_state_dict(value_proj_ratio=ratio)
    module = ct.MultiScaleDeformableAttention(32, 4, 4, 3, value_proj_ratio=ratio)
    module.load_state_dict(state, strict=True)
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, state[key])
    with pytest.raises(RuntimeError, match="size mismatch"):
        ct.MultiScaleDeformableAttention(32, 4, 4, 2).load_state_dict(state, strict=True)


@pytest.mark.parametrize("heads, levels, points", [(8, 4, 4), (6, 3, 2), (5, 1, 1)])
def test_init_weights_are_mmcvs(heads, levels, points):
    torch.manual_seed(0)
    module = ct.MultiScaleDeformableAttention(heads * 4, heads, levels, points)
    assert torch.equal(module.sampling_offsets.bias, mmcv_sampling_offsets_bias(heads, levels, points))
    for name in ("sampling_offsets.weight", "attention_weights.weight", "attention_weights.bias",
                 "value_proj.bias", "output_proj.bias"):
        assert torch.count_nonzero(module.get_parameter(name)) == 0, name
    for projection in (module.value_proj, module.output_proj):  # xavier_uniform, gain 1
        fan_out, fan_in = projection.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert projection.weight.abs().max() <= bound and projection.weight.std() > bound / 3


def test_init_weights_is_reproducible_from_the_seed_and_callable_again():
    torch.manual_seed(3)
    first = ct.MultiScaleDeformableAttention(32, 4, 2, 2)
    torch.manual_seed(3)
    second = ct.MultiScaleDeformableAttention(32, 4, 2, 2)
    with torch.no_grad():
        for p in second.parameters():
            p.add_(1.0)
    torch.manual_seed(4)
    first.init_weights()
    torch.manual_seed(4)
    second.init_weights()
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("box", [False, True])
@pytest.mark.parametrize("shape_kind", ["tensor", "ints"])
def test_forward_equals_mmcvs_forward(batch_first, box, shape_kind):
    state = {k: v.double() for k, v in mmcv_state_dict().items()}
    module = ct.MultiScaleDeformableAttention(32, 4, 4, 3, batch_first=batch_first).double().eval()
    module.load_state_dict(state)
    args = inputs(box=box, batch_first=batch_first)
    spatial_shapes, level_start_index = levels()
    given = spatial_shapes if shape_kind == "tensor" else SHAPES
    out = module(**args, spatial_shapes=given, level_start_index=level_start_index)
    expected = mmcv_forward(state, 4, 4, 3, **args, spatial_shapes=spatial_shapes, batch_first=batch_first)
    assert out.shape == args["query"].shape
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_forward_defaults_identity_value_and_no_mask():
    """value None: the query; identity None: the query before query_pos."""
    state = {k: v.double() for k, v in mmcv_state_dict().items()}
    module = ct.MultiScaleDeformableAttention(32, 4, 4, 3).double().eval()
    module.load_state_dict(state)
    args = inputs(queries=PIXELS)
    spatial_shapes, starts = levels()
    del args["value"], args["key_padding_mask"]
    out = module(args["query"], query_pos=args["query_pos"], reference_points=args["reference_points"],
                 spatial_shapes=spatial_shapes, level_start_index=starts)
    expected = mmcv_forward(state, 4, 4, 3, args["query"], query_pos=args["query_pos"],
                            reference_points=args["reference_points"], spatial_shapes=spatial_shapes)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    identity = torch.randn_like(args["query"])
    with pytest.warns(DeprecationWarning, match="'residual' is deprecated"):
        with_residual = module(args["query"], residual=identity, reference_points=args["reference_points"],
                               spatial_shapes=spatial_shapes, level_start_index=starts)
    plain = module(args["query"], identity=identity, reference_points=args["reference_points"],
                   spatial_shapes=spatial_shapes, level_start_index=starts)
    torch.testing.assert_close(with_residual, plain, rtol=0, atol=0)


def test_dropout_is_applied_to_the_attention_not_the_identity():
    state = {k: v.double() for k, v in mmcv_state_dict().items()}
    module = ct.MultiScaleDeformableAttention(32, 4, 4, 3, dropout=0.5).double().train()
    module.load_state_dict(state)
    args = inputs()
    spatial_shapes, starts = levels()
    torch.manual_seed(7)
    out = module(**args, spatial_shapes=spatial_shapes, level_start_index=starts)
    torch.manual_seed(7)
    expected = mmcv_forward(state, 4, 4, 3, **args, spatial_shapes=spatial_shapes, dropout=0.5, training=True)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out == args["query"]).any()  # dropped entries are the identity alone


def test_a_training_step_reaches_every_parameter():
    torch.manual_seed(0)
    module = ct.MultiScaleDeformableAttention(32, 4, 4, 3, dropout=0.0)
    with torch.no_grad():  # from mmcv's init the offset and attention layers get gradients but start at zero
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    args = {k: (v.float() if v.is_floating_point() else v) for k, v in inputs().items()}
    spatial_shapes, starts = levels()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    target = torch.randn_like(args["query"])
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = F.mse_loss(module(**args, spatial_shapes=spatial_shapes, level_start_index=starts), target)
        loss.backward()
        assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in module.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bad_arguments_are_clear_errors():
    with pytest.raises(cudcn.ArgumentError, match=re.escape("embed_dims = 30 must be divisible by num_heads = 8")):
        ct.MultiScaleDeformableAttention(30, 8)
    with pytest.raises(ValueError, match=re.escape("int(embed_dims * value_proj_ratio) = 12")):
        ct.MultiScaleDeformableAttention(32, 8, value_proj_ratio=0.375)
    module = ct.MultiScaleDeformableAttention(32, 4, 4, 3).double()
    args = inputs()
    args["reference_points"] = args["reference_points"][..., :1].expand(-1, -1, -1, 3)
    with pytest.raises(ValueError, match="Last dim of reference_points must be 2 or 4, but get 3 instead."):
        module(**args, spatial_shapes=levels()[0], level_start_index=levels()[1])


def test_a_float16_model_takes_float32_reference_points():
    """mmcv's function casts locations and weights to the value's dtype; so does the module."""
    module = ct.MultiScaleDeformableAttention(32, 4, 4, 3).half()
    args = {k: (v.half() if v.is_floating_point() else v) for k, v in inputs().items()}
    args["reference_points"] = args["reference_points"].float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = module(**args, spatial_shapes=levels()[0], level_start_index=levels()[1])
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
