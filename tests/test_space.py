"""Sparse files: space follows what the guest wrote, at any virtual size; convert keeps holes."""
from __future__ import annotations

import os
import random
import resource

from lamina.impl.cli import main
from lamina.impl.image import Image

from conftest import pattern

MiB = 1 << 20


def _du(path: str) -> int:
    return os.stat(path).st_blocks * 512


def test_one_mib_written_into_one_gib_occupies_about_one_mib(image_path):
    with Image.create(image_path, 1 << 30) as image:
        rng = random.Random(1)
        for i in range(16):  # 16 scattered 64 KiB writes = 1 MiB
            image.write(rng.randrange(0, (1 << 30) // 65536) * 65536, pattern(i, 65536))
    used = _du(image_path)
    print(f"1 GiB image, 1 MiB written: {used} bytes on disk ({used / MiB:.3f} MiB)")
    assert MiB <= used <= MiB + 200 * 1024  # data plus two small map copies per touched region


def test_four_tib_image_works_with_memory_that_follows_allocation(image_path):
    size = 4 << 40
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with Image.create(image_path, size) as image:
        offsets = [0, size // 3 // 512 * 512, size - 65536]
        for i, offset in enumerate(offsets):
            image.write(offset, pattern(i, 65536))
    with Image.open(image_path) as image:
        for i, offset in enumerate(offsets):
            assert pattern(i, 65536) == image.read(offset, 65536)
        assert 4 << 40 == sum(e.length for e in image.extents())
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < 64 * MiB, f"memory grew by {grown} bytes for a 4 TiB image"
    assert _du(image_path) < 2 * MiB
    assert 0 == main(["check", image_path])


def test_convert_round_trips_a_raw_file_and_keeps_holes(tmp_path):
    raw = tmp_path / "disk.raw"
    size = 64 * MiB + 1536
    with open(raw, "wb") as f:
        f.truncate(size)
        for i, offset in enumerate([0, 5 * MiB + 512, 40 * MiB, size - 1536]):
            f.seek(offset)
            f.write(pattern(i, 1536 if offset == size - 1536 else 300_000))
        f.seek(20 * MiB)
        f.write(bytes(3 * MiB))  # explicit zeroes must come out sparse too
    lam, back = str(tmp_path / "disk.lam"), str(tmp_path / "back.raw")
    assert 0 == main(["convert", "-O", "lamina", str(raw), lam])
    assert 0 == main(["convert", "-O", "raw", lam, back])
    with open(back, "rb") as f:
        assert raw.read_bytes() == f.read()
    assert _du(back) <= _du(str(raw)) - 3 * MiB + 64 * 1024
    assert _du(lam) < 2 * MiB
    assert 0 == main(["check", lam])


def test_raw_with_partial_last_sector_is_padded(tmp_path):
    raw = tmp_path / "odd.raw"
    raw.write_bytes(b"\x07" * 1000)
    lam = str(tmp_path / "odd.lam")
    assert 0 == main(["convert", str(raw), lam])
    with Image.open(lam, readonly=True) as image:
        assert 1024 == image.virtual_size
        assert b"\x07" * 1000 + bytes(24) == image.read(0, 1024)
