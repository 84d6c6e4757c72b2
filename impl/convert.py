"""Copying guest contents between raw files, Lamina images and QEMU's formats, keeping holes and zeroes sparse.

Raw and Lamina are read and written here; qcow2, VMDK, VHDX, VDI and every
other format `qemu-img` knows go through a private `qemu-nbd` (`qemu.py`),
directly, with no temporary raw copy.  Internal snapshots of a foreign
source become Lamina snapshots of the same names when the target is Lamina.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterable, Iterator

from lamina.spec.errors import InvalidArgument, LaminaError
from lamina.spec.layout import SECTOR_SIZE
from lamina.spec.structures import ROOT_MAGIC
from lamina.spec.zeros import is_zero

from .image import Image
from .layers import open_target, parse_target
from .osfile import OsFile, OsStorage, start_writeback
from .progress import QUIET, Progress

CHUNK = 1 << 20  # bytes a piece: small enough to stay in the cache from its read to its write and checksum
NATIVE = ("raw", "lamina")


def detect_format(path: str) -> str:
    """`lamina` when the file starts with a root copy's magic, a QEMU format its magic names, else `raw`.

    `IMAGE@SNAPSHOT` is the format of IMAGE (Lamina, or a qcow2 with internal snapshots).
    """
    image, snap = parse_target(path)
    if snap is None:
        file = OsStorage().open(path, writable=False, follow_symlinks=True)  # the guarded open: a FIFO never blocks
        try:
            head = file.pread(0, len(ROOT_MAGIC))
        finally:
            file.close()
        if head == ROOT_MAGIC:
            return "lamina"  # and the qemu module, with its imports, stays unloaded
    from .qemu import probe_format

    if snap is not None:
        return probe_format(image) or "lamina"
    return probe_format(path) or "raw"


def _map_readonly(file: object) -> "tuple[object, memoryview] | None":
    """A read-only mapping of the whole file held across a copy, through the OS backend's window
    (`OsFile.view`, which maps a file only while this open file holds a lock: its docstring says why);
    the window and its view, or None where there is none to be had.

    None for a backend without windows, an unlocked file, an empty file, and one larger than the address
    space takes (a sparse file of a petabyte-sized disk): the caller then reads with `pread`.
    """
    view = getattr(file, "view", None)
    size = file.size() if view is not None else 0  # type: ignore[attr-defined]
    if size <= 0:
        return None
    try:
        window = view(0, size, sequential=True)
        return None if window is None else (window, window.__enter__())
    except (OSError, ValueError, OverflowError):
        return None


def _unmap(held: "tuple[object, memoryview] | None") -> None:
    """Unmap, unless a caller still holds a view of it (the last piece of a copy): it then goes with that view."""
    if held is not None:
        try:
            held[0].__exit__(None, None, None)  # type: ignore[attr-defined]
        except BufferError:
            pass


class RawSource:
    """A raw file read through the storage interface, so its holes are seen as holes.

    With `mapped`, a copy reads it through a read-only mapping: each piece is
    a view of the mapping (no copy into the process; checksums and zero tests
    run on the mapped pages, and the target's `pwrite` copies from them once).
    A mapped file that shrinks under the mapping makes a read of the lost
    pages raise SIGBUS, which kills the process, so the file is mapped only
    when both hold: it is a regular file (the guarded open refuses anything
    else), and this process holds a shared lock on it (the OFD lock readers
    of images take, R11), which keeps out every writer that locks, as Lamina
    and QEMU do; and only the size it had at open is mapped.  When the lock
    is refused (a writer has the file open), or with `force_share`, or for an
    empty file (a length 0 cannot be mapped), it is read with `pread`, which
    sees a shrunk file as a short read, padded with zeros, not a signal.
    """

    def __init__(self, path: str, mapped: bool = False, force_share: bool = False) -> None:
        self._file = OsStorage().open(path, writable=False, follow_symlinks=True)  # a file the user named
        self.virtual_size = self._file.size()
        self._held: tuple[object, memoryview] | None = None
        if mapped and not force_share and self.virtual_size > 0:
            try:
                self._file.lock(exclusive=False)
            except LaminaError:
                return  # another process may write it (or the host has no such lock): plain reads
            try:
                self._held = _map_readonly(self._file)
            except BaseException:
                self._file.close()
                raise

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        yield from self._file.data_extents()

    def read(self, offset: int, length: int) -> bytes:
        return self._file.pread(offset, length).ljust(length, b"\0")

    def _view(self, offset: int, length: int) -> bytes | memoryview:
        """The bytes at [offset, offset+length), a view of the mapping where it covers them, past the end zero."""
        if self._held is None:
            return self.read(offset, length)
        mapping, size = self._held[1], self.virtual_size
        if offset + length <= size:
            return mapping[offset : offset + length]
        inside = max(0, size - offset)
        return bytes(mapping[offset : offset + inside]) + bytes(length - inside)

    def read_pieces(self, pieces: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, bytes | memoryview]]:
        return ((pos, n, self._view(pos, n)) for pos, n in pieces)

    def close(self) -> None:
        _unmap(self._held)
        self._held = None
        self._file.close()


class LaminaSource:
    """`IMAGE` or `IMAGE@SNAPSHOT` as the guest sees it: through its whole chain of snapshots and bases.

    With `mapped`, a copy reads the top layer's file through a read-only
    mapping: a piece this layer holds whole itself, in one region, with its
    bytes local (`Image.own_file_range`), is a view of the mapping; any other
    piece is read by `Image.read` as before.  The file is mapped only when
    it was opened with its shared lock (not `force_share`): every writer of a
    Lamina image holds the exclusive lock, so the file cannot shrink under
    the mapping, whose lost pages would raise SIGBUS (see `RawSource`).
    The bytes are what `Image.read` returns: the maps chosen at open were
    verified (their CRC32C and generation); data clusters are read as
    `Image.read` reads them, without their data checksums (`check` and
    `scrub` verify those).
    """

    def __init__(self, path: str, allow_bases: tuple[str, ...] = (), force_share: bool = False,
                 mapped: bool = False) -> None:
        self._image = open_target(path, allow_bases=allow_bases, force_share=force_share)
        self.virtual_size = self._image.virtual_size
        self.image = self._image
        self._held: tuple[object, memoryview] | None = None
        file = self._image.file
        if mapped and not force_share:
            try:
                self._held = _map_readonly(file)
            except BaseException:
                self._image.close()
                raise

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        for start, end in self._image.guest_data_ranges():
            yield start, end - start

    def read(self, offset: int, length: int) -> bytes:
        return self._image.read(offset, length)

    def _view(self, offset: int, length: int) -> bytes | memoryview:
        if self._held is not None:
            at = self._image.own_file_range(offset, length)
            if at is not None and at + length <= len(self._held[1]):
                return self._held[1][at : at + length]
        return self.read(offset, length)

    def read_pieces(self, pieces: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, bytes | memoryview]]:
        return ((pos, n, self._view(pos, n)) for pos, n in pieces)

    def close(self) -> None:
        _unmap(self._held)
        self._held = None
        self._image.close()


class ForeignSource:
    """An image of a QEMU format (or one of its internal snapshots, `IMAGE@SNAP`), read through qemu-nbd."""

    def __init__(self, path: str, fmt: str, snapshot_id: str | None = None) -> None:
        from .qemu import Export, QemuError, image_info

        image, snap = parse_target(path)
        if snap is not None and snapshot_id is None:
            found = [s for s in image_info(image, fmt).get("snapshots", []) if s["name"] == snap]
            if not found:
                raise QemuError(f"{image}: no internal snapshot named {snap!r}")
            snapshot_id = found[0]["id"]
        self._export = Export(image, fmt, snapshot_id=snapshot_id)
        self._client = self._export.client
        self.virtual_size = self._client.size

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        yield from self._client.data_ranges()

    def read(self, offset: int, length: int) -> bytes:
        inside = max(0, min(length, self.virtual_size - offset))
        return (self._client.read(offset, inside) if inside else b"") + bytes(length - inside)

    def read_pieces(self, pieces: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, bytes]]:
        """Pieces read with several requests in flight (`NbdClient.reads`); a piece's part past the end reads zero.

        (QEMU rounds every size to whole sectors, so a piece never starts past the end: `_apply_state` rounds the same way.)
        """
        size = self.virtual_size
        asked: deque[int] = deque()

        def clipped() -> Iterator[tuple[int, int]]:
            for pos, n in pieces:
                if pos >= size:
                    raise InvalidArgument(f"read at {pos} is past the end ({size}) of the export")
                asked.append(n)
                yield pos, min(n, size - pos)
        for pos, inside, data in self._client.reads(clipped()):
            n = asked.popleft()
            yield pos, n, data if inside == n else data + bytes(n - inside)

    def close(self) -> None:
        self._export.close()

    def abort(self) -> None:
        self._export.abort()


def open_source(path: str, fmt: str | None = None, allow_bases: tuple[str, ...] = (), force_share: bool = False,
                mapped: bool = False):
    """A reader of any format: `virtual_size`, `data_ranges()`, `read(offset, length)`, `read_pieces`, `close()`.

    `mapped`: a raw or Lamina source's `read_pieces` may yield views of a
    read-only mapping of its file (see `RawSource`), valid until `close`.
    """
    fmt = fmt or detect_format(path)
    if fmt == "raw":
        return RawSource(path, mapped, force_share)
    if fmt == "lamina":
        return LaminaSource(path, allow_bases, force_share, mapped)
    return ForeignSource(path, fmt)


def _pieces(ranges: Iterator[tuple[int, int]], size: int, chunk: int = CHUNK) -> Iterator[tuple[int, int]]:
    """Chunks of at most `chunk` bytes, aligned to `chunk`, covering `ranges` below `size`."""
    for start, length in ranges:
        pos, end = start, min(start + length, size)
        while pos < end:
            step = min(chunk - pos % chunk, end - pos)
            yield pos, step
            pos += step


def _nonzero_runs(data: bytes, pos: int, grain: int) -> list[tuple[int, int]]:
    """[lo, hi) offsets into `data` (read at guest offset `pos`) of the runs of `grain`-aligned pieces that are
    not all zero: what a copy writes; the zero pieces between stay holes."""
    if is_zero(data):
        return []
    view = memoryview(data)
    runs: list[tuple[int, int]] = []
    lo = 0
    while lo < len(data):
        hi = min(len(data), lo + grain - (pos + lo) % grain)
        if not is_zero(view[lo:hi]):
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((lo, hi))
        lo = hi
    return runs


CACHE_MODES = ("writeback", "unsafe")  # `-t`: as qemu-img's cache modes of the target, the two that apply here


class UnsafeStorage(OsStorage):
    """The host's storage with every fsync of a file or directory left out (`convert -t unsafe`).

    The writes, and their order as the program makes them, are those of the
    durable copy; only the points where the commit protocol waits for the
    device (F-PROTO-*) are gone, so across a power loss the host may keep
    any subset of them.
    """

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> OsFile:
        return _no_sync(super().open(path, writable, follow_symlinks))

    def create(self, path: str) -> OsFile:
        return _no_sync(super().create(path))

    def fsync_dir(self, path: str) -> None:
        pass


def _no_sync(file: OsFile) -> OsFile:
    file.fsync = lambda: None  # type: ignore[method-assign]
    file.start_writeback = lambda offset, length: None  # type: ignore[method-assign]  # nothing waits for the device
    return file


def check_cache(cache: str) -> str:
    if cache not in CACHE_MODES:
        raise InvalidArgument(f"invalid cache mode {cache!r} for the target (-t): expected one of {', '.join(CACHE_MODES)}")
    return cache


def convert(src: str, dst: str, dst_format: str = "lamina", src_format: str | None = None,
            cluster_size: int = 1 << 16, progress: Progress | None = None,
            allow_bases: tuple[str, ...] = (), force_share: bool = False, options: str | None = None,
            notes: list[str] | None = None, cache: str = "writeback") -> int:
    """Copy the guest contents of `src` into a new `dst`; return the bytes of data written.

    Only ranges the source may hold (its chain's extents, a raw file's data,
    a foreign image's block status) are read, and pieces of a cluster
    (`cluster_size`) that are all zero are not written, so holes and zeroes
    stay holes.  A foreign source with internal snapshots and a Lamina
    target: see `import_snapshots`.

    `cache` is the target's: `writeback` (the default) makes the copy
    durable before returning; `unsafe` makes no fsync at all (qemu-img
    convert's default), for a raw or Lamina target: the bytes are the same,
    but until the host writes them back a power loss can keep any part of
    them (see `UnsafeStorage`).
    """
    check_cache(cache)
    progress = progress or QUIET
    src_format = src_format or detect_format(src)
    if cache == "unsafe" and dst_format not in NATIVE:
        raise InvalidArgument(f"-t unsafe applies to a lamina or raw target, not {dst_format} (written through qemu-nbd)")
    if os.path.lexists(dst):
        raise InvalidArgument(f"{dst}: already exists")
    if src_format not in NATIVE and dst_format == "lamina" and parse_target(src)[1] is None:
        from .qemu import image_info, snapshots

        if snapshots(image_info(src, src_format)):
            if cache == "unsafe":
                raise InvalidArgument(f"{src}: a source with internal snapshots is imported durably; -t unsafe does "
                                      "not apply")
            return import_snapshots(src, src_format, dst, cluster_size, progress, notes)
    source = open_source(src, src_format, allow_bases, force_share, mapped=True)
    written = 0
    try:
        size = source.virtual_size
        progress.set_total(size)
        write, finish, prepare, settle = _target(dst, dst_format, size, cluster_size, options, cache)
        done = 0
        ok = False
        try:
            ranges = list(source.data_ranges())  # first: a foreign source's block status never interleaves its reads
            prepare(ranges)
            for pos, step, data in source.read_pieces(_pieces(iter(ranges), size)):
                progress.update(pos - done)  # the hole skipped before this piece
                for lo, hi in _nonzero_runs(data, pos, cluster_size):
                    write(pos + lo, data if hi - lo == len(data) else memoryview(data)[lo:hi])
                    written += hi - lo
                del data  # a view of the source's mapping: none may outlive it
                settle(pos, step)
                progress.update(step)
                done = pos + step
            progress.update(size - done)
            ok = True
        finally:
            finish(ok)
    finally:
        source.close()
    return written


def _target(dst: str, fmt: str, size: int, cluster_size: int, options: str | None, cache: str = "writeback"):
    """(write(offset, data), finish(ok), prepare(ranges), settle(offset, length)) for a new image of `fmt` at `dst`.

    `prepare` is told the (offset, length) ranges that the writes will fall
    in, before the first; `settle` that a guest range is written, so that
    its file bytes can start on their way to the device (`start_writeback`):
    the one fsync at the end then waits for little.
    """
    if fmt == "lamina":
        # A raw file's last partial sector reads as zero-padded, as qemu-img rounds it.
        target = Image.create(dst, -(-size // SECTOR_SIZE) * SECTOR_SIZE, cluster_size,
                              storage=UnsafeStorage() if cache == "unsafe" else None)
        virtual = target.virtual_size
        window = max(1, target.max_intents // 2) * target.geometry.region_span  # regions listed per root write
        ahead: dict[int, list[tuple[int, int]]] = {}  # window -> the ranges the copy will write in it
        listed = [-1]  # the window whose regions are listed

        def prepare(ranges: list[tuple[int, int]]) -> None:
            for p, n in _pieces(iter(ranges), virtual, window):
                ahead.setdefault(p // window, []).append((p, n))

        def write_lamina(offset: int, data: bytes) -> None:
            if offset // window != listed[0]:  # rule 1 for the window's writes in one root write, not one per group
                listed[0] = offset // window
                target.list_intents(ahead.pop(listed[0], []))
            end = offset + len(data)
            lo, hi = -(-offset // cluster_size) * cluster_size, end // cluster_size * cluster_size
            if hi <= lo:
                target.write(offset, data)
                return
            view = memoryview(data)
            if lo > offset:
                target.write(offset, bytes(view[: lo - offset]))
            target.write_clusters(lo, view if (lo, hi) == (offset, end) else view[lo - offset : hi - offset])
            if end > hi:
                target.write(hi, bytes(view[hi - offset :]))
        geometry = target.geometry

        def settle_lamina(offset: int, length: int) -> None:
            file = target.file
            if length > 0 and hasattr(file, "start_writeback"):
                lo = geometry.guest_to_file(offset)
                file.start_writeback(lo, geometry.guest_to_file(offset + length - 1) + 1 - lo)
        return write_lamina, lambda ok: target.close(), prepare, settle_lamina
    if fmt == "raw":
        raw = open(dst, "xb")
        raw.truncate(size)

        def write(offset: int, data: bytes) -> None:
            view = memoryview(data)
            while view:
                done = os.pwrite(raw.fileno(), view, offset)
                view, offset = view[done:], offset + done

        durable = cache != "unsafe"

        def finish(ok: bool) -> None:
            try:
                if ok:
                    raw.flush()
                    if durable:
                        os.fsync(raw.fileno())
            finally:
                raw.close()

        def settle_raw(offset: int, length: int) -> None:
            if durable:
                start_writeback(raw.fileno(), offset, length)
        return write, finish, lambda ranges: None, settle_raw
    from .qemu import Export, create_image

    create_image(dst, fmt, size, options)
    try:
        export = Export(dst, fmt, writable=True)
    except BaseException:
        os.unlink(dst)
        raise
    client = export.client

    def finish_foreign(ok: bool) -> None:
        if ok:
            client.flush()
            export.close()
        else:
            export.abort()
    return client.submit_write, finish_foreign, lambda ranges: None, lambda offset, length: None  # writes pipelined; the final flush waits for every reply


def _differing_runs(old: bytes, new: bytes) -> Iterator[tuple[int, int]]:
    """[lo, hi) byte runs, in whole sectors, where two equally long buffers differ."""
    lo = None
    for pos in range(0, len(new), SECTOR_SIZE):
        if old[pos : pos + SECTOR_SIZE] != new[pos : pos + SECTOR_SIZE]:
            lo = pos if lo is None else lo
        elif lo is not None:
            yield lo, pos
            lo = None
    if lo is not None:
        yield lo, len(new)


def _apply_state(image: Image, source: ForeignSource, progress: Progress) -> int:
    """Make `image` read as `source` by writing only the sectors where they differ; return bytes written."""
    size = -(-source.virtual_size // SECTOR_SIZE) * SECTOR_SIZE
    if image.virtual_size != size:
        image.resize(size)
    ranges = sorted([(lo, hi - lo) for lo, hi in image.guest_data_ranges()] + list(source.data_ranges()))
    merged: list[tuple[int, int]] = []
    for start, length in ranges:
        if merged and start <= merged[-1][0] + merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], start + length - merged[-1][0]))
        else:
            merged.append((start, length))
    written = done = 0
    for pos, step, new in source.read_pieces(_pieces(iter(merged), size)):
        progress.update(pos - done)
        done = pos + step
        old = image.read(pos, step)
        if new != old:
            for lo, hi in _differing_runs(old, new):
                piece = new[lo:hi]
                if is_zero(piece):
                    image.write_zeroes(pos + lo, hi - lo)
                else:
                    image.write(pos + lo, piece)
                    written += hi - lo
        progress.update(step)
    progress.update(size - done)
    image.flush()
    return written


def import_snapshots(src: str, fmt: str, dst: str, cluster_size: int = 1 << 16, progress: Progress | None = None,
                     notes: list[str] | None = None) -> int:
    """A new Lamina image holding every internal snapshot of a foreign image, then its current state.

    Snapshots are imported oldest first; each state is written as its
    difference from the one before, and frozen as a Lamina snapshot of the
    same name and guest clock.  QEMU's VM state is not carried over (a
    snapshot's VM-state size is 0 in Lamina), nor its date (the import's time).
    """
    from . import layers
    from .qemu import image_info, snapshots

    progress = progress or QUIET
    info = image_info(src, fmt)
    snaps = snapshots(info)
    progress.set_total(sum(s.get("disk-size", info["virtual-size"]) for s in snaps) + info["virtual-size"])
    written = 0
    image = None
    for snap in snaps + [None]:
        source = ForeignSource(src, fmt, snapshot_id=snap["id"] if snap else None)
        try:
            if image is None:
                image = Image.create(dst, -(-source.virtual_size // SECTOR_SIZE) * SECTOR_SIZE, cluster_size)
            written += _apply_state(image, source, progress)
        except BaseException:
            source.abort()
            if image is not None:
                image.close()
            raise
        source.close()
        if snap is not None:
            image.close()
            clock = snap.get("vm-clock-sec", 0) * 10**9 + snap.get("vm-clock-nsec", 0)
            layers.create_snapshot(dst, snap["name"], None, clock)
            if snap.get("vm-state-size") and notes is not None:
                notes.append(f"snapshot {snap['name']!r}: its {snap['vm-state-size']} bytes of QEMU VM state "
                             "are not carried over")
            image = Image.open(dst)
    image.close()
    return written
