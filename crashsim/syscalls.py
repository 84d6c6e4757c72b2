"""Record a real program's file system calls and explore their crash states (C6).

The program runs under `strace` in a working directory.  Its calls that
change files under that directory become crashsim `Op`s on simulated paths
(`/crashsim-recorded/...`), so the same persistence models, explorer and
`Materialiser` as for in-process traces apply.  Each crash state is then
written out as a real directory and handed to a checker: any command
(`--checker 'CMD {dir}'`) or a Python function.

Nothing is dropped silently: a call that would change a file under the
directory in a way the record cannot express (a writable shared mmap, a
directory rename, `copy_file_range`, asynchronous I/O ...) is an error, and
the model's final state must equal the directory's real contents after the
run.  Reads are not recorded; only their effect on a file position is.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from concurrent.futures import Executor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import attrs

from .errors import BadPlan, CrashsimError
from .explore import Budget, Materialiser, Model, Plan, explore, pending_at, barrier_of
from .memstore import BLOCK, CREATE, FSYNC, FSYNC_DIR, LINK, MKDIR, PUNCH, PWRITE, RENAME, TRUNCATE, UNLINK, ZERO_BLOCK, \
    DiskState, FileData, Op

ROOT = "/crashsim-recorded"  # the working directory, as the simulated paths spell it

# Calls the record understands, and calls that would change files in a way it cannot express (refused if they touch
# the directory); `read`/`readv`/`lseek` only move file positions, `chdir`/`fchdir` the relative paths' start.
SUPPORTED = ("open", "openat", "creat", "write", "writev", "pwrite64", "pwritev", "pwritev2", "read", "readv", "lseek",
             "ftruncate", "truncate", "fallocate", "fsync", "fdatasync", "sync", "syncfs", "rename", "renameat",
             "renameat2", "link", "linkat", "unlink", "unlinkat", "mkdir", "mkdirat", "close", "dup", "dup2", "dup3",
             "fcntl", "chdir", "fchdir", "mmap")
REFUSED = ("rmdir", "symlink", "symlinkat", "copy_file_range", "sendfile", "splice", "msync", "openat2",
           "io_uring_setup", "io_uring_enter", "io_setup", "io_submit", "mknod", "mknodat")
STRACE_STRING_LIMIT = 1 << 26

V = TypeVar("V")  # what a judge of a crash state returns


class TraceError(CrashsimError):
    """The program's trace holds a call the record cannot express, or the record disagrees with the real directory."""


class RecordMismatch(TraceError):
    """Replaying the whole record does not rebuild the directory's real final files (exit code 8): a missed call."""

    exit_code = 8


class ProgramFailed(CrashsimError):
    """The recorded program (or strace itself) exited with an error."""


# ---------------------------------------------------------------------------- parsing strace's output
_LINE = re.compile(r"^(\d+)\s+(.*)$")
_FD = re.compile(r"^(AT_FDCWD|-?\d+|0x[0-9a-f]+)(?:<(.*)>)?(?:\(deleted\))?$")  # strace -y marks an unlinked file "(deleted)"
_HEX = re.compile(r"\\x([0-9a-f]{2})")


def _unescape(text: str) -> bytes:
    """The bytes of a `-xx` string body (every byte written as \\xNN)."""
    if len(text) % 4 or not all(text[i : i + 2] == "\\x" for i in range(0, len(text), 4)):
        raise TraceError(f"unexpected string in the trace: {text[:60]!r}")
    return bytes.fromhex(text.replace("\\x", ""))


def _split_args(text: str) -> list[str]:
    """Top-level comma-separated arguments (strings, structs, arrays and fd decorations kept whole)."""
    out, depth, start, quoted = [], 0, 0, False
    for i, ch in enumerate(text):
        if quoted:
            quoted = ch != '"'
        elif ch == '"':
            quoted = True
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    if tail or out:
        out.append(tail)
    return out


def _string(token: str) -> bytes:
    if token.endswith("..."):
        raise TraceError("strace truncated a string: raise its -s limit")
    if len(token) < 2 or token[0] != '"' or token[-1] != '"':
        raise TraceError(f"expected a string argument, found {token[:60]!r}")
    return _unescape(token[1:-1])


def _path(token: str) -> str:
    return os.fsdecode(_string(token))


def _fd(token: str) -> tuple[int | None, str | None]:
    """(number, decorated path) of an fd argument; AT_FDCWD is None."""
    m = _FD.match(token)
    if not m:
        raise TraceError(f"expected a file descriptor, found {token[:60]!r}")
    number = None if m.group(1) == "AT_FDCWD" else int(m.group(1), 0)
    return number, (os.fsdecode(_unescape(m.group(2))) if m.group(2) is not None else None)


