"""Crash refinement of the commit protocol for one replicated structure (protocol rule 2, R5, R7).

Two slots hold copies of a structure (a root, or one region's map).  Version
v carries generation `FIRST_GENERATION + v` and a content tag `content_v`
(free integers, pairwise distinct), so recovery returning the wrong content
for a generation, an older version, or a torn copy's garbage are all
visible.  The model starts where any open starts: slot 0 holds the durable
current version 0 (the slot recovery chose), slot 1 holds an equal copy, an
older valid copy, or garbage.  The protocol then commits `COMMITS` versions;
z3 picks the crash point, which writes persisted, in which order, and which
tore.  Recovery is `lamina.spec.replication`'s own rule (`slot_1_is_current`,
the function `select_root` and `select_map` decide with), applied to the
symbolic copies: the valid copy with the highest generation, slot 0 on a tie.

Claim (crash refinement): recovery returns exactly the last acknowledged
version or the one in flight.  A counterexample is replayed through the
spec's own `select_root` on real encoded root copies.
"""
from __future__ import annotations

from typing import Callable, Literal

import attrs
import z3

from ..errors import FormatError
from ..replication import SelectionRule, select_root, slot_1_is_current
from ..structures import Root, encode_root
from .core import Outcome, as_bool, as_int, prove
from .disk import Copy, Fsync, Op, SymbolicDisk, Write, choose

COMMITS = 4
FIRST_GENERATION = 2  # version 0; an older copy left in slot 1 has generation 1
SLOTS = ("slot 0", "slot 1")

Variant = Literal["spec", "no_fsync_between_slots", "durable_slot_first", "unverified_recovery", "older_copy_preferred"]


def older_copy_preferred(copy_0: tuple, copy_1: tuple):
    """A broken selection rule (negative control): the spec's rule with generations negated, so the lower one wins."""
    return slot_1_is_current((copy_0[0], -copy_0[1]), (copy_1[0], -copy_1[1]))


@attrs.frozen
class Recovery:
    """What recovery returns: whether any copy was accepted, and the accepted copy's fields."""

    found: z3.BoolRef
    generation: z3.ArithRef
    content: z3.ArithRef
    slot: z3.ArithRef


def recover(slot_0: Copy, slot_1: Copy, verify: bool = True, rule: SelectionRule = slot_1_is_current) -> Recovery:
    """Recovery's choice between the two copies, by the spec's selection rule (`verify` False: no copy is checked)."""
    ok_0 = slot_0.valid if verify else z3.BoolVal(True)
    ok_1 = slot_1.valid if verify else z3.BoolVal(True)
    take_1 = rule((ok_0, slot_0.generation), (ok_1, slot_1.generation))
    chosen = choose([(take_1, slot_1)], slot_0)
    return Recovery(z3.Or(ok_0, ok_1), chosen.generation, chosen.content, z3.If(take_1, 1, 0))


