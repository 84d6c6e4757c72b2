"""Which copy of a replicated structure is current, and what is wrong with the other.

Rule (R7): the current version is the valid copy with the highest generation.
A copy that fails to verify is `invalid` (or `zeroed` when all its bytes are
zero); a valid copy with a lower generation than its twin is `stale`.  Under a
single fault at least one copy is always valid, because the commit protocol
never writes a slot before the other holds the current version durably.
"""
from __future__ import annotations

from typing import Callable, Generic, TypeVar

import attrs

from .errors import FormatError, NoValidCopy, UnknownIncompatibleFeature, UnsupportedVersion
from .layout import Geometry
from .structures import MapCopy, Root, decode_map_copy, decode_root

T = TypeVar("T")


@attrs.frozen
class CopyProblem:
    slot: int
    kind: str  # "invalid", "zeroed", "stale"
    message: str


@attrs.frozen
class Selection(Generic[T]):
    """The current version (None for a never-written region), the slot it came from, and the twin's problems."""

    value: T | None
    slot: int
    problems: tuple[CopyProblem, ...] = ()


def _select(copies: list[bytes], decode: Callable[[bytes, int], T], generation: Callable[[T], int],
            same: Callable[[T, T], bool], what: str, allow_empty: bool) -> Selection[T]:
    decoded: list[T | None] = []
    problems: list[CopyProblem] = []
    for slot, raw in enumerate(copies):
        try:
            decoded.append(decode(raw, slot))
        except FormatError as exc:
            decoded.append(None)
            kind = "zeroed" if not any(raw) else "invalid"
            problems.append(CopyProblem(slot, kind, str(exc)))
    valid = [(slot, value) for slot, value in enumerate(decoded) if value is not None]
    if not valid:
        if allow_empty and any(p.kind == "zeroed" for p in problems):
            # Never written (both holes), or one copy damaged in a region that never held a valid map.
            return Selection(None, 0, tuple(p for p in problems if p.kind != "zeroed"))
        raise NoValidCopy(f"no valid copy of {what}: " + "; ".join(p.message for p in problems))
    best_slot, best = max(valid, key=lambda item: (generation(item[1]), -item[0]))
    for slot, value in valid:
        if slot != best_slot and (generation(value) != generation(best) or not same(value, best)):
            problems.append(CopyProblem(
                slot, "stale",
                f"copy {'AB'[slot]} of {what} holds generation {generation(value)}, "
                f"copy {'AB'[best_slot]} holds {generation(best)}"))
    return Selection(best, best_slot, tuple(sorted(problems, key=lambda p: p.slot)))


def select_root(copies: list[bytes], table: bool = True) -> Selection[Root]:
    """The current root.  A copy that verifies but needs a newer reader is fatal, never skipped.

    `table=False` leaves the snapshot table undecoded (see `decode_root`).
    """
    def decode(raw: bytes, slot: int) -> Root:
        return decode_root(raw, slot, table)

    errors: list[FormatError] = []
    for slot, raw in enumerate(copies):
        try:
            decode(raw, slot)
        except (UnsupportedVersion, UnknownIncompatibleFeature) as exc:
            raise type(exc)(str(exc)) from None
        except FormatError as exc:
            errors.append(exc)
    if len(errors) == len(copies):
        # Both unusable: report the first copy's kind of error, naming both.
        raise type(errors[0])("both root copies are unusable: " + "; ".join(map(str, errors)))
    return _select(copies, decode, lambda r: r.generation, Root.same_content, "the root", False)


def select_map(copies: list[bytes], geometry: Geometry, region: int, image_uuid: bytes) -> Selection[MapCopy]:
    """The current map of a region; value None when the region was never written."""
    def decode(raw: bytes, slot: int) -> MapCopy:
        return decode_map_copy(raw, geometry, region, slot, image_uuid)

    def same(a: MapCopy, b: MapCopy) -> bool:
        return attrs.evolve(a, slot=0, crc=0) == attrs.evolve(b, slot=0, crc=0)

    return _select(copies, decode, lambda m: m.generation, same, f"region {region}'s map", True)

