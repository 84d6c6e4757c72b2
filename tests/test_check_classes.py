"""R12: every `check` finding has a class, and the class says whether a crash can leave it.

Corruption (exit 2) is what no crash of the protocol produces; one bad copy
beside a current twin is degraded redundancy and a leak is wasted space
(exit 3); the pending work of an interrupted operation is a note (exit 0).
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from lamina.impl import layers
from lamina.impl.cli import main
from lamina.impl.image import Image
from lamina.spec.check import CORRUPTION, DEGRADED, FINDING_CLASSES, FINDING_KINDS, LEAK, PENDING, Finding, check_image
from lamina.spec.document import render
from lamina.spec.errors import CommittingWithoutBase
from lamina.spec.structures import FLAG_COMMITTING
from lamina.spec.tree import check_tree
from lamina.impl.osfile import OsStorage

from conftest import open_file, pattern

MiB = 1 << 20
ROOT = Path(__file__).resolve().parent.parent


def test_every_finding_kind_has_a_documented_class_and_exit_code():
    assert {CORRUPTION: 2, DEGRADED: 3, LEAK: 3, PENDING: 0} == {c: code for c, (code, _) in FINDING_CLASSES.items()}
    document = render()
    for kind, cls, _ in FINDING_KINDS:
        assert cls in FINDING_CLASSES
        assert f"| `{kind}` | *{cls}* |" in document
    names = {"CORRUPTION": CORRUPTION, "DEGRADED": DEGRADED, "LEAK": LEAK, "PENDING": PENDING}
    made = set()
    for path in sorted((ROOT / "spec").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == Finding.__name__:
                arg = node.args[0]
                choices = [arg.body, arg.orelse] if isinstance(arg, ast.IfExp) else [arg]
                classes = {getattr(c, "id", ast.unparse(c)) for c in choices}
                assert classes <= set(names), f"{path.name}: a finding's class must be named in the call"
                made |= {(node.args[1].value, names[c]) for c in classes}
    assert made and made <= {(kind, cls) for kind, cls, _ in FINDING_KINDS}, sorted(made - {(k, c) for k, c, _ in FINDING_KINDS})


def test_check_in_the_middle_of_a_write_reports_pending_work_not_corruption(image_path, capsys):
    """What a power failure leaves mid-write (listed regions, unflushed bytes) is a note, exit 0."""
    with Image.create(image_path, MiB, 4096) as image:
        image.write(0, pattern(1, 8192))
    image = Image.open(image_path)
    try:
        image.write(4096, pattern(2, 8192))  # listed in the intents, not flushed: the file is as a crash leaves it
        assert 0 == main(["check", "-U", "--output", "json", image_path])  # the writer holds the lock
        report = json.loads(capsys.readouterr().out)
        assert (0, 0, 0) == (report["corruptions"], report["degraded"], report["leaks"])
        assert report["pending_recovery"] >= 1
        assert 0 == main(["check", "-U", image_path])
        out = capsys.readouterr().out
        assert "PENDING:" in out and "a writable open finishes it" in out
    finally:
        image.close()


def test_one_damaged_copy_is_degraded_in_text_and_json(image_path, capsys):
    with Image.create(image_path, MiB, 4096) as image:
        image.write(0, pattern(1, 4096))
    with open(image_path, "r+b") as f:
        f.write(b"rot")  # root copy A
    assert 3 == main(["check", "--output", "json", image_path])
    report = json.loads(capsys.readouterr().out)
    assert (0, 1, 0, 3) == (report["corruptions"], report["degraded"], report["leaks"], report["exit_code"])
    assert ["degraded"] == [f["severity"] for f in report["findings"]]
    assert 3 == main(["check", image_path])
    assert "repair is recommended" in capsys.readouterr().out
    assert 0 == main(["check", "--repair", image_path])


def test_committing_mark_without_a_base_is_corruption_a_named_error_and_repaired(image_path, capsys):
    """The flag once passed check and made every writable open an AssertionError."""
    with Image.create(image_path, MiB, 4096) as image:
        image.write(0, pattern(3, 8192))
        image.set_root(flags=FLAG_COMMITTING)
    file = open_file(image_path)
    report = check_image(file)
    file.close()
    assert 2 == report.exit_code
    assert ["commit-flag"] == [f.kind for f in report.corruptions]
    with pytest.raises(CommittingWithoutBase, match="no base"):
        Image.open(image_path)
    assert 1 == main(["io", image_path, "-c", "write 0 512"])
    err = capsys.readouterr().err
    assert err.startswith("lamina: ") and "committing" in err and len(err.strip().splitlines()) == 1
    assert 0 == main(["check", "--repair", image_path])
    with Image.open(image_path) as image:
        assert 0 == image.root.flags
        assert pattern(3, 8192) == image.read(0, 8192)


def test_an_interrupted_commit_is_pending_before_the_next_open(tmp_path, monkeypatch):
    """A top marked committing whose base the commit already wrote: pending, and the open finishes it."""
    monkeypatch.chdir(tmp_path)
    with Image.create("m.lam", MiB) as base:
        base.write(0, pattern(3, 8192))
    with Image.create("t.lam", base="m.lam") as top:
        top.write(4096, pattern(4, 512))
        top.set_root(flags=FLAG_COMMITTING)
    with Image.open("m.lam") as base:
        base.write(4096, pattern(4, 256))
    report = check_tree("t.lam", OsStorage())
    assert 0 == report.exit_code
    assert ["base-reference"] == [f.kind for f in report.pending]
    Image.open("t.lam").close()
    assert [] == list(check_tree("t.lam", OsStorage()).findings)


def test_an_interrupted_snapshot_leaves_pending_orphans(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.create("d.lam", MiB).close()
    layers.create_snapshot("d.lam", "s")
    Path("d.lam.creating").write_bytes(b"a new top a crash kept from its rename")
    report = check_tree("d.lam", OsStorage())
    assert (0, ["orphan-file"]) == (report.exit_code, [f.kind for f in report.pending])


# Asserts that check the code's own invariants, not bytes read from a file (which get named errors).
INTERNAL_ASSERTS = {
    ("impl/image.py", "m is not None"),  # _map(for_write=True) always returns a map
    ("impl/image.py", "found is not None"),  # reference_base sets a base kind, so resolve_base returns a path
    ("spec/references.py", "base_root is not None"),  # callers pass the base's root for a Lamina base
    ("spec/replication.py", "best is not None"),  # the selection rule never prefers an invalid copy over a valid one
}


def test_no_assert_judges_data_read_from_a_file():
    """A hostile or damaged file must meet a named error, never an AssertionError (or nothing, under -O)."""
    found = set()
    for path in sorted((ROOT / "impl").glob("*.py")) + sorted((ROOT / "spec").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                found.add((path.relative_to(ROOT).as_posix(), ast.unparse(node.test)))
    assert found <= INTERNAL_ASSERTS, sorted(found - INTERNAL_ASSERTS)


def test_a_forged_commit_mark_over_a_snapshot_never_writes_the_snapshot(image_path, capsys):
    """F-COMMIT-001: a committing root whose base is a frozen layer is corruption, refused before any write."""
    from lamina.impl.layers import create_snapshot, open_target
    from lamina.spec.errors import CommittingIntoSnapshot
    from lamina.spec.structures import FLAG_COMMITTING

    with Image.create(image_path, MiB, 4096) as image:
        image.write(0, pattern(1, 4096))
    create_snapshot(image_path, "s1")
    with Image.open(image_path) as image:
        image.write(0, pattern(2, 4096))
        image.set_root(flags=image.root.flags | FLAG_COMMITTING)
    assert 2 == main(["check", image_path])
    assert "its base is a snapshot" in capsys.readouterr().out
    with pytest.raises(CommittingIntoSnapshot):
        Image.open(image_path).close()
    with open_target(image_path + "@s1") as snap:
        assert pattern(1, 4096) == snap.read(0, 4096)
    assert 0 == main(["check", "--repair", image_path])
