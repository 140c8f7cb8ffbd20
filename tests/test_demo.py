"""``cudcn demo``: its data, its models, the sampling-point picture, and the
subcommand end to end at a tiny budget."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import pytest

import cudcn

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
torch = pytest.importorskip("torch")

from cudcn import cli  # noqa: E402
from cudcn.cli.demo import data as demo_data  # noqa: E402
from cudcn.cli.demo import picture_indices, report  # noqa: E402
from cudcn.cli.demo.models import MODEL_NAMES, STEP, make_model  # noqa: E402
from cudcn.cli.demo.plots import sampling_points  # noqa: E402
from cudcn.cli.demo.training import train_step  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def datasets():
    return demo_data.make_datasets(seed=0)


def test_data_is_deterministic_and_shaped(datasets):
    size = demo_data.IMAGE_SIZE
    assert datasets["train"].images.shape == (1258, 1, size, size)
    for key in ("test_mild", "test_strong"):
        assert datasets[key].images.shape == (539, 1, size, size)
        np.testing.assert_array_equal(datasets[key].labels, datasets["test_mild"].labels)
    for digits in datasets.values():
        assert digits.images.dtype == np.float32 and 0 <= digits.images.min() and digits.images.max() <= 1
        assert set(digits.labels.tolist()) == set(range(10))
    again = demo_data.make_datasets(seed=0)
    for key, digits in datasets.items():
        np.testing.assert_array_equal(digits.images, again[key].images)
    # The two test sets show the same digits, deformed differently.
    assert not np.allclose(datasets["test_mild"].images, datasets["test_strong"].images)


def test_deform_without_deformation_is_identity():
    rng = np.random.default_rng(0)
    images = demo_data.upscale(demo_data.load_sources()[0][:3])
    still = demo_data.Deformation(max_rotation_deg=0, scale_range=(1, 1), max_shift=0, elastic_alpha=0)
    np.testing.assert_allclose(demo_data.deform(images, still, rng), images, atol=1e-12)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_learns_on_a_tiny_budget(name, datasets):
    torch.manual_seed(0)
    model = make_model(name)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = torch.from_numpy(datasets["train"].images[:32])
    labels = torch.from_numpy(datasets["train"].labels[:32])
    losses = [train_step(model, optimizer, images, labels) for _ in range(20)]
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("name", ["dcnv1", "dcnv2"])
def test_sampling_points_start_on_the_regular_grid_and_follow_the_offsets(name):
    torch.manual_seed(0)
    model = make_model(name)
    images = torch.rand(2, 1, demo_data.IMAGE_SIZE, demo_data.IMAGE_SIZE)
    points = sampling_points(model, images)
    # A fresh layer predicts zero offsets: the regular 3x3 grid around each unit.
    np.testing.assert_allclose(points["y"], np.broadcast_to(points["regular_y"], points["y"].shape))
    np.testing.assert_allclose(points["x"], np.broadcast_to(points["regular_x"], points["x"].shape))
    centre = STEP * 3 + (STEP - 1) / 2  # unit (3, 3), kernel point (1, 1)
    assert points["y"][0, 3, 3, 4] == centre and points["x"][0, 3, 3, 4] == centre
    assert points["y"][0, 3, 3, 0] == centre - STEP and points["x"][0, 3, 3, 2] == centre + STEP
    np.testing.assert_allclose(points["mask"], 0.5 if name == "dcnv2" else 1.0)

    # One layer step down for every point (row offsets are the even channels
    # of the offset; DCNv2 puts them in its first two chunks).
    with torch.no_grad():
        model.last.conv_offset.bias[0:18:2] = 1.0
    moved = sampling_points(model, images)
    np.testing.assert_allclose(moved["y"], points["y"] + STEP, rtol=1e-6)
    np.testing.assert_allclose(moved["x"], points["x"], rtol=1e-6)


def test_demo_command_writes_table_results_and_pictures(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--epochs", "2", "--seeds", "2", "--limit", "64", "--out", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    for name in MODEL_NAMES:
        assert name in captured.out
        assert f"{name:9} seed 1: final training loss " in captured.out  # a line per run
    assert "+-" in captured.out
    assert captured.err == ""  # stderr is not a terminal here: no progress bar
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["epochs"] == 2 and results["settings"]["seeds"] == 2
    assert set(results["summary"]) == set(MODEL_NAMES)
    assert len(results["runs"]) == 2 * len(MODEL_NAMES)
    assert all(len(run["train_loss"]) == 2 and len(run["epoch_seconds"]) == 2 for run in results["runs"])
    assert set(results["training_speed"]) == set(MODEL_NAMES)
    environment = results["environment"]
    assert environment["versions"]["cudcn"] == cudcn.__version__ and environment["versions"]["torch"]
    assert environment["date"] and environment["machine"] and environment["torch_threads"] == 1
    assert (out / "results.md").read_text() == report.markdown(results)
    for picture in ("learning_curves.png", "sampling_locations.png", "data.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bar_on_stderr_only_when_it_is_a_terminal_and_not_quiet(tmp_path, capsys, monkeypatch, quiet):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["demo", "--epochs", "1", "--seeds", "1", "--limit", "64", "--models", "plain",
            "--out", str(tmp_path), "--device", "cpu"] + (["--quiet"] if quiet else [])
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert ("batch/s" in terminal.getvalue() or "batch]" in terminal.getvalue()) != quiet
    assert "batch" not in out  # never on stdout
    assert ("final training loss" in out) != quiet and "test acc, mild" in out


def test_training_speed_compares_loss_curves_with_the_plain_network():
    """Plain ends at loss 0.5 after 3 epochs of 1 s; a model whose mean curve
    is 1.0, 0.4, 0.2 with 2 s epochs passes 0.5 at 1 + (1.0 - 0.5)/(1.0 - 0.4)
    epochs, after as many 2-second epochs; one that stays above never does."""
    def runs(name, losses, seconds):
        return [{"model_name": name, "train_loss": loss, "epoch_seconds": seconds} for loss in losses]

    speed = report.training_speed({
        "plain": runs("plain", [[2.2, 1.2, 0.6], [1.8, 0.8, 0.4]], [1.0, 1.0, 1.0]),
        "dcnv2": runs("dcnv2", [[1.0, 0.4, 0.2]], [2.0, 2.0, 2.0]),
        "coordconv": runs("coordconv", [[2.0, 1.0, 0.6]], [1.0, 1.0, 1.0]),
    })
    assert speed["plain"] == {"final_loss": pytest.approx(0.5), "epochs_to_plain_final_loss": 3.0,
                              "seconds_to_plain_final_loss": 3.0}
    assert speed["dcnv2"]["final_loss"] == pytest.approx(0.2)
    assert speed["dcnv2"]["epochs_to_plain_final_loss"] == pytest.approx(1 + 0.5 / 0.6)
    assert speed["dcnv2"]["seconds_to_plain_final_loss"] == pytest.approx(2 * (1 + 0.5 / 0.6))
    assert speed["coordconv"]["epochs_to_plain_final_loss"] is None


def test_report_words_say_which_way_the_ratios_go():
    runs = [{"model_name": "plain", "seed": 0, "parameters": 10, "train_loss": [2.0, 1.0, 0.5],
             "test_strong_accuracy": [0.1, 0.2, 0.3], "epoch_seconds": [1.0, 1.0, 1.0], "test_mild_accuracy": 0.5},
            {"model_name": "dcnv2", "seed": 0, "parameters": 20, "train_loss": [1.0, 0.4, 0.2],
             "test_strong_accuracy": [0.2, 0.3, 0.4], "epoch_seconds": [2.0, 2.0, 2.0], "test_mild_accuracy": 0.6},
            {"model_name": "coordconv", "seed": 0, "parameters": 11, "train_loss": [2.0, 1.0, 0.6],
             "test_strong_accuracy": [0.1, 0.2, 0.3], "epoch_seconds": [1.0, 1.0, 1.0], "test_mild_accuracy": 0.5}]
    results = {"settings": {"epochs": 3, "seeds": 1, "models": ["plain", "dcnv2", "coordconv"], "device": "cpu"},
               "environment": {"date": "D", "machine": "M", "cpu_count": 2, "torch_threads": 1, "python": "3",
                               "versions": {"cudcn": "0"}},
               "runs": runs, "wall_seconds": 12.3}
    text = report.markdown(results)
    assert "| DCNv2 | 20 | 0.600 | 0.400 | 2.00 |" in text  # one seed: no spread to show
    assert "±" not in text and "`cudcn demo` with 3 epochs and 1 seed on the CPU" in text
    assert ("- DCNv2: final loss 0.20, 2.5× lower than plain's; plain's final loss reached after 1.8 epochs "
            "(1.6× fewer than plain) and 3.7 s of training (1.2× longer than plain).") in text
    assert "- CoordConv: final loss 0.60, 1.2× higher than plain's; plain's final loss not reached in 3 epochs." in text


def test_picture_digits_are_of_different_classes():
    labels = np.array([6, 6, 2, 6, 5, 2, 1, 9, 0, 3])
    assert picture_indices(labels, 4) == [0, 2, 4, 6]
    assert len(picture_indices(labels, 20)) == 7


@pytest.mark.parametrize("limit", [1, 5])
def test_demo_runs_with_fewer_digits_than_its_pictures_show(tmp_path, capsys, limit):
    """data.png shows up to 10 digits a row and sampling_locations.png up to 6
    classes: with fewer, they show what there is. One seed: no spread shown."""
    out = tmp_path / "demo"
    argv = ["demo", "--epochs", "1", "--seeds", "1", "--limit", str(limit), "--models", "plain,dcnv1",
            "--out", str(out), "--device", "cpu"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{limit} training digit{'s' if limit > 1 else ''}, " in printed
    assert "2 models x 1 seed x 1 epoch" in printed and "(accuracy: 1 seed;" in printed
    assert "+-" not in printed and "1 seeds" not in printed
    assert "±" not in (out / "results.md").read_text()
    for picture in ("learning_curves.png", "sampling_locations.png", "data.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deformations_are_described_with_their_ranges():
    assert demo_data.MILD.describe() == "rotation ±15°, scale 0.9–1.1, shift ±1.5 px, elastic warp α = 16, σ = 4 px"
    assert demo_data.STRONG.describe().startswith("rotation ±45°, scale 0.7–1.25, shift ±3 px")


def test_training_digits_constant_is_the_training_set_size(datasets):
    assert len(datasets["train"]) == demo_data.TRAINING_DIGITS
