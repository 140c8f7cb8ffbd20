"""cudcn's torch modules under DistributedDataParallel, eager and compiled.

A small model with ``CoordConv2d``, ``DeformConv2d`` and
``ModulatedDeformConv2dPack`` trains for a few steps in separate processes
(spawned by torch.multiprocessing), each on its share of a global batch; the
resulting parameters must equal those of one process training on the whole
batch. DDP averages the gradients over the processes and the loss is a mean
over each process's share, so both runs take the same steps, up to the order
in which float32 sums are taken.

The CPU run uses gloo with 2 processes; the GPU run (marked ``gpu``) uses
NCCL with one GPU per process (a world of 1 on a machine with one GPU).
Each process trains three variants in turn, so that the processes start
once: eager DDP; ``torch.compile(DDP(model))``, the order torch recommends
(DDP first, so that dynamo's DDPOptimizer splits the graph at the gradient
buckets); and ``DDP(torch.compile(model, fullgraph=True))``, which proves the
model compiles into graphs without a break. ``fullgraph=True`` cannot be
asked of the compiled DDP wrapper: DDP's own forward calls its C++ logger
and reducer, which dynamo cannot trace (a graph break in DDP, not in cudcn).
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import cudcn.torch as ct  # noqa: E402
from training_processes import TARGETS, check_training, join_within, make_batches, share  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.distributed]

# Wide enough that each deformable layer's weight (176·176·3·3 float32 values)
# exceeds 1 MiB, the smallest bucket DDPOptimizer accepts (DDP's first bucket
# is 1 MiB): with bucket_cap_mb=1 the buckets, and so the compiled graph's
# pieces, fall between the layers.
CHANNELS = 176
BUCKET_CAP_MB = 1
VARIANTS = ["eager", "compiled_ddp", "ddp_of_fullgraph"]
COMPILED = VARIANTS[1:]
# A run's wall-clock limit (seconds): a hang fails instead of blocking.
TIMEOUT = {"gloo": 240, "nccl": 420}


class SmallNet(nn.Module):
    """CoordConv, a deformable convolution fed by a plain offset predictor, a
    modulated deformable convolution that predicts its own offsets and mask,
    and a linear head: (N, 3, H, W) -> (N, TARGETS)."""

    def __init__(self, channels: int = CHANNELS) -> None:
        super().__init__()
        self.coord = ct.CoordConv2d(3, channels, 3, padding=1)
        self.offset = nn.Conv2d(channels, 2 * 3 * 3, 3, padding=1)
        self.deform = ct.DeformConv2d(channels, channels, 3, padding=1)
        self.modulated = ct.ModulatedDeformConv2dPack(channels, channels, 3, padding=1)
        self.head = nn.Linear(channels, TARGETS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.coord(x))
        x = F.relu(self.deform(x, self.offset(x)))
        x = F.relu(self.modulated(x))
        return self.head(x.mean((2, 3)))


def make_setup(path: Path) -> dict:
    """Initial parameters and the global batches of every step, saved to ``path``."""
    torch.manual_seed(0)
    model = SmallNet()
    # The pack starts with zero offsets (integer sampling positions); a small
    # random start exercises the bilinear weights from the first step on.
    nn.init.normal_(model.modulated.conv_offset.weight, std=0.01)
    inputs, targets = make_batches()
    setup = {"state": model.state_dict(), "inputs": torch.from_numpy(inputs), "targets": torch.from_numpy(targets)}
    torch.save(setup, path)
    return setup


def train(model: nn.Module, parameters, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """A step of SGD on the mean squared error (a mean over the batch) per batch."""
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    for x, y in zip(inputs, targets):
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


def graph_recorder(graphs: list[list[str]]):
    """A torch.compile backend (AOT autograd, graphs run as traced) that
    records the ops of every forward and backward graph it is given."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"])
        return make_boxed_func(graph_module.forward)

    return aot_autograd(fw_compiler=compiler)


