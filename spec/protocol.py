"""The commit protocol and recovery: the order of writes and fsyncs (R5, R7).

Three rules carry every guarantee:

1. **Intent before data.**  Before the first write into a region the
   durable root does not list, the region is listed in the root's
   write-intent list, and that root is durable.  A region stays listed
   across flushes; a root write drops it only when no write into it is
   pending and its map, durable in one copy at least, records its presence
   and its data's checksums.  Only listed regions can hold data that
   disagrees with their map's checksums, uncommitted bytes in absent
   sectors, or a map copy being written; recovery looks at those regions
   and nowhere else.
2. **One copy at a time.**  A new version of a replicated structure (root or
   map) is written first to the slot that does *not* hold the durable current
   copy, fsynced, and only then to the other slot.  A crash at any instant
   leaves at least one valid copy of the old or the new version.
3. **Barrier before the root.**  Every root write is preceded by an fsync of
   all earlier writes, so a root that drops a region from the intent list is
   never durable before that region's map copies are.

A guest flush costs one fsync when only present sectors were overwritten: a
listed region defers its checksums (F-PROTO-005), recovery recomputes them
after a crash.  It costs two (data, then the first map copies) when some
region's presence changed; the second copies become durable at the next
fsync.  Before a region leaves the list its deferred map is committed
(`commit_maps`), then one root write drops it (`write_root`, rule 3): at
close, when the list is full, and every `SETTLE_INTERVAL` flushes for the
regions idle that long (FORMAT.md section 6, F-PROTO-006: the exposure this
bounds).
"""
from __future__ import annotations

from typing import Iterator

import attrs
from .crc import crc32c

from .layout import CLUSTERS_PER_REGION, ROOT_SIZE, ROOT_SLOT_SIZE, SECTOR_SIZE, Geometry, allocated_regions, overlaps, \
    root_copy_offset
from .regionmap import RegionMap, absent_runs, zero_absent
from .replication import select_map, select_root
from .storage import File
from .structures import Root, encode_map_copy, encode_root, next_counter, root_length_of
from .zeros import is_zero

# Every SETTLE_INTERVAL flushes the writer drops from the intent list the regions not written during the last
# SETTLE_INTERVAL flushes (after committing their deferred maps): a listed region's data checksums are not judged
# by `check` and are recomputed by recovery, so how long a region stays listed bounds that exposure (F-PROTO-006).
SETTLE_INTERVAL = 64


def read_root_copies(file: File) -> list[bytes]:
    """Both root copies: the fixed part, then as much of the tail as the copy says it has."""
    copies = []
    for slot in (0, 1):
        head = file.pread(root_copy_offset(slot), ROOT_SIZE)
        length = root_length_of(head)
        copies.append(head + file.pread(root_copy_offset(slot) + ROOT_SIZE, length - ROOT_SIZE) if length > ROOT_SIZE else head)
    return copies


def read_map_copies(file: File, geometry: Geometry, region: int) -> list[bytes]:
    return [file.pread(geometry.map_copy_offset(region, slot), geometry.map_read_length) for slot in (0, 1)]


def current_maps(file: File, root: Root) -> "Iterator[RegionMap]":
    """The current map of every region of a layer file that holds one, ascending (F-MAP-002's selection);
    regions the file has no bytes for are never read."""
    g = root.geometry
    for region in allocated_regions(sorted(file.data_extents()), g):
        chosen = select_map(read_map_copies(file, g, region), g, region, root.image_uuid)
        if chosen.value is not None:
            yield RegionMap.from_copy(chosen.value, g, region, chosen.slot)


def write_root(file: File, root: Root, best_slot: int, unsynced: bool) -> int:
    """Write both copies of a new root version (rules 2 and 3); return the new best slot.

    The second copy is left unsynced: the next fsync, which rule 3 puts before
    any later root write, makes it durable.
    """
    if unsynced:
        file.fsync()
    first = 1 - best_slot
    write_root_copy(file, root, first)
    file.fsync()
    write_root_copy(file, root, best_slot)
    return first


def write_root_copy(file: File, root: Root, slot: int) -> None:
    """One copy, and a hole after it: a root that shrank leaves nothing of its longer past (I6)."""
    data = encode_root(attrs.evolve(root, slot=slot))
    file.pwrite(root_copy_offset(slot), data)
    file.punch_hole(root_copy_offset(slot) + len(data), ROOT_SLOT_SIZE - len(data))


