"""The fused (column-free) forward on the CPU, under the cooperative emulator.

kernels/dcn_fused_forward.cu runs through the CUDA backend's own code
(cudcn/backends/cuda/fused.py and its launchers) on NumPy arrays: every CUDA
thread a fiber, barriers and warp MMAs as on a GPU, shared memory
bounds-checked and watched by the race detector, outputs allocated
NaN-filled, NaN guard bytes around every array. Compared with references
that round the operands as the kernels do -- the NumPy backend's columns and
the weight in the dtype (float16, bfloat16) or in TF32, their products
summed in float64 -- so that what remains is the summation order and one
rounding of the output, and tolerances can be tight; float32 without TF32
(scalar FMAs) against the NumPy backend itself.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cudcn
from cudcn.backends import numpy as numpy_backend
from cudcn.backends.cuda import algorithms, fused
from cudcn.backends.cuda import kernels as cuda_kernels
from cudcn.geometry import validate
from emulation import harness
from emulation.cases import assert_close, cases, ml_dtypes, rounded_operands_forward

pytestmark = pytest.mark.emulated

DTYPES = ("float16", "bfloat16", "float32")
#: Relative to the largest expected value: two roundings of the output
#: dtype for float16 and bfloat16; float32 summation (in another order) for
#: TF32 against rounded operands (an operand on a rounding tie may round
#: the other way: one term in 2^10 off) and for float32 against NumPy.
TOLERANCE = {"float16": 2e-3, "bfloat16": 1.6e-2, "tf32": 1e-4, "float32": 1e-5}
NAMES = ("input", "offset", "weight", "bias", "mask")


@pytest.fixture(scope="session")
def library():
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    return harness.build()


def _arrays(args: dict) -> list:
    return [args[k] for k in NAMES]


def check_forward(engine, args: dict, tf32: bool = False) -> np.ndarray:
    """Run the fused forward; compare; check which kernel ran. Returns its output."""
    geom = validate(**args)
    with cudcn.tf32(tf32):
        assert fused.applies(engine, geom, "forward") is None
        out = fused.forward(engine, geom, *_arrays(args))
        kernel = fused.kernel(engine, geom)
    name = geom.dtype.name
    tensor_cores = name != "float32" or (tf32 and engine.capability >= 80)
    assert kernel == ("deform_fused_forward" if tensor_cores else "deform_fused_forward_fma")
    launched = {launched for launched, _ in engine.launches if launched.startswith("deform_fused")}
    expected = {cuda_kernels.name_expression(kernel, name, index) for index in cuda_kernels.INDEX_TYPES}
    assert len(launched) == (1 if out.size else 0) and launched <= expected
    if name == "float32" and not tensor_cores:
        assert_close(out, numpy_backend.forward(geom, *_arrays(args)), name, TOLERANCE["float32"])
    else:
        assert_close(out, rounded_operands_forward(geom, args, tensor_cores and name == "float32"), name,
                     TOLERANCE["tf32" if name == "float32" else name])
    return out


@settings(max_examples=60)
@given(cases(dtypes=DTYPES), st.booleans(), st.booleans(), st.sampled_from([1, 2**17, 2**30]))
def test_fused_forward_matches_numpy(library, case, tf32, wide, workspace):
    """Drawn geometries (groups and offset groups that split each other's
    channels, rectangular kernels, stride/padding/dilation, NaN/huge/integer
    offsets, mask and bias on and off, batch 0 to 3), every dtype, TF32 on
    and off, 32- and 64-bit indexing, chunks of one image, some or all."""
    args, _ = case
    engine = harness.EmulatedEngine(library, wide=wide)
    with cudcn.workspace_bytes(workspace):
        check_forward(engine, args, tf32)
    if args["input"].shape[0]:
        assert all(("long long" in name) == wide for name, _ in engine.launches)


def _case(dtype_name, batch, channels, out_channels, offset_groups, groups, height, width, k, seed=0, **geometry):
    if dtype_name == "bfloat16" and ml_dtypes is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    rng = np.random.default_rng(seed)
    padding = geometry.get("padding", 1)
    out_h, out_w = height + 2 * padding - k + 1, width + 2 * padding - k + 1  # stride 1, dilation 1
    offset = rng.uniform(-2, 2, (batch, 2 * offset_groups * k * k, out_h, out_w))
    offset.reshape(-1)[::7] = np.nan
    offset.reshape(-1)[3::11] = -1.0  # on row or column -1 exactly
    args = {
        "input": rng.standard_normal((batch, channels, height, width)),
        "offset": offset,
        "weight": rng.standard_normal((out_channels, channels // groups, k, k)),
        "bias": rng.standard_normal(out_channels),
        "mask": rng.uniform(-1, 1, (batch, offset_groups * k * k, out_h, out_w)),
    }
    args = {key: value.astype(dtype) for key, value in args.items()}
    return dict(args, padding=padding)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tile_edges(library, dtype):
    """65 output pixels and 65 output channels (two tiles each way, the second
    holding one row), 40 input channels (a full and a partial slice)."""
    engine = harness.EmulatedEngine(library)
    check_forward(engine, _case(dtype, 1, 40, 65, 1, 1, 5, 13, 3), tf32=True)
    (name, launch), = [(n, la) for n, la in engine.launches if n.startswith("deform_fused")]
    assert launch.grid == (2, 2, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_33_in_chunks(library, dtype):
    """33 images, one per chunk (one launch each) with a small budget, all at once without."""
    args = _case(dtype, 33, 6, 3, 2, 1, 3, 2, 1, padding=0)
    for workspace, launches in ((1, 33), (2**30, 1)):
        engine = harness.EmulatedEngine(library)
        with cudcn.workspace_bytes(workspace):
            check_forward(engine, args)
        assert sum(name.startswith("deform_fused") for name, _ in engine.launches) == launches


def test_empty_batch_and_no_output_channels(library):
    engine = harness.EmulatedEngine(library)
    for batch, out_channels in ((0, 4), (2, 0)):
        args = _case("float16", batch, 4, 4, 1, 1, 3, 3, 3)
        args["weight"], args["bias"] = args["weight"][:out_channels], args["bias"][:out_channels]
        out = fused.forward(engine, validate(**args), *_arrays(args))
        assert out.shape == (batch, out_channels, 3, 3)
    assert engine.launches == []


@pytest.mark.parametrize("dtype", DTYPES)
def test_vector_and_scalar_paths_agree(library, dtype):
    """Channel blocks that fit 16-byte vectors: aligned arrays take the vector
    loads, arrays one element off alignment the scalar ones; bitwise the same."""
    args = _case(dtype, 2, 64, 8, 2, 2, 4, 3, 3, seed=5)
    runs = [check_forward(harness.EmulatedEngine(library, misalign=misalign), args, tf32=True)
            for misalign in (False, True)]
    assert runs[0].tobytes() == runs[1].tobytes()


def test_sm75_has_no_bfloat16_or_tf32(library):
    """On a device of compute capability 7.5 bfloat16 is left to im2col and
    float32 takes FMAs even with TF32 on; float16 MMAs run there."""
    engine = harness.EmulatedEngine(library, capability=75)
    geom = validate(**_case("float16", 1, 4, 2, 1, 1, 3, 3, 3))
    if ml_dtypes is not None:
        reason = fused.applies(engine, validate(**_case("bfloat16", 1, 4, 2, 1, 1, 3, 3, 3)), "forward")
        assert reason == "bfloat16 MMAs need compute capability 8.0, this device has 7.5"
    assert fused.applies(harness.EmulatedEngine(library, capability=70), geom, "forward") == (
        "float16 MMAs need compute capability 7.5, this device has 7.0")
    check_forward(engine, _case("float32", 1, 8, 3, 2, 1, 3, 4, 3), tf32=True)
    check_forward(harness.EmulatedEngine(library, capability=75), _case("float16", 1, 8, 3, 2, 1, 3, 4, 3))


def test_algorithm_settings_use_the_fused_algorithm(library, monkeypatch):
    """"fused" runs the fused forward and backward; "auto" measures both
    algorithms once per direction and keeps one; float64, and the backward
    under deterministic algorithms, are im2col's."""
    monkeypatch.setattr(algorithms, "_choices", {})
    args = _case("float32", 2, 8, 4, 2, 2, 4, 4, 3)
    geom = validate(**args)
    fused_runs = []
    for setting in ("fused", "auto", "auto", "im2col"):
        engine = harness.EmulatedEngine(library)
        with cudcn.algorithm(setting):
            out = algorithms.run("forward", engine, geom, *_arrays(args))
            grad_output = np.ones_like(out)
            grads = algorithms.run("backward", engine, geom, grad_output,
                                   *(args[k] for k in ("input", "offset", "weight", "mask")))
        fused_runs.append([sum(name.startswith(kernel) for name, _ in engine.launches)
                           for kernel in ("deform_fused", "fused_backward_data")])
        assert_close(out, numpy_backend.forward(geom, *_arrays(args)), "float32")
        expected = numpy_backend.backward(geom, grad_output, *(args[k] for k in ("input", "offset", "weight", "mask")))
        for got, want in zip(grads, expected):
            assert_close(got, want, "float32")
    forward, backward = (next(c for c in algorithms.choices() if c.direction == d) for d in ("forward", "backward"))
    for choice in (forward, backward):
        assert set(choice.seconds) == {"im2col", "fused"} and choice.chosen in choice.seconds
    # fused: one launch each; auto: a warm-up and a timed run, then the winner's.
    assert fused_runs == [[1, 1], [2, 2], [int(forward.chosen == "fused"), int(backward.chosen == "fused")], [0, 0]]
    assert fused.applies(engine, geom, "backward") is None
    with cudcn.deterministic_algorithms():
        assert "deterministic algorithms" in fused.applies(engine, geom, "backward")
    double = validate(**{k: v.astype(np.float64) if isinstance(v, np.ndarray) else v for k, v in args.items()})
    assert fused.applies(engine, double, "forward") == "float64 has no fused kernel: im2col computes it"


