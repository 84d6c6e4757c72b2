"""`lamina convert -t CACHE`, and the mapped sources of a copy between raw and Lamina.

The fsync counts run the real command under strace, which `.ci/run` installs, as for the
system-call crash tests: a machine without it fails here rather than skipping the check.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lamina.impl.cli import main
from lamina.impl.convert import LaminaSource, RawSource
from lamina.impl.image import Image
from lamina.impl.osfile import OsFile, OsStorage
from lamina.spec.check import check_image

from conftest import pattern

MiB = 1 << 20
CLI = [sys.executable, "-m", "lamina.impl.cli"]


def _source(path, size: int = 24 * MiB + 1500) -> str:
    """Data, written zeroes, holes, and a last partial sector."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (offset, length) in enumerate([(0, 3 * MiB + 4096), (5 * MiB + 512, 300_000), (9 * MiB, 70_000),
                                              (size - 1500, 1500)]):
            f.seek(offset)
            f.write(pattern(i, length))
        f.seek(12 * MiB)
        f.write(bytes(4 * MiB))  # written zeroes: holes in every target
    return str(path)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _clean(path: str) -> None:
    file = OsStorage().open(path, writable=False)
    try:
        report = check_image(file)
    finally:
        file.close()
    assert report.exit_code == 0 and not report.findings, report.findings


def test_both_cache_modes_write_the_same_bytes(tmp_path):
    src = _source(tmp_path / "src.raw")
    padded = _read(src) + bytes(-os.path.getsize(src) % 512)
    maps = {}
    for cache in ("writeback", "unsafe"):
        lam, back = str(tmp_path / f"{cache}.lam"), str(tmp_path / f"{cache}.raw")
        assert 0 == main(["convert", "-t", cache, "-f", "raw", "-O", "lamina", src, lam])
        assert 0 == main(["convert", "-t", cache, "-O", "raw", lam, back])
        assert _read(back) == padded
        _clean(lam)
        with Image.open(lam, readonly=True) as image:
            maps[cache] = (list(image.extents()), image.read(0, image.virtual_size))
            assert image.root.intents == ()  # closed cleanly: nothing pending either way
    assert maps["writeback"] == maps["unsafe"]
    assert _read(str(tmp_path / "writeback.raw")) == _read(str(tmp_path / "unsafe.raw"))
    assert os.stat(tmp_path / "unsafe.raw").st_blocks < os.stat(src).st_blocks  # the written zeroes stayed holes


