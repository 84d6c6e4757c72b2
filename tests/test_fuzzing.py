"""R10, R7: the structure-aware fuzzer (tests/fuzzing.py) in a bounded run, and every finding it made kept as a case.

The bounded run fails on any failure; each distinct finding of earlier
runs is kept below as its own case (seed and case number), so that it stays
fixed.  Longer runs: `python tests/fuzzing.py --cases 20000 --seed 7`, or
`LAMINA_FUZZ_CASES=20000 python -m pytest tests/test_fuzzing.py -k bounded`.
Cases are numbered by the generators: a change to them renumbers the table.
"""
from __future__ import annotations

import os

import pytest

import fuzzing

SEED = 2026
CASES = int(os.environ.get("LAMINA_FUZZ_CASES", "2000"))


def test_bounded_run(tmp_path):
    """Thousands of cases over every shape, damage and command: none may fail."""
    assert [] == [str(f) for f in fuzzing.run(SEED, range(CASES), str(tmp_path))]


def _found(seed: int, case: int, finding: str, shapes: tuple[str, ...] = fuzzing.DEFAULT_SHAPES):
    return pytest.param(seed, case, shapes, finding, id=f"{seed}-{case}")


# One case per distinct finding, each a defect since fixed (`python tests/fuzzing.py --seed S --case C`)
FOUND = [
    _found(7, 7733, "the fuzzer's own claim: a `<top>.creating` of any bytes is what a crash inside a create leaves"),
    _found(2026, 509, "a look-alike file named as a layer in the layer directory: check called it pending (exit 0)"),
    _found(2026, 901, "a foreign image under a layer's name in the layer directory: check called it pending (exit 0)"),
    _found(3, 103, "convert -O raw of an image over a Lamina base reads zeros where the base shows"),
    _found(3, 3312, "a base in a subdirectory whose own base is relative: a same-named file beside the top is read"),
    _found(3, 707, "check --repair with IMAGE.layers a symlink to another directory deletes every file there"),
    _found(3, 713, "a writable open (snapshot create) reads the files of a symlinked IMAGE.layers"),
    _found(3, 626, "io on the top reads a file outside through a symlink in the layer directory"),
    _found(3, 629, "snapshot create reads a file outside through a symlink in the layer directory"),
    _found(7, 2443, "check --repair writes into a file outside through a symlink in place of a snapshot's layer"),
    _found(3, 257, "check hangs on a FIFO in place of a snapshot's layer file"),
    _found(3, 201, "check reads a sparse 64 GiB VM-state file that its entry declares"),
    _found(3, 237, "snapshot create with a name that is not UTF-8: UnicodeEncodeError traceback"),
    _found(3, 26, "io -c 'write 0 3G': MemoryError traceback"),
    _found(3, 27, "lamina frobnicate: `lamina: lamina: argument command: invalid choice`"),
    _found(3, 1329, "snapshot create failing on a write (file size limit) leaves the frozen layer's link: check exits 3"),
    _found(3, 4518, "a map generation at 2^64-1 passes check; io write is a struct.error traceback"),
    _found(3, 9057, "next_snapshot_id at 2^64-1 passes check; snapshot create is a struct.error traceback"),
    _found(3, 27478, "a root generation at 2^64-1 passes check; io write is a struct.error traceback"),
    _found(3, 237758, "flags = 1 (commit in progress) on an image without a base: io write is an AssertionError"),
    _found(7, 1058, "resize --shrink failing on a write (file size limit): the close drops the intent, check exits 2"),
    _found(7, 2039, "commit failing midway: read-only check calls the committing state corruption; a writable open finishes it"),
    _found(7, 2478, "snapshot delete failing midway: its unshared copy `<uuid>.lam.creating` stays, check exits 3"),
    _found(1, 8, "io -r on a chain of 350 layers: RecursionError traceback", ("deep",)),
]


@pytest.mark.parametrize("seed,case,shapes,finding", FOUND)
def test_a_fuzzing_finding_stays_fixed(tmp_path, seed, case, shapes, finding):
    assert [] == [str(f) for f in fuzzing.run(seed, range(case, case + 1), str(tmp_path), shapes=shapes)], finding
