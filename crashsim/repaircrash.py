"""Crashes during repair (R5 "... repair itself", R7; C3-C5): `crashsim inject --crash-repair`.

For every metadata fault `crashsim inject` applies (every fault kind on every
root and map copy of a workload's cleanly closed image), the repair itself
(`spec.repair.repair_image` on the file, or `spec.tree.repair_tree` on the
top path, which is what `lamina check --repair` runs) is recorded on the
simulated storage, with the faulted image as its durable starting state.
The explorer's tiers and persistence models (`explore.py`) then crash the
repair at every point, and each crash state is followed up in two ways:

- `repair`: run the repair again;
- `open`: open the image writable (recovery) and read it, close it, then repair.

Before either, the spec's check of the crash state itself, read-only (on
storage that refuses every change), must report no corruption: a single
fault and a crashed repair leave at most degraded copies, leaks and pending
work.  Either way the result must be clean (`check` exit 0, no finding at all),
must read exactly the committed guest contents (the workload model after its
final close, which is everything flushed), and must equal the result of the
uninterrupted repair (idempotence): the same guest contents and the same root
up to its generation.  The writable open must also read the committed contents
before any repair.  The uninterrupted repair is judged the same way, and the
repair of its own result is the `prefix` state after the last op.

The damaged copy was already bad before the repair started, so no crash
state is allowed to lose anything: a torn write of the copy being rewritten
leaves a bad copy beside a good twin, which the next repair mends again.

A crash state prints as a plan `crashsim replay` takes back:

    v=repair-good-copy-first/w=overwrite/f=17/r=image/a=repair/m=torn/s=0/p=2/o=0t:goo,1t:oooo

`f` the number of the fault in the workload's enumeration of metadata faults
(`crashsim inject --crash-repair --list-faults WORKLOAD` names them), `r` the
repair run (`image` or `tree`), `a` the follow-up (`repair` or `open`),
`v` a broken repair (negative control); `w`, `m`, `s`, `p`, `o` as for
guest I/O plans, over the ops of the repair.
"""
from __future__ import annotations

import time
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Callable, Iterator

import attrs

from lamina.impl.image import Image
from lamina.spec.abstraction import abstract_image
from lamina.spec.check import CheckReport, check_image
from lamina.spec.errors import LaminaError
from lamina.spec.layout import ROOT_SLOT_SIZE, SECTOR_SIZE, ZERO_SECTOR, root_copy_offset
from lamina.spec.protocol import read_root_copies
from lamina.spec.repair import repair_image
from lamina.spec.replication import select_root
from lamina.spec.tree import check_tree, repair_tree

from .errors import BadPlan, CrashsimError
from .explore import Budget, Materialiser, Model, barrier_of, explore, pending_at
from .inject import Fault, metadata_faults
from .memstore import DiskState, MemStorage, Op, ReadOnlyStorage, Trace
from .oracle import read_only_verdict
from .record import IMAGE_PATH
from .runner import PrecheckTally, check_fits, minimize_outcomes

REPAIR_MODELS = ("strict", "reorder", "torn", "reorder+torn")
REPAIR_TIERS = ("prefix", "targeted", "subsets", "torn")
REPAIRERS = ("image", "tree")
FOLLOW_UPS = ("repair", "open")
# Repair traces are short (a few writes and fsyncs); the bounds keep sampled tiers small and every run reproducible.
REPAIR_BUDGET = Budget(max_subset=4, max_combos=81, subset_samples=8, torn_cap=27, torn_samples=8)


class UnknownRepairControl(CrashsimError):
    """No broken repair of that name exists (exit code 6)."""

    exit_code = 6


