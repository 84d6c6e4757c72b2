"""The intent rule (protocol rules 1 and 3) and deferred checksums (F-PROTO-005): what a crash leaves is listed.

The workload mirrors `lamina.impl.image`.  A guest write first makes its
regions part of the durable root's intent list (`_ensure_intents`: one root
write adding the regions not listed yet; listed regions stay listed), then
writes data.  A write either changes a region's presence ("write": fresh
sectors) or not ("overwrite": present sectors).  A flush is an fsync of the
data, then `commit_maps` (first map copies, fsync, second copies) for the
regions whose presence changed only: an overwrite-only region keeps its
durable map, whose checksums are then older than its data (deferred).  An
eviction ("evict", as on overflow or after `SETTLE_INTERVAL` idle flushes)
commits the deferred maps of the regions it drops, then writes a root
without them; close does the same for every listed region.  Every root
write is `write_root`: fsync if anything is unsynced, first slot, fsync,
second slot.

A region is *unsettled* after a crash when its two map copies are not the
same valid version, or when its data is torn or differs from the data
version the current map copy checksummed.  Claim P-INTENT-001: a root copy
verifies, and every unsettled region is in the recovered root's intent
list, so recovery, which looks only at listed regions, misses nothing.
Claim P-INTENT-002: after a crash at any point after a flush (or close)
returned, every region's current map records at least the presence that
flush acknowledged, and its data is at least the version it made durable
(or torn by a later, unflushed write): every flushed write is present.
"""
from __future__ import annotations

from typing import Literal

import attrs
import z3

from .commit import recover
from .core import Outcome, as_bool, as_int, prove
from .disk import Copy, Fsync, Op, SymbolicDisk, Write

