"""The conformance kit: vectors are deterministic and self-consistent, the reference passes them all through the
driver protocol, and the runner fails drivers that are wrong in known ways (and only the vectors they should)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lamina.conform.crash import TRACE_IMAGE
from lamina.conform.errors import ScriptError
from lamina.conform.script import model_result, parse_script
from lamina.conform.vectors import CATEGORIES, file_sha256, generate, load_manifest, manifest_digest, tree_hashes
from lamina.crashsim.explore import Materialiser, Plan
from lamina.crashsim.syscalls import copy_sparse
from lamina.crashsim.tracefile import read_trace
from lamina.impl.cli import main

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = f"{sys.executable} -m lamina.conform.reference"

# A driver that is wrong in one way, chosen by its first argument; everything else is the reference's.
WRONG_DRIVER = '''
import os, sys
from lamina.conform import reference

mode, command, args = sys.argv[1], sys.argv[2], sys.argv[3:]
if command == "capabilities":
    print("dump check")  # no apply: script vectors are skipped
    sys.exit(0)
if mode == "clean-check" and command == "check":
    sys.exit(0)  # every image is clean, says nothing
if mode == "zero-dump" and command == "dump":
    from lamina.impl.layers import open_target
    try:
        with open_target(args[0], readonly=True, force_share=True) as image:
            size = image.virtual_size
    except Exception:
        sys.exit(2)
    with open(args[1], "wb") as fh:
        fh.truncate(size)  # the right size, all zeros
    sys.exit(0)
code = reference.main([command, *args])
if mode == "touch-image" and command == "dump" and code == 0:
    with open(args[0].rpartition("@")[0] or args[0], "ab") as fh:
        fh.write(b"x")  # a reader that writes
sys.exit(code)
'''


@pytest.fixture(scope="module")
def vectors(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conform") / "vectors"
    generate(str(root))
    return root


def _expect(root: Path, key: str) -> dict:
    return json.loads((root / key / "expect.json").read_text())


def _conform(capsys, impl: str, root: Path, *extra: str) -> tuple[int, str]:
    code = main(["conform", "--impl", impl, "--vectors", str(root), *extra])
    return code, capsys.readouterr().out


def test_the_reference_passes_every_vector(vectors, capsys):
    code, out = _conform(capsys, REFERENCE, vectors, "--output", "json")
    report = json.loads(out)
    manifest = load_manifest(str(vectors))
    failed = [r for r in report["results"] if r["status"] != "pass"]
    assert (0, []) == (code, failed)
    assert {c: {"pass": n, "fail": 0, "skip": 0} for c, n in manifest["counts"].items()} == report["summary"]
    assert set(CATEGORIES) == set(manifest["counts"]) and all(manifest["counts"].values())


def test_generating_twice_gives_the_same_bytes(vectors, tmp_path):
    again = tmp_path / "again"
    generate(str(again))
    assert load_manifest(str(vectors))["files"] == load_manifest(str(again))["files"]
    assert manifest_digest(str(vectors)) == manifest_digest(str(again))


def test_the_manifest_hashes_every_file_and_holes_hash_as_zeros(vectors):
    manifest = load_manifest(str(vectors))
    assert manifest["files"] == tree_hashes(str(vectors))
    on_disk = {p.relative_to(vectors).as_posix() for p in vectors.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    sample = vectors / "valid" / "cluster-4k" / "disk.lam"
    assert hashlib.sha256(sample.read_bytes()).hexdigest() == file_sha256(str(sample))
    assert manifest["spec_version"] == 1 and manifest["protocol_version"] == 1


def test_a_large_disk_stays_sparse_in_the_vector(vectors):
    image = vectors / "valid" / "large-sparse" / "disk.lam"
    st = image.stat()
    assert st.st_size >= 256 << 20
    assert st.st_blocks * 512 < st.st_size // 100, "the image must be written with holes"
    views = _expect(vectors, "valid/large-sparse")["views"]
    assert views[0]["disk_size"] == 256 << 20


def test_every_cited_rule_is_a_rule_of_the_format_document(vectors):
    document = (ROOT / "spec" / "FORMAT.md").read_text()
    defined = set(re.findall(r"(F-[A-Z]+-\d{3}):", document))
    for key in load_manifest(str(vectors))["vectors"]:
        expect = _expect(vectors, key)
        assert expect["rules"] and set(expect["rules"]) <= defined, key
        if expect["category"] == "invalid":
            assert expect["check"]["exit"] != 0 and expect["check"]["kinds"], key


def test_views_cover_the_disk_in_order(vectors):
    for key in load_manifest(str(vectors))["vectors"]:
        expect = _expect(vectors, key)
        for view in expect.get("views", []) + expect.get("outcomes", []):
            at = 0
            for offset, length, _ in view["ranges"]:
                assert offset == at and length > 0, key
                at += length
            assert at == view["disk_size"], key


def test_a_crash_state_is_rederived_from_its_trace_and_plan(vectors):
    keys = [k for k in load_manifest(str(vectors))["vectors"] if k.startswith("crash/")]
    assert 10 <= len(keys) <= 200
    torn = 0
    for key in keys:
        expect = _expect(vectors, key)
        meta = expect["crash"]
        trace = read_trace(str(vectors / key / meta["trace"]))
        plan = Plan.parse(meta["plan"])
        torn += any(o.startswith("t:") for _, o in plan.outcomes)
        state = Materialiser(trace.base, trace.ops).state(plan.crash, dict(plan.outcomes), plan.seed, meta["torn_unit"])
        data = state.files[state.names[TRACE_IMAGE]]
        image = (vectors / key / "disk.lam").read_bytes()
        assert len(image) == data.size and image == data.pread(0, data.size), key
        assert expect["check"]["exit"] in (0, 3)  # a crash never leaves corruption
    assert torn, "some states tear a write"
    from lamina.crashsim.cli import main as crashsim

    assert 0 == crashsim(["explore", str(vectors / keys[0] / "sequence.trace"), "--model", "strict",
                          "--check", "test -f {dir}/disk.lam"])  # crashsim itself explores the vector's trace


def _subset(vectors: Path, into: Path, keys: list[str]) -> Path:
    """A vectors directory of a few vectors (sparse copies: drivers here write) with a manifest listing only them."""
    manifest = load_manifest(str(vectors))
    for key in keys:
        shutil.copytree(vectors / key, into / key, copy_function=copy_sparse)
    prefix = tuple(k + "/" for k in keys)
    manifest["vectors"] = keys
    manifest["files"] = {p: h for p, h in manifest["files"].items() if p.startswith(prefix)}
    (into / "manifest.json").write_text(json.dumps(manifest))
    return into


def _statuses(report: dict) -> dict[str, str]:
    return {f"{r['category']}/{r['name']}": r["status"] for r in report["results"]}


def test_wrong_drivers_fail_the_vectors_they_should_and_pass_the_others(vectors, tmp_path, capsys):
    crash_clean = next(k for k in load_manifest(str(vectors))["vectors"]
                       if k.startswith("crash/") and _expect(vectors, k)["check"]["exit"] == 0)
    keys = ["valid/cluster-4k", "valid/damaged-root-copy", "invalid/root-both-magic", "invalid/data-checksum",
            crash_clean, "scripts/write-flush"]
    root = _subset(vectors, tmp_path / "subset", keys)
    driver = tmp_path / "wrong.py"
    driver.write_text(WRONG_DRIVER)

    code, out = _conform(capsys, f"{sys.executable} {driver} clean-check", root, "--output", "json")
    assert code == 4
    assert {"valid/cluster-4k": "pass", "valid/damaged-root-copy": "fail", "invalid/root-both-magic": "fail",
            "invalid/data-checksum": "fail", crash_clean: "pass", "scripts/write-flush": "skip"} == _statuses(json.loads(out))

    code, out = _conform(capsys, f"{sys.executable} {driver} zero-dump", root, "--output", "junit")
    assert code == 4
    suites = ET.fromstring(out)
    cases = {f"{c.get('classname').split('.')[-1]}/{c.get('name')}": c for c in suites.iter("testcase")}
    assert set(cases) == set(keys)
    failed = {k for k, c in cases.items() if c.find("failure") is not None}
    assert {"valid/cluster-4k", "valid/damaged-root-copy", "invalid/data-checksum", crash_clean} == failed
    assert cases["scripts/write-flush"].find("skipped") is not None
    assert "sha256" in cases["valid/cluster-4k"].find("failure").get("message")
    assert {"valid": ("2", "0"), "invalid": ("1", "0"), "scripts": ("0", "1"), "crash": ("1", "0")} == {
        s.get("name"): (s.get("failures"), s.get("skipped")) for s in suites.iter("testsuite")}

    code, out = _conform(capsys, f"{sys.executable} {driver} touch-image", root, "--category", "invalid")
    assert code == 4
    assert "changed, made or removed vector files" in out and "FAIL invalid/data-checksum" in out
    assert re.search(r"^invalid\s+1\s+1\s+0$", out, re.M), out  # the refused dump writes nothing: passes


def test_bad_input_is_one_line_with_a_named_error(vectors, tmp_path, capsys):
    assert 1 == main(["conform", "--impl", REFERENCE, "--vectors", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert "no such vectors directory" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    assert 1 == main(["conform", "--impl", REFERENCE, "--vectors", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert "does not parse" in err and len(err.strip().splitlines()) == 1
    root = _subset(vectors, tmp_path / "altered", ["invalid/file-shorter"])
    os.unlink(root / "invalid/file-shorter/expect.json")
    (root / "invalid/file-shorter/expect.json").write_text(_expect(vectors, "invalid/file-shorter") and "{}")
    assert 1 == main(["conform", "--impl", REFERENCE, "--vectors", str(root)])
    err = capsys.readouterr().err
    assert "is not the manifest's" in err and len(err.strip().splitlines()) == 1
    root = _subset(vectors, tmp_path / "cut", ["invalid/root-both-magic"])
    os.unlink(root / "invalid/root-both-magic/disk.lam")
    assert 1 == main(["conform", "--impl", REFERENCE, "--vectors", str(root)])
    err = capsys.readouterr().err
    assert "listed in the manifest but missing" in err and len(err.strip().splitlines()) == 1
    assert 1 == main(["vectors", str(vectors)])
    assert "not an empty directory" in capsys.readouterr().err


def test_scripts_parse_strictly_and_model_their_result():
    commands = parse_script("create 1M 4k  # size, cluster\nwrite 1k 2k 0xab\nsnapshot s\nresize 512\n")
    result = model_result(commands)
    assert 512 == result.disk.virtual_size and [("s", 1 << 20)] == [(n, d.virtual_size) for n, d in result.snapshots]
    assert b"\xab" * 2048 == result.snapshots[0][1].read(1024, 2048)
    for text, message in [("write 0 1 0xab", "create must be the first"), ("create 1M 4k\nwrite 0 1 0xabc", "pattern"),
                          ("create 1M 4k\nfrobnicate 1", "unknown command"), ("create 1M", "takes 2 arguments"),
                          ("create 1X 4k", "not a number"), ("", "empty script")]:
        with pytest.raises(ScriptError, match=message):
            parse_script(text)


SLOW_DRIVER = '''
import sys, time
if sys.argv[1] == "capabilities":
    print("check dump")
    sys.exit(0)
time.sleep(30)
'''


def test_a_driver_that_hangs_fails_by_timeout(vectors, tmp_path, capsys):
    root = _subset(vectors, tmp_path / "subset", ["invalid/root-both-magic"])
    driver = tmp_path / "slow.py"
    driver.write_text(SLOW_DRIVER)
    code, out = _conform(capsys, f"{sys.executable} {driver}", root, "--timeout", "0.5")
    assert 4 == code
    assert "FAIL invalid/root-both-magic: check disk.lam: expected exit 1: timed out" in out


def test_the_reference_driver_names_usage_and_missing_things_exit_1(vectors, tmp_path, capsys):
    from lamina.conform import reference

    snapshots = vectors / "valid" / "snapshots"
    assert 1 == reference.main(["dump", str(tmp_path / "none.lam"), str(tmp_path / "a")])
    assert 1 == reference.main(["dump", f"{snapshots / 'disk.lam'}@friday", str(tmp_path / "b")])
    assert 1 == reference.main(["frobnicate"])
    assert 0 == reference.main(["dump", f"{snapshots / 'disk.lam'}@monday", str(tmp_path / "c")])
    assert 1 == reference.main(["dump", f"{snapshots / 'disk.lam'}@monday", str(tmp_path / "c")])  # OUT exists
    (tmp_path / "bad.script").write_text("create 1M 4k\nwrite 0 1M 0x1\n")
    assert 1 == reference.main(["apply", str(tmp_path / "new.lam"), str(tmp_path / "bad.script")])
    err = capsys.readouterr().err
    assert "SnapshotNotFound" in err and "ScriptError" in err and "usage:" in err
