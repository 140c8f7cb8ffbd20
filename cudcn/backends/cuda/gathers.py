"""What the gather kernel families share: multi-scale deformable attention
(:mod:`cudcn.backends.cuda.msda`) and DCNv3/DCNv4 (:mod:`cudcn.backends.cuda.dcnv3`).

Both give each *item* (a row of D channels of the output: an (image, query,
head) of MSDA, an (image, output pixel, group) of DCNv3) a group of lanes of
one warp, a power of two up to 32, and sample with the bilinear core of
kernels/sampling.cuh:

- forward: lanes over D in blocks of 16 bytes (:func:`forward_lanes`);
- backward: lanes over D one channel each, interleaved, as many as fill a
  32-byte sector with the narrower of the dtype and its float32 (float64)
  accumulator (:func:`backward_lanes`), so that a warp's loads and atomics
  touch whole sectors;
- the scattered gradient (MSDA's value gradient, DCNv3's input gradient) by
  atomics into a zero-filled float32 (float64) accumulator, converted to the
  dtype after (:func:`to_storage`, kernel ``accum_to_storage``); or, with
  deterministic algorithms, by a family's keys kernel (the element each
  bilinear corner lands on, and its weight), a stable argsort and a gather
  that sums each element's corners in that order (:func:`sorted_gather`,
  kernel ``sorted_gather`` of kernels/sorted_gather.cu), in chunks of
  (image, query or output pixel) pairs that fit the workspace budget
  (:func:`sorted_chunks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cudcn import config
from cudcn.backends.cuda import kernels
from cudcn.backends.cuda.engine import WARP, Engine, Launch, grid_stride
from cudcn.backends.cuda.launchers import SORTED_BYTES_PER_CORNER, index_type


def power_of_two_at_least(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def forward_lanes(dtype: np.dtype, channels: int) -> int:
    """Lanes per item in a forward: one 16-byte block of channels each
    (8 float16 or bfloat16, 4 float32, 2 float64) across D, a power of two
    up to 32 (beyond, each lane takes several blocks)."""
    per_lane = 16 // np.dtype(dtype).itemsize
    return min(WARP, power_of_two_at_least(-(-channels // per_lane)))


def backward_lanes(dtype: np.dtype, channels: int) -> int:
    """Lanes per item in a backward, one channel each (interleaved): as
    many as fill a 32-byte sector with the narrower of the dtype and its
    float32 (float64) accumulator -- 16 for float16 and bfloat16, 8 for
    float32, 4 for float64 -- and no more than D needs."""
    dtype = np.dtype(dtype)
    accum = np.dtype(kernels.TYPES[dtype.name].accum_dtype)
    sector_lanes = 32 // min(dtype.itemsize, accum.itemsize)
    return min(sector_lanes, power_of_two_at_least(channels))


def group_launch(engine: Engine, kernel: str, items: int, lanes: int) -> Launch:
    """A grid-stride launch of whole warps for ``items`` items of ``lanes`` lanes each."""
    return grid_stride(engine, kernel, -(-items * lanes // WARP) * WARP)


def to_storage(engine: Engine, accum: Any, dtype: np.dtype) -> Any:
    """The accumulator in ``dtype``: itself where it has that dtype (float32,
    float64), else a new array rounded by ``accum_to_storage``."""
    if accum.dtype == dtype or accum.size == 0:
        return accum.astype(dtype, copy=False)
    out = engine.xp.empty(accum.shape, dtype)
    index, itype = index_type(engine, accum.size)
    engine.launch("accum_to_storage", np.dtype(dtype).name, index,
                  grid_stride(engine, "accum_to_storage", accum.size), [accum, itype(accum.size), out])
    return out


#: Bytes per key beside the corners: its int64 run start and the key searched for.
BYTES_PER_KEY = 16


def sorted_chunks(pairs: int, pairs_per_image: int, bytes_per_pair: int, keys_per_image: int) -> list[slice]:
    """Slices of the flattened (image, query or output pixel) pairs for a
    sorted gradient, each within the workspace budget (:mod:`cudcn.config`)
    with its corners (``bytes_per_pair`` each pair, at most
    :data:`SORTED_BYTES_PER_CORNER` a corner) and its keys' run starts and
    searched keys (:data:`BYTES_PER_KEY` each, ``keys_per_image`` for every
    image the chunk touches: p pairs touch at most p / pairs_per_image + 2
    images). At least one pair per chunk."""
    keys_bytes = BYTES_PER_KEY * keys_per_image
    room = config.get_workspace_bytes() - 2 * keys_bytes
    fit = room * pairs_per_image // (bytes_per_pair * pairs_per_image + keys_bytes)
    step = max(1, min(pairs, fit))
    return [slice(s, min(s + step, pairs)) for s in range(0, pairs, step)]


def sorted_gather(engine: Engine, dtype: np.dtype, keys: Any, key_weights: Any, key_count: int, rows: Any,
                  first_row: int, channels: int, entries_per_row: int, target: Any) -> None:
    """target (key_count, D) += each key's entries, in one fixed order.

    keys and key_weights: one per entry (a bilinear corner) from a family's
    keys kernel, ``entries_per_row`` consecutive entries for each row of
    ``rows`` from ``first_row`` on; a key equal to ``key_count`` (the
    sentinel) counts 0. A stable argsort keeps the entries of one key in
    entry order, searchsorted finds each key's run, and ``sorted_gather``
    adds each run in that order, a thread per (key, channel). The arrays made
    here go when it returns.
    """
    xp = engine.xp
    order = xp.argsort(keys, kind="stable")
    starts = xp.searchsorted(keys[order], xp.arange(key_count + 1, dtype=keys.dtype), side="left")
    total = key_count * channels
    index, itype = index_type(engine, total, keys.size, rows.size)
    engine.launch(
        "sorted_gather", np.dtype(dtype).name, index, grid_stride(engine, "sorted_gather", total),
        [rows, order.astype(np.int64, copy=False), starts.astype(np.int64, copy=False), key_weights,
         itype(first_row), np.int32(channels), np.int64(entries_per_row), itype(total), target],
    )
