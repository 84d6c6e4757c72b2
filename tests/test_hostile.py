"""R10: hostile headers give a named error and a one-line message, never a traceback or a huge allocation.

Every declared field of the root is set to values the format forbids, in both
copies and with the CRC made valid again, so that the field's own rule (not
the checksum) must catch it; fields the format declares tolerant are shown
to be tolerated.
"""
from __future__ import annotations

import struct
import subprocess
import sys

import pytest

from lamina.impl.image import Image
from lamina.spec import errors
from lamina.spec.declare import declared_fields
from lamina.spec.layout import root_copy_offset
from lamina.spec.structures import ROOT_CRC_OFFSET, ROOT_RESERVED_TAIL, Root, structure_crc

from conftest import pattern

FORMATS = {"u32": "<I", "u64": "<Q"}

# field -> values the format forbids (each must raise a FormatError naming the problem)
FORBIDDEN = {
    "magic": [b"QFI\xfb\0\0\0\3", bytes(8)],
    "version": [0, 2, 0xFFFFFFFF],
    "cluster_bits": [0, 11, 22, 63, 0xFFFFFFFF],
    "virtual_size": [513, (1 << 50) + 512, (1 << 64) - 512],
    "generation": [0],
    "incompatible_features": [1, 2, 1 << 63],  # 1: shared-clusters without a store_uuid
    "image_uuid": [bytes(16)],
    "slot": [2, 0xFFFFFFFF],
    "num_intents": [961, 0xFFFFFFFF],
    "root_length": [4095, 4104, 1 << 20, 0xFFFFFFFF],
    "base_kind": [1, 2, 3, 0xFFFFFFFF],
    "data_generation": [0],
    "base_uuid": [b"\x01" * 16],
    "base_data_generation": [5],
    "base_size": [1 << 20],
    "intents": [(5, 3), (1 << 31,)],
    "base_path_length": [8, 4097, 0xFFFFFFFF],
    "num_snapshots": [1, 1025, 0xFFFFFFFF],
    "next_snapshot_id": [0],
    "flags": [2, 1 << 31],
    "base_visible": [512],
    "store_uuid": [b"\x01" * 16],  # without the shared-clusters feature
    "reserved": [b"\xff" * ROOT_RESERVED_TAIL],
    "crc": ["wrong"],
}
# fields whose every value a reader must accept
TOLERATED = {"compatible_features": [1 << 40], "autoclear_features": [1 << 7]}


def _set_field(raw: bytearray, name: str, value, fix_crc: bool = True) -> None:
    info = dict(declared_fields(Root))[name]
    if name == "crc":
        struct.pack_into("<I", raw, info.offset, struct.unpack_from("<I", raw, info.offset)[0] ^ 1)
        return
    if name == "intents":
        struct.pack_into("<I", raw, 76, len(value))
        struct.pack_into(f"<{len(value)}I", raw, info.offset, *value)
    elif info.kind in FORMATS:
        struct.pack_into(FORMATS[info.kind], raw, info.offset, value)
    else:
        raw[info.offset : info.offset + info.size] = value
    if fix_crc:
        struct.pack_into("<I", raw, ROOT_CRC_OFFSET, structure_crc(raw, ROOT_CRC_OFFSET))


def _rewrite_roots(path: str, name: str, value, fix_crc: bool = True) -> None:
    with open(path, "r+b") as f:
        for slot in (0, 1):
            f.seek(root_copy_offset(slot))
            raw = bytearray(f.read(4096))
            _set_field(raw, name, value, fix_crc)
            f.seek(root_copy_offset(slot))
            f.write(raw)


@pytest.fixture
def small_image(image_path) -> str:
    with Image.create(image_path, 1 << 20, 4096) as image:
        image.write(0, pattern(1, 8192))
    return image_path


def test_every_declared_field_is_covered():
    assert {name for name, _ in declared_fields(Root)} == set(FORBIDDEN) | set(TOLERATED)


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in FORBIDDEN.items() for v in vs])
def test_forbidden_value_is_refused_with_a_named_error(small_image, name, value):
    _rewrite_roots(small_image, name, value)
    with pytest.raises(errors.FormatError) as caught:
        Image.open(small_image, readonly=True)
    assert "root" in str(caught.value)


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_any_change_without_a_new_crc_is_a_bad_checksum(small_image, name):
    if name in ("magic", "crc"):
        return
    if name == "root_length":
        return  # a length past the fixed part makes the checksum cover other bytes: also caught, but as a length
    _rewrite_roots(small_image, name, FORBIDDEN[name][0], fix_crc=False)
    with pytest.raises(errors.BadChecksum):
        Image.open(small_image, readonly=True)


