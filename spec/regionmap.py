"""The working form of one region's map, shared by the spec's protocol and `impl/`.

A `MapCopy` is what sits on disk; a `RegionMap` is the same content made
mutable, plus the slot that holds its durable current copy (the commit
protocol never writes that slot first).
"""
from __future__ import annotations

import bisect
import re
from array import array

import attrs

from .layout import CLUSTERS_PER_REGION, SECTOR_SIZE, Geometry
from .structures import MapCopy
from .zeros import is_zero

_NONZERO_RUN = re.compile(rb"[^\x00]+")


def _clusters_of_runs(data: bytes | bytearray, width: int) -> set[int]:
    """The indices of the `width`-byte words of `data` that hold a non-zero byte."""
    if data.count(0) == 0:
        return set(range(len(data) // width))
    found: set[int] = set()
    for m in _NONZERO_RUN.finditer(data):
        found.update(range(m.start() // width, (m.end() - 1) // width + 1))
    return found


@attrs.define
class RegionMap:
    region: int
    generation: int  # generation of the last committed version (0: never written)
    data_crcs: array  # one u32 per data cluster
    present: bytearray  # one bit per guest sector of the region, LSB first
    best_slot: int  # the slot holding the durable current copy; written second
    sectors_per_cluster: int
    # per data cluster: 0 when its bytes are local, else 1 + the store cluster holding them (F-SHARE-002)
    shared: array = attrs.field(factory=lambda: array("Q", [0] * CLUSTERS_PER_REGION))

    @classmethod
    def empty(cls, geometry: Geometry, region: int) -> "RegionMap":
        return cls(region, 0, array("I", [0] * CLUSTERS_PER_REGION),
                   bytearray(geometry.map_bitmap_size), 0, geometry.sectors_per_cluster)

    @classmethod
    def from_copy(cls, copy: MapCopy | None, geometry: Geometry, region: int, slot: int) -> "RegionMap":
        if copy is None:
            return cls.empty(geometry, region)
        shared = array("Q", copy.shared) if copy.shared else array("Q", [0] * CLUSTERS_PER_REGION)
        return cls(region, copy.generation, array("I", copy.data_crcs), bytearray(copy.present), slot,
                   geometry.sectors_per_cluster, shared)

    def to_copy(self, slot: int, image_uuid: bytes) -> MapCopy:
        return MapCopy(region=self.region, slot=slot, generation=self.generation, image_uuid=image_uuid,
                       data_crcs=tuple(self.data_crcs), present=bytes(self.present),
                       shared=tuple(self.shared) if any(self.shared) else ())

    def shared_clusters(self) -> list[int]:
        """The data clusters (0-127) whose bytes live in the shared store, ascending."""
        return [c for c, s in enumerate(self.shared) if s] if any(self.shared) else []

    def cluster_mask(self, cluster: int) -> int:
        """Presence bits of one data cluster of the region (bit j = sector j of the cluster)."""
        width = self.sectors_per_cluster // 8
        return int.from_bytes(self.present[cluster * width : (cluster + 1) * width], "little")

    def set_cluster_mask(self, cluster: int, mask: int) -> None:
        width = self.sectors_per_cluster // 8
        self.present[cluster * width : (cluster + 1) * width] = mask.to_bytes(width, "little")

    def set_sectors(self, first: int, count: int, value: bool) -> bool:
        """Set or clear the presence of `count` sectors from region sector `first`; whether any bit changed."""
        spc = self.sectors_per_cluster
        end = first + count
        changed = False
        while first < end:
            cluster, lo = divmod(first, spc)
            hi = min(spc, lo + end - first)
            mask = ((1 << (hi - lo)) - 1) << lo
            old = self.cluster_mask(cluster)
            new = old | mask if value else old & ~mask
            if new != old:
                self.set_cluster_mask(cluster, new)
                changed = True
            first += hi - lo
        return changed

    def present_clusters(self) -> list[int]:
        """The data clusters (0-127) with at least one present sector, ascending.

        One scan of the bitmap in C finds the runs of non-zero bytes (a fully
        written region is one run, an empty one none), and each run names
        the clusters it spans: one step per run, not per cluster or byte.
        """
        return sorted(_clusters_of_runs(self.present, self.sectors_per_cluster // 8))

    def clusters_to_visit(self, extents: list[tuple[int, int]], data_offset: int, cluster_size: int) -> list[int]:
        """The data clusters a walk over the region cannot skip, ascending: those with a present sector, a
        non-zero checksum, or any allocated byte in the file (`extents`: sorted (offset, length); cluster c
        of the region at `data_offset + c * cluster_size`).  Every other cluster is absent, checksum 0 and a hole."""
        visit = _clusters_of_runs(self.present, self.sectors_per_cluster // 8)
        if len(visit) < CLUSTERS_PER_REGION:
            visit |= _clusters_of_runs(self.data_crcs.tobytes(), self.data_crcs.itemsize)  # a non-zero checksum word
        end = data_offset + CLUSTERS_PER_REGION * cluster_size
        i = max(0, bisect.bisect_right(extents, (data_offset,)) - 1)
        for offset, length in extents[i:]:
            if offset >= end or len(visit) == CLUSTERS_PER_REGION:
                break
            lo, hi = max(offset, data_offset), min(offset + length, end)
            if hi > lo:
                visit.update(range((lo - data_offset) // cluster_size, (hi - 1 - data_offset) // cluster_size + 1))
        return sorted(visit)

    def any_present(self) -> bool:
        return not is_zero(self.present)

    def region_mask(self) -> int:
        """Presence bits of the whole region as one integer (bit i = sector i of the region)."""
        return int.from_bytes(self.present, "little")


def bit_runs(bits: int, width: int) -> list[tuple[int, int, bool]]:
    """(first bit, count, set) of each maximal run of equal bits among bits 0 .. width-1, in order.

    One step per run, not per bit: the length of a run of ones at the bottom
    of `rest` is the position of its lowest zero bit, `(~rest & (rest + 1))`,
    and of a run of zeros the position of its lowest one bit, `(rest & -rest)`.
    """
    runs = []
    pos = 0
    while pos < width:
        rest = bits >> pos
        if rest & 1:
            count = (~rest & (rest + 1)).bit_length() - 1
        else:
            count = (rest & -rest).bit_length() - 1 if rest else width - pos
        count = min(count, width - pos)
        runs.append((pos, count, bool(rest & 1)))
        pos += count
    return runs


def absent_runs(mask: int, sectors: int) -> list[tuple[int, int]]:
    """(first sector, count) of each run of clear bits in a cluster's presence mask."""
    if mask == (1 << sectors) - 1:
        return []  # every sector present: the common case of a written cluster
    return [(start, count) for start, count, present in bit_runs(mask, sectors) if not present]


def zero_absent(data: bytes, mask: int, sectors: int) -> bytes:
    """A cluster's bytes with every absent sector read as zero (what the guest sees)."""
    full = (1 << sectors) - 1
    if mask == full:
        return data
    if mask == 0:
        return bytes(len(data))
    out = bytearray(data)
    for start, count in absent_runs(mask, sectors):
        out[start * SECTOR_SIZE : (start + count) * SECTOR_SIZE] = bytes(count * SECTOR_SIZE)
    return bytes(out)
