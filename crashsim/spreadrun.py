"""`crashsim run` spread over an executor in slices of crash states, merged into what one task gives.

One (workload, model) task of `runner.run_task` can be most of a run (the
`torn` model, say), so on an executor it is cut up.  The coordinator records
the workload and walks the explorer itself (cheap: states are rebuilt in
memory), groups the states by their durable bytes and sends consecutive
groups as slices: a worker opens each distinct crash image once and judges
every state of its group (`check_states`).  From the verdicts in walk order
the coordinator picks, as `run_task` does, the images whose recovery is
itself crashed; each is one more task (`check_recoveries`); the first
failure is shrunk as a last task (`shrink_failure`).  The merged result
equals `run_task`'s field for field (counts, exhaustiveness, distinct images,
orphans, pre-check tally, failures and their order, the shrunk plan), except
`seconds`: the sum of the slices' work, not a wall time.

Distinct images are counted across slices by a digest of their bytes
(`state_digest`), since recovery tasks open images the coordinator never
materialised.
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
import threading
import time
from concurrent.futures import Executor
from typing import Callable

import attrs

from .errors import CrashsimError
from .explore import Budget, Model, Plan, explore
from .memstore import Op
from .runner import MAX_REPORTED_FAILURES, Explorer, Failure, TaskResult, _timeline, load_recording, replay, shrink_plan

MAX_SLICES = 16  # per (workload, model): enough to keep a few cores busy on the largest task
MIN_SLICE = 8  # distinct images per slice at least: a slice costs a re-recording in a fresh worker and scheduling


def state_digest(key: tuple) -> bytes:
    """A digest of a `DiskState.key()`: equal keys, equal digests, and picklable in a few bytes."""
    names, files, dirs = key
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((names, dirs, [(inode, size, [index for index, _ in blocks]) for inode, (size, blocks) in files])).encode())
    for _inode, (_size, blocks) in files:
        for _index, data in blocks:
            h.update(data)
    return h.digest()


def ops_digest(ops: tuple[Op, ...]) -> bytes:
    """A digest of a recording's ops: a worker must have recorded exactly what the coordinator walked."""
    return hashlib.blake2b(repr(ops).encode(), digest_size=20).digest()


@functools.lru_cache(maxsize=8)
def _explorer(workload: str, model: str, seed: int, variant: str | None, thread: int) -> tuple[Explorer, bytes]:
    """One explorer per (task, thread) in a worker process, kept across its slices: its memos stay warm."""
    ex = Explorer(load_recording(workload, variant=variant), Model.parse(model), seed)
    return ex, ops_digest(ex.rec.ops)


def _worker_explorer(workload: str, model: str, seed: int, variant: str | None, recorded: bytes) -> Explorer:
    ex, digest = _explorer(workload, model, seed, variant, threading.get_ident())
    if digest != recorded:
        raise CrashsimError(f"workload {workload}: a worker recorded other operations than the coordinator "
                            "(the recording is not deterministic), so its slices cannot be merged")
    return ex


@attrs.frozen
class StateVerdict:
    """What the coordinator needs of one judged state."""

    message: str | None
    exists: bool
    orphan: bool
    precheck: str | None  # exit code of the read-only check before recovery, None when there was no image


def check_states(workload: str, model: str, seed: int, variant: str | None, recorded: bytes,
                 states: list[tuple[int, tuple[tuple[int, str], ...]]]) -> tuple[list[StateVerdict], float]:
    """Judge states (crash point, outcomes) in order; returns their verdicts and the seconds it took (runs on a worker)."""
    started = time.perf_counter()
    ex = _worker_explorer(workload, model, seed, variant, recorded)
    out = []
    for crash, outcomes in states:
        key, message = ex.check(crash, dict(outcomes))
        opened = ex._opened[key]
        out.append(StateVerdict(message, opened.exists, bool(opened.orphans),
                                str(opened.precheck_exit) if opened.prechecked else None))
    return out, time.perf_counter() - started


