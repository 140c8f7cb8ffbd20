"""Memory transactions counted by the emulator: what a kernel launch asks of memory.

``Library.launch(..., stats=True)`` (tests/emulation/harness.py) runs a launch
with the emulator's memory accounting on (tests/emulation/emulate.h describes
the model) and returns a :class:`LaunchStats`: for each access site (the line
of the access, and the kernel line that called the helper it is in), its
warp requests and

- global memory (loads, stores, atomics): the distinct 32-byte sectors and
  the distinct bytes the requests touch; ``ideal_sectors`` is the fewest
  sectors those bytes could fill (bytes / 32, rounded up per request);
- shared memory: the wavefronts the requests take by the bank rule (32
  banks of 4-byte words; ``ideal_wavefronts`` one per phase: a warp, a
  half-warp for 8-byte and a quarter-warp for 16-byte accesses) and
  ``worst``, the most wavefronts one phase of one request took: the
  conflict degree (1: conflict-free, 2: 2-way ...).

:func:`merge` sums the launches of an algorithm call per kernel, and
:func:`table` prints them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

#: The counters of a site, in the order the emulator writes them.
COUNTERS = ("requests", "lanes", "bytes", "sectors", "ideal_sectors", "wavefronts", "ideal_wavefronts", "worst")


@dataclass(frozen=True)
class SiteStats:
    """One access site's totals over a launch (or several)."""

    space: str  # "global" or "shared"
    op: str  # "load", "store" or "atomic"
    width: int  # bytes one lane moves per access (a part of a wider element)
    file: str
    line: int
    caller_file: str  # the kernel line that called the helper the access is in ("" for none)
    caller_line: int
    requests: int
    lanes: int  # lane accesses
    bytes: int  # distinct bytes, summed over requests
    sectors: int  # distinct 32-byte sectors, summed over requests (global)
    ideal_sectors: int  # ceil(distinct bytes / 32), summed over requests (global)
    wavefronts: int  # shared
    ideal_wavefronts: int  # shared: one per phase with an active lane
    worst: int  # most sectors of one request (global), or wavefronts of one phase (shared)

    @property
    def site(self) -> str:
        """file:line, after the calling kernel line when the access is in a helper."""
        here = f"{self.file}:{self.line}"
        return f"{self.caller_file}:{self.caller_line} > {here}" if self.caller_file else here

    @property
    def key(self) -> tuple:
        return (self.space, self.op, self.width, self.file, self.line, self.caller_file, self.caller_line)

    @property
    def sectors_per_request(self) -> float:
        return self.sectors / self.requests

    @property
    def ideal_per_request(self) -> float:
        return self.ideal_sectors / self.requests

    @property
    def excess(self) -> float:
        """Sectors over the ideal (1.0: every request as compact as its bytes allow)."""
        return self.sectors / self.ideal_sectors

    @property
    def wavefronts_per_request(self) -> float:
        return self.wavefronts / self.requests

    @property
    def conflict(self) -> float:
        """Wavefronts over the ideal: the mean conflict degree of its phases."""
        return self.wavefronts / self.ideal_wavefronts


@dataclass(frozen=True)
class LaunchStats:
    """The access sites of one kernel launch (or of several of one kernel, merged)."""

    kernel: str  # name expression
    sites: tuple[SiteStats, ...]

    @classmethod
    def parse(cls, kernel: str, text: str) -> LaunchStats:
        """From the emulator's report: a tab-separated line per site."""
        sites = []
        for line in text.splitlines():
            space, op, width, file, at, caller_file, caller_line, *counters = line.split("\t")
            values = dict(zip(COUNTERS, map(int, counters), strict=True))
            sites.append(SiteStats(space, op, int(width), file, int(at), caller_file, int(caller_line), **values))
        return cls(kernel, tuple(sites))

    def select(self, space: str | None = None, op: str | None = None, file: str | None = None) -> list[SiteStats]:
        """The sites of a space, an operation and (as access or as caller) a file."""
        return [s for s in self.sites
                if (space is None or s.space == space) and (op is None or s.op == op)
                and (file is None or file in (s.file, s.caller_file))]

    def total(self, space: str | None = None, op: str | None = None, file: str | None = None) -> SiteStats:
        """The selected sites summed into one (worst: the largest)."""
        chosen = self.select(space, op, file)
        if not chosen:
            raise LookupError(f"{self.kernel}: no {space or ''} {op or 'access'} sites{f' in {file}' if file else ''}")
        sums = {name: sum(getattr(s, name) for s in chosen) for name in COUNTERS if name != "worst"}
        return replace(chosen[0], file="(all)", line=0, caller_file="", caller_line=0,
                       worst=max(s.worst for s in chosen), **sums)


def merge(stats: Iterable[LaunchStats]) -> list[LaunchStats]:
    """Launches summed per kernel (name expression) and site, in order of first launch."""
    kernels: dict[str, dict[tuple, SiteStats]] = {}
    for launch in stats:
        sites = kernels.setdefault(launch.kernel, {})
        for s in launch.sites:
            old = sites.get(s.key)
            if old is None:
                sites[s.key] = s
            else:
                sums = {name: getattr(old, name) + getattr(s, name) for name in COUNTERS if name != "worst"}
                sites[s.key] = replace(old, worst=max(old.worst, s.worst), **sums)
    return [LaunchStats(kernel, tuple(sites.values())) for kernel, sites in kernels.items()]