Variant = Literal["spec", "data_before_intent", "no_barrier_before_root", "evict_uncommitted", "defer_fresh_map"]
REGIONS = (0, 1)
Workload = tuple[tuple[str, tuple[int, ...]], ...]
# (operation, regions): small enough to stay fast, rich enough that a region is overwritten across flushes with
# no map write, that one flush commits a fresh region's map while another region's stays deferred, that an
# eviction commits a deferred map and drops its region while the other stays listed, that an evicted region
# is listed again, and that close settles a region whose map is both fresh and deferred.
WORKLOADS: tuple[Workload, ...] = (
    (("write", (0,)), ("flush", ()), ("overwrite", (0,)), ("flush", ()), ("write", (1,)), ("overwrite", (0,)),
     ("flush", ()), ("evict", (0,)), ("close", ())),
    (("write", (0, 1)), ("overwrite", (1,)), ("flush", ()), ("overwrite", (1,)), ("flush", ()), ("evict", (1,)),
     ("write", (1,)), ("overwrite", (0,)), ("close", ())),
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
    # per map version: (the data version it checksums, the presence version it records)
    map_versions: dict[int, list[tuple[int, int]]] = attrs.Factory(lambda: {r: [(0, 0)] for r in REGIONS})
    data_version: dict[int, int] = attrs.Factory(lambda: {r: 0 for r in REGIONS})
    presence: dict[int, int] = attrs.Factory(lambda: {r: 0 for r in REGIONS})  # presence-changing writes so far
    fresh: set[int] = attrs.Factory(set)  # presence changed since the region's last map commit
    deferred: set[int] = attrs.Factory(set)  # the durable map's checksums are older than the data
    # (trace length when a flush or close returned, data version and presence per region it made durable)
    acknowledged: list[tuple[int, dict[int, int], dict[int, int]]] = attrs.Factory(list)

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

    def guest_write(self, regions: tuple[int, ...], fresh: bool) -> None:
        if self.variant == "data_before_intent":
            self.write_data(regions, fresh)
            self.ensure_intents(regions)
        else:
            self.ensure_intents(regions)
            self.write_data(regions, fresh)

    def ensure_intents(self, regions: tuple[int, ...]) -> None:
        current = self.root_versions[-1]
        if set(regions) - current:
            self.write_root(current | frozenset(regions))

    def write_data(self, regions: tuple[int, ...], fresh: bool) -> None:
        for r in regions:
            self.data_version[r] += 1
            self.trace.append(Write(f"data.{r}", Copy.of(0, self.data_version[r]), f"data v{self.data_version[r]}"))
            self.deferred.add(r)
            if fresh:
                self.presence[r] += 1
                self.fresh.add(r)
        self.unsynced = True

    def commit_maps(self, regions: list[int]) -> None:
        """`commit_maps`: fsync (the data), first copies, fsync, second copies (left unsynced)."""
        self.trace.append(Fsync("fsync (data durable)"))
        self.unsynced = False
        if not regions:
            return
        for r in regions:
            self.map_versions[r].append((self.data_version[r], self.presence[r]))
        for r in regions:
            self.trace.append(self._map_write(r, 1 - self.map_best[r]))
        self.trace.append(Fsync("fsync (first map copies durable)"))
        for r in regions:
            self.trace.append(self._map_write(r, self.map_best[r]))
            self.map_best[r] = 1 - self.map_best[r]
        self.unsynced = True
        self.fresh -= set(regions)
        self.deferred -= set(regions)

    def flush(self) -> None:
        fresh = [] if self.variant == "defer_fresh_map" else sorted(self.fresh)
        if fresh:
            self.commit_maps(fresh)
        elif self.unsynced:
            self.trace.append(Fsync("fsync (flush: data durable, maps deferred)"))
            self.unsynced = False
        self.acknowledge()

    def acknowledge(self) -> None:
        self.acknowledged.append((len(self.trace), dict(self.data_version), dict(self.presence)))

    def evict(self, regions: tuple[int, ...]) -> None:
        """Drop regions from the intent list: their deferred maps first (rule 1), then one root write (rule 3)."""
        settle = [] if self.variant == "evict_uncommitted" else sorted(set(regions) & (self.deferred | self.fresh))
        if settle:
            self.commit_maps(settle)
        self.write_root(self.root_versions[-1] - frozenset(regions))

    def _map_write(self, region: int, slot: int) -> Write:
        v = len(self.map_versions[region]) - 1
        data, presence = self.map_versions[region][v]
        return Write(f"map{region}.{slot}", Copy.of(1 + v, v),
                     f"map v{v} (checksums data v{data}, presence p{presence})")

    def close(self) -> None:
        if self.root_versions[-1]:
            self.evict(tuple(sorted(self.root_versions[-1])))
        else:
            self.flush()
        if self.unsynced:
            self.trace.append(Fsync("fsync (close)"))
            self.unsynced = False
        self.acknowledge()


def compile_workload(variant: Variant, workload: Workload) -> _Writer:
    writer = _Writer(variant)
    for op, regions in workload:
        if op in ("write", "overwrite"):
            writer.guest_write(regions, fresh=op == "write")
        elif op == "flush":
            writer.flush()
        elif op == "evict":
            writer.evict(regions)
        else:
            writer.close()
    return writer


Claim = Literal["listed", "durable"]


def check_intents_cover_unsettled_regions(variant: Variant = "spec") -> Outcome:
    """After any crash, every region whose maps or data may be inconsistent is in the durable root's intents."""
    return _check(variant, "listed")


def check_flushed_writes_durable(variant: Variant = "spec") -> Outcome:
    """After a crash past a flush, every region's map records the presence it acknowledged and its data is durable."""
    return _check(variant, "durable")


def _check(variant: Variant, which: Claim) -> Outcome:
    seconds = 0.0
    for workload in WORKLOADS:
        outcome = _check_workload(variant, workload, which)
        seconds += outcome.seconds
        if outcome.status == "refuted":
            return attrs.evolve(outcome, seconds=seconds)
    return Outcome("proved", seconds)


def _check_workload(variant: Variant, workload: Workload, which: Claim) -> Outcome:
    writer = compile_workload(variant, workload)
    initial = {"root.0": Copy.of(1, 0), "root.1": Copy.of(1, 0)}
    for r in REGIONS:
        initial |= {f"map{r}.0": Copy.of(1, 0), f"map{r}.1": Copy.of(1, 0), f"data.{r}": Copy.of(0, 0)}
    disk = SymbolicDisk(writer.trace, initial)
    root = recover(disk.final("root.0"), disk.final("root.1"))
    unsettled: dict[int, z3.BoolRef] = {}
    listed: dict[int, z3.BoolRef] = {}
    lost: dict[int, z3.BoolRef] = {}
    for r in REGIONS:
        a, b, data = disk.final(f"map{r}.0"), disk.final(f"map{r}.1"), disk.final(f"data.{r}")
        current = recover(a, b)
        versions = writer.map_versions[r]
        checksummed = z3.Or(*[z3.And(current.content == v, data.content == d) for v, (d, _) in enumerate(versions)])
        same_maps = z3.And(a.valid, b.valid, a.generation == b.generation, a.content == b.content)
        unsettled[r] = z3.Not(z3.And(same_maps, data.valid, checksummed))
        listed[r] = z3.Or(*[root.content == v for v, intents in enumerate(writer.root_versions) if r in intents])
        # A flushed write is lost when, past the point its flush returned, the current map records less
        # presence than acknowledged, or the data is an older valid version (a torn copy is a later write's).
        lost[r] = z3.Or(*[z3.And(disk.crash >= point, z3.Or(
            z3.Not(current.found),
            z3.And(*[current.content != v for v, (_, p) in enumerate(versions) if p >= presence[r]]),
            z3.And(data.valid, data.content < data_versions[r])))
            for point, data_versions, presence in writer.acknowledged] or [z3.BoolVal(False)])
    if which == "listed":
        claim = z3.And(root.found, *[z3.Implies(unsettled[r], listed[r]) for r in REGIONS])
    else:
        claim = z3.And(*[z3.Not(lost[r]) for r in REGIONS])

    def name_copy(model: z3.ModelRef, copy: Copy) -> str:
        if not as_bool(model, copy.valid):
            return "invalid"
        return f"v{as_int(model, copy.content)}"

    def render(model: z3.ModelRef) -> str:
        lines = [f"protocol variant: {variant}; claim: {which}; workload: " +
                 ", ".join(f"{op}{list(rs) if rs else ''}" for op, rs in workload)]
        lines += disk.render(model, name_copy)
        v = as_int(model, root.content)
        lines.append(f"  recovery: root v{v} (intents {sorted(writer.root_versions[v])})")
        for r in REGIONS:
            maps = f"map copies {name_copy(model, disk.final(f'map{r}.0'))}/{name_copy(model, disk.final(f'map{r}.1'))}"
            state = "UNSETTLED" if as_bool(model, unsettled[r]) else "settled"
            mark = "listed" if as_bool(model, listed[r]) else "NOT LISTED"
            durable = "A FLUSHED WRITE LOST" if as_bool(model, lost[r]) else "flushed writes present"
            lines.append(f"  region {r}: {maps}, data {name_copy(model, disk.final(f'data.{r}'))}: {state}, {mark}, "
                         f"{durable}")
        return "\n".join(lines)

    return prove(disk.constraints, claim, render)