# ------------------------------------------------------------------ broken repairs (negative controls)
class _BrokenRepairFile:
    """A File whose every write to the start of a root or map copy first does one forbidden thing to the twin copy.

    Built around the real repair (it wraps the file the real `repair_image`
    writes through), so it follows the spec as it evolves and differs from it
    only in that step; the uninterrupted repair still ends with the right bytes.
    """

    def __init__(self, file, how: str) -> None:
        self._file = file
        self._how = how
        self._twins: dict[int, tuple[int, int]] | None = None

    def _twin_of(self, offset: int) -> tuple[int, int] | None:
        if self._twins is None:
            twins = {root_copy_offset(s): (root_copy_offset(1 - s), ROOT_SLOT_SIZE) for s in (0, 1)}
            root = select_root(read_root_copies(self._file)).value
            if root is not None:
                g = root.geometry
                for region in range(g.num_regions):
                    for s in (0, 1):
                        twins[g.map_copy_offset(region, s)] = (g.map_copy_offset(region, 1 - s), g.map_used_length)
            self._twins = twins
        return self._twins.get(offset)

    def pwrite(self, offset: int, data: bytes) -> None:
        twin = self._twin_of(offset)
        if twin is None:
            return self._file.pwrite(offset, data)
        other, length = twin
        if self._how == "punch":
            # "Clear the pair, then write both": punches the good twin before the damaged copy is rewritten.
            saved = self._file.pread(other, length)
            self._file.punch_hole(other, length)
            self._file.pwrite(offset, data)
            self._file.pwrite(other, saved)
        else:
            # "Refresh the good copy first": rewrites the twin in place, with no fsync before the damaged copy.
            self._file.pwrite(other, self._file.pread(other, len(data)))
            self._file.pwrite(offset, data)

    def __getattr__(self, name: str):
        return getattr(self._file, name)


class _BrokenRepairStorage:
    """A Storage whose writable files are `_BrokenRepairFile`s (for `repair_tree`)."""

    def __init__(self, storage, how: str) -> None:
        self._storage = storage
        self._how = how

    def open(self, path: str, writable: bool, follow_symlinks: bool = False):
        file = self._storage.open(path, writable, follow_symlinks)
        return _BrokenRepairFile(file, self._how) if writable else file

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


@attrs.frozen
class RepairControl:
    name: str
    breaks: str
    model: str  # the persistence model that must catch it
    workload: str
    how: str


REPAIR_CONTROLS: dict[str, RepairControl] = {c.name: c for c in [
    RepairControl("repair-punch-before-copy", "never touch the only good copy: this one punches the good twin, "
                  "writes the damaged copy, then writes the twin back", "strict", "overwrite", "punch"),
    RepairControl("repair-good-copy-first", "one write then an fsync: this one rewrites the good twin in place "
                  "(same bytes) just before the damaged copy, with no fsync between", "torn", "overwrite", "rewrite"),
]}


def get_repair_control(name: str) -> RepairControl:
    if name not in REPAIR_CONTROLS:
        raise UnknownRepairControl(f"no broken repair named {name!r}; known: {', '.join(REPAIR_CONTROLS)}")
    return REPAIR_CONTROLS[name]


def run_repair(storage: MemStorage, repairer: str, control: str | None = None) -> None:
    """The repair under test, on the simulated storage: `repair_image` of the file or `repair_tree` of the top."""
    how = get_repair_control(control).how if control else None
    if repairer == "tree":
        repair_tree(IMAGE_PATH, _BrokenRepairStorage(storage, how) if how else storage)
        return
    file = storage.open(IMAGE_PATH, writable=True)
    try:
        repair_image(_BrokenRepairFile(file, how) if how else file)
    finally:
        file.close()


def _check(storage: MemStorage, repairer: str) -> CheckReport:
    if repairer == "tree":
        return check_tree(IMAGE_PATH, storage)
    file = storage.open(IMAGE_PATH, writable=False)
    try:
        return check_image(file)
    finally:
        file.close()


