#!/usr/bin/env python3
"""`lamina check`, `map` and `convert` against `qemu-img` and a plain read of the data, whole processes, in one run.

Each row runs its commands as separate processes, interleaved (A B C A B C
...), `--runs` times after one warm-up round, with what a run needs (no
output file) prepared untimed before it.  The table gives each command's
median wall time with its spread (min-max) and the medians (and spread) of
the pairwise time ratios against the row's reference, with the target of
issue 10 beside them.  Not part of CI.  See bench/README.md.

    python bench/bench_tools.py [--data 1G 4G] [--disk 100G] [--convert-size 1G] [--runs 5] [--output json]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the other bench scripts, as modules
from bench_cpu import GiB, KiB, human, parse_size, remove, write_data  # noqa: E402

_BESIDE = os.path.join(os.path.dirname(sys.executable), "lamina")  # the installed entry point, as a user runs it
LAMINA = [_BESIDE] if os.path.exists(_BESIDE) else [sys.executable, "-m", "lamina.impl.cli"]
READ_EXTENTS = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "read_extents.py")]
Prepare = Callable[[], None]


def run(argv: list[str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one process; a failure stops the benchmark."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = child.stderr.read() if child.stderr else b""
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): {err.decode(errors='replace').strip()[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


BEFORE: list[str] = []  # --before: another `lamina` to time beside this one (a side "before" in every row)


def time_row(name: str, commands: dict[str, list[str]], ratios: list[tuple[str, str, float | None]], runs: int,
             prepare: dict[str, Prepare] | None = None, before: dict[str, str] | None = None) -> dict:
    """Every command of the row in turn, `runs` rounds after one warm-up round; ratios (a, b, target) of a over b.

    With --before, the "lamina" command runs a second time as the side "before" through that other `lamina`,
    with the paths of `before` (this side's output path -> the other's) swapped in.
    """
    prepare = dict(prepare or {})
    if BEFORE and "lamina" in commands:
        swap = before or {}
        other = BEFORE + [swap.get(a, a) for a in commands["lamina"][len(LAMINA):]]
        commands = {**commands, "before": other}
        ratios = [*ratios, ("lamina", "before", None)]
        if "lamina" in prepare and swap:
            def fresh_before() -> None:
                for path in swap.values():
                    remove(path)()
                    shutil.rmtree(path + ".layers", ignore_errors=True)
            prepare["before"] = fresh_before
    wall: dict[str, list[float]] = {side: [] for side in commands}
    cpu: dict[str, list[float]] = {side: [] for side in commands}
    for i in range(runs + 1):
        for side, argv in commands.items():
            prepare.get(side, lambda: None)()
            w, c = run(argv)
            if i:
                wall[side].append(w)
                cpu[side].append(c)
    row: dict = {"name": name, "runs": runs, "commands": {s: " ".join(a) for s, a in commands.items()},
                 "sides": {s: {"wall_s": spread(wall[s]), "cpu_s": spread(cpu[s]), "wall_all_s": wall[s]} for s in commands},
                 "ratios": []}
    for a, b, target in ratios:
        pairs = [x / y for x, y in zip(wall[a], wall[b])]
        cpus = [x / y for x, y in zip(cpu[a], cpu[b]) if y > 0]
        row["ratios"].append({"of": a, "over": b, "target": target, **spread(pairs),
                              "cpu_median": statistics.median(cpus) if cpus else None,
                              "met": None if target is None else statistics.median(pairs) <= target})
    print(f"  {name}: " + ", ".join(f"{s} {v['wall_s']['median']:.3f} s" for s, v in row["sides"].items())
          + "".join(f", {r['of']}/{r['over']} {r['median']:.2f}" for r in row["ratios"]), file=sys.stderr)
    return row


def time_in_process(name: str, calls: dict[str, Callable[[], object]], ratios: list[tuple[str, str, float | None]],
                    runs: int) -> dict:
    """As `time_row`, for functions called in this process (no start-up): wall seconds only."""
    wall: dict[str, list[float]] = {side: [] for side in calls}
    for i in range(runs + 1):
        for side, call in calls.items():
            start = time.perf_counter()
            call()
            if i:
                wall[side].append(time.perf_counter() - start)
    row: dict = {"name": name, "runs": runs, "commands": {s: "(in this process) " + getattr(c, "what", "") for s, c in calls.items()},
                 "sides": {s: {"wall_s": spread(wall[s]), "wall_all_s": wall[s]} for s in calls}, "ratios": []}
    for a, b, target in ratios:
        pairs = [x / y for x, y in zip(wall[a], wall[b])]
        row["ratios"].append({"of": a, "over": b, "target": target, **spread(pairs), "cpu_median": None,
                              "met": None if target is None else statistics.median(pairs) <= target})
    print(f"  {name}: " + ", ".join(f"{s} {v['wall_s']['median']:.3f} s" for s, v in row["sides"].items())
          + "".join(f", {r['of']}/{r['over']} {r['median']:.2f}" for r in row["ratios"]), file=sys.stderr)
    return row


def in_process_check(path: str) -> Callable[[], object]:
    """The spec's check of one layer file, as `lamina check` runs it, without the process around it."""
    from lamina.impl.osfile import OsStorage
    from lamina.spec.check import check_image

    def call() -> object:
        file = OsStorage().open(path, writable=False)
        try:
            file.lock(False)  # as `lamina check` locks each file it reads (a lock of its own lets it map the file)
            report = check_image(file)
        finally:
            file.close()
        if report.exit_code:
            raise SystemExit(f"check of {path}: exit {report.exit_code}")
        return report
    call.what = f"lamina.spec.check.check_image of {os.path.basename(path)}"  # type: ignore[attr-defined]
    return call


