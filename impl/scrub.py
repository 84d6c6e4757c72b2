"""`lamina scrub`: read every data cluster of every layer, at a bounded rate, and report (or repair) what fails.

A scrub is the spec's `check` of the whole tree (which verifies the CRC32C
of every cluster that holds data) seen through a storage whose reads are
paced and counted: pacing keeps a scrub of a live host from crowding out
its guests, counting draws the progress bar.  With a replica, clusters that
fail are rewritten from it (`check --repair --from`, F-SEND-007).
"""
from __future__ import annotations

import time
from typing import Callable

from lamina.spec.check import CheckReport
from lamina.spec.storage import File, Storage
from lamina.spec.tree import check_tree, layer_files

from .image import image_lock
from .osfile import OsStorage
from .replicate import DataRepair, repair_data_from


class _Paced:
    """Sleeps before reads so that the bytes read over time stay at or under `rate` per second; counts them."""

    def __init__(self, rate: float | None, progress: Callable[[int], None]) -> None:
        self.rate = rate
        self.progress = progress
        self.read = 0
        self.start = time.monotonic()

    def account(self, n: int) -> None:
        self.read += n
        self.progress(n)
        if self.rate:
            ahead = self.read / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


class _PacedFile:
    def __init__(self, file: File, pace: _Paced) -> None:
        self._file = file
        self._pace = pace

    def pread(self, offset: int, length: int) -> bytes:
        data = self._file.pread(offset, length)
        self._pace.account(len(data))
        return data

    def __getattr__(self, name: str):
        return getattr(self._file, name)


class _PacedStorage:
    """Read-only: a scrub that finds damage does not change anything unless asked to repair."""

    def __init__(self, storage: Storage, pace: _Paced) -> None:
        self._storage = storage
        self._pace = pace

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> File:
        return _PacedFile(self._storage.open(path, writable, follow_symlinks), self._pace)  # type: ignore[return-value]

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


def data_bytes(path: str, storage: Storage) -> int:
    """Bytes the scrub will read, about: the data extents of every layer file of the tree."""
    total = 0
    for layer in layer_files(path, storage)[0]:
        file = storage.open(layer, False)
        try:
            total += sum(length for _, length in file.data_extents())
        finally:
            file.close()
    return total


def scrub(path: str, rate: float | None = None, replica: str | None = None, storage: Storage | None = None,
          progress: Callable[[int], None] = lambda n: None) -> tuple[CheckReport, list[DataRepair]]:
    """Check the tree at `rate` bytes per second at most; repair failing data from `replica` when given."""
    storage = storage or OsStorage()
    paced = _PacedStorage(storage, _Paced(rate, progress))
    with image_lock(path, False, storage):
        report = check_tree(path, paced, lock=True)  # type: ignore[arg-type]
    fixes: list[DataRepair] = []
    if replica is not None and any(f.kind == "data-checksum" for f in report.findings):
        fixes = repair_data_from(path, replica, storage)
        with image_lock(path, False, storage):
            report = check_tree(path, storage, lock=True)
    return report, fixes
