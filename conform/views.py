"""Guest views as range digests: how a vector states contents, and how the runner compares a dump with them.

A view is `{"name", "disk_size", "ranges": [[offset, length, digest], ...]}`
whose ranges cover [0, disk_size) in order, each at most `CHUNK` bytes and
aligned to it, so that a reader's dump can be judged range by range and an
all-zero range (a hole in a sparse dump) costs one cached digest.  A crash
outcome has the same ranges with a list of allowed digests in place of one.
"""
from __future__ import annotations

import bisect
import functools
import hashlib
import os
from typing import Callable, Mapping

from lamina.spec.layout import SECTOR_SIZE, ZERO_SECTOR
from lamina.spec.model import Disk

CHUNK = 64 * 1024

Range = list  # [offset, length, digest] or, in a crash outcome, [offset, length, [digest, ...]]


@functools.lru_cache(maxsize=64)
def zero_digest(length: int) -> str:
    h = hashlib.sha256()
    block = bytes(min(length, 1 << 20))
    left = length
    while left:
        take = min(left, len(block))
        h.update(block[:take])
        left -= take
    return h.hexdigest()


def digest(data: bytes) -> str:
    return zero_digest(len(data)) if not any(data) else hashlib.sha256(data).hexdigest()


def chunks(size: int) -> list[tuple[int, int]]:
    return [(pos, min(CHUNK, size - pos)) for pos in range(0, size, CHUNK)]


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def read_ranges(read: Callable[[int, int], bytes], size: int, data: list[tuple[int, int]]) -> list[Range]:
    """Ranges of a guest view read through `read`; chunks outside the [start, end) `data` ranges read as zero."""
    runs = _merged(data)
    starts = [lo for lo, _ in runs]
    out: list[Range] = []
    for pos, n in chunks(size):
        k = bisect.bisect_left(starts, pos + n) - 1  # the last run starting before the chunk's end
        touched = k >= 0 and runs[k][1] > pos
        out.append([pos, n, digest(read(pos, n)) if touched else zero_digest(n)])
    return out


def disk_view(name: str, disk: Disk) -> dict:
    """The view of a model disk (`lamina.spec.model.Disk`)."""
    sectors = sorted(disk.sectors)
    data = [(s * SECTOR_SIZE, (s + 1) * SECTOR_SIZE) for s in sectors]
    return {"name": name, "disk_size": disk.virtual_size, "ranges": read_ranges(disk.read, disk.virtual_size, data)}


def outcome_view(size: int, flushed: Mapping[int, bytes], alternatives: Mapping[int, frozenset[bytes] | set[bytes]]) -> dict:
    """A crash outcome: per range the allowed digests; a sector with alternatives is a range of its own.

    `flushed` holds the non-zero sectors as of the last acknowledged flush,
    `alternatives` the other values a sector may read (old-or-new, garbage
    a torn write left in a data sector).
    """
    limit = size // SECTOR_SIZE
    varying = sorted(s for s in alternatives if s < limit)
    ranges: list[Range] = []

    def fixed(lo: int, hi: int) -> None:  # sectors [lo, hi) with one value each, split at CHUNK boundaries
        pos, end = lo * SECTOR_SIZE, hi * SECTOR_SIZE
        while pos < end:
            stop = min(end, (pos // CHUNK + 1) * CHUNK)
            data = b"".join(flushed.get(s, ZERO_SECTOR) for s in range(pos // SECTOR_SIZE, stop // SECTOR_SIZE))
            ranges.append([pos, stop - pos, [digest(data)]])
            pos = stop

    at = 0
    for s in varying:
        fixed(at, s)
        values = {flushed.get(s, ZERO_SECTOR)} | set(alternatives[s])
        ranges.append([s * SECTOR_SIZE, SECTOR_SIZE, sorted(digest(v) for v in values)])
        at = s + 1
    fixed(at, limit)
    return {"disk_size": size, "ranges": ranges}


def _hole_until(fd: int, pos: int) -> int:
    """The offset of the first data at or after `pos` (the file size when there is none)."""
    try:
        return os.lseek(fd, pos, os.SEEK_DATA)
    except OSError:
        return os.fstat(fd).st_size


def dump_mismatch(path: str, disk_size: int, ranges: list[Range]) -> str | None:
    """None when the file at `path` is `disk_size` bytes whose ranges have their (or one of their) digests."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return f"no dump file written ({exc.strerror})"
    try:
        size = os.fstat(fd).st_size
        if size != disk_size:
            return f"dump is {size} bytes, not disk_size {disk_size}"
        data_at = -1
        for offset, length, want in ranges:
            if data_at < offset:
                data_at = _hole_until(fd, offset)
            got = zero_digest(length) if data_at >= offset + length else digest(os.pread(fd, length, offset))
            allowed = want if isinstance(want, list) else [want]
            if got not in allowed:
                return f"bytes [{offset}, {offset + length}) have sha256 {got[:16]}..., expected {allowed[0][:16]}..." + (
                    f" or one of {len(allowed) - 1} others" if len(allowed) > 1 else "")
        return None
    finally:
        os.close(fd)
