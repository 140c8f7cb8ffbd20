"""The torch adapter's CUDA glue, checked on the CPU: TF32 and bfloat16 errors.

- TF32 reaches the core call when torch allows it for float32 matmuls, or
  when cudcn's setting is on at the forward (also for a backward that
  autograd runs in another thread);
- a bfloat16 CUDA tensor CuPy cannot take fails naming the cause.

(The CuPy stream both adapters make from a framework's stream is checked in
tests/test_cuda_setup.py.)
"""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cudcn  # noqa: E402
import cudcn.torch as ct  # noqa: E402
from cudcn.torch import _bridge  # noqa: E402

pytestmark = pytest.mark.torch


def _args():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 6, 5, generator=gen, dtype=torch.float64)
    offset = torch.rand(2, 18, 6, 5, generator=gen, dtype=torch.float64) * 4 - 2
    weight = torch.rand(3, 4, 3, 3, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, offset, weight)]


@pytest.fixture
def tf32_seen(monkeypatch):
    """(call, TF32 setting) for every backend forward and backward call (a spy)."""
    seen = []
    backend = cudcn.backends.load("numpy")
    forward, backward = backend.forward, backend.backward

    def spy(name, fn):
        def call(*args, **kwargs):
            seen.append((name, cudcn.is_tf32_enabled()))
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(backend, "forward", spy("forward", forward))
    monkeypatch.setattr(backend, "backward", spy("backward", backward))
    return seen


@pytest.fixture
def torch_precision():
    """Restores torch's float32 matmul precision after the test."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    yield matmul
    matmul.fp32_precision = before


def _forward_backward(in_thread: bool = False) -> None:
    x, offset, weight = _args()
    loss = ct.deform_conv2d(x, offset, weight, padding=1).sum()
    if in_thread:  # as autograd runs a CUDA backward: in its own thread
        thread = threading.Thread(target=loss.backward)
        thread.start()
        thread.join()
    else:
        loss.backward()


def test_torch_float32_matmul_precision_turns_tf32_on(tf32_seen, torch_precision):
    _forward_backward()
    torch.set_float32_matmul_precision("high")
    _forward_backward()
    torch.set_float32_matmul_precision("highest")
    _forward_backward()
    torch_precision.fp32_precision = "tf32"  # torch's newer spelling
    _forward_backward(in_thread=True)
    off, on = [("forward", False), ("backward", False)], [("forward", True), ("backward", True)]
    assert tf32_seen == off + on + off + on
    assert not cudcn.is_tf32_enabled()  # scoped to the calls


def test_cudcn_tf32_setting_at_the_forward_reaches_the_backward_thread(tf32_seen):
    for setting in (False, True):
        x, offset, weight = _args()
        with cudcn.tf32(setting):
            loss = ct.deform_conv2d(x, offset, weight, padding=1).sum()
        thread = threading.Thread(target=loss.backward)
        thread.start()
        thread.join()
    assert tf32_seen == [("forward", False), ("backward", False), ("forward", True), ("backward", True)]


def test_torch_allows_tf32_reads_both_spellings(torch_precision, monkeypatch):
    torch_precision.fp32_precision = "ieee"
    assert not _bridge.torch_allows_tf32()
    torch_precision.fp32_precision = "tf32"
    assert _bridge.torch_allows_tf32()
    legacy = SimpleNamespace(allow_tf32=True)  # torch before fp32_precision
    monkeypatch.setattr(torch.backends.cuda, "matmul", legacy)
    assert _bridge.torch_allows_tf32()
    legacy.allow_tf32 = False
    assert not _bridge.torch_allows_tf32()


# ---------------------------------------------------------------------------
# bfloat16 that CuPy cannot take.


class FakeCudaBfloat16:
    dtype = torch.bfloat16
    is_cuda = True

    def detach(self):
        return self

    def contiguous(self):
        return self


def test_bfloat16_error_names_the_cause(monkeypatch):
    def from_dlpack(tensor):
        raise TypeError("unsupported dtype")

    monkeypatch.setitem(sys.modules, "cupy", SimpleNamespace(from_dlpack=from_dlpack, __version__="14.2.0"))
    monkeypatch.setattr(np, "__version__", "2.0.2")
    with pytest.raises(TypeError, match=r"bfloat16 CUDA tensors need CuPy's bfloat16: .*NumPy >= 2\.1\.2, "
                                        r"this is NumPy 2\.0\.2"):
        _bridge.to_array(FakeCudaBfloat16())
    monkeypatch.setattr(np, "__version__", "2.4.0")  # every requirement met: say what failed
    with pytest.raises(TypeError, match="could not import the tensor through DLPack: unsupported dtype"):
        _bridge.to_array(FakeCudaBfloat16())
