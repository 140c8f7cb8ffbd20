"""cudcn.torch on CUDA tensors: torchvision parity, streams, memory, precision.

Tests marked ``gpu`` are skipped without a CUDA device. Where a test also
makes sense on the CPU it is parametrised over both devices, so that its
logic (references, error bounds) runs in every CI job, GPU or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch.nn import functional as F  # noqa: E402

import cudcn.torch as ct  # noqa: E402

pytestmark = pytest.mark.torch

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]


def make_args(device, dtype=torch.float64, n=2, c=4, h=9, w=8, o=6, groups=2, offset_groups=2, kernel=(3, 3),
              stride=1, padding=1, dilation=1, seed=0):
    """Leaves (input, offset, weight, bias, mask) on ``device`` and conv kwargs."""
    kh, kw = kernel
    out_h = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    out_w = (w + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return ((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * scale).to(device, dtype)

    k = kh * kw
    tensors = (
        rand(n, c, h, w),
        rand(n, 2 * offset_groups * k, out_h, out_w, scale=2.5),  # reaches past the borders
        rand(o, c // groups, kh, kw),
        rand(o),
        rand(n, offset_groups * k, out_h, out_w).abs(),
    )
    return [t.requires_grad_() for t in tensors], dict(stride=stride, padding=padding, dilation=dilation)


def forward_backward(fn, leaves, conv, grad_output=None):
    """fn's output and the gradients of <output, grad_output> for every leaf."""
    for t in leaves:
        t.grad = None
    out = fn(*leaves[:4], mask=leaves[4], **conv)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(grad_output)
    return out.detach(), [t.grad for t in leaves], grad_output


def skip_without_cupy_bfloat16() -> None:
    """Skip, naming the cause, where CuPy cannot hold bfloat16 (probed on the GPU)."""
    try:
        import cupy
        import ml_dtypes

        cupy.empty(1, ml_dtypes.bfloat16)
    except Exception as error:
        from cudcn.backends.cuda.engine import cupy_bfloat16_problem

        pytest.skip(f"CuPy has no bfloat16 here: {cupy_bfloat16_problem() or error}")


