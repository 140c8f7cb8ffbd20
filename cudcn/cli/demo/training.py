"""Training and evaluation: the same budget for every model.

Each run seeds torch (weights and the order of the batches) with its seed;
the data are the same for every run. Adam, cross-entropy over ten classes,
a fixed number of epochs. The accuracy on the strongly deformed test set is
measured after every epoch (the learning curve), the one on the mildly
deformed test set after the last; the time per epoch counts training steps
only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from cudcn.cli.arguments import CommandError
from cudcn.cli.demo.data import Digits
from cudcn.cli.demo.models import count_parameters, make_model


@dataclass
class RunResult:
    """One model trained with one seed; lists have one entry per epoch."""

    model_name: str
    seed: int
    parameters: int
    train_loss: list[float] = field(default_factory=list)  # mean over the epoch's batches
    test_strong_accuracy: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # training steps only
    test_mild_accuracy: float = float("nan")  # after the last epoch


def pick_device(requested: str) -> Any:
    """torch.device for "auto" (CUDA when torch sees one, else CPU), "cpu" or "cuda"."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu")
    return torch.device(requested)


def to_tensors(digits: Digits, device: Any) -> tuple[Any, Any]:
    import torch

    return torch.from_numpy(digits.images).to(device), torch.from_numpy(digits.labels).to(device)


def accuracy(model: Any, images: Any, labels: Any, batch_size: int = 500) -> float:
    """Fraction of images classified correctly."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            scores = model(images[start:start + batch_size])
            correct += int((scores.argmax(dim=1) == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def train_step(model: Any, optimizer: Any, images: Any, labels: Any) -> float:
    """One optimisation step; returns the batch's cross-entropy."""
    import torch.nn.functional as F

    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.detach().item()


def train(
    model_name: str,
    seed: int,
    data: dict[str, Digits],
    epochs: int,
    device: Any,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    progress: Any = None,
) -> tuple[RunResult, Any]:
    """Train one model from scratch; returns its result and the trained model.

    progress, when given, is a tqdm bar advanced once per batch.
    """
    import torch

    torch.manual_seed(seed)
    model = make_model(model_name).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    batch_order = torch.Generator().manual_seed(seed)
    train_images, train_labels = to_tensors(data["train"], device)
    mild = to_tensors(data["test_mild"], device)
    strong = to_tensors(data["test_strong"], device)
    result = RunResult(model_name, seed, count_parameters(model))

    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(train_labels), generator=batch_order).to(device)
        losses = []
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            losses.append(train_step(model, optimizer, train_images[batch], train_labels[batch]))
            if progress is not None:
                progress.update(1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result.epoch_seconds.append(time.perf_counter() - start)
        result.train_loss.append(sum(losses) / len(losses))
        result.test_strong_accuracy.append(accuracy(model, *strong))
        if progress is not None:
            progress.set_postfix(loss=f"{result.train_loss[-1]:.3f}",
                                 strong=f"{result.test_strong_accuracy[-1]:.3f}")
    result.test_mild_accuracy = accuracy(model, *mild)
    return result, model
