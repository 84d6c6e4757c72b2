"""The crash simulator: backend, persistence models, explorer, oracle, and the named-workload suite (C1-C4)."""
from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lamina.crashsim.cli import main
from lamina.crashsim.errors import BadPlan, UnknownModel, UnknownWorkload
from lamina.crashsim.explore import DEFAULT_MODELS, Budget, Materialiser, Model, Plan, barrier_of, explore, pending_at
from lamina.crashsim.controls import variant
from lamina.crashsim.memstore import BLOCK, DiskState, FileData, MemStorage, ReadOnlyStorage, Trace
from lamina.crashsim.record import IMAGE_PATH
from lamina.crashsim.oracle import Legal, Opened, Outcome, judge, legal_at
from lamina.crashsim.record import record_workload
from lamina.crashsim.runner import Explorer, load_recording, replay, run_task
from lamina.crashsim.workloads import LIBRARY, get_workload, random_workload
from lamina.impl.image import Image
from lamina.spec.abstraction import abstract_image
from lamina.spec.check import check_image


# ------------------------------------------------------------------ backend (C1)
@given(st.lists(st.tuples(st.sampled_from(["w", "p", "t"]), st.integers(0, 3 * BLOCK), st.integers(0, 2 * BLOCK),
                          st.integers(1, 255)), max_size=12))
def test_memfile_matches_a_flat_bytearray(ops):
    """The sparse-block file behaves exactly like a flat byte array (holes read as zero)."""
    f = FileData()
    flat = bytearray()
    for kind, offset, length, byte in ops:
        if kind == "w":
            data = bytes([byte]) * length
            f.pwrite(offset, data)
            if length and offset + length > len(flat):  # a zero-length write never extends a file
                flat.extend(bytes(offset + length - len(flat)))
            flat[offset : offset + length] = data
        elif kind == "p":
            f.punch_hole(offset, length)
            end = min(offset + length, len(flat))
            if end > offset:
                flat[offset:end] = bytes(end - offset)
        else:
            f.truncate(offset)
            flat = flat[:offset] + bytearray(max(0, offset - len(flat)))
    assert len(flat) == f.size
    assert bytes(flat) == f.pread(0, f.size + 10)
    for start, length in f.data_extents():
        assert start + length <= f.size
    covered = bytearray(len(flat))
    for start, length in f.data_extents():
        covered[start : start + length] = b"\1" * length
    assert all(covered[i] for i, b in enumerate(flat) if b)


def test_recording_backend_records_every_mutation_with_its_data():
    storage = MemStorage()
    image = Image.create("d/x", 1 << 20, 4096, storage=storage)
    image.close()
    trace = Trace()
    storage.trace = trace
    image = Image.open("d/x", storage=storage)
    image.write(0, b"\xab" * 4096)
    image.close()
    kinds = [op.kind for op in trace.ops]
    assert "pwrite" in kinds and "fsync" in kinds
    data_write = [op for op in trace.ops if op.kind == "pwrite" and op.data == b"\xab" * 4096]
    assert len(data_write) == 1
    assert check_image(storage.open("d/x", writable=False)).exit_code == 0


def test_namespace_ops_are_recorded_and_replayed():
    rec = record_workload(LIBRARY["create"])
    kinds = [op.kind for op in rec.ops]
    assert kinds[:1] == ["create"] and "rename" in kinds and "fsync_dir" in kinds
    mat = Materialiser(rec.base, rec.ops)
    rename = kinds.index("rename")
    assert "vm/disk.lam" not in mat.state(rename, {}, 0).names
    assert "vm/disk.lam" in mat.state(rename + 1, {}, 0).names


# ------------------------------------------------------------------ persistence models (C2)
def test_model_names_parse_and_combine():
    assert Model.parse("strict") == Model()
    assert Model.parse("reorder+torn+namespace") == Model(True, 512, True)
    assert Model.parse("torn4k").torn_unit == 4096
    assert Model.parse("namespace+reorder").name == "reorder+namespace"
    with pytest.raises(UnknownModel):
        Model.parse("reorder+bogus")


