"""ONNX export of multi-scale deformable attention.

Standard ops (GridSample per level, ...) through both of torch's exporters:
onnxruntime runs the graph with other batch sizes and query counts than the
export's and matches eager (1e-5, float32), also for locations exactly on a
level's border; the levels may be Python ints, constants or graph inputs.
TensorRT's plugin node: the graph's structure, checked by onnx.checker
(TensorRT is not here).
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from cudcn.torch import export as onnx_rules  # noqa: E402
from test_msda_torch_adapter import (  # noqa: E402
    SHAPES,
    WithShapeInputs,
    WithShapeInts,
    WithShapeTensors,
    dynamic_shapes,
    level_tensors,
    make_args,
    model_inputs,
)

pytestmark = pytest.mark.torch

MODELS = [WithShapeTensors(), WithShapeInts(), WithShapeInputs()]


def export(model, args, dynamo=True, route="onnx", **options) -> onnx.ModelProto:
    buffer = io.BytesIO()
    names = ["value", "spatial_shapes", "level_start_index", "locations", "weights"]
    if len(args) == 3:
        names = [names[0], *names[3:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo=False is deprecated; onnxscript's notes
        if dynamo:
            program = torch.onnx.export(
                model, args, dynamo=True, verbose=False, input_names=names, dynamic_shapes=dynamic_shapes(model),
                custom_translation_table=ct.onnx_translation_table(route), **options,
            )
            return program.model_proto
        batch_axes = {name: {0: "batch"} for name in names if name in ("value",)}
        batch_axes |= {name: {0: "batch", 1: "queries"} for name in ("locations", "weights")}
        torch.onnx.export(model, args, buffer, dynamo=False, input_names=names, dynamic_axes=batch_axes, **options)
    return onnx.load_from_string(buffer.getvalue())


def run(model_proto: onnx.ModelProto, args) -> np.ndarray:
    onnx.checker.check_model(model_proto, full_check=True)
    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return session.run(None, feeds)[0]


def nodes(model_proto, op_type):
    return [n for n in model_proto.graph.node if n.op_type == op_type]


def attributes(node):
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("opset", [18, 20])
@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_dynamo_export_runs_in_onnxruntime_with_any_batch_and_queries(model, opset):
    model_proto = export(model, model_inputs(model, dtype=torch.float32), opset_version=opset)
    samplers = nodes(model_proto, "GridSample")
    assert len(samplers) == len(SHAPES)
    for node in samplers:
        assert attributes(node) == {"align_corners": 0, "padding_mode": b"zeros",
                                    "mode": b"bilinear" if opset < 20 else b"linear"}
    assert {o.domain for o in model_proto.opset_import} == {""}
    dims = [d.dim_param or d.dim_value for d in model_proto.graph.input[-1].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[1], str)  # batch and queries stay dynamic
    for batch, queries in ((2, 7), (3, 5), (1, 12)):
        args = model_inputs(model, batch=batch, queries=queries, seed=batch, dtype=torch.float32)
        np.testing.assert_allclose(run(model_proto, args), model(*args).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("model", MODELS[:2], ids=lambda m: type(m).__name__)
def test_legacy_export_runs_in_onnxruntime(model, opset):
    model_proto = export(model, model_inputs(model, dtype=torch.float32), dynamo=False, opset_version=opset)
    assert len(nodes(model_proto, "GridSample")) == len(SHAPES)
    for batch, queries in ((2, 7), (3, 5)):
        args = model_inputs(model, batch=batch, queries=queries, seed=batch, dtype=torch.float32)
        np.testing.assert_allclose(run(model_proto, args), model(*args).numpy(), rtol=1e-5, atol=1e-5)


def test_locations_exactly_on_the_border_and_kinks_match():
    """GridSample's forward is the op's, also at pixel coordinates -1, -0.5,
    0, size - 1, size - 0.5 and size (and beyond): zeros outside, bilinear
    towards the border."""
    model = WithShapeInts()
    value, locations, weights = make_args(batch=2, queries=8, dtype=torch.float32)
    extent = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float64).view(len(SHAPES), 1, 2)
    special = torch.tensor([-1.5, -1.0, -0.5, 0.0, 1.0, 1e9])  # 1e9 stands for the size (below)
    rng = np.random.default_rng(0)
    picks = torch.from_numpy(rng.integers(0, len(special) + 3, locations.shape))
    size = extent.expand(locations.shape)
    pixel = torch.where(picks < len(special), special[picks.clamp(max=len(special) - 1)].double(), -2.0)
    pixel = torch.where(pixel == 1e9, size, pixel)  # exactly the size
    pixel = torch.where(picks == len(special), size - 1, pixel)
    pixel = torch.where(picks == len(special) + 1, size - 0.5, pixel)
    pixel = torch.where(picks == len(special) + 2, size + 0.25, pixel)
    locations = ((pixel + 0.5) / extent).float()
    model_proto = export(model, (value, locations, weights))
    eager = model(value, locations, weights)
    assert torch.count_nonzero(eager) > 0
    np.testing.assert_allclose(run(model_proto, (value, locations, weights)), eager.numpy(), rtol=1e-5, atol=1e-5)


def test_the_mmcv_module_exports():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = ct.MultiScaleDeformableAttention(24, 4, len(SHAPES), 3, batch_first=True).eval()

        def forward(self, query, value, reference_points):
            return self.attention(query, value=value, reference_points=reference_points,
                                  spatial_shapes=torch.tensor(SHAPES), level_start_index=level_tensors()[1])

    torch.manual_seed(0)
    model = Model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))

    def args(batch, queries):
        return (torch.randn(batch, queries, 24), torch.randn(batch, 27, 24), torch.rand(batch, queries, len(SHAPES), 2))

    batch, queries = torch.export.Dim("batch"), torch.export.Dim("queries")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, args(2, 5), dynamo=True, verbose=False, custom_translation_table=ct.onnx_translation_table(),
            dynamic_shapes=({0: batch, 1: queries}, {0: batch}, {0: batch, 1: queries}),
        )
    for size in ((3, 4), (1, 9)):
        inputs = args(*size)
        with torch.no_grad():
            expected = model(*inputs).numpy()
        np.testing.assert_allclose(run(program.model_proto, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_tensorrt_plugin_node(model):
    """One MultiscaleDeformableAttnPlugin_TRT node in a custom domain (for
    onnx.checker; TensorRT finds plugins by op_type), plugin_version "2",
    INT32 level tensors, and its (N, Lq, M, D) output reshaped to (N, Lq, M*D)."""
    model_proto = export(model, model_inputs(model, dtype=torch.float32), route="tensorrt")
    onnx.checker.check_model(model_proto, full_check=True)
    (node,) = [n for n in model_proto.graph.node if n.domain == onnx_rules.TRT_DOMAIN]
    assert node.op_type == "MultiscaleDeformableAttnPlugin_TRT"
    assert attributes(node) == {"plugin_version": b"2", "plugin_namespace": b""}
    assert {(o.domain, o.version) for o in model_proto.opset_import} >= {(onnx_rules.TRT_DOMAIN, 1)}
    assert len(node.input) == 5 and not nodes(model_proto, "GridSample")
    inferred = onnx.shape_inference.infer_shapes(model_proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types |= {i.name: i.data_type for i in model_proto.graph.initializer}
    graph_inputs = [i.name for i in model_proto.graph.input]
    assert node.input[0] == graph_inputs[0] and node.input[3:] == graph_inputs[-2:]
    assert [types.get(name) for name in node.input[1:3]] == [onnx.TensorProto.INT32] * 2
    (reshape,) = [n for n in model_proto.graph.node if node.output[0] in n.input]
    assert reshape.op_type == "Reshape" and reshape.output[0] == model_proto.graph.output[0].name
    if isinstance(model, WithShapeInts):  # the levels become INT32 constants
        values = {i.name: onnx.numpy_helper.to_array(i) for i in model_proto.graph.initializer}
        assert values[node.input[1]].tolist() == [list(p) for p in SHAPES]
        assert values[node.input[2]].tolist() == [0, 20, 26]


def test_export_errors_name_what_cannot_be_expressed():
    model = WithShapeInts()
    args = model_inputs(model, dtype=torch.float32)
    with pytest.raises(Exception) as raised:  # (the dynamo exporter records opset 18 at least)
        export(model, args, dynamo=False, opset_version=15)
    assert "opset version 15 is not supported. Support for this operator was added in version 16" in str(raised.value)
    with pytest.raises(Exception) as raised:
        export(model, model_inputs(model, dtype=torch.float64), route="tensorrt")
    assert "takes float32 or float16, got value of DOUBLE" in str(raised.value)
    with pytest.raises(cudcn.ArgumentError, match=re.escape("ms_deform_attn must be one of 'onnx', 'tensorrt', got 'trt'")):
        ct.onnx_translation_table("trt")
    with pytest.raises(cudcn.ArgumentError, match=re.escape(
            "value.shape[3] (D, the channels per head) must be static to export multi-scale deformable attention")):
        onnx_rules._msda_sizes([2, 27, 2, "d"], [2, 7, 2, 3, 3, 2])
    with pytest.raises(cudcn.ArgumentError, match=re.escape("level_shapes must hold 2*L = 6 sizes")):
        onnx_rules._level_sizes(None, None, None, [4, 5, 2, 3], 3)
