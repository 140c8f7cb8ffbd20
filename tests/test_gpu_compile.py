"""``cudcn compile``: every kernel instantiation through NVRTC, with no GPU.

These tests need NVRTC (CuPy plus the NVRTC library), not a device; they are
skipped only where NVRTC cannot be loaded at all. The command compiles
through CuPy's own compile path and options, so it fails where CuPy would.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cudcn import cli
from cudcn.backends.cuda import compile as compile_module
from cudcn.backends.cuda import kernels as cuda_kernels


def _nvrtc_available() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:  # no CuPy or no libnvrtc
        return False


needs_nvrtc = pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC cannot be loaded")

#: What may stand between ``__global__ void`` and a kernel's name.
GLOBAL_ATTRIBUTES = r"(?:__launch_bounds__\([^)]*\)\s*)?"


@needs_nvrtc
def test_compile_verbose_prints_one_line_per_instantiation(capsys, monkeypatch):
    monkeypatch.setattr("cudcn.backends.cuda.compile.device_count", lambda: 0)
    assert cli.main(["compile", "-v", "--arch", "sm_80"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for dtype in cuda_kernels.TYPES:
        for name in cuda_kernels.name_expressions(dtype):
            kernel = name.split("<")[0]
            pattern = rf"^sm_80\s+{dtype}\s+{kernel}\s+{re.escape(name)}\s+ok\b"
            assert sum(bool(re.match(pattern, line)) for line in lines) == 1, name
    total = sum(len(cuda_kernels.name_expressions(d)) for d in cuda_kernels.TYPES)
    assert lines[-1] == f"{total} of {total} instantiations compiled"


@needs_nvrtc
def test_compile_prints_a_summary_by_default_and_the_total_when_quiet(capsys, monkeypatch):
    monkeypatch.setattr("cudcn.backends.cuda.compile.device_count", lambda: 0)
    assert cli.main(["compile", "--arch", "sm_80", "sm_90", "--dtype", "float32", "float16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    counts = {d: len(cuda_kernels.name_expressions(d)) for d in ("float32", "float16")}
    summary = [line for line in lines if " instantiations compiled in " in line]
    assert len(summary) == 4 and len(lines) == 6, lines  # NVRTC's version, 2 archs x 2 dtypes, the total
    for arch in ("sm_80", "sm_90"):
        for dtype, count in counts.items():
            assert any(re.match(rf"^{arch}\s+{dtype}\s+{count} of {count} instantiations compiled in ", line)
                       for line in summary), (arch, dtype)
    assert lines[-1] == f"{2 * sum(counts.values())} of {2 * sum(counts.values())} instantiations compiled"

    assert cli.main(["compile", "-q", "--arch", "sm_80", "--dtype", "float64"]) == 0
    count = len(cuda_kernels.name_expressions("float64"))
    assert capsys.readouterr().out.splitlines() == [f"{count} of {count} instantiations compiled"]


@needs_nvrtc
def test_compile_fails_on_a_broken_kernel(capsys, monkeypatch):
    monkeypatch.setattr("cudcn.backends.cuda.compile.device_count", lambda: 0)
    broken = cuda_kernels.source() + "\n__global__ void broken() { undeclared_name = 1; }\n"
    monkeypatch.setattr(cuda_kernels, "source", lambda directory=None: broken)
    for quiet in ([], ["-q"]):  # failures and NVRTC's log are printed even with -q
        assert cli.main(["compile", "--arch", "sm_80", "--dtype", "float32", *quiet]) == 1
        out = capsys.readouterr().out
        assert "undeclared_name" in out and out.splitlines()[-1].endswith(", FAILED")
        failed = re.findall(r"^sm_80\s+float32\s+(\w+)\s+\1<.*>\s+FAIL\s*$", out, re.MULTILINE)
        assert len(failed) == len(cuda_kernels.name_expressions("float32")), out


@needs_nvrtc
def test_compile_rejects_an_unknown_architecture(capsys, monkeypatch):
    monkeypatch.setattr("cudcn.backends.cuda.compile.device_count", lambda: 0)
    assert cli.main(["compile", "--arch", "sm_11", "--dtype", "float64"]) == 1
    assert "cannot target" in capsys.readouterr().out


def test_source_is_one_translation_unit():
    """The loader inlines the common header, so CuPy's cache key covers all of it."""
    text = cuda_kernels.source()
    assert not re.search(r"^\s*#\s*include", text, re.MULTILINE)
    assert text.count("struct ConvShape {") == 1
    templates = {name.split("<")[0] for d in cuda_kernels.TYPES for name in cuda_kernels.name_expressions(d)}
    assert templates >= {"deform_im2col", "deform_fused_forward"}
    for kernel in templates:
        assert re.search(rf"__global__ void {GLOBAL_ATTRIBUTES}{kernel}\(", text), kernel


