"""Persistence models, crash plans and the explorer (parts 2 and 3 of 4).

A persistence model (C2) says which recorded operations may be lost or torn
at a crash:

- `strict`: the disk persists a prefix of the operations, in order.
- `reorder`: any subset of the operations not yet made durable by an fsync of
  their file may persist (persisted ones apply in issue order).
- `torn`: an un-synced pwrite may persist partially, each 512 B sector old,
  new or garbage; `torn4k` does the same per 4 KiB sector.
- `namespace`: create, rename and unlink persist only after an fsync of their
  directory (otherwise any subset of them is lost); without it they are
  durable when they return.

Models combine with `+` (`reorder+torn+namespace`).  A crash state is a
`Plan`: the crash point (how many operations were issued) and the outcome of
each un-synced operation: `k` kept, `d` dropped, or `t:` and one letter per
sector (`o` old, `n` new, `g` garbage derived from the seed).

The explorer (C3) yields plans tier by tier, cheap to thorough, never the
same plan twice:

- `prefix`: crash after every operation, everything issued persisted;
- `targeted`: drop one un-synced op keeping later ones; tear one write in a
  few characteristic ways;
- `subsets`: at the end of every epoch (just before a barrier, where the set
  of un-synced ops is largest, so under `reorder` every earlier crash point
  is one of these subsets), every subset of droppable ops when there are at
  most K (and at most `max_combos` combinations), else a seeded sample of
  stated size; under `torn` each op may also be torn (first sector garbage,
  the rest old), so several writes tear at once;
- `torn`: every old/new/garbage pattern of one write when there are at most
  `torn_cap` patterns, else a seeded sample.
"""
from __future__ import annotations

import hashlib
import itertools
import random
from typing import Iterator

import attrs

from .errors import BadPlan, UnknownModel
from .memstore import DATA_KINDS, FSYNC, FSYNC_DIR, NAMESPACE_KINDS, PWRITE, DiskState, Op

MODEL_FLAGS = ("reorder", "torn", "torn4k", "namespace")
DEFAULT_MODELS = ("strict", "reorder", "torn", "namespace", "reorder+torn+namespace")


@attrs.frozen
class Model:
    """A persistence model: a set of flags; `strict` is the empty set."""

    reorder: bool = False
    torn_unit: int = 0  # 0: no tearing; else 512 or 4096
    namespace: bool = False

    @classmethod
    def parse(cls, text: str) -> "Model":
        flags = set(text.split("+")) - {"strict", ""}
        unknown = flags - set(MODEL_FLAGS)
        if unknown:
            raise UnknownModel(f"unknown persistence model {'+'.join(sorted(unknown))!r}; known: strict, {', '.join(MODEL_FLAGS)}")
        unit = 4096 if "torn4k" in flags else 512 if "torn" in flags else 0
        return cls("reorder" in flags, unit, "namespace" in flags)

    @property
    def name(self) -> str:
        parts = [n for n, on in (("reorder", self.reorder), ("torn", self.torn_unit == 512),
                                 ("torn4k", self.torn_unit == 4096), ("namespace", self.namespace)) if on]
        return "+".join(parts) or "strict"

    def data_pending(self) -> bool:
        return self.reorder or bool(self.torn_unit)