def profile(argv: list[str], top: int) -> str:
    """cProfile of one Lamina command (in a child process), the top functions by own time."""
    cmd = [sys.executable, "-m", "cProfile", "-s", "tottime", "-m", "lamina.impl.cli", *argv]
    out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True).stdout.splitlines()
    start = next((i for i, line in enumerate(out) if "ncalls" in line), len(out))
    return "\n".join(out[start : start + top + 1])


def bench(args: argparse.Namespace, work: str) -> dict:
    j = lambda name: os.path.join(work, name)  # noqa: E731
    rows: list[dict] = []
    profiles: dict[str, str] = {}
    cs = str(args.cluster_size)

    def prof(name: str, argv: list[str]) -> None:
        if args.profile:
            profiles[name] = profile(argv, args.profile)
            print(f"profile of lamina {' '.join(argv)}:\n{profiles[name]}", file=sys.stderr)

    if "startup" in args.only:
        img = j("startup.lam")
        run(LAMINA + ["create", img, "1G"])
        rows.append(time_row("start-up: info", {"lamina": LAMINA + ["info", img], "python": [sys.executable, "-c", "pass"],
                                                "qemu": ["qemu-img", "info", img]},
                             [("lamina", "python", None), ("lamina", "qemu", None)], args.runs))
        remove(img)()
    for data in args.data if {"check", "map"} & set(args.only) else []:
        tag = f"{human(data)}/{human(args.disk)}"
        raw, lam, qcow = j(f"d{human(data)}.raw"), j(f"d{human(data)}.lam"), j(f"d{human(data)}.qcow2")
        print(f"{human(data)} of data in a {human(args.disk)} disk, {human(args.cluster_size)} clusters: building", file=sys.stderr)
        write_data(raw, args.disk, [(0, data, False)])
        run(LAMINA + ["convert", "-f", "raw", "-O", "lamina", "--cluster-size", cs, raw, lam])
        run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={args.cluster_size}", raw, qcow])
        os.unlink(raw)
        if "check" in args.only:
            rows.append(time_row(f"check {tag}", {"lamina": LAMINA + ["check", lam], "read": READ_EXTENTS + [lam],
                                                  "qemu": ["qemu-img", "check", qcow]},
                                 [("lamina", "read", 1.5), ("lamina", "qemu", None)], args.runs))
            from read_extents import read_extents

            def read() -> int:
                return read_extents(lam)
            read.what = f"read_extents.read_extents of {os.path.basename(lam)}"  # type: ignore[attr-defined]
            rows.append(time_in_process(f"check {tag}, in process", {"check_image": in_process_check(lam), "read": read},
                                        [("check_image", "read", None)], args.runs))
            prof(f"check {tag}", ["check", lam])
        if "map" in args.only:
            rows.append(time_row(f"map {tag}", {"lamina": LAMINA + ["map", lam], "qemu": ["qemu-img", "map", qcow]},
                                 [("lamina", "qemu", 3.0)], args.runs))
            rows.append(time_row(f"map json {tag}", {"lamina": LAMINA + ["map", "--output", "json", lam],
                                                     "qemu": ["qemu-img", "map", "--output=json", qcow]},
                                 [("lamina", "qemu", 3.0)], args.runs))
            prof(f"map json {tag}", ["map", "--output", "json", lam])
        remove(lam, qcow)()
        shutil.rmtree(lam + ".layers", ignore_errors=True)
    same = None
    if "convert" in args.only:
        size = args.convert_size
        src = j("convert-src.raw")
        print(f"convert: {human(size)} raw, the first half data, the second half written zeroes", file=sys.stderr)
        write_data(src, size, [(0, size // 2, False), (size // 2, size - size // 2, True)])
        lam, qcow, back_l, back_q = j("conv.lam"), j("conv.qcow2"), j("back-l.raw"), j("back-q.raw")

        def fresh_lamina() -> None:
            remove(lam)()
            shutil.rmtree(lam + ".layers", ignore_errors=True)
        unsafe_lam = lam + ".unsafe"

        def fresh_unsafe() -> None:
            remove(unsafe_lam)()
            shutil.rmtree(unsafe_lam + ".layers", ignore_errors=True)
        # lamina (durable) over qemu-img's default (no flush): the target; lamina -t unsafe over the same default:
        # like for like; lamina over qemu-img -t writeback (durable too): like for like.
        pairs = [("lamina", "qemu", 1.0), ("lamina-unsafe", "qemu", None), ("lamina", "qemu-wb", None)]
        rows.append(time_row(f"convert raw->format {human(size)}",
                             {"lamina": LAMINA + ["convert", "-f", "raw", "-O", "lamina", "--cluster-size", cs, src, lam],
                              "lamina-unsafe": LAMINA + ["convert", "-t", "unsafe", "-f", "raw", "-O", "lamina",
                                                         "--cluster-size", cs, src, unsafe_lam],
                              "qemu": ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o", f"cluster_size={args.cluster_size}", src, qcow],
                              "qemu-wb": ["qemu-img", "convert", "-t", "writeback", "-f", "raw", "-O", "qcow2", "-o",
                                          f"cluster_size={args.cluster_size}", src, qcow + ".wb"]},
                             pairs, args.runs,
                             {"lamina": fresh_lamina, "lamina-unsafe": fresh_unsafe, "qemu": remove(qcow),
                              "qemu-wb": remove(qcow + ".wb")}, {lam: lam + ".before"}))
        fresh_unsafe()
        rows.append(time_row(f"convert format->raw {human(size)}",
                             {"lamina": LAMINA + ["convert", "-O", "raw", lam, back_l],
                              "lamina-unsafe": LAMINA + ["convert", "-t", "unsafe", "-O", "raw", lam, back_l + ".unsafe"],
                              "qemu": ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, back_q],
                              "qemu-wb": ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "raw", qcow, back_q + ".wb"]},
                             pairs, args.runs,
                             {"lamina": remove(back_l), "lamina-unsafe": remove(back_l + ".unsafe"), "qemu": remove(back_q),
                              "qemu-wb": remove(back_q + ".wb")},
                             {back_l: back_l + ".before"}))
        same_unsafe = filecmp.cmp(back_l, back_l + ".unsafe", shallow=False)
        remove(back_l + ".unsafe")()
        same = same_unsafe and filecmp.cmp(src, back_l, shallow=False) and filecmp.cmp(back_l, back_q, shallow=False)
        fresh_lamina()
        prof(f"convert raw->format {human(size)}", ["convert", "-f", "raw", "-O", "lamina", "--cluster-size", cs, src, lam])
        remove(back_l)()
        prof(f"convert format->raw {human(size)}", ["convert", "-O", "raw", lam, back_l])
        remove(src, qcow, qcow + ".wb", back_l, back_q, back_q + ".wb", back_l + ".before", lam + ".before")()
        shutil.rmtree(lam + ".before.layers", ignore_errors=True)
        fresh_lamina()
    return {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "system": platform.platform(),
                        "load_average": os.getloadavg()},
            "disk": args.disk, "data": args.data, "cluster_size": args.cluster_size, "convert_size": args.convert_size,
            "runs": args.runs, "before": args.before, "rows": rows, "convert_round_trip_identical": same, "profiles": profiles}


