#!/usr/bin/env python3
"""Dedup (R8): space saved, scan throughput, and the memory of the index against ZFS's dedup table.

Two scenarios, each in a fresh directory, measured with `du` (st_blocks of
every file, hard links counted once) before and after `dedup`:

- *clones*: two clones of one snapshot each write the same `--clone-data`
  (default 64 MiB) and 1 MiB of their own, then snapshot; `dedup A --across B`;
- *images*: `--images` (default 10) images created apart, each holding the
  same `--image-data` (default 256 MiB) and 1 MiB of its own;
  `dedup --snapshot frozen IMG0 --across DIR`.

Every branch and snapshot is read back (SHA-256) before and after, and
`check` must be clean.  Throughput is the bytes `dedup` scanned over its
time (whole-process figures are not used: the call is timed in-process,
median of `--repeat` dry runs over the *images* scenario).  The index
memory is measured with tracemalloc while the scan's index is built over
`--index-clusters` distinct cluster keys, per entry, and scaled to one TiB
of 64 KiB clusters; ZFS's documented figure is about 320 bytes in core per
dedup-table entry (Oracle, "How to Determine Memory Requirements for ZFS
Deduplication"), one entry per block: at the default 128 KiB record size
that is 2.5 GiB per TiB of unique data.

    python bench/bench_dedup.py [--clone-data 64M] [--images 10] [--image-data 256M] [--output json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc

from lamina.impl import layers
from lamina.impl.dedup import _key, dedup
from lamina.impl.image import Image
from lamina.impl.osfile import OsStorage
from lamina.impl.sizes import parse_size
from lamina.spec.tree import check_tree

MiB, TiB = 1 << 20, 1 << 40
CLUSTER = 64 * 1024
ZFS_BYTES_PER_ENTRY = 320
ZFS_RECORD = 128 * 1024


def du(directory: str) -> int:
    total, seen = 0, set()
    for root, _, files in os.walk(directory):
        for name in files:
            st = os.stat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def digest(target: str) -> str:
    h = hashlib.sha256()
    with layers.open_target(target) as image:
        for pos in range(0, image.virtual_size, 4 * MiB):
            h.update(image.read(pos, min(4 * MiB, image.virtual_size - pos)))
    return h.hexdigest()


def write_stream(image: Image, offset: int, length: int, seed: int) -> None:
    rng = random.Random(seed)
    for pos in range(0, length, 4 * MiB):
        image.write(offset + pos, rng.randbytes(min(4 * MiB, length - pos)))


def clones(directory: str, data: int) -> dict:
    os.chdir(directory)
    size = data + 8 * MiB
    with Image.create("img.lam", size) as image:
        write_stream(image, 0, 1 * MiB, 1)
    layers.create_snapshot("img.lam", "s0")
    for i, name in enumerate(("a.lam", "b.lam")):
        layers.clone("img.lam", "s0", name)
        with Image.open(name) as image:
            write_stream(image, 2 * MiB, data, 2)
            write_stream(image, 2 * MiB + data, 1 * MiB, 10 + i)
        layers.create_snapshot(name, "s1")
    targets = ["img.lam", "img.lam@s0", "a.lam", "a.lam@s1", "b.lam", "b.lam@s1"]
    before, space = {t: digest(t) for t in targets}, du(directory)
    report = dedup(["a.lam"], ["b.lam"])
    after = du(directory)
    same = {t: digest(t) for t in targets} == before
    clean = all(check_tree(t, OsStorage()).exit_code == 0 for t in ("img.lam", "a.lam", "b.lam"))
    return {"shared_data": data, "du_before": space, "du_after": after, "du_drop": space - after,
            "bytes_saved_reported": report.bytes_saved, "dedup_seconds": report.seconds,
            "scanned": report.bytes_scanned, "reads_back_unchanged": same, "check_clean": clean}


def images(directory: str, count: int, data: int, repeat: int) -> dict:
    os.chdir(directory)
    names = [f"vm{i}.lam" for i in range(count)]
    for i, name in enumerate(names):
        with Image.create(name, data + 4 * MiB) as image:
            write_stream(image, 0, data, 3)
            write_stream(image, data, 1 * MiB, 100 + i)
        layers.create_snapshot(name, "frozen")
    targets = names + [f"{n}@frozen" for n in names]
    before, space = {t: digest(t) for t in targets}, du(directory)
    dry = [dedup([names[0]], ["."], dry_run=True) for _ in range(repeat)]
    seconds = statistics.median(r.seconds for r in dry)
    scanned = dry[0].bytes_scanned
    report = dedup([names[0]], ["."])
    after = du(directory)
    same = {t: digest(t) for t in targets} == before
    clean = all(check_tree(t, OsStorage()).exit_code == 0 for t in names)
    one_copy = data + count * MiB
    return {"images": count, "shared_data": data, "du_before": space, "du_after": after,
            "one_copy_plus_differences": one_copy, "du_after_over_one_copy": after / one_copy,
            "bytes_saved_reported": report.bytes_saved, "scan_bytes": scanned,
            "dry_run_seconds_median": seconds, "scan_mib_per_s": scanned / MiB / seconds,
            "dedup_seconds": report.seconds, "dedup_mib_per_s": report.bytes_scanned / MiB / report.seconds,
            "reads_back_unchanged": same, "check_clean": clean, "repeat": repeat}


def index_memory(clusters: int) -> dict:
    """Bytes per entry of the scan's index (a dict of 64-bit key -> packed location), by tracemalloc."""
    rng = random.Random(7)
    keys = [_key(rng.randbytes(16)) for _ in range(clusters)]
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    index: dict[int, int] = {}
    for i, k in enumerate(keys):
        index.setdefault(k, (1 << 40) | i)
    used = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(start, "filename"))
    tracemalloc.stop()
    per_entry = used / len(index)
    per_tib = per_entry * (TiB // CLUSTER)
    zfs_per_tib = ZFS_BYTES_PER_ENTRY * (TiB // ZFS_RECORD)
    return {"entries": len(index), "bytes_per_entry": round(per_entry, 1), "cluster_size": CLUSTER,
            "index_bytes_per_tib": int(per_tib), "zfs_bytes_per_entry": ZFS_BYTES_PER_ENTRY,
            "zfs_record_size": ZFS_RECORD, "zfs_bytes_per_tib": zfs_per_tib,
            "zfs_bytes_per_tib_at_64k": ZFS_BYTES_PER_ENTRY * (TiB // CLUSTER)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clone-data", default="64M")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--image-data", default="256M")
    parser.add_argument("--index-clusters", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", help="where to make the images (default: a new temporary directory)")
    parser.add_argument("--output", choices=("human", "json"), default="human")
    args = parser.parse_args(argv)
    top = tempfile.mkdtemp(prefix="bench-dedup-", dir=args.dir)
    here = os.getcwd()
    try:
        for sub in ("clones", "images"):
            os.mkdir(os.path.join(top, sub))
        result = {"clones": clones(os.path.join(top, "clones"), parse_size(args.clone_data, "size")),
                  "images": images(os.path.join(top, "images"), args.images, parse_size(args.image_data, "size"),
                                   args.repeat),
                  "index": index_memory(args.index_clusters)}
    finally:
        os.chdir(here)
        shutil.rmtree(top, ignore_errors=True)
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        c, i, x = result["clones"], result["images"], result["index"]
        print(f"clones: {c['shared_data'] / MiB:.0f} MiB written in both: du {c['du_before'] / MiB:.1f} -> "
              f"{c['du_after'] / MiB:.1f} MiB (drop {c['du_drop'] / MiB:.1f} MiB), dedup {c['dedup_seconds']:.2f} s, "
              f"unchanged {c['reads_back_unchanged']}, check clean {c['check_clean']}")
        print(f"images: {i['images']} x {i['shared_data'] / MiB:.0f} MiB: du {i['du_before'] / MiB:.1f} -> "
              f"{i['du_after'] / MiB:.1f} MiB ({i['du_after_over_one_copy']:.3f} x one copy plus differences, "
              f"{i['one_copy_plus_differences'] / MiB:.0f} MiB), unchanged {i['reads_back_unchanged']}, "
              f"check clean {i['check_clean']}")
        print(f"scan: {i['scan_mib_per_s']:.0f} MiB/s (dry run, median of {i['repeat']}); dedup with writes "
              f"{i['dedup_mib_per_s']:.0f} MiB/s")
        print(f"index: {x['bytes_per_entry']} bytes per distinct cluster -> {x['index_bytes_per_tib'] / (1 << 30):.2f} "
              f"GiB per TiB at 64 KiB clusters; ZFS DDT {x['zfs_bytes_per_entry']} B/entry -> "
              f"{x['zfs_bytes_per_tib'] / (1 << 30):.2f} GiB per TiB at 128 KiB records "
              f"({x['zfs_bytes_per_tib_at_64k'] / (1 << 30):.2f} GiB at 64 KiB)")
    ok = all(result[k]["reads_back_unchanged"] and result[k]["check_clean"] for k in ("clones", "images"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
