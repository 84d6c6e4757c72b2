"""Corruption injection (C5, R7): every single-place metadata fault detected and repaired, every data fault detected."""
from __future__ import annotations

import pytest

from lamina.crashsim.cli import main
from lamina.crashsim.inject import FAULT_KINDS, inject_workload
from lamina.crashsim.workloads import LIBRARY

WORKLOADS = sorted(n for n, w in LIBRARY.items() if not w.create_in_trace)


@pytest.mark.parametrize("workload", WORKLOADS)
def test_every_fault_is_detected_and_metadata_repaired(workload):
    result = inject_workload(workload)
    assert [] == list(result.failures)
    for region_kind in ("root", "map", "data"):
        injected = result.total(region_kind, 0)
        assert injected > 0
        assert injected == result.total(region_kind, 1)  # 100% detected
        if region_kind != "data":
            assert injected == result.total(region_kind, 2)  # 100% repaired, committed bytes intact


def test_every_fault_kind_is_exercised_on_metadata():
    # A map rewritten at least twice leaves an older version to inject as stale: `allocate` commits maps at its
    # flushes; `overwrite`'s overwrite-only flushes defer theirs (F-PROTO-005), but it rewrites data.
    result = inject_workload("allocate")
    for region_kind in ("root", "map"):
        assert set(FAULT_KINDS) == set(result.counts[region_kind])
    assert {"bitflip", "zero", "garbage", "misdirected", "stale"} == set(inject_workload("overwrite").counts["data"])


def test_cli_inject_summary(capsys):
    assert 0 == main(["inject", "allocate"])
    out = capsys.readouterr().out
    assert "map: " in out and "repaired with every committed byte intact" in out
