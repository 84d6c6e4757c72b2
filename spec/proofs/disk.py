"""A symbolic disk in the manner of Yggdrasil's `diskspec.py`: crash anywhere, reorder, tear.

A trace is a fixed list of writes and fsyncs; what survives a crash is left
to z3.  The crash point is a free integer.  Each write that ran has a Boolean
"persisted", a Boolean "torn" and a free persist order; an fsync that ran
forces every earlier write to have persisted whole, and orders every earlier
write before every later one.  Between fsyncs, any subset of writes persists,
in any order, each possibly torn, except that two writes to the same target
land in program order (the page cache holds the newer bytes; an older write
never lands over a newer one).  A target (one copy slot, one data area)
ends up holding its initial copy or the copy of the write that persisted last;
a torn write leaves an invalid copy with arbitrary field values, which only
a checksum can tell from a good one.
"""
from __future__ import annotations

from typing import Callable

import attrs
import z3

from .core import as_bool, as_int


@attrs.frozen
class Copy:
    """What a target holds: whether it verifies, its generation, and its content (a version tag)."""

    valid: z3.BoolRef
    generation: z3.ArithRef
    content: z3.ArithRef

    @classmethod
    def of(cls, generation: int, content: int | z3.ArithRef) -> "Copy":
        return cls(z3.BoolVal(True), z3.IntVal(generation), content if isinstance(content, z3.ArithRef)
                   else z3.IntVal(content))


@attrs.frozen
class Write:
    target: str
    copy: Copy
    label: str


@attrs.frozen
class Fsync:
    label: str = "fsync"


Op = Write | Fsync


def choose(cases: list[tuple[z3.BoolRef, Copy]], default: Copy) -> Copy:
    """The copy of the first case whose condition holds, else `default`."""
    out = default
    for cond, copy in reversed(cases):
        out = Copy(z3.If(cond, copy.valid, out.valid), z3.If(cond, copy.generation, out.generation),
                   z3.If(cond, copy.content, out.content))
    return out


class SymbolicDisk:
    """The crash states of one trace: every prefix, every subset and order of un-synced writes, any tear."""

    def __init__(self, trace: list[Op], initial: dict[str, Copy], name: str = "") -> None:
        self.trace = trace
        self.initial = initial
        self.crash = z3.Int(f"{name}crash")
        self.persisted: dict[int, z3.BoolRef] = {}
        self.torn: dict[int, z3.BoolRef] = {}
        self.order: dict[int, z3.ArithRef] = {}
        self.garbage: dict[int, Copy] = {}
        self.constraints: list[z3.BoolRef] = [0 <= self.crash, self.crash <= len(trace)]
        for i, op in enumerate(trace):
            if isinstance(op, Write):
                self.persisted[i] = z3.Bool(f"{name}persisted_{i}")
                self.torn[i] = z3.Bool(f"{name}torn_{i}")
                self.order[i] = z3.Int(f"{name}order_{i}")
                self.garbage[i] = Copy(z3.BoolVal(False), z3.Int(f"{name}torn_generation_{i}"),
                                       z3.Int(f"{name}torn_content_{i}"))
                self.constraints += [z3.Implies(self.persisted[i], self.ran(i)),
                                     z3.Implies(self.torn[i], self.persisted[i])]
        writes = sorted(self.persisted)
        for f, op in enumerate(trace):
            if isinstance(op, Fsync):
                before = [i for i in writes if i < f]
                self.constraints.append(z3.Implies(self.ran(f), z3.And(
                    *[z3.And(self.persisted[i], z3.Not(self.torn[i])) for i in before])))
                self.constraints += [self.order[i] < self.order[j] for i in before for j in writes if j > f]
        for target in {trace[i].target for i in writes}:  # type: ignore[union-attr]
            same = self.writes_to(target)
            self.constraints += [self.order[i] < self.order[j] for i, j in zip(same, same[1:])]

    def ran(self, index: int) -> z3.BoolRef:
        return index < self.crash

    def writes_to(self, target: str) -> list[int]:
        return [i for i, op in enumerate(self.trace) if isinstance(op, Write) and op.target == target]

    def final(self, target: str) -> Copy:
        """What `target` holds after the crash."""
        same = self.writes_to(target)
        cases = []
        for i in same:
            last = z3.And(self.persisted[i], *[z3.Or(z3.Not(self.persisted[j]), self.order[j] < self.order[i])
                                               for j in same if j != i])
            op = self.trace[i]
            assert isinstance(op, Write)
            cases.append((last, choose([(self.torn[i], self.garbage[i])], op.copy)))
        return choose(cases, self.initial[target])

    def render(self, model: z3.ModelRef, name_copy: Callable[[z3.ModelRef, Copy], str]) -> list[str]:
        """The trace step by step: what ran, which writes persisted (in which order), which tore."""
        crash = as_int(model, self.crash)
        lines = ["  initial: " + ", ".join(f"{t} = {name_copy(model, c)}" for t, c in sorted(self.initial.items()))]
        for i, op in enumerate(self.trace):
            if i == crash:
                lines.append(f"  --- crash before step {i} ({len(self.trace) - i} later steps never ran) ---")
                break
            if isinstance(op, Fsync):
                lines.append(f"  step {i:2}: {op.label}")
                continue
            if not as_bool(model, self.persisted[i]):
                fate = "LOST (never reached the disk)"
            elif as_bool(model, self.torn[i]):
                fate = f"TORN (persisted partly, order {as_int(model, self.order[i])})"
            else:
                fate = f"persisted (order {as_int(model, self.order[i])})"
            lines.append(f"  step {i:2}: write {op.target} := {op.label:<24} {fate}")
        if crash == len(self.trace):
            lines.append("  --- crash after the last step ---")
        return lines
