"""The recording, simulating backend of the storage interface (C1).

Files live in memory as sparse dicts of immutable 4 KiB blocks, so copying a
whole durable state is copying a small dict of references (copy-on-write):
that is what makes thousands of crash states per second possible.  Every
mutating call is appended to a `Trace` as an `Op`, with its data, so that any
prefix, subset or tear of the operations can be materialised again later.
"""
from __future__ import annotations

from lamina.spec.errors import UnsafeFile
from lamina.spec.storage import BytesView, FileStat

import os
from typing import NamedTuple

BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)

# Operation kinds.  Data operations name an inode; namespace operations a directory.
PWRITE = "pwrite"
TRUNCATE = "truncate"
PUNCH = "punch"
FSYNC = "fsync"
CREATE = "create"
RENAME = "rename"
UNLINK = "unlink"
LINK = "link"
MKDIR = "mkdir"
FSYNC_DIR = "fsync_dir"
DATA_KINDS = frozenset({PWRITE, TRUNCATE, PUNCH})
NAMESPACE_KINDS = frozenset({CREATE, RENAME, UNLINK, LINK, MKDIR})


class Op(NamedTuple):
    """One recorded storage operation.  `target` is an inode (data ops) or a directory (namespace ops)."""

    kind: str
    target: int | str
    offset: int = 0  # pwrite/punch offset, truncate length
    length: int = 0  # punch length
    data: bytes = b""  # pwrite data
    path: str = ""  # create/unlink path, rename source
    path2: str = ""  # rename destination
    inode: int = 0  # create: the new inode