@attrs.frozen
class CommitModel:
    """One protocol variant unrolled over `commits` commits, with its crash states."""

    variant: Variant
    commits: int
    contents: list[z3.ArithRef]  # content tag of version v
    stale_content: z3.ArithRef
    disk: SymbolicDisk
    spans: list[tuple[int, int]]  # the trace steps of commit k (k = 1..commits) as [start, end)
    rest_points: list[tuple[int, int]]  # (crash point, version) where every write of version is durable
    premises: list[z3.BoolRef]

    @classmethod
    def build(cls, variant: Variant, commits: int = COMMITS) -> "CommitModel":
        contents = [z3.Int(f"content_{v}") for v in range(commits + 1)]
        stale = z3.Int("content_older")
        twin_kind = z3.Int("slot_1_at_open")  # 0: equal copy, 1: older valid copy, 2: garbage
        twin = choose([(twin_kind == 0, Copy.of(FIRST_GENERATION, contents[0])),
                       (twin_kind == 1, Copy.of(FIRST_GENERATION - 1, stale))],
                      Copy(z3.BoolVal(False), z3.Int("slot_1_garbage_generation"), z3.Int("slot_1_garbage_content")))
        trace: list[Op] = []
        spans: list[tuple[int, int]] = []
        rest_points: list[tuple[int, int]] = []
        best = 0  # the slot holding the durable current copy
        for v in range(1, commits + 1):
            start = len(trace)
            copy = Copy.of(FIRST_GENERATION + v, contents[v])
            label = f"version {v} (gen {FIRST_GENERATION + v})"
            first = best if variant == "durable_slot_first" else 1 - best
            if variant == "no_fsync_between_slots":
                trace += [Write(SLOTS[first], copy, label), Write(SLOTS[1 - first], copy, label),
                          Fsync("fsync (after both slots)")]
                rest_points.append((len(trace), v))
            else:
                trace.append(Fsync("fsync (a commit starts with one)"))
                if v > 1:
                    rest_points.append((len(trace), v - 1))
                trace += [Write(SLOTS[first], copy, label), Fsync("fsync (first slot durable)"),
                          Write(SLOTS[1 - first], copy, label)]
            best = first
            spans.append((start, len(trace)))
        if variant != "no_fsync_between_slots":
            trace.append(Fsync("fsync (at rest)"))
            rest_points.append((len(trace), commits))
        disk = SymbolicDisk(trace, {SLOTS[0]: Copy.of(FIRST_GENERATION, contents[0]), SLOTS[1]: twin})
        premises = disk.constraints + [z3.Distinct(*contents, stale), 0 <= twin_kind, twin_kind <= 2]
        return cls(variant, commits, contents, stale, disk, spans, rest_points, premises)

    def allowed(self, crash: int) -> list[int]:
        """Versions recovery may return after a crash before step `crash`: the acknowledged one, the one in flight."""
        done = max([k for k, (_, end) in enumerate(self.spans, 1) if end <= crash], default=0)
        started = done < self.commits and self.spans[done][0] < crash
        return [done, done + 1] if started else [done]

    def is_version(self, rec: Recovery, v: int) -> z3.BoolRef:
        return z3.And(rec.found, rec.generation == FIRST_GENERATION + v, rec.content == self.contents[v])

    @property
    def rule(self) -> SelectionRule:
        return older_copy_preferred if self.variant == "older_copy_preferred" else slot_1_is_current

    def recovery(self, slot_0: Copy, slot_1: Copy) -> Recovery:
        return recover(slot_0, slot_1, verify=self.variant != "unverified_recovery", rule=self.rule)

    def name_copy(self, model: z3.ModelRef, copy: Copy) -> str:
        if not as_bool(model, copy.valid):
            return "invalid (checksum fails)"
        return self.name_version(model, as_int(model, copy.generation), as_int(model, copy.content))

    def name_version(self, model: z3.ModelRef, generation: int, content: int) -> str:
        for v, tag in enumerate(self.contents):
            if as_int(model, tag) == content:
                return f"version {v} (gen {generation})"
        if as_int(model, self.stale_content) == content:
            return f"an older version (gen {generation})"
        return f"garbage (gen field {generation})"


def replay_with_spec(model: z3.ModelRef, cm: CommitModel, slot_0: Copy, slot_1: Copy) -> str:
    """Encode the two final copies as real root copies and run the spec's `select_root` (with the variant's rule) on them."""
    tags = {as_int(model, tag): v for v, tag in enumerate(cm.contents)}
    raw = []
    for slot, copy in enumerate((slot_0, slot_1)):
        generation = max(1, as_int(model, copy.generation))
        version = tags.get(as_int(model, copy.content), -1)
        root = Root(generation=generation, slot=slot, image_uuid=b"\x11" * 16, compatible_features=version + 1)
        data = bytearray(encode_root(root))
        if not as_bool(model, copy.valid):
            data[200] ^= 0xFF  # a torn copy: its CRC32C no longer matches
        raw.append(bytes(data))
    try:
        chosen = select_root(raw, cm.rule).value
    except FormatError as exc:
        return f"spec's select_root on the encoded copies: no copy accepted ({type(exc).__name__})"
    assert chosen is not None
    version = chosen.compatible_features - 1
    what = f"version {version}" if version >= 0 else "an older version"
    return f"spec's select_root on the encoded copies: {what} (gen {chosen.generation})"


