"""z3 proofs of the layout and the commit protocol (S5); `python -m lamina.spec.proofs` runs them all."""
from __future__ import annotations

import attrs

from .core import Outcome, Property, SolverGaveUp
from .layout import cross_check_geometry
from .registry import PROPERTIES, properties_markdown


@attrs.frozen
class Verdict:
    """One property's outcome judged against its expectation."""

    prop: Property
    outcome: Outcome | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome is not None and self.outcome.status == self.prop.expected

    @property
    def label(self) -> str:
        if not self.ok:
            return "FAILED"
        return "proved" if self.prop.expected == "proved" else "refuted(expected)"


def run_property(prop: Property) -> Verdict:
    """Run one property; a solver that gives up is a failure, never a pass."""
    try:
        return Verdict(prop, prop.run())
    except SolverGaveUp as exc:
        return Verdict(prop, None, str(exc))


def run_all() -> list[Verdict]:
    return [run_property(prop) for prop in PROPERTIES]


__all__ = ["PROPERTIES", "Verdict", "cross_check_geometry", "properties_markdown", "run_all", "run_property"]
