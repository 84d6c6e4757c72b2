"""Which copy of a replicated structure is current, and what is wrong with the other.

Rule (R7, F-ROOT-002, F-MAP-002): the current version is the valid copy with
the highest generation, copy A (slot 0) on a tie.  A copy that fails to verify
is `invalid` (or `zeroed` when all the bytes read for it are zero: the first
4096 of a root slot, the used length of a map copy); a valid copy with a lower
generation than its twin, or of the same generation with other content (every
field but slot and crc), is `stale`.  Under a
single fault at least one copy is always valid, because the commit protocol
never writes a slot before the other holds the current version durably.
"""
from __future__ import annotations

import functools
from typing import Callable, Generic, TypeVar

import attrs

from .errors import FormatError, NoValidCopy, UnknownIncompatibleFeature, UnsupportedVersion
from .layout import Geometry
from .structures import MapCopy, Root, decode_map_copy, decode_root

T = TypeVar("T")


def slot_1_is_current(copy_0: tuple, copy_1: tuple):
    """The selection rule on two copies, each (valid, generation): whether slot 1 holds the current version.

    The valid copy with the higher generation; slot 0 on a tie, or when
    neither is valid.  Written with `&`, `|` and comparisons only, so the
    same function decides concrete copies here and symbolic ones (z3 values)
    in the commit protocol's proof (`lamina.spec.proofs.commit`).
    """
    (valid_0, generation_0), (valid_1, generation_1) = copy_0, copy_1
    return valid_1 & ((valid_0 == False) | (generation_1 > generation_0))  # noqa: E712 - `not` has no z3 meaning


SelectionRule = Callable[[tuple, tuple], object]


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

    def current(self, what: str = "the root") -> T:
        """The value, for callers that need one: a named error, never an assertion, when there is none."""
        if self.value is None:
            raise NoValidCopy(f"no valid copy of {what}")
        return self.value


def _select(copies: list[bytes], decode: Callable[[bytes, int], T], generation: Callable[[T], int],
            same: Callable[[T, T], bool], what: str, allow_empty: bool, rule: SelectionRule) -> Selection[T]:
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
    first, second = ((value is not None, 0 if value is None else generation(value)) for value in decoded)
    best_slot = 1 if rule(first, second) else 0
    best = decoded[best_slot]
    assert best is not None
    for slot, value in valid:
        if slot != best_slot and (generation(value) != generation(best) or not same(value, best)):
            problems.append(CopyProblem(
                slot, "stale",
                f"copy {'AB'[slot]} of {what} holds generation {generation(value)}, "
                f"copy {'AB'[best_slot]} holds {generation(best)}"))
    return Selection(best, best_slot, tuple(sorted(problems, key=lambda p: p.slot)))


SELECTED_ROOTS_MAX = 1024
_selected_roots: dict[tuple, Selection[Root]] = {}


def select_root(copies: list[bytes], rule: SelectionRule = slot_1_is_current, table: bool = True) -> Selection[Root]:
    """The current root.  A copy that verifies but needs a newer reader is fatal, never skipped.

    `rule` is the selection rule (only negative controls pass another one);
    `table=False` leaves the snapshot table undecoded (see `decode_root`).
    The selection is a pure function of the copies' bytes, the rule and
    `table`, and of frozen values: it is made once per distinct arguments (a
    small cache; every open, check and reading of a layer selects its root
    again, usually from unchanged bytes), and errors are not cached.
    """
    key = (*copies, rule, table)
    try:
        selected = _selected_roots.get(key)
    except TypeError:  # a bytearray copy: nothing to key by
        return _select_root(copies, rule, table)
    if selected is None:
        selected = _select_root(copies, rule, table)
        if len(_selected_roots) >= SELECTED_ROOTS_MAX:
            _selected_roots.clear()
        _selected_roots[key] = selected
    return selected


def _select_root(copies: list[bytes], rule: SelectionRule, table: bool) -> Selection[Root]:
    decoded: dict[int, Root] = {}  # each copy decoded once: `_select` takes these

    def decode(raw: bytes, slot: int) -> Root:
        if slot in decoded:
            return decoded[slot]
        return decode_root(raw, slot, table)

    errors: list[FormatError] = []
    for slot, raw in enumerate(copies):
        try:
            decoded[slot] = decode(raw, slot)
        except (UnsupportedVersion, UnknownIncompatibleFeature) as exc:
            raise type(exc)(str(exc)) from None
        except FormatError as exc:
            errors.append(exc)
    if len(errors) == len(copies):
        # Both unusable: report the first copy's kind of error, naming both.
        raise type(errors[0])("both root copies are unusable: " + "; ".join(map(str, errors)))
    return _select(copies, decode, lambda r: r.generation, Root.same_content, "the root", False, rule)


@functools.cache
def _map_content_fields() -> tuple[str, ...]:
    """Every field of a map copy but the two that differ between its copies."""
    return tuple(a.name for a in attrs.fields(MapCopy) if a.name not in ("slot", "crc"))


def select_map(copies: list[bytes], geometry: Geometry, region: int, image_uuid: bytes,
               rule: SelectionRule = slot_1_is_current) -> Selection[MapCopy]:
    """The current map of a region; value None when the region was never written."""
    def decode(raw: bytes, slot: int) -> MapCopy:
        return decode_map_copy(raw, geometry, region, slot, image_uuid)

    def same(a: MapCopy, b: MapCopy) -> bool:
        # attrs.evolve(a, slot=0, crc=0) == attrs.evolve(b, slot=0, crc=0), without building two copies
        return all(getattr(a, name) == getattr(b, name) for name in _map_content_fields())

    return _select(copies, decode, lambda m: m.generation, same, f"region {region}'s map", True, rule)

