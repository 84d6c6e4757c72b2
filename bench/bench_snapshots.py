"""Cost of a writable open against the number of snapshots (the format allows MAX_SNAPSHOTS).

Builds an image with N snapshots taken one after another (each a layer on
the previous one), then times `Image.open` (writable, the path every write
command takes) and counts the storage operations it makes through a
counting wrapper; then times one more `snapshot create` over the N and
counts its operations (the time of the N creates alone is `snap s`).  A linear open makes about the same count per snapshot at
every N.

Taking N snapshots one by one costs N opens of a growing chain, so a
1,000-snapshot image takes long to build that way; `--build direct` writes
the same files directly (each frozen layer is the former top with the table
it had, as `snapshot create` leaves them), which `--build both` shows opens
with the same counts.

    python bench/bench_snapshots.py [--snapshots 100 1000] [--build direct|snapshot|both] [--output json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import tempfile
import time
import uuid

from lamina.impl import layers
from lamina.impl.image import Image, write_new_layer
from lamina.impl.osfile import OsStorage
from lamina.spec.references import layer_dir_of, layer_file_name
from lamina.spec.structures import Root, make_snapshot_entry
from lamina.spec.tree import check_tree


class CountingStorage:
    """The OS backend, counting opens of files and reads of their bytes."""

    def __init__(self) -> None:
        self._inner = OsStorage()
        self.counts: collections.Counter[str] = collections.Counter()

    def open(self, path: str, writable: bool, follow_symlinks: bool = False):
        self.counts["open"] += 1
        return _CountingFile(self._inner.open(path, writable, follow_symlinks), self.counts)

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


def build_direct(directory: str, snapshots: int) -> str:
    """The files `build` makes, written directly: frozen layers with the tables they had, and the top."""
    storage = OsStorage()
    path = os.path.join(directory, "disk.lam")
    storage.mkdir(layer_dir_of(path))
    root = Root(cluster_bits=12, virtual_size=1 << 20, image_uuid=uuid.uuid4().bytes)
    for i in range(snapshots):
        frozen = layer_file_name(root.image_uuid)
        write_new_layer(storage, os.path.join(layer_dir_of(path), frozen), root)
        entry = make_snapshot_entry(f"s{i}", id=root.next_snapshot_id, layer_uuid=root.image_uuid,
                                    creation_time_ns=time.time_ns(), vm_clock_ns=0, disk_size=root.virtual_size,
                                    vmstate_size=0, vmstate_crc=0)
        root = layers._child_root(root, frozen, snapshots=root.snapshots + (entry,),
                                  next_snapshot_id=root.next_snapshot_id + 1)
    write_new_layer(storage, path, root)
    return path


SNAPSHOT_SECONDS = [0.0]  # time spent in `create_snapshot` alone by the last `build`


def build(directory: str, snapshots: int) -> str:
    path = os.path.join(directory, "disk.lam")
    Image.create(path, 1 << 20, 4096).close()
    SNAPSHOT_SECONDS[0] = 0.0
    for i in range(snapshots):
        with Image.open(path) as image:
            image.write(i * 512 % (1 << 20), bytes([i % 255 + 1]) * 512)
        started = time.perf_counter()
        layers.create_snapshot(path, f"s{i}")
        SNAPSHOT_SECONDS[0] += time.perf_counter() - started
    return path


def measure(snapshots: int, how: str) -> dict:
    directory = tempfile.mkdtemp(prefix="lamina-bench-snapshots-")
    try:
        started = time.perf_counter()
        path = (build if how == "snapshot" else build_direct)(directory, snapshots)
        built = time.perf_counter() - started
        if how == "direct" and snapshots <= 200:  # check reads every table: quadratic by nature, so only when small
            assert 0 == check_tree(path, OsStorage()).exit_code
        storage = CountingStorage()
        started = time.perf_counter()
        Image.open(path, storage=storage).close()
        opened = time.perf_counter() - started
        one = CountingStorage()  # one more snapshot over the N: the file operations of a snapshot create
        started = time.perf_counter()
        layers.create_snapshot(path, "one-more", storage=one)
        created = time.perf_counter() - started
        return {"snapshots": snapshots, "build": how, "build_seconds": round(built, 2), "open_seconds": round(opened, 3),
                "opens": storage.counts["open"], "preads": storage.counts["pread"],
                "snapshot_seconds": round(SNAPSHOT_SECONDS[0], 2) if how == "snapshot" else None,
                "create_seconds": round(created, 4), "create_opens": one.counts["open"],
                "create_preads": one.counts["pread"]}
    finally:
        shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--build", choices=("direct", "snapshot", "both"), default="direct")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    args = parser.parse_args()
    ways = ("snapshot", "direct") if args.build == "both" else (args.build,)
    rows = [measure(n, how) for n in args.snapshots for how in ways]
    if args.output == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"{'snapshots':>10} {'build':>9} {'build s':>9} {'snap s':>8} {'open s':>8} {'opens':>8} {'preads':>8} "
          f"{'+1 snap s':>10} {'its opens':>10} {'its preads':>10}")
    for r in rows:
        print(f"{r['snapshots']:>10} {r['build']:>9} {r['build_seconds']:>9} {str(r['snapshot_seconds']):>8} "
              f"{r['open_seconds']:>8} {r['opens']:>8} {r['preads']:>8} {r['create_seconds']:>10} "
              f"{r['create_opens']:>10} {r['create_preads']:>10}")


if __name__ == "__main__":
    main()
