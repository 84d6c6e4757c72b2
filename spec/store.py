"""The shared store: frozen clusters stored once and referenced by many layers (R8, FORMAT.md section 13).

The store is itself a Lamina layer file, `lamina-store.lam`, in the image
directory (the directory of an image's top file).  Its guest space is an
array of clusters: store cluster `s` is its guest bytes
`[s * cluster_size, (s + 1) * cluster_size)`; a cluster with a present
sector is allocated, any other is free.  So the store has two root copies,
two map copies per region, data checksums and the commit protocol of every
layer (R7), and its crash safety is that of guest writes plus flush.

A frozen layer whose root sets `shared-clusters` names the store by its
`image_uuid` (`store_uuid`), and a map copy that carries the `shared` table
says, per data cluster, which store cluster holds its bytes.  This module
reads store clusters through the spec's own selection rules, for the
abstraction function and `check`.
"""
from __future__ import annotations

import os

from .errors import FormatError, LaminaError
from .layout import CLUSTERS_PER_REGION, Geometry
from .protocol import read_map_copies, read_root_copies
from .references import ImageContext, open_tree_file
from .regionmap import RegionMap, zero_absent
from .replication import select_map, select_root
from .storage import File, Storage
from .structures import FEATURE_SHARED_CLUSTERS, Root

STORE_NAME = "lamina-store.lam"


class SharedReferenceError(FormatError):
    """A layer's reference into the shared store cannot be followed: no store, another store, or a cluster it lacks."""


def uses_store(root: Root) -> bool:
    return bool(root.incompatible_features & FEATURE_SHARED_CLUSTERS)


def store_path(context: ImageContext) -> str:
    """F-SHARE-001: the store of every layer of an image is `lamina-store.lam` beside the image's top file."""
    return os.path.join(context.top_dir, STORE_NAME)


class StoreView:
    """The clusters of one store file as the format defines them (read-only, through the spec's selection rules)."""

    def __init__(self, file: File, path: str) -> None:
        self.file = file
        self.path = path
        self.root = select_root(read_root_copies(file)).current()
        self.geometry: Geometry = self.root.geometry
        self._maps: dict[int, RegionMap | None] = {}

    @property
    def num_clusters(self) -> int:
        return self.geometry.num_clusters

    def _map(self, region: int) -> RegionMap | None:
        if region not in self._maps:
            if len(self._maps) >= 4096:  # bounded memory over a store of any size (R10)
                self._maps.clear()
            g = self.geometry
            chosen = select_map(read_map_copies(self.file, g, region), g, region, self.root.image_uuid)
            self._maps[region] = None if chosen.value is None else RegionMap.from_copy(chosen.value, g, region, chosen.slot)
        return self._maps[region]

    def mask(self, index: int) -> int:
        """Presence bits of store cluster `index` (0: free)."""
        if not 0 <= index < self.num_clusters:
            return 0
        m = self._map(index // CLUSTERS_PER_REGION)
        return 0 if m is None else m.cluster_mask(index % CLUSTERS_PER_REGION)

    def cluster(self, index: int, where: str = "") -> bytes:
        """The bytes of allocated store cluster `index`; SharedReferenceError when it is out of the store or free."""
        g = self.geometry
        if not 0 <= index < self.num_clusters:
            raise SharedReferenceError(f"{where}shared cluster {index} is past the end of the store {self.path} "
                                       f"({self.num_clusters} clusters)")
        mask = self.mask(index)
        if not mask:
            raise SharedReferenceError(f"{where}shared cluster {index} is not allocated in the store {self.path}")
        data = self.file.pread(g.cluster_file_offset(index), g.cluster_size).ljust(g.cluster_size, b"\0")
        return zero_absent(data, mask, g.sectors_per_cluster)

    def close(self) -> None:
        self.file.close()


def open_store(root: Root, context: ImageContext, storage: Storage, where: str) -> StoreView:
    """The store a layer with `shared-clusters` references, its identity and cluster size checked (F-SHARE-001)."""
    path = store_path(context)
    if not storage.exists(path):
        raise SharedReferenceError(f"{where}: its data is shared through {path}, which does not exist")
    try:
        file = open_tree_file(storage, path, False, context)
    except FileNotFoundError:
        raise SharedReferenceError(f"{where}: its data is shared through {path}, which does not exist") from None
    except (OSError, LaminaError) as exc:
        raise SharedReferenceError(f"{where}: the shared store {path} cannot be opened: {exc}") from None
    try:
        view = StoreView(file, path)
        if view.root.image_uuid != root.store_uuid:
            raise SharedReferenceError(f"{where}: references store {root.store_uuid.hex()}, but {path} is store "
                                       f"{view.root.image_uuid.hex()}")
        if view.root.cluster_bits != root.cluster_bits or uses_store(view.root) or view.root.base_kind:
            raise SharedReferenceError(f"{where}: the store {path} has another cluster size, a base or shared "
                                       "clusters of its own")
        return view
    except BaseException:
        file.close()
        raise