# ------------------------------------------------------------------ plans
@attrs.frozen
class RepairPlan:
    """One crash state of one repair, exactly reproducible."""

    workload: str
    fault: int
    model: str
    seed: int
    crash: int
    outcomes: tuple[tuple[int, str], ...] = ()
    after: str = "repair"
    repairer: str = "image"
    variant: str | None = None
    pending: tuple[int, ...] = ()  # for printing only

    def to_string(self) -> str:
        parts = [f"v={self.variant}"] if self.variant else []
        parts += [f"w={self.workload}", f"f={self.fault}", f"r={self.repairer}", f"a={self.after}",
                  f"m={self.model}", f"s={self.seed}", f"p={self.crash}"]
        changed = dict(self.outcomes)
        listed = self.pending or tuple(sorted(changed))
        if listed:
            parts.append("o=" + ",".join(f"{i}{changed.get(i, 'k')}" for i in listed))
        return "/".join(parts)

    @staticmethod
    def is_repair_plan(text: str) -> bool:
        return any(part.startswith("f=") for part in text.strip().split("/"))

    @classmethod
    def parse(cls, text: str) -> "RepairPlan":
        fields: dict[str, str] = {}
        for part in text.strip().split("/"):
            key, sep, value = part.partition("=")
            if not sep or key not in ("v", "w", "f", "r", "a", "m", "s", "p", "o"):
                raise BadPlan(f"repair plan part {part!r} is not one of v=, w=, f=, r=, a=, m=, s=, p=, o=")
            fields[key] = value
        for key in ("w", "f", "p"):
            if key not in fields:
                raise BadPlan(f"repair plan {text!r} lacks {key}=")
        if fields.get("r", "image") not in REPAIRERS or fields.get("a", "repair") not in FOLLOW_UPS:
            raise BadPlan(f"repair plan {text!r}: r= is one of {', '.join(REPAIRERS)}, a= one of {', '.join(FOLLOW_UPS)}")
        try:
            listed = []
            for item in filter(None, fields.get("o", "").split(",")):
                digits = len(item) - len(item.lstrip("0123456789"))
                index, outcome = int(item[:digits]), item[digits:]
                if outcome not in ("k", "d") and not (outcome.startswith("t:") and set(outcome[2:]) <= set("ong")):
                    raise BadPlan(f"outcome {outcome!r} of op {index} is not k, d or t:[ong]*")
                listed.append((index, outcome))
            return cls(fields["w"], int(fields["f"]), fields.get("m", "strict"), int(fields.get("s", "0")), int(fields["p"]),
                       tuple((i, o) for i, o in listed if o != "k"), fields.get("a", "repair"), fields.get("r", "image"),
                       fields.get("v") or None, tuple(i for i, _ in listed))
        except ValueError as exc:
            raise BadPlan(f"repair plan {text!r}: {exc}") from None


# ------------------------------------------------------------------ one fault's repair
@attrs.frozen
class RepairFailure:
    plan: str
    message: str
    tier: str
    fault: str  # e.g. "bitflip in map copy A of region 0"


@attrs.frozen
class RepairCrashResult(PrecheckTally):
    """Counts of one (workload, model) exploration of crashes during repair."""

    workload: str
    model: str
    repairer: str
    variant: str | None
    seed: int
    faults: int
    repair_ops: int  # ops recorded by all uninterrupted repairs together
    counts: dict[str, dict[str, dict[str, int]]]  # region kind -> fault kind -> tier -> crash states
    failing: dict[str, dict[str, dict[str, int]]]  # same shape, failing states only
    exhaustive: dict[str, bool]
    identical: int  # follow-ups whose result is byte-identical to the uninterrupted repair's
    follow_ups: int
    failures: tuple[RepairFailure, ...]
    seconds: float
    prechecks: dict[str, int] = attrs.field(factory=dict)  # exit code of the read-only check of each crash state -> states

    @property
    def states(self) -> int:
        return sum(n for kinds in self.counts.values() for tiers in kinds.values() for n in tiers.values())

    @property
    def failing_states(self) -> int:
        return sum(n for kinds in self.failing.values() for tiers in kinds.values() for n in tiers.values())


@attrs.frozen
class Expected:
    """What every repair of a fault must end with."""

    virtual_size: int
    sectors: dict[int, bytes]  # non-zero sectors of the committed guest contents
    contents: bytes  # the committed guest contents as one byte string
    root: object  # the uninterrupted repair's root, generation, slot and CRC cleared
    state_key: tuple | None  # the uninterrupted repair's durable bytes


def _root_meaning(storage: MemStorage) -> object:
    file = storage.open(IMAGE_PATH, writable=False)
    root = select_root(read_root_copies(file)).value
    return None if root is None else attrs.evolve(root, slot=0, crc=0, generation=0)


