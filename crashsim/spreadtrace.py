"""A recorded trace's crash states checked on an executor: the same results as the serial loop, spread in slices.

`explore_trace` runs the checker on one distinct directory after another.  A
big exploration spends nearly all its time there (a checker is a process),
so here the coordinator first walks the explorer itself, exactly as the
serial loop does, and keeps the first crash state of every distinct
directory; only those are checked, in slices of consecutive states, one
slice per executor task.  The verdicts then go back to every state in the
walk's order, so the counts, failures and plans equal the serial loop's.
A worker gets the initial state and the ops, and rebuilds each state it
checks (a slice's arguments stay small: no materialised directories).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Callable, Sequence

import attrs

from .explore import Budget, Materialiser, Model, Plan, barrier_of, explore, pending_at
from .memstore import DiskState, Op

if TYPE_CHECKING:  # syscalls imports this module when it explores on an executor
    from .syscalls import TraceResult

MAX_SLICES = 64  # enough tasks to keep a cluster busy; few enough that the trace is not shipped too often
MIN_SLICE = 4  # states per task at least: a task costs the scheduler a few milliseconds


@attrs.frozen
class StateToCheck:
    """One distinct directory's first crash state: what a worker needs to rebuild it."""

    index: int  # its place among the distinct directories (the serial loop's `state-N`)
    crash: int
    outcomes: tuple[tuple[int, str], ...]
    unit: int  # the model's tear unit


def check_slice(base: DiskState, ops: tuple[Op, ...], seed: int, checker: Callable[[str, int], "str | None"],
                states: Sequence[StateToCheck]) -> list[str | None]:
    """The checker's verdict on each state of one slice, in order (runs on a worker)."""
    from .syscalls import materialise

    materialiser = Materialiser(base, ops)
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="crashsim-states-") as scratch:
        for s in states:
            where = os.path.join(scratch, f"state-{s.index}")
            materialise(materialiser.state(s.crash, dict(s.outcomes), seed, s.unit), where)
            try:
                verdicts.append(checker(where, s.crash))
            finally:
                shutil.rmtree(where, ignore_errors=True)
    return verdicts


def slices(states: list[StateToCheck]) -> list[list[StateToCheck]]:
    """Consecutive slices of the states: at most MAX_SLICES, each of MIN_SLICE states or more (the last may be short)."""
    size = max(MIN_SLICE, math.ceil(len(states) / MAX_SLICES))
    return [states[i : i + size] for i in range(0, len(states), size)]


def explore_trace_on(executor: Executor, name: str, base: DiskState, ops: Sequence[Op], models: Sequence[str],
                     budget: Budget, seed: int, checker: Callable[[str, int], "str | None"],
                     context: Callable[[int], object], variant: str | None = None) -> list[TraceResult]:
    """`explore_trace` without `stop_at_first`, its checks spread over `executor` (the checker must pickle)."""
    from .syscalls import Failure, TraceResult, describe_op, directory_key

    ops = tuple(ops)
    materialiser = Materialiser(base, ops)
    first_index: dict[tuple, int] = {}
    to_check: list[StateToCheck] = []
    walks = []  # per model: its result and every state as (tier, crash, outcomes, directory index)
    for model_name in models:
        model = Model.parse(model_name)
        unit = model.torn_unit or 512
        result = TraceResult(name, model.name, len(ops), variant)
        walk = []
        for tier, crash, outcomes, _ in explore(ops, model, budget, seed):
            result.states += 1
            key = (directory_key(materialiser.state(crash, outcomes, seed, unit)), context(crash))
            if key not in first_index:
                first_index[key] = len(to_check)
                to_check.append(StateToCheck(len(to_check), crash, tuple(sorted(outcomes.items())), unit))
                result.checked += 1
            walk.append((tier, crash, outcomes, first_index[key]))
        walks.append((model, result, walk))
    futures = [executor.submit(check_slice, base, ops, seed, checker, part) for part in slices(to_check)]
    verdicts = [v for f in futures for v in f.result()]
    results = []
    for model, result, walk in walks:
        barriers = barrier_of(ops, model)
        for tier, crash, outcomes, index in walk:
            if verdicts[index] is None:
                continue
            plan = Plan(name, model.name, seed, crash, tuple(sorted(outcomes.items())), variant=variant,
                        pending=tuple(pending_at(barriers, crash)))
            lost = tuple(f"op {i}: {describe_op(ops[i])}: {'dropped' if o == 'd' else 'torn ' + o[2:]}"
                         for i, o in sorted(outcomes.items()))
            result.failures.append(Failure(plan.to_string(), verdicts[index], tier, lost))
        results.append(result)
    return results
