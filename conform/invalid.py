"""The `invalid` category: images that each break one rule of FORMAT.md, with the verdict that rule gives.

Each case is designed from its rule: the damage is the smallest change that
breaks it (one field forged with a valid CRC, one byte flipped, one file
cut or swapped), and the expectation (check's exit code and finding kinds,
whether a reader must refuse) is what the rule's text says.  Generation
fails when the reference disagrees, so the vectors also hold the reference
to its document.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import attrs

from lamina.impl.image import Image
from lamina.impl.layers import create_snapshot, revert_snapshot
from lamina.spec.layout import MAX_COUNTER, Geometry, root_copy_offset
from lamina.spec.structures import BASE_LAMINA, FLAG_COMMITTING

from . import reference
from .build import KiB, MiB, current_root, expect_check, expect_views, flip, forge_root, new_vector, patch, pattern, \
    write_image
from .errors import GenerationError

G4K = Geometry(12, 1 * MiB)  # the geometry of the 1 MiB, 4 KiB-cluster images below


def _plain(path: str = "disk.lam") -> None:
    write_image(path, 1 * MiB, 4 * KiB, [(0, pattern(1, 12 * KiB)), (520 * KiB, pattern(2, 4096))])


def _layer_of(top: str, snapshot: str) -> str:
    entry = current_root(top).snapshot(snapshot)
    return os.path.join(f"{top}.layers", f"{entry.layer_uuid.hex()}.lam")


def both_roots_checksum() -> None:
    _plain()
    for slot in (0, 1):
        flip("disk.lam", root_copy_offset(slot) + 60)


def both_roots_magic() -> None:
    _plain()
    for slot in (0, 1):
        patch("disk.lam", root_copy_offset(slot), b"\x8aLAMINX\n")


def unknown_version() -> None:
    _plain()
    forge_root("disk.lam", (0,), version=2)  # copy B stays valid: F-ROOT-003 refuses the image anyway


def unknown_incompatible_feature() -> None:
    _plain()
    forge_root("disk.lam", (1,), incompatible_features=1 << 40)


def unknown_compatible_feature() -> None:
    _plain()
    forge_root("disk.lam", (0, 1), compatible_features=1 << 7, autoclear_features=1 << 9)


def base_visible_past_size() -> None:
    with open("base.raw", "wb") as fh:
        fh.write(pattern(3, 64 * KiB))
    write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 4096))], base="base.raw")
    forge_root("disk.lam", base_visible=128 * KiB)  # base_size is 64 KiB


def bad_snapshot_name() -> None:
    _plain()
    create_snapshot("disk.lam", "s")
    root = current_root("disk.lam")
    entry = root.snapshots[0]
    forge_root("disk.lam", snapshots=(attrs.evolve(entry, name=b"a@b".ljust(256, b"\0"), name_length=3),))


def both_maps_bad() -> None:
    _plain()
    for slot in (0, 1):
        flip("disk.lam", G4K.map_copy_offset(0, slot) + 64)  # a data CRC: the copy's own CRC fails


def data_checksum() -> None:
    _plain()
    flip("disk.lam", G4K.guest_to_file(5000))


def presence_past_size() -> None:
    """A map marks a sector past the virtual size (outside the intents): both copies rewritten with a valid CRC."""
    from lamina.spec.structures import decode_map_copy, encode_map_copy

    size = 1 * MiB - 8 * KiB
    write_image("disk.lam", size, 4 * KiB, [(0, pattern(1, 4096)), (600 * KiB, pattern(2, 512))])
    g = Geometry(12, size)
    uuid = current_root("disk.lam").image_uuid
    for slot in (0, 1):
        with open("disk.lam", "rb") as fh:
            fh.seek(g.map_copy_offset(1, slot))
            copy = decode_map_copy(fh.read(g.map_used_length), g, 1, slot, uuid)
        present = bytearray(copy.present)
        present[-1] |= 0x80  # the region's last sector: past the virtual size
        patch("disk.lam", g.map_copy_offset(1, slot), encode_map_copy(attrs.evolve(copy, present=bytes(present)), g))


def file_shorter() -> None:
    write_image("disk.lam", 2 * MiB, 4 * KiB, [(0, pattern(1, 12 * KiB))])  # the last region is never written
    os.truncate("disk.lam", os.path.getsize("disk.lam") - 4 * KiB)


def counter_exhausted() -> None:
    _plain()
    forge_root("disk.lam", data_generation=MAX_COUNTER)


def committing_without_base() -> None:
    _plain()
    forge_root("disk.lam", flags=FLAG_COMMITTING)


def committing_into_snapshot() -> None:
    _plain()
    create_snapshot("disk.lam", "s")
    with Image.open("disk.lam") as image:
        image.write(0, pattern(3, 4096))
    forge_root("disk.lam", flags=FLAG_COMMITTING)


def _snapshots_reverted() -> None:
    """s1 and s2, reverted to s1: s2's layer is in no chain of the top, only in its table."""
    _plain()
    create_snapshot("disk.lam", "s1")
    with Image.open("disk.lam") as image:
        image.write(0, pattern(4, 4096))
    create_snapshot("disk.lam", "s2")
    revert_snapshot("disk.lam", "s1")