def check_recoveries(workload: str, model: str, seed: int, variant: str | None, recorded: bytes, crash: int,
                     outcomes: tuple[tuple[int, str], ...]) -> tuple[list[tuple[str, str | None]], dict[str, int], set[bytes], float]:
    """`Explorer.check_recovery` of one crash image: (plan, message) per state, the pre-check tally, the digests of
    every image it opened, and the seconds (runs on a worker)."""
    started = time.perf_counter()
    ex = _worker_explorer(workload, model, seed, variant, recorded)
    before = dict(ex.prechecks)
    ex.touched = set()
    try:
        judged = [(plan.to_string(), message) for plan, message in ex.check_recovery(crash, dict(outcomes))]
        digests = {state_digest(key) for key in ex.touched}
    finally:
        ex.touched = None
    prechecks = {code: n - before.get(code, 0) for code, n in ex.prechecks.items() if n != before.get(code, 0)}
    return judged, prechecks, digests, time.perf_counter() - started


def shrink_failure(first: Failure, budget: Budget) -> tuple[Failure, float]:
    """The first failure shrunk to a minimal replayable plan, as `run_task` shrinks it (runs on a worker)."""
    started = time.perf_counter()
    small = shrink_plan(Plan.parse(first.plan), budget)
    small_rec, message = replay(small)
    so, sg = _timeline(small_rec)
    return Failure(small.to_string(), message or first.message, first.tier, so, sg), time.perf_counter() - started


def group_slices(groups: list[list[int]]) -> list[list[list[int]]]:
    """Consecutive slices of the groups: at most MAX_SLICES, each of MIN_SLICE groups or more (the last may be short)."""
    size = max(MIN_SLICE, math.ceil(len(groups) / MAX_SLICES))
    return [groups[i : i + size] for i in range(0, len(groups), size)]


@attrs.define
class _Task:
    """One (workload, model) task being merged in the coordinator."""

    workload: str
    model: Model
    ex: Explorer
    walk: list[tuple[str, int, dict[int, str], bool]]
    keys: list[int]  # the group of each state: states of one group have the same image
    groups: list[list[int]]  # the states of each group, in walk order; groups in order of first appearance
    recorded: bytes  # ops_digest of the recording
    verdicts: list[StateVerdict | None] = attrs.field(factory=list)
    seconds: float = 0.0
    counts: dict[str, int] = attrs.field(factory=dict)
    exhaustive: dict[str, bool] = attrs.field(factory=dict)
    failures: list[Failure] = attrs.field(factory=list)
    failing: int = 0
    orphans: int = 0
    prechecks: dict[str, int] = attrs.field(factory=dict)
    digests: set[bytes] = attrs.field(factory=set)
    candidates: list[tuple[int, dict[int, str]]] = attrs.field(factory=list)
    candidate_keys: list[int] = attrs.field(factory=list)  # the group of each candidate

    def note(self, tier: str, plan: str, message: str | None) -> None:
        self.counts[tier] = self.counts.get(tier, 0) + 1
        if message is None:
            return
        self.failing += 1
        if len(self.failures) < MAX_REPORTED_FAILURES:
            ops_t, guest_t = _timeline(self.ex.rec)
            self.failures.append(Failure(plan, message, tier, ops_t, guest_t))

    def tally(self, prechecks: dict[str, int]) -> None:
        for code, n in prechecks.items():
            self.prechecks[code] = self.prechecks.get(code, 0) + n