def test_fsync_makes_earlier_ops_of_its_file_durable():
    rec = record_workload(LIBRARY["overwrite"])
    ops = rec.ops
    strict = barrier_of(ops, Model())
    assert all(pending_at(strict, c) == [] for c in range(len(ops) + 1))
    reorder = barrier_of(ops, Model(reorder=True))
    for crash in range(len(ops) + 1):
        for i in pending_at(reorder, crash):
            assert ops[i].kind in ("pwrite", "punch", "truncate")
            assert not any(op.kind == "fsync" for op in ops[i + 1 : crash])


def test_namespace_model_keeps_renames_pending_until_directory_fsync():
    rec = record_workload(LIBRARY["create"])
    ops = rec.ops
    rename = [i for i, op in enumerate(ops) if op.kind == "rename"][0]
    dir_sync = [i for i, op in enumerate(ops) if op.kind == "fsync_dir"][0]
    with_ns = barrier_of(ops, Model(namespace=True))
    without = barrier_of(ops, Model())
    assert rename in pending_at(with_ns, dir_sync)
    assert rename not in pending_at(without, dir_sync)
    assert rename not in pending_at(with_ns, dir_sync + 1)


def test_torn_write_persists_sector_by_sector():
    rec = record_workload(LIBRARY["allocate"])
    mat = Materialiser(rec.base, rec.ops)
    index = next(i for i, op in enumerate(rec.ops) if op.kind == "pwrite" and len(op.data) == 4096 and op.offset > 8192)
    op = rec.ops[index]
    state = mat.state(index + 1, {index: "t:" + "no" * 4}, 0, 512)
    inode = state.names["vm/disk.lam"]
    got = state.files[inode].pread(op.offset, 4096)
    old = mat.checkpoints[index].files[inode].pread(op.offset, 4096)
    for k in range(8):
        sector = slice(k * 512, (k + 1) * 512)
        assert got[sector] == (op.data[sector] if k % 2 == 0 else old[sector])


# ------------------------------------------------------------------ explorer (C3)
def test_explorer_tiers_never_repeat_a_state_and_prefix_covers_every_crash_point():
    rec = record_workload(LIBRARY["multi-region"])
    seen = set()
    prefix = []
    for tier, crash, outcomes, _ in explore(rec.ops, Model.parse("reorder+torn"), Budget(), 7):
        key = (crash, tuple(sorted(outcomes.items())))
        assert key not in seen
        seen.add(key)
        if tier == "prefix":
            prefix.append(crash)
    assert prefix == list(range(len(rec.ops) + 1))


def test_subsets_are_exhaustive_up_to_k_and_sampled_with_the_seed_beyond():
    rec = record_workload(get_workload("random-1-8"))
    model = Model.parse("reorder")
    small = [(t, c, o, e) for t, c, o, e in explore(rec.ops, model, Budget(max_subset=1), 3) if t == "subsets"]
    assert small and not any(e for *_, e in small)
    again = [(t, c, o, e) for t, c, o, e in explore(rec.ops, model, Budget(max_subset=1), 3) if t == "subsets"]
    assert small == again
    big = [e for t, *_, e in explore(rec.ops, model, Budget(max_subset=20, max_combos=10**6), 3) if t == "subsets"]
    assert big and all(big)


# ------------------------------------------------------------------ oracle (C4)
def test_legal_set_after_a_flush_is_the_flushed_contents_only():
    rec = record_workload(LIBRARY["overwrite"])
    flush = next(e for e in rec.events if e.kind == "flush")
    (legal,) = legal_at(rec, flush.end).outcomes
    assert legal.alternatives == {}
    assert dict(legal.flushed) == dict(flush.disk.sectors)
    assert flush.end == flush.start + 1  # a flush of overwrites is one fsync (F-PROTO-005)
    (during,) = legal_at(rec, flush.start).outcomes
    assert during.alternatives  # before that fsync the write before the flush is not acknowledged yet


def test_judge_rejects_a_sector_that_is_neither_old_nor_new():
    legal = Legal((Outcome(4096, {0: b"a" * 512}, {0: frozenset({b"b" * 512})}),), False)
    assert judge(Opened(None, 4096, {0: b"a" * 512}), legal) is None
    assert judge(Opened(None, 4096, {0: b"b" * 512}), legal) is None
    assert judge(Opened(None, 4096, {}), legal) is not None  # the flushed sector vanished
    assert judge(Opened(None, 4096, {0: b"c" * 512}), legal) is not None
    assert judge(Opened(None, 8192, {0: b"a" * 512}), legal) is not None  # a resize that never happened
    assert judge(Opened(None, 4096, {}, exists=False), legal) is not None


