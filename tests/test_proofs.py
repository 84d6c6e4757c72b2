"""The z3 proofs (S5): every property proved, every negative control refuted, all of it fast.

Property IDs are cited by the format document through `properties_markdown()`.
"""
from __future__ import annotations

import itertools
import re
import time

import pytest
import z3

from lamina.spec.layout import CLUSTERS_PER_REGION, SECTOR_SIZE, Geometry
from lamina.spec.proofs import PROPERTIES, cross_check_geometry, properties_markdown, run_property
from lamina.spec.proofs.arith import BitVecArith, IntArith
from lamina.spec.proofs.commit import CommitModel, check_crash_refinement
from lamina.spec.proofs.layout import SymbolicGeometry


@pytest.fixture(scope="module")
def verdicts() -> dict:
    """Run every property once for the whole module; the solver time is printed, not judged (speed is measured by
    `python -m lamina.spec.proofs`, which times each property, never by a test)."""
    start = time.perf_counter()
    results = {prop.pid: run_property(prop) for prop in PROPERTIES}
    wall = time.perf_counter() - start
    solver = sum(v.outcome.seconds for v in results.values() if v.outcome)
    print(f"\nz3: {len(results)} properties, solver time {solver:.2f} s, wall time {wall:.2f} s")
    results["_seconds"] = (solver, wall)
    return results


@pytest.mark.parametrize("pid", [p.pid for p in PROPERTIES if p.expected == "proved"])
def test_property_proved(verdicts: dict, pid: str) -> None:
    verdict = verdicts[pid]
    assert verdict.ok, verdict.error or verdict.outcome.detail
    assert "proved" == verdict.outcome.status


@pytest.mark.parametrize("pid", [p.pid for p in PROPERTIES if p.expected == "refuted"])
def test_negative_control_refuted_with_trace(verdicts: dict, pid: str) -> None:
    verdict = verdicts[pid]
    assert verdict.outcome is not None
    assert "refuted" == verdict.outcome.status
    assert verdict.outcome.detail  # a counterexample a person can read
    print(f"\n{pid}:\n{verdict.outcome.detail}")


def test_max_virtual_size_has_a_witness(verdicts: dict) -> None:
    assert verdicts["P-LAYOUT-011"].outcome.detail.startswith("witness: ")


def test_ids_are_stable_and_unique() -> None:
    ids = [p.pid for p in PROPERTIES]
    assert len(ids) == len(set(ids))
    for prop in PROPERTIES:
        assert re.fullmatch(r"(P|NEG)-(LAYOUT|COMMIT|INTENT|SHARE)-\d{3}", prop.pid)
        assert (prop.expected == "refuted") == prop.pid.startswith("NEG-")


def test_properties_markdown_lists_every_property() -> None:
    table = properties_markdown().splitlines()
    assert "| ID | what it covers | format rule | expected |" == table[0]
    assert [p.pid for p in PROPERTIES] == [row.split("|")[1].strip() for row in table[2:]]


def test_symbolic_geometry_matches_spec() -> None:
    """The formulas the proofs use are the spec's: ints and z3 constants both agree with `Geometry`."""
    assert cross_check_geometry() > 1000


def test_symbolic_geometry_matches_spec_everywhere_in_a_file() -> None:
    bits = 12
    size = 5 * CLUSTERS_PER_REGION * (1 << bits) + SECTOR_SIZE
    spec = Geometry(bits, size)
    ints = SymbolicGeometry(IntArith(), bits, size)
    for guest in range(0, size, 37 * (1 << bits) + SECTOR_SIZE):
        assert spec.guest_to_file(guest) == ints.guest_to_file(guest)
    for region in range(spec.num_regions):
        for slot in (0, 1):
            assert spec.map_copy_offset(region, slot) == ints.map_copy_offset(region, slot)


def test_bitvector_arithmetic_flags_a_wrap() -> None:
    """The no-wrap bookkeeping has teeth: a cluster size past 2^63 is caught."""
    arith = BitVecArith()
    geometry = SymbolicGeometry(arith, z3.BitVecVal(64, 64), z3.BitVecVal(0, 64))
    geometry.cluster_size()
    assert z3.is_false(z3.simplify(z3.And(*arith.no_wrap)))


def test_protocol_counterexample_replays_in_the_spec() -> None:
    """The spec's own select_root (with the variant's rule), fed the counterexample's copies, also returns a forbidden outcome."""
    for variant in ("no_fsync_between_slots", "durable_slot_first", "older_copy_preferred"):
        detail = check_crash_refinement(variant).detail
        allowed = re.search(r"allowed: (.*)", detail).group(1).split(" or ")
        replayed = re.search(r"spec's select_root on the encoded copies: (.*)", detail).group(1)
        assert not any(replayed.startswith(v + " ") for v in allowed), detail


def test_unverified_recovery_differs_from_the_spec() -> None:
    """Where the broken recovery accepts a torn copy, the spec's select_root returns an allowed version."""
    detail = check_crash_refinement("unverified_recovery").detail
    allowed = re.search(r"allowed: (.*)", detail).group(1).split(" or ")
    replayed = re.search(r"spec's select_root on the encoded copies: (.*)", detail).group(1)
    assert any(replayed.startswith(v + " ") for v in allowed), detail


def test_the_proof_decides_with_the_spec_selection_rule() -> None:
    """One rule for both: on every concrete pair of copies, z3's value of the rule is the spec's `select_root` choice."""
    from lamina.spec.replication import select_root, slot_1_is_current
    from lamina.spec.structures import Root, encode_root

    for valid_0, valid_1, gen_0, gen_1 in itertools.product((True, False), (True, False), (1, 2), (1, 2)):
        symbolic = z3.simplify(slot_1_is_current((z3.BoolVal(valid_0), z3.IntVal(gen_0)), (z3.BoolVal(valid_1), z3.IntVal(gen_1))))
        assert z3.is_true(symbolic) == bool(slot_1_is_current((valid_0, gen_0), (valid_1, gen_1)))
        if valid_0 or valid_1:
            copies = [bytearray(encode_root(Root(generation=g, slot=s, image_uuid=b"\x11" * 16))) for s, g in enumerate((gen_0, gen_1))]
            for copy, valid in zip(copies, (valid_0, valid_1)):
                copy[200] ^= 0 if valid else 0xFF
            assert select_root([bytes(c) for c in copies]).slot == int(z3.is_true(symbolic))


def test_commit_model_allowed_outcomes() -> None:
    cm = CommitModel.build("spec", 2)
    # trace: fsync, w, fsync, w | fsync, w, fsync, w | fsync
    assert [0] == cm.allowed(0)
    assert [0, 1] == cm.allowed(1)
    assert [1] == cm.allowed(4)
    assert [1, 2] == cm.allowed(5)
    assert [2] == cm.allowed(9)


def test_vacuous_premises_are_a_failure() -> None:
    """A proof under premises that admit no state proves nothing; `prove` must refuse it."""
    from lamina.spec.proofs.core import SolverGaveUp, prove

    x = z3.Int("x")
    with pytest.raises(SolverGaveUp):
        prove([x > 1, x < 0], x == 7)
