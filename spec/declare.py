"""One declaration per on-disk structure (S1).

A structure is a frozen attrs class whose fields carry a `FieldInfo` in their
metadata: offset, encoding, size, meaning and the constraint the format puts on
the value.  Encoding, decoding, per-field validation and the Markdown tables of
`spec/FORMAT.md` are all derived from that one declaration.
"""
from __future__ import annotations

import functools
import struct
from typing import Any, Callable, TypeVar

import attrs

from .errors import FieldOutOfRange

_SCALARS = {"u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q"}


@attrs.frozen
class FieldInfo:
    """Where a field lives in its structure and what the format admits in it."""

    offset: int
    kind: str  # "u8".."u64", "bytes", "u32[N]", or "tail" (runs to the end of the used length)
    size: int | None  # None only for "tail": its length is a function of the geometry
    doc: str
    constraint: str = ""  # the rule, as the format document states it
    valid: Callable[[Any], bool] | None = None  # the same rule, executable


def field(
    offset: int,
    kind: str,
    doc: str,
    *,
    size: int | None = None,
    constraint: str = "",
    valid: Callable[[Any], bool] | None = None,
    default: Any = attrs.NOTHING,
) -> Any:
    """Declare one field of an on-disk structure."""
    if kind in _SCALARS:
        size = struct.calcsize(_SCALARS[kind])
    elif kind.startswith("u32["):
        size = 4 * int(kind[4:-1])
    info = FieldInfo(offset, kind, size, doc, constraint, valid)
    return attrs.field(default=default, metadata={"lamina": info})


T = TypeVar("T")


def declared_fields(cls: type) -> list[tuple[str, FieldInfo]]:
    """The declared fields of a structure, in offset order."""
    return [(name, info) for name, info, _ in _field_plan(cls)]


@functools.cache
def _field_plan(cls: type) -> tuple[tuple[str, FieldInfo, str | None], ...]:
    """The declared fields with the struct format of each numeric one, built once per class.

    A class's declaration never changes, and every root read decodes
    one: rebuilding and sorting the list per decode was most of its cost.
    """
    out = [(a.name, a.metadata["lamina"]) for a in attrs.fields(cls) if "lamina" in a.metadata]
    plan = []
    for name, info in sorted(out, key=lambda item: item[1].offset):
        if info.kind in _SCALARS:
            fmt: str | None = _SCALARS[info.kind]
        elif info.kind.startswith("u32["):
            fmt = f"<{info.size // 4}I"
        else:
            fmt = None
        plan.append((name, info, fmt))
    return tuple(plan)


def encode_fields(obj: Any, buf: bytearray) -> None:
    """Write every declared field of `obj` into `buf` at its declared offset."""
    for name, info, fmt in _field_plan(type(obj)):
        value = getattr(obj, name)
        if info.kind in _SCALARS:
            struct.pack_into(fmt, buf, info.offset, value)
        elif fmt is not None:
            count = info.size // 4
            values = list(value) + [0] * (count - len(value))
            struct.pack_into(fmt, buf, info.offset, *values)
        else:  # bytes / tail
            buf[info.offset : info.offset + len(value)] = value


def decode_fields(cls: type[T], data: bytes, tail_size: int = 0, where: str = "") -> dict[str, Any]:
    """Read every declared field of `cls` from `data`; check each against its declared rule.

    Returns the keyword arguments for `cls`, so that structure-level rules can
    be checked before the object is built.
    """
    values: dict[str, Any] = {}
    for name, info, fmt in _field_plan(cls):
        if info.kind in _SCALARS:
            value: Any = struct.unpack_from(fmt, data, info.offset)[0]
        elif fmt is not None:
            value = struct.unpack_from(fmt, data, info.offset)
        elif info.kind == "tail":
            value = bytes(data[info.offset : info.offset + tail_size])
        else:
            value = bytes(data[info.offset : info.offset + info.size])
        if info.valid is not None and not info.valid(value):
            shown = value if isinstance(value, int) else f"{len(value)} bytes"
            raise FieldOutOfRange(
                f"{where}{cls.__name__}.{name} at byte {info.offset} is {shown!r}; "
                f"the format requires {info.constraint}"
            )
        values[name] = value
    return values


def markdown_table(cls: type) -> str:
    """The field table of `cls` for the format document."""
    rows = ["| offset | size | field | type | meaning | rule |", "|---:|---:|---|---|---|---|"]
    for name, info in declared_fields(cls):
        size = str(info.size) if info.size is not None else "see below"
        rows.append(
            f"| {info.offset} | {size} | `{name}` | {info.kind} | {info.doc} | {info.constraint} |"
        )
    return "\n".join(rows)
