"""Where everything lives in an image file: constants and the geometry functions.

An image file is a root area followed by regions.  A region is one cluster
holding map copy A, `CLUSTERS_PER_REGION` data clusters that hold the guest's
bytes at fixed places (identity mapping within the region), and one cluster
holding map copy B:

    [root A][root B] (padded to a cluster)
    region 0: [map A][data cluster 0 .. 127][map B]
    region 1: [map A][data cluster 128 .. 255][map B]
    ...

Data never moves once written; unwritten clusters are holes; nothing is
allocated, so nothing can leak from an allocator.
"""
from __future__ import annotations

import bisect
import functools

import attrs

from .errors import ImageTooLarge, InvalidArgument
from .units import ClusterIndex, FileOffset, GuestOffset, RegionIndex, Slot

FORMAT_VERSION = 1
SECTOR_SIZE = 512
MIN_CLUSTER_BITS = 12  # (= 4 KiB)
MAX_CLUSTER_BITS = 21  # (= 2 MiB)
DEFAULT_CLUSTER_BITS = 16  # (= 64 KiB)
CLUSTERS_PER_REGION = 128
REGION_STRIDE_CLUSTERS = CLUSTERS_PER_REGION + 2  # (= 130: map A, the data clusters, map B)
ROOT_SIZE = 4096  # the fixed part of a root copy; a variable tail follows it
ROOT_SLOT_SIZE = 1 << 19  # (= 512 KiB) file bytes reserved for each root copy
ROOT_SLOTS = 2
ROOT_AREA_SIZE = ROOT_SLOT_SIZE * ROOT_SLOTS  # (= 1 MiB)
MAX_BASE_PATH = 4096
SNAPSHOT_ENTRY_SIZE = 320
MAX_SNAPSHOTS = 1024
MAX_CHAIN_DEPTH = 2 * MAX_SNAPSHOTS  # (= 2048) files: a full snapshot table over a chain of bases as long
# A VM state is the guest's RAM and device state; the largest machines sold hold 24 TiB of RAM.
MAX_VMSTATE_SIZE = 1 << 46  # (= 64 TiB)
MAX_VIRTUAL_SIZE = 1 << 50  # (= 1 PiB)
MAX_INTENTS = 960
# Every counter (generations, snapshot ids) stays at most 2^63 - 1, so an increment never overflows its u64
# field; a million increments a second would take 292,000 years to get there, so only a forged image does.
MAX_COUNTER = (1 << 63) - 1  # (= 9223372036854775807)
MAP_HEADER_SIZE = 64
MAP_CRCS_OFFSET = MAP_HEADER_SIZE  # (= 64)
MAP_BITMAP_OFFSET = MAP_CRCS_OFFSET + 4 * CLUSTERS_PER_REGION  # (= 576)
SHARED_TABLE_SIZE = 8 * CLUSTERS_PER_REGION  # (= 1024) a map copy's table of references into the shared store
ZERO_SECTOR = bytes(SECTOR_SIZE)


def root_copy_offset(slot: Slot) -> FileOffset:
    """Root copy A at offset 0, copy B at `ROOT_SLOT_SIZE`."""
    return FileOffset(slot * ROOT_SLOT_SIZE)


def cluster_size_to_bits(cluster_size: int) -> int:
    """The log2 of a cluster size, refusing sizes the format does not admit."""
    bits = cluster_size.bit_length() - 1
    if cluster_size <= 0 or (1 << bits) != cluster_size or not (
        MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS
    ):
        raise InvalidArgument(
            f"cluster size {cluster_size} is not a power of two from "
            f"{1 << MIN_CLUSTER_BITS} to {1 << MAX_CLUSTER_BITS} bytes"
        )
    return bits


def check_virtual_size(virtual_size: int) -> None:
    """Refuse virtual sizes the format does not admit."""
    if virtual_size < 0 or virtual_size % SECTOR_SIZE:
        raise InvalidArgument(f"virtual size {virtual_size} is not a multiple of {SECTOR_SIZE} bytes")
    if virtual_size > MAX_VIRTUAL_SIZE:
        raise ImageTooLarge(
            f"virtual size {virtual_size} exceeds the format's maximum of {MAX_VIRTUAL_SIZE} bytes (1 PiB)"
        )