def test_a_bad_cache_mode_is_a_one_line_error_with_exit_1_and_writes_nothing(tmp_path, capsys):
    src = _source(tmp_path / "src.raw", 1 * MiB)
    for argv in (["convert", "-t", "none", src, str(tmp_path / "a.lam")],
                 ["convert", "-t", "writethrough", "-O", "raw", src, str(tmp_path / "a.raw")],
                 ["convert", "-t", "unsafe", "-O", "qcow2", src, str(tmp_path / "a.qcow2")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lamina: ") and "-t" in err, err
        assert not os.path.lexists(argv[-1])


@pytest.mark.parametrize("direction", ["raw->lamina", "lamina->raw"])
def test_unsafe_makes_no_fsync_and_writeback_makes_them(tmp_path, direction):
    src = _source(tmp_path / "src.raw", 8 * MiB)
    if direction == "lamina->raw":
        lam = str(tmp_path / "src.lam")
        assert 0 == main(["convert", "-f", "raw", "-O", "lamina", src, lam])
        src, target = lam, "raw"
    else:
        target = "lamina"
    counts = {}
    for cache in ("writeback", "unsafe"):
        log, dst = str(tmp_path / f"{cache}.strace"), str(tmp_path / f"out-{cache}")
        subprocess.run(["strace", "-f", "-o", log, "-e", "trace=fsync,fdatasync,sync_file_range,sync,syncfs"] + CLI +
                       ["convert", "-t", cache, "-O", target, src, dst], check=True, capture_output=True, timeout=300)
        with open(log) as f:
            counts[cache] = sum(1 for line in f if "sync" in line and "resumed>" not in line)
    assert counts["unsafe"] == 0, counts
    assert counts["writeback"] >= 1, counts


def test_a_raw_source_is_read_through_a_mapping_and_plainly_when_a_writer_holds_it(tmp_path, monkeypatch):
    """Mapped while its shared lock is held; a writer's lock, -U, and an empty file make plain reads of the same bytes."""
    src = _source(tmp_path / "src.raw", 2 * MiB + 1536)
    whole = _read(src)
    pieces = [(0, MiB), (MiB, MiB), (2 * MiB, 4096)]  # the last one reaches past the end: zeros there
    expected = [whole[p : p + n].ljust(n, b"\0") for p, n in pieces]
    reads: list[int] = []
    real = OsFile.pread
    monkeypatch.setattr(OsFile, "pread", lambda self, o, n: reads.append(n) or real(self, o, n))

    source = RawSource(src, mapped=True)
    try:
        assert source._held is not None
        got = [bytes(data) for _, _, data in source.read_pieces(pieces)]
    finally:
        source.close()
    assert got == expected and reads == []  # nothing copied through pread

    writer = OsStorage().open(src, writable=True)
    try:
        writer.lock(exclusive=True)
        for kwargs in ({"mapped": True}, {"mapped": True, "force_share": True}):
            source = RawSource(src, **kwargs)
            try:
                assert source._held is None
                assert [bytes(d) for _, _, d in source.read_pieces(pieces)] == expected
            finally:
                source.close()
    finally:
        writer.close()
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    source = RawSource(str(empty), mapped=True)
    assert source._held is None and source.virtual_size == 0 and list(source.data_ranges()) == []
    source.close()


def test_a_lamina_source_maps_what_its_top_holds_and_reads_the_rest_through_the_chain(tmp_path):
    """Pieces the top holds whole come from the mapping; pieces of a base, partly present, or shared go through read."""
    base = str(tmp_path / "base.lam")
    with Image.create(base, 16 * MiB) as image:
        image.write(0, pattern(1, 16 * MiB))
    top = str(tmp_path / "top.lam")
    with Image.create(top, 16 * MiB, base=base, base_format="lamina") as image:
        image.write(MiB, pattern(2, MiB))
        image.write(4 * MiB + 512, pattern(3, 4096))
    pieces = [(0, MiB), (MiB, MiB), (4 * MiB, MiB), (8 * MiB - 4096, 8192)]
    with Image.open(top, readonly=True) as image:
        expected = [image.read(p, n) for p, n in pieces]
        assert image.own_file_range(MiB, MiB) is not None
        assert image.own_file_range(0, MiB) is None and image.own_file_range(4 * MiB, MiB) is None
        assert image.own_file_range(8 * MiB - 4096, 8192) is None  # two regions
    source = LaminaSource(top, mapped=True)
    try:
        assert source._held is not None
        got = [(type(d), bytes(d)) for _, _, d in source.read_pieces(pieces)]
    finally:
        source.close()
    assert [d for _, d in got] == expected
    assert [t for t, _ in got] == [bytes, memoryview, bytes, bytes]
    out = str(tmp_path / "out.raw")
    assert 0 == main(["convert", "-O", "raw", top, out]) and 0 == main(["convert", "-U", "-O", "raw", top, out + "2"])
    with Image.open(top, readonly=True) as image:
        assert _read(out) == _read(out + "2") == image.read(0, 16 * MiB)


def test_a_source_too_large_to_map_is_read_plainly(tmp_path, monkeypatch):
    """A file the address space cannot take (mmap refuses it) is copied through pread, with the same bytes."""
    import mmap

    src = _source(tmp_path / "src.raw", 2 * MiB)

    def refuse(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")
    monkeypatch.setattr(mmap, "mmap", refuse)
    source = RawSource(src, mapped=True)
    try:
        assert source._held is None
    finally:
        source.close()
    lam, back = str(tmp_path / "a.lam"), str(tmp_path / "a.raw")
    assert 0 == main(["convert", "-f", "raw", src, lam]) and 0 == main(["convert", "-O", "raw", lam, back])
    assert _read(back) == _read(src)