def _walk(workload: str, model_name: str, budget: Budget, seed: int, variant: str | None) -> _Task:
    """Record, walk the explorer and key every state by its durable bytes (in the coordinator)."""
    rec = load_recording(workload, variant=variant)
    model = Model.parse(model_name)
    ex = Explorer(rec, model, seed)
    walk = list(explore(rec.ops, model, budget, seed))
    first: dict[tuple, int] = {}  # image key -> group (the keys are dropped with the walk: they hold blocks)
    keys: list[int] = []
    groups: list[list[int]] = []
    digests = set()
    for i, (_, crash, outcomes, _) in enumerate(walk):
        key = ex.state(crash, outcomes).key()
        group = first.get(key)
        if group is None:
            group = first[key] = len(groups)
            groups.append([])
            digests.add(state_digest(key))
        groups[group].append(i)
        keys.append(group)
    return _Task(workload, model, ex, walk, keys, groups, ops_digest(rec.ops), [None] * len(walk), digests=digests)


def run_sliced(tasks: list[tuple[str, str]], budget: Budget, seed: int, variant: str | None, executor: Executor,
               on_done: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """`run_task` of every (workload, model), in slices on `executor`; results in task order."""
    walked = []
    pending = []
    for w, m in tasks:  # each task's slices go out as soon as it is walked: the workers start while the rest is walked
        t = _walk(w, m, budget, seed, variant)
        walked.append(t)
        for part in group_slices(t.groups):
            indices = [i for group in part for i in group]
            states = [(t.walk[i][1], tuple(sorted(t.walk[i][2].items()))) for i in indices]
            pending.append((t, indices, executor.submit(check_states, t.workload, t.model.name, seed, variant, t.recorded, states)))
    recoveries = []
    for t in walked:  # in task order: a task's recoveries go out once its own slices are in
        for owner, indices, future in pending:
            if owner is not t:
                continue
            verdicts, seconds = future.result()
            t.seconds += seconds
            for i, v in zip(indices, verdicts):
                t.verdicts[i] = v
        _merge_walk(t)
        rng = random.Random(seed)
        candidates = list(t.candidates)
        rng.shuffle(candidates)
        t.exhaustive["recovery"] = len(candidates) <= budget.recovery_images
        for crash, outcomes in candidates[: budget.recovery_images]:
            recoveries.append((t, executor.submit(check_recoveries, t.workload, t.model.name, seed, variant, t.recorded, crash,
                                                  tuple(sorted(outcomes.items())))))
    shrinks = []
    for t in walked:  # likewise, a task's shrink goes out once its recoveries are in
        for owner, future in recoveries:
            if owner is not t:
                continue
            judged, prechecks, digests, seconds = future.result()
            t.seconds += seconds
            t.tally(prechecks)
            t.digests |= digests
            for plan, message in judged:
                t.note("recovery", plan, message)
        if t.failures:
            shrinks.append((t, executor.submit(shrink_failure, t.failures[0], budget)))
    for t, future in shrinks:
        t.failures[0], seconds = future.result()
        t.seconds += seconds
    results = []
    for t in walked:
        result = TaskResult(t.workload, t.model.name, variant, seed, len(t.ex.rec.ops), t.counts, t.exhaustive,
                            len(t.digests), t.orphans, tuple(t.failures), t.failing, t.seconds, dict(t.prechecks))
        if on_done:
            on_done(result)
        results.append(result)
    return results


def _merge_walk(t: _Task) -> None:
    """The walk's verdicts tallied in walk order, as `run_task`'s loop tallies them."""
    ok: dict[int, tuple[int, dict[int, str]]] = {}
    for (tier, crash, outcomes, exact), key, v in zip(t.walk, t.keys, t.verdicts):
        assert v is not None
        t.exhaustive[tier] = t.exhaustive.get(tier, True) and exact
        if v.precheck is not None:
            t.prechecks[v.precheck] = t.prechecks.get(v.precheck, 0) + 1
        if v.orphan:
            t.orphans += 1
        if v.message is None and v.exists and key not in ok:
            ok[key] = (crash, outcomes)
        t.note(tier, "" if v.message is None else t.ex.plan(crash, outcomes).to_string(), v.message)
    t.candidates = list(ok.values())
    t.candidate_keys = list(ok)
