#!/usr/bin/env python3
"""Whole-command times of `lamina` against `qemu-img`/`qemu-io` on the same data, in one run.

The same guest data goes into a Lamina image and a qcow2 image (both 64 KiB
clusters); each command pair then runs in turn, A B A B, as separate
processes, and the table gives the median wall time of each side and the
median of the per-pair ratios (lamina / qemu: above 1 Lamina is slower).
Nothing is dropped from the page cache.  See bench/README.md.

    python bench/bench_cpu.py [--disk 100G] [--data 1G] [--convert-size 1G] [--commands 1000 4000 16000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
LAMINA = [sys.executable, "-m", "lamina.impl.cli"]
# qemu-io opens writethrough by default (a sync per write); `lamina io` makes writes durable at flush and close,
# which is writeback.
QEMU_IO = ["qemu-io", "-t", "writeback", "-f", "qcow2"]


def parse_size(text: str) -> int:
    """'100G', '64k', '1M', '4096' -> bytes (binary units)."""
    match = re.fullmatch(r"(\d+)\s*([kmgt]?)(?:i?b)?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 100G, 1G, 64k)")
    return int(match[1]) << {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[match[2]]


def human(n: int) -> str:
    for unit, scale in (("G", GiB), ("M", MiB), ("k", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def run(argv: list[str], stdin_path: str | None = None) -> None:
    """One command, output thrown away; a failure stops the benchmark (a wrong result is not a timing)."""
    with open(stdin_path or os.devnull, "rb") as stdin:
        done = subprocess.run(argv, stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr.decode(errors='replace').strip()}")


def timed_pair(a: Callable[[], None], b: Callable[[], None], runs: int,
               before: tuple[Callable[[], None], Callable[[], None]] = (lambda: None, lambda: None)) -> dict:
    """A then B, `runs` times after one warm-up of each; `before[side]` runs (untimed) ahead of that side's command."""
    times: dict[str, list[float]] = {"lamina": [], "qemu": []}
    for i in range(runs + 1):
        for side, command, prepare in (("lamina", a, before[0]), ("qemu", b, before[1])):
            prepare()
            started = time.perf_counter()
            command()
            if i:
                times[side].append(time.perf_counter() - started)
    ratios = [x / y for x, y in zip(times["lamina"], times["qemu"])]
    return {"lamina_s": statistics.median(times["lamina"]), "qemu_s": statistics.median(times["qemu"]),
            "ratio": statistics.median(ratios), "lamina_all": times["lamina"], "qemu_all": times["qemu"]}


