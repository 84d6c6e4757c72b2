"""Corruption injection (C5): damage one place of a cleanly closed image and judge check and repair (R7).

Fault kinds: `bitflip` (one bit), `zero` (a 512 B sector zeroed), `garbage`
(a sector of random bytes), `stale` (a lost write: the place holds an older
version of its own bytes, taken from the recorded history), `misdirected`
(the place holds bytes meant for another place of the same kind).

Metadata faults (every root and map copy `Image.metadata_regions()` lists)
must be named (`check` exit 2 or 3, with a finding of class corruption or
degraded: one bad copy beside a current twin is degraded redundancy) and
repaired by `spec.repair.repair_image` with every committed byte intact
afterwards.  Data faults must be detected as corruption (exit 2) and named
by guest range; format v1 keeps one copy of data, so they are not
repairable (R7 asks detection only).
"""
from __future__ import annotations

import random
from typing import Iterator

import attrs

from lamina.impl.image import Image
from lamina.spec.check import CheckReport, check_image
from lamina.spec.errors import LaminaError
from lamina.spec.layout import SECTOR_SIZE
from lamina.spec.repair import repair_image

from .memstore import PWRITE, DiskState, MemStorage
from .record import IMAGE_PATH, Recording, record_workload
from .workloads import get_workload

FAULT_KINDS = ("bitflip", "zero", "garbage", "stale", "misdirected")


@attrs.frozen
class Place:
    offset: int
    length: int
    kind: str  # root, map, data
    name: str


@attrs.frozen
class InjectionResult:
    workload: str
    counts: dict[str, dict[str, list[int]]]  # region kind -> fault kind -> [injected, detected, repaired]
    failures: tuple[str, ...]

    def total(self, region_kind: str, index: int) -> int:
        return sum(v[index] for v in self.counts.get(region_kind, {}).values())


def _final_state(rec: Recording) -> DiskState:
    state = rec.base.copy()
    for op in rec.ops:
        state.apply(op)
    return state


def _history(rec: Recording, place: Place) -> list[bytes]:
    """Every earlier version of a place's bytes that a recorded write left there."""
    state = rec.base.copy()
    versions: list[bytes] = []
    inode = _final_state(rec).names[IMAGE_PATH]
    for op in rec.ops:
        state.apply(op)
        if op.kind == PWRITE and op.target == inode and op.offset < place.offset + place.length and op.offset + len(op.data) > place.offset:
            now = state.files[inode].pread(place.offset, place.length)
            if not versions or versions[-1] != now:
                versions.append(now)
    return versions


def _places(state: DiskState) -> tuple[list[Place], list[Place], bytes, int]:
    storage = MemStorage(state.copy())
    image = Image.open(IMAGE_PATH, readonly=True, storage=storage)
    meta = [Place(r.offset, r.length, r.kind, f"{r.kind} copy {'AB'[r.copy]}" + (f" of region {r.region}" if r.region is not None else ""))
            for r in image.metadata_regions()]
    data = [Place(e.offset + k, SECTOR_SIZE, "data", f"data sector at guest offset {e.start + k}")
            for e in image.extents() if e.data for k in range(0, e.length, SECTOR_SIZE)]
    contents = image.read(0, image.virtual_size)
    return meta, data, contents, image.virtual_size


