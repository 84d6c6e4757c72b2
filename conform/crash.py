"""The `crash` category: crash states of recorded workloads, each with the guest contents a reader may see there.

A workload of crashsim's library (`crashsim/workloads.py`) is recorded on
the memory backend (`crashsim/record.py`) with fixed identities; its crash
states are enumerated under a stated persistence model (`crashsim/explore.py`)
and judged by crashsim's oracle (`crashsim/oracle.py`).  Each distinct
state (by the bytes of its image file) becomes a vector: the image file as
the crash left it (sparse), the trace file of the whole recorded sequence
(crashsim-trace format, `crashsim/tracefile.py`; the same file hard-linked
into every state of the workload) and, in expect.json, the state's plan,
the read-only check verdict, and the allowed outcomes.

An outcome is one legal whole state (a virtual size, and per range the
digests it may have): a sector written after the last acknowledged flush may
read its old or its new value (a range of its own listing both), a sector a
torn write filled with garbage may also read that garbage; resizes after the
flush happened in order, all or none, so each prefix of them is one outcome.
A reader's dump passes when it matches one outcome in every range.
"""
from __future__ import annotations

import os

import attrs

from lamina.crashsim.explore import Budget, Model, Plan, explore
from lamina.crashsim.memstore import BLOCK, FileData, Op
from lamina.crashsim.oracle import open_state, judge
from lamina.crashsim.record import IMAGE_PATH, Recording, record_workload
from lamina.crashsim.runner import Explorer
from lamina.crashsim.syscalls import ROOT
from lamina.crashsim.tracefile import TraceFile, encode
from lamina.crashsim.workloads import get_workload
from lamina.impl.identity import fixed_identities

from .build import new_vector, reference_check, reference_view
from .errors import GenerationError
from .views import outcome_view

TRACE_NAME = "sequence.trace"
TRACE_IMAGE = f"{ROOT}/disk.lam"  # the image's name in the trace file: crashsim's simulated directory


@attrs.frozen
class CrashSet:
    """One recorded workload, the model its states are taken under, and how many distinct states to keep."""

    workload: str
    model: str
    keep: int
    budget: Budget = Budget(max_subset=4, max_combos=81, subset_samples=8, torn_cap=27, torn_samples=4)
    seed: int = 0


CRASH_SETS = (
    CrashSet("overwrite", "reorder+torn", 12),
    CrashSet("resize", "reorder", 8),
)


def trace_of(rec: Recording) -> TraceFile:
    """The recording as a crashsim trace file, its image renamed into the trace format's simulated directory."""
    base = rec.base.copy()
    base.names = {TRACE_IMAGE if p == IMAGE_PATH else p: i for p, i in base.names.items()}
    ops: tuple[Op, ...] = rec.ops
    if any(op.path or op.path2 for op in ops):
        raise GenerationError(f"{rec.workload.name}: names change in the recorded sequence; only data ops are kept")
    return TraceFile(("lamina-conform-record", rec.workload.name), base, ops)


