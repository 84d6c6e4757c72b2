"""`crashsim compare`: qcow2 (qemu-img, qemu-io) and Lamina (lamina) under the same recorded crash tests.

The workloads are small (16 MiB disks, 64 KiB clusters, a few invocations)
and the budget is reduced, so the real programs run under strace in CI.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from lamina.crashsim.cli import main as crashsim_main
from lamina.crashsim.memstore import DiskState
from lamina.crashsim.sidebyside import SECTOR, CheckResult, Judge, Promise, Recording, Scenario, Step, _first_wrong, \
    observe, promised_after

needs_tools = pytest.mark.skipif(any(shutil.which(t) is None for t in ("qemu-img", "qemu-io", "strace")),
                                 reason="needs qemu-img and qemu-io (qemu-utils) and strace to run the real programs")
SMALL = ["--max-subset", "4", "--samples", "8", "--output", "json"]


def _compare(capsys, *args: str) -> tuple[int, dict]:
    code = crashsim_main(["compare", *args, *SMALL])
    return code, json.loads(capsys.readouterr().out)


@needs_tools
def test_lamina_row_is_all_ok_and_the_qcow2_row_is_produced(capsys):
    workloads = ("allocate", "snapshot")
    code, out = _compare(capsys, *(a for w in workloads for a in ("--workload", w)), "--model", "strict")
    rows = out["rows"]
    assert [(r["workload"], r["format"]) for r in rows] == [(w, f) for w in workloads for f in ("qcow2", "lamina")]
    for r in rows:  # every state was judged, by the format's own checker
        assert r["model"] == "strict" and r["states"] == r["ops"] + 1 and r["checked"] > 1 and r["checks"] >= r["checked"] - 1
        assert 0 <= r["ok"] <= r["states"]
    lamina = [r for r in rows if r["format"] == "lamina"]
    assert all(r[k] == 0 for r in lamina for k in ("unopenable", "corruption", "lost", "non-atomic"))
    assert code == 0 and out["lamina_failing"] == 0
    # reported, not asserted: what qcow2 shows is the table's business
    print("\nqcow2 rows: " + "; ".join(f"{r['workload']}/{r['model']}: {r['states']} states, {r['ok']} ok, "
                                       f"{r['corruption']} corrupt, {r['leaks']} leaking, {r['unopenable']} unopenable, "
                                       f"{r['non-atomic']} non-atomic" for r in rows if r["format"] == "qcow2"))


@needs_tools
def test_a_checker_that_always_fails_makes_every_state_fail(capsys):
    code, out = _compare(capsys, "--workload", "allocate", "--format", "lamina", "--model", "strict",
                         "--control", "failing-check")
    (row,) = out["rows"]
    assert code == 1 and row["states"] > 10
    assert row["corruption"] == row["states"] and row["ok"] == 0 and out["lamina_failing"] == row["states"]


def test_promises_inside_a_step_allow_the_old_or_new_pattern_only():
    sc = Scenario("t", "lamina", (), (Promise("a@s", 0, 512, 0x11),), (Step(("x",), (Promise("a", 0, 1024, 0xAB),)),
                  Step(("y",), (Promise("a", 512, 512, 0xCD), Promise("a@s"))),), ("a",), ("a",), ())
    after = promised_after(sc)
    assert after[0] == {"a@s": {0: 0x11}} and after[1] == {"a@s": {0: 0x11}, "a": {0: 0xAB, 1: 0xAB}}
    assert after[2] == {"a": {0: 0xAB, 1: 0xCD}}
    raw = bytes([0xAB]) * SECTOR + bytes([0xCD]) * SECTOR
    assert _first_wrong(raw, after[1]["a"], after[2]["a"], between=False) is None  # inside step 2: old or new
    assert "sector at 512" in _first_wrong(raw, after[1]["a"], {}, between=True)  # between steps: the promise only
    assert "sector at 0" in _first_wrong(bytes(2 * SECTOR), after[2]["a"], {}, between=True)  # flushed data read zero
    garbage = bytes([0xAB]) * SECTOR + bytes(range(256)) * 2
    assert "sector at 512" in _first_wrong(garbage, after[1]["a"], after[2]["a"], between=False)
    assert _first_wrong(garbage, after[1]["a"], after[2]["a"], between=False, torn={1}) is None  # a torn rewrite
    assert "sector at 0" in _first_wrong(bytes(2 * SECTOR), after[1]["a"], after[2]["a"], between=False, torn={1})


@needs_tools
def test_a_lamina_whose_flush_does_not_fsync_fails_the_same_judging(capsys):
    """The real `lamina` with `OsFile.fsync` a no-op: under reorder a created image is broken after `create` returned."""
    code, out = _compare(capsys, "--workload", "create", "--format", "lamina", "--model", "reorder",
                         "--control", "skip-file-fsync")
    (row,) = out["rows"]
    assert code == 1 and out["lamina_failing"] > 0
    assert row["unopenable"] - row["new"]["unopenable"] + row["corruption"] - row["new"]["corruption"] > 0


class _FileTools:
    """Stands in for a format's tools: IMAGE's raw contents are the file itself, IMAGE@S the file IMAGE.S."""

    def check(self, path: str) -> CheckResult:
        return CheckResult(0, 0, 0, "")

    def open_writable(self, path: str) -> str | None:
        return None

    def dump(self, where: str, ref: str, out: str) -> str | None:
        image, _, snap = ref.partition("@")
        try:
            shutil.copyfile(os.path.join(where, image + (f".{snap}" if snap else "")), out)
        except FileNotFoundError:
            return "no such snapshot"
        return None


def _state(where, files: dict[str, bytes]) -> str:
    os.makedirs(where)
    for name, data in files.items():
        with open(os.path.join(where, name), "wb") as fh:
            fh.write(data)
    return str(where)


def test_a_crash_inside_an_atomic_step_must_leave_the_before_or_the_after_view(tmp_path):
    old, new = bytes([0xAB]) * SECTOR, bytes([0xCD]) * SECTOR
    sc = Scenario("t", "fake", (), (Promise("a", 0, SECTOR, 0xAB),),
                  (Step(("snap",), (Promise("a@s", 0, SECTOR, 0xAB),), atomic=True), Step(("write",))),
                  ("a",), ("a",), ("a", "a@s"))
    tools = _FileTools()
    views = tuple(observe(tools, _state(tmp_path / f"v{i}", files), sc.views, str(tmp_path))[0]
                  for i, files in enumerate([{"a": old}, {"a": old, "a.s": old}, {"a": old, "a.s": old}]))
    judge = Judge(Recording(sc, DiskState(), (), (3, 5), views), tools, str(tmp_path))
    assert judge(_state(tmp_path / "before", {"a": old}), 1).kinds == frozenset()  # inside the snapshot: before
    assert judge(_state(tmp_path / "after", {"a": old, "a.s": old}), 2).kinds == frozenset()  # ... or after
    half = judge(_state(tmp_path / "half", {"a": old, "a.s": new}), 2)  # a snapshot of other contents: neither
    assert half.kinds == {"non-atomic"} and "a@s" in dict(half.messages)["non-atomic"]
    undone = judge(_state(tmp_path / "undone", {"a": old}), 3)  # the snapshot returned, then vanished
    assert undone.kinds == {"lost"}
    lost = judge(_state(tmp_path / "lost", {"a": new, "a.s": old}), 4)  # inside the write: a's flushed sector changed
    assert lost.kinds == {"lost"} and "sector at 0 should read 0xab" in dict(lost.messages)["lost"]