@attrs.frozen
class Plan:
    """One crash state, exactly reproducible: see the module docstring for the outcome letters."""

    workload: str
    model: str
    seed: int
    crash: int
    outcomes: tuple[tuple[int, str], ...] = ()  # (op index, "d" | "t:onng..."), kept ops omitted
    dropped_steps: tuple[int, ...] = ()  # workload steps removed by shrinking
    variant: str | None = None
    recovery_crash: int | None = None  # crash during recovery after this many recovery ops
    recovery_outcomes: tuple[tuple[int, str], ...] = ()
    pending: tuple[int, ...] = ()  # the un-synced ops at the crash point (for printing only)

    def to_string(self) -> str:
        """The plan as a shell-safe string: `crashsim replay` takes it back."""
        parts = []
        if self.variant:
            parts.append(f"v={self.variant}")
        parts.append(f"w={self.workload}")
        if self.dropped_steps:
            parts.append("x=" + ",".join(map(str, self.dropped_steps)))
        parts += [f"m={self.model}", f"s={self.seed}", f"p={self.crash}"]
        changed = dict(self.outcomes)
        listed = self.pending or tuple(sorted(changed))
        if listed:
            parts.append("o=" + ",".join(f"{i}{changed.get(i, 'k')}" for i in listed))
        if self.recovery_crash is not None:
            parts.append(f"rp={self.recovery_crash}")
            if self.recovery_outcomes:
                parts.append("ro=" + ",".join(f"{i}{o}" for i, o in self.recovery_outcomes))
        return "/".join(parts)

    @classmethod
    def parse(cls, text: str) -> "Plan":
        fields: dict[str, str] = {}
        for part in text.strip().split("/"):
            key, sep, value = part.partition("=")
            if not sep or key not in ("v", "w", "x", "m", "s", "p", "o", "rp", "ro"):
                raise BadPlan(f"plan part {part!r} is not one of v=, w=, x=, m=, s=, p=, o=, rp=, ro=")
            fields[key] = value
        if "w" not in fields or "p" not in fields:
            raise BadPlan(f"plan {text!r} lacks w= (workload) or p= (crash point)")
        try:
            def outcomes(value: str) -> tuple[tuple[int, str], ...]:
                out = []
                for item in filter(None, value.split(",")):
                    digits = len(item) - len(item.lstrip("0123456789"))
                    index, outcome = int(item[:digits]), item[digits:]
                    if outcome not in ("k", "d") and not (outcome.startswith("t:") and set(outcome[2:]) <= set("ong")):
                        raise BadPlan(f"outcome {outcome!r} of op {index} is not k, d or t:[ong]*")
                    out.append((index, outcome))
                return tuple(out)

            listed = outcomes(fields.get("o", ""))
            return cls(
                workload=fields["w"], model=fields.get("m", "strict"), seed=int(fields.get("s", "0")),
                crash=int(fields["p"]), outcomes=tuple((i, o) for i, o in listed if o != "k"),
                dropped_steps=tuple(int(x) for x in filter(None, fields.get("x", "").split(","))),
                variant=fields.get("v") or None,
                recovery_crash=int(fields["rp"]) if "rp" in fields else None,
                recovery_outcomes=outcomes(fields.get("ro", "")),
                pending=tuple(i for i, _ in listed),
            )
        except ValueError as exc:
            raise BadPlan(f"plan {text!r}: {exc}") from None


def barrier_of(ops: tuple[Op, ...] | list[Op], model: Model) -> list[int]:
    """For each op, the index of the first later op that makes it durable (len(ops) if none, -1 if durable at once)."""
    n = len(ops)
    out = [n] * n
    next_fsync: dict[object, int] = {}
    next_dir: dict[object, int] = {}
    for i in range(n - 1, -1, -1):
        op = ops[i]
        if op.kind == FSYNC:
            next_fsync[op.target] = i
            out[i] = -1
        elif op.kind == FSYNC_DIR:
            next_dir[op.target] = i
            out[i] = -1
        elif op.kind in DATA_KINDS:
            out[i] = next_fsync.get(op.target, n) if model.data_pending() else -1
        elif op.kind in NAMESPACE_KINDS:
            out[i] = next_dir.get(op.target, n) if model.namespace else -1
        else:
            out[i] = -1
    return out


def pending_at(barriers: list[int], crash: int) -> list[int]:
    """The ops issued before `crash` that no barrier before `crash` made durable."""
    return [i for i in range(crash) if barriers[i] >= crash]


def droppable(op: Op, model: Model) -> bool:
    return op.kind in NAMESPACE_KINDS or model.reorder