PLANTED = {
    "main-loop barrier dropped": (
        "dcn_fused_forward.cu", "    }\n    __syncthreads();\n\n    // The next slice", "    }\n\n    // The next slice"),
    "epilogue barrier dropped": (
        "dcn_fused_forward.cu", "  __syncthreads();\n  fused_each_product(", "  fused_each_product("),
    "blend before its copies land (no cp.async.wait_group)": (
        "dcn_fused_forward.cu", "    if constexpr (kVector) dcn_cp_async_wait<0>();\n", ""),
    "A fragment rows swapped (ldmatrix rows 8-15 for 0-7)": (
        "dcn_fused_sampling.cuh", "fused_chunk_at(a, 16 * mi + a_row,", "fused_chunk_at(a, 16 * mi + (a_row ^ 8),"),
    "a lane gives ldmatrix the next row": (
        "dcn_fused_sampling.cuh", "const int a_row = (lane & 7) +", "const int a_row = ((lane + 1) & 7) +"),
    "B fragments transposed (ldmatrix .trans)": (
        "dcn_fused_sampling.cuh", "dcn_ldmatrix_x4(r, fused_chunk_at(b,", "dcn_ldmatrix_x4_trans(r, fused_chunk_at(b,"),
    "tile stores not swizzled": (
        "dcn_fused_sampling.cuh", "dcn_shared_cast<DcnChunk>(fused_chunk_at(tile, row, c))[0] = value;",
        "dcn_shared_cast<DcnChunk>(tile + row * FusedTile::kRowWords + 4 * c)[0] = value;"),
    "mask not applied": (
        "dcn_fused_forward.cu", "values[v] = sum * tap.mask;", "values[v] = sum;"),
}


