"""Explore the crash states of workloads under persistence models, shrink failures, replay plans.

The unit of parallel work is one (workload, model) task: it records the
workload, explores its states and returns a picklable `TaskResult`, so any
`concurrent.futures.Executor` can run tasks (a process pool by default).
"""
from __future__ import annotations

import random
import time
from concurrent.futures import Executor
from typing import Callable, Iterable, TypeVar

import attrs

from .errors import BadPlan
from lamina.impl.identity import fixed_identities
from lamina.spec.layout import SECTOR_SIZE, Geometry

from .explore import Budget, Materialiser, Model, Plan, barrier_of, explore, garbage, pending_at, tear_units
from .memstore import PWRITE, DiskState, Op, Trace
from .oracle import Legal, Opened, judge, legal_at, open_state
from .record import Recording, record_workload
from .trees import TreeRecording, judge_tree, open_tree_state, record_tree_workload, tree_legal_at
from .workloads import get_workload

MAX_REPORTED_FAILURES = 5
SHRINK_RECOVERY_IMAGES = 16  # distinct crashed images whose recovery a shrink step crashes


@attrs.frozen
class Failure:
    plan: str
    message: str
    tier: str
    ops: tuple[tuple[str, int, int], ...] = ()  # (kind, offset, length) of each recorded op, for the timeline
    guest: tuple[tuple[str, int, int], ...] = ()  # (kind, first op, end op) of each guest event


class PrecheckTally:
    """The read-only check of every crash state before recovery, tallied by exit code (`prechecks`)."""

    prechecks: dict[str, int]

    @property
    def prechecked(self) -> int:
        """Crash states the spec's check judged read-only before recovery (all those with an image)."""
        return sum(self.prechecks.values())

    @property
    def precheck_corrupt(self) -> int:
        """Of those, the states it reported as corruption (exit 1 or 2); each is also a failing state."""
        return self.prechecks.get("1", 0) + self.prechecks.get("2", 0)


@attrs.frozen
class TaskResult(PrecheckTally):
    """Counts and failures of one (workload, model) exploration."""

    workload: str
    model: str
    variant: str | None
    seed: int
    ops: int
    counts: dict[str, int]
    exhaustive: dict[str, bool]
    distinct_images: int
    orphan_states: int
    failures: tuple[Failure, ...]
    failing_states: int
    seconds: float
    prechecks: dict[str, int] = attrs.field(factory=dict)  # exit code of the read-only check before recovery -> states

    @property
    def states(self) -> int:
        return sum(self.counts.values())


