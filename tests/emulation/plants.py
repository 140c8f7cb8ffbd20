"""Planted bugs and regressions: changed copies of a kernel family, built for the emulator.

A *plant* is a name and an edit ``(file, text, replacement)`` of one kernel
file or of ``sampling.cuh`` (or None: the kernels as they are). :func:`build`
compiles every plant's copy of a family's sources (the family's file, then
the files it shares, such as sorted_gather.cu) in a namespace of its own:
the plants of the family's file share one library (the common headers
first, then each copy; one g++ run for all), a plant of sampling.cuh gets
its own folder, where its copy shadows kernels/sampling.cuh.
:class:`PlantedEngine` runs the CUDA backend's launchers on one plant's
kernels. The tests of a family then check that each planted bug fails its
comparison with NumPy and each planted regression breaks its budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from cudcn.backends.cuda import kernels as cuda_kernels
from emulation import harness


class Planted(NamedTuple):
    """One plant's kernels: its library and namespace, and where its copy of
    the family's file begins (``offset`` lines into ``file``), so that the
    memory accounting's sites can be mapped back to the family's lines."""

    library: harness.Library
    namespace: str
    file: str
    offset: int


def namespace(plant: str) -> str:
    """The C++ namespace of a plant's copy."""
    return "plant_" + "".join(ch if ch.isalnum() else "_" for ch in plant)


def build(folder: Path, sources: Sequence[str], plants: Mapping[str, tuple[str, str, str] | None],
          names: Callable[[str], list[str]]) -> dict[str, Planted]:
    """plant name -> :class:`Planted`, each plant's copy of ``sources``
    (kernel files, the family's first; their lines follow one another, so
    line offsets stay the first file's) compiled in ``folder``; ``names(ns)``
    gives the instantiations to build in namespace ns."""
    family = sources[0]
    stem = Path(family).stem
    original = "\n".join((cuda_kernels.kernel_dir() / name).read_text() for name in sources)
    parts = ['#include "dcn_common.cuh"\n#include "sampling.cuh"\n']
    built, shared_names, offsets = {}, [], {}
    for plant, edit in plants.items():
        space = namespace(plant)
        if edit is not None and edit[0] == "sampling.cuh":
            own = folder / space
            own.mkdir()
            text = (cuda_kernels.kernel_dir() / "sampling.cuh").read_text()
            assert text.count(edit[1]) == 1, edit[1]
            (own / "sampling.cuh").write_text(text.replace(edit[1], edit[2]))
            (own / family).write_text(f"namespace {space} {{\n{original}\n}}\n")
            built[plant] = Planted(harness.build(names(space), [own / family]), space, family, 1)
            continue
        text = original
        if edit is not None:
            assert edit[0] == family and text.count(edit[1]) == 1, edit[1]
            text = text.replace(edit[1], edit[2])
        offsets[plant] = "".join(parts).count("\n") + 1
        parts.append(f"namespace {space} {{\n{text}\n}}  // namespace {space}\n")
        shared_names += names(space)
    (folder / f"{stem}_plants.cu").write_text("".join(parts))
    shared = harness.build(shared_names, [folder / f"{stem}_plants.cu"])
    for plant, offset in offsets.items():
        built[plant] = Planted(shared, namespace(plant), f"{stem}_plants.cu", offset)
    return built


class PlantedEngine(harness.EmulatedEngine):
    """An emulated engine that launches the kernels of one plant's namespace."""

    def __init__(self, planted: Planted, **options) -> None:
        super().__init__(planted.library, **options)
        self.namespace = planted.namespace

    def launch(self, kernel, dtype, index, launch, args) -> None:
        name = f"{self.namespace}::{cuda_kernels.name_expression(kernel, dtype, index)}"
        stats = self.library.launch(name, launch, args, misalign=self.misalign, stats=self.account)
        if stats is not None:  # named without the namespace, as transactions.launches_of looks them up
            self.stats.append(dataclasses.replace(stats, kernel=stats.kernel.split("::", 1)[1]))
        self.launches.append((name, launch))
        self.arguments.append(args)