def render(result: dict) -> str:
    head = ("row", "command", "median s", "min-max s", "ratio", "median", "min-max", "cpu", "target")
    body = []
    for row in result["rows"]:
        first = True
        for side, v in row["sides"].items():
            w = v["wall_s"]
            body.append((row["name"] if first else "", side, f"{w['median']:.3f}", f"{w['min']:.3f}-{w['max']:.3f}", "", "", "", "", ""))
            first = False
        for r in row["ratios"]:
            met = "" if r["target"] is None else f"<= {r['target']:g} " + ("met" if r["met"] else "NOT met")
            cpu = "" if r.get("cpu_median") is None else f"{r['cpu_median']:.2f}"
            body.append(("", "", "", "", f"{r['of']}/{r['over']}", f"{r['median']:.2f}", f"{r['min']:.2f}-{r['max']:.2f}", cpu, met))
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 4, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for row in result["rows"]:
        lines.append(f"{row['name']}: " + "; ".join(f"{s}: {c}" for s, c in row["commands"].items()))
    if result["convert_round_trip_identical"] is not None:
        lines.append("convert round trip identical to the source: " + ("yes" if result["convert_round_trip_identical"] else "NO"))
    lines.append(f"whole-process wall times, medians of {result['runs']} interleaved runs after a warm-up round; "
                 f"ratios are medians of the pairwise ratios (above 1 the first is slower), cpu the median ratio of "
                 f"user + system CPU seconds; Python "
                 f"{result['machine']['python']}, {result['machine']['cpus']} CPUs, load average at the end "
                 f"{result['machine']['load_average'][0]:.2f}; cached I/O (nothing dropped from the page cache)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disk", type=parse_size, default=100 * GiB, help="virtual size of the check/map images (100G)")
    parser.add_argument("--data", type=parse_size, nargs="+", default=[GiB, 4 * GiB], help="data at the start of each (1G 4G)")
    parser.add_argument("--cluster-size", type=parse_size, default=64 * KiB, help="cluster size of both formats (64k)")
    parser.add_argument("--convert-size", type=parse_size, default=GiB, help="raw file size for convert (1G)")
    parser.add_argument("--only", nargs="+", choices=("startup", "check", "map", "convert"),
                        default=["startup", "check", "map", "convert"], help="the groups of rows to run (default all)")
    parser.add_argument("--runs", type=int, default=5, help="timed rounds of each row (after one warm-up round)")
    parser.add_argument("--profile", type=int, nargs="?", const=25, default=0, metavar="N",
                        help="also print the top N functions (own time) of a cProfile of each Lamina command")
    parser.add_argument("--before", metavar="LAMINA", default=None,
                        help="another `lamina` executable (an older version) to time beside this one in every row")
    parser.add_argument("--output", choices=("text", "json"), default="text")
    parser.add_argument("--dir", default=None, help="directory for the images (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if shutil.which("qemu-img") is None:
        parser.error("qemu-img is not on the PATH")
    if args.before:
        BEFORE[:] = [args.before]
    work = tempfile.mkdtemp(prefix="lamina-bench-tools-", dir=args.dir)
    try:
        result = bench(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2) if args.output == "json" else render(result))
    return 0 if result["convert_round_trip_identical"] in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