def write_sparse_file(path: str, data: FileData) -> None:
    """The file's blocks written, everything else a hole."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for index, block in sorted(data.blocks.items()):
            if index * BLOCK < data.size and any(block):
                os.pwrite(fd, block[: data.size - index * BLOCK], index * BLOCK)
        os.ftruncate(fd, data.size)
    finally:
        os.close(fd)


def _spread(items: list, keep: int) -> list:
    """`keep` items evenly spread over the list (the first and the last included), in order."""
    if len(items) <= keep:
        return items
    step = (len(items) - 1) / (keep - 1)
    return [items[round(k * step)] for k in range(keep)]


def generate(root: str) -> None:
    for crash_set in CRASH_SETS:
        generate_set(root, crash_set)


def generate_set(root: str, crash_set: CrashSet) -> None:
    workload = get_workload(crash_set.workload)
    model = Model.parse(crash_set.model)
    with fixed_identities(f"lamina-conform/crash/{workload.name}"):
        rec = record_workload(workload)
    explorer = Explorer(rec, model, crash_set.seed)
    unit = model.torn_unit or 512
    states: dict[tuple, tuple[str, int, dict[int, str]]] = {}
    for tier, crash, outcomes, _ in explore(rec.ops, model, crash_set.budget, crash_set.seed):
        state = explorer.state(crash, outcomes)
        if IMAGE_PATH not in state.names:
            continue
        states.setdefault(state.files[state.names[IMAGE_PATH]].key(), (tier, crash, outcomes))
    chosen = _spread(list(states.values()), crash_set.keep)
    trace_bytes = encode(trace_of(rec))
    first_trace: str | None = None
    for tier, crash, outcomes in chosen:
        plan = Plan(workload.name, model.name, crash_set.seed, crash, tuple(sorted(outcomes.items())))
        state = explorer.state(crash, outcomes)
        verdict = judge(open_state(state.copy(), None), explorer.legal(crash), dict(explorer.garbage_sectors(outcomes)))
        if verdict is not None:
            raise GenerationError(f"crash state {plan.to_string()}: crashsim's oracle fails it: {verdict}")
        name = f"{workload.name}-p{crash}-" + (
            "-".join(f"{i}{o[:1]}{o[2:] if o.startswith('t:') else ''}" for i, o in sorted(outcomes.items())) or "prefix")
        description = (f"{workload.doc}: crash after {crash} of {len(rec.ops)} storage operations under the "
                       f"{model.name} model ({tier} tier)")
        with new_vector(root, "crash", name, description, ["dump", "check"],
                        ["F-PROTO-001", "F-PROTO-002", "F-PROTO-003", "F-CHECK-002"]) as v:
            write_sparse_file("disk.lam", state.files[state.names[IMAGE_PATH]])
            if first_trace is None:
                with open(TRACE_NAME, "wb") as fh:
                    fh.write(trace_bytes)
                first_trace = os.path.abspath(TRACE_NAME)
            else:
                os.link(first_trace, TRACE_NAME)
            legal = explorer.legal(crash)
            garbage = dict(explorer.garbage_sectors(outcomes))
            allowed = []
            for outcome in legal.outcomes:
                alternatives = {s: set(vals) for s, vals in outcome.alternatives.items()}
                for sector, value in garbage.items():
                    alternatives.setdefault(sector, set()).add(value)
                allowed.append(outcome_view(outcome.size, outcome.flushed, alternatives))
            verdict = reference_check("disk.lam")
            if verdict["exit"] not in (0, 3):
                raise GenerationError(f"crash state {plan.to_string()}: the read-only check finds corruption {verdict}")
            read = reference_view("disk.lam")
            if not any(_matches(read, o) for o in allowed):
                raise GenerationError(f"crash state {plan.to_string()}: the reference's read-only view is no allowed outcome")
            v.expect.update({
                "image": "disk.lam",
                "check": verdict,
                "outcomes": allowed,
                "crash": {"trace": TRACE_NAME, "trace_image": TRACE_IMAGE, "plan": plan.to_string(),
                          "model": model.name, "tier": tier, "crash_point": crash, "ops": len(rec.ops),
                          "seed": crash_set.seed, "torn_unit": unit,
                          "outcomes": {str(i): o for i, o in sorted(outcomes.items())}},
            })


def _matches(view: dict, outcome: dict) -> bool:
    if view["disk_size"] != outcome["disk_size"]:
        return False
    digests = {(o, n): d for o, n, d in view["ranges"]}
    for offset, length, allowed in outcome["ranges"]:
        got = digests.get((offset, length))
        if got is None:  # a sector range inside a 64 KiB chunk: compare through the reader's bytes instead
            return _matches_by_bytes(view["name"], outcome)
        if got not in allowed:
            return False
    return True


def _matches_by_bytes(target: str, outcome: dict) -> bool:
    from lamina.impl.layers import open_target

    from .views import digest

    with open_target(target, readonly=True, force_share=True) as image:
        return all(digest(image.read(o, n)) in allowed for o, n, allowed in outcome["ranges"])

