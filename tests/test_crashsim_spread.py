"""The shortcuts of the crash simulator change no verdict: memoized checks after recovery, and slices on an executor.

`run_task` in this process is the plain path; `spreadrun.run_sliced` cuts the
same tasks into slices of distinct crash images (forced small here, so a
task becomes many slices) and must merge them into the very same results.
"""
from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor

import attrs
import pytest

from lamina.crashsim import spreadrun
from lamina.crashsim.explore import Budget, Model, explore
from lamina.crashsim.oracle import open_state
from lamina.crashsim.runner import Explorer, load_recording, run_all, run_task
from lamina.crashsim.trees import open_tree_state

BUDGET = Budget(max_subset=3, recovery_images=2)


def _without_seconds(result):
    return attrs.evolve(result, seconds=0.0)


@pytest.mark.parametrize("workload, model", [("partial-cluster", "reorder+torn"), ("layer-snapshot", "reorder")])
def test_check_after_recovery_memoized_by_recovered_bytes_gives_the_same_verdicts(workload, model):
    rec = load_recording(workload)
    ex = Explorer(rec, Model.parse(model), 0)
    memo: dict = {}
    states = {}
    for _tier, crash, outcomes, _ in explore(rec.ops, ex.model, BUDGET, 0):
        state = ex.state(crash, outcomes)
        states.setdefault(state.key(), state)
    opener = open_tree_state if workload.startswith("layer-") else None
    for state in states.values():
        if opener is None:
            plain, memoized = open_state(state.copy(), None), open_state(state.copy(), None, recovered=memo)
        else:
            plain, memoized = opener(state.copy(), rec), opener(state.copy(), rec, recovered=memo)
        assert memoized == plain
    assert 0 < len(memo) < len(states)  # distinct crash images recover to fewer distinct images: the memo is used


@pytest.mark.parametrize("variant", [None, "skip-intent"], ids=["passing", "failing-control"])
def test_slices_merge_into_the_result_of_one_task(monkeypatch, variant):
    monkeypatch.setattr(spreadrun, "MIN_SLICE", 1)
    monkeypatch.setattr(spreadrun, "MAX_SLICES", 64)
    tasks = [("allocate", "reorder"), ("overwrite", "reorder"), ("layer-write-raw", "strict")]
    plain = [run_task(w, m, BUDGET, 3, variant) for w, m in tasks]
    with ProcessPoolExecutor(2) as pool:  # processes: a variant patches modules, which threads would share
        sliced = spreadrun.run_sliced(tasks, BUDGET, 3, variant, pool)
    assert [_without_seconds(r) for r in sliced] == [_without_seconds(r) for r in plain]
    assert any(r.failures for r in plain) == (variant is not None)
    assert all(r.counts.get("recovery") for r in plain if not r.failures)


def test_jobs_2_equals_jobs_1_on_a_torn_task():
    tasks = [("discard", "torn")]
    budget = Budget(max_subset=2, recovery_images=1)
    one = run_all(tasks, budget, seed=0)
    two = run_all(tasks, budget, seed=0, jobs=2)
    assert [_without_seconds(r) for r in two] == [_without_seconds(r) for r in one]


def test_a_worker_that_records_other_operations_is_refused():
    rec = load_recording("allocate")
    with pytest.raises(spreadrun.CrashsimError, match="recorded other operations"):
        spreadrun.check_states("allocate", "strict", 0, None, spreadrun.ops_digest(rec.ops[:-1]), [(0, ())])


@pytest.mark.parametrize("variant", [None, "skip-intent"], ids=["passing", "failing-control"])
def test_lanes_merge_into_the_result_of_one_task(variant):
    """Three forked lanes (more lanes than some tasks have images to share out): each judges its piece of every
    task's images and the recoveries of those it opened, and the merge is `run_task`'s result."""
    from lamina.crashsim.lanes import run_lanes

    tasks = [("allocate", "reorder"), ("overwrite", "torn"), ("layer-write-raw", "strict"), ("create", "namespace")]
    plain = [run_task(w, m, BUDGET, 3, variant) for w, m in tasks]
    done: list = []
    lanes = run_lanes(tasks, BUDGET, 3, variant, 3, done.append)
    assert [_without_seconds(r) for r in lanes] == [_without_seconds(r) for r in plain]
    assert sorted((r.workload, r.model) for r in done) == sorted(tasks)
    assert any(r.failures for r in plain) == (variant is not None)
