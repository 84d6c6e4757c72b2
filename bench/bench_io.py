#!/usr/bin/env python3
"""Guest I/O throughput of a Lamina image against a raw file, through the same Python calls.

Both sides are driven by the same loop, the same offsets (fixed seed) and the
same buffers; the raw side is a small class over os.pread/os.pwrite/os.fsync,
exactly the system calls the Lamina implementation's OS backend makes, so the
ratio measures what the format and its implementation add.  Nothing is dropped
from the page cache: these are cached-I/O numbers.  See bench/README.md.

    python bench/bench_io.py [--size 256M] [--cluster-size 64k] [--output json]
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import random
import re
import shutil
import sys
import tempfile
import time
from typing import Callable

from lamina.impl.image import Image
from lamina.impl.osfile import OsStorage
from lamina.spec.errors import InvalidArgument
from lamina.spec.layout import cluster_size_to_bits

KiB = 1 << 10
MiB = 1 << 20
BLOCK_SIZES = (4 * KiB, 1 * MiB)
DEFAULT_SEED = 20090101
CACHE_NOTE = ("cached I/O: nothing is dropped from the page cache, so reads are served from memory; "
              "each write phase ends with a flush (fsync) that is counted in its time")


def parse_size(text: str) -> int:
    """'256M', '64k', '1G', '4096' -> bytes (binary units; an optional trailing 'B' or 'iB')."""
    match = re.fullmatch(r"(\d+)\s*([kmgt]?)(?:i?b)?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 256M, 64k, 1G)")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[match[2]]


def human(n: int) -> str:
    for unit, scale in (("G", 1 << 30), ("M", MiB), ("k", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


# --------------------------------------------------------------------- the two engines
class RawFile:
    """A raw disk file with the Lamina image's guest calls, over the same system calls as impl/osfile.py."""

    def __init__(self, path: str, size: int) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.ftruncate(self._fd, size)  # sparse, as `qemu-img create -f raw` makes it
        self.fsyncs = 0

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view, offset = view[done:], offset + done

    def flush(self) -> None:
        self.fsyncs += 1
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class CountingStorage(OsStorage):
    """The OS backend, with a count of the fsyncs issued on the files it opens.

    Only `fsync` is wrapped (an instance attribute), so pread and pwrite run the
    backend's own methods with no added layer.
    """

    def __init__(self) -> None:
        self.fsyncs = 0

    def _count(self, file):
        real_fsync = file.fsync

        def fsync() -> None:
            self.fsyncs += 1
            real_fsync()

        file.fsync = fsync
        return file

    def open(self, path: str, writable: bool, follow_symlinks: bool = False):
        return self._count(super().open(path, writable, follow_symlinks))

    def create(self, path: str):
        return self._count(super().create(path))


# --------------------------------------------------------------------- workload
def make_buffers(seed: int) -> dict[int, list[bytes]]:
    """Pre-built write payloads (random bytes from the seed), so no phase pays for making them."""
    rng = random.Random(seed)
    return {4 * KiB: [rng.randbytes(4 * KiB) for _ in range(256)],
            1 * MiB: [rng.randbytes(MiB) for _ in range(4)]}


