"""The crash simulator over trees of layers: every management operation at every crash point, every model.

Bounded (a smaller budget than `crashsim run`'s default) so that the whole
crashsim test set stays within a few minutes on two cores; `crashsim run
layers` explores with the full budget.
"""
from __future__ import annotations

import attrs
import pytest

from lamina.crashsim.cli import main
from lamina.crashsim.explore import DEFAULT_MODELS, Budget
from lamina.crashsim.runner import run_all, run_task
from lamina.crashsim.trees import (
    TREE_LIBRARY,
    TreeOpened,
    judge_tree,
    record_tree_workload,
    tree_legal_at,
)
from lamina.crashsim.memstore import MemStorage

BUDGET = Budget(max_subset=4, max_combos=81, subset_samples=6, torn_cap=9, torn_samples=3, recovery_images=1)

# Failures the tree workloads found in impl/, fixed there; their minimal plans stay as regressions.
FOUND_AND_FIXED = {
    "w=layer-commit-lamina/m=strict/s=0/p=38": "discard_own punched before the maps said absent",
    "w=layer-delete-merge/m=strict/s=0/p=9": "a merge's crash left a frozen layer that nothing recovered",
}
PASSING = list(TREE_LIBRARY)


def test_the_library_covers_every_management_operation():
    kinds = {step[0] for w in TREE_LIBRARY.values() for step in w.steps}
    assert {"write", "flush", "zero", "resize", "snapshot", "revert", "delete", "clone", "commit", "rebase", "receive",
            "dedup", "gc", "remove"} <= kinds
    rebases = {step[4] for w in TREE_LIBRARY.values() for step in w.steps if step[0] == "rebase"}
    assert rebases == {True, False}  # safe and unsafe
    bases = {step[3] for w in TREE_LIBRARY.values() for step in w.setup if step[0] == "create" and step[1] == "disk.lam"}
    assert {"base.raw", "base.lam"} <= bases


@pytest.mark.parametrize("name", sorted(TREE_LIBRARY))
def test_uncrashed_run_reads_the_model(name):
    rec = record_tree_workload(TREE_LIBRARY[name])  # raises when the implementation and the model disagree
    assert rec.ops and rec.events


def test_every_layer_workload_under_every_model_has_no_failing_state():
    tasks = [(w, m) for w in PASSING for m in DEFAULT_MODELS]
    results = run_all(tasks, BUDGET, seed=0, jobs=2)
    failures = [(r.workload, r.model, r.failures[0].plan, r.failures[0].message) for r in results if r.failing_states]
    assert not failures
    for r in results:
        assert r.counts["prefix"] == r.ops + 1  # a crash after every op
        assert r.counts.get("recovery", 0) > 0
        if r.model != "strict" and r.model != "namespace":
            assert r.counts.get("targeted", 0) > 0


@pytest.mark.parametrize("plan", sorted(FOUND_AND_FIXED))
def test_found_failures_stay_fixed(plan, capsys):
    assert 0 == main(["replay", plan]), FOUND_AND_FIXED[plan]
    assert "ok: the state recovers, checks clean and reads a legal outcome" in capsys.readouterr().out


def test_skip_data_fsync_is_caught_over_a_base_not_on_a_single_image():
    over_base = run_task("layer-base-first-write", "reorder", Budget(), variant="skip-data-fsync", stop_at_first=True)
    assert over_base.failing_states
    assert "reads 0000000000000000" in over_base.failures[0].message  # zero instead of the base's bytes
    single = run_task("allocate", "reorder", BUDGET, variant="skip-data-fsync")
    assert single.failing_states == 0  # an absent sector of a single image reads zero anyway


def test_the_tree_oracle_accepts_before_or_after_as_a_whole_and_nothing_mixed():
    rec = record_tree_workload(TREE_LIBRARY["layer-snapshot"])
    event = next(e for e in rec.events if e.management)
    legal = tree_legal_at(rec, (event.start + event.end) // 2)
    before, after = legal.candidates[0].view, legal.candidates[1].view
    assert before != after
    assert judge_tree(TreeOpened(None, before), legal) is None
    assert judge_tree(TreeOpened(None, after), legal) is None
    # The snapshot exists (after) but the top reads a sector that neither state has.
    name, branch = after[0]
    sector, value = branch.sectors[0]
    mixed = ((name, attrs.evolve(branch, sectors=((sector, bytes(512 - 1) + b"\x01"),) + branch.sectors[1:])),) + after[1:]
    assert "no legal outcome" in judge_tree(TreeOpened(None, mixed), legal)
    # The snapshot vanished although the operation had returned.
    assert judge_tree(TreeOpened(None, before), tree_legal_at(rec, event.end)) is not None


def test_the_simulated_storage_answers_stat_with_link_counts():
    storage = MemStorage()
    storage.create("/crashsim-simulated/vm/a").close()
    storage.link("/crashsim-simulated/vm/a", "/crashsim-simulated/vm/b")
    assert (True, 2) == (storage.stat("/crashsim-simulated/vm/b").is_file, storage.stat("/crashsim-simulated/vm/b").nlink)
    with pytest.raises(FileNotFoundError):
        storage.stat("/crashsim-simulated/vm/missing")


def test_cli_runs_layer_workloads(capsys):
    assert 0 == main(["run", "layer-base-first-write", "layer-revert", "--model", "strict,namespace", "--recovery-images", "1"])
    out = capsys.readouterr().out
    assert "layer-revert" in out and "0 failing" in out
