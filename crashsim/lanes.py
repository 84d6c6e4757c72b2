"""`crashsim run --jobs N` on N forked lanes: each judges its share of every task's distinct images.

Why lanes and not slices on a pool (`spreadrun.py`, kept for any
`concurrent.futures.Executor`): a pool's workers start empty, so every slice
needs a walk grouped in the coordinator, a fresh recording and cold memos.
Here the coordinator records each workload once and forks N lane processes,
which inherit the recordings.  A lane walks a task itself (cheap: states are
rebuilt in memory from copy-on-write checkpoints), keys every state by its
durable bytes and groups them in order of first appearance, as every lane
does identically, and judges the groups of its piece only (piece j of N: the
j-th contiguous N-th of the groups), so no image is opened by two lanes.  A
crashed image whose recovery is itself crashed goes back to the lane that
judged it (its memos are warm); an idle lane takes queued work of another.
The coordinator only tallies the verdicts in walk order, as `run_task`
does, so the results equal `run_task`'s field for field except `seconds`
(the sum of the lanes' work on the task).
"""
from __future__ import annotations

import collections
import multiprocessing
import queue
import random
import time
import traceback
from typing import Any, Callable

import attrs

from .errors import CrashsimError
from .explore import Budget, Model, explore
from .memstore import DiskState
from .record import Recording
from .runner import Explorer, Failure, TaskResult, load_recording
from .spreadrun import StateVerdict, _merge_walk, _Task, shrink_failure, state_digest

IN_FLIGHT = 2  # units sent to a lane ahead of its results: it never waits for the coordinator
POLL_S = 1.0  # how often the coordinator looks whether a lane died while it waits


@attrs.frozen
class Shared:
    """What every lane inherits from the coordinator at the fork: the tasks and their recordings."""

    tasks: tuple[tuple[str, str], ...]
    budget: Budget
    seed: int
    variant: str | None
    recordings: dict[str, Recording]


_SHARED: Shared | None = None  # set in the coordinator just before the fork