@pytest.mark.parametrize("planted", [None, *PLANTED], ids=["as it is", *PLANTED])
def test_planted_bugs_are_caught(tmp_path, planted):
    """A changed copy of the kernel or its header, each bug caught: a race (a
    missing barrier, a read of a copy still in flight) by the emulator, a
    wrong result (a wrong fragment row or transposition, an unswizzled store,
    no mask) by the comparison; unchanged, the copy passes."""
    if harness.compiler() is None:
        pytest.skip("no C++ compiler for the kernel emulation")
    directory = cuda_kernels.kernel_dir()
    for name in ("dcn_fused_forward.cu", "dcn_fused_sampling.cuh"):
        (tmp_path / name).write_text((directory / name).read_text())
    if planted is not None:
        file, old, new = PLANTED[planted]
        text = (tmp_path / file).read_text()
        assert text.count(old) == 1
        (tmp_path / file).write_text(text.replace(old, new))
    names = [cuda_kernels.name_expression(k, "float16", "int") for k in ("deform_fused_forward", "to_channels_last")]
    library = harness.build(names, [tmp_path / "dcn_fused_forward.cu", directory / "dcn_layout.cu"])
    # 48 channels, 2 convolution groups, 3 offset groups: the second
    # convolution group starts inside an offset group (slices of 16 and 8
    # channels, the second MMA step partly zero); channels in 16-byte chunks,
    # so that the copies go by cp.async.
    args = _case("float16", 2, 48, 6, 3, 2, 4, 5, 3, seed=3)
    engine = harness.EmulatedEngine(library)
    if planted is None:
        check_forward(engine, args)
    elif "barrier" in planted or "cp.async" in planted:
        with pytest.raises(harness.EmulationError, match="shared-memory race on tiles"):
            check_forward(engine, args)
    else:
        with pytest.raises(AssertionError, match="Not equal to tolerance"):
            check_forward(engine, args)