def follow_up(state: DiskState, after: str, repairer: str, control: str | None,
              expected: Expected) -> tuple[str | None, bool, object, tuple]:
    """Follow a crash state up (`after`), judge the result; (failure or None, byte-identical, root meaning, state key)."""
    storage = MemStorage(state.copy())
    size, committed = expected.virtual_size, expected.sectors
    what = "the repair run again" if after == "repair" else "a writable open, then the repair,"
    try:
        if after == "open":
            image = Image.open(IMAGE_PATH, storage=storage)
            try:
                if image.virtual_size != size or image.read(0, size) != expected.contents:
                    return ("after a crash during repair, a writable open (recovery) reads other guest contents than the committed ones",
                            False, None, ())
            finally:
                image.close()
        run_repair(storage, repairer, control)
        report = _check(storage, repairer)
        if report.exit_code != 0 or report.findings:
            kinds = ", ".join(f"{f.severity}:{f.kind}" for f in report.findings)
            first = report.findings[0].message if report.findings else "check did not complete"
            return f"after {what} check exits {report.exit_code} ({kinds}): {first}", False, None, ()
        file = storage.open(IMAGE_PATH, writable=False)
        disk = abstract_image(file)
    except LaminaError as exc:
        return f"{what} failed: {type(exc).__name__}: {exc}", False, None, ()
    except Exception as exc:  # noqa: BLE001 - an implementation crash is a finding, not a simulator error
        return f"{what} crashed: {type(exc).__name__}: {exc}", False, None, ()
    if disk.virtual_size != size:
        return f"after {what} the virtual size is {disk.virtual_size}, committed {size}", False, None, ()
    actual = {s: v for s, v in disk.sectors.items() if v != ZERO_SECTOR}
    for sector in sorted(set(actual) | set(committed)):
        if actual.get(sector, ZERO_SECTOR) != committed.get(sector, ZERO_SECTOR):
            return (f"after {what} guest sector {sector} (offset {sector * SECTOR_SIZE}) reads "
                    f"{actual.get(sector, ZERO_SECTOR)[:8].hex()}..., committed {committed.get(sector, ZERO_SECTOR)[:8].hex()}...",
                    False, None, ())
    root = _root_meaning(storage)
    key = storage.state.key()
    if expected.root is not None and root != expected.root:
        return (f"after {what} the root differs from the uninterrupted repair's in more than its generation "
                "(the repair is not idempotent)", False, root, key)
    return None, key == expected.state_key, root, key


def _faulted(clean: DiskState, fault: Fault) -> DiskState:
    state = clean.copy()
    inode = state.names[IMAGE_PATH]
    for offset, raw in fault.writes:
        state.files[inode].pwrite(offset, raw)
    return state


def record_repair(faulted: DiskState, repairer: str, control: str | None) -> tuple[Op, ...]:
    """The storage ops of the uninterrupted repair of a faulted image."""
    trace = Trace()
    storage = MemStorage(faulted.copy(), trace)
    try:
        run_repair(storage, repairer, control)
    except Exception:  # noqa: BLE001 - judged by follow_up of the uncrashed state; keep what was recorded
        pass
    return tuple(trace.ops)


class FaultRepair:
    """The recorded repair of one fault and the judge of its crash states."""

    def __init__(self, workload: str, fault: Fault, clean: DiskState, size: int, committed: dict[int, bytes],
                 contents: bytes, model: Model, seed: int, repairer: str, control: str | None) -> None:
        self.workload, self.fault, self.model, self.seed = workload, fault, model, seed
        self.repairer, self.control = repairer, control
        self.size, self.committed = size, committed
        self.faulted = _faulted(clean, fault)
        self.ops = record_repair(self.faulted, repairer, control)
        self.materialiser = Materialiser(self.faulted, self.ops)
        self.barriers = barrier_of(self.ops, model)
        provisional = Expected(size, committed, contents, None, None)
        message, _, root, key = follow_up(self.faulted, "repair", repairer, control, provisional)
        self.uninterrupted_problem = message
        self.expected = attrs.evolve(provisional, root=root, state_key=key)
        self._memo: dict[tuple, tuple[str | None, bool]] = {}
        self._prechecks: dict[tuple, tuple[int, str | None]] = {}

    def precheck(self, state: DiskState) -> tuple[int, str | None]:
        """The spec's check of a crash state, read-only and before any follow-up: (exit code, corruption or None)."""
        key = state.key()
        if key not in self._prechecks:
            try:
                report = _check(ReadOnlyStorage(MemStorage(state)), self.repairer)  # type: ignore[arg-type]
                self._prechecks[key] = read_only_verdict([(IMAGE_PATH, report)])
            except Exception as exc:  # noqa: BLE001 - check must never raise for a damaged image
                self._prechecks[key] = (1, f"read-only check before the follow-up raised {type(exc).__name__}: {exc}")
        return self._prechecks[key]

    def state(self, crash: int, outcomes: dict[int, str]) -> DiskState:
        return self.materialiser.state(crash, outcomes, self.seed, self.model.torn_unit or 512)

    def judge(self, crash: int, outcomes: dict[int, str], after: str) -> tuple[str | None, bool]:
        state = self.state(crash, outcomes)
        memo = (state.key(), after)
        if memo not in self._memo:
            corrupt = self.precheck(state)[1]
            if corrupt:
                self._memo[memo] = (corrupt, False)
            else:
                message, identical, _, _ = follow_up(state, after, self.repairer, self.control, self.expected)
                self._memo[memo] = (message, identical)
        return self._memo[memo]

    def plan(self, crash: int, outcomes: dict[int, str], after: str) -> RepairPlan:
        return RepairPlan(self.workload, self.fault.number, self.model.name, self.seed, crash, tuple(sorted(outcomes.items())),
                          after, self.repairer, self.control, tuple(pending_at(self.barriers, crash)))

    def states(self, budget: Budget) -> Iterator[tuple[str, int, dict[int, str], bool]]:
        return explore(self.ops, self.model, budget, self.seed)