def test_headers_are_inlined_once_in_order(tmp_path):
    """A kernel including dcn_mma.cuh (which includes dcn_common.cuh) gets
    both headers once, the common one first; other includes are refused."""
    kernel = tmp_path / "k.cu"
    kernel.write_text('#include "dcn_mma.cuh"\n#include "dcn_common.cuh"\n__global__ void k() {}\n')
    text = cuda_kernels.translation_unit([kernel], cuda_kernels.kernel_dir())
    assert not re.search(r"^\s*#\s*include", text, re.MULTILINE)
    assert text.count("struct ConvShape {") == 1 and text.count("dcn_mma_m16n8k16_f16(float") == 1
    assert text.index("struct ConvShape {") < text.index("dcn_mma_m16n8k16_f16(float") < text.index("void k()")
    kernel.write_text('#include "cuda_fp16.h"\n')
    with pytest.raises(ValueError, match="k.cu includes 'cuda_fp16.h'; only dcn_common.cuh, dcn_mma.cuh"):
        cuda_kernels.translation_unit([kernel], cuda_kernels.kernel_dir())


def test_every_kernel_file_opens_with_its_function_list():
    directory = cuda_kernels.kernel_dir()
    for name in cuda_kernels.SOURCES:
        text = (directory / name).read_text()
        header = text.split("#include", 1)[0]
        for kernel in re.findall(rf"__global__ void {GLOBAL_ATTRIBUTES}(\w+)\(", text):
            assert kernel in header, f"{name}: {kernel} is missing from the opening comment"


