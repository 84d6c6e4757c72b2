#!/usr/bin/env python3
"""Every CLI-level comparison with qemu-io/qemu-img in one run: a table and a JSON document.

Each row runs the `lamina` command and its QEMU peers (qcow2, and raw where
it applies) as separate processes, interleaved (L Q R L Q R ...), `--runs`
times after one warm-up, with whatever a run needs (a fresh image, no
output file) prepared untimed before it.  The table gives each side's median
wall time with its spread (min-max) and the medians of the pairwise ratios
lamina/qcow2 and lamina/raw (time ratios: above 1 Lamina is slower).  Then
one run of each write workload under strace: bytes the tool wrote to the
image's files and fsync/fdatasync calls, per guest byte.  Not part of CI.

    python bench/run_all.py [--quick] [--runs 5] [--output json] [--only io chain check-map convert startup]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other bench scripts, as modules
import bench_chain  # noqa: E402
from bench_cpu import KiB, MiB, human, parse_size, remove, write_data  # noqa: E402

from lamina.impl import layers  # noqa: E402
from lamina.impl.image import Image  # noqa: E402

_BESIDE = os.path.join(os.path.dirname(sys.executable), "lamina")  # the installed entry point, as a user runs it
LAMINA = [_BESIDE] if os.path.exists(_BESIDE) else [sys.executable, "-m", "lamina.impl.cli"]
QEMU_IO = ["qemu-io", "-t", "writeback"]  # qemu-io's default is writethrough (a sync per write); lamina io is writeback
SIDES = ("lamina", "qcow2", "raw")
Prepare = Callable[[], None]
NOTHING: Prepare = lambda: None  # noqa: E731


def run(argv: list[str], stdin_path: str | None = None) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one run; a failure stops the benchmark (a wrong result is no timing)."""
    with open(stdin_path or os.devnull, "rb") as stdin:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = child.stderr.read() if child.stderr else b""
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({child.returncode}): {err.decode(errors='replace').strip()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


class Row:
    """One measurement: a command per side (None: the side does not apply), each with its untimed preparation."""

    def __init__(self, name: str, what: str, commands: dict[str, list[str] | None], prepare: dict[str, Prepare] | None = None,
                 stdin: str | None = None, guest_bytes: int = 0) -> None:
        self.name, self.what, self.commands, self.stdin, self.guest_bytes = name, what, commands, stdin, guest_bytes
        self.prepare = prepare or {}


def time_row(row: Row, runs: int) -> dict:
    sides = [s for s in SIDES if row.commands.get(s)]
    wall: dict[str, list[float]] = {s: [] for s in sides}
    cpu: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(runs + 1):  # the first round is the warm-up
        for side in sides:
            row.prepare.get(side, NOTHING)()
            w, c = run(row.commands[side], row.stdin)
            if i:
                wall[side].append(w)
                cpu[side].append(c)
    out: dict = {"name": row.name, "what": row.what, "runs": runs,
                 "commands": {s: " ".join(row.commands[s]) for s in sides}, "sides": {}}
    for side in sides:
        out["sides"][side] = {"wall_median_s": statistics.median(wall[side]), "wall_min_s": min(wall[side]),
                              "wall_max_s": max(wall[side]), "cpu_median_s": statistics.median(cpu[side]),
                              "wall_all_s": wall[side]}
    for peer in ("qcow2", "raw"):
        if "lamina" in sides and peer in sides:
            ratios = [a / b for a, b in zip(wall["lamina"], wall[peer])]
            out[f"lamina/{peer}"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    return out


_CALL = re.compile(r"^(\w+)\((\d+)<([^>]*)>.*\)\s+=\s+(-?\d+)")
_WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}
_SYNCS = {"fsync", "fdatasync"}


def host_io(argv: list[str], stdin: str, under: str, work: str) -> dict:
    """One run under `strace -f`: bytes written to files under `under` and fsync/fdatasync calls on them."""
    prefix = os.path.join(work, "strace")
    for name in os.listdir(work):
        if name.startswith("strace."):
            os.unlink(os.path.join(work, name))
    run(["strace", "-f", "-ff", "-qq", "-y", "-s", "0", "-e", "trace=" + ",".join(sorted(_WRITES | _SYNCS)),
         "-o", prefix, *argv], stdin)
    written = writes = syncs = 0
    for name in os.listdir(work):
        if not name.startswith("strace."):
            continue
        with open(os.path.join(work, name), errors="replace") as log:
            for line in log:
                match = _CALL.match(line)
                if not match or not match[3].startswith(under) or int(match[4]) < 0:
                    continue
                if match[1] in _WRITES:
                    written += int(match[4])
                    writes += 1
                else:
                    syncs += 1
        os.unlink(os.path.join(work, name))
    return {"host_bytes": written, "write_calls": writes, "fsyncs": syncs}


def io_lines(kind: str, size: int, ops: int, seed: int) -> list[str]:
    """qemu-io commands, the same for every tool: from the same seeded offsets."""
    rng = random.Random(seed)
    if kind == "seq-write-64k":
        return [f"write -P {i % 255 + 1:#04x} {i * 64 * KiB} 64k" for i in range(size // (64 * KiB))] + ["flush"]
    if kind == "seq-write-4k":
        return [f"write -P {i % 255 + 1:#04x} {i * 4 * KiB} 4k" for i in range(min(ops, size // (4 * KiB)))] + ["flush"]
    if kind == "seq-read-4k":
        return [f"read {i * 4 * KiB} 4k" for i in range(min(ops, size // (4 * KiB)))]
    blocks = rng.sample(range(size // (4 * KiB)), min(ops, size // (4 * KiB)))
    lines = []
    for i, block in enumerate(blocks):
        if kind == "rand-read-4k":
            lines.append(f"read {block * 4 * KiB} 4k")
            continue
        lines.append(f"write -P {i % 255 + 1:#04x} {block * 4 * KiB} 4k")
        if i % 64 == 63:
            lines.append("flush")
    return lines + ([] if kind == "rand-read-4k" else ["flush"])


def write_file(path: str, lines: list[str]) -> str:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


class Bench:
    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.args, self.work = args, work
        self.qemu = all(shutil.which(t) for t in ("qemu-img", "qemu-io"))
        self.strace = shutil.which("strace") is not None
        self.notes: list[str] = []
        if not self.qemu:
            self.notes.append("qemu-img/qemu-io not on the PATH: the qcow2 and raw columns are skipped")
        if not self.strace:
            self.notes.append("strace not on the PATH: no host-bytes table")
        self.rows: list[dict] = []
        self.host: list[dict] = []

    def j(self, name: str) -> str:
        return os.path.join(self.work, name)

    def peers(self, lamina: list[str], qcow2: list[str] | None, raw: list[str] | None = None) -> dict[str, list[str] | None]:
        return {"lamina": lamina, "qcow2": qcow2 if self.qemu else None, "raw": raw if self.qemu else None}

    def add(self, row: Row) -> None:
        result = time_row(row, self.args.runs)
        self.rows.append(result)
        ratio = result.get("lamina/qcow2", {}).get("median")
        print(f"  {row.name}: " + ", ".join(f"{s} {v['wall_median_s']:.3f} s" for s, v in result["sides"].items())
              + (f", lamina/qcow2 {ratio:.2f}" if ratio else ""), file=sys.stderr)

    def fresh(self, side: str, path: str) -> Prepare:
        size = str(self.args.size)

        def make() -> None:
            remove(path)()
            if side == "lamina":
                run(LAMINA + ["create", path, size])
            elif side == "qcow2":
                run(["qemu-img", "create", "-f", "qcow2", path, size])
            else:
                with open(path, "wb") as f:
                    f.truncate(self.args.size)
        return make

    def images(self, stem: str) -> dict[str, str]:
        return {"lamina": self.j(stem + ".lam"), "qcow2": self.j(stem + ".qcow2"), "raw": self.j(stem + ".raw")}

    def io_commands(self, images: dict[str, str], read_only: bool = False) -> dict[str, list[str] | None]:
        r = ["-r"] if read_only else []
        return self.peers(LAMINA + ["io", *r, images["lamina"]], QEMU_IO + r + ["-f", "qcow2", images["qcow2"]],
                          QEMU_IO + r + ["-f", "raw", images["raw"]])

    def io(self) -> None:
        a = self.args
        print(f"guest I/O: {human(a.size)} disks, {a.ops} random ops", file=sys.stderr)
        # Writes into a fresh image every run: sequential 64 KiB, then random 4 KiB allocating writes.
        for kind, what in (("seq-write-4k", "--ops 4 KiB writes in order from offset 0, one flush at the end, fresh image"),
                           ("seq-write-64k", "64 KiB writes over the whole disk, one flush at the end, fresh image"),
                           ("rand-alloc-4k", "random 4 KiB writes into holes, flush every 64, fresh image")):
            lines = io_lines(kind, a.size, a.ops, a.seed)
            images = self.images(kind)
            commands = self.io_commands(images)
            row = Row(kind, what, commands, {s: self.fresh(s, images[s]) for s in SIDES}, write_file(self.j(kind + ".txt"), lines),
                      sum(parse_size(ln.split()[-1]) for ln in lines if ln.startswith("write")))
            self.add(row)
            self.strace_row(row, images)
        # Overwrites and reads on the sequentially written images (left full by the last run above).
        full = self.images("seq-write-64k")
        lines = io_lines("rand-overwrite-4k", a.size, a.ops, a.seed + 1)
        row = Row("rand-overwrite-4k", "random 4 KiB overwrites of written data, flush every 64 (flush-heavy)",
                  self.io_commands(full), stdin=write_file(self.j("overwrite.txt"), lines),
                  guest_bytes=4 * KiB * sum(ln.startswith("write") for ln in lines))
        self.add(row)
        self.strace_row(row, full)
        self.add(Row("seq-read-4k", "--ops 4 KiB reads in order from offset 0 of written data, read-only open",
                     self.io_commands(full, True), stdin=write_file(self.j("seq-read.txt"), io_lines("seq-read-4k", a.size, a.ops, a.seed))))
        lines = io_lines("rand-read-4k", a.size, a.ops, a.seed + 2)
        self.add(Row("rand-read-4k", "random 4 KiB reads of written data, read-only open", self.io_commands(full, True),
                     stdin=write_file(self.j("read.txt"), lines)))
        self.mapped = self.images("rand-alloc-4k")  # many small extents: what check and map walk

    def strace_row(self, row: Row, images: dict[str, str]) -> None:
        if not self.strace:
            return
        for side in SIDES:
            if not row.commands.get(side):
                continue
            row.prepare.get(side, NOTHING)()
            stem = os.path.realpath(os.path.splitext(images[side])[0])  # strace -y names files by their real path
            counts = host_io(row.commands[side], row.stdin or os.devnull, stem, self.work)
            with open(row.stdin or os.devnull) as script:
                flushes = sum(line.split() == ["flush"] for line in script)
            counts.update(name=row.name, side=side, guest_bytes=row.guest_bytes, flushes=flushes,
                          fsyncs_per_flush=counts["fsyncs"] / flushes if flushes else None,
                          host_per_guest_byte=counts["host_bytes"] / row.guest_bytes,
                          fsyncs_per_guest_mib=counts["fsyncs"] / (row.guest_bytes / MiB))
            self.host.append(counts)

    def chain(self) -> None:
        a = self.args
        print(f"chain: depth {a.depth}, {a.reads} random 4 KiB reads", file=sys.stderr)
        directory = self.j("chain")
        os.mkdir(directory)
        if self.qemu:
            lam, qcow = bench_chain.build_chains(directory, a.size, a.depth, 256 * KiB, a.seed)
        else:
            lam, qcow = os.path.join(directory, "chain.lam"), ""
            with Image.create(lam, a.size) as image:
                for offset in range(0, a.size, 256 * KiB):
                    image.write(offset, bytes([offset // (256 * KiB) % 251 + 1]) * (64 * KiB))
            for level in range(1, a.depth):
                layers.create_snapshot(lam, f"s{level}")
        rng = random.Random(a.seed + 3)
        lines = [f"read {rng.randrange(a.size // (4 * KiB)) * 4 * KiB} 4k" for _ in range(a.reads)]
        self.add(Row(f"chain-read-4k depth {a.depth}",
                     f"random 4 KiB reads through {a.depth - 1} snapshots (Lamina) / a backing chain of {a.depth} qcow2 files",
                     self.peers(LAMINA + ["io", "-r", lam], QEMU_IO + ["-r", "-f", "qcow2", qcow]),
                     stdin=write_file(self.j("chain.txt"), lines)))

    def check_map(self) -> None:
        images = getattr(self, "mapped", None)
        if images is None:  # io was not run: make the images it would have left
            images = self.images("rand-alloc-4k")
            lines = write_file(self.j("alloc.txt"), io_lines("rand-alloc-4k", self.args.size, self.args.ops, self.args.seed))
            for side, command in self.io_commands(images).items():
                if command:
                    self.fresh(side, images[side])()
                    run(command, lines)
        print("check and map of the random-4k image", file=sys.stderr)
        self.add(Row("check", "lamina check (metadata and data CRCs) / qemu-img check (metadata)",
                     self.peers(LAMINA + ["check", images["lamina"]], ["qemu-img", "check", images["qcow2"]])))
        self.add(Row("map", "extents as JSON", self.peers(LAMINA + ["map", "--output", "json", images["lamina"]],
                                                          ["qemu-img", "map", "--output=json", images["qcow2"]],
                                                          ["qemu-img", "map", "--output=json", "-f", "raw", images["raw"]])))

    def convert(self) -> None:
        size = self.args.size
        print(f"convert: {human(size)} raw, the first half data, the second half written zeroes", file=sys.stderr)
        src = self.j("convert-src.raw")
        write_data(src, size, [(0, size // 2, False), (size // 2, size - size // 2, True)])
        out = self.images("converted")
        back = {s: self.j(f"back-{s}.raw") for s in SIDES}
        self.add(Row("convert raw->format", "a raw file into the format (raw: qemu-img convert -O raw)",
                     self.peers(LAMINA + ["convert", "-f", "raw", "-O", "lamina", src, out["lamina"]],
                                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, out["qcow2"]],
                                ["qemu-img", "convert", "-f", "raw", "-O", "raw", src, out["raw"]]),
                     {s: remove(out[s]) for s in SIDES}))
        self.add(Row("convert format->raw", "the converted image back into a raw file",
                     self.peers(LAMINA + ["convert", "-O", "raw", out["lamina"], back["lamina"]],
                                ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", out["qcow2"], back["qcow2"]],
                                ["qemu-img", "convert", "-f", "raw", "-O", "raw", out["raw"], back["raw"]]),
                     {s: remove(back[s]) for s in SIDES}))
        remove(src, *out.values(), *back.values())()

    def startup(self) -> None:
        images = self.images("startup")
        for side in SIDES:
            if side == "lamina" or self.qemu:
                self.fresh(side, images[side])()
        self.add(Row("start-up: info", "lamina info / qemu-img info, a new empty image",
                     self.peers(LAMINA + ["info", images["lamina"]], ["qemu-img", "info", images["qcow2"]],
                                ["qemu-img", "info", "-f", "raw", images["raw"]])))
        self.add(Row("start-up: python -c pass", "the interpreter's floor, in the lamina column",
                     self.peers([sys.executable, "-c", "pass"], ["qemu-img", "info", images["qcow2"]])))


def render(result: dict) -> str:
    head = ("measurement", "lamina s (min-max)", "qcow2 s (min-max)", "raw s (min-max)", "lamina/qcow2", "lamina/raw", "cpu l/q")

    def side(row: dict, name: str) -> str:
        s = row["sides"].get(name)
        return f"{s['wall_median_s']:.3f} ({s['wall_min_s']:.3f}-{s['wall_max_s']:.3f})" if s else "-"

    def ratio(row: dict, peer: str) -> str:
        r = row.get(f"lamina/{peer}")
        return f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})" if r else "-"

    def cpu(row: dict) -> str:
        lamina, qcow2 = row["sides"].get("lamina"), row["sides"].get("qcow2")
        return f"{lamina['cpu_median_s'] / qcow2['cpu_median_s']:.2f}" if lamina and qcow2 and qcow2["cpu_median_s"] else "-"

    body = [(r["name"], side(r, "lamina"), side(r, "qcow2"), side(r, "raw"), ratio(r, "qcow2"), ratio(r, "raw"), cpu(r))
            for r in result["rows"]]
    lines = table(head, body)
    if result["host_io"]:
        lines += [""] + table(("write workload", "tool", "guest MiB", "host MiB", "host/guest bytes", "write calls",
                               "fsyncs", "fsyncs/guest MiB", "flushes", "fsyncs/flush"),
                              [(h["name"], h["side"], f"{h['guest_bytes'] / MiB:.1f}", f"{h['host_bytes'] / MiB:.1f}",
                                f"{h['host_per_guest_byte']:.3f}", str(h["write_calls"]), str(h["fsyncs"]),
                                f"{h['fsyncs_per_guest_mib']:.2f}", str(h["flushes"]),
                                f"{h['fsyncs_per_flush']:.2f}" if h["fsyncs_per_flush"] is not None else "-")
                               for h in result["host_io"]])
    if result.get("targets"):
        lines += ["", "issue 10's targets (lamina/qcow2 medians; whole processes):"]
        lines += [f"  {'met    ' if t['met'] else 'NOT met'}  {t['what']}: {t['value']:.2f} (at most {t['limit']:g})"
                  for t in result["targets"]]
    m = result["machine"]
    lines.append(f"wall-time medians of {result['runs']} interleaved runs after a warm-up, min-max in brackets; ratios are "
                 f"medians of the pairwise ratios (above 1 Lamina is slower); cpu l/q: median CPU time (user + system) of lamina over qcow2's, steadier on a busy machine; {human(result['size'])} disks; Python "
                 f"{m['python']}, {m['cpus']} CPUs, load average {m['load_before']} before the run; cached I/O.")
    lines += [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)


def table(head: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


PARTS = ("io", "chain", "check-map", "convert", "startup")

# The whole-process targets of issue 10 this script measures: (row, limit of lamina/qcow2).
RATIO_TARGETS = [("seq-write-4k", 1.5), ("seq-read-4k", 1.5), ("rand-alloc-4k", 1.5), ("rand-read-4k", 1.5),
                 ("rand-overwrite-4k", 1.5), ("start-up: info", 5.0)]


def targets(result: dict) -> list[dict]:
    """Each target whose row ran: its measured value, its limit, whether it is met."""
    out = []
    rows = {r["name"]: r for r in result["rows"]}
    for name, limit in RATIO_TARGETS:
        ratio = rows.get(name, {}).get("lamina/qcow2")
        if ratio:
            out.append({"what": f"{name} wall time, lamina/qcow2", "value": ratio["median"], "limit": limit,
                        "met": ratio["median"] <= limit})
    for h in result["host_io"]:
        if h["side"] == "lamina" and h["name"] == "rand-overwrite-4k" and h["fsyncs_per_flush"] is not None:
            out.append({"what": "rand-overwrite-4k fsyncs per flush (open and close included)", "value": h["fsyncs_per_flush"],
                        "limit": 2, "met": h["fsyncs_per_flush"] <= 2})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of about a minute: 32M disks, 512 ops, "
                        "depth 10, 3 runs (explicit options still win)")
    parser.add_argument("--size", type=parse_size, help="virtual size of every disk (default 256M; --quick 32M)")
    parser.add_argument("--ops", type=int, help="random I/O commands per workload (default 4096; --quick 512)")
    parser.add_argument("--depth", type=int, help="files in the chain (default 50; --quick 10)")
    parser.add_argument("--reads", type=int, help="reads through the chain (default 2000; --quick 500)")
    parser.add_argument("--runs", type=int, help="timed runs of each command after one warm-up (default 5; --quick 3)")
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS), help="the groups of rows to run")
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument("--dir", help="directory for the images (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    for name, full, quick in (("size", 256 * MiB, 32 * MiB), ("ops", 4096, 512), ("depth", 50, 10), ("reads", 2000, 500),
                              ("runs", 5, 3)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    work = tempfile.mkdtemp(prefix="lamina-bench-all-", dir=args.dir)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    started = time.perf_counter()
    bench = Bench(args, work)
    try:
        for part in PARTS:
            if part in args.only:
                getattr(bench, part.replace("-", "_"))()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "system": platform.platform(),
                          "load_before": load},
              "lamina": " ".join(LAMINA), "size": args.size, "ops": args.ops, "depth": args.depth, "runs": args.runs,
              "seconds": time.perf_counter() - started, "notes": bench.notes, "rows": bench.rows, "host_io": bench.host}
    result["targets"] = targets(result)
    print(json.dumps(result, indent=2) if args.output == "json" else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