# ------------------------------------------------------------------ exploration
def crash_repair_task(workload: str, model_name: str, budget: Budget = REPAIR_BUDGET, seed: int = 0, repairer: str = "image",
                      control: str | None = None, follow_ups: tuple[str, ...] = FOLLOW_UPS, stop_at_first: bool = False,
                      fault_filter: Callable[[Fault], bool] | None = None, max_reported: int = 5,
                      shrink: bool = True) -> RepairCrashResult:
    """Crash the repair of every metadata fault of one workload under one model; follow every state up."""
    started = time.perf_counter()
    if repairer not in REPAIRERS:
        raise CrashsimError(f"unknown repairer {repairer!r}; known: {', '.join(REPAIRERS)}")
    if control:
        get_repair_control(control)
    model = Model.parse(model_name)
    rec, clean, size, contents, faults = metadata_faults(workload, seed)
    committed = {s: v for s, v in rec.events[-1].disk.sectors.items() if v != ZERO_SECTOR}
    counts: dict[str, dict[str, dict[str, int]]] = {}
    failing: dict[str, dict[str, dict[str, int]]] = {}
    exhaustive: dict[str, bool] = {}
    failures: list[RepairFailure] = []
    identical = follow_count = repair_ops = 0
    used = 0
    prechecks: dict[str, int] = {}
    for fault in faults:
        if fault_filter and not fault_filter(fault):
            continue
        used += 1
        fr = FaultRepair(workload, fault, clean, size, committed, contents, model, seed, repairer, control)
        repair_ops += len(fr.ops)
        region, kind = fault.place.kind, fault.kind
        if fr.uninterrupted_problem:
            row = failing.setdefault(region, {}).setdefault(kind, {})
            row["uninterrupted"] = row.get("uninterrupted", 0) + 1
            counts.setdefault(region, {}).setdefault(kind, {}).setdefault("uninterrupted", 0)
            counts[region][kind]["uninterrupted"] += 1
            if len(failures) < max_reported:
                failures.append(RepairFailure(fr.plan(0, {}, "repair").to_string(),
                                              "the uninterrupted repair: " + fr.uninterrupted_problem, "uninterrupted", fault.name))
            if stop_at_first:
                break
            continue
        stop = False
        for tier, crash, outcomes, exact in fr.states(budget):
            exhaustive[tier] = exhaustive.get(tier, True) and exact
            row = counts.setdefault(region, {}).setdefault(kind, {})
            row[tier] = row.get(tier, 0) + 1
            code = str(fr.precheck(fr.state(crash, outcomes))[0])
            prechecks[code] = prechecks.get(code, 0) + 1
            bad = None
            for after in follow_ups:
                message, same = fr.judge(crash, outcomes, after)
                follow_count += 1
                identical += same
                if message and bad is None:
                    bad = (after, message)
            if bad is None:
                continue
            frow = failing.setdefault(region, {}).setdefault(kind, {})
            frow[tier] = frow.get(tier, 0) + 1
            if len(failures) < max_reported:
                failures.append(RepairFailure(fr.plan(crash, outcomes, bad[0]).to_string(), bad[1], tier, fault.name))
            if stop_at_first:
                stop = True
                break
        if stop:
            break
    if failures and shrink and failures[0].tier != "uninterrupted":
        first = failures[0]
        small = shrink_repair_plan(RepairPlan.parse(first.plan))
        failures[0] = attrs.evolve(first, plan=small.to_string(), message=replay_repair(small)[1] or first.message)
    return RepairCrashResult(workload, model.name, repairer, control, seed, used, repair_ops, counts, failing, exhaustive,
                             identical, follow_count, tuple(failures), time.perf_counter() - started, prechecks)