class LaneTask:
    """One task in a lane: its explorer, its walk and the walk's states grouped by durable image."""

    def __init__(self, shared: Shared, index: int) -> None:
        workload, model = shared.tasks[index]
        rec = shared.recordings[workload]
        self.ex = Explorer(rec, Model.parse(model), shared.seed)
        self.walk = list(explore(rec.ops, self.ex.model, shared.budget, shared.seed))
        self.group_index: dict[tuple, int] = {}
        self.keys: list[tuple] = []
        self.first: list[DiskState | None] = []  # one state of each group, opened (and consumed) by its judge
        self.members: list[list[int]] = []
        for i, (_, crash, outcomes, _) in enumerate(self.walk):
            state = self.ex.state(crash, outcomes)
            key = state.key()
            group = self.group_index.get(key)
            if group is None:
                group = self.group_index[key] = len(self.keys)
                self.keys.append(key)
                self.first.append(state)
                self.members.append([])
            self.members[group].append(i)

    def judge_piece(self, piece: int, pieces: int) -> tuple[int, list[tuple[int, int, StateVerdict]]]:
        """(number of groups, (walk index, group, verdict) of every state of this piece's groups)."""
        count = len(self.keys)
        ex = self.ex
        out = []
        for group in range(count * piece // pieces, count * (piece + 1) // pieces):
            key = self.keys[group]
            state = self.first[group]
            self.first[group] = None
            opened = ex.opened_as(key, state if state is not None else self._state_of(group))
            precheck = str(opened.precheck_exit) if opened.prechecked else None
            for i in self.members[group]:
                _, crash, outcomes, _ = self.walk[i]
                message = ex.verdict(crash, outcomes, key, opened)
                out.append((i, group, StateVerdict(message, opened.exists, bool(opened.orphans), precheck)))
        return count, out

    def _state_of(self, group: int) -> DiskState:
        _, crash, outcomes, _ = self.walk[self.members[group][0]]
        return self.ex.state(crash, outcomes)

    def recover(self, crash: int, outcomes: dict[int, str]) -> tuple[list[tuple[str, str | None]], dict[str, int], set[bytes]]:
        """`Explorer.check_recovery` of one image: (plan, message) per state, the pre-check tally, and the
        digests of the images it opened that no state of the walk has."""
        ex = self.ex
        before = dict(ex.prechecks)
        ex.touched = set()
        try:
            judged = [(plan.to_string(), message) for plan, message in ex.check_recovery(crash, outcomes)]
            new = {state_digest(key) for key in ex.touched if key not in self.group_index}
        finally:
            ex.touched = None
        prechecks = {code: n - before.get(code, 0) for code, n in ex.prechecks.items() if n != before.get(code, 0)}
        return judged, prechecks, new


def _lane_main(lane: int, inbox: Any, outbox: Any) -> None:
    """A lane's loop: units in from its inbox, results out, until None."""
    assert _SHARED is not None
    shared = _SHARED
    tasks: dict[int, LaneTask] = {}
    while True:
        unit = inbox.get()
        if unit is None:
            return
        kind, index = unit[0], unit[1]
        started = time.process_time()
        try:
            if kind == "forget":
                tasks.pop(index, None)
                continue
            if kind == "shrink":
                payload: object = shrink_failure(unit[2], shared.budget)[0]
            else:
                task = tasks.get(index)
                if task is None:
                    task = tasks[index] = LaneTask(shared, index)
                payload = task.judge_piece(unit[2], unit[3]) if kind == "walk" else (unit[4], task.recover(unit[2], unit[3]))
            outbox.put((lane, kind, index, payload, time.process_time() - started))
        except BaseException as exc:  # noqa: BLE001 - the coordinator raises it; the lane stops
            outbox.put((lane, "error", index, (exc, traceback.format_exc()), 0.0))
            return


@attrs.define
class _Progress:
    """One task in the coordinator while its units are out."""

    task: _Task
    waiting: int = 0  # units sent or queued whose results are not in
    group_lane: dict[int, int] = attrs.field(factory=dict)  # group -> the lane that judged it
    groups: int = 0
    new_images: set[bytes] = attrs.field(factory=set)
    recoveries: list[Any] = attrs.field(factory=list)  # per recovered image, in candidate order: its result
    phase: str = "walk"


class Lanes:
    """N forked lane processes, each with its own inbox; one outbox for all their results."""

    def __init__(self, jobs: int) -> None:
        ctx = multiprocessing.get_context("fork")
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.SimpleQueue() for _ in range(jobs)]
        self.queued: list[collections.deque] = [collections.deque() for _ in range(jobs)]
        self.in_flight = [0] * jobs
        self.procs = [ctx.Process(target=_lane_main, args=(j, self.inboxes[j], self.outbox), daemon=True,
                                  name=f"crashsim-lane-{j}") for j in range(jobs)]
        for p in self.procs:
            p.start()

    def feed(self, more: Callable[[], bool]) -> None:
        """Send each lane queued units until IN_FLIGHT are out; `more()` queues the next task's pieces (False: none)."""
        for lane in range(len(self.procs)):
            while self.in_flight[lane] < IN_FLIGHT:
                if not self.queued[lane] and not more():
                    busiest = max(range(len(self.queued)), key=lambda j: len(self.queued[j]))
                    if not self.queued[busiest]:
                        break
                    self.queued[lane].append(self.queued[busiest].pop())  # an idle lane takes another's work
                self.inboxes[lane].put(self.queued[lane].popleft())
                self.in_flight[lane] += 1

    def result(self) -> tuple:
        """The next result of any lane; a lane that died or raised stops the run."""
        while True:
            try:
                lane, kind, index, payload, seconds = self.outbox.get(timeout=POLL_S)
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode is not None]
                if dead:
                    raise CrashsimError(f"crash exploration lane {dead[0].name} stopped (exit code {dead[0].exitcode})") from None
                continue
            if kind == "error":
                exc, text = payload
                if isinstance(exc, Exception):
                    raise exc
                raise CrashsimError(f"a crash exploration lane failed:\n{text}")
            self.in_flight[lane] -= 1
            return lane, kind, index, payload, seconds

    def broadcast(self, unit: tuple) -> None:
        for inbox in self.inboxes:
            inbox.put(unit)

    def close(self) -> None:
        for p, inbox in zip(self.procs, self.inboxes):
            if p.is_alive():
                inbox.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()


