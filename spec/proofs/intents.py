"""The intent rule (protocol rules 1 and 3): after any crash, every region recovery must look at is listed.

The workload mirrors `lamina.impl.image`: a guest write first makes its
regions part of the durable root's intent list (`_ensure_intents`, which
also drops regions flushed since), then writes data; a flush is
`commit_maps` (fsync, first map copies, fsync, second copies); close empties
the intent list with one more root write.  Every root write is
`write_root`: fsync if anything is unsynced, first slot, fsync, second slot.

A region is *unsettled* after a crash when its two map copies are not the
same valid version, or when its data is torn or differs from the data
version the current map copy checksummed.  Claim: a root copy verifies, and
every unsettled region is in the recovered root's intent list, so recovery,
which looks only at listed regions, misses nothing.
"""
from __future__ import annotations

from typing import Literal

import attrs
import z3

from .commit import recover
from .core import Outcome, as_bool, as_int, prove
from .disk import Copy, Fsync, Op, SymbolicDisk, Write

Variant = Literal["spec", "data_before_intent", "no_barrier_before_root"]
REGIONS = (0, 1)
Workload = tuple[tuple[str, tuple[int, ...]], ...]
# (operation, regions): small enough to stay fast, rich enough that a root
# write drops a flushed region while adding another, that one flush commits
# two regions' maps together, and that a region is rewritten while listed.
WORKLOADS: tuple[Workload, ...] = (
    (("write", (0,)), ("flush", ()), ("write", (1,)), ("write", (0,)), ("flush", ()), ("close", ())),
    (("write", (0, 1)), ("write", (1,)), ("flush", ()), ("write", (1,)), ("flush", ()), ("write", (0,)),
     ("close", ())),
)


@attrs.define
class _Writer:
    """The writer's in-memory state while the workload is compiled into a trace."""

    variant: Variant
    trace: list[Op] = attrs.Factory(list)
    unsynced: bool = False
    root_best: int = 0
    root_versions: list[frozenset[int]] = attrs.Factory(lambda: [frozenset()])
    map_best: dict[int, int] = attrs.Factory(lambda: {r: 0 for r in REGIONS})
    map_versions: dict[int, list[int]] = attrs.Factory(lambda: {r: [0] for r in REGIONS})  # data version per map version
    data_version: dict[int, int] = attrs.Factory(lambda: {r: 0 for r in REGIONS})
    dirty: set[int] = attrs.Factory(set)

    def write_root(self, intents: frozenset[int]) -> None:
        if self.unsynced and self.variant != "no_barrier_before_root":
            self.trace.append(Fsync("fsync (before a root write)"))
        self.root_versions.append(intents)
        v = len(self.root_versions) - 1
        copy = Copy.of(1 + v, v)
        label = f"root v{v} intents={sorted(intents)}"
        first = 1 - self.root_best
        self.trace += [Write(f"root.{first}", copy, label), Fsync("fsync (first root copy durable)"),
                       Write(f"root.{self.root_best}", copy, label)]
        self.root_best = first
        self.unsynced = True

    def guest_write(self, regions: tuple[int, ...]) -> None:
        if self.variant == "data_before_intent":
            self.write_data(regions)
            self.ensure_intents(regions)
        else:
            self.ensure_intents(regions)
            self.write_data(regions)

    def ensure_intents(self, regions: tuple[int, ...]) -> None:
        current = self.root_versions[-1]
        if set(regions) - current:
            self.write_root(frozenset(self.dirty | set(regions)))

    def write_data(self, regions: tuple[int, ...]) -> None:
        for r in regions:
            self.data_version[r] += 1
            self.trace.append(Write(f"data.{r}", Copy.of(0, self.data_version[r]), f"data v{self.data_version[r]}"))
            self.dirty.add(r)
        self.unsynced = True

    def flush(self) -> None:
        self.trace.append(Fsync("fsync (flush: data durable)"))
        self.unsynced = False
        if not self.dirty:
            return
        regions = sorted(self.dirty)
        for r in regions:
            self.map_versions[r].append(self.data_version[r])
        for r in regions:
            self.trace.append(self._map_write(r, 1 - self.map_best[r]))
        self.trace.append(Fsync("fsync (first map copies durable)"))
        for r in regions:
            self.trace.append(self._map_write(r, self.map_best[r]))
            self.map_best[r] = 1 - self.map_best[r]
        self.unsynced = True
        self.dirty.clear()

    def _map_write(self, region: int, slot: int) -> Write:
        v = len(self.map_versions[region]) - 1
        return Write(f"map{region}.{slot}", Copy.of(1 + v, v),
                     f"map v{v} (checksums data v{self.map_versions[region][v]})")

    def close(self) -> None:
        self.flush()
        if self.root_versions[-1]:
            self.write_root(frozenset())
        if self.unsynced:
            self.trace.append(Fsync("fsync (close)"))