def _iovec(token: str) -> bytes:
    return b"".join(_string(s) for s in re.findall(r'iov_base=("(?:\\x[0-9a-f]{2})*"(?:\.\.\.)?)', token))


def parse_calls(lines: Iterable[str]) -> Iterable[tuple[int, str, list[str], str]]:
    """(pid, name, arguments, return value) of every finished call, joining `unfinished` and `resumed` halves."""
    pending: dict[int, str] = {}
    for raw in lines:
        m = _LINE.match(raw.rstrip("\n"))
        if not m:
            continue
        pid, text = int(m.group(1)), m.group(2)
        if text.startswith(("+++", "---")):
            continue
        if text.endswith("<unfinished ...>"):
            pending[pid] = text[: -len("<unfinished ...>")].rstrip()
            continue
        r = re.match(r"^<\.\.\. (\w+) resumed>\s?(.*)$", text)
        if r:
            if pid not in pending:
                raise TraceError(f"pid {pid}: a resumed {r.group(1)} without its start")
            text = pending.pop(pid) + r.group(2)
        c = re.match(r"^(\w+)\((.*)\)\s+=\s+(\S+)(?:\s.*)?$", text)
        if not c:
            if text.endswith("= ?"):  # the process exited inside the call (exit_group and the like)
                continue
            raise TraceError(f"cannot parse trace line: {text[:100]!r}")
        yield pid, c.group(1), _split_args(c.group(2)), c.group(3)


# ---------------------------------------------------------------------------- calls to operations
def _int(token: str) -> int:
    return int(token.split("<", 1)[0], 0)


def _flags(token: str) -> set[str]:
    return set(token.split("|"))


