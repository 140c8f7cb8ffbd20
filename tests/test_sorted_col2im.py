"""The deterministic input gradient's keys and workspace (emulated kernels, no GPU).

- its keys are 32-bit whenever the launch indexes in 32 bits, 64-bit
  otherwise, with the same (bitwise) result and NumPy's values;
- its workspace is counted in the budget: with deterministic algorithms on,
  the backward takes chunks small enough for the sort beside the columns.
"""

from __future__ import annotations

import numpy as np
import pytest

import cudcn
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import im2col_gemm, launchers
from cudcn.geometry import validate
from emulation import harness
from emulation.cases import assert_close


@pytest.fixture(scope="module")
def library():
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return harness.build()


def _case(n=5, c=4, h=6, w=5, offset_groups=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    offset = rng.uniform(-2, 2, (n, 2 * offset_groups * 9, h, w))
    offset.flat[::7] = np.nan  # the sentinel key, too
    mask = rng.uniform(0, 1, (n, offset_groups * 9, h, w))
    weight = rng.standard_normal((3, c, 3, 3))
    return x, offset, mask, weight, rng


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_keys_are_32_bit_when_they_fit(library, dtype):
    x, offset, mask, _, rng = _case()
    x, offset, mask = (a.astype(dtype) for a in (x, offset, mask))
    geom = validate(input=x, offset=offset, mask=mask, kernel_size=3, padding=1)
    columns = rng.standard_normal(geom.columns_shape).astype(dtype)
    runs = {}
    for wide in (False, True):
        engine = harness.EmulatedEngine(library, wide=wide)
        with cudcn.deterministic_algorithms():
            runs[wide] = im2col_gemm.col2im_public(engine, geom, columns, offset, mask)
        key_type = "long long" if wide else "int"
        ctype = {"float32": "float", "float64": "double"}[dtype]
        assert f"deform_col2im_keys<{ctype}, {key_type}>" in {name for name, _ in engine.launches}
    assert_close(runs[False], numpy_backend.col2im(geom, columns, offset, mask), dtype)
    assert runs[False].tobytes() == runs[True].tobytes()


def _chunk_sizes(engine) -> list[int]:
    """Column elements per chunk, from the im2col launches (one per chunk; columns last)."""
    return [args[-1].size for (name, _), args in zip(engine.launches, engine.arguments)
            if name.startswith("deform_im2col")]


def test_sorted_workspace_is_counted_in_the_budget(library):
    x, offset, mask, weight, rng = _case(n=7, c=28, offset_groups=1)  # sort about as big as the columns
    geom = validate(input=x, offset=offset, weight=weight, mask=mask, padding=1)
    column_bytes = geom.out_pixels * geom.kernel_points * geom.in_channels * 8  # per image, float64
    sorted_bytes = launchers.col2im_sorted_bytes_per_image(geom)
    corners = 4 * geom.offset_groups * geom.kernel_points * geom.out_pixels
    assert sorted_bytes >= 50 * corners  # about 50 bytes per corner: keys, weights, the sort's buffers
    grad_output = rng.standard_normal((7, 3, 6, 5))
    budget = 2 * (column_bytes + sorted_bytes)  # two images with their sort
    without_sort = budget // column_bytes
    assert without_sort >= 3
    sizes = {}
    for deterministic in (False, True):
        engine = harness.EmulatedEngine(library)
        with cudcn.workspace_bytes(budget), cudcn.deterministic_algorithms(deterministic):
            grads = im2col_gemm.backward(engine, geom, grad_output, x, offset, weight, mask)
        sizes[deterministic] = _chunk_sizes(engine)
        expected = numpy_backend.backward(geom, grad_output, x, offset, weight, mask)
        assert_close(grads[0], expected[0], "float64")
    per_image_columns = geom.out_pixels * geom.kernel_points * geom.in_channels
    # As few chunks as fit the budget, balanced: 7 images two at a time are 1, 2, 2, 2.
    assert sizes[True] == [per_image_columns] + [2 * per_image_columns] * 3
    count = -(-7 // without_sort)
    assert sizes[False] == [(7 * (i + 1) // count - 7 * i // count) * per_image_columns for i in range(count)]
    # The forward has no sort: the deterministic setting leaves its chunks alone.
    engine = harness.EmulatedEngine(library)
    with cudcn.workspace_bytes(budget), cudcn.deterministic_algorithms():
        im2col_gemm.forward(engine, geom, x, offset, weight, None, mask)
    assert _chunk_sizes(engine) == sizes[False]
