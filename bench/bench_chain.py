"""Reads through chains of snapshots, building 50 snapshots, and start-up: Lamina against qcow2 in one run.

Three measurements, each against QEMU's tools on the same machine in the
same run (qemu-img and qemu-io must be on the PATH):

- chain-depth reads: random 4 KiB reads of an image whose data lies in the
  bottom layer under D - 1 snapshots (Lamina: one image with D - 1
  snapshots; qcow2: a base and D - 1 overlays, each made with
  `qemu-img create -b`), for each depth D.  Before each snapshot one 4 KiB
  block is written at the same offset in both, so no layer is empty.
  Per-read cost is the difference between a run of 2K and a run of K read
  commands (`lamina io -r` and `qemu-io -r`, each the best of `--runs`),
  divided by K: process start-up and image opening cancel out.  The in-process cost of
  `Image.read` is shown too.
- snapshot build: N snapshots of a fresh image, one command each
  (`lamina snapshot create` against `qemu-img snapshot -c`).
- start-up: `lamina info IMAGE` against `qemu-img info IMAGE` and
  `python -c pass` (the interpreter's floor).

    python bench/bench_chain.py [--depths 1 10 50] [--reads 1000] [--snapshots 50] [--output json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from lamina.impl import layers
from lamina.impl.image import Image
from lamina.impl.sizes import parse_size

BLOCK = 4096
LAMINA = [sys.executable, "-m", "lamina.impl.cli"]


def _timed(command: list[str]) -> float:
    """Wall seconds of one run of `command`; its output is dropped, a failure raises."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _best(command: list[str], runs: int) -> float:
    """The least wall time of `runs` runs: the one least disturbed by other work on a shared machine."""
    return min(_timed(command) for _ in range(runs))


def _reads(offsets: list[int]) -> list[str]:
    out = []
    for offset in offsets:
        out += ["-c", f"read {offset} {BLOCK}"]
    return out


