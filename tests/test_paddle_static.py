"""paddle's static graph: to_static, jit.save, jit.load give the dygraph results.

While paddle builds a static graph, cudcn.paddle checks each call as in
dygraph and emits paddle's own deform_conv2d op; the saved model is then
run by paddle alone. CPU, float32, dynamic batch and image sizes.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import cudcn.paddle as cpd  # noqa: E402
from cudcn.paddle import _static  # noqa: E402

pytestmark = pytest.mark.paddle


class OffsetNet(paddle.nn.Layer):
    """x -> DeformConv2D(x, offset(x), mask(x)), offsets and mask from plain convolutions."""

    def __init__(self, in_channels, out_channels, kernel, stride, padding, dilation, dgroups, groups, with_mask):
        super().__init__()
        kh, kw = kernel
        conv = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation)
        self.offset = paddle.nn.Conv2D(in_channels, 2 * dgroups * kh * kw, **conv)
        self.mask = paddle.nn.Conv2D(in_channels, dgroups * kh * kw, **conv) if with_mask else None
        self.dcn = cpd.DeformConv2D(in_channels, out_channels, kernel, stride, padding, dilation, dgroups, groups)

    def forward(self, x):
        mask = None if self.mask is None else paddle.nn.functional.sigmoid(self.mask(x))
        return self.dcn(x, self.offset(x), mask)


class PackNet(paddle.nn.Layer):
    """Both packs and CoordConv2D in a row."""

    def __init__(self):
        super().__init__()
        self.dcn2 = cpd.ModulatedDeformConv2DPack(4, 6, 3, padding=1, deformable_groups=2, groups=2)
        self.dcn1 = cpd.DeformConv2DPack(6, 4, (3, 2), stride=(2, 1), padding=(1, 0), deformable_groups=2)
        self.coord = cpd.CoordConv2D(4, 4, 3, padding=1)

    def forward(self, x):
        return self.coord(paddle.nn.functional.relu(self.dcn1(self.dcn2(x))))


MODELS = {
    "mask, groups 2, deformable groups 2": lambda: OffsetNet(4, 6, (3, 3), 1, 1, 1, 2, 2, True),
    "no mask, rectangular kernel, stride and dilation": lambda: OffsetNet(3, 5, (3, 2), 2, (1, 0), (1, 2), 1, 1, False),
    "mask, deformable groups 3, groups 3": lambda: OffsetNet(6, 3, (2, 2), 1, 0, 1, 3, 3, True),
    "packs and CoordConv2D": PackNet,
}


def randomised(model):
    """model in eval mode with every parameter drawn (offset predictors included, so offsets are not 0)."""
    rng = np.random.default_rng(0)
    for parameter in model.parameters():
        parameter.set_value(rng.uniform(-0.5, 0.5, parameter.shape).astype("float32"))
    model.eval()
    return model


def inputs(channels):
    """Two inputs of different batch and image sizes."""
    rng = np.random.default_rng(1)
    return [paddle.to_tensor(rng.uniform(-1, 1, shape).astype("float32")) for shape in ((2, channels, 9, 8), (3, channels, 6, 11))]


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_saved_and_loaded_model_gives_the_dygraph_results(build, tmp_path):
    model = randomised(build())
    channels = model.dcn._in_channels if isinstance(model, OffsetNet) else 4
    xs = inputs(channels)
    expected = [model(x).numpy() for x in xs]

    spec = paddle.static.InputSpec([None, channels, None, None], "float32")
    static_model = paddle.jit.to_static(model, input_spec=[spec], full_graph=True)
    paddle.jit.save(static_model, str(tmp_path / "model"))
    loaded = paddle.jit.load(str(tmp_path / "model"))
    for x, e in zip(xs, expected):
        assert np.abs(e).max() > 0.1  # not a vanishing output
        np.testing.assert_allclose(static_model(x).numpy(), e, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(loaded(x).numpy(), e, rtol=1e-5, atol=1e-5)


def test_the_saved_graph_holds_paddles_op_and_no_python_callback(tmp_path):
    model = randomised(MODELS["mask, groups 2, deformable groups 2"]())
    spec = paddle.static.InputSpec([None, 4, 9, 8], "float32")
    paddle.jit.save(paddle.jit.to_static(model, input_spec=[spec], full_graph=True), str(tmp_path / "model"))
    graph = (tmp_path / "model.json").read_text()
    assert graph.count("deformable_conv") >= 1
    assert "py_func" not in graph and "pylayer" not in graph.lower()


def test_static_graph_needs_out_channels_divisible_by_deformable_groups(tmp_path):
    """cudcn's dygraph path takes C_out = 5 with 2 deformable groups; paddle's op does not."""
    model = randomised(OffsetNet(4, 5, (3, 3), 1, 1, 1, 2, 1, True))
    x = inputs(4)[0]
    assert tuple(model(x).shape) == (2, 5, 9, 8)
    static_model = paddle.jit.to_static(
        model, input_spec=[paddle.static.InputSpec([None, 4, None, None], "float32")], full_graph=True
    )
    with pytest.raises(ValueError, match=r"out_channels\) must be divisible by deformable_groups = 2 in a static graph") as caught:
        paddle.jit.save(static_model, str(tmp_path / "model"))
    assert isinstance(caught.value, RuntimeError)


@contextlib.contextmanager
def static_program():
    paddle.enable_static()
    try:
        with paddle.static.program_guard(paddle.static.Program(), paddle.static.Program()):
            yield
    finally:
        paddle.disable_static()


def test_static_graph_checks_what_is_known_when_the_graph_is_built():
    with static_program():
        x = paddle.static.data("x", [None, 4, 7, 6], "float32")
        offset = paddle.static.data("offset", [None, 36, 5, 4], "float32")
        weight = paddle.static.create_parameter([6, 2, 3, 3], "float32")
        out = cpd.deform_conv2d(x, offset, weight, deformable_groups=2, groups=2)
        assert list(out.shape) == [-1, 6, 5, 4]
        with pytest.raises(ValueError, match=r"offset.shape\[2:\] must be the output size \(Ho, Wo\) = \(7, 6\), got \(5, 4\)"):
            cpd.deform_conv2d(x, offset, weight, padding=1, deformable_groups=2, groups=2)
        with pytest.raises(TypeError, match=r"^groups must be an int, got bool True$"):
            cpd.deform_conv2d(x, offset, weight, deformable_groups=2, groups=True)
        with pytest.raises(TypeError, match=r"^x must be a paddle.Tensor \(N, C_in, H, W\), got ndarray$"):
            cpd.deform_conv2d(np.zeros((1, 4, 7, 6), "float32"), offset, weight, deformable_groups=2, groups=2)
        with pytest.raises(ValueError, match=r"^x.shape\[1\] \(C_in\) must be in_channels = 3, got 4$"):
            cpd.DeformConv2DPack(3, 6, 3)(x)
        # The coordinate channels follow x's unknown batch and image size.
        unknown = paddle.static.data("unknown", [None, 4, None, None], "float32")
        assert list(cpd.CoordConv2D(4, 2, 3, padding=1)(x).shape) == [-1, 2, 7, 6]
        assert list(cpd.CoordConv2D(4, 2, 3, padding=1)(unknown).shape) == [-1, 2, -1, -1]


def test_unknown_static_sizes_take_the_sizes_the_call_implies():
    shapes = {"x": [-1, 4, -1, 6], "offset": [2, 36, 5, -1], "weight": [6, 2, 3, 3], "mask": [-1, -1, -1, -1]}
    resolved = _static.static_shapes(shapes, 2, 1, (1, 2), deformable_groups=2, groups=2)
    # x's batch from offset; x's height the smallest a 3-row kernel fits (3): Ho = (3 + 2 - 2 - 1) // 2 + 1 = 2;
    # Wo = (6 + 2 - 4 - 1) // 2 + 1 = 2; offset's known Ho = 5 cannot be checked against an unknown H.
    assert resolved["x"] == [2, 4, 3, 6]
    assert resolved["offset"] == [2, 36, 2, 2]
    assert resolved["mask"] == [2, 18, 2, 2]
    assert resolved["weight"] == [6, 2, 3, 3]
    assert shapes["x"] == [-1, 4, -1, 6]  # the caller's dict is untouched
