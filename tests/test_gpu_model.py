"""The GPU performance model (benchmarks/gpu_model.py): its predictions are
predicted by a model, not measured; these tests hold the model to its inputs.

- the stored output (benchmarks/results/gpu_model.json and .md) is what the
  model gives from the stored counts, and docs/gpu-validation.md quotes it;
- the inputs come from the instruments: a changed count, occupancy, SASS
  batch or launch changes the prediction; the emulator's counts scale with
  the pixels as the law says (emulated);
- the interface benchmarks/bench_gpu.py calls: ``predict(shape, precision)``
  returns milliseconds under the benchmark's own measurement names;
- the pieces: the SASS batch reader, the law fit, torchvision's warp
  sectors, the dry run's record of array operations, the calibration.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "gpu-validation.md"


def _script(path: str):
    """A script of benchmarks/ as a module (registered, as pickling and dataclasses like)."""
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gm = _script("benchmarks/gpu_model.py")
FIRST = next(iter(gm.shapes()))


@pytest.fixture(scope="module")
def stored() -> dict:
    """The stored record (benchmarks/results/gpu_model.json)."""
    return json.loads(gm.STORED.read_text())


def _close(a, b, rel=1e-9):
    """Nested JSON values equal, floats to a relative tolerance."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)
    return a == b


def _counts_only(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("predictions", "hardware", "sources", "assumptions")}


# ----------------------------------------------------------------------------
# The stored output


def test_the_stored_predictions_are_what_the_model_gives_from_the_stored_counts(stored):
    fresh = json.loads(json.dumps(gm.complete(_counts_only(stored))))
    assert fresh["hardware"] == stored["hardware"] == asdict(gm.H100)
    assert fresh["assumptions"] == stored["assumptions"] and fresh["sources"] == stored["sources"]
    assert _close(fresh["predictions"], stored["predictions"])
    assert (gm.RESULTS / "gpu_model.md").read_text() == gm.render(stored) + "\n"
    assert gm.LABEL == "predicted by a model, not measured" and gm.LABEL in gm.render(stored)


def test_the_stored_counts_cover_every_benchmark_shape_precision_and_call(stored):
    assert list(stored["shapes"]) == list(gm.shapes())
    for name, entry in stored["shapes"].items():
        assert tuple(entry["shape"]) == gm.shapes()[name]
        for precision in gm.precisions():
            for algorithm in gm.DEFORM_CONV2D.algorithms:
                for direction in gm.DIRECTIONS:
                    key = f"{precision}|{algorithm}|{direction}"
                    launched = {x["kernel"] for x in entry["calls"][key]["launches"]}
                    # every kernel a call launches has its counts, or is the one the small sizes never launch
                    assert launched - set(entry["laws"][key]) <= {k for k in launched if "split_sum" in k}, key
                    assert all(k in stored["kernels"] for k in launched)
            for block in gm.DEFORM_CONV2D.public:
                assert f"{precision}|public|{block}" in entry["calls"]
        assert set(entry["peer"]) == {"float32", "float16"} and stored["operator"] == "deform_conv2d"
    assert stored["counted"]["sizes"] == [list(s) for s in gm.SIZES]


def test_the_docs_quote_the_stored_goals_and_totals():
    """docs/gpu-validation.md holds the stored report's goal and total tables
    verbatim between its quote markers (``--count`` rewrites them)."""
    docs, stored_report = DOCS.read_text(), (gm.RESULTS / "gpu_model.md").read_text()
    quoted = re.search(r"<!-- quote: benchmarks/results/gpu_model\.md \(goals, totals\) -->\n(.*?)<!-- end quote -->",
                       docs, re.S)
    assert quoted, "docs/gpu-validation.md has no quote of the model's goals and totals"
    assert quoted.group(1) == gm.quotable(stored_report), "out of date: run python benchmarks/gpu_model.py --quote"
    assert gm.LABEL in docs


# ----------------------------------------------------------------------------
# The interface bench_gpu.py calls

#: The measurements bench_gpu.py records (its docstring names them).
MEASUREMENTS = {
    *(f"cudcn.{m}" for m in ("forward_ms", "backward_ms", "im2col_ms", "col2im_ms", "col2im_coord_ms")),
    *(f"cudcn.{a}_{d}_ms" for a in ("im2col", "fused", "auto") for d in ("forward", "backward")),
    "torchvision.forward_ms", "torchvision.backward_ms", "cudnn.forward_ms",
}


