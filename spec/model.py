"""The abstract model of what an image means (S2).

A disk is its virtual size and the bytes of every sector; nothing else about
an image is observable by a guest.  Operations are pure functions from one
model to the next.  Sectors not in `sectors` read as zero.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

import attrs

from .errors import OutOfBounds
from .layout import SECTOR_SIZE, ZERO_SECTOR, check_virtual_size


def _check_range(size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise OutOfBounds(f"request [{offset}, {offset + length}) reaches past the virtual size {size}")


@attrs.frozen
class Disk:
    virtual_size: int
    sectors: Mapping[int, bytes] = attrs.field(factory=lambda: MappingProxyType({}))

    def read(self, offset: int, length: int) -> bytes:
        _check_range(self.virtual_size, offset, length)
        out = bytearray()
        first, last = offset // SECTOR_SIZE, (offset + length - 1) // SECTOR_SIZE
        for sector in range(first, last + 1 if length else first):
            out += self.sectors.get(sector, ZERO_SECTOR)
        skip = offset - first * SECTOR_SIZE
        return bytes(out[skip : skip + length])


def empty_disk(virtual_size: int) -> Disk:
    check_virtual_size(virtual_size)
    return Disk(virtual_size)


def _with_sectors(disk: Disk, changes: dict[int, bytes]) -> Disk:
    merged = dict(disk.sectors)
    for sector, data in changes.items():
        if any(data):
            merged[sector] = data
        else:
            merged.pop(sector, None)
    return attrs.evolve(disk, sectors=MappingProxyType(merged))


def write(disk: Disk, offset: int, data: bytes) -> Disk:
    """The guest writes `data` at byte `offset`."""
    _check_range(disk.virtual_size, offset, len(data))
    changes: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        sector, within = divmod(offset + pos, SECTOR_SIZE)
        take = min(SECTOR_SIZE - within, len(data) - pos)
        old = bytearray(disk.sectors.get(sector, ZERO_SECTOR))
        old[within : within + take] = data[pos : pos + take]
        changes[sector] = bytes(old)
        pos += take
    return _with_sectors(disk, changes)


def write_zeroes(disk: Disk, offset: int, length: int) -> Disk:
    """The guest zeroes a range; discard has the same meaning in format v1 (reads return zero)."""
    return write(disk, offset, bytes(length))


discard = write_zeroes


def resize(disk: Disk, virtual_size: int) -> Disk:
    """Shrinking drops the tail; growing adds sectors that read as zero."""
    check_virtual_size(virtual_size)
    limit = virtual_size // SECTOR_SIZE
    kept = {s: d for s, d in disk.sectors.items() if s < limit}
    return Disk(virtual_size, MappingProxyType(kept))