def compile_workload(variant: Variant, workload: Workload) -> _Writer:
    writer = _Writer(variant)
    for op, regions in workload:
        if op == "write":
            writer.guest_write(regions)
        elif op == "flush":
            writer.flush()
        else:
            writer.close()
    return writer


def check_intents_cover_unsettled_regions(variant: Variant = "spec") -> Outcome:
    """After any crash, every region whose maps or data may be inconsistent is in the durable root's intents."""
    seconds = 0.0
    for workload in WORKLOADS:
        outcome = _check_workload(variant, workload)
        seconds += outcome.seconds
        if outcome.status == "refuted":
            return attrs.evolve(outcome, seconds=seconds)
    return Outcome("proved", seconds)


def _check_workload(variant: Variant, workload: Workload) -> Outcome:
    writer = compile_workload(variant, workload)
    initial = {"root.0": Copy.of(1, 0), "root.1": Copy.of(1, 0)}
    for r in REGIONS:
        initial |= {f"map{r}.0": Copy.of(1, 0), f"map{r}.1": Copy.of(1, 0), f"data.{r}": Copy.of(0, 0)}
    disk = SymbolicDisk(writer.trace, initial)
    root = recover(disk.final("root.0"), disk.final("root.1"))
    unsettled: dict[int, z3.BoolRef] = {}
    listed: dict[int, z3.BoolRef] = {}
    for r in REGIONS:
        a, b, data = disk.final(f"map{r}.0"), disk.final(f"map{r}.1"), disk.final(f"data.{r}")
        current = recover(a, b)
        checksummed = z3.Or(*[z3.And(current.content == v, data.content == d)
                              for v, d in enumerate(writer.map_versions[r])])
        same_maps = z3.And(a.valid, b.valid, a.generation == b.generation, a.content == b.content)
        unsettled[r] = z3.Not(z3.And(same_maps, data.valid, checksummed))
        listed[r] = z3.Or(*[root.content == v for v, intents in enumerate(writer.root_versions) if r in intents])
    claim = z3.And(root.found, *[z3.Implies(unsettled[r], listed[r]) for r in REGIONS])

    def name_copy(model: z3.ModelRef, copy: Copy) -> str:
        if not as_bool(model, copy.valid):
            return "invalid"
        return f"v{as_int(model, copy.content)}"

    def render(model: z3.ModelRef) -> str:
        lines = [f"protocol variant: {variant}; workload: " +
                 ", ".join(f"{op}{list(rs) if rs else ''}" for op, rs in workload)]
        lines += disk.render(model, name_copy)
        v = as_int(model, root.content)
        lines.append(f"  recovery: root v{v} (intents {sorted(writer.root_versions[v])})")
        for r in REGIONS:
            maps = f"map copies {name_copy(model, disk.final(f'map{r}.0'))}/{name_copy(model, disk.final(f'map{r}.1'))}"
            state = "UNSETTLED" if as_bool(model, unsettled[r]) else "settled"
            mark = "listed" if as_bool(model, listed[r]) else "NOT LISTED"
            lines.append(f"  region {r}: {maps}, data {name_copy(model, disk.final(f'data.{r}'))}: {state}, {mark}")
        return "\n".join(lines)

    return prove(disk.constraints, claim, render)
