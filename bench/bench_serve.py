#!/usr/bin/env python3
"""Reading a whole image through `lamina serve` (NBD) against `lamina convert` and against qemu-img on qcow2.

The same guest bytes (a disk whose first half is data and second half a
hole) are stored as a Lamina image and as a qcow2 image; three whole
processes copy them to a raw file, in turn (A B C A B C ...):

- **nbd**: `qemu-img convert -f raw nbd+unix:///?socket=S -O raw OUT`, with
  `lamina serve --readonly --socket S IMAGE` started once before the runs;
- **lamina**: `lamina convert -O raw IMAGE OUT`;
- **qcow2**: `qemu-img convert -f qcow2 IMAGE.qcow2 -O raw OUT`.

Prints the median wall time of each and the medians of the pairwise ratios
nbd/lamina and nbd/qcow2 (time ratios: above 1 the NBD path is slower).
Nothing is dropped from the page cache.  See bench/README.md.

    python bench/bench_serve.py [--size 1G] [--runs 3] [--output json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

LAMINA = [sys.executable, "-m", "lamina.impl.cli"]


def parse_size(text: str) -> int:
    units = {"": 0, "k": 10, "m": 20, "g": 30}
    number, unit = (text[:-1], text[-1].lower()) if text[-1:].isalpha() else (text, "")
    return int(number) << units[unit]


def make_data(directory: str, size: int) -> tuple[str, str]:
    """A raw file with its first half data (a non-zero pattern) and its second half a hole, as Lamina and qcow2."""
    raw = os.path.join(directory, "src.raw")
    block = bytes((i * 7 + 1) & 0xFF for i in range(1 << 20))
    with open(raw, "wb") as fh:
        for _ in range(size // 2 // len(block)):
            fh.write(block)
        fh.truncate(size)
    image, qcow2 = os.path.join(directory, "disk.lam"), os.path.join(directory, "disk.qcow2")
    subprocess.run([*LAMINA, "convert", "-f", "raw", "-O", "lamina", raw, image], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    os.unlink(raw)
    return image, qcow2


def start_server(image: str, socket: str) -> subprocess.Popen:
    server = subprocess.Popen([*LAMINA, "serve", "--readonly", "--socket", socket, image], stdout=subprocess.PIPE,
                              text=True)
    line = server.stdout.readline()
    if not line.startswith("Serving "):
        server.kill()
        raise SystemExit(f"lamina serve did not start: {line!r}")
    return server


def timed(argv: list[str], out: str) -> float:
    if os.path.exists(out):
        os.unlink(out)  # `lamina convert` refuses to overwrite
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def digest(path: str) -> str:
    """SHA-256 of a file's bytes, holes read as zeros (not timed)."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 << 20):
            sha.update(chunk)
    return sha.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1G", help="virtual size; the first half is data (default 1G)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each command after one warm-up")
    parser.add_argument("--dir", help="where the files go (default: a new temporary directory)")
    parser.add_argument("--out-dir", help="where the copies are written (default: with the images; a tmpfs such as "
                        "/dev/shm leaves the disk and the fsync out of the figures)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--output", choices=("human", "json"), default="human")
    args = parser.parse_args(argv)
    if shutil.which("qemu-img") is None or shutil.which("nbdkit") is None:
        raise SystemExit("qemu-img (qemu-utils) and nbdkit (nbdkit, nbdkit-plugin-python) must be on the PATH")
    size = parse_size(args.size)
    directory = tempfile.mkdtemp(prefix="bench-serve-", dir=args.dir)
    out = ""
    try:
        image, qcow2 = make_data(directory, size)
        socket = os.path.join(directory, "s")
        out = os.path.join(args.out_dir or directory, f"bench-serve-{os.getpid()}.raw")
        commands = {
            "nbd": ["qemu-img", "convert", "-f", "raw", f"nbd+unix:///?socket={socket}", "-O", "raw", out],
            "lamina": [*LAMINA, "convert", "-O", "raw", image, out],
            "qcow2": ["qemu-img", "convert", "-f", "qcow2", qcow2, "-O", "raw", out],
        }
        server = start_server(image, socket)
        try:
            times: dict[str, list[float]] = {name: [] for name in commands}
            digests: dict[str, str] = {}
            for run in range(args.runs + 1):
                for name, command in commands.items():
                    seconds = timed(command, out)
                    if run:  # the first round warms up
                        times[name].append(seconds)
                    else:
                        digests[name] = digest(out)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    finally:
        if out and args.out_dir and os.path.exists(out):
            os.unlink(out)
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {f"nbd/{other}": statistics.median(a / b for a, b in zip(times["nbd"], times[other]))
              for other in ("lamina", "qcow2")}
    result = {"size": size, "data": size // 2, "runs": args.runs, "machine": platform.machine(),
              "cpus": os.cpu_count(), "same_bytes": len(set(digests.values())) == 1, "seconds": times, "median_seconds": medians, "median_ratios": ratios}
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        print(f"{size >> 20} MiB disk, {size >> 21} MiB of data, {args.runs} runs after one warm-up, cached I/O; "
              f"the three outputs {'hold the same bytes' if result['same_bytes'] else 'DIFFER'}")
        for name, command in commands.items():
            print(f"  {name:<7} {medians[name]:7.2f} s   {' '.join(command[-6:] if name != 'lamina' else command[2:])}")
        for name, value in ratios.items():
            print(f"  {name:<13} {value:5.2f}  (time ratio: above 1 the NBD path is slower)")
    return 0 if result["same_bytes"] else 1


if __name__ == "__main__":
    sys.exit(main())
