"""The paddle adapter's GPU glue, checked on the CPU with fakes.

On a GPU, a call runs CuPy on the tensor's device, on paddle's current
stream, with every block of memory taken from paddle's allocator. No GPU
(and no CUDA build of paddle) runs here, so these tests check the glue's
logic: the blocks handed to CuPy are paddle tensors (real ones, on the CPU
place), the stream handle and device CuPy gets, and how the context wires
them together (with a fake CuPy module).
"""

from __future__ import annotations

import ctypes
import gc
import sys
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from cudcn.paddle import _bridge  # noqa: E402

pytestmark = pytest.mark.paddle


def test_memory_blocks_are_aligned_paddle_tensors_kept_until_freed(monkeypatch):
    created = []
    real_empty = paddle.empty

    def recording_empty(shape, dtype=None, **kwargs):
        """paddle.empty, recorded, and 13 bytes off alignment (a view), which the adapter must fix."""
        t = real_empty([shape[0] + 13], dtype=dtype, **kwargs)[13:]
        created.append((weakref.ref(t), list(shape), dtype, kwargs.get("device")))
        return t

    monkeypatch.setattr(paddle, "empty", recording_empty)
    place = paddle.CPUPlace()
    malloc, free = _bridge.paddle_memory(place)
    sizes = [0, 1, 1000, 4096]
    pointers = [malloc(n, 0) for n in sizes]

    assert len(created) == len(sizes) and len(set(pointers)) == len(sizes)
    for pointer, n, (block, shape, dtype, device) in zip(pointers, sizes, created):
        t = block()
        assert t is not None, "a block must stay alive while CuPy holds it"
        assert dtype == "uint8" and device is place
        assert pointer % 256 == 0
        start = t.data_ptr()
        assert start <= pointer and pointer + n <= start + shape[0]
        # CuPy may use every byte it asked for: they are the tensor's.
        ctypes.memset(pointer, 7, n)
        assert (t.numpy()[pointer - start:pointer - start + n] == 7).all()
    del t

    for pointer in pointers:
        free(pointer, 0)
    gc.collect()
    assert all(block() is None for block, *_ in created), "freed blocks go back to paddle"


def test_stream_handle_of_paddles_stream():
    class ProtocolStream:  # paddle.device.Stream: __cuda_stream__() -> (0, raw handle)
        def __init__(self, handle):
            self.handle = handle

        def __cuda_stream__(self):
            return (0, self.handle)

    assert _bridge.stream_pointer(ProtocolStream(0x7F00)) == 0x7F00
    # The legacy default stream: 1, never 0, which CuPy would read as its own
    # default stream (per-thread under CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1,
    # DLPack value 2, which paddle's __dlpack__ rejects).
    assert _bridge.stream_pointer(ProtocolStream(0)) == 1
    older = SimpleNamespace(stream_base=SimpleNamespace(cuda_stream=0x7F08))
    assert _bridge.stream_pointer(older) == 0x7F08
    assert _bridge.stream_pointer(SimpleNamespace(stream_base=SimpleNamespace(cuda_stream=0))) == 1


class Recorder:
    """Records entering and leaving contexts, in order."""

    def __init__(self):
        self.events = []

    def context(self, label):
        events = self.events

        class Context:
            def __enter__(self):
                events.append(("enter", label))

            def __exit__(self, *exc):
                events.append(("exit", label))

        return Context()


def fake_cupy(recorder):
    """A CuPy module with the parts _backend_context uses, recording what it is asked."""

    class Stream:
        def __init__(self, handle):
            self.ptr, self.device_id = handle, -1

        @classmethod
        def from_external(cls, obj):
            return cls(obj.__cuda_stream__()[1])

        def __enter__(self):
            recorder.events.append(("enter", f"stream {self.ptr} on device {self.device_id}"))

        def __exit__(self, *exc):
            recorder.events.append(("exit", "stream"))

    class PythonFunctionAllocator:
        def __init__(self, malloc, free):
            self.functions = (malloc, free)

        def malloc(self, nbytes):  # what using_allocator receives
            raise AssertionError("not called here")

    def using_allocator(allocator):
        recorder.allocator = allocator
        return recorder.context("allocator")

    return SimpleNamespace(cuda=SimpleNamespace(
        Device=lambda device_id: recorder.context(f"device {device_id}"),
        Stream=Stream,
        memory=SimpleNamespace(PythonFunctionAllocator=PythonFunctionAllocator),
        using_allocator=using_allocator,
    ))


def test_backend_context_runs_cupy_on_the_device_stream_and_memory_of_paddle(monkeypatch):
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(recorder))
    place = SimpleNamespace(is_gpu_place=lambda: True, gpu_device_id=lambda: 1)
    tensor = SimpleNamespace(place=place)
    asked = []

    def current_stream(device):
        asked.append(device)
        return SimpleNamespace(__cuda_stream__=lambda: (0, 0))  # paddle on the legacy default stream

    monkeypatch.setattr(paddle.device, "current_stream", current_stream)
    memory = (lambda nbytes, device: 0, lambda pointer, device: None)
    monkeypatch.setattr(_bridge, "paddle_memory", lambda p: memory if p is place else None)

    with _bridge.backend_context(tensor):
        inside = list(recorder.events)
    assert asked == ["gpu:1"]
    assert inside == [("enter", "device 1"), ("enter", "stream 1 on device 1"), ("enter", "allocator")]
    assert recorder.allocator.__self__.functions == memory  # the allocator CuPy uses takes paddle's memory
    assert recorder.events[len(inside):] == [("exit", "allocator"), ("exit", "stream"), ("exit", "device 1")]


def test_backend_context_leaves_cpu_calls_alone(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # importing CuPy would fail
    with _bridge.backend_context(paddle.to_tensor(np.zeros(2))):
        pass