def _fault(kind: str, place: Place, current: bytes, history: list[bytes], others: list[Place], state: DiskState,
           rng: random.Random) -> list[tuple[int, bytes]]:
    """(file offset, bytes) writes that inject one fault of `kind` into `place`; empty when not applicable."""
    inode = state.names[IMAGE_PATH]
    if kind == "bitflip":
        out = []
        for pos in (0, place.length // 2, place.length - 1):
            buf = bytearray(current)
            buf[pos] ^= 1 << rng.randrange(8)
            out.append([(place.offset, bytes(buf))])
        return out
    if kind in ("zero", "garbage"):
        out = []
        for lo in range(0, place.length, SECTOR_SIZE):
            n = min(SECTOR_SIZE, place.length - lo)
            new = bytes(n) if kind == "zero" else rng.randbytes(n)
            if new != current[lo : lo + n]:
                out.append([(place.offset + lo, new)])
        return out
    if kind == "stale":
        older = [v for v in history if v != current]
        return [[(place.offset, older[-1])]] if older else []
    if kind == "misdirected":
        for other in others:
            if other.kind == place.kind and other != place and other.length == place.length:
                foreign = state.files[inode].pread(other.offset, other.length)
                if foreign != current:
                    return [[(place.offset, foreign)]]
        return []
    raise ValueError(kind)


def iter_faults(rec: Recording, clean: DiskState, places: list[Place], rng: random.Random) -> Iterator[tuple[Place, str, list[tuple[int, bytes]]]]:
    """(place, fault kind, writes) of every fault `inject` applies to `places`, in its order (the rng is consumed in order)."""
    inode = clean.names[IMAGE_PATH]
    meta = [p for p in places if p.kind != "data"]
    data = [p for p in places if p.kind == "data"]
    for place in places:
        current = clean.files[inode].pread(place.offset, place.length)
        history = _history(rec, place)
        others = meta if place.kind != "data" else data
        for kind in FAULT_KINDS:
            for writes in _fault(kind, place, current, history, others, clean, rng):
                yield place, kind, writes


@attrs.frozen
class Fault:
    """One metadata fault: its number in the enumeration of a workload's metadata faults (for plans) and its writes."""

    number: int
    place: Place
    kind: str
    writes: tuple[tuple[int, bytes], ...]
    first_change: int = -1  # file offset of the first byte the fault changes

    @property
    def name(self) -> str:
        return f"{self.kind} in {self.place.name}" + (f" (first changed byte at file offset {self.first_change})" if self.first_change >= 0 else "")


def _first_change(clean: DiskState, writes: list[tuple[int, bytes]]) -> int:
    inode = clean.names[IMAGE_PATH]
    for offset, raw in writes:
        old = clean.files[inode].pread(offset, len(raw)).ljust(len(raw), b"\0")
        for k, (a, b) in enumerate(zip(old, raw)):
            if a != b:
                return offset + k
    return -1


def metadata_faults(name: str, seed: int = 0) -> tuple[Recording, DiskState, int, bytes, list[Fault]]:
    """The recording, its clean final state, virtual size, guest contents and every metadata fault `inject` applies.

    The faults are the ones (and bytes) `inject_workload` injects with the same seed: metadata places come
    first in its enumeration, so the seeded random bytes match.
    """
    rec = record_workload(get_workload(name))
    clean = _final_state(rec)
    meta, _data, contents, size = _places(clean)
    rng = random.Random(seed)
    faults = [Fault(k, place, kind, tuple(map(tuple, writes)), _first_change(clean, writes))
              for k, (place, kind, writes) in enumerate(iter_faults(rec, clean, meta, rng))]
    return rec, clean, size, contents, faults


def _named(report: CheckReport, place_kind: str) -> bool:
    """Whether check names the fault: data as corruption (exit 2), metadata as corruption or degraded (exit 2 or 3)."""
    if place_kind == "data":
        return report.exit_code == 2
    return report.exit_code in (2, 3) and bool(report.corruptions or report.degraded)


def inject_workload(name: str, seed: int = 0) -> InjectionResult:
    """Inject every fault kind into every metadata place and every data sector of the workload's final image."""
    rec = record_workload(get_workload(name))
    clean = _final_state(rec)
    meta, data, contents, size = _places(clean)
    rng = random.Random(seed)
    counts: dict[str, dict[str, list[int]]] = {}
    failures: list[str] = []
    inode = clean.names[IMAGE_PATH]
    for place, kind, writes in iter_faults(rec, clean, meta + data, rng):
        row = counts.setdefault(place.kind, {}).setdefault(kind, [0, 0, 0])
        row[0] += 1
        state = clean.copy()
        for offset, raw in writes:
            state.files[inode].pwrite(offset, raw)
        file = MemStorage(state).open(IMAGE_PATH, writable=True)
        report = check_image(file)
        where = f"{kind} in {place.name}"
        if not _named(report, place.kind):
            failures.append(f"{name}: {where}: not detected (check exit {report.exit_code})")
            continue
        if place.kind == "data" and not any(f.guest_range for f in report.corruptions):
            failures.append(f"{name}: {where}: detected but not named by guest range")
            continue
        row[1] += 1
        if place.kind == "data":
            continue
        try:
            _, after = repair_image(file)
            image = Image.open(IMAGE_PATH, readonly=True, storage=MemStorage(state))
            intact = image.virtual_size == size and image.read(0, size) == contents
        except LaminaError as exc:
            failures.append(f"{name}: {where}: repair failed: {type(exc).__name__}: {exc}")
            continue
        if after.exit_code != 0:
            failures.append(f"{name}: {where}: check after repair exits {after.exit_code}")
        elif not intact:
            failures.append(f"{name}: {where}: repair lost committed guest data")
        else:
            row[2] += 1
    return InjectionResult(name, counts, tuple(failures))
