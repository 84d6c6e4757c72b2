"""The abstraction function (S3): from the bytes of an image file to the model's `Disk`.

What an image means is defined here, independently of `impl/`: the current
root gives the virtual size; in each region the current map says which
sectors are present; a present sector's bytes are the file's bytes at its
fixed place, and every other sector reads as zero.  Bytes in absent sectors
(leaks, unflushed writes) mean nothing.
"""
from __future__ import annotations

from types import MappingProxyType

from .layout import CLUSTERS_PER_REGION, SECTOR_SIZE, allocated_regions
from .model import Disk
from .protocol import read_map_copies, read_root_copies
from .regionmap import RegionMap
from .replication import select_map, select_root
from .storage import File


def abstract_image(file: File) -> Disk:
    """The guest-visible disk an image file denotes; raises a FormatError when it denotes none."""
    root = select_root(read_root_copies(file)).value
    assert root is not None
    g = root.geometry
    sectors: dict[int, bytes] = {}
    for region in allocated_regions(sorted(file.data_extents()), g):
        chosen = select_map(read_map_copies(file, g, region), g, region, root.image_uuid)
        if chosen.value is None:
            continue
        m = RegionMap.from_copy(chosen.value, g, region, chosen.slot)
        for c in range(CLUSTERS_PER_REGION):
            mask = m.cluster_mask(c)
            if not mask:
                continue
            cluster = region * CLUSTERS_PER_REGION + c
            data = file.pread(g.cluster_file_offset(cluster), g.cluster_size).ljust(g.cluster_size, b"\0")
            for k in range(g.sectors_per_cluster):
                sector = cluster * g.sectors_per_cluster + k
                chunk = data[k * SECTOR_SIZE : (k + 1) * SECTOR_SIZE]
                if mask >> k & 1 and sector * SECTOR_SIZE < root.virtual_size and any(chunk):
                    sectors[sector] = chunk
    return Disk(root.virtual_size, MappingProxyType(sectors))