def test_bench_gpu_loads_the_model_and_prints_its_predictions_beside_the_measurements():
    bench = _script("benchmarks/bench_gpu.py")
    assert bench.MODEL == Path(gm.__file__)
    model = bench.load_model()  # as the benchmark loads it: not registered as a module
    rows = []
    for shape in bench.SHAPES:
        for precision in bench.PRECISIONS:
            row = {"shape": shape, "dtype": precision, "cudcn": {"forward_ms": 1.0}, "torchvision": None}
            row["model"] = bench.predict(model, row)
            assert "error" not in row["model"], row["model"]
            assert set(row["model"]) <= MEASUREMENTS
            assert {"cudcn.forward_ms", "cudcn.backward_ms", "cudnn.forward_ms"} <= set(row["model"])
            assert all(isinstance(v, float) and 0 < v < 1e3 for v in row["model"].values())
            assert ("torchvision.forward_ms" in row["model"]) == (precision != "bfloat16")  # no bfloat16 kernel
            assert row["model"] == gm.predict(bench.SHAPES[shape], precision)
            rows.append(row)
    table = bench.render_model(rows, True)
    assert "predicted" in table and "| cudcn.forward_ms |" in table


def test_predict_refuses_what_it_has_no_counts_for():
    with pytest.raises(KeyError, match="no stored counts"):
        gm.predict((1, 2, 3, 4, 5, 3, 1), "float16")
    with pytest.raises(KeyError, match="precision"):
        gm.predict(gm.shapes()[FIRST], "float8")


def test_the_gpu_is_chosen_by_name_or_environment(monkeypatch):
    monkeypatch.setenv("CUDCN_MODEL_GPU", "H200")
    assert gm.hardware() is gm.H200
    assert gm.hardware("H100") is gm.H100
    monkeypatch.delenv("CUDCN_MODEL_GPU")
    h100, h200 = (gm.predict(gm.shapes()[FIRST], "float16", name) for name in ("H100", "H200"))
    assert h200["cudnn.forward_ms"] <= h100["cudnn.forward_ms"] and h200 != h100


# ----------------------------------------------------------------------------
# The inputs come from the instruments


def _time(record: dict, call: str, precision: str = "float16") -> float:
    return gm.predict_case(record, FIRST, precision, gm.H100)["calls"][call]["seconds"]


def _law(record: dict, key: str, template: str) -> dict:
    laws = record["shapes"][FIRST]["laws"][key]
    return next(v for k, v in laws.items() if k.startswith(template + "<"))


def test_more_counted_sectors_predict_more_time(stored):
    """Doubling the emulator's counts of the kernel that bounds a call
    lengthens the call by that kernel's share; halving shortens it."""
    record = copy.deepcopy(stored)
    before = gm.predict_case(record, FIRST, "float16", gm.H100)["calls"]["cudcn im2col backward"]
    col2im = next(r for r in before["rows"] if r["name"].startswith("deform_col2im<"))
    for factor in (2.0, 0.5):
        changed = copy.deepcopy(stored)
        law = _law(changed, "float16|im2col|backward", "deform_col2im")
        law["counts"] = {name: [factor * v for v in values] for name, values in law["counts"].items()}
        after = _time(changed, "cudcn im2col backward")
        expected = before["seconds"] + (factor - 1) * (col2im["seconds"] - col2im["launches"] * gm.H100.launch_device)
        assert after == pytest.approx(expected, rel=1e-6)


def test_fewer_resident_warps_predict_a_slower_latency_bound_kernel(stored):
    """The fused forward's latency term is its round trips over the warps
    resident at once: the occupancy's, or the grid's where it is smaller."""
    record = copy.deepcopy(stored)
    name = next(k for k in record["kernels"] if k.startswith("deform_fused_forward<dcn_half"))
    launches = record["shapes"][FIRST]["calls"]["float16|fused|forward"]["launches"]
    launch = next(x for x in launches if x["kernel"] == name)
    warps_of_grid = math.prod(launch["grid"]) * math.prod(launch["block"]) // 32

    def latency() -> float:
        rows = gm.predict_case(record, FIRST, "float16", gm.H100)["calls"]["cudcn fused forward"]["rows"]
        return next(r for r in rows if r["name"] == name)["terms"]["latency"]

    resident = min(gm.H100.sms * record["kernels"][name]["warps_per_sm"], warps_of_grid)
    before = latency()
    record["kernels"][name]["warps_per_sm"] = 2
    assert latency() == pytest.approx(before * resident / min(gm.H100.sms * 2, warps_of_grid), rel=1e-9)
    assert latency() > before


