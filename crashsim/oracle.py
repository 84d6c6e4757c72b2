"""The oracle (part 4 of 4, C4): is one crash state acceptable?

Per state: open the image (a writable open runs recovery), run the spec's
`check_image` (must be exit 0, with no finding at all), then compare the
guest contents with the model's set of legal outcomes:

- the virtual size is the one after the last acknowledged flush, or the one
  of a resize issued after it (all or nothing);
- every sector reads the value it had after the last acknowledged flush, or
  the value of one of the writes issued after it (old or new, per 512 B
  sector; a shrink issued after it may also have zeroed it).

A crash before `Image.create` returned may leave no image at all.  The
outcome of opening and checking depends only on the durable bytes, so it is
cached by their identity; the legal set depends only on the crash point.
"""
from __future__ import annotations

from typing import Mapping

import attrs

from lamina.impl.image import Image
from lamina.spec.abstraction import abstract_image
from lamina.spec.check import check_image
from lamina.spec.errors import LaminaError
from lamina.spec.layout import SECTOR_SIZE, ZERO_SECTOR
from lamina.spec.model import Disk

from .controls import variant
from .memstore import DiskState, MemStorage, Trace
from .record import IMAGE_PATH, Recording


@attrs.frozen
class Opened:
    """What recovery and check made of one durable state."""

    problem: str | None  # None when it opened and checked clean
    virtual_size: int = 0
    contents: Mapping[int, bytes] = attrs.field(factory=dict)  # non-zero sectors, as the spec's abstraction function reads them
    exists: bool = True
    orphans: tuple[str, ...] = ()

    @property
    def view(self) -> object:
        """What a crash during recovery must not change."""
        return (self.virtual_size, self.contents)


@attrs.frozen
class Legal:
    """The legal outcomes at one crash point."""

    sizes: frozenset[int]
    flushed: Mapping[int, bytes]  # non-zero sectors after the last acknowledged flush
    alternatives: dict[int, frozenset[bytes]]  # sector -> values other than `flushed`'s allowed
    may_be_absent: bool


def open_state(state: DiskState, variant_name: str | None, trace: Trace | None = None) -> Opened:
    """Recover and check a durable state with the (possibly broken) implementation."""
    orphans = tuple(sorted(p for p in state.names if p != IMAGE_PATH))
    if IMAGE_PATH not in state.names:
        return Opened(None, exists=False, orphans=orphans)
    storage = MemStorage(state, trace)
    try:
        with variant(variant_name):
            image = Image.open(IMAGE_PATH, storage=storage)
            report = check_image(image.file)
            if report.exit_code != 0 or report.findings:
                kinds = ", ".join(f"{f.severity}:{f.kind}" for f in report.findings)
                return Opened(f"check after recovery: exit {report.exit_code} ({kinds}): {report.findings[0].message}",
                              orphans=orphans)
            disk = abstract_image(image.file)
            return Opened(None, disk.virtual_size, disk.sectors, orphans=orphans)
    except LaminaError as exc:
        return Opened(f"open (recovery) failed: {type(exc).__name__}: {exc}", orphans=orphans)
    except Exception as exc:  # noqa: BLE001 - an implementation crash is a finding, not a simulator error
        return Opened(f"open (recovery) crashed: {type(exc).__name__}: {exc}", orphans=orphans)


def legal_at(rec: Recording, crash: int) -> Legal:
    """The model's set of legal outcomes when the crash comes after `crash` ops."""
    flushed_disk: Disk | None = rec.base_disk
    after: list = []
    created = rec.base_disk is not None
    for event in rec.events:
        if event.end <= crash and event.kind == "create":
            created = True
        if event.end <= crash and event.durable:
            flushed_disk, after = event.disk, []
        elif event.start < crash or event.end <= crash:
            after.append(event)
    if flushed_disk is None:  # crash inside create: no image, or an empty one
        create = rec.events[0]
        return Legal(frozenset({create.disk.virtual_size}), {}, {}, True)
    sizes = {flushed_disk.virtual_size} | {e.disk.virtual_size for e in after if e.kind == "resize"}
    flushed = flushed_disk.sectors
    alternatives: dict[int, set[bytes]] = {}
    for event in after:
        for sector, value in event.changes:
            if value != flushed.get(sector, ZERO_SECTOR):
                alternatives.setdefault(sector, set()).add(value)
    return Legal(frozenset(sizes), flushed, {s: frozenset(v) for s, v in alternatives.items()}, not created)


def judge(opened: Opened, legal: Legal, garbage: dict[int, bytes] | None = None) -> str | None:
    """None when the opened state is one of the legal outcomes, else what is wrong.

    `garbage`: guest sectors a torn write filled with garbage (see `Explorer.garbage_sectors`).
    """
    if opened.problem:
        return opened.problem
    if not opened.exists:
        return None if legal.may_be_absent else "the image vanished although its creation had returned"
    if opened.virtual_size not in legal.sizes:
        return f"virtual size {opened.virtual_size} is none of the legal sizes {sorted(legal.sizes)}"
    limit = opened.virtual_size // SECTOR_SIZE
    actual, flushed = opened.contents, legal.flushed
    garbage = garbage or {}
    for sector in set(actual) | set(flushed):
        if sector >= limit:
            continue
        value = actual.get(sector, ZERO_SECTOR)
        old = flushed.get(sector, ZERO_SECTOR)
        if value == old or value in legal.alternatives.get(sector, ()) or garbage.get(sector) == value:
            continue
        allowed = 1 + len(legal.alternatives.get(sector, ()))
        return (f"guest sector {sector} (offset {sector * SECTOR_SIZE}) reads {value[:8].hex()}..., "
                f"none of its {allowed} legal values (flushed {old[:8].hex()}...)")
    return None
