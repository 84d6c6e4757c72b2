"""The oracle (part 4 of 4, C4): is one crash state acceptable?

Per state: first run the spec's `check_image` on the crashed state itself,
read-only and before anything recovers it (R12): it must report no
corruption (no exit 1 or 2; degraded copies, leaks and pending work are what
a crash may leave).  Then open the image (a writable open runs recovery), run
`check_image` again (must be exit 0, with no finding at all), and compare the
guest contents with the model's set of legal outcomes:

- the size and the contents are judged together, as one outcome: resizes
  issued after the last acknowledged flush happen in order, all or nothing,
  so the legal outcomes are "none of them" (the flushed size) or "the first
  k of them" (the size after the k-th);
- in each outcome, every sector reads the value it had after the last
  acknowledged flush, or the value of one of the writes issued after it
  (old or new, per 512 B sector); a sector that a shrink among those first
  k dropped reads zero instead of its flushed value (the shrink happened),
  and a shrink after them changes nothing (it did not).  So an old size
  with flushed sectors reading zero is no legal outcome.

A crash before `Image.create` returned may leave no image at all.  The
outcome of opening and checking depends only on the durable bytes, so it is
cached by their identity; the legal set depends only on the crash point.
"""
from __future__ import annotations

from typing import Mapping

import attrs

from lamina.impl.image import Image
from lamina.spec.abstraction import abstract_image
from lamina.spec.check import CheckReport, check_image
from lamina.spec.errors import LaminaError
from lamina.spec.layout import SECTOR_SIZE, ZERO_SECTOR
from lamina.spec.model import Disk

from .controls import variant
from .memstore import DiskState, MemStorage, ReadOnlyStorage, Trace
from .record import IMAGE_PATH, Recording


@attrs.frozen
class Opened:
    """What recovery and check made of one durable state."""

    problem: str | None  # None when it opened and checked clean
    virtual_size: int = 0
    contents: Mapping[int, bytes] = attrs.field(factory=dict)  # non-zero sectors, as the spec's abstraction function reads them
    exists: bool = True
    orphans: tuple[str, ...] = ()
    prechecked: bool = False  # the read-only check before recovery ran (there was an image to check)
    precheck_exit: int = 0  # its exit code

    @property
    def view(self) -> object:
        """What a crash during recovery must not change."""
        return (self.virtual_size, self.contents)


def read_only_verdict(reports: list[tuple[str, CheckReport]]) -> tuple[int, str | None]:
    """The worst exit code of read-only checks of a crashed state, and why it is corruption (None: it is not).

    A crash may leave degraded copies, leaks and pending work (exit 0 or 3),
    never corruption: exit 2, or exit 1 (no usable root).
    """
    worst = next((code for code in (1, 2, 3) if any(r.exit_code == code for _, r in reports)), 0)
    for label, report in reports:
        if report.exit_code in (1, 2):
            bad = report.corruptions or report.findings
            kinds = ", ".join(f"{f.severity}:{f.kind}" for f in report.findings)
            first = bad[0].message if bad else "check did not complete"
            return worst, f"read-only check of {label} before recovery: exit {report.exit_code} ({kinds}): {first}"
    return worst, None


def precheck_image(state: DiskState, path: str) -> tuple[int, str | None]:
    """The spec's check of one image file of a crashed state, read-only, before any recovery."""
    file = ReadOnlyStorage(MemStorage(state)).open(path, writable=False)
    try:
        return read_only_verdict([(path, check_image(file))])
    except Exception as exc:  # noqa: BLE001 - check must never raise for a damaged image
        return 1, f"read-only check of {path} before recovery raised {type(exc).__name__}: {exc}"


@attrs.frozen
class Outcome:
    """One legal whole state: a virtual size and, per sector, the values it may read."""

    size: int
    flushed: Mapping[int, bytes]  # non-zero sectors as of the last acknowledged flush (and the shrinks that happened)
    alternatives: Mapping[int, frozenset[bytes]]  # sector -> values other than `flushed`'s allowed


@attrs.frozen
class Legal:
    """The legal outcomes at one crash point."""

    outcomes: tuple[Outcome, ...]
    may_be_absent: bool


def open_state(state: DiskState, variant_name: str | None, trace: Trace | None = None,
               recovered: dict[tuple, tuple] | None = None) -> Opened:
    """Recover and check a durable state with the (possibly broken) implementation.

    `recovered` memoizes the check and the reading after recovery by the
    recovered bytes (a pure function of them): many crash states recover to
    the same bytes, and each is then checked and read once.  The memo must
    belong to one variant (an `Explorer`).
    """
    orphans = tuple(sorted(p for p in state.names if p != IMAGE_PATH))
    if IMAGE_PATH not in state.names:
        return Opened(None, exists=False, orphans=orphans)
    pre_exit, corrupt = precheck_image(state, IMAGE_PATH)
    checked = {"orphans": orphans, "prechecked": True, "precheck_exit": pre_exit}
    if corrupt:
        return Opened(corrupt, **checked)
    storage = MemStorage(state, trace)
    try:
        with variant(variant_name):
            image = Image.open(IMAGE_PATH, storage=storage)
            after = state.key() if recovered is not None else None
            verdict = recovered.get(after) if recovered is not None else None
            if verdict is None:
                verdict = _check_and_read(image)
                if recovered is not None:
                    recovered[after] = verdict
            problem, size, sectors = verdict
            if problem:
                return Opened(problem, **checked)
            return Opened(None, size, sectors, **checked)
    except LaminaError as exc:
        return Opened(f"open (recovery) failed: {type(exc).__name__}: {exc}", **checked)
    except Exception as exc:  # noqa: BLE001 - an implementation crash is a finding, not a simulator error
        return Opened(f"open (recovery) crashed: {type(exc).__name__}: {exc}", **checked)


