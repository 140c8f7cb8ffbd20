"""``cudcn demo``: its data, its models, the sampling-point picture, and the
subcommand end to end at a tiny budget."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("scipy")
torch = pytest.importorskip("torch")

from cudcn import cli  # noqa: E402
from cudcn.cli.demo import data as demo_data  # noqa: E402
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
    printed = capsys.readouterr().out
    for name in MODEL_NAMES:
        assert name in printed
    assert "+-" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["epochs"] == 2 and results["settings"]["seeds"] == 2
    assert set(results["summary"]) == set(MODEL_NAMES)
    assert len(results["runs"]) == 2 * len(MODEL_NAMES)
    assert all(len(run["train_loss"]) == 2 for run in results["runs"])
    for picture in ("learning_curves.png", "sampling_locations.png", "data.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_unknown_models(tmp_path, capsys):
    assert cli.main(["demo", "--models", "plain,resnet", "--out", str(tmp_path)]) == 2
    assert "resnet" in capsys.readouterr().err