def snapshot_layer_missing() -> None:
    _snapshots_reverted()
    os.unlink(_layer_of("disk.lam", "s2"))


def snapshot_layer_other_uuid() -> None:
    _snapshots_reverted()
    s2 = _layer_of("disk.lam", "s2")
    os.unlink(s2)
    shutil.copyfile(_layer_of("disk.lam", "s1"), s2)  # a real layer, of s1's uuid, under s2's name


def vmstate_crc() -> None:
    _plain()
    create_snapshot("disk.lam", "s", vmstate=pattern(5, 5000))
    entry = current_root("disk.lam").snapshots[0]
    flip(os.path.join("disk.lam.layers", f"{entry.layer_uuid.hex()}.vmstate"), 100)


def raw_base_shorter() -> None:
    with open("base.raw", "wb") as fh:
        fh.write(pattern(3, 128 * KiB))
    write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 4096))], base="base.raw")
    os.truncate("base.raw", 64 * KiB)


def raw_base_longer() -> None:
    with open("base.raw", "wb") as fh:
        fh.write(pattern(3, 128 * KiB))
    write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 4096))], base="base.raw")
    with open("base.raw", "ab") as fh:
        fh.write(pattern(6, 512))


def lamina_base_changed() -> None:
    write_image("base.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 64 * KiB))])
    write_image("disk.lam", 1 * MiB, 4 * KiB, [(8 * KiB, pattern(2, 4096))], base="base.lam")
    with Image.open("base.lam") as base:
        base.write(0, pattern(3, 512))  # written after the child was made: its data_generation moved on


def base_loop() -> None:
    write_image("a.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 4096))])
    write_image("b.lam", 1 * MiB, 4 * KiB, [(4 * KiB, pattern(2, 4096))], base="a.lam")
    b = current_root("b.lam")
    forge_root("a.lam", base_kind=BASE_LAMINA, base_path="b.lam", base_uuid=b.image_uuid,
               base_data_generation=b.data_generation, base_size=b.virtual_size, base_visible=b.virtual_size)


def base_escapes() -> None:
    write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 4096))])
    forge_root("disk.lam", base_kind=1, base_path="../outside.raw", base_size=1 * MiB, base_visible=1 * MiB)


def _deduplicated() -> str:
    """Two clones with the same 48 KiB, snapshotted and deduplicated; the frozen layer of a.lam@s that shares."""
    from lamina.impl.dedup import dedup
    from lamina.impl.layers import clone

    write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 64 * KiB))])
    create_snapshot("disk.lam", "base")
    for k, name in enumerate(("a.lam", "b.lam")):
        clone("disk.lam", "base", name)
        with Image.open(name) as image:
            image.write(256 * KiB, pattern(2, 48 * KiB))
            image.write(600 * KiB + 512 * k, pattern(3 + k, 512))
        create_snapshot(name, "s")
    dedup(["a.lam", "b.lam"])
    return _layer_of("a.lam", "s")


def store_missing() -> None:
    _deduplicated()
    os.unlink("lamina-store.lam")


def _forge_shared(layer: str, value: int) -> None:
    """Both map copies of region 0 of `layer` with their first reference replaced by `value` (CRC valid)."""
    from lamina.impl.osfile import OsStorage
    from lamina.spec.protocol import read_map_copies
    from lamina.spec.structures import decode_map_copy, encode_map_copy

    root = current_root(layer)
    g = root.geometry
    file = OsStorage().open(layer, True)
    try:
        for slot, raw in enumerate(read_map_copies(file, g, 0)):
            copy = decode_map_copy(raw, g, 0, slot, root.image_uuid)
            shared = list(copy.shared)
            shared[next(i for i, s in enumerate(shared) if s)] = value
            file.pwrite(g.map_copy_offset(0, slot), encode_map_copy(attrs.evolve(copy, shared=tuple(shared)), g))
        file.fsync()
    finally:
        file.close()