def plain_deform_conv2d(input, offset, weight, bias, mask, padding):
    """DCNv2 composed of grid_sample and einsum, in the tensors' own dtype.

    Stride 1, dilation 1, one convolution group and one offset group: the
    "plain implementation" whose low-precision error bounds cudcn's.
    """
    n, c, h, w = input.shape
    o, _, kh, kw = weight.shape
    out_h, out_w = offset.shape[2:]
    rows = torch.arange(out_h, device=input.device).view(1, out_h, 1) - padding
    cols = torch.arange(out_w, device=input.device).view(1, 1, out_w) - padding
    samples = []
    for k in range(kh * kw):
        i, j = divmod(k, kw)
        y = rows + i + offset[:, 2 * k]
        x = cols + j + offset[:, 2 * k + 1]
        # align_corners=True: -1 and +1 are the centres of the first and last
        # pixels, and corners outside read 0: torchvision's bilinear rule.
        grid = torch.stack((2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1), dim=-1)
        sample = F.grid_sample(input, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        samples.append(sample * mask[:, k : k + 1])
    columns = torch.stack(samples, dim=2)  # (n, c, K, Ho, Wo)
    out = torch.einsum("nckhw,ock->nohw", columns, weight.reshape(o, c, kh * kw))
    return out + bias.view(1, -1, 1, 1)


def test_plain_reference_is_deform_conv2d():
    leaves, conv = make_args("cpu", groups=1, offset_groups=1)
    with torch.no_grad():
        expected = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
        plain = plain_deform_conv2d(*leaves, padding=conv["padding"])
    torch.testing.assert_close(plain, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_a_plain_implementation(device, dtype):
    """Output and every gradient, against float64 from the same rounded inputs."""
    if device == "cuda" and dtype == torch.bfloat16:
        skip_without_cupy_bfloat16()
    leaves, conv = make_args(device, dtype, c=8, h=12, w=12, o=16, groups=1, offset_groups=1)
    exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
    plain_leaves = [t.detach().clone().requires_grad_() for t in leaves]

    out, grads, grad_output = forward_backward(ct.deform_conv2d, leaves, conv)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    exact, exact_grads, _ = forward_backward(ct.deform_conv2d, exact_leaves, conv, grad_output.double())

    def plain(*args, mask, **kwargs):
        return plain_deform_conv2d(*args, mask, padding=kwargs["padding"])

    plain_out, plain_grads, _ = forward_backward(plain, plain_leaves, conv, grad_output)
    for name, ours, theirs, reference in zip(
        ("output", "input", "offset", "weight", "bias", "mask"),
        (out, *grads), (plain_out, *plain_grads), (exact, *exact_grads),
    ):
        error = (ours.double() - reference).abs().max().item()
        plain_error = (theirs.double() - reference).abs().max().item()
        assert error <= 2 * plain_error + 1e-12 * reference.abs().max().item(), (name, error, plain_error)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "geometry",
    [
        dict(),
        dict(n=3, c=3, o=4, groups=1, offset_groups=3, kernel=(2, 3), stride=2, padding=0, dilation=2, h=11, w=10),
        dict(n=33, c=2, o=2, groups=2, offset_groups=1, kernel=(1, 1), padding=0),  # not a multiple of 32 images
    ],
)
def test_matches_torchvision_on_cuda(dtype, tol, geometry):
    torchvision = pytest.importorskip("torchvision")
    leaves, conv = make_args("cuda", dtype, **geometry)
    theirs_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out, grads, grad_output = forward_backward(ct.deform_conv2d, leaves, conv)
    expected, expected_grads, _ = forward_backward(torchvision.ops.deform_conv2d, theirs_leaves, conv, grad_output)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    for name, g, e in zip(("input", "offset", "weight", "bias", "mask"), grads, expected_grads):
        scale = max(e.abs().max().item(), 1.0)
        torch.testing.assert_close(g, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{name}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
def test_runs_on_torchs_current_stream():
    """Work queued on a side stream behind a long sleep is seen by the op.

    If the op ran on any other stream it would read the input before the
    stream's copy lands, and its output would be wrong.
    """
    leaves, conv = make_args("cuda", torch.float32)
    expected, expected_grads, grad_output = forward_backward(ct.deform_conv2d, leaves, conv)
    late = [torch.zeros_like(t) for t in leaves]
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time on this stream
        for t, source in zip(late, leaves):
            t.copy_(source.detach())
        late = [t.requires_grad_() for t in late]
        out, grads, _ = forward_backward(ct.deform_conv2d, late, conv, grad_output)
        assert torch.cuda.current_stream() == stream
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
def test_no_host_synchronisation():
    """Behind half a second of GPU work on the stream, forward and backward
    return to the host long before the stream is done: nothing waited."""
    leaves, conv = make_args("cuda", torch.float32)
    grad_output = torch.ones(2, 6, 9, 8, device="cuda")
    expected, expected_grads, _ = forward_backward(ct.deform_conv2d, leaves, conv, grad_output)  # loads the kernels
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(1_000_000_000)  # about 0.5 s of GPU time (clock cycles) on this stream
        start = time.perf_counter()
        out, grads, _ = forward_backward(ct.deform_conv2d, leaves, conv, grad_output)
        elapsed = time.perf_counter() - start
        busy = not stream.query()
    torch.cuda.synchronize()
    assert busy, "the stream finished before the call returned: the host waited for the device"
    assert elapsed < 0.2, f"forward and backward took {elapsed:.3f} s behind the sleeping kernel"
    torch.testing.assert_close(out, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
def test_outputs_are_torch_memory():
    """CuPy allocates from torch's caching allocator during a call."""
    leaves, conv = make_args("cuda", torch.float32, n=8, c=16, o=32, h=32, w=32)
    with torch.no_grad():
        ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)  # warm up
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
        after = torch.cuda.memory_allocated()
    assert out.device == leaves[0].device and out.is_contiguous()
    out_bytes = out.numel() * out.element_size()
    assert after - before >= out_bytes
    del out
    assert torch.cuda.memory_allocated() <= after - out_bytes  # handed back to torch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
def test_deterministic_algorithms_make_the_cuda_backward_repeatable():
    """Under torch.use_deterministic_algorithms(True) the CUDA backward takes
    the sorted input gradient: bitwise equal gradients run after run, close
    to the default (atomic) backward."""
    leaves, conv = make_args("cuda", torch.float32, n=4, c=8, h=6, w=5, o=6)
    grad_output = torch.randn(4, 6, 6, 5, generator=torch.Generator().manual_seed(3)).cuda()
    _, atomic, _ = forward_backward(ct.deform_conv2d, leaves, conv, grad_output)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [forward_backward(ct.deform_conv2d, leaves, conv, grad_output)[1] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
    for a, b in zip(runs[0], atomic):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
def test_cuda_equals_cpu_for_layouts_empty_batches_and_modules():
    leaves, conv = make_args("cpu")
    expected = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    cuda = [t.detach().cuda() for t in leaves]
    cuda[0] = cuda[0].to(memory_format=torch.channels_last)
    cuda[1] = torch.cat((cuda[1], cuda[1]), dim=1)[:, : leaves[1].shape[1]]  # a slice
    torch.testing.assert_close(ct.deform_conv2d(*cuda[:4], mask=cuda[4], **conv).cpu(), expected)

    empty = [t[:0] if i in (0, 1, 4) else t for i, t in enumerate(cuda)]
    empty = [t.detach().requires_grad_() for t in empty]
    out = ct.deform_conv2d(*empty[:4], mask=empty[4], **conv)
    assert out.shape == (0, 6, 9, 8)
    out.sum().backward()
    assert all(t.grad.shape == t.shape for t in empty)

    torch.manual_seed(0)
    layer = ct.ModulatedDeformConv2dPack(4, 6, 3, padding=1, offset_groups=2).double()
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.1)
    x = leaves[0].detach()
    expected = layer(x)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
def test_autocast_and_compile_on_cuda():
    torch._dynamo.reset()
    leaves, conv = make_args("cuda", torch.float32)
    with torch.autocast("cuda", dtype=torch.float16):
        out = ct.deform_conv2d(*leaves[:4], mask=leaves[4], **conv)
    assert out.dtype == torch.float16

    layer = ct.DeformConv2dPack(4, 6, 3, padding=1).cuda()
    x = leaves[0].detach()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


PER_THREAD_SCRIPT = """
import torch
import cudcn.torch as ct

torch.manual_seed(0)
cpu = [torch.randn(2, 4, 9, 8, dtype=torch.float64), torch.randn(2, 18, 9, 8, dtype=torch.float64),
       torch.randn(6, 4, 3, 3, dtype=torch.float64)]
cuda = [t.cuda().requires_grad_() for t in cpu]
cpu = [t.requires_grad_() for t in cpu]
assert torch.cuda.current_stream().cuda_stream == 0  # torch's default (legacy) stream
for leaves in (cpu, cuda):
    ct.deform_conv2d(*leaves, padding=1).square().sum().backward()
for a, b in zip(cpu, cuda):
    torch.testing.assert_close(b.grad.cpu(), a.grad)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
def test_default_stream_under_cupys_per_thread_default_stream():
    """With CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 and torch on its default
    stream, the op runs on torch's stream and the DLPack handshake passes
    (CuPy's stream 0 would be its per-thread stream, which torch rejects)."""
    environment = {**os.environ, "CUPY_CUDA_PER_THREAD_DEFAULT_STREAM": "1"}
    result = subprocess.run([sys.executable, "-c", PER_THREAD_SCRIPT], env=environment, capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