class Explorer:
    """Checks states of one recording under one model, caching what depends only on bytes or crash point."""

    def __init__(self, rec: Recording, model: Model, seed: int) -> None:
        self.rec = rec
        self.model = model
        self.seed = seed
        self.materialiser = Materialiser(rec.base, rec.ops)
        self.barriers = barrier_of(rec.ops, model)
        self._opened: dict[tuple, Opened] = {}
        self._legal: dict[int, Legal] = {}
        self._judged: dict[tuple[int, tuple], str | None] = {}
        self._recovered: dict[tuple, tuple] = {}  # recovered bytes -> the check and reading after recovery
        self.prechecks: dict[str, int] = {}  # exit code of the read-only check before recovery -> judged states
        self.touched: set[tuple] | None = None  # when a set: every image key opened (memo hits too) is added

    def _count_precheck(self, opened: Opened) -> None:
        if opened.prechecked:
            code = str(opened.precheck_exit)
            self.prechecks[code] = self.prechecks.get(code, 0) + 1

    def state(self, crash: int, outcomes: dict[int, str]) -> DiskState:
        return self.materialiser.state(crash, outcomes, self.seed, self.model.torn_unit or 512)

    def opened(self, state: DiskState) -> tuple[tuple, Opened]:
        key = state.key()
        return key, self.opened_as(key, state)

    def opened_as(self, key: tuple, state: DiskState) -> Opened:
        """What recovery and check make of a state whose `key()` is known (the state is consumed on a memo miss).

        A lane (`lanes.py`) keys every state of its walk once to group them,
        then opens one state per group through this.
        """
        if self.touched is not None:
            self.touched.add(key)
        result = self._opened.get(key)
        if result is None:
            result = self._opened[key] = open_any(state, self.rec, recovered=self._recovered)
        return result

    def legal(self, crash: int) -> Legal:
        legal = self._legal.get(crash)
        if legal is None:
            legal = self._legal[crash] = tree_legal_at(self.rec, crash) if isinstance(self.rec, TreeRecording) \
                else legal_at(self.rec, crash)
        return legal

    def check(self, crash: int, outcomes: dict[int, str]) -> tuple[tuple, str | None]:
        """(image key, failure message or None) of one crash state."""
        key, opened = self.opened(self.state(crash, outcomes))
        self._count_precheck(opened)
        return key, self.verdict(crash, outcomes, key, opened)

    def verdict(self, crash: int, outcomes: dict[int, str], key: tuple, opened: Opened) -> str | None:
        """The failure message (None: legal) of one crash state whose image `key` opened as `opened`."""
        extra = self.garbage_sectors(outcomes)
        memo = (crash, key, extra)
        if memo not in self._judged:
            judge_ = judge_tree if isinstance(self.rec, TreeRecording) else judge
            self._judged[memo] = judge_(opened, self.legal(crash), dict(extra))
        return self._judged[memo]

    def garbage_sectors(self, outcomes: dict[int, str]) -> tuple[tuple[int, bytes], ...]:
        """Guest sectors that a torn write filled with garbage, and the garbage.

        A sector written only partly by the device (not sector-atomic) holds
        bytes that are neither old nor new; in a data cluster no format with
        in-place data can tell them from new data, so the oracle accepts that
        garbage there, and only there.  Garbage in metadata must be survived.
        """
        out = []
        unit = self.model.torn_unit or 512
        cluster = self.rec.workload.cluster_size
        geometry = Geometry(cluster.bit_length() - 1, 0)
        raw_inodes = getattr(self.rec, "raw_inodes", frozenset())  # raw files: file offset = guest offset
        for index, outcome in outcomes.items():
            if not outcome.startswith("t:") or "g" not in outcome:
                continue
            op = self.rec.ops[index]
            for k, ((offset, length), letter) in enumerate(zip(tear_units(op, unit), outcome[2:])):
                if letter != "g":
                    continue
                junk = garbage(self.seed, index, k, length)
                for pos in range(offset - offset % SECTOR_SIZE, offset + length, SECTOR_SIZE):
                    guest = pos if op.target in raw_inodes else file_to_guest(geometry, pos)
                    if guest is None:
                        continue
                    # The guest sector as the device left it: garbage over the unit, the rest new.
                    lo, hi = max(pos, offset), min(pos + SECTOR_SIZE, offset + length)
                    sector = bytearray(op.data[pos - op.offset : pos - op.offset + SECTOR_SIZE].ljust(SECTOR_SIZE, b"\0")) \
                        if pos >= op.offset else bytearray(SECTOR_SIZE)
                    sector[lo - pos : hi - pos] = junk[lo - offset : hi - offset]
                    out.append((guest // SECTOR_SIZE, bytes(sector)))
        return tuple(sorted(out))

    @property
    def distinct_images(self) -> int:
        return len(self._opened)

    def plan(self, crash: int, outcomes: dict[int, str], **extra) -> Plan:
        w = self.rec.workload
        base_name, dropped = w.name, ()
        if "@" in w.name:
            base_name, _, rest = w.name.partition("@")
            dropped = tuple(int(x) for x in rest.split(","))
        return Plan(base_name, self.model.name, self.seed, crash, tuple(sorted(outcomes.items())), dropped,
                    self.rec.variant, pending=tuple(pending_at(self.barriers, crash)), **extra)

    def recovery_trace(self, crash: int, outcomes: dict[int, str]) -> tuple[Opened, Materialiser] | None:
        """The first recovery of one state and the materialiser of its ops (None: nothing to recover)."""
        first = self.opened(self.state(crash, outcomes))[1]
        if first.problem or not first.exists:
            return None
        trace = Trace()
        open_any(self.state(crash, outcomes), self.rec, trace)
        return first, Materialiser(self.state(crash, outcomes), tuple(trace.ops))

    def judge_recovery(self, first: Opened, rmat: Materialiser, rcrash: int, routcomes: dict[int, str]) -> str | None:
        """The failure of one crash during recovery: recovering again must succeed and read what `first` read."""
        again = self.opened(rmat.state(rcrash, routcomes, self.seed, self.model.torn_unit or 512))[1]
        self._count_precheck(again)
        if again.problem:
            return "recovery after a crash during recovery: " + again.problem
        if again.view != first.view:
            return "recovery is not idempotent: a crash during recovery recovers to different guest contents"
        return None

    def check_recovery(self, crash: int, outcomes: dict[int, str], limit_states: int = 400) -> Iterable[tuple[Plan, str | None]]:
        """Crash the recovery of one state at every point (and the model's drops/tears): same result each time."""
        traced = self.recovery_trace(crash, outcomes)
        if traced is None:
            return
        first, rmat = traced
        rops = rmat.ops
        count = 0
        for _tier, rcrash, routcomes, _ in explore(rops, self.model, Budget(max_subset=3, subset_samples=4, torn_cap=9, torn_samples=4), self.seed):
            if rcrash == len(rops) and not routcomes:
                continue
            message = self.judge_recovery(first, rmat, rcrash, routcomes)
            yield self.plan(crash, outcomes, recovery_crash=rcrash, recovery_outcomes=tuple(sorted(routcomes.items()))), message
            count += 1
            if count >= limit_states:
                return


def open_any(state: DiskState, rec: Recording | TreeRecording, trace: Trace | None = None,
             recovered: dict[tuple, tuple] | None = None) -> Opened:
    """Recover, check and read a durable state: one image, or a whole tree (`recovered`: see `oracle.open_state`)."""
    if isinstance(rec, TreeRecording):
        return open_tree_state(state, rec, trace, recovered)  # type: ignore[return-value]
    return open_state(state, rec.variant, trace, recovered)


def file_to_guest(geometry: Geometry, offset: int) -> int | None:
    """The guest offset whose present sector lives at a file offset, or None for metadata and padding."""
    if offset < geometry.first_region_offset:
        return None
    region, within = divmod(offset - geometry.first_region_offset, geometry.region_stride)
    guest = region * geometry.region_span + within - geometry.cluster_size
    if not 0 <= within - geometry.cluster_size < geometry.region_span:
        return None
    return guest if geometry.guest_to_file(guest) == offset else None


def _timeline(rec: Recording) -> tuple[tuple, tuple]:
    ops = tuple((op.kind, op.offset, op.length if op.kind != "pwrite" else len(op.data)) for op in rec.ops)
    guest = tuple((e.kind, e.start, e.end) for e in rec.events)
    return ops, guest


def load_recording(workload: str, dropped: tuple[int, ...] = (), variant: str | None = None) -> Recording:
    """Record a workload; uuids and snapshot times are fixed, so every process records the same bytes.

    (Slices of one task are judged in several processes and their images
    counted together by their bytes: `spreadrun.py`.)
    """
    w = get_workload(workload)
    if dropped:
        w = attrs.evolve(w.without_steps(frozenset(dropped)), name=f"{w.name}@{','.join(map(str, dropped))}")
    with fixed_identities(f"crashsim:{w.name}"):
        if hasattr(w, "tops"):
            return record_tree_workload(w, variant)  # type: ignore[return-value]
        return record_workload(w, variant)


def run_task(workload: str, model_name: str, budget: Budget = Budget(), seed: int = 0, variant: str | None = None,
             stop_at_first: bool = False, shrink: bool = True, progress: Callable[[int], None] | None = None) -> TaskResult:
    """Explore one workload under one model; the first failure is shrunk to a minimal replayable plan."""
    started = time.perf_counter()
    rec = load_recording(workload, variant=variant)
    model = Model.parse(model_name)
    ex = Explorer(rec, model, seed)
    counts: dict[str, int] = {}
    exhaustive: dict[str, bool] = {}
    failures: list[Failure] = []
    failing = 0
    orphans = 0
    ok_keys: dict[tuple, tuple[int, dict[int, str]]] = {}
    ops_t, guest_t = _timeline(rec)

    def note(tier: str, plan: Plan | None, message: str | None) -> bool:  # plan: built only for a failing state
        nonlocal failing
        counts[tier] = counts.get(tier, 0) + 1
        if progress and counts[tier] % 256 == 0:
            progress(256)
        if message is None:
            return False
        failing += 1
        if len(failures) < MAX_REPORTED_FAILURES:
            assert plan is not None
            failures.append(Failure(plan.to_string(), message, tier, ops_t, guest_t))
        return True

    for tier, crash, outcomes, exact in explore(rec.ops, model, budget, seed):
        exhaustive[tier] = exhaustive.get(tier, True) and exact
        key, message = ex.check(crash, outcomes)
        opened = ex._opened[key]
        if opened.orphans:
            orphans += 1
        if message is None and opened.exists and key not in ok_keys:
            ok_keys[key] = (crash, outcomes)
        if note(tier, None if message is None else ex.plan(crash, outcomes), message) and stop_at_first:
            break
    if not (stop_at_first and failures):
        rng = random.Random(seed)
        candidates = list(ok_keys.values())
        rng.shuffle(candidates)
        exhaustive["recovery"] = len(candidates) <= budget.recovery_images
        for crash, outcomes in candidates[: budget.recovery_images]:
            stop = False
            for plan, message in ex.check_recovery(crash, outcomes):
                if note("recovery", plan, message) and stop_at_first:
                    stop = True
                    break
            if stop:
                break
    if failures and shrink:
        first = failures[0]
        small = shrink_plan(Plan.parse(first.plan), budget)
        small_rec, message = replay(small)
        so, sg = _timeline(small_rec)
        failures[0] = Failure(small.to_string(), message or first.message, first.tier, so, sg)
    if progress:
        progress(sum(counts.values()) % 256)
    return TaskResult(workload, model.name, variant, seed, len(rec.ops), counts, exhaustive, ex.distinct_images,
                      orphans, tuple(failures), failing, time.perf_counter() - started, dict(ex.prechecks))


def check_fits(ops: tuple[Op, ...], model: Model, crash: int, outcomes: dict[int, str], what: str) -> None:
    """Raise BadPlan unless a crash point and its outcomes fit a trace: every changed op un-synced, every tear its sectors."""
    if crash > len(ops):
        raise BadPlan(f"{what}crash point {crash} is past the {len(ops)} ops")
    stray = set(outcomes) - set(pending_at(barrier_of(ops, model), crash))
    if stray:
        raise BadPlan(f"{what}ops {sorted(stray)} are not un-synced at crash point {crash} under model {model.name}")
    for index, outcome in outcomes.items():
        if outcome.startswith("t:") and (ops[index].kind != PWRITE or
                                         len(outcome) - 2 != len(tear_units(ops[index], model.torn_unit or 512))):
            raise BadPlan(f"{what}torn pattern of op {index} does not match the sectors its write covers")


def replay(plan: Plan) -> tuple[Recording, str | None]:
    """Re-run exactly the state a plan names; return the recording and the failure (None: state is fine)."""
    rec = load_recording(plan.workload, plan.dropped_steps, plan.variant)
    model = Model.parse(plan.model)
    outcomes = dict(plan.outcomes)
    check_fits(rec.ops, model, plan.crash, outcomes, f"workload {plan.workload}: ")
    ex = Explorer(rec, model, plan.seed)
    if plan.recovery_crash is None:
        return rec, ex.check(plan.crash, outcomes)[1]
    traced = ex.recovery_trace(plan.crash, outcomes)
    if traced is None:
        raise BadPlan(f"plan {plan.to_string()}: the crash state does not recover cleanly, so its recovery is not crashed")
    first, rmat = traced
    routcomes = dict(plan.recovery_outcomes)
    check_fits(rmat.ops, model, plan.recovery_crash, routcomes, "recovery: ")
    return rec, ex.judge_recovery(first, rmat, plan.recovery_crash, routcomes)


def plan_fails(plan: Plan) -> bool:
    """Whether a candidate plan replays and fails; a plan that does not fit its trace is no failure, never an error."""
    try:
        return replay(plan)[1] is not None
    except BadPlan:
        return False


def _first_failure(workload: str, dropped: tuple[int, ...], variant: str | None, model: Model, budget: Budget,
                   seed: int, limit: int = 20000, recovery: bool = False) -> Plan | None:
    """The first failing plan of a (shrunk) workload; with `recovery`, the first failing crash of a recovery."""
    try:
        rec = load_recording(workload, dropped, variant)
    except Exception:  # noqa: BLE001 - a shrunk workload may be invalid (e.g. a write past a dropped resize)
        return None
    ex = Explorer(rec, model, seed)
    recovered: set[tuple] = set()
    checked = 0
    for _tier, crash, outcomes, _ in explore(rec.ops, model, budget, seed):
        key, message = ex.check(crash, outcomes)
        checked += 1
        if not recovery and message is not None:
            return ex.plan(crash, outcomes)
        if recovery and message is None and key not in recovered and len(recovered) < SHRINK_RECOVERY_IMAGES:
            recovered.add(key)
            for plan, rmessage in ex.check_recovery(crash, outcomes):
                checked += 1
                if rmessage is not None:
                    return plan
        if checked >= limit:
            break
    return None


def shrink_plan(plan: Plan, budget: Budget = Budget()) -> Plan:
    """A smaller failing plan: fewer workload steps, then fewer deviating outcomes (of the crash, then of its recovery).

    Every candidate is judged by `plan_fails`: one that does not fit its
    trace is skipped, so the result always replays (and fails).
    """
    model = Model.parse(plan.model)
    recovery = plan.recovery_crash is not None
    original = plan
    steps = len(get_workload(plan.workload).steps)
    dropped = set(plan.dropped_steps)
    for j in reversed(range(steps)):
        if j in dropped:
            continue
        candidate = _first_failure(plan.workload, tuple(sorted(dropped | {j})), plan.variant, model, budget, plan.seed,
                                   recovery=recovery)
        if candidate is not None:
            dropped.add(j)
            plan = candidate
    plan = minimize_outcomes(plan, plan_fails)
    if recovery:
        plan = minimize_outcomes(plan, plan_fails, "recovery_outcomes")
    return plan if plan_fails(plan) else original


P = TypeVar("P")


def minimize_outcomes(plan: P, fails: Callable[[P], bool], field: str = "outcomes") -> P:
    """Fewer deviating outcomes: each dropped or torn op is made "kept" where the failure stays, sector by sector.

    `field` names the outcomes to reduce (a plan's crash, or its recovery's).
    A candidate that does not fit its trace (BadPlan) is no failure: skipped.
    """
    outcomes = dict(getattr(plan, field))

    def attempt(trial: dict) -> bool:
        try:
            return fails(attrs.evolve(plan, **{field: tuple(sorted(trial.items()))}))
        except BadPlan:
            return False

    for index in sorted(outcomes):
        trial = {k: v for k, v in outcomes.items() if k != index}
        if attempt(trial):
            outcomes = trial
            continue
        if outcomes[index].startswith("t:"):
            letters = list(outcomes[index][2:])
            for k, letter in enumerate(letters):
                if letter == "n":
                    continue
                letters[k] = "n"
                trial = {**outcomes, index: "t:" + "".join(letters)}
                if set(letters) != {"n"} and attempt(trial):
                    outcomes = trial
                else:
                    letters[k] = letter
    return attrs.evolve(plan, **{field: tuple(sorted(outcomes.items()))})


def run_all(tasks: list[tuple[str, str]], budget: Budget, seed: int, variant: str | None = None, jobs: int = 1,
            executor: Executor | None = None, on_done: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """Run (workload, model) tasks, in this process or on an executor; results in task order.

    With `jobs` > 1 the tasks run on that many forked lanes (`lanes.py`); on
    an executor each task is cut into slices of crash states (`spreadrun.py`);
    the results are the same.
    """
    if executor is None and jobs <= 1:
        results = []
        for w, m in tasks:
            result = run_task(w, m, budget, seed, variant)
            if on_done:
                on_done(result)
            results.append(result)
        return results
    if executor is None:
        from .lanes import run_lanes

        return run_lanes(tasks, budget, seed, variant, jobs, on_done)
    from .spreadrun import run_sliced

    return run_sliced(tasks, budget, seed, variant, executor, on_done)
