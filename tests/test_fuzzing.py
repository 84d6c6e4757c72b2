"""R10, R7: the structure-aware fuzzer (tests/fuzzing.py) in a bounded run, and every finding it made kept as a case.

The bounded run fails on any failure that no entry of `KNOWN` explains;
a known one is a defect being fixed elsewhere and has its own strict xfail
below, so that its fix shows up as an XPASS (then drop the entry and the
mark).  Longer runs: `python tests/fuzzing.py --cases 20000 --seed 7`, or
`LAMINA_FUZZ_CASES=20000 python -m pytest tests/test_fuzzing.py -k bounded`.
Cases are numbered by the generators: a change to them renumbers the table.
"""
from __future__ import annotations

import os
from typing import Callable

import pytest

import fuzzing
from fuzzing import Failure

SEED = 2026
CASES = int(os.environ.get("LAMINA_FUZZ_CASES", "2000"))

# Known defects, each one fixed on another branch: (what, does this failure belong to it)
KNOWN: list[tuple[str, Callable[[Failure], bool]]] = [
    ("a Lamina base's own relative base resolves against the top's directory",
     lambda f: f.oracle in ("data", "false-clean") and f.shape.startswith("chain-elsewhere")),
    ("convert drops the base chain", lambda f: f.oracle == "data" and f.command[0] == "convert"),
    ("a symlinked IMAGE.layers is followed: its files are read and deleted",
     lambda f: f.oracle == "escape" and "layers-symlink" in f.damage),
    ("symlinks in the layer directory are followed out of the image",
     lambda f: f.oracle == "escape" and "symlink" in f.damage),
    ("a FIFO in the layer directory hangs the tools", lambda f: f.oracle == "hang" and "fifo" in f.damage),
    ("a declared VM-state size makes the tools read gigabytes of holes",
     lambda f: f.oracle == "hang" and "vmstate-size" in f.damage),
    ("a snapshot name that is not UTF-8 is a traceback",
     lambda f: f.oracle == "traceback" and "UnicodeEncodeError" in f.detail),
    ("a counter at 2^64-1 passes check; the next write is a struct.error",
     lambda f: f.oracle == "traceback" and f.detail.startswith("struct.error")),
    ("the commit-in-progress flag on an image without a base passes check; a writable open is an AssertionError",
     lambda f: f.oracle == "traceback" and f.detail.startswith("AssertionError") and "field flags" in f.damage),
    ("a chain a few hundred layers deep is a RecursionError", lambda f: f.oracle == "traceback" and "RecursionError" in f.detail),
    ("an io length of gigabytes is a MemoryError", lambda f: f.oracle == "memory" and f.command[0] == "io"),
    ("a bad command prints `lamina: lamina: ...`", lambda f: f.oracle == "message" and "lamina: lamina:" in f.detail),
    ("a write that fails midway (a full disk, here a file size limit) leaves what check calls a leak or corruption",
     lambda f: f.oracle == "left-unclean" and "limited" in f.damage),
]


def known(failure: Failure) -> str | None:
    return next((what for what, belongs in KNOWN if belongs(failure)), None)


def test_bounded_run(tmp_path):
    """Thousands of cases over every shape, damage and command; nothing but known defects may fail."""
    failures = fuzzing.run(SEED, range(CASES), str(tmp_path))
    unknown = [f for f in failures if known(f) is None]
    assert [] == [str(f) for f in unknown]


def _elsewhere(seed: int, case: int, finding: str, shapes: tuple[str, ...] = fuzzing.DEFAULT_SHAPES):
    return pytest.param(seed, case, shapes, id=f"{seed}-{case}",
                        marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason=finding))


# One case per distinct finding of a defect fixed on another branch (`python tests/fuzzing.py --seed S --case C`)
FOUND_ELSEWHERE = [
    _elsewhere(3, 103, "convert -O raw of an image over a Lamina base reads zeros where the base shows"),
    _elsewhere(3, 3312, "a base in a subdirectory whose own base is relative: a same-named file beside the top is read"),
    _elsewhere(3, 707, "check --repair with IMAGE.layers a symlink to another directory deletes every file there"),
    _elsewhere(3, 713, "a writable open (snapshot create) reads the files of a symlinked IMAGE.layers"),
    _elsewhere(3, 626, "io on the top reads a file outside through a symlink in the layer directory"),
    _elsewhere(3, 629, "snapshot create reads a file outside through a symlink in the layer directory"),
    _elsewhere(7, 2443, "check --repair writes into a file outside through a symlink in place of a snapshot's layer"),
    _elsewhere(3, 257, "check hangs on a FIFO in place of a snapshot's layer file"),
    _elsewhere(3, 201, "check reads a sparse 64 GiB VM-state file that its entry declares"),
    _elsewhere(3, 237, "snapshot create with a name that is not UTF-8: UnicodeEncodeError traceback"),
    _elsewhere(3, 26, "io -c 'write 0 3G': MemoryError traceback"),
    _elsewhere(3, 27, "lamina frobnicate: `lamina: lamina: argument command: invalid choice`"),
    _elsewhere(3, 1329, "snapshot create failing on a write (file size limit) leaves the frozen layer's link: check exits 3"),
    _elsewhere(3, 4518, "a map generation at 2^64-1 passes check; io write is a struct.error traceback"),
    _elsewhere(3, 9057, "next_snapshot_id at 2^64-1 passes check; snapshot create is a struct.error traceback"),
    _elsewhere(3, 27478, "a root generation at 2^64-1 passes check; io write is a struct.error traceback"),
    _elsewhere(3, 237758, "flags = 1 (commit in progress) on an image without a base: io write is an AssertionError"),
    _elsewhere(7, 1058, "resize --shrink failing on a write (file size limit): the close drops the intent, check exits 2"),
    _elsewhere(7, 2039, "commit failing midway: read-only check calls the committing state corruption; a writable open finishes it"),
    _elsewhere(7, 2478, "snapshot delete failing midway: its unshared copy `<uuid>.lam.creating` stays, check exits 3"),
    _elsewhere(1, 8, "io -r on a chain of 350 layers: RecursionError traceback", ("deep",)),
]


@pytest.mark.parametrize("seed,case,shapes", FOUND_ELSEWHERE)
def test_finding_fixed_elsewhere(tmp_path, seed, case, shapes):
    assert [] == [str(f) for f in fuzzing.run(seed, range(case, case + 1), str(tmp_path), shapes=shapes)]