@attrs.frozen
class Geometry:
    """The fixed places of an image with a given cluster size and virtual size.

    The derived sizes are cached on first use (`cached_property`: the
    instance stays frozen; equality and hashing see only the two fields),
    since every walk over clusters asks for them.
    """

    cluster_bits: int
    virtual_size: int
    shared: bool = False  # the root sets `shared-clusters`: a map copy may carry a table of shared references

    @functools.cached_property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @functools.cached_property
    def sectors_per_cluster(self) -> int:
        return self.cluster_size // SECTOR_SIZE

    @functools.cached_property
    def region_span(self) -> int:
        """Guest bytes described by one region's map."""
        return CLUSTERS_PER_REGION * self.cluster_size

    @functools.cached_property
    def region_stride(self) -> int:
        """File bytes one region occupies: both map clusters and its data clusters."""
        return REGION_STRIDE_CLUSTERS * self.cluster_size

    @functools.cached_property
    def first_region_offset(self) -> FileOffset:
        """The root area, rounded up to a whole cluster so that data clusters stay aligned."""
        return FileOffset(max(ROOT_AREA_SIZE, self.cluster_size))

    @functools.cached_property
    def num_regions(self) -> int:
        return -(-self.virtual_size // self.region_span)

    @functools.cached_property
    def num_clusters(self) -> int:
        return -(-self.virtual_size // self.cluster_size)

    @functools.cached_property
    def file_length(self) -> int:
        """The exact length of a well-formed image file."""
        return self.first_region_offset + self.num_regions * self.region_stride

    @functools.cached_property
    def map_bitmap_size(self) -> int:
        """Bytes of the presence bitmap: one bit per guest sector of the region (= cluster_size / 32)."""
        return CLUSTERS_PER_REGION * self.sectors_per_cluster // 8

    @functools.cached_property
    def map_used_length(self) -> int:
        """Bytes of a map copy that carry meaning; the rest of its cluster stays a hole."""
        return MAP_BITMAP_OFFSET + self.map_bitmap_size

    @functools.cached_property
    def map_read_length(self) -> int:
        """Bytes a reader reads of a map copy: the used length, plus the shared table a copy may carry (F-SHARE-002)."""
        return self.map_used_length + (SHARED_TABLE_SIZE if self.shared else 0)

    def region_offset(self, region: RegionIndex) -> FileOffset:
        return FileOffset(self.first_region_offset + region * self.region_stride)

    def map_copy_offset(self, region: RegionIndex, slot: Slot) -> FileOffset:
        """Copy A opens the region, copy B closes it: a region's data lies between its two copies."""
        last = REGION_STRIDE_CLUSTERS - 1
        return FileOffset(self.region_offset(region) + slot * last * self.cluster_size)

    def region_data_offset(self, region: RegionIndex) -> FileOffset:
        return FileOffset(self.first_region_offset + region * self.region_stride + self.cluster_size)

    def region_of(self, offset: GuestOffset) -> RegionIndex:
        return RegionIndex(offset // self.region_span)

    def cluster_of(self, offset: GuestOffset) -> ClusterIndex:
        return ClusterIndex(offset // self.cluster_size)

    def guest_to_file(self, offset: GuestOffset) -> FileOffset:
        """The fixed file offset that holds a guest byte when the sector is present."""
        region, within = divmod(offset, self.region_span)
        # region_data_offset(region) + within, spelled out: this runs once per cluster of every walk.
        return FileOffset(self.first_region_offset + region * self.region_stride + self.cluster_size + within)

    def cluster_file_offset(self, cluster: ClusterIndex) -> FileOffset:
        return self.guest_to_file(GuestOffset(cluster * self.cluster_size))

    def root_copy_offset(self, slot: Slot) -> FileOffset:
        return root_copy_offset(slot)

    def with_virtual_size(self, virtual_size: int) -> "Geometry":
        return Geometry(self.cluster_bits, virtual_size, self.shared)


def overlaps(extents: list[tuple[int, int]], offset: int, length: int) -> bool:
    """Whether [offset, offset+length) meets any of the sorted, disjoint (offset, length) extents."""
    i = bisect.bisect_right(extents, (offset + length,)) - 1
    return i >= 0 and extents[i][0] + extents[i][1] > offset


def allocated_regions(extents: list[tuple[int, int]], geometry: Geometry) -> list[int]:
    """Regions of the file holding any allocated byte: the only ones that can be other than empty.

    Visiting these instead of every region keeps every whole-image walk
    proportional to what is allocated, however large the virtual size.
    """
    regions: set[int] = set()
    start, stride, end = geometry.first_region_offset, geometry.region_stride, geometry.file_length
    for offset, length in extents:
        stop = min(offset + length, end)
        if stop > start and offset < end:
            regions.update(range((max(offset, start) - start) // stride, (stop - 1 - start) // stride + 1))
    return sorted(regions)
