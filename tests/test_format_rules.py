"""The rules of `spec/FORMAT.in.md` an outsider reads instead of guessing: each ID defined once, each
cited ID defined, and the rules of copy selection, naming and reading held against the code."""
from __future__ import annotations

import os
import re
import struct
from pathlib import Path

import attrs
import pytest

from lamina.impl.image import Image
from lamina.impl.layers import parse_target
from lamina.spec.check import CORRUPTION, LEAK, PENDING, check_image
from lamina.spec.errors import UnsupportedVersion
from lamina.spec.layout import Geometry
from lamina.spec.protocol import read_map_copies, read_root_copies, write_root_copy
from lamina.spec.references import LAYER_NAME, image_of
from lamina.spec.replication import select_map, select_root
from lamina.spec.structures import MAP_CRC_OFFSET, ROOT_CRC_OFFSET, encode_map_copy, structure_crc

from conftest import open_file, pattern

ROOT = Path(__file__).resolve().parent.parent
RULE_ID = re.compile(r"\bF-[A-Z]+-\d{3}\b")
DEFINITION = re.compile(r"\b(F-[A-Z]+-\d{3}):")
MiB = 1 << 20


def _defined() -> list[str]:
    return DEFINITION.findall((ROOT / "spec" / "FORMAT.in.md").read_text())


def test_every_rule_id_is_defined_once_in_the_document():
    defined = _defined()
    twice = sorted({rule for rule in defined if defined.count(rule) > 1})
    assert not twice, f"defined more than once in spec/FORMAT.in.md: {twice}"
    assert len(defined) >= 40


def test_every_rule_id_cited_anywhere_is_defined_in_the_document():
    """Code, tests, READMEs and the document itself cite only rules the document defines (`F-...:`)."""
    defined = set(_defined())
    cited: dict[str, set[str]] = {}
    sources = [ROOT / "spec" / "FORMAT.in.md", *ROOT.glob("*.md")]
    for folder in ("spec", "impl", "crashsim", "tests", "bench"):
        sources += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".c", ".h", ".txt")
                    and p.name != "FORMAT.md"]
    for path in sources:
        for rule in RULE_ID.findall(path.read_text(errors="replace")):
            cited.setdefault(rule, set()).add(str(path.relative_to(ROOT)))
    missing = {rule: sorted(where) for rule, where in cited.items() if rule not in defined}
    assert not missing, f"cited but not defined in spec/FORMAT.in.md: {missing}"


def _rewrite_root_copy(path: str, slot: int, **changes: object) -> None:
    """Write one root copy with fields changed, CRC recomputed (a copy another writer could have made)."""
    file = open_file(path, True)
    try:
        root = select_root(read_root_copies(file)).current()
        write_root_copy(file, attrs.evolve(root, **changes), slot)
        file.fsync()
    finally:
        file.close()


def _new_image(path: str) -> None:
    with Image.create(path, MiB, 4096) as image:
        image.write(0, pattern(1, 4096))


def test_copies_of_one_generation_copy_a_wins_and_a_differing_twin_is_stale(image_path):
    """F-ROOT-002: a tie goes to slot 0; equal content ignores only slot and crc."""
    _new_image(image_path)
    _rewrite_root_copy(image_path, 1, compatible_features=1)  # same generation, other content
    copies = read_root_copies(open_file(image_path))
    selection = select_root(copies)
    assert (0, 0) == (selection.slot, selection.value.compatible_features)
    assert [(1, "stale")] == [(p.slot, p.kind) for p in selection.problems]
    _rewrite_root_copy(image_path, 1)  # the same content in slot 1: only slot and crc differ
    assert () == select_root(read_root_copies(open_file(image_path))).problems


def test_an_unknown_version_in_either_copy_refuses_the_image_but_not_when_its_crc_fails(image_path):
    """F-ROOT-003 over F-ROOT-001: a verified copy of another version is fatal even at a lower generation."""
    _new_image(image_path)
    copies = read_root_copies(open_file(image_path))
    older = bytearray(copies[1])
    struct.pack_into("<I", older, 8, 2)
    struct.pack_into("<Q", older, 24, 1)  # lower generation than copy A
    struct.pack_into("<I", older, ROOT_CRC_OFFSET, structure_crc(older, ROOT_CRC_OFFSET))
    with pytest.raises(UnsupportedVersion):
        select_root([copies[0], bytes(older)])
    struct.pack_into("<I", older, ROOT_CRC_OFFSET, 0)  # the same copy, CRC broken: just invalid
    selection = select_root([copies[0], bytes(older)])
    assert (0, "invalid") == (selection.slot, selection.problems[0].kind)


def _map_copies(path: str) -> tuple[Geometry, bytes, list[bytes]]:
    file = open_file(path)
    root = select_root(read_root_copies(file)).current()
    return root.geometry, root.image_uuid, read_map_copies(file, root.geometry, 0)


