"""The two checkers agree: every protocol variant z3 refutes is also caught by the crash simulator.

z3 judges a symbolic model of the protocol; crashsim judges the real
implementation with the variant patched in. A variant one checker refutes
and the other accepts would mean the model and the implementation differ.
"""
from __future__ import annotations

import pytest

from lamina.crashsim.controls import CONTROLS
from lamina.crashsim.explore import Budget
from lamina.crashsim.runner import run_task
from lamina.spec.proofs import PROPERTIES, run_property

# z3 negative control -> the crashsim control that breaks the same protocol rule
SAME_RULE = {
    "NEG-COMMIT-001": "skip-map-copy-fsync",  # both copies written, one fsync
    "NEG-COMMIT-002": "map-current-slot-first",  # the durable slot written first
    "NEG-COMMIT-003": "trust-unverified-copy",  # recovery without verifying
    "NEG-COMMIT-004": "prefer-older-copy",  # the lower generation preferred
    "NEG-INTENT-001": "skip-intent",  # data before its intent
    "NEG-INTENT-002": "root-without-barrier",  # root write without the fsync before it
    "NEG-INTENT-003": "drop-uncommitted-map",  # a region dropped with its deferred map not committed
    "NEG-INTENT-004": "defer-fresh-map",  # a flush that defers a map whose presence changed
}


def test_every_protocol_control_of_z3_has_a_crashsim_twin():
    protocol_controls = {p.pid for p in PROPERTIES if p.pid.startswith(("NEG-COMMIT", "NEG-INTENT"))}
    assert protocol_controls == set(SAME_RULE)


@pytest.mark.parametrize("prop_id", sorted(SAME_RULE))
def test_z3_refutes_and_crashsim_catches_the_same_variant(prop_id):
    prop = next(p for p in PROPERTIES if p.pid == prop_id)
    verdict = run_property(prop)
    assert "refuted" == verdict.outcome.status
    control = CONTROLS[SAME_RULE[prop_id]]
    result = run_task(control.workload, control.model, Budget(), seed=0, variant=control.name, stop_at_first=True)
    assert result.failing_states, f"z3 refutes {prop_id} but crashsim accepts {control.name}"
    # and without the variant, the real implementation passes the same exploration
    clean = run_task(control.workload, control.model, Budget(), seed=0, stop_at_first=True)
    assert 0 == clean.failing_states