# A shrink that cuts the file before its root write (durably), crashed in between: after recovery the old
# size is back and the flushed sectors past the new size read zero.  The oracle once judged the size and
# each sector apart (zero was "legal" for a sector a shrink drops) and accepted it.
SHRINK_CUT_FIRST = "v=shrink-cut-before-root/w=resize/x=4/m=strict/s=0/p=24"
# The same defect shrunk to its minimum: caught before recovery, by the read-only check (file too short).
SHRINK_CUT_FIRST_MINIMAL = "v=shrink-cut-before-root/w=resize/x=1,2,4/m=strict/s=0/p=13"


def test_size_and_contents_are_judged_as_one_outcome():
    plan = Plan.parse(SHRINK_CUT_FIRST)
    rec = load_recording(plan.workload, plan.dropped_steps, plan.variant)
    state = Explorer(rec, Model.parse(plan.model), plan.seed).state(plan.crash, {})
    with variant(plan.variant):
        disk = abstract_image(Image.open(IMAGE_PATH, storage=MemStorage(state)).file)
    legal = legal_at(rec, plan.crash)
    flushed = legal.outcomes[0]
    assert disk.virtual_size == flushed.size  # the old size is back...
    assert any(disk.sectors.get(s, bytes(512)) != v for s, v in flushed.flushed.items())  # ...without its flushed data
    assert "no legal outcome" in judge(Opened(None, disk.virtual_size, disk.sectors), legal)
    assert replay(plan)[1] is not None
    assert replay(attrs.evolve(plan, variant=None))[1] is None  # the implementation writes the root first


def test_every_crash_state_is_checked_read_only_before_recovery():
    result = run_task("resize", "reorder+torn", Budget(), seed=0)
    assert result.failing_states == 0
    assert result.prechecked == result.states  # every state judged, recovery-tier states included
    assert result.precheck_corrupt == 0
    assert result.prechecks.get("3", 0) > 0  # copies being rewritten (degraded), tails not yet cut (leaks)
    message = replay(Plan.parse(SHRINK_CUT_FIRST_MINIMAL))[1]
    assert message.startswith("read-only check of vm/disk.lam before recovery: exit 2 (corruption:file-length")
    read_only = ReadOnlyStorage(MemStorage(Explorer(record_workload(LIBRARY["allocate"]), Model(), 0).state(0, {})))
    with pytest.raises(PermissionError):
        read_only.open(IMAGE_PATH, writable=True)
    with pytest.raises(PermissionError):
        read_only.unlink(IMAGE_PATH)


@pytest.mark.parametrize("workload", sorted(LIBRARY))
def test_named_workloads_survive_every_model(workload):
    """The must-show result: zero failing states for every named workload under every default model."""
    for model in DEFAULT_MODELS:
        result = run_task(workload, model, Budget(), seed=0)
        assert [] == [f.message for f in result.failures], (workload, model)
        assert result.counts["prefix"] == result.ops + 1
        assert result.counts.get("recovery", 0) > 0  # crashes during recovery were explored too
        assert result.precheck_corrupt == 0 and result.prechecked > 0


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**6))
def test_random_workloads_survive_reorder_and_tear(seed):
    result = run_task(f"random-{seed}-6", "reorder+torn", Budget(max_subset=4, recovery_images=2), seed=seed)
    assert [] == [f.plan for f in result.failures]


def test_random_workloads_regenerate_from_their_name():
    assert get_workload("random-5-7") == random_workload(5, 7)
    with pytest.raises(UnknownWorkload):
        get_workload("no-such-workload")


# ------------------------------------------------------------------ plans and replay
def test_plan_strings_round_trip():
    plan = Plan("overwrite", "reorder+torn", 3, 17, ((12, "d"), (14, "t:ong")), (1, 2), "skip-intent", 4, ((2, "d"),),
                (11, 12, 14))
    text = plan.to_string()
    assert Plan.parse(text) == plan
    assert "'" not in text and " " not in text
    with pytest.raises(BadPlan):
        Plan.parse("w=overwrite/p=3/o=5z")
    with pytest.raises(BadPlan):
        Plan.parse("bogus")


