"""Negative controls (checkers with teeth): every broken variant in the manifest is caught, with a minimal replayable trace."""
from __future__ import annotations

import json

import attrs
import pytest

from lamina.crashsim.cli import main
from lamina.crashsim.controls import CONTROLS, variant
from lamina.crashsim.errors import BadPlan
from lamina.crashsim.explore import Budget, Model, Plan
from lamina.crashsim.runner import _first_failure, minimize_outcomes, plan_fails, replay, run_task
from lamina.crashsim.workloads import get_workload
import lamina.impl.image as image_module
import lamina.impl.layers as layers_module
from lamina.spec import protocol

# Failing plans the simulator found and shrank, saved as regression tests.  Op
# indices belong to the implementation version that produced them, so the test
# re-explores the plan's shrunk workload under its model: with the broken
# variant it must fail, with the real implementation it must not.
SAVED_FAILURES = [
    "v=skip-intent/w=allocate/x=1,2,3/m=strict/s=0/p=3",
    "v=skip-map-copy-fsync/w=overwrite/x=1,2,3/m=torn/s=0/p=9/o=7t:gn,8t:gn",
    "v=root-without-barrier/w=multi-region/x=0,1,3/m=reorder/s=0/p=11/o=9d,10k",
    "v=no-reconcile/w=overwrite/x=1,2,3/m=reorder/s=0/p=6/o=4k,5k",
    # On allocate since an overwrite-only flush writes no map (F-PROTO-005): two commits of one map are needed.
    "v=map-current-slot-first/w=allocate/x=3/m=torn/s=0/p=15/o=12t:no,13k,14t:no",
    # A region dropped from the intent list with its deferred map not committed; a flush deferring a fresh map.
    "v=drop-uncommitted-map/w=overwrite/x=0,1,2,3/m=strict/s=0/p=0",
    "v=defer-fresh-map/w=allocate/x=2,3/m=strict/s=0/p=11",
    # Over a base, the map copy overtook the data it marks present: sector 0 read zero, not the base's bytes.
    "v=skip-data-fsync/w=layer-base-first-write/x=1/m=reorder/s=0/p=11/o=9d",
]


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_control_gets_its_expected_verdict(name):
    control = CONTROLS[name]
    result = run_task(control.workload, control.model, Budget(), seed=0, variant=name, stop_at_first=True)
    got = "fails" if result.failing_states else "passes"
    assert control.expected == got
    if control.expected == "fails":
        plan = Plan.parse(result.failures[0].plan)
        assert name == plan.variant
        assert replay(plan)[1] is not None  # the printed plan reproduces the failure exactly
        steps = len(get_workload(control.workload).steps)
        assert len(plan.dropped_steps) >= 1 or steps <= 2  # shrunk: steps the failure does not need are gone
        for index, _ in plan.outcomes:  # minimal: no deviating outcome can be turned back into "kept"
            fewer = tuple(o for o in plan.outcomes if o[0] != index)
            assert replay(attrs.evolve(plan, outcomes=fewer))[1] is None


def test_every_failing_control_has_a_distinct_rule():
    failing = [c for c in CONTROLS.values() if c.expected == "fails"]
    assert len(failing) >= 4
    assert len({c.breaks for c in failing}) == len(failing)


@pytest.mark.parametrize("text", SAVED_FAILURES)
def test_saved_failures_still_fail_and_pass_without_the_variant(text):
    plan = Plan.parse(text)
    model = Model.parse(plan.model)
    found = _first_failure(plan.workload, plan.dropped_steps, plan.variant, model, Budget(), plan.seed)
    assert found is not None
    assert replay(found)[1] is not None
    assert _first_failure(plan.workload, plan.dropped_steps, None, model, Budget(), plan.seed) is None


def test_variants_restore_what_they_patch():
    def patched() -> tuple:
        return (image_module.commit_maps, image_module.write_root, image_module.select_root, image_module.select_map,
                protocol.select_map, protocol.select_root, protocol.write_root, protocol.reconcile_region,
                image_module.Image._ensure_intents, layers_module._copy_absent, layers_module._durable_file,
                layers_module.unreferenced_files)

    before = patched()
    for name in CONTROLS:
        with variant(name):
            pass
    assert before == patched()


def test_cli_replay_reproduces_a_control_failure(capsys):
    plan = _first_failure("overwrite", (1, 2, 3), "skip-map-copy-fsync", Model.parse("torn"), Budget(), 0)
    assert 1 == main(["replay", plan.to_string()])
    out = capsys.readouterr().out
    # Both map copies torn: the read-only check before recovery already names it as corruption.
    assert "corruption:map-unrecoverable" in out and "no valid copy" in out and "torn g" in out


def test_a_failure_of_a_crashed_recovery_shrinks_to_a_plan_that_replays(capsys):
    """A failure that needs a tear inside recovery: `run` exits 1 with a shrunk plan, never 5 (a bad plan of its own)."""
    assert 1 == main(["run", "multi-region", "--model", "torn", "--control", "recovery-root-copy-fsync", "--output", "json"])
    failure = json.loads(capsys.readouterr().out)["results"][0]["failures"][0]
    plan = Plan.parse(failure["plan"])
    assert plan.recovery_crash is not None and plan.dropped_steps  # steps dropped although the failure is in recovery
    assert failure["message"] == replay(plan)[1]


def test_the_shrinker_skips_candidates_that_do_not_fit_their_trace():
    """Keeping the crash's torn op changes the recovery's ops: that candidate names recovery ops that do not exist."""
    plan = Plan.parse("v=recovery-root-copy-fsync/w=overwrite/m=torn/s=0/p=6/o=4t:oognoong,5k/rp=8/ro=4t:oooooooo,6t:gooooooo")
    assert plan_fails(plan)
    with pytest.raises(BadPlan):
        replay(attrs.evolve(plan, outcomes=()))
    assert not plan_fails(attrs.evolve(plan, outcomes=()))
    assert plan_fails(minimize_outcomes(plan, plan_fails))
    assert plan_fails(minimize_outcomes(plan, plan_fails, "recovery_outcomes"))