def write_data(path: str, disk: int, ranges: list[tuple[int, int, bool]]) -> None:
    """A sparse raw file of `disk` bytes with (offset, length, zero) ranges written: data, or explicit zeroes."""
    chunk = bytes((i * 7 + 1) & 0xFF for i in range(251)) * (MiB // 251 + 2)
    with open(path, "wb") as f:
        f.truncate(disk)
        for offset, length, zero in ranges:
            f.seek(offset)
            for pos in range(0, length, MiB):
                n = min(MiB, length - pos)
                f.write(bytes(n) if zero else chunk[(offset + pos) // MiB % 251 : (offset + pos) // MiB % 251 + n])


def remove(*paths: str) -> Callable[[], None]:
    def clean() -> None:
        for path in paths:
            if os.path.lexists(path):
                os.unlink(path)
    return clean


def convert_rows(args: argparse.Namespace, j: Callable[[str], str], add: Callable[..., dict]) -> None:
    """Both directions of convert on a raw file whose second half is written zeroes."""
    size = args.convert_size
    src = j("convert-src.raw")
    print(f"convert: {human(size)} raw, the first half data, the second half written zeroes", file=sys.stderr)
    write_data(src, size, [(0, size // 2, False), (size // 2, size - size // 2, True)])
    lam, qcow, back_l, back_q = j("conv.lam"), j("conv.qcow2"), j("back-l.raw"), j("back-q.raw")
    add(f"convert raw->image {human(size)}", LAMINA + ["convert", "-f", "raw", "-O", "lamina", src, lam],
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, qcow], before=(remove(lam), remove(qcow)))
    add(f"convert image->raw {human(size)}", LAMINA + ["convert", "-O", "raw", lam, back_l],
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, back_q], before=(remove(back_l), remove(back_q)))
    os.unlink(src)
    remove(lam, qcow, back_l, back_q)()


def bench(args: argparse.Namespace, work: str) -> dict:
    j = lambda name: os.path.join(work, name)  # noqa: E731
    rows: list[dict] = []

    nothing = (lambda: None, lambda: None)

    def add(name: str, lamina: list[str], qemu: list[str], before: tuple[Callable[[], None], Callable[[], None]] = nothing,
            stdin: str | None = None, **extra: object) -> dict:
        row = {"name": name, "lamina": shlex.join(lamina), "qemu": shlex.join(qemu), **extra,
               **timed_pair(lambda: run(lamina, stdin), lambda: run(qemu, stdin), args.runs, before)}
        rows.append(row)
        print(f"  {name}: lamina {row['lamina_s']:.3f} s, qemu {row['qemu_s']:.3f} s, ratio {row['ratio']:.1f}", file=sys.stderr)
        return row

    for data in args.data if "check-map" in args.only else []:
        raw, lam, qcow = j(f"d{human(data)}.raw"), j(f"d{human(data)}.lam"), j(f"d{human(data)}.qcow2")
        print(f"{human(data)} of data in a {human(args.disk)} disk: building the images", file=sys.stderr)
        write_data(raw, args.disk, [(0, data, False)])
        run(LAMINA + ["convert", "-f", "raw", "-O", "lamina", raw, lam])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow])
        os.unlink(raw)
        add(f"check {human(data)}/{human(args.disk)}", LAMINA + ["check", lam], ["qemu-img", "check", qcow])
        add(f"map {human(data)}/{human(args.disk)}", LAMINA + ["map", "--output", "json", lam],
            ["qemu-img", "map", "--output=json", qcow])
        os.unlink(lam)
        os.unlink(qcow)

    if "convert" in args.only:
        convert_rows(args, j, add)
    lam, qcow = j("io.lam"), j("io.qcow2")
    for n in args.commands if "io" in args.only else []:
        # Alternate 4 KiB writes and reads of what was written, over distinct offsets of a 1 GiB disk.
        lines = [f"write -P {i // 2 % 256:#04x} {i // 2 * 4096 % GiB} 4k" if i % 2 == 0 else
                 f"read -P {i // 2 % 256:#04x} {i // 2 * 4096 % GiB} 4k" for i in range(n)]
        commands = j(f"commands-{n}.txt")
        with open(commands, "w") as f:
            f.write("\n".join(lines) + "\n")

        def fresh_lamina() -> None:
            remove(lam)()
            run(LAMINA + ["create", lam, "1G"])

        def fresh_qcow2() -> None:
            remove(qcow)()
            run(["qemu-img", "create", "-f", "qcow2", qcow, "1G"])

        fresh = (fresh_lamina, fresh_qcow2)

        add(f"io {n} commands, stdin", LAMINA + ["io", lam], QEMU_IO + [qcow], before=fresh,
            stdin=commands, commands=n, via="stdin")
        if n <= args.max_c:
            cs = [arg for line in lines for arg in ("-c", line)]
            add(f"io {n} commands, -c", LAMINA + ["io", lam, *cs], QEMU_IO + [qcow, *cs], before=fresh,
                commands=n, via="-c")
    remove(lam, qcow)()
    return {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "system": platform.platform()},
            "disk": args.disk, "data": args.data, "convert_size": args.convert_size, "runs": args.runs, "rows": rows}


def render(result: dict) -> str:
    head = ("command", "lamina s", "qemu s", "lamina/qemu")
    body = [(r["name"], f"{r['lamina_s']:.3f}", f"{r['qemu_s']:.3f}", f"{r['ratio']:.1f}") for r in result["rows"]]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for via in ("stdin", "-c"):
        io = [r for r in result["rows"] if r.get("via") == via]
        for a, b in zip(io, io[1:]):
            growth = (b["lamina_s"] / a["lamina_s"]) / (b["commands"] / a["commands"])
            lines.append(f"io via {via}: {a['commands']} -> {b['commands']} commands, lamina time grew "
                         f"{b['lamina_s'] / a['lamina_s']:.2f}x for {b['commands'] / a['commands']:.0f}x the commands "
                         f"({growth:.2f} of linear; startup included)")
    lines.append(f"medians of {result['runs']} runs after a warm-up; Python {result['machine']['python']}, "
                 f"{result['machine']['cpus']} CPUs; cached I/O (nothing dropped from the page cache)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk", type=parse_size, default=100 * GiB, help="virtual size of the check/map images (100G)")
    parser.add_argument("--data", type=parse_size, nargs="+", default=[GiB], help="data at the start of each (1G)")
    parser.add_argument("--convert-size", type=parse_size, default=GiB, help="raw file size for convert (1G)")
    parser.add_argument("--commands", type=int, nargs="+", default=[1000, 4000, 16000], help="io command counts")
    parser.add_argument("--max-c", type=int, default=16000, help="largest count also given as -c options (argv size)")
    parser.add_argument("--only", nargs="+", choices=("check-map", "convert", "io"), default=["check-map", "convert", "io"],
                        help="the groups of rows to run (default all)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each command (after one warm-up)")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument("--dir", default=None, help="directory for the images (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on the PATH")
    work = tempfile.mkdtemp(prefix="lamina-bench-cpu-", dir=args.dir)
    try:
        result = bench(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.output == "json" else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
