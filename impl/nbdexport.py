"""The NBD export of one image: what each nbdkit request does to the `Image` (used by `nbdkit_plugin.py`).

A thin adapter: every byte goes through the `Image` API (read, write,
flush, discard, write_zeroes, extents), so the export keeps every promise
`impl/` keeps, crash consistency included.  One `Export`, and so one
`Image`, serves every connection; nbdkit runs the requests one at a time
(`SERIALIZE_ALL_REQUESTS`), since an `Image` is not thread-safe.  With one
object behind every connection and a flush that makes every acknowledged
write durable, the export can promise multi-conn: a write acknowledged on
one connection is seen by a read on any other, and a flush on any
connection covers it.
"""
from __future__ import annotations

import errno

from lamina.spec.errors import ImageClosed, InvalidArgument, LaminaError, OutOfBounds, ReadOnlyImage

from .image import Image
from .layers import gaps, open_target, parse_target

ZERO_CHUNK = 4 << 20  # bytes of zeros written at a time for a zero request that must not leave a hole


class FastZeroUnsupported(LaminaError):
    """A fast zero was asked with NO_HOLE: the zeros must then be written, which is not faster than a write."""


def errno_of(exc: BaseException) -> int:
    """The errno an NBD client is told for an exception (EIO unless a better one is known)."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return {ReadOnlyImage: errno.EROFS, OutOfBounds: errno.EINVAL, InvalidArgument: errno.EINVAL,
            ImageClosed: errno.ESHUTDOWN, FastZeroUnsupported: errno.EOPNOTSUPP}.get(type(exc), errno.EIO)


class Export:
    """An open image as an NBD export: the answers of the handshake, and the requests."""

    def __init__(self, image: Image, writable: bool) -> None:
        self.image = image
        self.writable = writable
        self._ranges: list[tuple[int, int]] | None = None  # the chain's data ranges, until the next change

    @classmethod
    def open(cls, target: str, readonly: bool = False, allow_bases: tuple[str, ...] = ()) -> "Export":
        """Open IMAGE (locked exclusive, or shared with `readonly`) or IMAGE@SNAP (always read-only, shared)."""
        snapshot = parse_target(target)[1] is not None
        image = open_target(target, readonly=readonly or snapshot, allow_bases=allow_bases)
        return cls(image, writable=not (readonly or snapshot))

    # ------------------------------------------------------------ the handshake
    def size(self) -> int:
        return self.image.virtual_size

    @property
    def can_zero(self) -> bool:
        """Trim and zero, like write, only on a writable export; a fast zero too: `write_zeroes` punches holes."""
        return self.writable

    can_flush = True  # a no-op when read-only
    can_multi_conn = True  # one Image behind every connection (see the module's docstring)
    can_extents = True

    # ------------------------------------------------------------ requests
    def pread(self, buf: bytearray | memoryview, offset: int) -> None:
        memoryview(buf)[:] = self.image.read(offset, len(buf))

    def pwrite(self, buf: bytes | memoryview, offset: int, fua: bool = False) -> None:
        self._ranges = None
        self.image.write(offset, bytes(buf))
        if fua:
            self.image.flush()

    def flush(self) -> None:
        self.image.flush()

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        self._ranges = None
        self.image.discard(offset, count)
        if fua:
            self.image.flush()

    def zero(self, count: int, offset: int, may_trim: bool, fua: bool = False, fast: bool = False) -> None:
        """Make the range read zero: punched when the client allows a hole, else zeros written (NO_HOLE)."""
        if not may_trim and fast:
            raise FastZeroUnsupported(f"{self.image.path}: a zero that may not leave a hole is written, not fast")
        self._ranges = None
        if may_trim:
            self.image.write_zeroes(offset, count)
        else:
            end = offset + count
            for pos in range(offset, end, ZERO_CHUNK):
                self.image.write(pos, bytes(min(ZERO_CHUNK, end - pos)))
        if fua:
            self.image.flush()

    def extents(self, count: int, offset: int, req_one: bool = False) -> list[tuple[int, int, bool]]:
        """(offset, length, data) runs covering [offset, offset + count), from the maps.

        Data is what some layer of the chain holds; everything else reads
        zero and is a hole.  An image without a base answers from its own
        maps over the window alone (`absent_ranges`); over a chain the
        merged ranges of every layer (`guest_data_ranges`) are computed once
        and kept until a request changes the image.
        """
        end = min(offset + count, self.image.virtual_size)
        if self.image.base is None:
            holes = self.image.absent_ranges(offset, end)
        else:
            if self._ranges is None:
                self._ranges = self.image.guest_data_ranges()
            holes = gaps(self._ranges, offset, end)
        out: list[tuple[int, int, bool]] = []
        pos = offset
        for lo, hi in holes:
            if lo > pos:
                out.append((pos, lo - pos, True))
            out.append((lo, hi - lo, False))
            pos = hi
        if pos < end:
            out.append((pos, end - pos, True))
        return out[:1] if req_one else out

    def close(self) -> None:
        """Flush and close the image (its lock goes with it)."""
        self.image.close()
