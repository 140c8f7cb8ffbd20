"""cudcn.torch.ms_deform_attn and the module on CUDA tensors (needs a GPU and
the CUDA backend's MSDA kernels; skipped otherwise).

The CPU (NumPy backend) results are the reference: float64 and float32 to
rounding, float16/bfloat16 within their precision; the level tensors may
be on the GPU (read with a synchronisation) or on the CPU; the deterministic
setting makes the backward bitwise repeatable; torch.compile captures the op.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from test_msda_torch_adapter import SHAPES, level_tensors, make_args  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.torch]


@pytest.fixture(autouse=True)
def cuda_msda():
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    from cudcn.backends import load

    if getattr(load("cupy"), "ms_deform_attn_forward", None) is None:
        pytest.skip("the CUDA backend has no ms_deform_attn_forward")


TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("levels_on", ["cuda", "cpu", "ints"])
def test_cuda_equals_the_cpu(dtype, levels_on):
    cpu = [t.requires_grad_() for t in make_args(batch=3, queries=40, channels=8)]
    gpu = [t.detach().to("cuda", dtype).requires_grad_() for t in cpu]
    shapes, starts = level_tensors()
    levels = (SHAPES, None) if levels_on == "ints" else (shapes.to(levels_on), starts.to(levels_on))
    out = ct.ms_deform_attn(gpu[0], *levels, *gpu[1:])
    expected = ct.ms_deform_attn(cpu[0], shapes, starts, *cpu[1:])
    assert out.dtype == dtype and out.device.type == "cuda"
    tolerance = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), expected, rtol=tolerance, atol=tolerance)
    grad_output = torch.randn_like(expected)
    out.backward(grad_output.to("cuda", dtype))
    expected.backward(grad_output)
    for g, c in zip(gpu, cpu):
        scale = float(c.grad.abs().max())
        torch.testing.assert_close(g.grad.double().cpu(), c.grad, rtol=tolerance, atol=tolerance * scale)


def test_gradcheck_on_cuda():
    leaves = [t.to("cuda").requires_grad_() for t in make_args(batch=2, queries=3)]
    assert torch.autograd.gradcheck(lambda v, loc, a: ct.ms_deform_attn(v, SHAPES, None, loc, a), leaves,
                                    eps=1e-6, atol=1e-7)


def test_deterministic_backward_is_bitwise_repeatable():
    args = [t.to("cuda", torch.float32) for t in make_args(batch=4, queries=200, channels=32)]
    grads = []
    for _ in range(3):
        leaves = [t.detach().requires_grad_() for t in args]
        with cudcn.deterministic_algorithms(True):
            out = ct.ms_deform_attn(leaves[0], SHAPES, None, *leaves[1:])
        out.square().sum().backward()
        grads.append([t.grad for t in leaves])
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))


def test_compile_on_cuda():
    torch._dynamo.reset()
    args = [t.to("cuda", torch.float32) for t in make_args()]
    compiled = torch.compile(lambda v, loc, a: ct.ms_deform_attn(v, SHAPES, None, loc, a) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(*args), 2 * ct.ms_deform_attn(args[0], SHAPES, None, *args[1:]))


def test_the_module_under_autocast():
    module = ct.MultiScaleDeformableAttention(32, 4, len(SHAPES), 3).cuda()
    query = torch.randn(9, 2, 32, device="cuda")
    value = torch.randn(27, 2, 32, device="cuda")
    reference = torch.rand(2, 9, len(SHAPES), 2, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = module(query, value=value, reference_points=reference, spatial_shapes=SHAPES)
    expected = module(query, value=value, reference_points=reference, spatial_shapes=SHAPES)
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)