def build_chains(directory: str, size: int, depth: int, data_step: int, seed: int) -> tuple[str, str]:
    """A Lamina image with `depth - 1` snapshots and a qcow2 chain of `depth` files with the same guest bytes."""
    rng = random.Random(seed)
    lam = os.path.join(directory, f"chain{depth}.lam")
    qcow = os.path.join(directory, f"chain{depth}-0.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, str(size)], check=True)
    with Image.create(lam, size) as image:
        for offset in range(0, size, data_step):
            image.write(offset, bytes([offset // data_step % 251 + 1]) * 65536)
    subprocess.run(["qemu-io", "-f", "qcow2", qcow] + [a for offset in range(0, size, data_step) for a in
                    ("-c", f"write -P {offset // data_step % 251 + 1} {offset} 64k")], check=True, stdout=subprocess.DEVNULL)
    for level in range(1, depth):
        offset = rng.randrange(size // BLOCK) * BLOCK
        pattern = level % 255 + 1
        with Image.open(lam) as image:
            image.write(offset, bytes([pattern]) * BLOCK)
        layers.create_snapshot(lam, f"s{level}")
        above = os.path.join(directory, f"chain{depth}-{level}.qcow2")
        subprocess.run(["qemu-io", "-f", "qcow2", qcow, "-c", f"write -P {pattern} {offset} {BLOCK}"], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.basename(qcow), "-F", "qcow2", above],
                       check=True)
        qcow = above
    return lam, qcow


def per_read(base_command: list[str], offsets: list[int], runs: int) -> float:
    """Seconds per read command: (best time of 2K reads - best time of K reads) / K."""
    k = len(offsets)
    once = _best(base_command + _reads(offsets), runs)
    twice = _best(base_command + _reads(offsets + offsets), runs)
    return max(twice - once, 0.0) / k


def in_process_read(path: str, offsets: list[int], runs: int) -> float:
    """Seconds per `Image.read` of 4 KiB in this process, the image opened once (best of `runs` passes)."""
    with Image.open(path, readonly=True) as image:
        best = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            for offset in offsets:
                image.read(offset, BLOCK)
            best = min(best, time.perf_counter() - start)
    return best / len(offsets)


def check_same(lam: str, qcow: str, offsets: list[int]) -> bool:
    """Whether both chains read the same bytes at the first offsets (qemu-io -P checks each block)."""
    with Image.open(lam, readonly=True) as image:
        blocks = [(o, image.read(o, BLOCK)) for o in offsets[:20]]
    commands = []
    for offset, data in blocks:
        if len(set(data)) != 1:
            return False
        commands += ["-c", f"read -P {data[0]} {offset} {BLOCK}"]
    result = subprocess.run(["qemu-io", "-r", "-f", "qcow2", qcow] + commands, capture_output=True, text=True)
    return result.returncode == 0 and "Pattern verification failed" not in result.stdout + result.stderr


def bench_depths(directory: str, args: argparse.Namespace) -> list[dict]:
    rng = random.Random(args.seed)
    offsets = [rng.randrange(args.size // BLOCK) * BLOCK for _ in range(max(args.reads, args.qemu_reads))]
    rows = []
    for depth in args.depths:
        lam, qcow = build_chains(directory, args.size, depth, args.data_step, args.seed)
        row = {
            "depth": depth,
            "same_bytes": check_same(lam, qcow, offsets),
            "lamina_io_us": 1e6 * per_read(LAMINA + ["io", "-r", lam], offsets[: args.reads], args.runs),
            "qcow2_io_us": 1e6 * per_read(["qemu-io", "-r", "-f", "qcow2", qcow], offsets[: args.qemu_reads], args.runs),
            "lamina_inprocess_us": 1e6 * in_process_read(lam, offsets[: args.reads], args.runs),
        }
        row["lamina/qcow2"] = row["lamina_io_us"] / row["qcow2_io_us"] if row["qcow2_io_us"] else float("nan")
        rows.append(row)
    first = rows[0]
    for row in rows:
        for key in ("lamina_io_us", "qcow2_io_us", "lamina_inprocess_us"):
            row[key.replace("_us", "_vs_depth1")] = row[key] / first[key] if first[key] else float("nan")
    return rows


def bench_build(directory: str, args: argparse.Namespace) -> dict:
    """N snapshots of a fresh image, one command per snapshot, for each tool."""
    lam = os.path.join(directory, "build.lam")
    qcow = os.path.join(directory, "build.qcow2")
    subprocess.run(LAMINA + ["create", lam, str(args.size)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, str(args.size)], check=True)
    lamina = sum(_timed(LAMINA + ["snapshot", "create", lam, f"s{i}"]) for i in range(args.snapshots))
    qemu = sum(_timed(["qemu-img", "snapshot", "-c", f"s{i}", qcow]) for i in range(args.snapshots))
    start = time.perf_counter()
    with Image.open(lam) as image:
        depth = len(image.chain())
    reopen = time.perf_counter() - start
    return {"snapshots": args.snapshots, "lamina_s": lamina, "qemu_img_s": qemu, "lamina/qemu-img": lamina / qemu,
            "lamina_chain_files": depth, "lamina_writable_open_after_s": reopen}


def bench_startup(directory: str, args: argparse.Namespace) -> dict:
    lam = os.path.join(directory, "start.lam")
    qcow = os.path.join(directory, "start.qcow2")
    subprocess.run(LAMINA + ["create", lam, str(args.size)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, str(args.size)], check=True)
    beside = os.path.join(os.path.dirname(sys.executable), "lamina")  # the installed entry point, as a user runs it
    lamina_script = beside if os.path.exists(beside) else shutil.which("lamina") or ""
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "lamina info": [lamina_script, "info", lam] if lamina_script else LAMINA + ["info", lam],
        "qemu-img info": ["qemu-img", "info", qcow],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.startup_runs):  # interleaved, so a slow spell of the machine hits all three
        for name, command in commands.items():
            times[name].append(_timed(command))
    out: dict = {name: {"min_s": min(t), "median_s": statistics.median(t)} for name, t in times.items()}
    for other in ("qemu-img info", "python -c pass"):
        out[f"lamina info/{other}"] = out["lamina info"]["median_s"] / out[other]["median_s"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("256M"))
    parser.add_argument("--data-step", type=parse_size, default=parse_size("256k"),
                        help="the bottom layer holds 64 KiB at every multiple of this")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--reads", type=int, default=1000, help="K: read commands in the shorter run")
    parser.add_argument("--qemu-reads", type=int, default=10000,
                        help="K for qemu-io, whose reads are so cheap that a small K is lost in start-up jitter")
    parser.add_argument("--runs", type=int, default=3, help="runs of each timing; the best is kept")
    parser.add_argument("--snapshots", type=int, default=50)
    parser.add_argument("--startup-runs", type=int, default=10)
    parser.add_argument("--only", choices=("depths", "build", "startup"), action="append")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", help="where the images go (default: a fresh temporary directory)")
    parser.add_argument("--output", choices=("human", "json"), default="human")
    args = parser.parse_args()
    if args.data_step < 65536 or args.data_step % BLOCK:
        parser.error("--data-step must be at least 64k and a multiple of 4k")
    for tool in ("qemu-img", "qemu-io"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not on the PATH")
    directory = tempfile.mkdtemp(prefix="lamina-bench-chain-", dir=args.dir)
    parts = args.only or ["depths", "build", "startup"]
    result: dict = {}
    try:
        if "depths" in parts:
            result["depths"] = bench_depths(directory, args)
        if "build" in parts:
            result["build"] = bench_build(directory, args)
        if "startup" in parts:
            result["startup"] = bench_startup(directory, args)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        print(human(result))
    return 0 if all(row["same_bytes"] for row in result.get("depths", [])) else 1


def human(result: dict) -> str:
    lines = []
    if "depths" in result:
        lines.append("random 4 KiB reads, microseconds per read (x: against depth 1)")
        lines.append(f"{'depth':>5} {'lamina io':>14} {'qemu-io':>14} {'lamina/qcow2':>12} {'Image.read':>14} same")
        for r in result["depths"]:
            lines.append(f"{r['depth']:>5} {r['lamina_io_us']:>8.1f} x{r['lamina_io_vs_depth1']:<4.1f} "
                         f"{r['qcow2_io_us']:>8.1f} x{r['qcow2_io_vs_depth1']:<4.1f} {r['lamina/qcow2']:>12.2f} "
                         f"{r['lamina_inprocess_us']:>8.1f} x{r['lamina_inprocess_vs_depth1']:<4.1f} {r['same_bytes']}")
    if "build" in result:
        b = result["build"]
        lines.append(f"\n{b['snapshots']} snapshots, one command each: lamina {b['lamina_s']:.2f} s, "
                     f"qemu-img {b['qemu_img_s']:.2f} s, ratio {b['lamina/qemu-img']:.1f}; "
                     f"a writable open of the result {1000 * b['lamina_writable_open_after_s']:.0f} ms "
                     f"({b['lamina_chain_files']} files in the chain)")
    if "startup" in result:
        s = result["startup"]
        lines.append("\nstart-up, seconds (min / median)")
        for name in ("python -c pass", "lamina info", "qemu-img info"):
            lines.append(f"{name:<16} {s[name]['min_s']:.3f} / {s[name]['median_s']:.3f}")
        lines.append(f"lamina info / qemu-img info {s['lamina info/qemu-img info']:.1f}, "
                     f"/ python -c pass {s['lamina info/python -c pass']:.1f} (medians)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
