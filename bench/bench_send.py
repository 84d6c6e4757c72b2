#!/usr/bin/env python3
"""Replication cost (R13): incremental `send` against rsync of the image directory, and against qcow2 plus rsync.

One disk, written in full, then ten rounds of 1,000 random 4 KiB writes, each
round ended by a snapshot.  After each round:

- Lamina: `send -i PREVIOUS IMAGE@SNAP`, received into a replica (which must
  then read the same for that snapshot);
- Lamina directory: `rsync` of the image's files (top and layer directory) to a
  second replica;
- qcow2: an internal snapshot (`qemu-img snapshot -c`) after the same writes
  made by `qemu-io`, and `rsync` of the .qcow2 file.

Bytes are what each transfer sends: the stream's length, and rsync's "Total
bytes sent" (delta transfer forced with --no-whole-file, as between hosts).

    python bench/bench_send.py [--size 1G] [--rounds 10] [--writes 1000] [--output json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile

from lamina.impl import layers
from lamina.impl.image import Image
from lamina.impl.replicate import receive, send
from lamina.impl.sizes import parse_size

BLOCK = 4096
RSYNC = ["rsync", "-aH", "--no-whole-file", "--fuzzy", "-B", "4096", "--modify-window=-1", "--stats"]  # the README's


def rsync_sent(src: str, dst: str) -> int:
    out = subprocess.run(RSYNC + [src, dst], check=True, capture_output=True, text=True).stdout
    return int(re.search(r"Total bytes sent: ([\d,]+)", out)[1].replace(",", ""))


def digest(target: str, size: int) -> str:
    h = hashlib.sha256()
    with layers.open_target(target) as image:
        for pos in range(0, size, 1 << 22):
            h.update(image.read(pos, min(1 << 22, size - pos)))
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=20091201)
    parser.add_argument("--no-qcow2", action="store_true", help="skip the qcow2 side (also skipped without qemu-img)")
    parser.add_argument("--output", choices=("human", "json"), default="human")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    qcow2 = not args.no_qcow2 and shutil.which("qemu-img") and shutil.which("qemu-io")
    have_rsync = shutil.which("rsync") is not None
    rng = random.Random(args.seed)
    work = tempfile.mkdtemp(prefix="lamina-bench-send-")
    rows = []
    try:
        os.chdir(work)
        for d in ("src", "rsync-replica", "qsrc", "qdst"):
            os.mkdir(d)
        with Image.create("src/disk.lam", size) as image:
            for pos in range(0, size, 1 << 20):
                image.write(pos, bytes([pos >> 20 & 0xFF]) * (1 << 20))
        if qcow2:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "qsrc/disk.qcow2", str(size)], check=True)
            subprocess.run(["qemu-io", "-f", "qcow2", "-t", "writeback", "-c", f"write -P 0x5a 0 {size}",
                            "qsrc/disk.qcow2"], check=True, capture_output=True)
        layers.create_snapshot("src/disk.lam", "s0")
        with open("full.stream", "wb") as out:
            send("src/disk.lam@s0", out)
        with open("full.stream", "rb") as source:
            receive("replica.lam", source)
        first = {"round": 0, "guest_bytes": size, "stream_bytes": os.path.getsize("full.stream")}
        if have_rsync:
            first["rsync_lamina_bytes"] = rsync_sent("src/", "rsync-replica/")
        if qcow2:
            subprocess.run(["qemu-img", "snapshot", "-c", "s0", "qsrc/disk.qcow2"], check=True)
            first["rsync_qcow2_bytes"] = rsync_sent("qsrc/", "qdst/")
        rows.append(first)
        blocks = size // BLOCK
        for r in range(1, args.rounds + 1):
            offsets = [rng.randrange(blocks) * BLOCK for _ in range(args.writes)]
            with Image.open("src/disk.lam") as image:
                for i, off in enumerate(offsets):
                    image.write(off, bytes([(r * 7 + i) & 0xFF or 1]) * BLOCK)
            layers.create_snapshot("src/disk.lam", f"s{r}")
            with open(f"s{r}.stream", "wb") as out:
                send(f"src/disk.lam@s{r}", out, f"s{r - 1}")
            with open(f"s{r}.stream", "rb") as source:
                receive("replica.lam", source)
            row = {"round": r, "guest_bytes": args.writes * BLOCK, "stream_bytes": os.path.getsize(f"s{r}.stream")}
            if have_rsync:
                row["rsync_lamina_bytes"] = rsync_sent("src/", "rsync-replica/")
            if qcow2:
                commands = [f"write -P {(r * 7 + i) & 0xFF or 1} {off} {BLOCK}" for i, off in enumerate(offsets)]
                with open("q.cmds", "w") as f:
                    f.write("\n".join(commands + ["flush", "quit"]) + "\n")
                with open("q.cmds") as f:
                    subprocess.run(["qemu-io", "-f", "qcow2", "-t", "writeback", "qsrc/disk.qcow2"], stdin=f,
                                   check=True, capture_output=True)
                subprocess.run(["qemu-img", "snapshot", "-c", f"s{r}", "qsrc/disk.qcow2"], check=True)
                row["rsync_qcow2_bytes"] = rsync_sent("qsrc/", "qdst/")
            rows.append(row)
        same = digest(f"src/disk.lam@s{args.rounds}", size) == digest(f"replica.lam@s{args.rounds}", size)
    finally:
        os.chdir("/")
        shutil.rmtree(work, ignore_errors=True)
    incremental = rows[1:]
    summary = {
        "size": size, "rounds": args.rounds, "writes_per_round": args.writes, "replica_reads_the_same": same,
        "stream_over_guest": max(r["stream_bytes"] / r["guest_bytes"] for r in incremental),
        **({"rsync_lamina_over_guest": max(r["rsync_lamina_bytes"] / r["guest_bytes"] for r in incremental)}
           if have_rsync else {}),
        **({"rsync_qcow2_over_guest": max(r["rsync_qcow2_bytes"] / r["guest_bytes"] for r in incremental)}
           if qcow2 else {}),
        "rows": rows,
    }
    if args.output == "json":
        print(json.dumps(summary, indent=2))
    else:
        cols = ["round", "guest_bytes", "stream_bytes", "rsync_lamina_bytes", "rsync_qcow2_bytes"]
        print("  ".join(f"{c:>18}" for c in cols))
        for r in rows:
            print("  ".join(f"{r.get(c, '-'):>18}" for c in cols))
        print(f"worst incremental round, bytes sent per guest byte written: stream {summary['stream_over_guest']:.3f}"
              + (f", rsync of the Lamina directory {summary['rsync_lamina_over_guest']:.1f}" if have_rsync else "")
              + (f", rsync of the qcow2 {summary['rsync_qcow2_over_guest']:.1f}" if qcow2 else ""))
        print(f"the replica reads the same as the source for the last snapshot: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