def test_the_dry_runs_launches_are_what_is_timed(stored):
    """One more launch of a call's GEMM (as a chunking change would make)
    adds that GEMM's time; a kernel launched twice as often pays its launch
    overhead twice."""
    record = copy.deepcopy(stored)
    call = record["shapes"][FIRST]["calls"]["float16|im2col|forward"]
    before = _time(record, "cudcn im2col forward")
    gemm = gm.gemm_time(gm.H100, call["gemms"][0])["seconds"]
    call["gemms"].append(copy.deepcopy(call["gemms"][0]))
    assert _time(record, "cudcn im2col forward") == pytest.approx(before + gemm, rel=1e-9)


def test_a_site_costs_the_round_trips_its_sass_batch_says():
    from emulation.transactions import LaunchStats, SiteStats

    def site(op, line, requests, caller=("", 0)):
        return SiteStats("global", op, 16, "dcn_common.cuh", line, caller[0], caller[1], requests, 32 * requests,
                         512 * requests, 16 * requests, 16 * requests, 0, 0, 16)

    launch = LaunchStats("k<float, int>", (site("load", 340, 100, ("dcn_im2col.cu", 60)),
                                           site("load", 236, 10, ("dcn_im2col.cu", 41)),
                                           site("load", 999, 7), site("store", 382, 5)))
    trips = {"dcn_im2col.cu:60 > dcn_common.cuh:340": 0.25, "dcn_im2col.cu:41 > *": 0.5}
    counts, unmatched = gm.kernel_counters(launch, trips)
    assert counts["load_requests"] == 117 and counts["store_requests"] == 5
    assert counts["load_trips"] == 100 * 0.25 + 10 * 0.5 + 7 * 1.0 and unmatched == 7
    assert counts["load_sectors"] == 16 * 117 and counts["store_sectors"] == 80


SASS = """
.text._Z6kernelPf:
\t//## File "/x/kernels/dcn_common.cuh", line 56 inlined at "/x/kernels/dcn_common.cuh", line 340
\t//## File "/x/kernels/dcn_common.cuh", line 340 inlined at "/x/kernels/dcn_im2col.cu", line 60
\t//## File "/x/kernels/dcn_im2col.cu", line 60
        /*0100*/               @P2 LDG.E.128.CONSTANT R8, desc[UR8][R8.64] ;
        /*0110*/               @P4 LDG.E.128.CONSTANT R12, desc[UR8][R12.64] ;
        /*0120*/                   IMAD.WIDE R16, R3, 0x2, R4 ;
        /*0130*/               @P3 LDG.E.128.CONSTANT R16, desc[UR8][R16.64] ;
        /*0140*/               @P2 HADD2.F32 R37, -RZ, R9.H1_H1 ;
        /*0150*/              @!P0 BRA `(.L_x_100) ;
        /*0160*/                   LDG.E.128.CONSTANT R8, desc[UR8][R28.64] ;
        /*0170*/                   HADD2.F32 R14, -RZ, R9.reuse.H0_H0 ;
\t//## File "/x/kernels/dcn_fused_forward.cu", line 126
        /*0180*/                   LDG.E.CONSTANT R2, desc[UR8][R2.64] ;
        /*0190*/                   FADD.FTZ R3, R2, R2 ;
        /*01a0*/                   LDG.E.CONSTANT R4, desc[UR8][R4.64] ;
        /*01b0*/                   STG.E [R6.64], R4 ;
        /*01c0*/                   EXIT ;
"""


def test_load_batches_counts_the_loads_issued_before_a_first_use():
    [(name, loads)] = gm.load_batches(SASS).items()
    assert name == "_Z6kernelPf"
    chains, batches = zip(*loads)
    # three corner loads in flight, then (after their use and a branch) one alone;
    # then a load used at once, and one whose register a store reads.
    assert batches == (3, 3, 3, 1, 1, 1)
    assert chains[0] == ("dcn_common.cuh:56", "dcn_common.cuh:340", "dcn_im2col.cu:60")
    assert chains[4] == ("dcn_fused_forward.cu:126",)