def _train_rank(rank: int, world_size: int, backend: str, port: int, setup_path: str, out_dir: str) -> None:
    """One process: train every variant on this rank's share of each batch and
    save the parameters and the compiled graphs' ops to out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)  # the processes share the machine's cores
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        setup = torch.load(setup_path)
        part = share(rank, world_size)
        inputs = setup["inputs"][:, part].to(device)
        targets = setup["targets"][:, part].to(device)
        results = {}
        for variant in VARIANTS:
            torch.compiler.reset()
            model = SmallNet().to(device)
            model.load_state_dict(setup["state"])
            graphs: list[list[str]] = []
            if variant == "ddp_of_fullgraph":
                inner = torch.compile(model, fullgraph=True, backend=graph_recorder(graphs))
            else:
                inner = model
            wrapped = DistributedDataParallel(inner, bucket_cap_mb=BUCKET_CAP_MB)
            if variant == "compiled_ddp":
                wrapped = torch.compile(wrapped, backend=graph_recorder(graphs))
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                train(wrapped, model.parameters(), inputs, targets)
            state = {name: value.detach().cpu() for name, value in model.state_dict().items()}
            results[variant] = {"state": state, "graphs": graphs}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port nobody listens on now (the system picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(world_size: int, backend: str, setup_path: Path, out_dir: Path) -> list[dict]:
    """Run world_size processes of :func:`_train_rank` (at most
    TIMEOUT[backend] seconds) and return each rank's results."""
    args = (world_size, backend, free_port(), str(setup_path), str(out_dir))
    context = mp.start_processes(_train_rank, args=args, nprocs=world_size, join=False, start_method="spawn")
    join_within(context, TIMEOUT[backend], f"{world_size} {backend} processes")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


def run(tmp_path: Path, backend: str, device: str, world_size: int) -> tuple[dict, dict, list[dict]]:
    """(initial parameters, parameters trained by one process on the whole
    batches, each rank's results)."""
    setup = make_setup(tmp_path / "setup.pt")
    ranks = run_processes(world_size, backend, tmp_path / "setup.pt", tmp_path)
    model = SmallNet().to(device)
    model.load_state_dict(setup["state"])
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        train(model, model.parameters(), setup["inputs"].to(device), setup["targets"].to(device))
    single = {name: value.detach().cpu() for name, value in model.state_dict().items()}
    return setup["state"], single, ranks


def as_arrays(state: dict) -> dict:
    return {name: value.numpy() for name, value in state.items()}


def check_variant(initial: dict, single: dict, ranks: list[dict], variant: str) -> None:
    check_training(as_arrays(initial), as_arrays(single), [as_arrays(r[variant]["state"]) for r in ranks])


def check_graphs(ranks: list[dict], variant: str) -> None:
    """The compiled variant captured both cudcn layers' op and its backward,
    and DDPOptimizer split the model into more than one graph."""
    for results in ranks:
        graphs = results[variant]["graphs"]
        ops = [op for graph in graphs for op in graph]
        assert ops.count("cudcn.deform_conv2d.default") == 2, ops
        assert ops.count("cudcn.deform_conv2d_backward.default") == 2, ops
        # Each piece has a forward and a backward graph.
        assert len(graphs) >= 4, f"expected DDPOptimizer to split the graph, got {len(graphs)} graphs"


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory):
    return run(tmp_path_factory.mktemp("gloo"), "gloo", "cpu", world_size=2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_on_cpu_equals_one_process(gloo_runs, variant):
    check_variant(*gloo_runs, variant)


@pytest.mark.parametrize("variant", COMPILED)
def test_compiled_ddp_on_cpu_captures_cudcn_ops(gloo_runs, variant):
    check_graphs(gloo_runs[2], variant)


@pytest.fixture(scope="module")
def nccl_runs(tmp_path_factory):
    world_size = min(2, torch.cuda.device_count())
    return run(tmp_path_factory.mktemp("nccl"), "nccl", "cuda", world_size=world_size)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_with_nccl_equals_one_process(nccl_runs, variant):
    check_variant(*nccl_runs, variant)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", COMPILED)
def test_compiled_ddp_with_nccl_captures_cudcn_ops(nccl_runs, variant):
    check_graphs(nccl_runs[2], variant)
