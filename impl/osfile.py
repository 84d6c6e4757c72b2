"""The operating system's backend of the storage interface (C1)."""
from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import struct

from lamina.spec.errors import ImageLocked, ImageTooLarge, LaminaError, UnsafeFile
from lamina.spec.storage import BytesView, FileStat, FileView

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@functools.cache
def _libc():  # -> (the C library, the ctypes module)
    """libc with `fallocate` typed, loaded at the first punch: importing ctypes costs every command's start-up.

    The running interpreter is linked against libc: CDLL(None) finds fallocate
    there, where ctypes.util.find_library would fork `ldconfig`.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if hasattr(libc, "sync_file_range"):
        libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return libc, ctypes


_SYNC_FILE_RANGE_WRITE = 0x02


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing the dirty pages of a file range to the device, without waiting (`sync_file_range`'s WRITE).

    Only a hint, where the host has it: nothing is durable until an fsync.
    A bulk copy that calls it behind its writes has the device working
    while it copies, so that its one fsync at the end finds little left.
    """
    libc, _ = _libc()
    if length > 0 and hasattr(libc, "sync_file_range"):
        libc.sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # a failure is harmless: fsync decides


class StorageError(LaminaError):
    """The host refused an operation on an image file."""


def _host_error(exc: OSError, what: str, path: str) -> LaminaError:
    if exc.errno == errno.EFBIG:
        return ImageTooLarge(f"{path}: the host file system cannot hold a file this large ({what})")
    if exc.errno == errno.ENOSPC:
        return StorageError(f"{path}: no space left on the host file system ({what})")
    return StorageError(f"{path}: {what}: {exc.strerror}")