def test_the_law_is_fitted_exactly_and_scaled():
    a, b, c = 3.5, -20.0, 7.0
    rows = [gm.basis(*size) for size in gm.sizes(gm.DEFORM_CONV2D, (16, 256, 256, 64, 64, 3, 1))]
    assert rows == [[8 * 64, 1, 1], [16 * 64, 1, 1], [2 * 8 * 64, 2, 1]]
    law = {"basis": rows, "counts": {"x": [a * p + b * n + c for p, n, _ in rows], "y": [0.0] * 3}}
    assert gm.fit_law(law["basis"], law["counts"]["x"]) == pytest.approx([a, b, c])
    full = gm.basis(16, 64, 64)
    assert gm.scale(law, *full[:2]) == pytest.approx({"x": a * full[0] + b * full[1] + c, "y": 0.0})
    assert gm.scale({"basis": rows, "counts": {"x": [5.0, 1.0, 1.0]}}, *full[:2])["x"] == 0  # never negative
    two_terms = {"basis": [r[:2] for r in rows[:2]], "counts": {"x": [a * p + b for p, _, _ in rows[:2]]}}
    assert gm.scale(two_terms, *full[:2])["x"] == pytest.approx(a * full[0] + b * full[1])  # counts stored before


@pytest.mark.emulated
def test_the_emulators_counts_scale_as_the_law_says():
    """At the third benchmark shape's channels and width, float16 forward
    of both algorithms: the same image twice costs twice what it adds to a
    call (within 1%: one image, two, three), and the law fitted at the
    stored sizes predicts others (12 rows, fresh draws, one and two images)
    within 3%, every counter of every kernel."""
    from emulation import harness

    if harness.compiler() is None:
        pytest.skip("no C++ compiler (g++) for the kernel emulation")
    library = harness.build()
    shape = gm.shapes()["N32 C128->128 32x32 3x3 G4"]
    width = shape[4]
    for algorithm in ("im2col", "fused"):
        call = ("float16", algorithm, "forward")
        laws = gm.count_calls(library, gm.DEFORM_CONV2D, shape, [call], {})["|".join(call)]
        one = gm._dcn_arguments(shape, "float16", 1, 8, width, seed=1)
        counted = []
        for copies in (1, 2, 3):
            args = dict(one, **{k: np.concatenate([one[k]] * copies) for k in ("input", "offset", "mask")})
            stats, _ = gm._emulate(library, gm.DEFORM_CONV2D, args, algorithm, "forward", False)
            counted.append({s.kernel: gm.kernel_counters(s, {})[0] for s in stats})
        for kernel, once in counted[0].items():
            twice, thrice = counted[1][kernel], counted[2][kernel]
            for counter in once:
                assert thrice[counter] - twice[counter] == pytest.approx(
                    twice[counter] - once[counter], rel=0.01, abs=2), (kernel, counter)
        for n, h in ((1, 12), (2, 12)):
            args = gm._dcn_arguments(shape, "float16", n, h, width, seed=7)
            stats, _ = gm._emulate(library, gm.DEFORM_CONV2D, args, algorithm, "forward", False)
            for launch in stats:
                predicted = gm.scale(laws[gm._normal_index(launch.kernel)], n * h * width, n)
                for counter, value in gm.kernel_counters(launch, {})[0].items():
                    assert predicted[counter] == pytest.approx(value, rel=0.03, abs=2), (launch.kernel, counter, n, h)


# ----------------------------------------------------------------------------
# torchvision's algorithm, the dry run, the calibration


def test_warp_sectors_of_torchvisions_accesses():
    coalesced = gm._sectors(np.arange(64), 4)
    assert gm._requests(coalesced) == (2, 8)  # 2 warps of 32 float32: 4 sectors each
    strided = gm._sectors(np.arange(32) * 8, 4)
    assert gm._requests(strided) == (1, 32)
    half = gm._sectors(np.arange(32), 2, valid=np.arange(32) < 16)
    assert gm._requests(half) == (1, 1)
    assert gm._requests(gm._sectors(np.arange(32), 4, valid=np.zeros(32, bool))) == (0, 0)
    # a block re-reads from L1: distinct sectors per 512 threads
    assert gm._block_distinct(np.zeros((1024, 4), np.int64)) == 2