def commit_maps(file: File, geometry: Geometry, maps: list[RegionMap], image_uuid: bytes) -> None:
    """Commit new versions of region maps whose data has been written (rule 2).

    fsync (the data, and second copies of the previous commit); first copies;
    fsync; second copies, left unsynced.
    """
    file.fsync()
    if not maps:
        return
    generations = [next_counter(m.generation, f"the map generation of region {m.region}") for m in maps]  # all, before any write
    for m, generation in zip(maps, generations):
        m.generation = generation
        first = 1 - m.best_slot
        file.pwrite(geometry.map_copy_offset(m.region, first), encode_map_copy(m.to_copy(first, image_uuid), geometry))
    file.fsync()
    for m in maps:  # the first copies are durable: they are the current ones, even if a second write fails
        m.best_slot = 1 - m.best_slot
    for m in maps:
        second = 1 - m.best_slot
        file.pwrite(geometry.map_copy_offset(m.region, second), encode_map_copy(m.to_copy(second, image_uuid), geometry))


def cluster_crc(data: bytes, mask: int) -> int:
    """The checksum a map records for a data cluster: 0 when no sector is present."""
    return crc32c(data) if mask else 0


def reconcile_region(file: File, geometry: Geometry, m: RegionMap, extents: list[tuple[int, int]]) -> None:
    """Make a region listed in the intent list agree with its data again.

    An unflushed write may have left any sector old or new: present sectors
    keep what the file holds (their checksum is recomputed); absent sectors
    that received bytes are punched back to holes (the write did not happen);
    sectors past the virtual size are dropped.
    """
    spc = geometry.sectors_per_cluster
    size = geometry.cluster_size
    first_cluster = m.region * CLUSTERS_PER_REGION
    # The other clusters are absent, checksum 0 and a hole already: nothing to reconcile.
    for c in m.clusters_to_visit(extents, geometry.region_data_offset(m.region), size):
        guest = (first_cluster + c) * size
        sectors_inside = max(0, min(spc, (geometry.virtual_size - guest) // SECTOR_SIZE))
        mask = m.cluster_mask(c) & ((1 << sectors_inside) - 1)
        m.set_cluster_mask(c, mask)
        offset = geometry.cluster_file_offset(first_cluster + c)
        if m.shared[c]:
            # F-SHARE-003: the bytes are the store's, frozen and durable before the reference was: the checksum
            # stands; the local place is a hole (a crash between a dedup's map commit and its punch left it not).
            if overlaps(extents, offset, size):
                file.punch_hole(offset, size)
            if not mask:
                m.shared[c] = 0
                m.data_crcs[c] = 0
            continue
        if not mask and not overlaps(extents, offset, size):
            m.data_crcs[c] = 0
            continue
        data = file.pread(offset, size).ljust(size, b"\0")
        for start, count in absent_runs(mask, spc):
            if not is_zero(memoryview(data)[start * SECTOR_SIZE : (start + count) * SECTOR_SIZE]):
                file.punch_hole(offset + start * SECTOR_SIZE, count * SECTOR_SIZE)
        m.data_crcs[c] = cluster_crc(zero_absent(data, mask, spc), mask)


@attrs.frozen
class Recovered:
    root: Root
    root_best_slot: int


def recover(file: File) -> Recovered:
    """Bring an image to a clean state after any crash; idempotent, so a crash inside it is harmless.

    The intent list is only emptied by the final root write, after every
    reconciled map is durable in at least one copy.
    """
    selection = select_root(read_root_copies(file))
    root = selection.current()
    best = selection.slot
    geometry = root.geometry
    if file.size() != geometry.file_length:
        file.truncate(geometry.file_length)
    used = len(encode_root(root))
    for slot in (0, 1):  # a crash between a shorter root and its punch left bytes past it
        file.punch_hole(root_copy_offset(slot) + used, ROOT_SLOT_SIZE - used)
    maps = []
    extents = sorted(file.data_extents()) if root.intents else []  # only reconciliation reads them
    for region in root.intents:
        chosen = select_map(read_map_copies(file, geometry, region), geometry, region, root.image_uuid)
        m = RegionMap.from_copy(chosen.value, geometry, region, chosen.slot)
        reconcile_region(file, geometry, m, extents)
        maps.append(m)
    commit_maps(file, geometry, maps, root.image_uuid)
    if root.intents or selection.problems:
        root = attrs.evolve(root, intents=(), generation=next_counter(root.generation, "the root's generation"))
        best = write_root(file, root, best, unsynced=True)
    file.fsync()
    return Recovered(root, best)