@needs_nvrtc
def test_compile_goes_through_cupys_header_lookup():
    """`cudcn compile` fails where CuPy's RawModule would at run time: here,
    the CUDA runtime headers cannot be found (CuPy looks them up on every
    compile, even for source that includes none)."""
    script = (
        "import cuda.pathfinder, sys\n"
        "cuda.pathfinder.find_nvidia_header_directory = lambda name: None\n"
        "from cudcn.backends.cuda import compile\n"
        "compile.device_count = lambda: 0\n"
        "from cudcn import cli\n"
        "sys.exit(cli.main(['compile', '--arch', 'sm_80', '--dtype', 'float64']))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 1, result.stdout + result.stderr
    assert "CuPy cannot compile here: Failed to find CUDA headers" in result.stdout


@needs_nvrtc
def test_compile_uses_cupys_runtime_options():
    options = compile_module.runtime_options(80)
    assert options[-3:] == ("-ftz=true", "-arch=sm_80", "--device-as-default-execution-space")
    assert "--std=c++17" in options
    assert any(option.startswith("-I") and Path(option[2:], "cuda_runtime.h").is_file() for option in options)


@needs_nvrtc
@pytest.mark.parametrize("arch", [75, 80, 90])
def test_mma_wrappers_and_cooperative_kernels_compile(arch):
    """The emulator's test kernels (shared memory, shuffles, votes, every MMA,
    ldmatrix and cp.async wrapper of kernels/dcn_mma.cuh) through NVRTC: the
    inline PTX the emulator stands in for is assembled for each architecture."""
    from emulation import harness

    source = cuda_kernels.translation_unit([harness.COOPERATIVE_SOURCE], cuda_kernels.kernel_dir())
    module = {}
    rows = compile_module.compile_names(
        source, harness.COOPERATIVE_NAMES, compile_module.runtime_options(arch), "cooperative.cu", module
    )
    assert all(ok for _, ok, _ in rows), rows[0][2]
    mmas = set(re.findall(r"mma\.sync\.aligned\.[\w.]+", module["ptx"]))
    if arch >= 80:
        assert mmas == {
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
            "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
        }
    else:  # f16 as two k8 steps; bf16 and tf32 have no sm_75 instruction and trap
        assert mmas == {"mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32"} and "trap;" in module["ptx"]
    # ldmatrix from sm_75; cp.async from sm_80 (before: a plain load and store, nothing to wait for).
    assert {"ldmatrix.sync.aligned.m8n8.x4.shared.b16", "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"} <= set(
        re.findall(r"ldmatrix\.sync\.aligned\.[\w.]+", module["ptx"]))
    asynchronous = {"cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group"}
    found = set(re.findall(r"cp\.async\.[\w.]+", module["ptx"]))
    assert found == (asynchronous if arch >= 80 else set()), found


@needs_nvrtc
@pytest.mark.parametrize("dtype, vectors", [
    ("float32", {"ld.global.nc.v4.f32", "st.global.v4.f32"}),
    ("float64", {"ld.global.nc.v2.f64", "st.global.v2.f64"}),
    ("float16", {"ld.global.nc.v4.u32", "st.global.v4.u32"}),
    ("bfloat16", {"ld.global.nc.v4.u32", "st.global.v4.u32"}),
])
def test_sampling_kernels_move_16_byte_vectors_and_reduce_by_shuffles(dtype, vectors):
    names = [cuda_kernels.name_expression(k, dtype, "int")
             for k in ("deform_im2col", "deform_col2im", "deform_col2im_coord")]
    module = {}
    rows = compile_module.compile_names(
        cuda_kernels.source(), names, compile_module.runtime_options(80), "sampling.cu", module
    )
    assert all(ok for _, ok, _ in rows), rows[0][2]
    assert vectors <= set(re.findall(r"(?:ld|st)\.global(?:\.nc)?\.v\d\.\w+", module["ptx"]))
    assert "shfl.sync.bfly.b32" in module["ptx"]


def _ptx_bodies(names: list[str], arch: int) -> dict[str, str]:
    """The PTX of each instantiation (its .entry to the next), compiled for sm_<arch>."""
    from cupy.cuda import compiler

    program = compiler._NVRTCProgram(cuda_kernels.source(), "bodies.cu", name_expressions=names, method="ptx")
    ptx, lowered = program.compile(compile_module.runtime_options(arch))
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    return {name: ptx.split(f".entry {lowered[name]}(", 1)[1].split(".entry ", 1)[0] for name in names}


@needs_nvrtc
@pytest.mark.parametrize("arch", [75, 80, 90])
def test_col2im_adds_by_vector_red_on_sm90_and_scalar_atomics_before(arch):
    """deform_col2im's atomics: float32 accumulators (every dtype but
    float64) by red.global.add.v4.f32 on sm_90 (its unaligned fallback by
    scalar ones); before sm_90, and float64 everywhere, scalar ones only."""
    names = [cuda_kernels.name_expression("deform_col2im", d, index)
             for d in cuda_kernels.TYPES for index in cuda_kernels.INDEX_TYPES]
    for name, body in _ptx_bodies(names, arch).items():
        vector = "red.global.add.v4.f32" in body
        assert vector == (arch >= 90 and "double" not in name), name
        assert re.search(r"(atom|red)\.global\.add\.f(32|64)", body), name


@needs_nvrtc
@pytest.mark.parametrize("arch", [75, 80, 90])
def test_bfloat16_rounds_by_cvt_from_sm80(arch):
    """bfloat16 stores round by cvt.rn.bf16.f32 from sm_80 on; on sm_75 by
    integer operations (no bfloat16 conversion there)."""
    names = [cuda_kernels.name_expression(k, "bfloat16", "int") for k in ("deform_im2col", "from_channels_last")]
    for name, body in _ptx_bodies(names, arch).items():
        assert ("cvt.rn.bf16.f32" in body) == (arch >= 80), name


@needs_nvrtc
@pytest.mark.parametrize("dtype", list(cuda_kernels.TYPES))
def test_layout_passes_transpose_through_shared_memory(dtype):
    """to_channels_last, from_channels_last and layout_copies (both ways)
    stage tiles in shared memory between two barriers."""
    kernels = ("to_channels_last", "from_channels_last", "layout_copies", "layout_copies_from_accum")
    names = list(dict.fromkeys(cuda_kernels.name_expression(k, dtype, "int") for k in kernels))
    for name, body in _ptx_bodies(names, 80).items():
        assert re.search(r"st\.shared\.", body) and re.search(r"ld\.shared\.", body), name
        assert body.count("bar.sync") >= 2, name


def test_launch_bounds_match_the_engines_block():
    """The kernels' launch bounds (DCN_BLOCK_THREADS) are the block every
    grid-stride launch takes (kernels.BLOCK): a larger one would not launch."""
    header = (cuda_kernels.kernel_dir() / cuda_kernels.COMMON_HEADER).read_text()
    assert re.search(rf"^#define DCN_BLOCK_THREADS {cuda_kernels.BLOCK}$", header, re.MULTILINE)


def _fused_names(index: str = "int") -> list[str]:
    return [cuda_kernels.name_expression(k, d, index) for k in cuda_kernels.FUSED_KERNELS
            for d in cuda_kernels.TYPES if cuda_kernels.has_kernel(k, d)]


def _fused_ptx(arch: int, names: list[str], source: str | None = None) -> dict[str, str]:
    """Each instantiation's PTX body (NVRTC, sm_<arch>)."""
    from cupy.cuda import compiler

    program = compiler._NVRTCProgram(source or cuda_kernels.source(), "fused.cu", name_expressions=names,
                                     method="ptx")
    ptx, lowered = program.compile(compile_module.runtime_options(arch))
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    return {name: ptx.split(f".entry {lowered[name]}(", 1)[1].split(".entry ", 1)[0] for name in names}


@needs_nvrtc
@pytest.mark.parametrize("arch", [75, 80, 90])
def test_fused_kernels_use_their_mma_ldmatrix_and_async_copies(arch):
    """Each column-free instantiation through NVRTC: the MMA of its operand
    policy (float16 as two k8 steps on sm_75, where bfloat16 and TF32 trap
    and the backend does not choose them), none for the FMA policy;
    fragments by ldmatrix.x4 for every tensor-core policy (TF32 included);
    16-byte chunks into shared memory by cp.async from sm_80 (the forward's
    corners and weights, the backward's weights), by 16-byte loads before;
    16-byte shared stores of their tiles (the weight gradient stores a word
    or a word pair of two pixels)."""
    bodies = _fused_ptx(arch, _fused_names())
    mma = "mma.sync.aligned.m16n8k16.row.col.f32.{0}.{0}.f32"
    expected = {
        "FusedF16": "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32" if arch < 80 else mma.format("f16"),
        "FusedBF16": "trap;" if arch < 80 else mma.format("bf16"),
        "FusedTF32": "trap;" if arch < 80 else "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
    }
    for name, body in bodies.items():
        policy = name.split(", ")[1]
        if policy == "FusedFMA":
            assert "mma.sync" not in body and "ldmatrix" not in body, name
        else:
            assert expected[policy] in body, name
            if expected[policy] != "trap;":
                assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in body, name
        if not name.startswith("fused_backward_weight"):
            copies = {"cp.async.cg.shared.global", "cp.async.commit_group", "cp.async.wait_group"}
            if arch >= 80:
                assert copies <= set(re.findall(r"cp\.async\.[\w.]+", body)), name
            else:
                assert "cp.async" not in body and "ld.global.nc.v4" in body, name
            assert "st.shared.v4.u32" in body, name


_REGISTER = re.compile(r"%[a-z]+[0-9]+")


def _instructions(body: str) -> list[str]:
    """The opcodes of a PTX body in order, a label as "label"."""
    out = []
    for line in body.splitlines():
        line = line.strip()
        if re.match(r"^\$\w+:", line):
            out.append("label")
        elif line and not line.startswith(("//", ".", "{", "}", ")")):
            out.append(re.sub(r"^@!?%p\d+\s+", "", line).split()[0].rstrip(";"))
    return out


def _loads_per_block(opcodes: list[str]) -> list[int]:
    """Global loads in each basic block (cut at labels and after branches):
    ptxas schedules a block's loads together, so a batch of n loads in one
    block can all be in flight before the first is used; a load behind a
    branch of its own (a corner tested before it is read) waits for what
    came before."""
    counts, run = [], 0
    for opcode in opcodes:
        if opcode == "label" or opcode.startswith("bra"):
            counts.append(run)
            run = 0
        elif opcode.startswith("ld.global"):
            run += 1
    return counts + [run]


def _phase_two(opcodes: list[str]) -> list[str]:
    """fused_backward_data's corner loop: from the barrier before the first
    input-gradient atomic to it."""
    atomic = next(i for i, o in enumerate(opcodes) if o.startswith(("red.global.add.f32", "atom.global.add.f32")))
    barrier = max(i for i in range(atomic) if opcodes[i].startswith("bar."))
    return opcodes[barrier:atomic + 1]


@needs_nvrtc
@pytest.mark.parametrize("arch", [75, 90])
def test_fused_gathers_issue_their_loads_together(arch):
    """In the PTX, each batch of loads sits in one basic block, no branch
    between a load and the next: the forward's 16-byte corner and weight
    chunks of a thread's slice (sm_75: plain loads; sm_80 on copies them by
    cp.async), or element by element a chunk's values; the data gradient's
    corner loop four corners of two channels (one channel with 64-bit
    indices); the weight gradient's two pixels' grad_output and four
    corners. (Before, a branch per corner held each load back until the
    previous corner's use.) The forward's element-wise path, a fallback for
    unaligned or odd channel counts, takes one chunk at a time: registers."""
    names = [cuda_kernels.name_expression(k, d, i) for k in ("deform_fused_forward", "fused_backward_data",
                                                             "fused_backward_weight")
             for d in ("float16", "float32") for i in cuda_kernels.INDEX_TYPES]
    for name, body in _fused_ptx(arch, names).items():
        opcodes = _instructions(body)
        values = 8 if "dcn_half" in name else 4
        if name.startswith("deform_fused_forward"):
            assert max(_loads_per_block(opcodes)) >= (10 if arch < 80 else values), name
        elif name.startswith("fused_backward_data"):
            assert max(_loads_per_block(_phase_two(opcodes))) == (8 if name.endswith("int>") else 4), name
        else:
            assert max(_loads_per_block(opcodes)) >= 10, name


@needs_nvrtc
def test_planted_serialised_corner_loads_are_flagged():
    """fused_backward_data with each corner's load moved back into its
    branch, after the previous corner's atomic (as before the gathers were
    batched): one load a block."""
    source = cuda_kernels.source()
    old = ("              for (int q = 0; q < 4; ++q) pixel[e][q] = to_compute(dcn_load(input, planes[e] + at[q]));\n",
           "                const float product = corners[q].valid ? grad * pixel[e][q] : 0.0f;\n")
    new = ("", "                if (!corners[q].valid) continue;\n"
               "                const float product = grad * to_compute(dcn_load(input, planes[e] + at[q]));\n")
    for before, after in zip(old, new):
        assert source.count(before) == 1, before
        source = source.replace(before, after)
    name = cuda_kernels.name_expression("fused_backward_data", "float16", "int")
    assert max(_loads_per_block(_phase_two(_instructions(_fused_ptx(90, [name], source)[name])))) == 1


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_fused_forward_copies_the_next_slice_before_multiplying(arch):
    """The forward's pipeline in its PTX: after a slice's barrier the ten
    cp.async of the next slice (a thread's two chunks at four corners, and
    its two weight chunks) and their commit come before the slice's
    fragment loads and MMAs; each slice's copies are waited for before its
    blend, which precedes the barrier."""
    names = [cuda_kernels.name_expression(k, d, "int") for k in ("deform_fused_forward", "deform_fused_forward_fma")
             for d in cuda_kernels.TYPES if cuda_kernels.has_kernel(k, d)]
    tokens = {"cp.async.cg": "copy", "cp.async.commit_group": "commit", "cp.async.wait_group": "wait",
              "bar.": "bar", "ldmatrix": "ldmatrix", "mma": "mma", "ld.shared": "lds"}
    for name, body in _fused_ptx(arch, names).items():
        text = " ".join(next(token for prefix, token in tokens.items() if opcode.startswith(prefix))
                        for opcode in _instructions(body) if opcode.startswith(tuple(tokens)))
        # wait, blend (its staged corners: ld.shared), barrier, ten copies, commit, then the multiply
        assert re.search(r"wait (lds )+bar (copy ){10}commit (ldmatrix|lds)", text), (name, text)
#: The same accesses written plainly and through kernels/dcn_common.cuh's
#: memory helpers (which the emulator records for its memory accounting).
ACCESS_HELPERS_SOURCE = r"""
#include "dcn_common.cuh"

template <typename T>
__device__ __forceinline__ float twice_plain(const T* p) { return 2.0f * to_compute(p[0]); }

template <typename T>
__device__ __forceinline__ float twice_helped(const T* p, DcnCaller = {}) { return 2.0f * to_compute(dcn_load(p, 0)); }

template <typename T, typename Index>
__global__ void plain(const T* __restrict__ in, T* __restrict__ out, float* __restrict__ sums, Index total) {
  for (Index i = Index(blockIdx.x) * Index(blockDim.x) + Index(threadIdx.x); i < (total);
       i += Index(blockDim.x) * Index(gridDim.x)) {
    const ChannelVector<T, 4> x = *reinterpret_cast<const ChannelVector<T, 4>*>(in + 4 * i);
    *reinterpret_cast<ChannelVector<T, 4>*>(out + 4 * i) = x;
    out[4 * total + i] = in[i + 1];
    atomicAdd(sums + i, twice_plain(in + 2 * i));
  }
}

template <typename T, typename Index>
__global__ void helped(const T* __restrict__ in, T* __restrict__ out, float* __restrict__ sums, Index total) {
  DCN_GRID_STRIDE_LOOP(i, total) {
    const ChannelVector<T, 4> x = dcn_load(reinterpret_cast<const ChannelVector<T, 4>*>(in + 4 * i));
    dcn_store(reinterpret_cast<ChannelVector<T, 4>*>(out + 4 * i), x);
    dcn_store(out, 4 * total + i, dcn_load(in, i + 1));
    dcn_atomic_add(sums + i, twice_helped(in + 2 * i));
  }
}
"""


@needs_nvrtc
@pytest.mark.parametrize("arch", [80, 90])
def test_memory_helpers_compile_to_the_plain_accesses(tmp_path, arch):
    """dcn_load, dcn_store, dcn_atomic_add, DcnCaller and the loops'
    dcn_reconverge leave no trace on the device: the same PTX instructions
    as the plain accesses, register for register (the kernel's name aside;
    NVVM may order two independent ones differently)."""
    from cupy.cuda import compiler

    (tmp_path / "helpers.cu").write_text(ACCESS_HELPERS_SOURCE)
    source = cuda_kernels.translation_unit([tmp_path / "helpers.cu"], cuda_kernels.kernel_dir())
    for types in ("float, int", "dcn_half, long long", "double, int"):
        names = [f"plain<{types}>", f"helped<{types}>"]
        program = compiler._NVRTCProgram(source, "helpers.cu", name_expressions=names, method="ptx")
        ptx, lowered = program.compile(compile_module.runtime_options(arch))
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        bodies = [re.sub(r"\$L__BB\d+_", "$L__BB_", ptx.split(f".entry {lowered[name]}(", 1)[1]
                         .split("\n}\n", 1)[0].replace(lowered[name], "kernel")) for name in names]
        assert "ld.global.nc.v" in bodies[0] and re.search(r"(atom|red)\.global\.add\.f32", bodies[0])
        assert sorted(bodies[0].splitlines()) == sorted(bodies[1].splitlines()), types


@needs_nvrtc
@pytest.mark.parametrize("dtype, vector", [
    ("float32", "ld.global.nc.v4.f32"), ("float64", "ld.global.nc.v2.f64"),
    ("float16", "ld.global.nc.v4.u32"), ("bfloat16", "ld.global.nc.v4.u32"),
])
def test_msda_kernels_gather_by_vectors_reduce_by_shuffles_and_add_by_red(dtype, vector):
    """The MSDA forward reads 16-byte vectors and broadcasts by shuffles; the
    backward reduces by butterfly shuffles and adds the value gradient with
    fire-and-forget reductions in float32 (float64 for float64)."""
    from cupy.cuda import compiler

    names = [cuda_kernels.name_expression(k, dtype, "int") for k in ("msda_forward", "msda_backward")]
    program = compiler._NVRTCProgram(cuda_kernels.source(), "msda.cu", name_expressions=names, method="ptx")
    ptx, lowered = program.compile(compile_module.runtime_options(90))
    ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
    forward, backward = (ptx.split(f".entry {lowered[name]}(", 1)[1].split(".entry ", 1)[0] for name in names)
    assert vector in forward and "shfl.sync.idx.b32" in forward
    assert "shfl.sync.bfly.b32" in backward
    assert re.search(rf"(red|atom)\.global\.add\.f{64 if dtype == 'float64' else 32}", backward)


def test_msda_launch_bounds_match_the_block():
    """msda_forward and msda_backward promise ptxas blocks of kernels.BLOCK
    threads, 4 resident (at most 64 registers: 50% occupancy); a bigger
    block would fail to launch."""
    text = (cuda_kernels.kernel_dir() / "msda.cu").read_text()
    for kernel in ("msda_forward", "msda_backward"):
        bounds = re.search(rf"__global__ void __launch_bounds__\((\d+), (\d+)\) {kernel}\(", text)
        assert bounds and int(bounds.group(1)) == cuda_kernels.BLOCK, kernel
        assert cuda_kernels.block_shape(kernel) == (cuda_kernels.BLOCK, 0)


@needs_nvrtc
@pytest.mark.parametrize("dtype, vector", [
    ("float32", "ld.global.nc.v4.f32"), ("float64", "ld.global.nc.v2.f64"),
    ("float16", "ld.global.nc.v4.u32"), ("bfloat16", "ld.global.nc.v4.u32"),
])
def test_dcnv3_kernels_gather_by_vectors_reduce_by_shuffles_and_add_atomically(dtype, vector):
    """The DCNv3 forward reads 16-byte vectors of the input and adds its point
    lanes' sums by butterfly shuffles; the backward reduces by butterfly
    shuffles and adds the input gradient by float32 (float64 for float64)
    atomics; neither holds a local array (no stack frame: checked by the
    resource budgets)."""
    names = [cuda_kernels.name_expression(k, dtype, "int") for k in ("dcnv3_forward", "dcnv3_backward")]
    forward, backward = _ptx_bodies(names, 90).values()
    assert vector in forward and "shfl.sync.bfly.b32" in forward
    assert "st.global.v4" in forward or "st.global.v2.f64" in forward
    assert "shfl.sync.bfly.b32" in backward
    assert re.search(rf"(red|atom)\.global\.add\.f{64 if dtype == 'float64' else 32}", backward)


def test_dcnv3_launch_bounds_match_the_block():
    """dcnv3_forward and dcnv3_backward promise ptxas blocks of kernels.BLOCK
    threads, 4 resident (at most 64 registers: 50% occupancy)."""
    text = (cuda_kernels.kernel_dir() / "dcnv3.cu").read_text()
    for kernel in ("dcnv3_forward", "dcnv3_backward"):
        bounds = re.search(rf"__global__ void __launch_bounds__\((\d+), (\d+)\) {kernel}\(", text)
        assert bounds and int(bounds.group(1)) == cuda_kernels.BLOCK and int(bounds.group(2)) == 4, kernel
        assert cuda_kernels.block_shape(kernel) == (cuda_kernels.BLOCK, 0)
