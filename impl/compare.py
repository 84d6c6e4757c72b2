"""`lamina compare A B`: whether two disks read the same, and where they first differ, as `qemu-img compare`.

Only ranges where the two may differ are read: between Lamina images the
metadata says which (`layers.diff`: below a shared layer they are equal);
otherwise the union of what either holds (raw data extents, a foreign
image's block status), since everything else reads zero on both sides.
Offsets are of the first differing 512-byte sector, as qemu-img reports them.
"""
from __future__ import annotations

from typing import Iterator

import attrs

from lamina.spec.layout import SECTOR_SIZE
from lamina.spec.zeros import is_zero

from .progress import QUIET, Progress

CHUNK = 1 << 20


@attrs.frozen
class Comparison:
    """The verdict: identical, or the first difference (`reason`: content, size or allocation) and where."""

    identical: bool
    size_a: int
    size_b: int
    reason: str | None = None
    offset: int | None = None

    def lines(self) -> list[str]:
        """What qemu-img compare prints for this verdict."""
        out = ["Warning: Image size mismatch!"] if self.size_a != self.size_b and self.reason != "size" else []
        if self.identical:
            return out + ["Images are identical."]
        if self.reason == "size":
            return ["Strict mode: Image size mismatch!"]
        if self.reason == "allocation":
            return out + [f"Strict mode: Offset {self.offset} block status mismatch!"]
        return out + [f"Content mismatch at offset {self.offset}!"]

    def to_json(self) -> dict:
        return {"identical": self.identical, "size-a": self.size_a, "size-b": self.size_b,
                "reason": self.reason, "offset": self.offset}


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[lo, hi) ranges sorted and merged."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif hi > lo:
            out.append((lo, hi))
    return out


def _allocated(source, size: int) -> list[tuple[int, int]]:
    """Sector-rounded [lo, hi) ranges a source may hold data in, below `size`."""
    return _merge([(s // SECTOR_SIZE * SECTOR_SIZE, min(size, -(-(s + n) // SECTOR_SIZE) * SECTOR_SIZE))
                   for s, n in source.data_ranges() if s < size])


def _first_allocation_difference(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> int | None:
    """The first offset covered by exactly one of two merged range lists."""
    edges = sorted({x for r in a + b for x in r})
    def covered(ranges, x):
        return any(lo <= x < hi for lo, hi in ranges)
    for x in edges:
        if covered(a, x) != covered(b, x):
            return x
    return None


def _pieces(ranges: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for lo, hi in ranges:
        pos = lo
        while pos < hi:
            step = min(CHUNK - pos % CHUNK, hi - pos)
            yield pos, step
            pos += step


def _first_different_sector(x: bytes, y: bytes) -> int:
    for pos in range(0, len(x), SECTOR_SIZE):
        if x[pos : pos + SECTOR_SIZE] != y[pos : pos + SECTOR_SIZE]:
            return pos
    raise AssertionError("buffers are equal")


def compare_sources(a, b, strict: bool = False, progress: Progress | None = None) -> Comparison:
    """Compare two open sources (see `convert.open_source`)."""
    progress = progress or QUIET
    size_a, size_b = a.virtual_size, b.virtual_size
    if strict and size_a != size_b:
        return Comparison(False, size_a, size_b, "size")
    common = min(size_a, size_b)
    progress.set_total(max(size_a, size_b))
    if hasattr(a, "image") and hasattr(b, "image"):  # both Lamina: the metadata narrows the search
        from .layers import diff

        candidates = _merge([(lo, min(hi, common)) for lo, hi in diff(a.image, b.image) if lo < common])
    else:
        candidates = _merge(_allocated(a, common) + _allocated(b, common))
    allocation = _first_allocation_difference(_allocated(a, common), _allocated(b, common)) if strict else None
    done = 0
    for (pos, step, x), (_, _, y) in zip(a.read_pieces(_pieces(candidates)), b.read_pieces(_pieces(candidates))):
        if allocation is not None and allocation < pos + step:
            return Comparison(False, size_a, size_b, "allocation", allocation)
        progress.update(pos - done)
        if x != y:
            offset = pos + _first_different_sector(x, y)
            if allocation is not None and allocation <= offset:
                return Comparison(False, size_a, size_b, "allocation", allocation)
            return Comparison(False, size_a, size_b, "content", offset)
        progress.update(step)
        done = pos + step
    if allocation is not None:
        return Comparison(False, size_a, size_b, "allocation", allocation)
    larger = a if size_a > size_b else b
    for pos, step in _pieces(_allocated(larger, larger.virtual_size)):
        if pos + step <= common:
            continue
        lo = max(pos, common)
        data = larger.read(lo, pos + step - lo)
        if not is_zero(data):
            return Comparison(False, size_a, size_b, "content", lo + _first_different_sector(data, bytes(len(data))))
    progress.update(max(size_a, size_b) - done)
    return Comparison(True, size_a, size_b)


def compare(a: str, b: str, fmt_a: str | None = None, fmt_b: str | None = None, strict: bool = False,
            progress: Progress | None = None, allow_bases: tuple[str, ...] = (), force_share: bool = False) -> Comparison:
    """Compare two disks of any format convert reads: `IMAGE`, `IMAGE@SNAP`, raw files, qemu-img formats."""
    from .convert import open_source

    first = open_source(a, fmt_a, allow_bases, force_share)
    try:
        second = open_source(b, fmt_b, allow_bases, force_share)
        try:
            return compare_sources(first, second, strict, progress)
        finally:
            second.close()
    finally:
        first.close()
