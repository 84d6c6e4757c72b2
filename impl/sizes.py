"""Sizes as people type them (`64k`, `1M`, `4G`) and as people read them."""
from __future__ import annotations

import re

from lamina.spec.errors import InvalidArgument

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE = re.compile(r"^\s*(\d+)\s*([kmgtpb]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str, what: str = "size") -> int:
    """`4096`, `64k`, `1M`, `2GiB`: binary units, as qemu-img and qemu-io read them."""
    if text.isdigit() and text.isascii():
        return int(text)  # the common forms without the pattern: plain digits, and digits with one unit letter
    unit = _UNITS.get(text[-1:].lower()) if text[:-1].isdigit() and text.isascii() else None
    if unit is not None:
        return int(text[:-1]) * unit
    match = _SIZE.match(text)
    if not match:
        raise InvalidArgument(f"invalid {what} {text!r}: expected a number with an optional k/M/G/T/P suffix")
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def format_size(n: int) -> str:
    """`64 KiB`, `1 GiB`, `1.5 MiB`: what qemu-img prints."""
    for unit, name in ((1 << 50, "PiB"), (1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            value = n / unit
            return f"{value:.3g} {name}" if value != int(value) else f"{int(value)} {name}"
    return f"{n} B" if n != 1 else "1 byte"
