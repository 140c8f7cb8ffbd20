"""Which algorithm runs a CUDA call: the registry, "auto" and its cache.

Each algorithm is a module with ``forward(engine, geom, input, offset,
weight, bias, mask)`` and ``backward(engine, geom, grad_output, input,
offset, weight, mask)`` (:mod:`cudcn.backends.cuda.im2col_gemm` is the
reference; :mod:`cudcn.backends.cuda.fused` the column-free one) and a rule
saying whether it applies to a call on an engine (whose ``capability``
says which tensor-core instructions its device has).

The setting (:func:`cudcn.set_algorithm`, ``with cudcn.algorithm(...)``,
CUDCN_ALGORITHM) picks:

- ``"im2col"``: im2col + GEMM, always;
- ``"fused"``: the first non-reference algorithm that applies, else im2col;
- ``"auto"`` (default): on the first call for a key -- device, direction,
  the whole geometry (shapes, dtype, groups, stride, ...), the deterministic
  and TF32 settings and the workspace budget -- every algorithm that
  applies runs twice (a warm-up, which also compiles its kernels, then a run
  timed with CUDA events) and the faster is remembered for the rest of the process, as
  ``torch.backends.cudnn.benchmark`` does. That first call therefore costs
  two runs of each candidate and one wait for the device; later calls with
  the same key cost nothing extra. With one candidate nothing is timed.

While the stream is being captured into a CUDA graph nothing can be timed:
"auto" runs what it chose for the key before the capture, or, for a key it
has not measured, the reference. An algorithm whose GEMMs the engine cannot
capture (``engine.captures_gemms``; CuPy's cuBLAS wrapper refuses, so the
CUDA engine calls libcublas itself then) gives way to one that can; where
none applies, the call raises :class:`cudcn.UnsupportedError` saying why.

The algorithms that apply are worked out once per key (a bounded cache),
so that a known call costs a few dictionary lookups here. :func:`choices`
lists what "auto" has measured and chosen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from cudcn import config
from cudcn.backends.cuda import fused, im2col_gemm
from cudcn.geometry import Geometry, SignatureCache

DIRECTIONS = ("forward", "backward")


@dataclass(frozen=True)
class Algorithm:
    """An algorithm and the rule saying which calls it can run."""

    name: str
    module: ModuleType
    #: (engine, geometry, direction) -> None when the algorithm applies, else why not.
    applies: Callable[[Any, Geometry, str], str | None]


#: The reference; it runs every call.
REFERENCE = Algorithm("im2col", im2col_gemm, lambda engine, geom, direction: None)

#: Every algorithm, the reference first.
REGISTRY: dict[str, Algorithm] = {
    REFERENCE.name: REFERENCE,
    "fused": Algorithm("fused", fused, fused.applies),
}


@dataclass(frozen=True)
class Choice:
    """What "auto" chose for one key, and the times it measured (seconds)."""

    direction: str
    geometry: Geometry
    settings: tuple[tuple[str, Any], ...]
    chosen: str
    seconds: dict[str, float]


_choices: dict[tuple, Choice] = {}


def choices() -> list[Choice]:
    """Every choice "auto" has made in this process, oldest first."""
    return list(_choices.values())


def clear_choices() -> None:
    """Forget every choice (the next call of each key measures again)."""
    _choices.clear()
    _applicable.clear()


def _settings() -> tuple[tuple[str, Any], ...]:
    """The settings that change what an algorithm computes or how fast."""
    return (
        ("deterministic", config.are_deterministic_algorithms_enabled()),
        ("tf32", config.is_tf32_enabled()),
        ("workspace_bytes", config.get_workspace_bytes()),  # decides the chunks and splits
    )


def candidates(engine: Any, geom: Geometry, direction: str) -> list[Algorithm]:
    """The algorithms that can run this call on the engine's device, the reference first."""
    return [a for a in REGISTRY.values() if a.applies(engine, geom, direction) is None]


def capturable(engine: Any, algorithm: Algorithm) -> bool:
    """Whether ``algorithm`` can run on a stream being captured into a CUDA
    graph: the reference only where the engine can capture its GEMMs (the
    column-free algorithm has none)."""
    return algorithm is not REFERENCE or bool(getattr(engine, "captures_gemms", False))