def run_lanes(tasks: list[tuple[str, str]], budget: Budget, seed: int, variant: str | None, jobs: int,
              on_done: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """`run_task` of every (workload, model) on `jobs` forked lanes; results in task order, equal to `run_task`'s."""
    global _SHARED
    recordings = {w: load_recording(w, variant=variant) for w in dict.fromkeys(w for w, _ in tasks)}
    _SHARED = Shared(tuple(tasks), budget, seed, variant, recordings)
    lanes = Lanes(jobs)
    _SHARED = None
    progress: dict[int, _Progress] = {}
    results: dict[int, TaskResult] = {}
    next_task = 0

    def more() -> bool:
        nonlocal next_task
        if next_task >= len(tasks) or len(progress) > jobs + 1:  # a few tasks ahead: the lanes keep busy, memory stays bounded
            return False
        index, next_task = next_task, next_task + 1
        w, m = tasks[index]
        rec = recordings[w]
        model = Model.parse(m)
        ex = Explorer(rec, model, seed)
        walk = list(explore(rec.ops, model, budget, seed))
        progress[index] = _Progress(_Task(w, model, ex, walk, [0] * len(walk), [], b"", [None] * len(walk)), waiting=jobs)
        for piece in range(jobs):
            lanes.queued[piece].append(("walk", index, piece, jobs))
        return True

    try:
        lanes.feed(more)
        while len(results) < len(tasks):
            lane, kind, index, payload, seconds = lanes.result()
            p = progress[index]
            p.task.seconds += seconds
            p.waiting -= 1
            if kind == "walk":
                p.groups, judged = payload
                for i, group, verdict in judged:
                    p.task.keys[i] = group
                    p.task.verdicts[i] = verdict
                    p.group_lane[group] = lane
            elif kind == "recover":
                slot, (judged, prechecks, new) = payload
                p.recoveries[slot] = (judged, prechecks)
                p.new_images |= new
            else:
                p.task.failures[0] = payload
            if p.waiting == 0:
                _advance(index, p, lanes, budget, seed)
            if p.waiting == 0:
                lanes.broadcast(("forget", index))
                t = p.task
                results[index] = TaskResult(t.workload, t.model.name, variant, seed, len(t.ex.rec.ops), t.counts,
                                            t.exhaustive, p.groups + len(p.new_images), t.orphans, tuple(t.failures),
                                            t.failing, t.seconds, dict(t.prechecks))
                del progress[index]
                if on_done is not None:
                    on_done(results[index])
            lanes.feed(more)
    finally:
        lanes.close()
    return [results[i] for i in range(len(tasks))]


def _advance(index: int, p: _Progress, lanes: Lanes, budget: Budget, seed: int) -> None:
    """A task's phase is in: tally it and queue the next (recoveries, then the shrink of the first failure)."""
    t = p.task
    if p.phase == "walk":
        _merge_walk(t)
        order = list(range(len(t.candidates)))
        random.Random(seed).shuffle(order)  # the permutation `run_task`'s shuffle of the candidates makes
        t.exhaustive["recovery"] = len(order) <= budget.recovery_images
        chosen = order[: budget.recovery_images]
        p.recoveries = [None] * len(chosen)
        p.phase = "recover"
        for slot, k in enumerate(chosen):
            crash, outcomes = t.candidates[k]
            owner = p.group_lane[t.candidate_keys[k]]  # the lane that opened it: its memos are warm
            lanes.queued[owner].appendleft(("recover", index, crash, outcomes, slot))
            p.waiting += 1
        if p.waiting:
            return
    if p.phase == "recover":
        for judged, prechecks in p.recoveries:
            t.tally(prechecks)
            for plan, message in judged:
                t.note("recovery", plan, message)
        p.phase = "shrink"
        if t.failures:
            lanes.queued[index % len(lanes.queued)].appendleft(("shrink", index, t.failures[0]))
            p.waiting += 1