def run_crash_repair(workloads: list[str], models: list[str], budget: Budget = REPAIR_BUDGET, seed: int = 0,
                     repairer: str = "image", control: str | None = None, jobs: int = 1,
                     on_done: Callable[[RepairCrashResult], None] | None = None,
                     follow_ups: tuple[str, ...] = FOLLOW_UPS, executor: Executor | None = None) -> list[RepairCrashResult]:
    """Every (workload, model) task, in this process, or in slices of faults on a pool of `jobs` or on `executor`.

    The results come in task order and equal this process's (`spreadrepair`).
    """
    tasks = [(w, m) for w in workloads for m in models]
    if executor is None and jobs <= 1:
        results = []
        for w, m in tasks:
            results.append(crash_repair_task(w, m, budget, seed, repairer, control, follow_ups))
            if on_done:
                on_done(results[-1])
        return results
    from .spreadrepair import run_spread

    own = executor is None
    pool = executor or ProcessPoolExecutor(max_workers=jobs)
    try:
        return run_spread(pool, tasks, budget, seed, repairer, control, follow_ups, on_done)
    finally:
        if own:
            pool.shutdown()


# ------------------------------------------------------------------ replay and shrinking
def _fault_repair(plan: RepairPlan) -> FaultRepair:
    if plan.variant:
        get_repair_control(plan.variant)
    rec, clean, size, contents, faults = metadata_faults(plan.workload, plan.seed)
    if not 0 <= plan.fault < len(faults):
        raise BadPlan(f"fault {plan.fault} is not one of the {len(faults)} metadata faults of workload {plan.workload}")
    committed = {s: v for s, v in rec.events[-1].disk.sectors.items() if v != ZERO_SECTOR}
    return FaultRepair(plan.workload, faults[plan.fault], clean, size, committed, contents, Model.parse(plan.model),
                       plan.seed, plan.repairer, plan.variant)


def replay_repair(plan: RepairPlan, fr: FaultRepair | None = None) -> tuple[FaultRepair, str | None]:
    """Re-run exactly the state a repair plan names; (the fault's recorded repair, failure or None)."""
    fr = fr or _fault_repair(plan)
    if fr.uninterrupted_problem:
        return fr, "the uninterrupted repair: " + fr.uninterrupted_problem
    check_fits(tuple(fr.ops), fr.model, plan.crash, dict(plan.outcomes), f"the repair of fault {plan.fault}: ")
    return fr, fr.judge(plan.crash, dict(plan.outcomes), plan.after)[0]


def shrink_repair_plan(plan: RepairPlan) -> RepairPlan:
    """Fewer deviating outcomes, torn sectors made new where the failure stays; then the earliest failing crash point."""
    fr = _fault_repair(plan)

    plan = minimize_outcomes(plan, lambda p: replay_repair(p, fr)[1] is not None)  # a plan that does not fit is skipped
    return attrs.evolve(plan, pending=tuple(pending_at(fr.barriers, plan.crash)))


def list_faults(workload: str, seed: int = 0) -> list[str]:
    return [f"f={f.number}: {f.name}" for f in metadata_faults(workload, seed)[4]]


def totals(results: list[RepairCrashResult]) -> dict[str, dict[str, dict[str, dict[str, list[int]]]]]:
    """region kind -> fault kind -> model -> tier -> [states, failing], summed over workloads."""
    out: dict = {}
    for r in results:
        for region, kinds in r.counts.items():
            for kind, tiers in kinds.items():
                for tier, n in tiers.items():
                    cell = out.setdefault(region, {}).setdefault(kind, {}).setdefault(r.model, {}).setdefault(tier, [0, 0])
                    cell[0] += n
                    cell[1] += r.failing.get(region, {}).get(kind, {}).get(tier, 0)
    return out


def result_json(r: RepairCrashResult) -> dict:
    return {**attrs.asdict(r, filter=lambda a, v: a.name != "failures"), "states": r.states, "failing_states": r.failing_states,
            "prechecked": r.prechecked, "precheck_corrupt": r.precheck_corrupt,
            "failures": [{"plan": f.plan, "message": f.message, "tier": f.tier, "fault": f.fault,
                          "replay": f"crashsim replay {f.plan}"} for f in r.failures]}