class Recorder:
    """Turns parsed calls into `Op`s, keeping the namespace, the files and each process's descriptors."""

    def __init__(self, workdir: str, base: DiskState) -> None:
        self.root = os.path.realpath(workdir)
        self.state = base.copy()
        self.ops: list[Op] = []
        self.fds: dict[tuple[int, int], list] = {}  # (pid, fd) -> [kind "file"|"dir", inode or path, position, append]
        self.cwd: dict[int, str] = {}

    # paths
    def simulated(self, real: str | None) -> str | None:
        """The simulated path of a real one inside the working directory; None outside it."""
        if real is None:
            return None
        real = os.path.normpath(real)
        if real == self.root:
            return ROOT
        if real.startswith(self.root + "/"):
            return ROOT + real[len(self.root):]
        return None

    def _resolve(self, pid: int, dirfd: str | None, name: str) -> str | None:
        if os.path.isabs(name):
            return self.simulated(name)
        if dirfd is None:
            start = self.cwd.get(pid, self.root)
        else:
            number, decorated = _fd(dirfd)
            if number is None:
                start = decorated or self.cwd.get(pid, self.root)
                if decorated:
                    self.cwd[pid] = decorated
            else:
                if decorated is None:
                    raise TraceError(f"pid {pid}: directory descriptor {number} without a path (strace needs -y)")
                start = decorated
        return self.simulated(os.path.join(start, name))

    def _is_dir(self, path: str) -> bool:
        return path == ROOT or path in self.state.dirs

    def _emit(self, op: Op) -> None:
        self.ops.append(op)
        self.state.apply(op)

    def _file(self, pid: int, token: str, call: str) -> list | None:
        """The descriptor entry a call acts on; None if its file is outside the directory."""
        number, decorated = _fd(token)
        entry = self.fds.get((pid, number))
        where = self.simulated(decorated.removesuffix(" (deleted)")) if decorated else None
        if entry is None and where is not None:  # inherited from a parent, or opened before the record
            if where in self.state.names:
                entry = self.fds[(pid, number)] = ["file", self.state.names[where], None, False]
            elif self._is_dir(where):
                entry = self.fds[(pid, number)] = ["dir", where, None, False]
            else:
                raise TraceError(f"pid {pid}: {call} on descriptor {number} ({decorated}), a file the record does not know")
        return entry

    def _inode(self, path: str, call: str) -> int:
        inode = self.state.names.get(path)
        if inode is None:
            raise TraceError(f"{call} names {path}, which the record does not know")
        return inode

    # calls
    def call(self, pid: int, name: str, args: list[str], ret: str) -> None:
        if ret.startswith("-") or ret == "?":
            return  # failed: nothing changed
        handler = getattr(self, "_call_" + name, None)
        if handler is None:
            if name in REFUSED:
                self._refuse(pid, name, args)
                return
            raise TraceError(f"pid {pid}: {name} is not a call the record knows")
        handler(pid, args, ret)

    def _refuse(self, pid: int, name: str, args: list[str]) -> None:
        touched = name in ("io_uring_setup", "io_uring_enter", "io_setup", "io_submit")
        for token in args:
            if token.startswith('"'):
                touched |= self._resolve(pid, None, _path(token)) is not None
            elif _FD.match(token) and "<" in token:
                touched |= self.simulated(_fd(token)[1]) is not None
        if touched:
            raise TraceError(f"pid {pid}: {name}({', '.join(a[:40] for a in args)}) changes the working directory "
                             "in a way the record cannot express")

    def _open(self, pid: int, path: str | None, flags: set[str], ret: str) -> None:
        number, decorated = _fd(ret)
        where = self.simulated(decorated) if decorated else path
        if where is None:
            self.fds.pop((pid, number), None)
            return
        if "O_TMPFILE" in flags or "__O_TMPFILE" in flags:
            raise TraceError(f"pid {pid}: O_TMPFILE in the working directory is not supported")
        if self._is_dir(where) or "O_DIRECTORY" in flags:
            self.fds[(pid, number)] = ["dir", where, None, False]
            return
        if where not in self.state.names:
            if "O_CREAT" not in flags:
                raise TraceError(f"pid {pid}: opened {where}, which the record does not know")
            self._emit(Op(CREATE, os.path.dirname(where), path=where, inode=self.state.next_inode))
        inode = self.state.names[where]
        if "O_TRUNC" in flags and ("O_WRONLY" in flags or "O_RDWR" in flags):
            self._emit(Op(TRUNCATE, inode, 0))
        self.fds[(pid, number)] = ["file", inode, 0, "O_APPEND" in flags]

    def _call_openat(self, pid: int, args: list[str], ret: str) -> None:
        self._open(pid, self._resolve(pid, args[0], _path(args[1])), _flags(args[2]), ret)

    def _call_open(self, pid: int, args: list[str], ret: str) -> None:
        self._open(pid, self._resolve(pid, None, _path(args[0])), _flags(args[1]), ret)

    def _call_creat(self, pid: int, args: list[str], ret: str) -> None:
        self._open(pid, self._resolve(pid, None, _path(args[0])), {"O_CREAT", "O_WRONLY", "O_TRUNC"}, ret)

    def _write(self, pid: int, entry: list, data: bytes, offset: int | None, ret: str) -> None:
        if entry[0] != "file":
            raise TraceError(f"pid {pid}: a write to the directory {entry[1]}")
        done = _int(ret)
        if len(data) < done:
            raise TraceError(f"pid {pid}: a write of {done} bytes shows only {len(data)}: raise strace's -s limit")
        if offset is None:  # write/writev: at the file position (or the end)
            if entry[3]:
                entry[2] = self.state.files[entry[1]].size
            if entry[2] is None:
                raise TraceError(f"pid {pid}: a write at an unknown file position (descriptor opened before the record)")
            offset = entry[2]
            entry[2] += done
        if done:
            self._emit(Op(PWRITE, entry[1], offset, done, data[:done]))

    def _call_write(self, pid: int, args: list[str], ret: str) -> None:
        entry = self._file(pid, args[0], "write")
        if entry is not None:  # outside the directory (a terminal, a pipe, a log): not decoded
            self._write(pid, entry, _string(args[1]), None, ret)

    def _call_writev(self, pid: int, args: list[str], ret: str) -> None:
        entry = self._file(pid, args[0], "writev")
        if entry is not None:
            self._write(pid, entry, _iovec(args[1]), None, ret)

    def _call_pwrite64(self, pid: int, args: list[str], ret: str) -> None:
        entry = self._file(pid, args[0], "pwrite64")
        if entry is not None:
            self._write(pid, entry, _string(args[1]), _int(args[3]), ret)

    def _call_pwritev(self, pid: int, args: list[str], ret: str) -> None:
        entry = self._file(pid, args[0], "pwritev")
        if entry is not None:
            self._write(pid, entry, _iovec(args[1]), _int(args[3]), ret)

    _call_pwritev2 = _call_pwritev

    def _moved(self, pid: int, token: str, ret: str) -> None:
        number, _ = _fd(token)
        entry = self.fds.get((pid, number))
        if entry is not None and entry[0] == "file" and entry[2] is not None:
            entry[2] += _int(ret)

    def _call_read(self, pid: int, args: list[str], ret: str) -> None:
        self._moved(pid, args[0], ret)

    _call_readv = _call_read

    def _call_lseek(self, pid: int, args: list[str], ret: str) -> None:
        entry = self._file(pid, args[0], "lseek")
        if entry is not None and entry[0] == "file":
            entry[2] = _int(ret)

    def _call_ftruncate(self, pid: int, args: list[str], ret: str) -> None:
        entry = self._file(pid, args[0], "ftruncate")
        if entry is not None:
            self._emit(Op(TRUNCATE, entry[1], _int(args[1])))

    def _call_truncate(self, pid: int, args: list[str], ret: str) -> None:
        where = self._resolve(pid, None, _path(args[0]))
        if where is not None:
            self._emit(Op(TRUNCATE, self._inode(where, "truncate"), _int(args[1])))

    def _call_fallocate(self, pid: int, args: list[str], ret: str) -> None:
        entry = self._file(pid, args[0], "fallocate")
        if entry is None:
            return
        mode, offset, length = _flags(args[1]), _int(args[2]), _int(args[3])
        inode = entry[1]
        keep = "FALLOC_FL_KEEP_SIZE" in mode
        mode -= {"FALLOC_FL_KEEP_SIZE", "0"}
        if mode == {"FALLOC_FL_PUNCH_HOLE"} and keep:
            self._emit(Op(PUNCH, inode, offset, length))
        elif mode == {"FALLOC_FL_ZERO_RANGE"}:
            self._emit(Op(PUNCH, inode, offset, length))
        elif mode:
            raise TraceError(f"pid {pid}: fallocate mode {args[1]} is not supported")
        if not keep and offset + length > self.state.files[inode].size:
            self._emit(Op(TRUNCATE, inode, offset + length))

    def _call_fsync(self, pid: int, args: list[str], ret: str) -> None:
        entry = self._file(pid, args[0], "fsync")
        if entry is not None:
            self._emit(Op(FSYNC, entry[1]) if entry[0] == "file" else Op(FSYNC_DIR, entry[1]))

    _call_fdatasync = _call_fsync

    def _call_sync(self, pid: int, args: list[str], ret: str) -> None:
        """Everything the record knows becomes durable."""
        for inode in sorted(set(self.state.names.values())):
            self._emit(Op(FSYNC, inode))
        for directory in [ROOT, *sorted(self.state.dirs)]:
            self._emit(Op(FSYNC_DIR, directory))

    def _call_syncfs(self, pid: int, args: list[str], ret: str) -> None:
        if self._file(pid, args[0], "syncfs") is not None:
            self._call_sync(pid, args, ret)

    def _rename(self, pid: int, src: str | None, dst: str | None, call: str) -> None:
        if src is None and dst is None:
            return
        if src is None or dst is None:
            raise TraceError(f"pid {pid}: {call} moves a file across the working directory's edge ({src} -> {dst})")
        if self._is_dir(src):
            raise TraceError(f"pid {pid}: {call} of the directory {src} is not supported")
        self._inode(src, call)
        self._emit(Op(RENAME, os.path.dirname(dst), path=src, path2=dst))

    def _call_rename(self, pid: int, args: list[str], ret: str) -> None:
        self._rename(pid, self._resolve(pid, None, _path(args[0])), self._resolve(pid, None, _path(args[1])), "rename")

    def _call_renameat(self, pid: int, args: list[str], ret: str) -> None:
        if len(args) > 4 and ({"RENAME_EXCHANGE", "RENAME_WHITEOUT"} & _flags(args[4])):
            raise TraceError(f"pid {pid}: renameat2 with {args[4]} is not supported")
        self._rename(pid, self._resolve(pid, args[0], _path(args[1])), self._resolve(pid, args[2], _path(args[3])), "renameat")

    _call_renameat2 = _call_renameat

    def _link(self, pid: int, src: str | None, dst: str | None) -> None:
        if dst is None:
            return
        if src is None:
            raise TraceError(f"pid {pid}: a link into the working directory from outside it ({dst})")
        self._inode(src, "link")
        self._emit(Op(LINK, os.path.dirname(dst), path=src, path2=dst))

    def _call_link(self, pid: int, args: list[str], ret: str) -> None:
        self._link(pid, self._resolve(pid, None, _path(args[0])), self._resolve(pid, None, _path(args[1])))

    def _call_linkat(self, pid: int, args: list[str], ret: str) -> None:
        if "AT_EMPTY_PATH" in _flags(args[4]):
            raise TraceError(f"pid {pid}: linkat with AT_EMPTY_PATH is not supported")
        self._link(pid, self._resolve(pid, args[0], _path(args[1])), self._resolve(pid, args[2], _path(args[3])))

    def _unlink(self, pid: int, where: str | None) -> None:
        if where is not None:
            self._inode(where, "unlink")
            self._emit(Op(UNLINK, os.path.dirname(where), path=where))

    def _call_unlink(self, pid: int, args: list[str], ret: str) -> None:
        self._unlink(pid, self._resolve(pid, None, _path(args[0])))

    def _call_unlinkat(self, pid: int, args: list[str], ret: str) -> None:
        where = self._resolve(pid, args[0], _path(args[1]))
        if "AT_REMOVEDIR" in _flags(args[2]):
            if where is not None:
                raise TraceError(f"pid {pid}: removing the directory {where} is not supported")
            return
        self._unlink(pid, where)

    def _mkdir(self, where: str | None) -> None:
        if where is not None:
            self._emit(Op(MKDIR, os.path.dirname(where), path=where))

    def _call_mkdir(self, pid: int, args: list[str], ret: str) -> None:
        self._mkdir(self._resolve(pid, None, _path(args[0])))

    def _call_mkdirat(self, pid: int, args: list[str], ret: str) -> None:
        self._mkdir(self._resolve(pid, args[0], _path(args[1])))

    def _call_close(self, pid: int, args: list[str], ret: str) -> None:
        self.fds.pop((pid, _fd(args[0])[0]), None)

    def _dup(self, pid: int, old: str, new: int) -> None:
        entry = self.fds.get((pid, _fd(old)[0]))
        if entry is None:
            self.fds.pop((pid, new), None)
        else:
            self.fds[(pid, new)] = entry  # one open file description: the position is shared

    def _call_dup(self, pid: int, args: list[str], ret: str) -> None:
        self._dup(pid, args[0], _int(ret))

    _call_dup2 = _call_dup3 = _call_dup

    def _call_fcntl(self, pid: int, args: list[str], ret: str) -> None:
        if args[1] in ("F_DUPFD", "F_DUPFD_CLOEXEC"):
            self._dup(pid, args[0], _int(ret))

    def _call_chdir(self, pid: int, args: list[str], ret: str) -> None:
        self.cwd[pid] = os.path.normpath(os.path.join(self.cwd.get(pid, self.root), _path(args[0])))

    def _call_fchdir(self, pid: int, args: list[str], ret: str) -> None:
        decorated = _fd(args[0])[1]
        if decorated is None:
            raise TraceError(f"pid {pid}: fchdir without a decorated path (strace needs -y)")
        self.cwd[pid] = decorated

    def _call_mmap(self, pid: int, args: list[str], ret: str) -> None:
        if "MAP_SHARED" in _flags(args[3]) and "PROT_WRITE" in _flags(args[2]) and _FD.match(args[4]):
            if self.simulated(_fd(args[4])[1]) is not None:
                raise TraceError(f"pid {pid}: a writable shared mapping of {_fd(args[4])[1]} (its writes are invisible to strace)")


