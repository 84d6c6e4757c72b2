"""Replication by rsync and by file-system snapshots (R6, issue 10): what a snapshot and W bytes of writes cost.

Each case starts from a disk written in full and replicated with rsync to an
empty directory; then it takes a snapshot (Lamina `snapshot create`; qcow2
`qemu-img snapshot -c`; a raw file has none), makes 1,000 random 4 KiB
writes (W = 4 MiB), and replicates again with the same command. It reports
rsync's own `--stats` of the second run (bytes sent and received, literal
data) and, for a file system that snapshots 128 KiB records as ZFS does, the
records of the image's files whose bytes changed between the two runs
(records are those of a file, whatever its names: a file renamed or linked
keeps its records; a new file counts its records that hold data).

Cases: `lamina` (the layout of F-TREE-003: every top has its twin), `lamina-no-twin`
(the twin removed before the first run: the layout before F-TREE-003), `lamina-clone`
(snapshot, then a clone of it beside the image, the writes into the clone), `qcow2`, `raw`.

    python bench/bench_rsync.py [--size 1G] [--writes 1000] [--block-size 4096] [--cases ...] [--output json]

The rsync command (README.md): rsync -aH --no-whole-file --fuzzy -B 4096 --modify-window=-1 --stats SRC/ DST/
(`--block-size 0` leaves rsync's default block size, the square root of the file size.)
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

from lamina.impl import layers
from lamina.impl.image import Image
from lamina.impl.sizes import parse_size

BLOCK = 4096
RECORD = 128 << 10  # a ZFS dataset's default recordsize
CHUNK = 1 << 20
CASES = ("lamina", "lamina-no-twin", "lamina-clone", "qcow2", "raw")


def rsync_command(block_size: int) -> list[str]:
    return ["rsync", "-aH", "--no-whole-file", "--fuzzy", *(["-B", str(block_size)] if block_size else []),
            "--modify-window=-1", "--stats"]


def rsync(src: str, dst: str, block_size: int) -> dict:
    out = subprocess.run([*rsync_command(block_size), src + "/", dst + "/"], check=True, capture_output=True,
                         text=True).stdout
    stats = {}
    for key, label in (("sent", "Total bytes sent"), ("received", "Total bytes received"), ("literal", "Literal data"),
                       ("matched", "Matched data")):
        found = re.search(rf"^{label}: ([\d,]+)", out, re.M)
        stats[key] = int(found.group(1).replace(",", "")) if found else 0
    return stats


def _data_ranges(fd: int, size: int):
    """The file's data extents (SEEK_DATA/SEEK_HOLE): holes are no records on a file system that has holes."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def records(directory: str) -> dict[tuple[int, int], dict[int, bytes]]:
    """Per file (by device and inode, once whatever its names): record index -> digest, for records holding data."""
    out: dict[tuple[int, int], dict[int, bytes]] = {}
    zero = hashlib.blake2b(bytes(RECORD), digest_size=16).digest()
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            info = os.lstat(path)
            key = (info.st_dev, info.st_ino)
            if key in out:
                continue
            digests: dict[int, bytes] = {}
            fd = os.open(path, os.O_RDONLY)
            try:
                for start, end in _data_ranges(fd, info.st_size):
                    for index in range(start // RECORD, -(-end // RECORD)):
                        if index in digests:
                            continue
                        digest = hashlib.blake2b(os.pread(fd, RECORD, index * RECORD).ljust(RECORD, b"\0"),
                                                 digest_size=16).digest()
                        if digest != zero:
                            digests[index] = digest
            finally:
                os.close(fd)
            out[key] = digests
    return out


def records_changed(before: dict, after: dict) -> int:
    """Records a file-system snapshot taken at `before` no longer shares: changed, new, or freed."""
    changed = 0
    for key in set(before) | set(after):
        a, b = before.get(key, {}), after.get(key, {})
        changed += sum(1 for index in set(a) | set(b) if a.get(index) != b.get(index))
    return changed


def _same_trees(src: str, dst: str) -> None:
    """The replica must be the source, name for name, byte for byte, hard links included (else the numbers lie)."""
    for parent, _, names in os.walk(src):
        for name in names:
            a = os.path.join(parent, name)
            b = os.path.join(dst, os.path.relpath(a, src))
            if not filecmp.cmp(a, b, shallow=False):
                raise SystemExit(f"the replica's {b} differs from {a}")
            links = os.lstat(a).st_nlink
            if os.lstat(b).st_nlink != links:
                raise SystemExit(f"the replica's {b} has {os.lstat(b).st_nlink} links, the source {links}")


def _fill(size: int):
    """The disk's first contents: seeded random bytes, so that no two blocks are equal and rsync can match a block
    only where it really is (a constant fill would let any block match any other)."""
    rng = random.Random(size)
    for offset in range(0, size, CHUNK):
        yield offset, rng.randbytes(min(CHUNK, size - offset))


def _fill_lamina(path: str, size: int, cluster: int) -> None:
    with Image.create(path, size, cluster) as image:
        for offset, data in _fill(size):
            image.write(offset, data)


def _write_lamina(path: str, writes: list[tuple[int, int]]) -> None:
    with Image.open(path) as image:
        for offset, seed in writes:
            image.write(offset, bytes([seed]) * BLOCK)


def _qemu_io(path: str, fmt: str, commands: list[str]) -> None:
    args = [x for c in commands for x in ("-c", c)]
    subprocess.run(["qemu-io", "-f", fmt, path, *args, "-c", "flush"], check=True, capture_output=True)


def run_case(case: str, work: str, size: int, cluster: int, writes: list[tuple[int, int]], block_size: int) -> dict:
    src, dst = os.path.join(work, "src"), os.path.join(work, "dst")
    os.mkdir(src)
    os.mkdir(dst)
    if case.startswith("lamina"):
        path = os.path.join(src, "disk.lam")
        _fill_lamina(path, size, cluster)
        if case == "lamina-no-twin":
            shutil.rmtree(path + ".layers")
    elif case == "qcow2":
        path = os.path.join(src, "disk.qcow2")
        raw = os.path.join(work, "fill.raw")
        with open(raw, "wb") as f:
            for _, data in _fill(size):
                f.write(data)
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={cluster}", raw,
                        path], check=True)
        os.unlink(raw)
    else:
        path = os.path.join(src, "disk.raw")
        with open(path, "wb") as f:
            for _, data in _fill(size):
                f.write(data)
    first = rsync(src, dst, block_size)
    before = records(src)
    started = time.perf_counter()
    if case.startswith("lamina"):
        layers.create_snapshot(path, "s1")
        if case == "lamina-clone":
            path = os.path.join(src, "clone.lam")
            layers.clone(os.path.join(src, "disk.lam"), "s1", path)
        _write_lamina(path, writes)
    elif case == "qcow2":
        subprocess.run(["qemu-img", "snapshot", "-c", "s1", path], check=True)
        _qemu_io(path, "qcow2", [f"write -P {seed} {offset} {BLOCK}" for offset, seed in writes])
    else:
        fd = os.open(path, os.O_WRONLY)
        try:
            for offset, seed in writes:
                os.pwrite(fd, bytes([seed]) * BLOCK, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    changed_seconds = time.perf_counter() - started
    second = rsync(src, dst, block_size)
    after = records(src)
    _same_trees(src, dst)
    shutil.rmtree(src)
    shutil.rmtree(dst)
    return {"first_sent": first["sent"], "sent": second["sent"], "received": second["received"],
            "literal": second["literal"], "records_changed": records_changed(before, after),
            "snapshot_and_writes_seconds": round(changed_seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--cluster-size", default="64k")
    parser.add_argument("--block-size", type=int, default=4096, help="rsync -B (0: rsync's default)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", choices=("human", "json"), default="human")
    args = parser.parse_args(argv)
    if shutil.which("rsync") is None:
        print("rsync is not installed", file=sys.stderr)
        return 1
    size, cluster = parse_size(args.size), parse_size(args.cluster_size)
    rng = random.Random(args.seed)
    writes = [(rng.randrange(size // BLOCK) * BLOCK, rng.randrange(1, 256))
              for _ in range(args.writes)]
    written = BLOCK * len(writes)
    cases = [c for c in args.cases if c != "qcow2" or (shutil.which("qemu-img") and shutil.which("qemu-io"))]
    results = {}
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="lamina-bench-rsync-") as work:
            results[case] = run_case(case, work, size, cluster, writes, args.block_size)
        results[case]["sent_over_written"] = round(results[case]["sent"] / written, 2)
    report = {"written": written, "virtual_size": size, "cluster_size": cluster, "record_size": RECORD,
              "rsync": " ".join(rsync_command(args.block_size)) + " SRC/ DST/", "results": results}
    if args.output == "json":
        print(json.dumps(report, indent=4))
        return 0
    print(f"{report['rsync']}; {args.writes} random 4 KiB writes (W = {written} bytes) after a snapshot, "
          f"{size >> 20} MiB disk, {cluster >> 10} KiB clusters")
    print(f"  {'case':<15} {'sent':>13} {'sent/W':>7} {'received':>10} {'literal':>13} {'128K records':>13}")
    for case, r in results.items():
        print(f"  {case:<15} {r['sent']:>13,} {r['sent_over_written']:>7} {r['received']:>10,} {r['literal']:>13,} "
              f"{r['records_changed']:>13,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
