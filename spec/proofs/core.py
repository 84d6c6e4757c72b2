"""What every proof shares: a property record, the solver call, and the outcome.

A property is *proved* when z3 finds its negation unsatisfiable under the
premises, and *refuted* when z3 finds a model of the negation: that model is a
counterexample, rendered by the property's own trace printer.  Negative
controls are properties whose expected outcome is "refuted": they show that the
models have teeth.
"""
from __future__ import annotations

import time
from typing import Callable, Literal

import attrs
import z3

Status = Literal["proved", "refuted"]


class SolverGaveUp(RuntimeError):
    """z3 answered `unknown`, or the premises are unsatisfiable: no proof, so the property fails."""


@attrs.frozen
class Outcome:
    """What z3 concluded, how long it took, and the witness or counterexample as text."""

    status: Status
    seconds: float
    detail: str = ""


@attrs.frozen
class Property:
    """One claim with a stable ID, the format rule it covers, and the outcome it must have."""

    pid: str
    covers: str
    rule: str
    expected: Status
    check: Callable[[], Outcome] = attrs.field(repr=False)

    def run(self) -> Outcome:
        return self.check()


def prove(premises: list[z3.BoolRef], claim: z3.BoolRef,
          render: Callable[[z3.ModelRef], str] | None = None,
          cases: list[z3.BoolRef] | None = None) -> Outcome:
    """Prove `premises => claim`, or return the counterexample z3 found, rendered.

    `cases`, when given, must cover every admitted value (say, one case per
    cluster size); the claim is proved case by case, which turns products of
    two unknowns into products by constants and keeps the solver fast.
    """
    seconds = 0.0
    for case in cases if cases is not None else [z3.BoolVal(True)]:
        # A fresh solver per case: push/pop would switch z3 to its incremental
        # core, which skips the preprocessing that makes the cases cheap.
        solver = z3.Solver()
        solver.add(*premises)
        solver.add(z3.Not(claim))
        solver.add(case)
        start = time.perf_counter()
        answer = solver.check()
        seconds += time.perf_counter() - start
        if answer == z3.sat:
            model = solver.model()
            return Outcome("refuted", seconds, render(model) if render else str(model))
        if answer != z3.unsat:
            raise SolverGaveUp(f"z3 returned unknown: {solver.reason_unknown()}")
        if find_witness(premises + [case]) is None:
            # Premises that admit nothing would prove anything.
            raise SolverGaveUp("vacuous: the premises admit no state at all")
    return Outcome("proved", seconds)


def find_witness(constraints: list[z3.BoolRef]) -> z3.ModelRef | None:
    """A model of `constraints`, or None when there is none."""
    solver = z3.Solver()
    solver.add(*constraints)
    if solver.check() == z3.sat:
        return solver.model()
    return None


def as_int(model: z3.ModelRef, term: z3.ExprRef) -> int:
    """The value a model gives a bit-vector or integer term (0 when left free)."""
    value = model.eval(term, model_completion=True)
    if z3.is_bool(value):
        return int(z3.is_true(value))
    return value.as_long()


def as_bool(model: z3.ModelRef, term: z3.BoolRef) -> bool:
    return z3.is_true(model.eval(term, model_completion=True))