@pytest.mark.parametrize("offset, value", [(16, b"\0" * 8), (40, b"\1")], ids=["generation-0", "reserved"])
def test_a_map_copy_with_generation_zero_or_reserved_bytes_is_invalid(image_path, offset, value):
    """F-MAP-001: the generation and reserved rules, beyond magic, CRC, place and uuid."""
    _new_image(image_path)
    geometry, uuid, copies = _map_copies(image_path)
    bad = bytearray(copies[1])
    bad[offset : offset + len(value)] = value
    struct.pack_into("<I", bad, MAP_CRC_OFFSET, structure_crc(bad, MAP_CRC_OFFSET))
    selection = select_map([copies[0], bytes(bad)], geometry, 0, uuid)
    assert (0, [(1, "invalid")]) == (selection.slot, [(p.slot, p.kind) for p in selection.problems])


def test_map_copies_of_one_generation_copy_a_wins(image_path):
    """F-MAP-002: a tie goes to slot 0, and a twin differing beyond slot and crc is stale."""
    _new_image(image_path)
    geometry, uuid, copies = _map_copies(image_path)
    current = select_map(copies, geometry, 0, uuid).value
    other = attrs.evolve(current, slot=1, data_crcs=(7,) + current.data_crcs[1:])
    selection = select_map([copies[0], encode_map_copy(other, geometry)], geometry, 0, uuid)
    assert (0, current.data_crcs[0]) == (selection.slot, selection.value.data_crcs[0])
    assert [(1, "stale")] == [(p.slot, p.kind) for p in selection.problems]


@pytest.mark.parametrize("listed", [False, True])
def test_two_zeroed_map_copies_over_data_are_a_leak_or_pending_never_corruption(image_path, listed):
    """F-CHECK-003 (and I3): a never-written region's bytes are unaccounted for, not committed data."""
    _new_image(image_path)
    file = open_file(image_path, True)
    geometry = select_root(read_root_copies(file)).current().geometry
    for slot in (0, 1):
        file.punch_hole(geometry.map_copy_offset(0, slot), geometry.cluster_size)
    file.fsync()
    file.close()
    if listed:
        _rewrite_root_copy(image_path, 0, intents=(0,))
        _rewrite_root_copy(image_path, 1, intents=(0,))
    report = check_image(open_file(image_path))
    kinds = {(f.kind, f.severity) for f in report.findings}
    assert not report.corruptions
    assert (("unflushed-bytes", PENDING) if listed else ("leaked-bytes", LEAK)) in kinds


def test_a_listed_region_exempts_presence_past_the_size_but_not_an_unreadable_map(image_path):
    """F-CHECK-002: I4 past the size is pending in a listed region (a shrink); no valid copy is corruption."""
    with Image.create(image_path, 2 * MiB, 4096) as image:
        image.write(MiB, pattern(2, MiB))
    _rewrite_root_copy(image_path, 0, virtual_size=MiB + 4096, intents=(2,))  # the last, partial region
    _rewrite_root_copy(image_path, 1, virtual_size=MiB + 4096, intents=(2,))
    file = open_file(image_path, True)
    file.truncate(Geometry(12, MiB + 4096).file_length)
    file.fsync()
    report = check_image(file)
    assert {("map-invariant", PENDING)} <= {(f.kind, f.severity) for f in report.findings}
    assert not report.corruptions
    geometry = Geometry(12, MiB + 4096)
    for slot in (0, 1):
        file.pwrite(geometry.map_copy_offset(2, slot), b"\xff" * 64)
    file.fsync()
    assert ("map-unrecoverable", CORRUPTION) in {(f.kind, f.severity) for f in check_image(file).findings}
    file.close()


def test_layer_names_are_lowercase_hex_only():
    """F-REF-004: an uppercase name is a path beside the top, and a file so named is its own top."""
    name = "0123456789abcdef0123456789abcdef.lam"
    assert LAYER_NAME.match(name) and not LAYER_NAME.match(name.upper().replace(".LAM", ".lam"))
    assert image_of(f"/x/disk.lam.layers/{name}") == "/x/disk.lam"
    upper = f"/x/disk.lam.layers/{name[:32].upper()}.lam"
    assert image_of(upper) == upper


def test_image_at_snapshot_splits_at_the_last_at_unless_the_file_exists(tmp_path):
    """F-SNAP-003: `a@b@snap` is image `a@b`, snapshot `snap`; an existing file named with `@` is an image."""
    path = os.path.join(tmp_path, "a@b")
    assert (path, "snap") == parse_target(path + "@snap")
    open(path + "@snap", "wb").close()
    assert (path + "@snap", None) == parse_target(path + "@snap")


def test_a_raw_base_not_a_multiple_of_512_reads_byte_by_byte(tmp_path):
    """F-MEAN-004: a recorded raw base of 1000 bytes reads its bytes, then zeros, within one sector."""
    base, top = os.path.join(tmp_path, "base.raw"), os.path.join(tmp_path, "top.lam")
    with open(base, "wb") as f:
        f.write(b"\x11" * 1024)
    Image.create(top, 4096, base=base, base_format="raw").close()
    os.truncate(base, 1000)
    _rewrite_root_copy(top, 0, base_size=1000, base_visible=1000)
    _rewrite_root_copy(top, 1, base_size=1000, base_visible=1000)
    with Image.open(top, readonly=True) as image:
        assert b"\x11" * 1000 + bytes(3096) == image.read(0, 4096)