def _render(cm: CommitModel, slot_0: Copy, slot_1: Copy, rec: Recovery, extra: Callable[[z3.ModelRef], list[str]]
            ) -> Callable[[z3.ModelRef], str]:
    def render(model: z3.ModelRef) -> str:
        crash = as_int(model, cm.disk.crash)
        lines = [f"protocol variant: {cm.variant}, {cm.commits} commits"]
        lines += cm.disk.render(model, cm.name_copy)
        lines += extra(model)
        lines.append(f"  after the crash: slot 0 = {cm.name_copy(model, slot_0)}, slot 1 = {cm.name_copy(model, slot_1)}")
        chosen = slot_1 if as_int(model, rec.slot) else slot_0
        if as_bool(model, rec.found) and not as_bool(model, chosen.valid):
            lines.append(f"  recovery returned: the torn copy in slot {as_int(model, rec.slot)} "
                         f"(its garbage reads gen {as_int(model, rec.generation)}), unverified")
        elif as_bool(model, rec.found):
            got = cm.name_version(model, as_int(model, rec.generation), as_int(model, rec.content))
            lines.append(f"  recovery returned: {got} from slot {as_int(model, rec.slot)}")
        else:
            lines.append("  recovery returned: nothing (no valid copy)")
        allowed = " or ".join(f"version {v}" for v in cm.allowed(crash))
        lines.append(f"  allowed: {allowed}")
        lines.append("  " + replay_with_spec(model, cm, slot_0, slot_1))
        return "\n".join(lines)
    return render


def check_crash_refinement(variant: Variant, commits: int = COMMITS) -> Outcome:
    """After a crash anywhere, recovery yields the acknowledged version or the one in flight."""
    cm = CommitModel.build(variant, commits)
    slot_0, slot_1 = cm.disk.final(SLOTS[0]), cm.disk.final(SLOTS[1])
    rec = cm.recovery(slot_0, slot_1)
    claim = z3.And(*[z3.Implies(cm.disk.crash == c, z3.Or(*[cm.is_version(rec, v) for v in cm.allowed(c)]))
                     for c in range(len(cm.disk.trace) + 1)])
    return prove(cm.premises, claim, _render(cm, slot_0, slot_1, rec, lambda m: []))


def check_corruption_at_rest(variant: Variant = "spec", commits: int = COMMITS) -> Outcome:
    """R7: at rest after a commit, one corrupted or stale copy still recovers to that commit.

    The damaged slot either fails its checksum (bit rot, a zeroed or garbage
    sector) or holds any earlier copy of that slot (a lost, stale write).
    """
    cm = CommitModel.build(variant, commits)
    finals = [cm.disk.final(s) for s in SLOTS]
    damaged = z3.Int("damaged_slot")
    stale_kind = z3.Int("damage")  # -1: checksum fails; j >= 0: the j-th earlier copy of that slot
    garbage = Copy(z3.BoolVal(False), z3.Int("rot_generation"), z3.Int("rot_content"))
    damaged_copies = []
    for slot, name in enumerate(SLOTS):
        earlier = [cm.disk.initial[name]] + [op.copy for i in cm.disk.writes_to(name)
                                             if isinstance(op := cm.disk.trace[i], Write)]
        stale = choose([(stale_kind == j, c) for j, c in enumerate(earlier)], garbage)
        ran = [z3.BoolVal(True)] + [cm.disk.ran(i) for i in cm.disk.writes_to(name)]
        damaged_copies.append((choose([(damaged == slot, stale)], finals[slot]),
                               z3.Or(stale_kind < 0, *[z3.And(stale_kind == j, r) for j, r in enumerate(ran)])))
    slot_0, slot_1 = damaged_copies[0][0], damaged_copies[1][0]
    rec = cm.recovery(slot_0, slot_1)
    premises = cm.premises + [z3.Or(damaged == 0, damaged == 1), stale_kind >= -1,
                              z3.Implies(damaged == 0, damaged_copies[0][1]),
                              z3.Implies(damaged == 1, damaged_copies[1][1]),
                              z3.Or(*[cm.disk.crash == point for point, _ in cm.rest_points])]
    claim = z3.And(*[z3.Implies(cm.disk.crash == point, cm.is_version(rec, v)) for point, v in cm.rest_points])

    def extra(model: z3.ModelRef) -> list[str]:
        kind = as_int(model, stale_kind)
        what = "fails its checksum" if kind < 0 else f"reverted to its earlier copy #{kind}"
        return [f"  at rest, then slot {as_int(model, damaged)} {what}"]
    return prove(premises, claim, _render(cm, slot_0, slot_1, rec, extra))