def _kind(mode: int) -> str:
    """What a non-regular name is, for a message."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "of another kind"


class _Mapping:
    """A `FileView` over a read-only shared mapping of part of a file: unmapped when the `with` block ends.

    A window that is read whole at once (`check`'s) has its pages read in when it is made; one held
    across a long copy (`convert`'s, `sequential`) is faulted in as it is read, the host told the
    order, so that a sparse file's holes are never populated.
    """

    __slots__ = ("_map", "_view")

    def __init__(self, fd: int, offset: int, length: int, sequential: bool = False) -> None:
        import mmap  # only a walk that maps pays for the import

        start = offset - offset % mmap.ALLOCATIONGRANULARITY  # a mapping starts on a page boundary
        flags = mmap.MAP_SHARED | (0 if sequential else getattr(mmap, "MAP_POPULATE", 0))
        self._map = mmap.mmap(fd, offset + length - start, flags, mmap.PROT_READ, offset=start)
        if sequential and hasattr(mmap, "MADV_SEQUENTIAL"):
            self._map.madvise(mmap.MADV_SEQUENTIAL)  # read ahead, drop behind
        self._view = memoryview(self._map)[offset - start :]

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            if kind is None:
                raise  # a slice of the view outlived the block: a bug of the reader
            # An exception's traceback holds the reader's frames, and their slices: the mapping is unmapped with them.


class OsFile:
    """A file on the host, through positional system calls."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._punch_supported = True
        self._locked = False  # this open file holds a lock (`lock`), which keeps other writers from truncating it

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def pread_into(self, offset: int, buffer: memoryview) -> int:
        """`pread` into a caller's buffer (short only at end of file): a walk over many megabytes reuses one
        buffer instead of a new object per read, whose pages the host would map in afresh each time."""
        done = 0
        while done < len(buffer):
            n = os.preadv(self._fd, [buffer[done:]], offset + done)
            if n <= 0:
                break
            done += n
        return done

    def view(self, offset: int, length: int, sequential: bool = False) -> FileView | None:
        """The bytes at [offset, offset+length) read in place through a read-only mapping (`Viewable`), short
        only at end of file; None unless this open file holds a lock of its own.

        Why the lock: reading a page of a mapping past the end of its file
        raises SIGBUS, which kills the process.  The window is cut to the
        file's size when it is made, and a file shrinks under it only if
        someone truncates it meanwhile.  Every writer of the format holds an
        exclusive lock on each file it changes (R11, F-LOCK-001), which a
        lock held here, shared or exclusive, excludes for as long as the file
        is open; and this process truncates no file while it reads one
        through a window.  Without a lock of its own (`--force-share`, or
        the file a caller locks through another open, which may be
        released first) the file is read by `pread`, which a truncation
        only cuts short.
        """
        if not self._locked:
            return None
        length = max(0, min(length, self.size() - offset))
        if length == 0:
            return BytesView(b"")  # an empty mapping is refused (EINVAL): nothing to map
        return _Mapping(self._fd, offset, length, sequential)

    def pwrite(self, offset: int, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                done = os.pwrite(self._fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as exc:
            raise _host_error(exc, f"write of {len(data)} bytes at {offset}", self.path) from None

    def truncate(self, length: int) -> None:
        try:
            os.ftruncate(self._fd, length)
        except OSError as exc:
            raise _host_error(exc, f"set length to {length}", self.path) from None

    def punch_hole(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        try:  # a range that is a hole already needs no punch (recovery and every root write punch the root's tails)
            if os.lseek(self._fd, offset, os.SEEK_DATA) >= offset + length:
                return
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # no data at or after `offset`
        if self._punch_supported:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            libc, ctypes = _libc()
            if libc.fallocate(self._fd, mode, offset, length) == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise StorageError(f"{self.path}: punch hole at {offset}+{length}: {os.strerror(ctypes.get_errno())}")
            self._punch_supported = False
        end = min(offset + length, self.size())
        while offset < end:
            step = min(end - offset, 1 << 20)
            self.pwrite(offset, bytes(step))
            offset += step

    def fsync(self) -> None:
        os.fsync(self._fd)

    def start_writeback(self, offset: int, length: int) -> None:
        """A hint to the host (`start_writeback`); not part of the storage interface, which has no need of it."""
        start_writeback(self._fd, offset, length)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def allocated_bytes(self) -> int:
        return os.fstat(self._fd).st_blocks * 512

    def data_extents(self) -> list[tuple[int, int]]:
        extents = []
        end = self.size()
        offset = 0
        while offset < end:
            try:
                start = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            stop = os.lseek(self._fd, start, os.SEEK_HOLE)
            extents.append((start, stop - start))
            offset = stop
        return extents

    def lock(self, exclusive: bool) -> None:
        """An OFD lock over the whole file (start 0, length 0: to the end and beyond), as `fcntl(F_OFD_SETLK)`.

        OFD locks belong to the open file description: two opens in one
        process conflict, and closing another descriptor does not drop them
        (POSIX locks would do both wrong).
        """
        kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
        request = struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)  # struct flock; l_pid must be 0
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, request)
            self._locked = True
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise ImageLocked(f"{self.path}: is locked by another process "
                                  "(use -U/--force-share for read-only inspection)") from None
            raise StorageError(f"{self.path}: cannot lock: {exc.strerror}") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._locked = False


class OsStorage:
    """Files and directories of the host."""

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> OsFile:
        """The guarded open of the storage interface: no symlink unless asked, never blocking, a regular file."""
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(path, flags) if follow_symlinks else self._open_without_links(path, flags)
        except OSError as exc:
            if not follow_symlinks and exc.errno in (errno.ELOOP, errno.ENOTDIR) and (
                    os.path.islink(path) or os.path.islink(os.path.dirname(path) or ".")):  # only to name the refusal
                raise UnsafeFile(f"{path}: the name or its directory is a symbolic link; refusing to follow it") from None
            if exc.errno == errno.EISDIR:
                raise UnsafeFile(f"{path}: is a directory, not a regular file") from None
            raise StorageError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise UnsafeFile(f"{path}: is {_kind(mode)}, not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return OsFile(path, fd)

    @staticmethod
    def _open_without_links(path: str, flags: int) -> int:
        """Open through a descriptor of the directory, following neither it nor the name (no link swapped in between)."""
        directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.open(os.path.basename(path), flags | os.O_NOFOLLOW, dir_fd=directory)
        finally:
            os.close(directory)

    def create(self, path: str) -> OsFile:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageError(f"{path}: cannot create: {exc.strerror}") from None
        return OsFile(path, fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def link(self, src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError as exc:
            raise StorageError(f"{dst}: cannot link to {src}: {exc.strerror}") from None

    def mkdir(self, path: str) -> None:
        os.mkdir(path)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def unlink(self, path: str) -> None:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeFile(f"{path}: is {_kind(mode)}; only regular files are ever removed")
        os.unlink(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def stat(self, path: str) -> FileStat:
        info = os.lstat(path)
        return FileStat(stat.S_ISREG(info.st_mode), info.st_nlink, stat.S_ISDIR(info.st_mode), (info.st_dev, info.st_ino))

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