# ---------------------------------------------------------------------------- directories <-> states
def _walk(root: str) -> Iterable[tuple[str, str, os.stat_result]]:
    """(simulated path, real path, lstat) of everything under `root`, parents first."""
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        for name in sorted(subdirs) + sorted(files):
            real = os.path.join(directory, name)
            yield ROOT + real[len(root):], real, os.lstat(real)


def _read_sparse(real: str, size: int) -> FileData:
    """A file's contents as non-zero blocks, reading only its data extents (a hole is neither read nor kept)."""
    data = FileData(size=size)
    fd = os.open(real, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                break  # only a hole from offset to the end
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            for at in range(start - start % BLOCK, end, BLOCK):
                block = os.pread(fd, BLOCK, at).ljust(BLOCK, b"\0")
                if block != ZERO_BLOCK:
                    data.blocks[at // BLOCK] = block
            offset = -(-end // BLOCK) * BLOCK
    finally:
        os.close(fd)
    return data


def snapshot_directory(root: str) -> DiskState:
    """The state of a real directory: its regular files (hard links kept) and subdirectories."""
    root = os.path.realpath(root)
    state = DiskState()
    inodes: dict[tuple[int, int], int] = {}
    for path, real, info in _walk(root):
        if stat.S_ISDIR(info.st_mode):
            state.dirs.add(path)
        elif stat.S_ISREG(info.st_mode):
            key = (info.st_dev, info.st_ino)
            if key not in inodes:
                inodes[key] = state.next_inode
                state.next_inode += 1
                state.files[inodes[key]] = _read_sparse(real, info.st_size)
            state.names[path] = inodes[key]
        else:
            raise TraceError(f"{real}: only regular files and directories can start a record")
    return state


def visible(state: DiskState) -> tuple[dict[str, int], set[str]]:
    """The names and directories a reader sees: a name whose directory's mkdir was lost is gone with it."""
    dirs = {d for d in state.dirs if _reachable(d, state.dirs)}
    names = {p: i for p, i in state.names.items() if os.path.dirname(p) == ROOT or os.path.dirname(p) in dirs}
    return names, dirs


def _reachable(path: str, dirs: set[str]) -> bool:
    while path != ROOT:
        if path not in dirs:
            return False
        path = os.path.dirname(path)
    return True


def materialise(state: DiskState, into: str) -> None:
    """Write a state out as a real directory `into` (which must not exist): sparse files, hard links kept."""
    names, dirs = visible(state)
    os.mkdir(into)
    for d in sorted(dirs):
        os.mkdir(into + d[len(ROOT):])
    written: dict[int, str] = {}
    for path, inode in sorted(names.items()):
        real = into + path[len(ROOT):]
        if inode in written:
            os.link(written[inode], real)
            continue
        _write_sparse(real, state.files[inode])
        written[inode] = real


def _write_sparse(real: str, data: FileData, mode: int = 0o644) -> None:
    """Create the file `real` holding `data`: its blocks written, everything else a hole."""
    fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        for index, block in data.blocks.items():
            if index * BLOCK < data.size:
                os.pwrite(fd, block[: data.size - index * BLOCK], index * BLOCK)
        os.ftruncate(fd, data.size)
    finally:
        os.close(fd)


def copy_sparse(src: str, dst: str) -> None:
    """`shutil.copytree`'s copy function that keeps holes (`copy2` would fill them: a 4 GiB hole, 4 GiB written)."""
    _write_sparse(dst, _read_sparse(src, os.stat(src).st_size), stat.S_IMODE(os.stat(src).st_mode))


def directory_key(state: DiskState) -> tuple:
    """What a checker of the state can observe: visible names, directories and contents."""
    names, dirs = visible(state)
    inodes = sorted(set(names.values()))
    return (tuple(sorted(names.items())), tuple(sorted(dirs)), tuple((i, state.files[i].key()) for i in inodes))


def compare_with_directory(state: DiskState, root: str) -> None:
    """Raise RecordMismatch unless the recorded state is what the directory really holds (nothing was missed)."""
    real = snapshot_directory(root)
    model_names, model_dirs = visible(state)
    if set(model_names) != set(real.names) or model_dirs != real.dirs:
        missing = sorted(set(real.names) ^ set(model_names)) + sorted(model_dirs ^ real.dirs)
        raise RecordMismatch(f"the record's names differ from the directory's: {', '.join(missing)}")
    for path, inode in model_names.items():
        mine, theirs = state.files[inode], real.files[real.names[path]]
        if mine.size != theirs.size or any(mine.blocks.get(i, ZERO_BLOCK) != theirs.blocks.get(i, ZERO_BLOCK)
                                           for i in set(mine.blocks) | set(theirs.blocks) if i * BLOCK < mine.size):
            raise RecordMismatch(f"{path}: the record's contents differ from the file's (a write the record missed)")


# ---------------------------------------------------------------------------- recording
def strace_command(trace_file: str) -> list[str]:
    # Asynchronous I/O rings would hide writes from strace: their setup fails (ENOSYS), so programs fall back
    # to the system calls above (QEMU does).
    return ["strace", "-f", "-qq", "-y", "-xx", "-s", str(STRACE_STRING_LIMIT), "-e", "signal=none",
            "-e", "inject=io_uring_setup,io_setup:error=ENOSYS",
            "-e", "status=successful", "-e", "raw=read,readv", "-e", "trace=" + ",".join(SUPPORTED + REFUSED),
            "-o", trace_file]


def record(argv: Sequence[str], workdir: str, base: DiskState | None = None, env: dict[str, str] | None = None,
           recorder: Recorder | None = None) -> Recorder:
    """Run `argv` in `workdir` under strace; append its operations to `recorder` (a fresh one from `base` if None)."""
    if shutil.which("strace") is None:
        raise CrashsimError("strace is not installed: it records the system calls of a real program")
    if recorder is None:
        recorder = Recorder(workdir, snapshot_directory(workdir) if base is None else base)
    with tempfile.TemporaryDirectory(prefix="crashsim-strace-") as scratch:
        trace_file = os.path.join(scratch, "trace")
        done = subprocess.run(strace_command(trace_file) + list(argv), cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
            raise ProgramFailed(f"`{' '.join(argv)}` exited {done.returncode} under strace: {last[0]}")
        recorder.cwd.clear()
        recorder.fds.clear()
        with open(trace_file, encoding="ascii", errors="strict") as fh:
            for pid, name, args, ret in parse_calls(fh):
                recorder.call(pid, name, args, ret)
    return recorder


# ---------------------------------------------------------------------------- exploring
@attrs.frozen
class Failure:
    plan: str
    message: str
    tier: str
    lost: tuple[str, ...] = ()  # the ops the crash dropped or tore, described


def describe_op(op: Op) -> str:
    """An op as a person reads it: the kind, the simulated path or inode, the range."""
    if op.kind in (RENAME, LINK):
        return f"{op.kind} {op.path.removeprefix(ROOT + '/')} -> {op.path2.removeprefix(ROOT + '/')}"
    if op.kind in (CREATE, UNLINK, MKDIR):
        return f"{op.kind} {op.path.removeprefix(ROOT + '/')}"
    if op.kind == FSYNC_DIR:
        return f"fsync_dir {op.target}"
    return f"{op.kind} inode {op.target}" + (f" at {op.offset} length {len(op.data) or op.length}"
                                             if op.kind in (PWRITE, PUNCH) else f" to {op.offset}" if op.kind == TRUNCATE else "")


@attrs.define
class TraceResult:
    """Counts of one recorded trace explored under one model."""

    workload: str
    model: str
    ops: int
    variant: str | None = None  # the broken variant recorded (a negative control)
    states: int = 0  # plans explored
    checked: int = 0  # distinct directories the checker ran on
    failures: list[Failure] = attrs.Factory(list)

    @property
    def failing_states(self) -> int:
        return len(self.failures)


# A checker gets a crash state's directory and its crash point; it returns None, or what is wrong.
Checker = Callable[[str, int], "str | None"]


def explore_trace(name: str, base: DiskState, ops: Sequence[Op], models: Sequence[str], budget: Budget, seed: int,
                  checker: Checker, context: Callable[[int], object] = lambda crash: None,
                  stop_at_first: bool = False, variant: str | None = None,
                  executor: Executor | None = None, progress: Callable[[int], None] = lambda n: None) -> list[TraceResult]:
    """Check every crash state the explorer yields under each model; a directory seen before reuses its verdict.

    `context(crash)` names what a verdict depends on besides the directory
    (for a Lamina workload: which steps had returned).  With an `executor`
    (and without `stop_at_first`) the checks run there in slices, with the
    same results (`spreadtrace`).  `progress(n)` counts states as they are
    judged (in-process only).
    """
    if executor is not None and not stop_at_first:
        from .spreadtrace import explore_trace_on

        return explore_trace_on(executor, name, base, ops, models, budget, seed, checker, context, variant)
    ops = tuple(ops)
    materialiser = Materialiser(base, ops)
    verdicts: dict[tuple, str | None] = {}
    results = []
    with tempfile.TemporaryDirectory(prefix="crashsim-states-") as scratch:
        for model_name in models:
            model = Model.parse(model_name)
            barriers = barrier_of(ops, model)
            result = TraceResult(name, model.name, len(ops), variant)
            for tier, crash, outcomes, verdict, fresh in judged_states(ops, materialiser, model, budget, seed, scratch,
                                                                       verdicts, context, checker):
                result.states += 1
                result.checked += fresh
                progress(1)
                if verdict is not None:
                    plan = Plan(name, model.name, seed, crash, tuple(sorted(outcomes.items())), variant=variant,
                                pending=tuple(pending_at(barriers, crash)))
                    lost = tuple(f"op {i}: {describe_op(ops[i])}: {'dropped' if o == 'd' else 'torn ' + o[2:]}"
                                 for i, o in sorted(outcomes.items()))
                    result.failures.append(Failure(plan.to_string(), verdict, tier, lost))
                    if stop_at_first:
                        break
            results.append(result)
    return results


def judged_states(ops: tuple[Op, ...], materialiser: Materialiser, model: Model, budget: Budget, seed: int, scratch: str,
                  verdicts: dict, context: Callable[[int], object], judge: Callable[[str, int], V]
                  ) -> Iterator[tuple[str, int, dict[int, str], V, bool]]:
    """Every crash state of `ops` under `model` with its verdict: (tier, crash, outcomes, verdict, fresh).

    A state is written out as a directory under `scratch` and judged only
    when no state with the same files and the same `context(crash)` was
    judged before (`verdicts` keeps them, across models); `fresh` says it
    was judged now.
    """
    for tier, crash, outcomes, _ in explore(ops, model, budget, seed):
        state = materialiser.state(crash, outcomes, seed, model.torn_unit or 512)
        key = (directory_key(state), context(crash))
        fresh = key not in verdicts
        if fresh:
            where = os.path.join(scratch, f"state-{len(verdicts)}")
            materialise(state, where)
            try:
                verdicts[key] = judge(where, crash)
            finally:
                shutil.rmtree(where, ignore_errors=True)
        yield tier, crash, outcomes, verdicts[key], fresh


def check_plan(base: DiskState, ops: Sequence[Op], plan: Plan, checker: Checker) -> str | None:
    """Run the checker on exactly the crash state a plan names (a failure `explore_trace` printed)."""
    model = Model.parse(plan.model)
    if plan.crash > len(ops) or any(i >= plan.crash for i, _ in plan.outcomes):
        raise BadPlan(f"plan {plan.to_string()} does not fit a trace of {len(ops)} ops")
    state = Materialiser(base, tuple(ops)).state(plan.crash, dict(plan.outcomes), plan.seed, model.torn_unit or 512)
    with tempfile.TemporaryDirectory(prefix="crashsim-states-") as scratch:
        where = os.path.join(scratch, "state")
        materialise(state, where)
        return checker(where, plan.crash)


@attrs.frozen
class CommandChecker:
    """A checker running a shell command on a state's directory (a class, not a closure: it pickles to workers)."""

    template: str
    total: int  # the calls in the whole record: a crash after all of them is `{done}`
    timeout: float = 60.0

    def context(self, crash: int) -> object:
        """What a verdict depends on besides the directory: the crash point if the command names it."""
        return (crash if "{crash}" in self.template else None, crash == self.total if "{done}" in self.template else None)

    def __call__(self, where: str, crash: int) -> str | None:
        import shlex

        command = self.template.replace("{dir}", shlex.quote(where)).replace("{done}", str(int(crash == self.total)))
        command = command.replace("{crash}", str(crash))
        try:
            done = subprocess.run(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  errors="replace", timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return f"the checker did not finish in {self.timeout:g} s"
        if done.returncode != 0:
            last = done.stdout.strip().splitlines()[-1:] or [""]
            return f"the checker exited {done.returncode}: {last[0][:200]}"
        return None


def command_checker(template: str, total: int, timeout: float = 60.0) -> tuple[Checker, Callable[[int], object]]:
    """A checker running a shell command, and what its verdict depends on besides the directory.

    The command names the state's directory as `{dir}`; `{done}` is 1 when
    the crash comes after the program's last recorded call (everything it
    made durable must be there), else 0; `{crash}` is the number of calls
    issued.  Exit 0 passes.
    """
    if "{dir}" not in template:
        raise CrashsimError("the checker command must name the state's directory as {dir}")
    checker = CommandChecker(template, total, timeout)
    return checker, checker.context


def prepare_directory(workdir: str, initial: str | None = None) -> None:
    """Make `workdir` a copy of `initial` (holes kept; `workdir` new or empty), or, without one, make it if missing."""
    if initial:
        if os.path.exists(workdir) and os.listdir(workdir):
            raise CrashsimError(f"{workdir}: with an initial directory the working directory must be new or empty")
        shutil.copytree(initial, workdir, symlinks=True, dirs_exist_ok=True, copy_function=copy_sparse)
    else:
        os.makedirs(workdir, exist_ok=True)


def record_in(argv: Sequence[str], workdir: str, initial: str | None = None) -> tuple[DiskState, Recorder]:
    """Record `argv` in `workdir` (made as a copy of `initial` if given, else used as it is, made if missing).

    Returns the starting state and the record, after checking that the record
    rebuilds the directory's real final files (RecordMismatch if not).
    """
    prepare_directory(workdir, initial)
    base = snapshot_directory(workdir)
    recorder = record(argv, workdir, base)
    compare_with_directory(recorder.state, workdir)
    return base, recorder


def trace_program(argv: Sequence[str], checker: str, models: Sequence[str], budget: Budget, seed: int = 0,
                  initial: str | None = None, name: str = "program") -> tuple[Recorder, list[TraceResult], float]:
    """Record `argv` in a fresh directory (a copy of `initial`, if given); run the `checker` command on every crash state."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crashsim-run-") as scratch:
        base, recorder = record_in(argv, os.path.join(scratch, "dir"), initial)
    check, context = command_checker(checker, len(recorder.ops))
    results = explore_trace(name, base, recorder.ops, models, budget, seed, check, context)
    return recorder, results, time.perf_counter() - started
