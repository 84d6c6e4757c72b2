"""The one storage interface everything goes through (C1).

`impl/` and the spec's `check` only ever touch an image through these
methods, so the crash simulator can put a recording backend in place of the
operating system's and replay any prefix, subset or tear of the operations.
One capability is optional (`Viewable`): read-only windows onto a file's
bytes, which `check` reads its data through where a backend offers them
(the OS backend maps the file, the memory backend hands out its bytes), and
by `pread` otherwise.

Hostile names (R10, F-OPEN-001..003 in the format document).  The interface
itself is the one guard every opened or removed file goes through, so no
caller can forget it:

- `open` opens exactly the name given: a symbolic link as its last component,
  or as the directory holding it, is refused unless the caller says
  `follow_symlinks` (only for the top file the user named, as qemu follows a
  symlinked image); it never blocks (a
  FIFO or device opens without waiting and is then refused); and what it
  opened must be a regular file, judged on the open file itself, not on the
  name (which another process could swap in between);
- `stat` describes the name itself (as lstat): a symbolic link is reported
  as neither a file nor a directory, and is never followed;
- `unlink` removes only a regular file (never a link's target, never a
  directory, never a FIFO).

Which names a caller may open or remove at all (inside the image's own layer
directory, a real directory) is the spec's rule, in `references.py`.
"""
from __future__ import annotations

from types import TracebackType
from typing import Protocol

import attrs


@attrs.frozen
class FileStat:
    """What the format needs to know of a name itself (never of a link's target): its kind, how many names share it."""

    is_file: bool
    nlink: int
    is_dir: bool = False
    identity: tuple[int, int] | None = None  # (device, inode): two names of one file have the same (a top and its twin)


class File(Protocol):
    """An open file: positional I/O, sparse-file operations and durability."""

    def pread(self, offset: int, length: int) -> bytes:
        """Bytes at [offset, offset+length); short only at end of file (holes read as zero)."""

    def pwrite(self, offset: int, data: bytes) -> None: ...

    def truncate(self, length: int) -> None: ...

    def punch_hole(self, offset: int, length: int) -> None:
        """Make the range read as zero and free whole blocks of it; the length is kept."""

    def fsync(self) -> None:
        """Make every earlier operation on this file durable."""

    def size(self) -> int: ...

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of the ranges that may hold data; everything else is a hole."""

    def lock(self, exclusive: bool) -> None:
        """Lock the whole file, shared or exclusive, without waiting; raise ImageLocked when another
        open file holds a conflicting lock.  `close` releases it.

        As QEMU locks its images (R11): the writer of an image holds an
        exclusive lock on its file, every reader (a layer below a writer
        included) a shared one.  A lock belongs to the open file, not to the
        process (on Linux an OFD lock), so two opens in one process conflict
        too, and closing another descriptor of the same file never drops it.
        """

    def close(self) -> None: ...


class FileView(Protocol):
    """A read-only window onto bytes of a file, held for a `with` block: `with view as data:` gives a
    memoryview, released (with its mapping, if any) when the block ends.  No slice of `data` may outlive
    the block: a mapping cannot be closed while a view of it is exported."""

    def __enter__(self) -> memoryview: ...

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None: ...


class Viewable(Protocol):
    """An optional capability of a `File`: its bytes read in place, without a copy into a buffer.

    A reader that walks many megabytes (`check`) takes a window where the
    backend offers one and reads by `pread` otherwise; both give the same
    bytes.  The OS backend maps the file (read-only); the memory backend
    hands out a view of the bytes it holds.
    """

    def view(self, offset: int, length: int) -> FileView | None:
        """The bytes at [offset, offset+length), short only at end of file (holes read as zero), as `pread`
        gives them; None when this file cannot offer a window now (the caller reads by `pread`)."""


class BytesView:
    """A `FileView` of bytes already in hand (the memory backend's)."""

    __slots__ = ("_view",)

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def __enter__(self) -> memoryview:
        return self._view

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._view.release()


class Storage(Protocol):
    """A directory tree of files: open, create, and the namespace operations."""

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> File:
        """Open the regular file `path`; refuse (UnsafeFile) a symlink unless `follow_symlinks`, or anything not a regular file.

        Never blocks: a FIFO is refused, not waited on.
        """

    def create(self, path: str) -> File:
        """Create a new empty file; fail if it exists."""

    def rename(self, src: str, dst: str) -> None: ...

    def link(self, src: str, dst: str) -> None:
        """A second name for the same file (a frozen layer shared by two images)."""

    def mkdir(self, path: str) -> None: ...

    def listdir(self, path: str) -> list[str]: ...

    def unlink(self, path: str) -> None:
        """Remove the name of a regular file; refuse (UnsafeFile) a symlink, a directory or any other kind."""

    def exists(self, path: str) -> bool: ...

    def stat(self, path: str) -> FileStat:
        """The name itself, a symlink not followed; raises FileNotFoundError when nothing has that name."""

    def fsync_dir(self, path: str) -> None:
        """Make creates, renames and unlinks in the directory `path` durable."""