def test_replay_refuses_an_outcome_for_an_op_that_is_not_unsynced():
    with pytest.raises(BadPlan):
        replay(Plan.parse("w=overwrite/m=reorder/p=3/o=0d"))


def test_cli_run_json_and_exit_code(capsys):
    code = main(["run", "allocate", "--model", "strict,reorder", "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    assert 0 == code
    assert ["strict", "reorder"] == [r["model"] for r in out["results"]]
    assert all(r["failing_states"] == 0 and r["states"] > 0 for r in out["results"])
    assert all(r["prechecked"] == r["states"] and r["precheck_corrupt"] == 0 for r in out["results"])
    assert 0 == main(["run", "allocate", "--model", "strict"])
    assert "crash states checked read-only before recovery" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_documented_codes(capsys):
    assert 6 == main(["run", "nope"])
    assert 6 == main(["run", "allocate", "--model", "bogus"])
    assert 5 == main(["replay", "w=overwrite"])
    err = capsys.readouterr().err.strip().splitlines()
    assert 3 == len(err) and all(line.startswith("crashsim: error:") for line in err)


def test_cli_report_is_self_contained_html(tmp_path, capsys):
    report = tmp_path / "r.html"
    assert 1 == main(["run", "overwrite", "--model", "torn", "--control", "skip-map-copy-fsync", "--report", str(report)])
    text = report.read_text()
    assert "<svg" in text and "crashsim replay" in text and "<script" not in text and "http" not in text.replace("http://www.w3.org/2000/svg", "")
    out = capsys.readouterr().out
    assert "FAIL overwrite [torn]" in out and "replay: crashsim replay" in out


def test_any_executor_gives_the_same_counts_as_in_process():
    """Tasks are picklable and deterministic, so where they run does not change what they find."""
    from concurrent.futures import ThreadPoolExecutor

    from lamina.crashsim.runner import run_all

    tasks = [("allocate", "reorder"), ("discard", "torn")]
    budget = Budget(max_subset=3, recovery_images=2)
    here = run_all(tasks, budget, seed=4)
    with ThreadPoolExecutor(2) as pool:
        threads = run_all(tasks, budget, seed=4, executor=pool)
    processes = run_all(tasks, budget, seed=4, jobs=2)
    assert [r.counts for r in here] == [r.counts for r in threads] == [r.counts for r in processes]
    assert [r.distinct_images for r in here] == [r.distinct_images for r in processes]


def test_directory_fsync_covers_names_however_the_directory_is_spelled():
    """Regression: impl fsyncs os.path.abspath(dirname) while naming files relatively; one directory, one barrier."""
    import os

    storage = MemStorage(trace=Trace())
    storage.create("vm/a")
    storage.rename("vm/a", "vm/b")
    storage.fsync_dir(os.path.abspath("vm"))
    ops = storage.trace.ops
    assert [] == pending_at(barrier_of(ops, Model(namespace=True)), len(ops))


def test_file_to_guest_inverts_the_layout():
    from lamina.crashsim.runner import file_to_guest
    from lamina.spec.layout import Geometry

    g = Geometry(12, 2 * 128 * 4096)
    for guest in range(0, g.virtual_size, 4096 * 37 + 512):
        assert guest == file_to_guest(g, g.guest_to_file(guest))
    assert file_to_guest(g, g.map_copy_offset(1, 0)) is None
    assert file_to_guest(g, g.map_copy_offset(0, 1)) is None
    assert file_to_guest(g, 0) is None


def test_link_mkdir_listdir_follow_the_storage_interface():
    storage = MemStorage(trace=Trace())
    storage.mkdir("vm/layers")
    f = storage.create("vm/layers/a")
    f.pwrite(0, b"x")
    storage.link("vm/layers/a", "vm/layers/b")
    assert storage.exists("vm/layers")
    assert ["a", "b"] == storage.listdir("vm/layers")
    assert ["layers"] == storage.listdir("vm")
    assert b"x" == storage.open("vm/layers/b", writable=False).pread(0, 1)
    assert ["mkdir", "create", "pwrite", "link"] == [op.kind for op in storage.trace.ops]
    mat = Materialiser(DiskState(), storage.trace.ops)
    assert "vm/layers/b" in mat.state(len(storage.trace.ops), {}, 0).names