def test_specific_errors_for_version_feature_and_magic(small_image, tmp_path):
    _rewrite_roots(small_image, "version", 2)
    with pytest.raises(errors.UnsupportedVersion):
        Image.open(small_image)
    _rewrite_roots(small_image, "version", 1)
    _rewrite_roots(small_image, "incompatible_features", 1 << 5)
    with pytest.raises(errors.UnknownIncompatibleFeature):
        Image.open(small_image)
    raw = tmp_path / "plain.raw"
    raw.write_bytes(bytes(65536))
    with pytest.raises(errors.BadMagic):
        Image.open(str(raw))


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in TOLERATED.items() for v in vs])
def test_tolerated_fields(small_image, name, value):
    _rewrite_roots(small_image, name, value)
    with Image.open(small_image) as image:
        assert pattern(1, 8192) == image.read(0, 8192)
        kept = getattr(image.root, name)
    # compatible bits are kept; unknown auto-clear bits are cleared by a writer
    assert (value if name == "compatible_features" else 0) == kept


def test_absurd_virtual_size_never_allocates_or_hangs(small_image):
    """A 1 PiB virtual size over a tiny file: reads, map and check stay proportional to the file."""
    _rewrite_roots(small_image, "virtual_size", 1 << 50)
    with Image.open(small_image, readonly=True) as image:
        assert bytes(4096) == image.read((1 << 50) - 4096, 4096)
        extents = list(image.extents())
        assert (1 << 50) == sum(e.length for e in extents)
    with pytest.raises(errors.LaminaError):  # ext4 cannot hold the file this root describes
        Image.open(small_image)


def test_truncated_file_is_reported_not_crashed(small_image):
    from lamina.impl.osfile import OsStorage
    from lamina.spec.check import check_image

    with open(small_image, "r+b") as f:
        f.truncate(root_copy_offset(1) + 2000)  # root copy B cut in half, every region gone
    file = OsStorage().open(small_image, False)
    report = check_image(file)
    file.close()
    assert 2 == report.exit_code
    assert ["root-copy"] == [f.kind for f in report.degraded]
    assert ["file-length"] == [f.kind for f in report.corruptions]
    with open(small_image, "r+b") as f:
        f.truncate(100)  # no root copy left
    with pytest.raises(errors.FormatError):
        Image.open(small_image, readonly=True)


@pytest.mark.parametrize("command", [["info"], ["check"], ["map"], ["io", "-c", "read 0 4k"]])
def test_cli_prints_one_line_without_traceback(small_image, command):
    _rewrite_roots(small_image, "cluster_bits", 40)
    done = subprocess.run([sys.executable, "-m", "lamina.impl.cli", *command, small_image],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" not in done.stderr
    if command == ["check"]:
        assert 1 == done.returncode  # check could not complete: no usable root
        assert "cluster_bits" in done.stdout
    else:
        assert 1 == done.returncode
        assert 1 == len(done.stderr.strip().splitlines())
        assert "cluster_bits" in done.stderr


def test_hostile_map_copy_is_caught(small_image):
    """A map copy whose fields lie (region, slot, uuid), with a valid CRC, is rejected and repaired from its twin."""
    from lamina.impl.osfile import OsStorage
    from lamina.spec.check import check_image
    from lamina.spec.structures import MAP_CRC_OFFSET

    with Image.open(small_image, readonly=True) as image:
        offset = image.geometry.map_copy_offset(0, 0)
        used = image.geometry.map_used_length
    for field_offset, value in ((8, 7), (12, 1), (24, 0xAB)):
        with open(small_image, "r+b") as f:
            f.seek(offset)
            raw = bytearray(f.read(used))
            raw[field_offset] = value if raw[field_offset] != value else value ^ 0xFF  # a uuid byte may hold it already
            struct.pack_into("<I", raw, MAP_CRC_OFFSET, structure_crc(raw, MAP_CRC_OFFSET))
            f.seek(offset)
            f.write(raw)
        file = OsStorage().open(small_image, False)
        report = check_image(file)
        file.close()
        assert 3 == report.exit_code  # one lying copy beside a current twin: degraded, not corrupt
        assert any("map copy A of region 0" in f.message for f in report.degraded)
        with Image.open(small_image) as image:
            assert pattern(1, 8192) == image.read(0, 8192)
        from lamina.spec.repair import repair_image
        file = OsStorage().open(small_image, True)
        assert 0 == repair_image(file)[1].exit_code
        file.close()


@pytest.mark.parametrize("into", [1, 8, 44, 60, 63, 64, 100, -1])
def test_a_file_cut_inside_a_map_copy_is_judged_not_crashed(tmp_path, into):
    """A cut that leaves part of a map copy: the copy is short, so invalid, never a decoder's buffer error."""
    from lamina.impl.osfile import OsStorage
    from lamina.spec.check import check_image

    path = str(tmp_path / "disk.lam")
    with Image.create(path, 16 << 20) as image:
        image.write(0, pattern(65536, 1))
        geometry = image.geometry
    at = geometry.map_copy_offset(0, 0)
    with open(path, "r+b") as f:
        f.truncate(at + (geometry.map_used_length - 1 if into < 0 else into))
    file = OsStorage().open(path, False)
    report = check_image(file)
    file.close()
    assert 2 == report.exit_code and "file-length" in [f.kind for f in report.corruptions]
    with Image.open(path, readonly=True) as image:  # the region's copies are cut: it reads as never written
        assert bytes(65536) == image.read(0, 65536)