def test_torchvisions_counts_grow_with_its_work():
    small = gm.torchvision_counts((2, 8, 8, 16, 16, 3, 1), "float32")
    wide = gm.torchvision_counts((2, 16, 8, 16, 16, 3, 1), "float32")
    kernels = lambda calls: {w["name"]: w for w in calls["backward"] if w["kind"] == "kernel"}  # noqa: E731
    for name, work in kernels(small).items():  # twice the channels: im2col and col2im do everything twice
        doubled = dict(work["counts"])
        if "coord" in name:
            doubled = {k: doubled[k] for k in ("load_requests", "load_sectors")}
        for counter, value in doubled.items():
            assert kernels(wide)[name]["counts"][counter] == pytest.approx(2 * value, rel=1e-9), (name, counter)
    coord = kernels(small)["torchvision col2im_coord"]["counts"]  # a thread per offset: its stores do not grow
    assert kernels(wide)["torchvision col2im_coord"]["counts"]["store_requests"] == coord["store_requests"]
    im2col = kernels(small)["torchvision im2col"]["counts"]
    warps, points = 2 * 16 * 16 // 32, 9
    assert im2col["store_requests"] == warps * points * 8  # one coalesced column store per point and channel
    assert im2col["load_requests"] <= warps * points * 8 * 7  # offsets, mask, four corners
    assert im2col["l2_load_sectors"] < im2col["load_sectors"]  # a block re-reads its corners from L1
    assert kernels(small)["torchvision col2im"]["counts"]["atomic_sectors"] > 0


def test_the_dry_run_records_the_backends_own_array_operations():
    import cudcn
    from cudcn.backends.cuda import im2col_gemm
    from cudcn.geometry import validate
    from emulation.dry_run import DeviceOp, DryRunEngine

    engine = DryRunEngine(record=True)
    make = lambda *shape: engine.adopt(np.empty(shape, np.float32))  # noqa: E731
    args = dict(input=make(2, 8, 6, 6), offset=make(2, 18, 6, 6), mask=make(2, 9, 6, 6), weight=make(4, 8, 3, 3))
    geom = validate(**args, bias=make(4), padding=1)
    grad_output = make(2, 4, 6, 6)
    with cudcn.tf32(True):
        im2col_gemm.backward(engine, geom, grad_output, *(args[k] for k in ("input", "offset", "weight", "mask")))
    # The layouts, the zeroed accumulator and the gradients' conversions are
    # kernels (layout_copies); what is left of the backend's own is the bias
    # gradient, a reduction of grad_output.
    assert engine.device_ops == [DeviceOp("reduction", grad_output.nbytes, 4 * 4)]
    assert len(engine.footprints) == len(engine.launches) and all(f > 0 for f in engine.footprints)
    assert [g["tf32"] for g in engine.gemm_calls] == [True, True]
    assert not engine.gemm_calls[0]["reads_c"]  # one chunk: the weight gradient's GEMM writes, no memset
    engine.xp.ascontiguousarray(grad_output.transpose(0, 2, 3, 1))
    assert engine.device_ops[-1] == DeviceOp("copy", grad_output.nbytes, grad_output.nbytes, strided=True)


def test_the_calibration_sets_each_measurement_beside_its_prediction():
    shape = FIRST
    predicted = gm.predict(gm.shapes()[shape], "float16")
    row = {"shape": shape, "dtype": "float16", "cudcn": {}, "torchvision": {}, "cudnn": {}}
    for key, value in predicted.items():
        library, _, name = key.partition(".")
        row[library][name] = 2 * value
    rows = gm.calibration({"environment": {"gpu": "NVIDIA H100 80GB HBM3"}, "rows": [row]})
    assert len(rows) == len(predicted) and all(r["measured_over_predicted"] == pytest.approx(2) for r in rows)
    text = gm.render_calibration(rows)
    assert "geometric mean measured/predicted 2.00" in text and gm.LABEL in text


def test_goals_are_labelled_predicted(stored):
    rows = gm.goal_rows(gm.DEFORM_CONV2D, stored["predictions"])
    assert {r["goal"] for r in rows} >= {g[0] for g in gm.DEFORM_CONV2D.goals}
    assert all(r["passes"] == (r["ratio"] <= r["limit"] if "fused" not in r["goal"] else r["ratio"] < 1) for r in rows)
    assert "(predicted)" in gm.render(stored).split("## Totals")[0]