#: Budgets (tests/test_memory_transactions.py holds them at channels >= 32):
#: sectors per warp request of col2im's atomics, per 4 bytes a lane adds
#: (32 lanes x 4 bytes fill 4 sectors; 32 x 8 bytes of float64, 8; sm_90's
#: vector atomics of 32 x 16 bytes, 16: each counts 4);
ATOMIC_SECTORS = 4.0
#: the sampling kernels' (im2col, col2im, col2im_coord) load sectors over the ideal;
LOAD_EXCESS = 1.5
#: shared-memory stores of the fused kernels: wavefronts per phase, at most
#: (a 2-way conflict);
STORE_CONFLICT = 2
#: MMA fragment loads from shared memory: conflict-free.
FRAGMENT_CONFLICT = 1
#: Where the fragment loads are (warp_tile_product; the fragment helpers).
FRAGMENT_FILES = ("dcn_fused_sampling.cuh", "dcn_mma.cuh")


def atomic_sectors(launch: LaunchStats) -> float:
    """Sectors per warp request of the launch's atomics, scaled to 4 bytes a
    lane: each site's sectors times 4 / its width (the bytes a lane adds at
    once), over all requests. For 4-byte atomics, plainly sectors per request."""
    sites = launch.select("global", "atomic")
    if not sites:
        raise LookupError(f"{launch.kernel}: no global atomic sites")
    return sum(s.sectors * 4 / s.width for s in sites) / sum(s.requests for s in sites)


def load_excess(launch: LaunchStats) -> float:
    """Sectors of all the launch's global loads over the ideal."""
    total = launch.total("global", "load")
    return total.sectors / total.ideal_sectors


def store_conflict(launch: LaunchStats) -> int:
    """The worst conflict degree of the launch's shared-memory stores."""
    return launch.total("shared", "store").worst


def fragment_conflict(launch: LaunchStats) -> int:
    """The worst conflict degree of the launch's fragment loads from shared memory."""
    return max(s.worst for s in launch.select("shared", "load") if s.file in FRAGMENT_FILES)


def account_call(library: Any, direction: str, args: dict, algorithm: str = "im2col", tf32: bool = True,
                 **engine_options: Any) -> list[LaunchStats]:
    """Every launch of one call ("forward" or "backward") of ``algorithm``
    ("im2col" or "fused") on emulated kernels, accounted and merged per
    kernel. args: the operator's arguments (input, offset, weight, mask,
    bias and geometry keywords); the backward's grad_output is all ones."""
    import cudcn
    from cudcn.backends.cuda import algorithms
    from cudcn.geometry import validate
    from emulation.harness import EmulatedEngine

    geom = validate(**args)
    engine = EmulatedEngine(library, stats=True, **engine_options)
    with cudcn.algorithm(algorithm), cudcn.tf32(tf32):
        if direction == "forward":
            algorithms.run("forward", engine, geom, *(args.get(k) for k in ("input", "offset", "weight", "bias", "mask")))
        else:
            grad_output = np.ones((geom.batch, geom.out_channels, geom.out_h, geom.out_w), geom.dtype)
            algorithms.run("backward", engine, geom, grad_output,
                           *(args.get(k) for k in ("input", "offset", "weight", "mask")))
    return merge(engine.stats)


def launches_of(stats: Iterable[LaunchStats], kernel: str) -> LaunchStats:
    """The merged launches of the kernel template ``kernel`` (one instantiation)."""
    found = [s for s in merge(stats) if s.kernel.split("<")[0] == kernel]
    if len(found) != 1:
        raise LookupError(f"{len(found)} instantiations of {kernel} in {[s.kernel for s in stats]}")
    return found[0]


HEADER = ("kernel", "site", "op", "B", "requests", "sectors/req", "ideal/req", "excess", "wavefronts/req", "worst")


def rows(stats: Iterable[LaunchStats]) -> list[tuple[str, ...]]:
    """One row per site: global sites with sectors, shared sites with wavefronts."""
    out = []
    for launch in stats:
        kernel = launch.kernel
        for s in sorted(launch.sites, key=lambda s: (s.space, s.caller_file, s.caller_line, s.file, s.line, s.op)):
            op = f"{'smem' if s.space == 'shared' else 'gmem'} {s.op}"
            if s.space == "global":
                numbers = (f"{s.sectors_per_request:.2f}", f"{s.ideal_per_request:.2f}", f"{s.excess:.2f}", "",
                           f"{s.worst} sectors")
            else:
                numbers = ("", "", "", f"{s.wavefronts_per_request:.2f}", f"{s.worst}-way")
            out.append((kernel, s.site, op, str(s.width), str(s.requests), *numbers))
    return out


def table(stats: Iterable[LaunchStats]) -> str:
    """A plain-text table of :func:`rows`, columns aligned."""
    lines = [HEADER, *rows(stats)]
    widths = [max(len(row[i]) for row in lines) for i in range(len(HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)