#: (device, direction, geometry, settings, capability) -> the algorithms
#: that apply, the reference first: worked out once per key.
_applicable = SignatureCache()


def _device_timer(engine: Any) -> Callable[[Callable[[], Any]], tuple[float, Any]]:
    """Run a function and measure it: CUDA events on a GPU, else the host clock."""
    xp = engine.xp
    cuda = getattr(xp, "cuda", None)
    if cuda is None or not hasattr(cuda, "Event"):
        def host(function):
            start = time.perf_counter()
            result = function()
            return time.perf_counter() - start, result
        return host

    def events(function):
        start, stop = cuda.Event(), cuda.Event()
        start.record()
        result = function()
        stop.record()
        stop.synchronize()
        return cuda.get_elapsed_time(start, stop) / 1000, result
    return events


def _capturing(engine: Any) -> bool:
    cuda = getattr(engine.xp, "cuda", None)
    stream = cuda.get_current_stream() if cuda is not None and hasattr(cuda, "get_current_stream") else None
    return bool(getattr(stream, "is_capturing", lambda: False)())


def _device(engine: Any) -> int | None:
    cuda = getattr(engine.xp, "cuda", None)
    return cuda.runtime.getDevice() if cuda is not None and hasattr(cuda, "runtime") else None


def run(direction: str, engine: Any, geom: Geometry, *arrays: Any) -> Any:
    """Run ``direction`` ("forward" or "backward") of the algorithm the setting picks."""
    setting = config.get_algorithm()
    key = (_device(engine), direction, geom, _settings())
    capability = getattr(engine, "capability", None)
    applicable = _applicable.get((key, capability))
    if applicable is None:
        applicable = candidates(engine, geom, direction)
        _applicable.put((key, capability), applicable)
    if _capturing(engine):
        chosen = _captured(engine, geom, direction, setting, applicable, _choices.get(key))
    elif setting == "im2col" or len(applicable) == 1:
        chosen = REFERENCE
    elif setting == "fused":
        chosen = applicable[1]
    else:
        known = _choices.get(key)
        if known is None:
            return _auto(key, engine, geom, applicable, arrays)
        chosen = REGISTRY[known.chosen]
    return getattr(chosen.module, direction)(engine, geom, *arrays)


def _captured(engine: Any, geom: Geometry, direction: str, setting: str, applicable: list[Algorithm],
              known: Choice | None) -> Algorithm:
    """The algorithm for a call on a stream being captured into a CUDA graph
    (nothing can be timed): the setting's, "auto"'s choice for the key, else
    the reference -- or, where that cannot be captured, the first that can."""
    if setting == "im2col":
        wanted = REFERENCE
    elif setting == "fused":
        wanted = applicable[1] if len(applicable) > 1 else REFERENCE
    else:
        wanted = REGISTRY[known.chosen] if known is not None else REFERENCE
    if capturable(engine, wanted):
        return wanted
    usable = [a for a in applicable if capturable(engine, a)]
    if setting != "im2col" and usable:
        return usable[0]
    if setting == "im2col":
        why = "the algorithm setting is 'im2col'"
    else:
        reasons = [a.applies(engine, geom, direction) for a in REGISTRY.values() if a is not REFERENCE]
        why = f"no column-free algorithm applies ({'; '.join(r for r in reasons if r)})"
    from cudcn.errors import UnsupportedError

    raise UnsupportedError(
        f"this deformable convolution {direction} cannot be captured into a CUDA graph: im2col's GEMMs "
        f"cannot be captured here (CuPy's cuBLAS wrapper refuses a capturing stream; cudcn's own route "
        f"needs libcublas and one call outside a capture first, which makes its cuBLAS handle), and {why}"
    )


def _auto(key: tuple, engine: Any, geom: Geometry, applicable: list[Algorithm], arrays) -> Any:
    _, direction, _, settings = key
    measure = _device_timer(engine)
    seconds: dict[str, float] = {}
    best = None
    for algorithm in applicable:
        function = getattr(algorithm.module, direction)

        def call(function=function):
            return function(engine, geom, *arrays)

        call()  # warm-up: compiles and loads the kernels
        seconds[algorithm.name], result = measure(call)
        if best is None or seconds[algorithm.name] < seconds[best[0]]:
            best = (algorithm.name, result)
        del result
    _choices[key] = Choice(direction, geom, settings, best[0], seconds)
    return best[1]