def _check_and_read(image: Image) -> tuple[str | None, int, Mapping[int, bytes]]:
    """The spec's check of a recovered image (must be clean) and, if clean, its guest contents."""
    report = check_image(image.file)
    if report.exit_code != 0 or report.findings:
        kinds = ", ".join(f"{f.severity}:{f.kind}" for f in report.findings)
        return f"check after recovery: exit {report.exit_code} ({kinds}): {report.findings[0].message}", 0, {}
    disk = abstract_image(image.file)
    return None, disk.virtual_size, disk.sectors


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
        return Legal((Outcome(create.disk.virtual_size, {}, {}),), True)
    steps = [(e.disk.virtual_size if e.kind == "resize" else None, e.changes) for e in after]
    return Legal(outcomes_of(flushed_disk, steps), not created)


Step = tuple[int | None, tuple[tuple[int, bytes], ...]]  # (new size of a resize, or None for a write; (sector, value) changes)


def outcomes_of(flushed: Disk, steps: list[Step]) -> tuple[Outcome, ...]:
    """The whole outcomes of one disk after unacknowledged steps: none of its resizes happened, or the first k of them."""
    resizes = [i for i, (size, _) in enumerate(steps) if size is not None]
    return tuple(_outcome(flushed, steps, applied) for applied in [-1] + resizes)


def _outcome(disk: Disk, steps: list[Step], applied: int) -> Outcome:
    """The outcome in which the resizes among `steps[: applied + 1]` happened and the later ones did not."""
    resized = steps[applied][0] if applied >= 0 else None
    size = disk.virtual_size if resized is None else resized
    flushed = dict(disk.sectors)
    alternatives: dict[int, set[bytes]] = {}
    for i, (new_size, changes) in enumerate(steps):
        if new_size is not None:
            if i <= applied:  # it happened: what it dropped reads zero, whatever was written before it
                for sector, _ in changes:
                    flushed.pop(sector, None)
                    alternatives.pop(sector, None)
            continue
        for sector, value in changes:
            if value != flushed.get(sector, ZERO_SECTOR):
                alternatives.setdefault(sector, set()).add(value)
    return Outcome(size, flushed, {s: frozenset(v) for s, v in alternatives.items()})


def judge(opened: Opened, legal: Legal, garbage: dict[int, bytes] | None = None) -> str | None:
    """None when the opened state is one of the legal outcomes, else what is wrong.

    `garbage`: guest sectors a torn write filled with garbage (see `Explorer.garbage_sectors`).
    """
    if opened.problem:
        return opened.problem
    if not opened.exists:
        return None if legal.may_be_absent else "the image vanished although its creation had returned"
    return outcomes_mismatch(opened.virtual_size, opened.contents, legal.outcomes, garbage or {})


def outcomes_mismatch(size: int, contents: Mapping[int, bytes], outcomes: tuple[Outcome, ...],
                      garbage: Mapping[int, bytes]) -> str | None:
    """None when (size, contents) is one of the outcomes as a whole, else why it is none of them."""
    reasons = [_mismatch(size, contents, outcome, garbage) for outcome in outcomes]
    if None in reasons:
        return None
    if len(reasons) == 1:
        return reasons[0]
    return "no legal outcome: " + "; ".join(f"not {o.size} bytes: {r}" for o, r in zip(outcomes, reasons))


def _mismatch(size: int, actual: Mapping[int, bytes], outcome: Outcome, garbage: Mapping[int, bytes]) -> str | None:
    """Why (size, contents) is not this outcome (None: it is)."""
    if size != outcome.size:
        return f"virtual size {size}, not {outcome.size}"
    limit = size // SECTOR_SIZE
    flushed = outcome.flushed
    for sector in set(actual) | set(flushed):
        if sector >= limit:
            continue
        value = actual.get(sector, ZERO_SECTOR)
        old = flushed.get(sector, ZERO_SECTOR)
        if value == old or value in outcome.alternatives.get(sector, ()) or garbage.get(sector) == value:
            continue
        allowed = 1 + len(outcome.alternatives.get(sector, ()))
        return (f"guest sector {sector} (offset {sector * SECTOR_SIZE}) reads {value[:8].hex()}..., "
                f"none of its {allowed} legal values (flushed {old[:8].hex()}...)")
    return None
