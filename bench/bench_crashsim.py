#!/usr/bin/env python3
"""Crash states judged per second by `crashsim run`, per single-image workload and for the tree workloads (`layers`).

Each row is what `crashsim run WORKLOAD --jobs 1` explores under the default
models (`layers`: every `layer-*` workload), run in this process: the states
judged, the distinct crash images among them (each opened, recovered and
checked once), the wall seconds and states per wall second, and per CPU
second of this process (what the states per second are on an idle core).  With `--jobs N`
the same row runs again on N forked lanes (`crashsim/lanes.py`, what
`crashsim run --jobs N` uses) and the table adds its seconds and the
speed-up; the results must equal the one-job run's (else exit 1).  See
bench/README.md.

    python bench/bench_crashsim.py [WORKLOAD ... | layers] [--model M,...] [--jobs N] [--repeat R] [--output json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import attrs

from lamina.crashsim.explore import DEFAULT_MODELS, Budget, Model
from lamina.crashsim.runner import run_all
from lamina.crashsim.trees import TREE_LIBRARY
from lamina.crashsim.workloads import LIBRARY


def _names(row: str) -> list[str]:
    return list(TREE_LIBRARY) if row == "layers" else [row]


def _run(row: str, models: list[str], jobs: int) -> tuple[float, float, list]:
    """Wall seconds, this process's CPU seconds (all of the work with one job) and the results."""
    tasks = [(w, m) for w in _names(row) for m in models]
    started, cpu = time.perf_counter(), time.process_time()
    results = run_all(tasks, Budget(), 0, jobs=jobs)
    return time.perf_counter() - started, time.process_time() - cpu, results


def _comparable(results: list) -> list:
    return [attrs.evolve(r, seconds=0.0) for r in results]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows", nargs="*", metavar="WORKLOAD", help=f"default: {', '.join(LIBRARY)}, layers")
    p.add_argument("--model", default=",".join(DEFAULT_MODELS), help="comma-separated models (default: crashsim run's)")
    p.add_argument("--jobs", type=int, default=1, help="also run each row on N processes and compare (default: one job only)")
    p.add_argument("--repeat", type=int, default=1, help="runs per row and job count; the median is reported")
    p.add_argument("--output", choices=["table", "json"], default="table")
    args = p.parse_args(argv)
    rows = args.rows or [*LIBRARY, "layers"]
    models = [Model.parse(m).name for m in args.model.split(",") if m]
    out = []
    mismatch = False
    for row in rows:
        one = [_run(row, models, 1) for _ in range(args.repeat)]
        seconds = statistics.median(s for s, _, _ in one)
        cpu = statistics.median(c for _, c, _ in one)
        results = one[0][2]
        states = sum(r.states for r in results)
        entry = {"workload": row, "models": models, "states": states, "distinct_images": sum(r.distinct_images for r in results),
                 "failing_states": sum(r.failing_states for r in results), "seconds": seconds,
                 "states_per_second": states / seconds, "cpu_seconds": cpu, "states_per_cpu_second": states / cpu}
        if args.jobs > 1:
            many = [_run(row, models, args.jobs) for _ in range(args.repeat)]
            entry["jobs"] = args.jobs
            entry["seconds_jobs"] = statistics.median(s for s, _, _ in many)
            entry["speedup"] = seconds / entry["seconds_jobs"]
            entry["same_results"] = all(_comparable(r) == _comparable(results) for _, _, r in many)
            mismatch |= not entry["same_results"]
        out.append(entry)
        if args.output == "table":
            line = (f"{row:<16} {states:>7} states {entry['distinct_images']:>6} distinct judged {seconds:>8.2f} s "
                    f"{entry['states_per_second']:>7.0f} states/s ({entry['states_per_cpu_second']:.0f} per CPU second)")
            if args.jobs > 1:
                line += (f"   --jobs {args.jobs}: {entry['seconds_jobs']:>7.2f} s, x{entry['speedup']:.2f}"
                         + ("" if entry["same_results"] else "  RESULTS DIFFER"))
            print(line, flush=True)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    if args.output == "json":
        print(json.dumps({"machine": machine, "rows": out}, indent=1))
    else:
        print(f"python {machine['python']}, {machine['cpus']} CPUs, load average {' '.join(f'{x:.1f}' for x in machine['load_average'])}"
              " (a shared machine: compare rows of one run, or runs at the same load)")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
