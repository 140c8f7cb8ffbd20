"""cudcn's paddle layers under paddle.DataParallel, on the CPU with gloo.

A small model with ``CoordConv2D``, ``DeformConv2D`` and
``ModulatedDeformConv2DPack`` trains for a few steps in 2 processes started
by ``paddle.distributed.spawn`` (backend gloo), each on half of a global
batch; the resulting parameters must equal those of one process training on
the whole batch (DataParallel averages the gradients; the loss is a mean).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

import paddle.distributed as dist  # noqa: E402
from paddle.nn import functional as F  # noqa: E402

import cudcn.paddle as cp  # noqa: E402
from training_processes import TARGETS, check_training, join_within, make_batches, share  # noqa: E402

pytestmark = [pytest.mark.paddle, pytest.mark.distributed]

WORLD_SIZE = 2
CHANNELS = 8
TIMEOUT = 240  # seconds: a hang fails instead of blocking


class SmallNet(paddle.nn.Layer):
    """CoordConv, a deformable convolution fed by a plain offset predictor, a
    modulated deformable convolution that predicts its own offsets and mask,
    and a linear head: (N, 3, H, W) -> (N, TARGETS)."""

    def __init__(self) -> None:
        super().__init__()
        self.coord = cp.CoordConv2D(3, CHANNELS, 3, padding=1)
        self.offset = paddle.nn.Conv2D(CHANNELS, 2 * 3 * 3, 3, padding=1)
        self.deform = cp.DeformConv2D(CHANNELS, CHANNELS, 3, padding=1)
        self.modulated = cp.ModulatedDeformConv2DPack(CHANNELS, CHANNELS, 3, padding=1)
        self.head = paddle.nn.Linear(CHANNELS, TARGETS)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x = F.relu(self.coord(x))
        x = F.relu(self.deform(x, self.offset(x)))
        x = F.relu(self.modulated(x))
        return self.head(x.mean((2, 3)))


def parameters(model: paddle.nn.Layer) -> dict[str, np.ndarray]:
    return {name: value.numpy().copy() for name, value in model.state_dict().items()}


def new_model(state: dict[str, np.ndarray]) -> SmallNet:
    model = SmallNet()
    model.set_state_dict({name: paddle.to_tensor(value) for name, value in state.items()})
    return model


def train(model: paddle.nn.Layer, trained: SmallNet, inputs: np.ndarray, targets: np.ndarray) -> None:
    """A step of SGD on the mean squared error (a mean over the batch) per batch."""
    optimizer = paddle.optimizer.SGD(learning_rate=0.5, parameters=trained.parameters())
    for x, y in zip(inputs, targets):
        F.mse_loss(model(paddle.to_tensor(x)), paddle.to_tensor(y)).backward()
        optimizer.step()
        optimizer.clear_grad()


def _train_rank(setup_path: str, out_dir: str) -> None:
    """One process: train on this rank's half of each batch under
    DataParallel and save the parameters to out_dir/rank{rank}.npz."""
    dist.init_parallel_env()
    try:
        rank = dist.get_rank()
        setup = np.load(setup_path)
        state = {name.removeprefix("state."): setup[name] for name in setup.files if name.startswith("state.")}
        model = new_model(state)
        part = share(rank, WORLD_SIZE)
        train(paddle.DataParallel(model), model, setup["inputs"][:, part], setup["targets"][:, part])
        np.savez(Path(out_dir) / f"rank{rank}.npz", **parameters(model))
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:Your model will be trained under CPUONLY mode:UserWarning")
def test_data_parallel_on_cpu_equals_one_process(tmp_path):
    paddle.seed(0)
    model = SmallNet()
    # The pack starts with zero offsets (integer sampling positions); a small
    # random start exercises the bilinear weights from the first step on.
    model.modulated.conv_offset.weight.set_value(
        paddle.normal(0.0, 0.01, model.modulated.conv_offset.weight.shape)
    )
    initial = parameters(model)
    inputs, targets = make_batches()
    setup_path = tmp_path / "setup.npz"
    np.savez(setup_path, inputs=inputs, targets=targets, **{f"state.{name}": value for name, value in initial.items()})

    context = dist.spawn(_train_rank, args=(str(setup_path), str(tmp_path)), nprocs=WORLD_SIZE,
                         join=False, backend="gloo")
    join_within(context, TIMEOUT, f"{WORLD_SIZE} gloo processes")
    ranks = [dict(np.load(tmp_path / f"rank{rank}.npz")) for rank in range(WORLD_SIZE)]

    train(model, model, inputs, targets)
    check_training(initial, parameters(model), ranks)


def test_gradients_are_contiguous():
    """DataParallel leaves a strided parameter gradient out of its
    all-reduce (each process would keep its own), so every gradient the
    layers give must be contiguous; the NumPy backend's weight gradient is a
    transposed view until the adapter copies it."""
    paddle.seed(0)
    layer = cp.ModulatedDeformConv2DPack(4, 6, 3, padding=1)
    x = paddle.randn([2, 4, 5, 5])
    x.stop_gradient = False
    layer(x).sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad.is_contiguous(), name
    assert x.grad.is_contiguous()
