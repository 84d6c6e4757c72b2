"""Crashes during repair spread over an executor by slices of faults, merged into the result one task gives.

A (workload, model) task of `crash_repair_task` crashes the repair of every
metadata fault, one after the other, and nothing of one fault's exploration
depends on another's.  So each slice of consecutive fault numbers is one
executor task (without shrinking); the slices' results are merged in fault
order (counts summed, keys in order of first appearance, the first
`max_reported` failures kept) and the first failure is shrunk as one more
task.  The merged result equals the one task's, field for field, except the
seconds (the sum of the slices' work).
"""
from __future__ import annotations

from concurrent.futures import Executor, Future
from typing import TYPE_CHECKING, Callable

import attrs

from .explore import Budget
from .inject import Fault, metadata_faults

if TYPE_CHECKING:  # repaircrash imports this module when it runs on an executor
    from .repaircrash import RepairCrashResult, RepairFailure

FAULTS_PER_TASK = 8  # a fault's crash states take some 0.1 s: eight keep the scheduler's share small


@attrs.frozen
class FaultNumbers:
    """The faults numbered lo <= n < hi: a picklable fault filter, one task's share of a workload's faults."""

    lo: int
    hi: int

    def __call__(self, fault: Fault) -> bool:
        return self.lo <= fault.number < self.hi


def fault_slices(count: int, per_task: int = FAULTS_PER_TASK) -> list[FaultNumbers]:
    """Consecutive slices of a workload's fault numbers (one empty slice when it has none, as one task would give)."""
    return [FaultNumbers(lo, min(lo + per_task, count)) for lo in range(0, count, per_task)] or [FaultNumbers(0, 0)]


def _add_nested(into: dict, part: dict) -> None:
    """Sum a counts tree (region -> kind -> tier -> n) into another, new keys appended in the part's order."""
    for key, value in part.items():
        if isinstance(value, dict):
            _add_nested(into.setdefault(key, {}), value)
        else:
            into[key] = into.get(key, 0) + value


def merge_results(parts: list[RepairCrashResult], max_reported: int) -> RepairCrashResult:
    """One (workload, model) result from its slices' results, in fault order (the failures not yet shrunk)."""
    first = parts[0]
    counts: dict = {}
    failing: dict = {}
    exhaustive: dict[str, bool] = {}
    prechecks: dict[str, int] = {}
    for part in parts:
        _add_nested(counts, part.counts)
        _add_nested(failing, part.failing)
        _add_nested(prechecks, part.prechecks)
        for tier, exact in part.exhaustive.items():
            exhaustive[tier] = exhaustive.get(tier, True) and exact
    return attrs.evolve(first, faults=sum(p.faults for p in parts), repair_ops=sum(p.repair_ops for p in parts),
                        counts=counts, failing=failing, exhaustive=exhaustive,
                        identical=sum(p.identical for p in parts), follow_ups=sum(p.follow_ups for p in parts),
                        failures=tuple(f for p in parts for f in p.failures)[:max_reported],
                        seconds=sum(p.seconds for p in parts), prechecks=prechecks)


def shrunk_failure(failure: RepairFailure) -> RepairFailure:
    """The failure with its plan shrunk and replayed, as `crash_repair_task` leaves its first one (runs on a worker)."""
    from .repaircrash import RepairPlan, replay_repair, shrink_repair_plan

    small = shrink_repair_plan(RepairPlan.parse(failure.plan))
    return attrs.evolve(failure, plan=small.to_string(), message=replay_repair(small)[1] or failure.message)


def run_spread(executor: Executor, tasks: list[tuple[str, str]], budget: Budget, seed: int, repairer: str,
               control: str | None, follow_ups: tuple[str, ...],
               on_done: Callable[[RepairCrashResult], None] | None = None, max_reported: int = 5) -> list[RepairCrashResult]:
    """`run_crash_repair`'s tasks in fault slices on `executor`; the results in task order."""
    from .repaircrash import crash_repair_task

    fault_counts = {w: len(metadata_faults(w, seed)[-1]) for w in dict.fromkeys(w for w, _ in tasks)}
    submitted: list[list[Future]] = [
        [executor.submit(crash_repair_task, w, m, budget, seed, repairer, control, follow_ups,
                         fault_filter=part, max_reported=max_reported, shrink=False)
         for part in fault_slices(fault_counts[w])]
        for w, m in tasks]
    merged = [merge_results([f.result() for f in futures], max_reported) for futures in submitted]
    shrinking = {i: executor.submit(shrunk_failure, r.failures[0]) for i, r in enumerate(merged)
                 if r.failures and r.failures[0].tier != "uninterrupted"}
    results = []
    for i, result in enumerate(merged):
        if i in shrinking:
            result = attrs.evolve(result, failures=(shrinking[i].result(),) + result.failures[1:])
        if on_done:
            on_done(result)
        results.append(result)
    return results