class FileData:
    """One inode's bytes: a sparse dict of whole blocks plus the file length."""

    __slots__ = ("blocks", "size")

    def __init__(self, blocks: dict[int, bytes] | None = None, size: int = 0) -> None:
        self.blocks = {} if blocks is None else blocks
        self.size = size

    def copy(self) -> "FileData":
        return FileData(dict(self.blocks), self.size)

    def key(self) -> tuple:
        """A hashable identity of the contents (block bytes hash once and are shared)."""
        return (self.size, tuple(sorted(self.blocks.items())))

    def pread(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        first, last = offset // BLOCK, (end - 1) // BLOCK
        blocks = self.blocks
        if first == last:
            b = blocks.get(first)
            if b is None:
                return bytes(end - offset)
            lo = offset - first * BLOCK
            return b[lo : lo + end - offset]
        parts = [blocks.get(i, ZERO_BLOCK) for i in range(first, last + 1)]
        joined = b"".join(parts)
        lo = offset - first * BLOCK
        return joined[lo : lo + end - offset]

    def pwrite(self, offset: int, data: bytes) -> None:
        if not data:
            return
        end = offset + len(data)
        blocks = self.blocks
        pos = offset
        view = memoryview(data)
        while pos < end:
            index, within = divmod(pos, BLOCK)
            take = min(BLOCK - within, end - pos)
            chunk = view[pos - offset : pos - offset + take]
            if take == BLOCK:
                blocks[index] = bytes(chunk)
            else:
                old = blocks.get(index)
                buf = bytearray(ZERO_BLOCK if old is None else old)
                buf[within : within + take] = chunk
                blocks[index] = bytes(buf)
            pos += take
        if end > self.size:
            self.size = end

    def truncate(self, length: int) -> None:
        if length < self.size:
            blocks = self.blocks
            keep = -(-length // BLOCK)
            for index in [i for i in blocks if i >= keep]:
                del blocks[index]
            within = length % BLOCK
            if within and (keep - 1) in blocks:
                b = blocks[keep - 1]
                blocks[keep - 1] = b[:within] + bytes(BLOCK - within)
        self.size = length

    def punch_hole(self, offset: int, length: int) -> None:
        end = min(offset + length, self.size)
        pos = offset
        blocks = self.blocks
        if end > offset and (end - offset) // BLOCK > len(blocks):
            # A long range over few blocks (a root slot's tail): visit only the blocks there are.
            first, last = offset // BLOCK, (end - 1) // BLOCK
            for index in sorted(i for i in blocks if first <= i <= last):
                lo, hi = max(offset, index * BLOCK), min(end, (index + 1) * BLOCK)
                if hi - lo == BLOCK:
                    del blocks[index]
                else:
                    b = blocks[index]
                    blocks[index] = b[: lo - index * BLOCK] + bytes(hi - lo) + b[hi - index * BLOCK :]
            return
        while pos < end:
            index, within = divmod(pos, BLOCK)
            take = min(BLOCK - within, end - pos)
            if index in blocks:
                if take == BLOCK:
                    del blocks[index]
                else:
                    b = blocks[index]
                    blocks[index] = b[:within] + bytes(take) + b[within + take :]
            pos += take

    def data_extents(self) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        for index in sorted(self.blocks):
            start = index * BLOCK
            if start >= self.size:
                break
            if out and out[-1][0] + out[-1][1] == start:
                out[-1][1] += BLOCK
            else:
                out.append([start, BLOCK])
        if out and out[-1][0] + out[-1][1] > self.size:
            out[-1][1] = self.size - out[-1][0]
        return [(a, b) for a, b in out]


class DiskState:
    """A whole simulated directory tree: names to inodes, inodes to contents."""

    __slots__ = ("names", "files", "next_inode", "dirs")

    def __init__(self, names: dict[str, int] | None = None, files: dict[int, FileData] | None = None,
                 next_inode: int = 1, dirs: set[str] | None = None) -> None:
        self.names = {} if names is None else names
        self.files = {} if files is None else files
        self.next_inode = next_inode
        self.dirs = set() if dirs is None else dirs  # directories made by mkdir (absolute); others exist implicitly

    def copy(self) -> "DiskState":
        return DiskState(dict(self.names), {i: f.copy() for i, f in self.files.items()}, self.next_inode, set(self.dirs))

    def key(self) -> tuple:
        """Hashable identity of everything a reader could observe."""
        return (tuple(sorted(self.names.items())), tuple((i, self.files[i].key()) for i in sorted(self.files)),
                tuple(sorted(self.dirs)))

    def apply(self, op: Op) -> None:
        """Apply one operation as if it had reached the disk whole."""
        kind = op.kind
        if kind in DATA_KINDS:
            f = self.files.get(op.target)
            if f is None:  # its create did not persist: the inode exists, unnamed
                f = self.files[op.target] = FileData()
            if kind == PWRITE:
                f.pwrite(op.offset, op.data)
            elif kind == PUNCH:
                f.punch_hole(op.offset, op.length)
            else:
                f.truncate(op.offset)
        elif kind == CREATE:
            self.names[op.path] = op.inode
            self.files.setdefault(op.inode, FileData())
            self.next_inode = max(self.next_inode, op.inode + 1)
        elif kind == RENAME:
            if op.path in self.names:
                self.names[op.path2] = self.names.pop(op.path)
        elif kind == UNLINK:
            self.names.pop(op.path, None)
        elif kind == LINK:
            if op.path in self.names:
                self.names[op.path2] = self.names[op.path]
        elif kind == MKDIR:
            self.dirs.add(os.path.abspath(op.path))


class Trace:
    """The operations recorded so far, in issue order."""

    def __init__(self) -> None:
        self.ops: list[Op] = []

    def __len__(self) -> int:
        return len(self.ops)


ABSOLUTE_MAX = 4096
_absolute: dict[tuple[str, str], tuple[str, str]] = {}


def _spelled(path: str) -> tuple[str, str]:
    """(absolute path, its directory) of a name: made once per (working directory, name).

    Recovery and check ask for the same few names hundreds of thousands of
    times in a run (`abspath` and `dirname` were a tenth of a tree workload's
    time); a relative name depends on the working directory, so that is part
    of the key.
    """
    key = ("", path) if path.startswith("/") else (os.getcwd(), path)
    spelled = _absolute.get(key)
    if spelled is None:
        where = os.path.abspath(path)
        spelled = (where, os.path.dirname(where))
        if len(_absolute) >= ABSOLUTE_MAX:
            _absolute.clear()
        _absolute[key] = spelled
    return spelled


def _directory_of(path: str) -> str:
    """The directory a name lives in, spelled one way ("vm" and its absolute form are one directory)."""
    return _spelled(path)[1]


def _abspath(path: str) -> str:
    return _spelled(path)[0]


class MemFile:
    """An open in-memory file; records every mutation when its storage records."""

    __slots__ = ("_storage", "_data", "inode", "path", "writable")

    def __init__(self, storage: "MemStorage", inode: int, path: str, writable: bool) -> None:
        self._storage = storage
        self._data = storage.state.files[inode]
        self.inode = inode
        self.path = path
        self.writable = writable

    def _record(self, op: Op) -> None:
        self._storage.record(op)

    def pread(self, offset: int, length: int) -> bytes:
        return self._data.pread(offset, length)

    def view(self, offset: int, length: int) -> BytesView:
        """A window onto the bytes (`Viewable`), as the OS backend maps its files, so that a walk over a
        simulated image takes the same path as over a real one.  Always offered: a truncate replaces the
        blocks it drops, never pulls bytes from under a view (the OS backend's hazard)."""
        return BytesView(self._data.pread(offset, length))

    def pwrite(self, offset: int, data: bytes) -> None:
        self._check_writable()
        data = bytes(data)
        self._record(Op(PWRITE, self.inode, offset, len(data), data))
        self._data.pwrite(offset, data)

    def truncate(self, length: int) -> None:
        self._check_writable()
        self._record(Op(TRUNCATE, self.inode, length))
        self._data.truncate(length)

    def punch_hole(self, offset: int, length: int) -> None:
        self._check_writable()
        if length <= 0:
            return
        self._record(Op(PUNCH, self.inode, offset, length))
        self._data.punch_hole(offset, length)

    def fsync(self) -> None:
        self._record(Op(FSYNC, self.inode))

    def size(self) -> int:
        return self._data.size

    def data_extents(self) -> list[tuple[int, int]]:
        return self._data.data_extents()

    def lock(self, exclusive: bool) -> None:
        """The in-memory equivalent of an OFD lock: held by this open file until it is closed."""
        from lamina.spec.errors import ImageLocked

        holders = self._storage.locks.setdefault(self.inode, {})
        others = [held for holder, held in holders.items() if holder is not self]
        if others and (exclusive or any(others)):
            raise ImageLocked(f"{self.path}: is locked by another process (use -U/--force-share for read-only inspection)")
        holders[self] = exclusive

    def close(self) -> None:
        holders = self._storage.locks.get(self.inode)
        if holders:
            holders.pop(self, None)

    def _check_writable(self) -> None:
        if not self.writable:
            raise PermissionError(f"{self.path}: opened read-only")


class MemStorage:
    """The storage interface over a `DiskState`; records into `trace` when one is attached."""

    def __init__(self, state: DiskState | None = None, trace: Trace | None = None) -> None:
        self.state = DiskState() if state is None else state
        self.trace = trace
        self.locks: dict[int, dict[MemFile, bool]] = {}  # inode -> open files holding a lock -> exclusive

    def record(self, op: Op) -> None:
        if self.trace is not None:
            self.trace.ops.append(op)

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> MemFile:
        """As the interface says; the simulation has no symlinks or FIFOs, but it has directories, refused as files."""
        from lamina.crashsim.errors import CrashsimError

        inode = self.state.names.get(path)
        if inode is None:
            if self._is_dir(path):
                raise UnsafeFile(f"{path}: is a directory, not a regular file")
            raise CrashsimError(f"{path}: cannot open: no such file in the simulated directory")
        return MemFile(self, inode, path, writable)

    def create(self, path: str) -> MemFile:
        from lamina.crashsim.errors import CrashsimError

        if path in self.state.names:
            raise CrashsimError(f"{path}: cannot create: file exists")
        inode = self.state.next_inode
        op = Op(CREATE, _directory_of(path), path=path, inode=inode)
        self.record(op)
        self.state.apply(op)
        return MemFile(self, inode, path, True)

    def rename(self, src: str, dst: str) -> None:
        op = Op(RENAME, _directory_of(dst), path=src, path2=dst)
        self.record(op)
        self.state.apply(op)

    def link(self, src: str, dst: str) -> None:
        from lamina.crashsim.errors import CrashsimError

        if src not in self.state.names or dst in self.state.names:
            raise CrashsimError(f"{dst}: cannot link to {src}: no such source or destination exists")
        op = Op(LINK, _directory_of(dst), path=src, path2=dst)
        self.record(op)
        self.state.apply(op)

    def mkdir(self, path: str) -> None:
        op = Op(MKDIR, _directory_of(path), path=path)
        self.record(op)
        self.state.apply(op)

    def listdir(self, path: str) -> list[str]:
        where = _abspath(path)
        names = {os.path.basename(p) for p in self.state.names if _directory_of(p) == where}
        names |= {os.path.basename(d) for d in self.state.dirs if os.path.dirname(d) == where}
        return sorted(names)

    def unlink(self, path: str) -> None:
        if path not in self.state.names and self._is_dir(path):
            raise UnsafeFile(f"{path}: is a directory; only regular files are ever removed")
        op = Op(UNLINK, _directory_of(path), path=path)
        self.record(op)
        self.state.apply(op)

    def exists(self, path: str) -> bool:
        return path in self.state.names or _abspath(path) in self.state.dirs

    def stat(self, path: str) -> FileStat:
        inode = self.state.names.get(path)
        if inode is None:
            if self._is_dir(path):
                return FileStat(False, 1, True)
            raise FileNotFoundError(2, "No such file or directory", path)
        return FileStat(True, sum(1 for i in self.state.names.values() if i == inode), identity=(0, inode))

    def _is_dir(self, path: str) -> bool:
        """A directory made by mkdir, or one that holds a name (directories exist implicitly)."""
        where = _abspath(path)
        return where in self.state.dirs or any(_directory_of(p) == where for p in self.state.names)

    def fsync_dir(self, path: str) -> None:
        self.record(Op(FSYNC_DIR, _abspath(path or ".")))


class ReadOnlyStorage:
    """A MemStorage seen read-only: files open without write access and the namespace cannot change.

    The oracle runs the spec's `check` through it on each crashed state before
    any recovery, as an administrator would after a power failure; any attempt
    to change the state is an error, so the check is shown to be read-only.
    """

    def __init__(self, storage: MemStorage) -> None:
        self._storage = storage

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> MemFile:
        if writable:
            raise PermissionError(f"{path}: the storage is read-only")
        return self._storage.open(path, False, follow_symlinks)

    def _refuse(self, *args: object) -> None:
        raise PermissionError(f"the storage is read-only (namespace change on {args[0]!r})")

    create = rename = link = mkdir = unlink = fsync_dir = _refuse

    def listdir(self, path: str) -> list[str]:
        return self._storage.listdir(path)

    def exists(self, path: str) -> bool:
        return self._storage.exists(path)

    def stat(self, path: str) -> FileStat:
        return self._storage.stat(path)