def shared_past_store_end() -> None:
    layer = _deduplicated()
    store = current_root("lamina-store.lam")
    _forge_shared(layer, 1 + store.geometry.num_clusters)  # index num_clusters: one past the last


def store_data_flipped() -> None:
    _deduplicated()
    store = current_root("lamina-store.lam")
    flip("lamina-store.lam", store.geometry.cluster_file_offset(0) + 100)


@attrs.frozen
class Case:
    name: str
    rules: tuple[str, ...]
    description: str
    build: Callable[[], None]
    check_exit: int
    kinds: tuple[str, ...]
    refused: tuple[str, ...] = ("disk.lam",)  # targets whose dump must exit 2
    readable: tuple[str, ...] = ()  # targets a reader must still dump (their views are expected)
    image: str = "disk.lam"
    needs: tuple[str, ...] = ()  # format features beyond the commands (PROTOCOL.md `capabilities`)


CASES = (
    Case("root-both-checksum", ("F-ROOT-001",), "both root copies fail their CRC32C: no root, nothing to read",
         both_roots_checksum, 1, ("root-unrecoverable",)),
    Case("root-both-magic", ("F-ROOT-001",), "both root copies lack the magic", both_roots_magic, 1,
         ("root-unrecoverable",)),
    Case("unknown-version", ("F-ROOT-003",), "copy A has a valid CRC and version 2, copy B is a valid version 1: a "
         "reader must refuse the image, whichever copy is current", unknown_version, 1, ("root-unrecoverable",)),
    Case("unknown-incompatible-feature", ("F-ROOT-003",), "copy B sets an unknown incompatible feature bit (valid "
         "CRC): refused whatever the other copy holds", unknown_incompatible_feature, 1, ("root-unrecoverable",)),
    Case("base-visible-past-base", ("F-ROOT-006", "F-ROOT-001"), "both copies record base_visible above base_size "
         "(CRC valid): every copy breaks a field rule, so there is no valid root", base_visible_past_size, 1,
         ("root-unrecoverable",)),
    Case("snapshot-name-with-at", ("F-SNAP-001", "F-ROOT-001"), "both copies hold a snapshot named 'a@b' (CRC "
         "valid): a name breaking F-SNAP-001 makes the copy invalid", bad_snapshot_name, 1, ("root-unrecoverable",)),
    Case("map-both-copies-bad", ("F-MAP-002", "F-MAP-001"), "both map copies of region 0, which holds data, fail "
         "their CRC and neither is all zero: the region cannot be read", both_maps_bad, 2, ("map-unrecoverable",)),
    Case("data-checksum", ("F-MAP-004", "F-MEAN-003"), "one byte of a present data cluster flipped: check reports "
         "corruption, but a reader does not verify data checksums and reads the file's bytes", data_checksum, 2,
         ("data-checksum",), refused=(), readable=("disk.lam",)),
    Case("presence-past-size", ("F-MAP-003", "F-MAP-005"), "both map copies (valid CRC) of the last region mark a "
         "sector past the virtual size, outside the intents: corruption for check, ignored by a reader",
         presence_past_size, 2, ("map-invariant",), refused=(), readable=("disk.lam",)),
    Case("file-shorter", ("F-LAYOUT-002",), "the file is 4 KiB shorter than the root says", file_shorter, 2,
         ("file-length",), refused=(), readable=("disk.lam",)),
    Case("counter-exhausted", ("F-ROOT-008",), "data_generation is MAX_COUNTER in both copies: valid and readable, "
         "but it can never be written again", counter_exhausted, 2, ("counter-exhausted",), refused=(),
         readable=("disk.lam",)),
    Case("committing-without-base", ("F-COMMIT-001",), "the committing flag on an image without a base: corruption "
         "for check; a reader reads it as it is", committing_without_base, 2, ("commit-flag",), refused=(),
         readable=("disk.lam",)),
    Case("committing-into-snapshot", ("F-COMMIT-001",), "the committing flag on a top whose base is a snapshot's "
         "frozen layer", committing_into_snapshot, 2, ("commit-flag",), refused=(), readable=("disk.lam",)),
    Case("snapshot-layer-missing", ("F-SNAP-004",), "after a revert to s1, the frozen layer of s2 (in no chain of "
         "the top) is gone (T2): the image reads, s2 does not", snapshot_layer_missing, 2, ("snapshot-layer",),
         refused=("disk.lam@s2",), readable=("disk.lam", "disk.lam@s1")),
    Case("snapshot-layer-other-uuid", ("F-OPEN-003", "F-SNAP-004"), "s2's layer file holds s1's layer (another "
         "image_uuid) under s2's name", snapshot_layer_other_uuid, 2, ("snapshot-layer",),
         refused=("disk.lam@s2",), readable=("disk.lam", "disk.lam@s1")),
    Case("vmstate-crc", ("F-CHECK-001",), "a snapshot's VM state file has a flipped byte: it fails the entry's "
         "vmstate_crc (check over trees, T3: a vmstate finding, corruption); the disk contents are intact", vmstate_crc, 2, ("vmstate",), refused=(), readable=("disk.lam", "disk.lam@s")),
    Case("raw-base-shorter", ("F-REF-003",), "the raw base was cut after the layer recorded its size", raw_base_shorter,
         2, ("base-reference",)),
    Case("raw-base-longer", ("F-REF-003",), "the raw base grew after the layer recorded its size", raw_base_longer,
         2, ("base-reference",)),
    Case("lamina-base-changed", ("F-REF-003",), "the Lamina base was written after the layer over it recorded its "
         "data_generation", lamina_base_changed, 2, ("base-reference",)),
    Case("base-loop", ("F-REF-002",), "a.lam names b.lam as its base and b.lam names a.lam", base_loop, 2,
         ("base-reference",), refused=("a.lam", "b.lam"), image="a.lam"),
    Case("base-escapes-directory", ("F-REF-001", "F-REF-005"), "the base path ../outside.raw leaves the image's "
         "directory: it must not be followed (the file does not exist either)", base_escapes, 2, ("base-reference",)),
    Case("shared-store-missing", ("F-SHARE-001", "F-SHARE-004", "F-SHARE-007"), "a.lam's snapshot layer shares "
         "clusters through lamina-store.lam, which is gone: a reader opening that layer must refuse (whatever it "
         "reads), check reports shared-reference", store_missing, 2, ("shared-reference",),
         refused=("a.lam", "a.lam@s"), image="a.lam", needs=("shared-clusters",)),
    Case("shared-ref-past-the-store-end", ("F-SHARE-003", "F-SHARE-004", "F-SHARE-007"), "both map copies (CRC "
         "valid) of the snapshot layer reference the store cluster one past the store's last", shared_past_store_end,
         2, ("shared-reference",), refused=("a.lam@s",), image="a.lam", needs=("shared-clusters",)),
    Case("shared-store-data-flipped", ("F-SHARE-004", "F-MEAN-003"), "one byte of store cluster 0 flipped: check "
         "of an image referencing it reports data-checksum (the store's own I5 and the referencing cluster's); a "
         "reader does not verify data checksums and reads the store's bytes", store_data_flipped, 2,
         ("data-checksum",), refused=(), readable=("a.lam", "a.lam@s", "b.lam@s"), image="a.lam",
         needs=("shared-clusters",)),
)


def refuse(targets: tuple[str, ...]) -> None:
    """Make sure the reference driver's dump refuses every target as invalid (exit 2)."""
    with tempfile.TemporaryDirectory(prefix="lamina-conform-") as scratch:
        for k, target in enumerate(targets):
            code = reference.dump(target, os.path.join(scratch, f"{k}.img"), say=lambda _: None)
            if code != 2:
                raise GenerationError(f"{target}: the reference's dump exits {code}, the design says 2")


def generate(root: str) -> None:
    for case in CASES:
        with new_vector(root, "invalid", case.name, case.description, ["dump", "check", *case.needs],
                        list(case.rules)) as v:
            case.build()
            expect_check(v, case.image, case.check_exit, list(case.kinds))
            if case.refused:
                refuse(case.refused)
                v.expect["dump"] = {"exit": 2, "targets": list(case.refused)}
            if case.readable:
                expect_views(v, list(case.readable))