def offsets(size: int, block: int, pattern: str, seed: int) -> list[int]:
    """Block-aligned offsets covering the disk once: in order, or a seeded permutation."""
    blocks = list(range(size // block))
    if pattern == "rand":
        random.Random(f"{seed}-{block}").shuffle(blocks)
    return [b * block for b in blocks]


def run_phase(engine, fsync_count: Callable[[], int], op: str, offs: list[int], block: int,
              buffers: list[bytes], min_time: float, profiler: cProfile.Profile | None) -> dict:
    """Time one phase on one engine.

    A write phase is one pass over the disk ending with a flush inside the timed
    span; a read phase repeats whole passes until `min_time` seconds have gone by,
    so that short phases are not timed from a few milliseconds.
    """
    nbuf = len(buffers)
    fsyncs_before = fsync_count()
    passes = 0
    if profiler:
        profiler.enable()
    start = time.perf_counter()
    if op == "write":
        write = engine.write
        for i, off in enumerate(offs):
            write(off, buffers[i % nbuf])
        engine.flush()
        passes = 1
    else:
        read = engine.read
        while True:
            for off in offs:
                read(off, block)
            passes += 1
            if time.perf_counter() - start >= min_time:
                break
    seconds = time.perf_counter() - start
    if profiler:
        profiler.disable()
    nbytes = passes * len(offs) * block
    return {"passes": passes, "ops": passes * len(offs), "bytes": nbytes, "seconds": seconds,
            "mib_per_s": nbytes / MiB / seconds, "fsyncs": fsync_count() - fsyncs_before}


def run_flush_cost(engine, fsync_count: Callable[[], int], size: int, count: int, seed: int,
                   payload: bytes) -> dict:
    """`count` rounds of one random 4 KiB write then a flush; only the flush is timed."""
    rng = random.Random(f"{seed}-flush")
    times = []
    write_fsyncs = flush_fsyncs = 0
    for _ in range(count):
        off = rng.randrange(size // (4 * KiB)) * 4 * KiB
        before = fsync_count()
        engine.write(off, payload)
        middle = fsync_count()
        start = time.perf_counter()
        engine.flush()
        times.append(time.perf_counter() - start)
        write_fsyncs += middle - before
        flush_fsyncs += fsync_count() - middle
    times.sort()
    return {"flushes": count,
            "fsyncs_per_flush": flush_fsyncs / count,
            "fsyncs_per_write": write_fsyncs / count,
            "mean_ms": sum(times) / count * 1e3,
            "median_ms": times[count // 2] * 1e3,
            "max_ms": times[-1] * 1e3}


def overwrite_offsets(size: int, writes: int, seed: int) -> list[int]:
    """Seeded random 4 KiB-aligned offsets (with repeats) for the flush-heavy overwrite phase."""
    rng = random.Random(f"{seed}-overwrite-flush")
    return [rng.randrange(size // (4 * KiB)) * 4 * KiB for _ in range(writes)]


def run_overwrite_flush(engine, fsync_count: Callable[[], int], offs: list[int], every: int,
                        buffers: list[bytes]) -> dict:
    """Random 4 KiB overwrites of written data with a flush every `every` writes; all of it is timed.

    The steady state of a guest that flushes often (a database, a journaling
    file system): what the format adds per flush is the point (issue "flush cost").
    """
    nbuf = len(buffers)
    before = fsync_count()
    flushes = 0
    start = time.perf_counter()
    write, flush = engine.write, engine.flush
    for i, off in enumerate(offs, 1):
        write(off, buffers[i % nbuf])
        if i % every == 0:
            flush()
            flushes += 1
    if len(offs) % every:
        flush()
        flushes += 1
    seconds = time.perf_counter() - start
    fsyncs = fsync_count() - before
    return {"writes": len(offs), "flushes": flushes, "seconds": seconds, "fsyncs": fsyncs,
            "fsyncs_per_flush": fsyncs / flushes}


def io_script(offs: list[int], every: int) -> str:
    """The overwrite phase as qemu-io / `lamina io` commands (one a line), for a whole-process comparison."""
    lines = []
    for i, off in enumerate(offs, 1):
        lines.append(f"write -P 0x{i % 255 + 1:02x} {off} 4k")
        if i % every == 0:
            lines.append("flush")
    if len(offs) % every:
        lines.append("flush")
    return "\n".join(lines) + "\n"


def same_contents(raw: RawFile, image: Image, size: int) -> bool:
    """Both disks must hold the same guest bytes after the same writes (untimed sanity check)."""
    for off in range(0, size, 8 * MiB):
        n = min(8 * MiB, size - off)
        if hashlib.sha256(raw.read(off, n)).digest() != hashlib.sha256(image.read(off, n)).digest():
            return False
    return True


def profile_text(profiler: cProfile.Profile, limit: int) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(limit)
    return out.getvalue()


# --------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> dict:
    size, cluster_size, seed = args.size, args.cluster_size, args.seed
    buffers = make_buffers(seed)
    workdir = tempfile.mkdtemp(prefix="lamina-bench-", dir=args.dir)
    profiles: dict[str, str] = {}
    try:
        raw = RawFile(os.path.join(workdir, "disk.raw"), size)
        storage = CountingStorage()
        image = Image.create(os.path.join(workdir, "disk.lamina"), size, cluster_size=cluster_size,
                             storage=storage)
        fsync_count = {"raw": lambda: raw.fsyncs, "lamina": lambda: storage.fsyncs}
        engines = {"raw": raw, "lamina": image}
        phases = []
        for block in BLOCK_SIZES:
            for pattern in ("seq", "rand"):
                offs = offsets(size, block, pattern, seed)
                for op in ("write", "read"):
                    name = f"{pattern}-{op}-{human(block)}"
                    row = {"name": name, "op": op, "pattern": pattern, "block_size": block,
                           "ops_per_pass": len(offs)}
                    for engine in ("raw", "lamina"):
                        profiler = cProfile.Profile() if args.profile and engine == "lamina" else None
                        row[engine] = run_phase(engines[engine], fsync_count[engine], op, offs, block,
                                                buffers[block], args.min_time, profiler)
                        if profiler:
                            profiles[name] = profile_text(profiler, args.profile)
                    row["ratio"] = row["lamina"]["mib_per_s"] / row["raw"]["mib_per_s"]
                    phases.append(row)
                    if sys.stderr.isatty():
                        print(f"  done {name:<16} raw {row['raw']['mib_per_s']:9.1f} MiB/s   "
                              f"lamina {row['lamina']['mib_per_s']:9.1f} MiB/s", file=sys.stderr)
        flush = {engine: run_flush_cost(engines[engine], fsync_count[engine], size, args.flushes, seed,
                                        buffers[4 * KiB][0])
                 for engine in ("raw", "lamina")}
        flush["time_ratio"] = flush["lamina"]["median_ms"] / flush["raw"]["median_ms"]
        offs = overwrite_offsets(size, args.overwrites, seed)
        overwrite = {engine: run_overwrite_flush(engines[engine], fsync_count[engine], offs, args.flush_every,
                                                 buffers[4 * KiB])
                     for engine in ("raw", "lamina")}
        overwrite["time_ratio"] = overwrite["lamina"]["seconds"] / overwrite["raw"]["seconds"]
        identical = same_contents(raw, image, size)
        image.close()
        raw.close()
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "benchmark": "bench_io",
        "cached_io": True,
        "note": CACHE_NOTE,
        "config": {"size": size, "cluster_size": cluster_size, "seed": seed, "flushes": args.flushes,
                   "overwrites": args.overwrites, "flush_every": args.flush_every,
                   "min_read_time": args.min_time,
                   "block_sizes": list(BLOCK_SIZES),
                   "random_offsets": "seeded permutation of the block-aligned offsets (each block once)"},
        "environment": {"python": platform.python_version(), "machine": platform.machine(),
                        "system": platform.system(), "release": platform.release(), "cpus": os.cpu_count()},
        "phases": phases,
        "guest_flush": flush,
        "overwrite_flush": overwrite,
        "contents_identical": identical,
        "profiles": profiles,
    }


def render_text(result: dict) -> str:
    c = result["config"]
    lines = [
        f"Lamina vs raw file, guest I/O through the same Python calls "
        f"(size {human(c['size'])}, cluster size {human(c['cluster_size'])}, seed {c['seed']})",
        f"NOTE: {result['note']}.",
        "Random offsets: seeded permutation of the block-aligned offsets, so a pass touches every block once.",
        f"A write phase is one pass; a read phase repeats passes for at least {c['min_read_time']:g} s.",
        "lamina/raw is the throughput ratio: below 1 means Lamina is slower.",
        "",
    ]
    header = ("phase", "raw ops", "lamina ops", "raw MiB/s", "lamina MiB/s", "lamina/raw", "raw fsyncs", "lamina fsyncs")
    rows = [header]
    for p in result["phases"]:
        rows.append((p["name"], str(p["raw"]["ops"]), str(p["lamina"]["ops"]), f"{p['raw']['mib_per_s']:.1f}", f"{p['lamina']['mib_per_s']:.1f}",
                     f"{p['ratio']:.2f}", str(p["raw"]["fsyncs"]), str(p["lamina"]["fsyncs"])))
    lines += table(rows)
    f = result["guest_flush"]
    lines += ["", f"Guest flush after one random 4 KiB write ({c['flushes']} rounds; only the flush is timed):", ""]
    rows = [("engine", "fsyncs/flush", "fsyncs/write", "mean ms", "median ms", "max ms")]
    for engine in ("raw", "lamina"):
        e = f[engine]
        rows.append((engine, f"{e['fsyncs_per_flush']:.2f}", f"{e['fsyncs_per_write']:.2f}",
                     f"{e['mean_ms']:.3f}", f"{e['median_ms']:.3f}", f"{e['max_ms']:.3f}"))
    lines += table(rows)
    lines += [f"flush time lamina/raw (median): {f['time_ratio']:.2f} (above 1 means Lamina is slower)"]
    o = result["overwrite_flush"]
    lines += ["", f"Random 4 KiB overwrites of written data, a flush every {c['flush_every']} "
              f"({c['overwrites']} writes; all timed):", ""]
    rows = [("engine", "flushes", "fsyncs", "fsyncs/flush", "seconds")]
    for engine in ("raw", "lamina"):
        e = o[engine]
        rows.append((engine, str(e["flushes"]), str(e["fsyncs"]), f"{e['fsyncs_per_flush']:.2f}", f"{e['seconds']:.3f}"))
    lines += table(rows)
    lines += [f"wall time lamina/raw: {o['time_ratio']:.2f} (above 1 means Lamina is slower)",
              "",
              f"contents identical after all phases: {'yes' if result['contents_identical'] else 'NO'}"]
    e = result["environment"]
    lines.append(f"Python {e['python']} on {e['system']} {e['release']} {e['machine']}, {e['cpus']} CPUs")
    for name, text in result["profiles"].items():
        lines += ["", f"--- cProfile of the Lamina side of {name} (by own time) ---", text.rstrip()]
    return "\n".join(lines)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(r[1:], widths[1:])]
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=256 * MiB,
                        help="virtual disk size, a multiple of 1 MiB (default 256M)")
    parser.add_argument("--cluster-size", type=parse_size, default=64 * KiB,
                        help="Lamina cluster size, 4k to 2M (default 64k)")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the random offsets and payloads")
    parser.add_argument("--flushes", type=int, default=200, help="rounds of the guest-flush measurement (default 200)")
    parser.add_argument("--overwrites", type=int, default=4096,
                        help="writes of the flush-heavy overwrite phase (default 4096)")
    parser.add_argument("--flush-every", type=int, default=64, help="writes between flushes there (default 64)")
    parser.add_argument("--io-script", metavar="FILE", default=None,
                        help="only write the overwrite phase as qemu-io / lamina io commands to FILE, and exit")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="seconds each read phase runs at least, in whole passes (default 1.0)")
    parser.add_argument("--dir", default=None,
                        help="directory for the two disk files (default: the system temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the disk files")
    parser.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="N",
                        help="cProfile the Lamina side of each phase and print its top N functions")
    args = parser.parse_args(argv)
    if args.size < MiB or args.size % MiB:
        parser.error("--size must be a positive multiple of 1 MiB")
    try:
        cluster_size_to_bits(args.cluster_size)
    except InvalidArgument as exc:
        parser.error(f"--cluster-size: {exc}")
    if args.flushes < 1 or args.overwrites < 1 or args.flush_every < 1:
        parser.error("--flushes, --overwrites and --flush-every must be at least 1")
    if args.io_script:
        with open(args.io_script, "w") as out:
            out.write(io_script(overwrite_offsets(args.size, args.overwrites, args.seed), args.flush_every))
        return 0
    result = run(args)
    if args.output == "json":
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print(render_text(result))
    return 0 if result["contents_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
