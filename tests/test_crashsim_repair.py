"""Crashes during repair (R5 "repair itself", R7): every injected metadata fault, its repair crashed at every point.

Each crash state is followed up by the repair again, and by a writable open
then the repair; the result must check clean, hold every committed byte and
equal the uninterrupted repair.  Two broken repairs (negative controls) must
be caught with a minimal plan that `crashsim replay` reproduces.
"""
from __future__ import annotations

import pytest

from lamina.crashsim.cli import main
from lamina.crashsim.explore import Budget
from lamina.crashsim.inject import FAULT_KINDS, inject_workload
from lamina.crashsim.repaircrash import REPAIR_CONTROLS, RepairPlan, crash_repair_task, replay_repair, run_crash_repair
from lamina.crashsim.workloads import LIBRARY

# dirty-regions' final image has multi-region's shape (two regions, both with maps): its faults add CI time, not cases.
WORKLOADS = sorted(n for n, w in LIBRARY.items() if not w.create_in_trace and n != "dirty-regions")
# Bounded so that every fault x model runs in well under half a minute on two cores.
TEST_BUDGET = Budget(max_subset=3, max_combos=27, subset_samples=4, torn_cap=9, torn_samples=2)


@pytest.fixture(scope="module")
def results():
    return run_crash_repair(WORKLOADS, ["strict", "reorder", "torn"], TEST_BUDGET, jobs=2)


def test_no_crash_during_repair_loses_anything(results):
    failures = [f"{r.workload} [{r.model}] {f.fault}: {f.message}\n  crashsim replay {f.plan}" for r in results for f in r.failures]
    assert [] == failures
    assert 0 == sum(r.failing_states for r in results)


def test_every_injected_metadata_fault_is_crashed_under_every_model(results):
    for workload in WORKLOADS:
        injected = inject_workload(workload)
        metadata_faults = injected.total("root", 0) + injected.total("map", 0)
        for r in (r for r in results if r.workload == workload):
            assert r.faults == metadata_faults  # the same faults `crashsim inject` applies, all of them
            if workload == "allocate":  # its flushes commit maps: every kind, stale included, on both structures
                assert all(set(FAULT_KINDS) == set(r.counts[region]) for region in ("root", "map"))
            for region in ("root", "map"):
                assert set(injected.counts[region]) == set(r.counts[region])  # every kind inject applies there
                for kind, tiers in r.counts[region].items():
                    assert tiers.get("prefix", 0) > 0, (workload, r.model, region, kind)
    by_model = {m: {t for r in results if r.model == m for t in r.exhaustive} for m in ("strict", "reorder", "torn")}
    assert by_model["strict"] == {"prefix"}
    assert {"prefix", "targeted", "subsets"} <= by_model["reorder"]
    assert {"prefix", "targeted", "torn"} <= by_model["torn"]
    assert all(r.follow_ups == 2 * r.states for r in results)  # repair again; writable open then repair


def test_repair_tree_is_crashed_too():
    result = crash_repair_task("multi-region", "reorder", TEST_BUDGET, repairer="tree",
                               fault_filter=lambda f: f.number % 5 == 0)
    assert result.states > 0 and result.failures == ()


@pytest.mark.parametrize("region", ["root", "map"])  # root copies are rewritten by recovery, map copies by repair_image
@pytest.mark.parametrize("control", sorted(REPAIR_CONTROLS))
def test_broken_repair_is_caught_with_a_minimal_replayable_plan(control, region, capsys):
    c = REPAIR_CONTROLS[control]
    result = crash_repair_task(c.workload, c.model, TEST_BUDGET, control=control, stop_at_first=True,
                               fault_filter=lambda f: f.place.kind == region)
    assert result.failing_states > 0
    failure = result.failures[0]
    plan = RepairPlan.parse(failure.plan)
    with capsys.disabled():  # the minimal plan, printed for the person reading the test log
        print(f"\n{control}: {failure.fault}: {failure.message}\n  crashsim replay {failure.plan}")
    assert plan.variant == control
    assert replay_repair(plan)[1] is not None  # the printed plan reproduces the failure
    # Minimal: removing any deviating outcome makes the state pass.
    for index, _ in plan.outcomes:
        smaller = RepairPlan.parse(failure.plan)
        smaller = RepairPlan(smaller.workload, smaller.fault, smaller.model, smaller.seed, smaller.crash,
                             tuple(o for o in smaller.outcomes if o[0] != index), smaller.after, smaller.repairer, smaller.variant)
        assert replay_repair(smaller)[1] is None
    # The same state with the real repair is fine: the control fails for the step it breaks.
    real = RepairPlan(plan.workload, plan.fault, plan.model, plan.seed, 0, (), plan.after, plan.repairer, None)
    assert replay_repair(real)[1] is None
    assert 1 == main(["replay", failure.plan])
    assert "FAIL" in capsys.readouterr().out


def test_strict_cannot_catch_the_in_place_refresh():
    """Rewriting the good copy with its own bytes is harmless unless a write can tear: only `torn` sees it."""
    result = crash_repair_task("overwrite", "strict", TEST_BUDGET, control="repair-good-copy-first")
    assert result.states > 0 and result.failing_states == 0


def test_cli_crash_repair_summary_and_json(capsys):
    assert 0 == main(["inject", "allocate", "--crash-repair", "--model", "strict,reorder"])
    out = capsys.readouterr().out
    assert "crashes during repair" in out and "0 failing" in out
    assert "root   bitflip      reorder" in out
    import json

    assert 0 == main(["inject", "allocate", "--crash-repair", "--model", "strict", "--output", "json"])
    data = json.loads(capsys.readouterr().out)
    (result,) = data["crash_repair"]["results"]
    assert result["states"] > 0 and result["failing_states"] == 0
    assert set(result["counts"]) == {"root", "map"}
    assert data["inject"][0]["workload"] == "allocate"