def tear_units(op: Op, unit: int) -> list[tuple[int, int]]:
    """(offset, length) of each device sector a write covers, aligned to the file."""
    out = []
    pos, end = op.offset, op.offset + len(op.data)
    while pos < end:
        stop = min(end, (pos // unit + 1) * unit)
        out.append((pos, stop - pos))
        pos = stop
    return out


def garbage(seed: int, index: int, unit: int, length: int) -> bytes:
    """Deterministic garbage for a torn sector: the same plan always yields the same bytes."""
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.blake2b(f"{seed}:{index}:{unit}:{counter}".encode(), digest_size=64).digest()
        counter += 1
    return out[:length]


class Materialiser:
    """Builds the durable state of any plan from prefix checkpoints (copy-on-write)."""

    def __init__(self, base: DiskState, ops: tuple[Op, ...] | list[Op]) -> None:
        self.ops = ops
        self.checkpoints: list[DiskState] = [base]
        state = base.copy()
        for op in ops:
            state.apply(op)
            self.checkpoints.append(state.copy())

    def state(self, crash: int, outcomes: dict[int, str], seed: int, unit: int = 512) -> DiskState:
        if not outcomes:
            return self.checkpoints[crash].copy()
        first = min(outcomes)
        state = self.checkpoints[first].copy()
        ops = self.ops
        for i in range(first, crash):
            outcome = outcomes.get(i)
            if outcome is None:
                state.apply(ops[i])
            elif outcome == "d":
                continue
            else:
                self._apply_torn(state, i, outcome[2:], seed, unit)
        return state

    def _apply_torn(self, state: DiskState, index: int, pattern: str, seed: int, unit: int) -> None:
        op = self.ops[index]
        units = tear_units(op, unit)
        if len(pattern) != len(units):
            raise BadPlan(f"torn pattern of op {index} has {len(pattern)} letters; the write covers {len(units)} sectors")
        for k, ((offset, length), letter) in enumerate(zip(units, pattern)):
            if letter == "o":
                continue
            rel = offset - op.offset
            data = op.data[rel : rel + length] if letter == "n" else garbage(seed, index, k, length)
            state.apply(Op(PWRITE, op.target, offset, length, data))


def _alternatives(op: Op, model: Model) -> list[str]:
    """What else than `k` an un-synced op may do in the subsets tier: be lost, or torn.

    The tear is garbage in the first sector and old bytes after it: a copy
    whose new version differs from the old one only in its first sector
    would otherwise tear into a whole old or whole new copy.
    """
    out = ["d"] if droppable(op, model) else []
    if model.torn_unit and op.kind == PWRITE:
        count = len(tear_units(op, model.torn_unit))
        if not out:
            out.append("t:" + "o" * count)  # lost whole: a tear with every sector old
        out.append("t:g" + "o" * (count - 1))
    return out


def _targeted_tears(count: int) -> list[str]:
    if count < 2:
        return ["g"] if count == 1 else []
    patterns = ["n" + "o" * (count - 1), "o" * (count - 1) + "n", "o" + "n" * (count - 1), "n" * (count - 1) + "o",
                "".join("no"[k % 2] for k in range(count)), "g" + "n" * (count - 1)]
    return list(dict.fromkeys(patterns))


@attrs.frozen
class Budget:
    """How thorough an exploration is: the K of exhaustive subsets and the sample sizes beyond it."""

    max_subset: int = 6
    max_combos: int = 729  # exhaustive subsets (with tears: combinations) up to this many per crash point
    subset_samples: int = 32
    torn_cap: int = 81  # exhaustive tear patterns up to this many (3^4)
    torn_samples: int = 16
    recovery_images: int = 8  # distinct crashed images whose recovery is itself crashed


def explore(ops: tuple[Op, ...], model: Model, budget: Budget, seed: int) -> Iterator[tuple[str, int, dict[int, str], bool]]:
    """Yield (tier, crash point, outcomes, exhaustive) for every state to check, each once."""
    n = len(ops)
    barriers = barrier_of(ops, model)
    seen: set[tuple] = set()
    rng = random.Random(seed)

    def fresh(crash: int, outcomes: dict[int, str]) -> bool:
        key = (crash, tuple(sorted(outcomes.items())))
        if key in seen:
            return False
        seen.add(key)
        return True

    for crash in range(n + 1):
        if fresh(crash, {}):
            yield "prefix", crash, {}, True
    unit = model.torn_unit
    pendings = [pending_at(barriers, c) for c in range(n + 1)]
    for crash in range(n + 1):
        for i in pendings[crash]:
            op = ops[i]
            candidates = []
            if droppable(op, model):
                candidates.append({i: "d"})
            if unit and op.kind == PWRITE:
                candidates += [{i: "t:" + p} for p in _targeted_tears(len(tear_units(op, unit)))]
            for outcomes in candidates:
                if fresh(crash, outcomes):
                    yield "targeted", crash, outcomes, True
    epoch_ends = [c for c in range(1, n + 1) if c == n or ops[c].kind in (FSYNC, FSYNC_DIR)]
    for crash in epoch_ends:
        choices = []
        for i in pendings[crash]:
            alternatives = _alternatives(ops[i], model)
            if alternatives:
                choices.append((i, alternatives))
        if not choices:
            continue
        combos = 1
        for _, alternatives in choices:
            combos *= 1 + len(alternatives)
        if len(choices) <= budget.max_subset and combos <= budget.max_combos:
            for picked in itertools.product(*[["k", *alts] for _, alts in choices]):
                outcomes = {i: o for (i, _), o in zip(choices, picked) if o != "k"}
                if len(outcomes) >= 2 and fresh(crash, outcomes):
                    yield "subsets", crash, outcomes, True
        else:
            for _ in range(budget.subset_samples):
                outcomes = {i: rng.choice(alts) for i, alts in choices if rng.random() < 0.5}
                if fresh(crash, outcomes):
                    yield "subsets", crash, outcomes, False
    if unit:
        for crash in epoch_ends:
            for i in pendings[crash]:
                op = ops[i]
                if op.kind != PWRITE:
                    continue
                count = len(tear_units(op, unit))
                if 3 ** count <= budget.torn_cap:
                    patterns = ("".join(p) for p in itertools.product("ong", repeat=count))
                    exhaustive = True
                else:
                    patterns = ("".join(rng.choice("ong") for _ in range(count)) for _ in range(budget.torn_samples))
                    exhaustive = False
                for p in patterns:
                    if set(p) == {"n"}:
                        continue
                    outcomes = {i: "t:" + p}
                    if fresh(crash, outcomes):
                        yield "torn", crash, outcomes, exhaustive
