"""Copying guest contents between raw files and Lamina images, keeping holes and zeroes sparse."""
from __future__ import annotations

import os
from typing import Callable, Iterator

from lamina.spec.errors import InvalidArgument
from lamina.spec.structures import ROOT_MAGIC
from lamina.spec.zeros import is_zero

from .image import Image
from .layers import open_target, parse_target
from .osfile import OsStorage

CHUNK = 1 << 20


def detect_format(path: str) -> str:
    """`lamina` when the file starts with a root copy's magic (or names `IMAGE@SNAPSHOT`), else `raw`."""
    if parse_target(path)[1] is not None:
        return "lamina"
    file = OsStorage().open(path, writable=False, follow_symlinks=True)  # the guarded open: a FIFO never blocks
    try:
        return "lamina" if file.pread(0, len(ROOT_MAGIC)) == ROOT_MAGIC else "raw"
    finally:
        file.close()


class RawSource:
    """A raw file read through the storage interface, so its holes are seen as holes."""

    def __init__(self, path: str) -> None:
        self._file = OsStorage().open(path, writable=False, follow_symlinks=True)  # a file the user named
        self.virtual_size = self._file.size()

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        yield from self._file.data_extents()

    def read(self, offset: int, length: int) -> bytes:
        return self._file.pread(offset, length).ljust(length, b"\0")

    def close(self) -> None:
        self._file.close()


class LaminaSource:
    """`IMAGE` or `IMAGE@SNAPSHOT` as the guest sees it: through its whole chain of snapshots and bases."""

    def __init__(self, path: str, allow_bases: tuple[str, ...] = (), force_share: bool = False) -> None:
        self._image = open_target(path, allow_bases=allow_bases, force_share=force_share)
        self.virtual_size = self._image.virtual_size

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        for start, end in self._image.guest_data_ranges():
            yield start, end - start

    def read(self, offset: int, length: int) -> bytes:
        return self._image.read(offset, length)

    def close(self) -> None:
        self._image.close()


def convert(src: str, dst: str, dst_format: str = "lamina", src_format: str | None = None,
            cluster_size: int = 1 << 16, progress: Callable[[int], None] | None = None,
            allow_bases: tuple[str, ...] = (), force_share: bool = False) -> int:
    """Copy the guest contents of `src` into a new `dst`; return the bytes of data written.

    Only ranges that some layer of the source's chain holds are read, and
    chunks that are all zero are not written, so holes and zeroes stay holes.
    """
    src_format = src_format or detect_format(src)
    if src_format not in ("raw", "lamina") or dst_format not in ("raw", "lamina"):
        raise InvalidArgument(f"formats must be raw or lamina, not {src_format!r} -> {dst_format!r}")
    if os.path.lexists(dst):
        raise InvalidArgument(f"{dst}: already exists")
    source = RawSource(src) if src_format == "raw" else LaminaSource(src, allow_bases, force_share)
    written = 0
    try:
        size = source.virtual_size
        if dst_format == "lamina":
            # A raw file's last partial sector reads as zero-padded, as qemu-img rounds it.
            target = Image.create(dst, -(-size // 512) * 512, cluster_size)
            write, finish = target.write, target.close
        else:
            raw = open(dst, "xb")
            raw.truncate(size)

            def write(offset: int, data: bytes) -> None:
                os.pwrite(raw.fileno(), data, offset)

            def finish() -> None:
                raw.flush()
                os.fsync(raw.fileno())
                raw.close()
        try:
            for start, length in source.data_ranges():
                end = min(start + length, size)
                pos = start
                while pos < end:
                    step = min(CHUNK - pos % CHUNK, end - pos)
                    data = source.read(pos, step)
                    if not is_zero(data):
                        write(pos, data)
                        written += step
                    if progress:
                        progress(step)
                    pos += step
        finally:
            finish()
    finally:
        source.close()
    return written
