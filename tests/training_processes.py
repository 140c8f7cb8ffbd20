"""What the tests that train across processes share: waiting for the
processes with a deadline, and comparing their parameters with one process's.

Parameters are compared as NumPy arrays (name -> array), so that the torch
and the paddle tests check the same things in the same words.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

Parameters = dict[str, np.ndarray]

# The problem each test trains: STEPS steps on global batches of GLOBAL_BATCH
# images (3, IMAGE_SIZE, IMAGE_SIZE) with targets of TARGETS values, shared out
# among the processes.
STEPS = 3
GLOBAL_BATCH = 4
IMAGE_SIZE = 6
TARGETS = 4
# Parameters after training, processes against one process: the gradients
# are the same sums taken in another order (each process sums its share, then
# the all-reduce adds the shares; and BLAS blocks a share differently from a
# whole batch), so they differ by a few float32 roundings (eps = 1.2e-7)
# relative to the gradients' sizes: at most 1.5e-8 (torch) and 4.5e-8 (paddle)
# seen on the CPU. The tolerance leaves room for more steps of that and for
# other BLAS libraries.
RTOL, ATOL = 1e-5, 1e-6


def make_batches() -> tuple[np.ndarray, np.ndarray]:
    """inputs (STEPS, GLOBAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE) and targets
    (STEPS, GLOBAL_BATCH, TARGETS), float32, the same on every call."""
    generator = np.random.default_rng(1)
    inputs = generator.standard_normal((STEPS, GLOBAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    targets = generator.standard_normal((STEPS, GLOBAL_BATCH, TARGETS), dtype=np.float32)
    return inputs, targets


def share(rank: int, world_size: int) -> slice:
    """The part of a global batch that process ``rank`` trains on."""
    return slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)


def join_within(context: Any, seconds: float, what: str) -> None:
    """Wait for the processes of a spawn context (torch's or paddle's: both
    have ``join(timeout)`` and ``processes``) at most ``seconds``; fail the
    test when they take longer, and kill any process still running.

    ``join`` raises, with the failed process's traceback, when one fails.
    """
    deadline = time.monotonic() + seconds
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() >= deadline:
                pytest.fail(f"{what} did not finish within {seconds} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()


def check_training(initial: Parameters, single: Parameters, ranks: list[Parameters]) -> None:
    """Every rank holds the same parameters, equal to those one process
    trained on the whole batches (``single``) to RTOL/ATOL; and training
    moved every parameter by more than a hundred times ATOL, so that the
    comparison could fail."""
    assert list(single) == list(initial)
    for rank, trained in enumerate(ranks):
        assert list(trained) == list(single), f"rank {rank}"
    for name in single:
        for rank, trained in enumerate(ranks[1:], 1):
            # Every rank applies the same averaged gradients.
            np.testing.assert_array_equal(trained[name], ranks[0][name], err_msg=f"{name}: rank {rank} against rank 0")
        np.testing.assert_allclose(ranks[0][name], single[name], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{name}: processes against one process")
        change = np.abs(single[name] - initial[name]).max()
        assert change > 100 * ATOL, f"{name} moved only {change:.2e} in training"
