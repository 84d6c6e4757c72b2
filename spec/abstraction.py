"""The abstraction function (S3): from the bytes of an image file to the model's `Disk`.

What an image means is defined here, independently of `impl/`: the current
root gives the virtual size; in each region the current map says which
sectors are present; a present sector's bytes are the file's bytes at its
fixed place, and every other sector reads as zero.  Bytes in absent sectors
(leaks, unflushed writes) mean nothing.
"""
from __future__ import annotations

import os
from types import MappingProxyType

from .layout import CLUSTERS_PER_REGION, SECTOR_SIZE, ZERO_SECTOR
from .model import Disk, empty_disk, write
from .references import ChainWalk, ImageContext, open_tree_file, resolve_base
from .storage import Storage
from .structures import BASE_RAW
from .protocol import current_maps, read_root_copies
from .replication import select_root
from .storage import File
from .store import SharedReferenceError, StoreView, open_store, uses_store


def abstract_image(file: File, base: Disk | None = None, store: StoreView | None = None) -> Disk:
    """The guest-visible disk a layer file denotes over the disk its base denotes (F-MEAN-002).

    A present sector of a shared cluster reads the store cluster's bytes at the same offset (F-SHARE-003).
    """
    root = select_root(read_root_copies(file)).current()
    g = root.geometry
    sectors: dict[int, bytes] = {}
    if base is not None:
        # F-MEAN-002 byte by byte: neither bound need be a multiple of a sector (F-MEAN-004).
        limit, partial = divmod(min(root.base_visible, base.virtual_size), SECTOR_SIZE)
        sectors = {s: d for s, d in base.sectors.items() if s < limit}
        if partial and base.sectors.get(limit, ZERO_SECTOR)[:partial].count(0) != partial:
            sectors[limit] = base.sectors[limit][:partial].ljust(SECTOR_SIZE, b"\0")
    for m in current_maps(file, root):
        region = m.region
        for c in m.present_clusters():
            mask = m.cluster_mask(c)
            if not mask:
                continue
            cluster = region * CLUSTERS_PER_REGION + c
            if m.shared[c]:
                if store is None:
                    raise SharedReferenceError(f"cluster {cluster} is shared but the layer names no store")
                data = store.cluster(m.shared[c] - 1, f"cluster {cluster}: ")
            else:
                data = file.pread(g.cluster_file_offset(cluster), g.cluster_size).ljust(g.cluster_size, b"\0")
            for k in range(g.sectors_per_cluster):
                sector = cluster * g.sectors_per_cluster + k
                chunk = data[k * SECTOR_SIZE : (k + 1) * SECTOR_SIZE]
                if mask >> k & 1 and sector * SECTOR_SIZE < root.virtual_size:
                    if any(chunk):
                        sectors[sector] = chunk
                    else:
                        sectors.pop(sector, None)
    return Disk(root.virtual_size, MappingProxyType(sectors))


def abstract_layer(path: str, storage: Storage, context: ImageContext, walk: ChainWalk | None = None) -> Disk:
    """What a layer file and its whole chain of bases denote, following references by the rules of F-REF.

    The chain is followed down first, then its meaning is built from the
    bottom up, so a chain of any depth the format allows costs no recursion.
    """
    walk = walk or ChainWalk()
    files: list[File] = []
    stores: list[StoreView | None] = []
    base: Disk | None = None
    try:
        while True:
            walk.visit(os.path.realpath(path), path, storage)
            file = open_tree_file(storage, path, False, context)  # the guarded open (F-OPEN-001)
            files.append(file)
            root = select_root(read_root_copies(file)).current()
            stores.append(open_store(root, context, storage, path) if uses_store(root) else None)
            found = resolve_base(root, context, path, storage)
            if found is None:
                break
            if root.base_kind == BASE_RAW:
                raw = open_tree_file(storage, found.path, False, found.context)
                try:
                    size = raw.size()  # any length (F-MEAN-004): the last partial sector reads zero past the end
                    base = write(empty_disk(-(-size // SECTOR_SIZE) * SECTOR_SIZE), 0, raw.pread(0, size))
                finally:
                    raw.close()
                break
            path, context = found.path, found.context
        for file, store in reversed(list(zip(files[1:], stores[1:]))):
            base = abstract_image(file, base, store)
        return abstract_image(files[0], base, stores[0])
    finally:
        for file in files:
            file.close()
        for store in stores:
            if store is not None:
                store.close()
