"""Print every property as proved / refuted(expected) / FAILED with its solver time; exit 1 on any failure."""
from __future__ import annotations

import sys
import time

from . import cross_check_geometry, run_property
from .registry import PROPERTIES


def main() -> int:
    failures = 0
    start = time.perf_counter()
    try:
        compared = cross_check_geometry()
        print(f"{'cross-check':<15} ok                 symbolic geometry = spec.layout.Geometry on {compared} sample values")
    except AssertionError as exc:
        failures += 1
        print(f"{'cross-check':<15} FAILED             {exc}")
    solver_seconds = 0.0
    for prop in PROPERTIES:
        verdict = run_property(prop)
        seconds = verdict.outcome.seconds if verdict.outcome else 0.0
        solver_seconds += seconds
        print(f"{prop.pid:<15} {verdict.label:<18} {seconds:7.2f} s  {prop.covers}", flush=True)
        detail = verdict.outcome.detail if verdict.outcome else verdict.error
        if detail and (prop.expected == "refuted" or not verdict.ok or prop.pid == "P-LAYOUT-011"):
            print("\n".join("      " + line for line in detail.splitlines()))
        failures += not verdict.ok
    wall = time.perf_counter() - start
    print(f"{len(PROPERTIES)} properties, {failures} failed; solver time {solver_seconds:.2f} s, wall time {wall:.2f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
