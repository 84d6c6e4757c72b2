"""A host that refuses an operation midway (ENOSPC) must leave a consistent image behind.

`FullDisk` is the OS backend whose Nth space-taking operation (pwrite,
truncate, punch, create, link, rename, mkdir) fails with the same
`StorageError` a full file system gives.  A small workload runs for every N
until it completes; after each failure the read-only `check` must find no
corruption and no leak (pending work is fine: the protocol leaves it by
design), a writable open must work, and every flushed byte must read back.
"""
from __future__ import annotations

import os

import pytest

from lamina.impl.cli import main
from lamina.impl.image import Image
from lamina.impl.layers import clone, create_snapshot, delete_snapshot, open_target, revert_snapshot
from lamina.impl.osfile import OsStorage, StorageError
from lamina.spec.errors import LaminaError
from lamina.spec.layout import SECTOR_SIZE

from conftest import pattern

SIZE = 1 << 20
OPERATIONS = 60  # more than the workload's space-taking operations (checked below), so every one fails once


class FullDisk:
    """OsStorage whose `fail_at`-th space-taking operation fails as on a full file system."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at = fail_at
        self.count = 0
        self._os = OsStorage()

    def tick(self, what: str, path: str) -> None:
        self.count += 1
        if self.count == self.fail_at:
            raise StorageError(f"{path}: no space left on the host file system ({what})")

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> "FullFile":
        return FullFile(self, self._os.open(path, writable, follow_symlinks))

    def create(self, path: str) -> "FullFile":
        self.tick("create", path)
        return FullFile(self, self._os.create(path))

    def link(self, src: str, dst: str) -> None:
        self.tick("link", dst)
        self._os.link(src, dst)

    def rename(self, src: str, dst: str) -> None:
        self.tick("rename", dst)
        self._os.rename(src, dst)

    def mkdir(self, path: str) -> None:
        self.tick("mkdir", path)
        self._os.mkdir(path)

    def __getattr__(self, name: str):
        return getattr(self._os, name)


class FullFile:
    def __init__(self, disk: FullDisk, file) -> None:
        self._disk = disk
        self._file = file

    def pwrite(self, offset: int, data: bytes) -> None:
        self._disk.tick("pwrite", self._file.path)
        if len(data) > SECTOR_SIZE:  # a write that runs out of space midway leaves its first part behind
            self._file.pwrite(offset, bytes(data[:SECTOR_SIZE]))
            self._disk.count -= 1
            self._disk.tick("pwrite", self._file.path)
        self._file.pwrite(offset, data)

    def truncate(self, length: int) -> None:
        self._disk.tick("truncate", self._file.path)
        self._file.truncate(length)

    def punch_hole(self, offset: int, length: int) -> None:
        self._disk.tick("punch", self._file.path)
        self._file.punch_hole(offset, length)

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def _workload(path: str, storage: FullDisk, seen: dict[str, tuple[bytes, bytes]]) -> None:
    """Create, write and flush, write again and close, snapshot, write over the snapshot and close.

    `seen` holds per layer (its contents at the last completed flush, its contents once the write
    in flight completes): after a failure every sector must read as one or the other.
    """
    def write(image: Image, offset: int, data: bytes) -> None:
        new = bytearray(image.read(0, SIZE))
        new[offset : offset + len(data)] = data
        seen["top"] = (seen["top"][0], bytes(new))
        image.write(offset, data)

    def durable() -> None:
        seen["top"] = (seen["top"][1], seen["top"][1])

    seen["top"] = (bytes(SIZE), bytes(SIZE))
    with Image.create(path, SIZE, 4096, storage=storage) as image:
        write(image, 0, pattern(1, 12288))
        image.flush()
        durable()
        write(image, 8192, pattern(2, 69632))
    durable()
    seen["s"] = seen["top"]
    create_snapshot(path, "s", storage=storage)
    with Image.open(path, storage=storage) as image:
        write(image, 4096, pattern(3, 4096))
    durable()


def _readable(path: str, snap: str | None) -> bytes:
    with open_target(path if snap is None else f"{path}@{snap}") as image:
        return image.read(0, SIZE)


def _assert_old_or_new(now: bytes, old: bytes, new: bytes) -> None:
    for offset in range(0, SIZE, SECTOR_SIZE):
        sector = slice(offset, offset + SECTOR_SIZE)
        assert now[sector] in (old[sector], new[sector]), f"sector at {offset}"


def test_workload_without_faults_counts_its_operations(tmp_path):
    disk = FullDisk(0)
    _workload(str(tmp_path / "disk.lam"), disk, {})
    assert 20 < disk.count < OPERATIONS


@pytest.mark.parametrize("fail_at", range(1, OPERATIONS))
def test_a_failed_operation_leaves_a_consistent_image(tmp_path, fail_at, capsys):
    path = str(tmp_path / "disk.lam")
    seen: dict[str, tuple[bytes, bytes]] = {}
    disk = FullDisk(fail_at)
    try:
        _workload(path, disk, seen)
    except LaminaError as exc:
        assert "no space left" in str(exc)
    else:
        return  # the workload has fewer operations: nothing failed
    if not os.path.exists(path):
        assert os.listdir(tmp_path) == []  # a failed create leaves nothing
        return
    assert 0 == main(["check", path]), capsys.readouterr().out  # before any recovery: pending at most
    _assert_old_or_new(_readable(path, None), *seen["top"])
    with Image.open(path, readonly=True) as image:
        snapshotted = image.root.snapshot("s") is not None
    if snapshotted:
        _assert_old_or_new(_readable(path, "s"), *seen["s"])
    with Image.open(path) as image:  # a writable open recovers
        image.write(0, b"\x5a" * 4096)
    assert 0 == main(["check", path]), capsys.readouterr().out


def _snapshots(path: str) -> dict[str, bytes]:
    with Image.open(path, readonly=True) as image:
        names = [e.text_name for e in image.root.snapshots]
    return {name: _readable(path, name) for name in names}


@pytest.mark.parametrize("fail_at", range(1, OPERATIONS))
def test_a_failed_management_operation_leaves_a_consistent_tree(tmp_path, fail_at, capsys):
    """Snapshot delete (a merge), clone and revert, each failing at every step in turn."""
    path, copy = str(tmp_path / "disk.lam"), str(tmp_path / "copy.lam")
    with Image.create(path, SIZE, 4096) as image:
        image.write(0, pattern(1, 12288))
    create_snapshot(path, "a")
    with Image.open(path) as image:
        image.write(4096, pattern(2, 8192))
    create_snapshot(path, "b")
    before, current = _snapshots(path), _readable(path, None)
    disk = FullDisk(fail_at)
    try:
        delete_snapshot(path, "a", storage=disk)
        clone(path, "b", copy, storage=disk)
        revert_snapshot(path, "b", storage=disk)
    except LaminaError as exc:
        assert "no space left" in str(exc)
    else:
        assert disk.count < OPERATIONS
        return
    assert 0 == main(["check", path]), capsys.readouterr().out
    after = _snapshots(path)
    assert set(after) <= set(before) and "b" in after
    assert all(before[name] == data for name, data in after.items())
    assert _readable(path, None) in (current, before["b"])  # reverted or not, nothing in between
    if os.path.exists(copy):
        assert 0 == main(["check", copy]), capsys.readouterr().out
        assert before["b"] == _readable(copy, None)
    else:
        assert not os.path.exists(copy + ".layers") or os.listdir(copy + ".layers") == []
    with Image.open(path) as image:
        image.write(0, b"\x5a" * 4096)
    assert 0 == main(["check", path]), capsys.readouterr().out
