"""Cost of a writable open against the number of snapshots (the format allows MAX_SNAPSHOTS).

Builds an image with N snapshots taken one after another (each a layer on
the previous one), then times `Image.open` (writable, the path every write
command takes) and counts the storage operations it makes through a
counting wrapper.  A linear open makes about the same count per snapshot at
every N.

    python bench/bench_snapshots.py [--snapshots 100 1000] [--output json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
import time

from lamina.impl import layers
from lamina.impl.image import Image
from lamina.impl.osfile import OsStorage


class CountingStorage:
    """The OS backend, counting opens of files and reads of their bytes."""

    def __init__(self) -> None:
        self._inner = OsStorage()
        self.counts: collections.Counter[str] = collections.Counter()

    def open(self, path: str, writable: bool):
        self.counts["open"] += 1
        return _CountingFile(self._inner.open(path, writable), self.counts)

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            self.counts[name] += 1
            return getattr(self._inner, name)(*args, **kwargs)
        return call


class _CountingFile:
    def __init__(self, inner, counts: collections.Counter[str]) -> None:
        self._inner, self._counts = inner, counts

    def pread(self, offset: int, length: int) -> bytes:
        self._counts["pread"] += 1
        return self._inner.pread(offset, length)

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def build(directory: str, snapshots: int) -> str:
    path = os.path.join(directory, "disk.lam")
    Image.create(path, 1 << 20, 4096).close()
    for i in range(snapshots):
        with Image.open(path) as image:
            image.write(i * 512 % (1 << 20), bytes([i % 255 + 1]) * 512)
        layers.create_snapshot(path, f"s{i}")
    return path


def measure(snapshots: int) -> dict:
    directory = tempfile.mkdtemp(prefix="lamina-bench-snapshots-")
    try:
        started = time.perf_counter()
        path = build(directory, snapshots)
        built = time.perf_counter() - started
        storage = CountingStorage()
        started = time.perf_counter()
        Image.open(path, storage=storage).close()
        opened = time.perf_counter() - started
        return {"snapshots": snapshots, "build_seconds": round(built, 2), "open_seconds": round(opened, 3),
                "opens": storage.counts["open"], "preads": storage.counts["pread"]}
    finally:
        shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--output", choices=("text", "json"), default="text")
    args = parser.parse_args()
    rows = [measure(n) for n in args.snapshots]
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"{'snapshots':>10} {'build s':>9} {'open s':>8} {'opens':>8} {'preads':>8}")
    for r in rows:
        print(f"{r['snapshots']:>10} {r['build_seconds']:>9} {r['open_seconds']:>8} {r['opens']:>8} {r['preads']:>8}")


if __name__ == "__main__":
    main()
