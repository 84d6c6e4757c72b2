"""Which classes of reader defect a vector can catch: its `covers` key.

A kit is only as good as the defects it catches, so each vector says which
of four classes of defect (the mistakes a second implementation is most
likely to make) could change its outcome, computed from the vector's own
files by the spec's decoders, not declared by hand:

- `second-copy`: a reader that never reads copy B of a root or a map.  The
  vector holds a Lamina file whose two root copies, or two map copies of a
  region that holds bytes, are not twins (one invalid, or of another
  generation or content);
- `unverified-crc`: a reader or `check` that trusts a CRC32C it did not
  verify.  A root or map copy fails its CRC, or a data cluster outside the
  intent list does;
- `base-past-end`: a reader that shows a base past what the layer above
  shows of it.  A layer records `base_visible` below `base_size`;
- `snapshot-layer`: a reader that takes the wrong layer for `IMAGE@SNAP`, or
  a `check` that judges the wrong one.  The top holds snapshots.

The classes over-approximate: a vector that covers a class may still give
the right answer to a reader with that defect (a stale copy B changes only
what `check` reports, say).  What they promise is the converse, which the
tests hold the kit's own broken readers to: a reader with exactly one of
these defects fails only vectors that cover it.
"""
from __future__ import annotations

import os

import attrs

from lamina.impl.osfile import OsStorage
from lamina.spec.check import check_image
from lamina.spec.errors import BadChecksum, FormatError
from lamina.spec.layout import ROOT_SLOT_SIZE, allocated_regions
from lamina.spec.protocol import read_map_copies, read_root_copies
from lamina.spec.replication import select_root
from lamina.spec.storage import File
from lamina.spec.structures import ROOT_MAGIC, decode_map_copy, decode_root

DEFECTS = ("second-copy", "unverified-crc", "base-past-end", "snapshot-layer")


def _decoded(decode, raw: bytes, slot: int) -> tuple[object | None, FormatError | None]:
    try:
        return decode(raw, slot), None
    except FormatError as exc:
        return None, exc


def _twins(a: tuple, b: tuple) -> bool:
    """Two decoded copies are twins when both are valid and equal but for `slot` and `crc`."""
    (x, _), (y, _) = a, b
    return x is not None and y is not None and attrs.evolve(x, slot=0, crc=0) == attrs.evolve(y, slot=0, crc=0)


def _file_covers(file: File) -> set[str]:
    found: set[str] = set()
    roots = [_decoded(decode_root, raw, slot) for slot, raw in enumerate(read_root_copies(file))]
    if not _twins(*roots):
        found.add("second-copy")
    if any(isinstance(err, BadChecksum) for _, err in roots):
        found.add("unverified-crc")
    try:
        root = select_root(read_root_copies(file)).current()
    except FormatError:
        return found
    if root.base_kind and root.base_visible < root.base_size:
        found.add("base-past-end")
    if root.num_snapshots:
        found.add("snapshot-layer")
    g = root.geometry
    for region in allocated_regions(sorted(file.data_extents()), g):
        def decode(raw: bytes, slot: int):
            return decode_map_copy(raw, g, region, slot, root.image_uuid)
        maps = [_decoded(decode, raw, slot) for slot, raw in enumerate(read_map_copies(file, g, region))]
        if not _twins(*maps) and any(raw.count(0) != len(raw) for raw in read_map_copies(file, g, region)):
            found.add("second-copy")
        if any(isinstance(err, BadChecksum) for _, err in maps):
            found.add("unverified-crc")
    if any(f.kind == "data-checksum" for f in check_image(file).findings):
        found.add("unverified-crc")
    return found


def _is_lamina(path: str) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(8)
        fh.seek(ROOT_SLOT_SIZE)
        return ROOT_MAGIC in (head, fh.read(8))


def covers(directory: str, expect: dict) -> list[str]:
    """The defect classes (of `DEFECTS`) that the vector in `directory` can catch."""
    snapshot_views = any("@" in view["name"] for view in expect.get("views", ()))
    found: set[str] = {"snapshot-layer"} if snapshot_views else set()
    storage = OsStorage()
    for where, dirs, names in os.walk(directory):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(where, name)
            if os.path.islink(path) or not os.path.isfile(path) or not _is_lamina(path):
                continue
            file = storage.open(path, False)
            try:
                found |= _file_covers(file)
            finally:
                file.close()
    return [d for d in DEFECTS if d in found]
