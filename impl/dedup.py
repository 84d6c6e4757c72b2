"""`lamina dedup`: store equal frozen clusters once in the directory's shared store (R8, FORMAT.md section 13).

Only frozen data is shared: the layers of snapshots and Lamina bases, never
a writable top, so the guest write path never looks at the store and no
reference count exists.  The steps, each crash-safe (F-SHARE-005):

1. scan: every present cluster of every frozen layer (and every allocated
   store cluster) is checksummed against its map (a cluster failing I5 is
   left alone) and hashed; equal hashes are candidates, confirmed by
   comparing bytes, so a hash collision costs a compare, never data;
2. store: each new shared cluster is written into the store and the store
   flushed (data and map durable) before anything references it;
3. per layer: one root write lists the regions to change in `intents` and
   sets `shared-clusters` with the store's uuid; the maps are committed with
   their references (both copies, rule 2); the local clusters are punched;
   one root write drops the regions from `intents` (rule 3 fsyncs first);
4. collect: store clusters that no layer file of the directory references
   are discarded from the store (mark and sweep, under the store's lock).

A crash leaves at worst store clusters nobody references yet (collected by
the next `dedup` or `dedup --gc`) and listed regions, which the layer's
recovery finishes (it punches the local bytes of shared clusters).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator

import attrs

from lamina.spec.crc import crc32c
from lamina.spec.errors import FormatError, InvalidArgument, LaminaError, UnsafeFile
from lamina.spec.layout import CLUSTERS_PER_REGION, MAX_VIRTUAL_SIZE, SECTOR_SIZE, allocated_regions
from lamina.spec.protocol import cluster_crc, current_maps, read_map_copies, read_root_copies
from lamina.spec.references import LAYER_DIR_SUFFIX, LAYER_NAME, ChainWalk, ImageContext, image_of, open_tree_file
from lamina.spec.regionmap import RegionMap, bit_runs, zero_absent
from lamina.spec.replication import select_root
from lamina.spec.storage import Storage
from lamina.spec.store import STORE_NAME, StoreView, open_store, uses_store
from lamina.spec.structures import FEATURE_SHARED_CLUSTERS, Root, decode_map_copy
from lamina.spec.tree import layer_files
from lamina.spec.zeros import is_zero

from .identity import new_uuid
from .image import Image, write_new_layer
from .osfile import OsStorage

Progress = Callable[[float], None]


class DedupAcrossDirectories(InvalidArgument):
    """Images to deduplicate together must share one directory: one shared store serves one directory."""


@attrs.define
class DedupReport:
    """What one `dedup` found and did (a dry run: what it would do)."""

    dry_run: bool
    layers: int = 0  # frozen layer files scanned
    layers_skipped: int = 0  # frozen layers of another cluster size or directory than the store's
    clusters_scanned: int = 0  # present, not yet shared clusters of the frozen layers
    bytes_scanned: int = 0
    duplicates: int = 0  # clusters that become (or would become) references into the store
    store_clusters_added: int = 0
    bytes_saved: int = 0  # local bytes freed minus the store bytes added
    checksum_failures: int = 0  # clusters failing I5: never shared
    collected: int = 0  # store clusters nobody referenced, freed by the collection
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"dry_run": self.dry_run, "layers": self.layers, "layers_skipped": self.layers_skipped,
                "clusters_scanned": self.clusters_scanned, "bytes_scanned": self.bytes_scanned,
                "duplicates": self.duplicates, "store_clusters_added": self.store_clusters_added,
                "bytes_saved": self.bytes_saved, "checksum_failures": self.checksum_failures,
                "collected": self.collected, "seconds": round(self.seconds, 3)}


def _key(data: bytes) -> int:
    """A 64-bit BLAKE2b digest: only a candidate key, since every match is confirmed by comparing bytes."""
    from hashlib import blake2b  # here, not at import: `info` imports this module for `shared_bytes` alone

    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


def _directory_of(path: str) -> str:
    return ImageContext.for_layer(path).top_dir


def images_in(paths: list[str], storage: Storage) -> list[str]:
    """The image tops named: a directory stands for every top image file in it (not the store)."""
    out: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(storage.listdir(path)):
                full = os.path.join(path, name)
                if name.endswith(".lam") and name != STORE_NAME and storage.stat(full).is_file:
                    out.append(full)
        else:
            out.append(path)
    unique: dict[str, str] = {}
    for path in out:  # an image named twice (by itself and in its directory) counts once
        unique.setdefault(os.path.realpath(path), path)
    return list(unique.values())


def frozen_layers(tops: list[str], storage: Storage) -> list[str]:
    """Every frozen Lamina file the images reach (snapshot layers, Lamina bases), each file once, tops excluded."""
    tops_real = {os.path.realpath(t) for t in tops}
    seen: set = set()
    out: list[str] = []
    for top in tops:
        files, _ = layer_files(top, storage)
        top_id = storage.stat(os.path.realpath(top)).identity
        for path in files:
            identity = storage.stat(os.path.realpath(path)).identity
            if os.path.realpath(path) in tops_real or identity == top_id or identity in seen:
                continue  # a writable top (or its twin): its data is not frozen; `snapshot create` freezes it
            seen.add(identity)
            out.append(path)
    return out


def store_file(directory: str) -> str:
    return os.path.join(directory, STORE_NAME)


def _open_store_image(directory: str, cluster_bits: int, storage: Storage, create: bool,
                      readonly: bool = False) -> Image | None:
    """The store, opened for writing (its exclusive lock is the lock of every dedup and collection)."""
    path = store_file(directory)
    if not storage.exists(path):
        if not create:
            return None
        write_new_layer(storage, path, Root(cluster_bits=cluster_bits, virtual_size=0, image_uuid=new_uuid()))
    if not storage.stat(path).is_file:  # opened as an image of its own, it would follow a symbolic link (F-OPEN-001)
        raise UnsafeFile(f"{path}: the shared store is not a regular file (a symbolic link?); refusing to use it")
    store = Image.open(path, readonly=readonly, storage=storage)
    if store.root.base_kind or uses_store(store.root):
        store.close()
        raise InvalidArgument(f"{path}: not a shared store (it has a base or shared clusters of its own)")
    return store


def _layer_of(path: str, storage: Storage, writable: bool) -> Image:
    """A frozen layer alone (no base: dedup works on what the layer itself holds), the store not locked again."""
    return Image._open_layer(path, not writable, storage, ImageContext.for_layer(path), ChainWalk(), table=False,
                             store_lock=False)


MAX_OPEN_LAYERS = 128  # frozen layers open at once (files and their maps), however many a dedup covers (R10)


class _OpenLayers:
    """The frozen layers of one dedup by number (1, 2, ...), at most MAX_OPEN_LAYERS of them open at once.

    A dedup may cover thousands of snapshots; each open layer holds a file descriptor and its maps, so the
    least recently used one is closed and reopened when needed again.  Nothing is lost by that: every
    step re-reads what it judges (candidates are confirmed by their bytes, references written from the
    layer's maps as they are then), and each reopen recovers the layer as any open does.
    """

    def __init__(self, storage: Storage, writable: bool) -> None:
        self._storage, self._writable = storage, writable
        self._paths: list[str] = []
        self._open: dict[int, Image] = {}  # insertion order is use order: the first is the least recent

    def __len__(self) -> int:
        return len(self._paths)

    def add(self, path: str) -> tuple[int, Image]:
        """Open one more layer; its number and the open layer (closed again unless numbered)."""
        layer = self._opened(path)
        self._paths.append(path)
        self._keep(len(self._paths), layer)
        return len(self._paths), layer

    def drop_last(self) -> None:
        """Forget the layer `add` just opened (it is not deduplicated after all)."""
        self._open.pop(len(self._paths)).close()
        self._paths.pop()

    def get(self, number: int) -> Image:
        layer = self._open.pop(number, None)
        if layer is None:
            layer = self._opened(self._paths[number - 1])
        self._keep(number, layer)
        return layer

    def _opened(self, path: str) -> Image:
        return _layer_of(path, self._storage, self._writable)

    def _keep(self, number: int, layer: Image) -> None:
        while len(self._open) >= MAX_OPEN_LAYERS:
            self._open.pop(next(iter(self._open))).close()
        self._open[number] = layer

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def _held(layer: Image, m: RegionMap, c: int) -> bytes:
    """A cluster's bytes as the layer holds them: its present sectors, zero elsewhere (what `data_crcs` covers)."""
    g = layer.geometry
    data = layer.file.pread(g.region_data_offset(m.region) + c * g.cluster_size, g.cluster_size)
    return zero_absent(data.ljust(g.cluster_size, b"\0"), m.cluster_mask(c), g.sectors_per_cluster)


def _present_clusters(layer: Image) -> Iterator[tuple[RegionMap, int]]:
    for region in allocated_regions(sorted(layer.file.data_extents()), layer.geometry):
        m = layer._map(region)
        if m is None:
            continue
        for c in m.present_clusters():
            if not m.shared[c]:
                yield m, c


def _store_clusters(store: Image) -> Iterator[int]:
    """Allocated clusters of the store, ascending."""
    g = store.geometry
    for region in allocated_regions(sorted(store.file.data_extents()), g):
        m = store._map(region)
        if m is not None:
            for c in m.present_clusters():
                yield region * CLUSTERS_PER_REGION + c


def dedup(images: list[str], across: list[str] = (), dry_run: bool = False, storage: Storage | None = None,
          progress: Progress | None = None, gc_only: bool = False) -> DedupReport:
    """Share the equal clusters of the frozen layers of `images` (and `across`) through their directory's store."""
    storage = storage or OsStorage()
    started = time.monotonic()
    tops = images_in(list(images) + list(across), storage)
    if not tops:
        raise InvalidArgument("dedup: no image named")
    directory = _directory_of(tops[0])
    for path in list(images) + list(across):
        if os.path.isdir(path) and os.path.abspath(path) != directory:
            raise DedupAcrossDirectories(f"{path}: not {directory}; one shared store serves one directory, so "
                                         "images deduplicated together must be in the same directory")
    for top in tops:
        if _directory_of(top) != directory:
            raise DedupAcrossDirectories(f"{top}: not in {directory}; one shared store serves one directory, so "
                                         "images deduplicated together must be in the same directory")
    report = DedupReport(dry_run)
    layers = frozen_layers(tops, storage)
    bits = None
    for path in layers:
        with _layer_of(path, storage, False) as layer:
            bits = layer.root.cluster_bits if bits is None else bits
    store = _open_store_image(directory, bits or 16, storage, create=not (dry_run or gc_only) and bool(layers),
                              readonly=dry_run)
    try:
        if gc_only:
            if store is not None:
                report.collected = collect(store, directory, storage)
            report.seconds = time.monotonic() - started
            return report
        if store is not None:
            bits = store.root.cluster_bits
        usable = [p for p in layers if _directory_of(p) == directory]
        report.layers_skipped = len(layers) - len(usable)
        _share(usable, store, bits, report, storage, progress)
        if store is not None and not dry_run:
            report.collected = collect(store, directory, storage)
    finally:
        if store is not None:
            store.close()
    report.seconds = time.monotonic() - started
    return report


def _share(layers: list[str], store: Image | None, bits: int | None, report: DedupReport, storage: Storage,
           progress: Progress | None) -> None:
    dry_run = report.dry_run
    # Scan (step 1).  The index holds one 64-bit key per distinct cluster content; a location is
    # (layer number + 1) << 40 | cluster, or a store cluster index (layer number 0).
    index: dict[int, int] = {}
    duplicates: dict[int, list[int]] = {}  # first location -> later locations with the same key
    if store is not None:
        for s in _store_clusters(store):
            index.setdefault(_key(store.read(s * store.cluster_size, store.cluster_size)), s)
    opened = _OpenLayers(storage, not dry_run)
    try:
        for number, path in enumerate(layers):
            tag, layer = opened.add(path)
            if layer.root.cluster_bits != bits:
                opened.drop_last()
                report.layers_skipped += 1
                continue
            report.layers += 1
            tag <<= 40
            for m, c in _present_clusters(layer):
                data = _held(layer, m, c)
                mask = m.cluster_mask(c)
                report.clusters_scanned += 1
                report.bytes_scanned += len(data)
                if m.region in layer.root.intents or cluster_crc(data, mask) != m.data_crcs[c]:
                    report.checksum_failures += m.region not in layer.root.intents
                    continue  # I5 fails (or is not judged): never share bytes the map does not vouch for
                if is_zero(data):
                    continue  # holes already: sharing saves nothing
                location = tag | (m.region * CLUSTERS_PER_REGION + c)
                first = index.setdefault(_key(data), location)
                if first != location:
                    duplicates.setdefault(first, []).append(location)
            if progress:
                progress(0.5 * (number + 1) / len(layers))
        _apply(opened, store, index, duplicates, report, progress)
    finally:
        opened.close()


def _read_location(opened: _OpenLayers, store: Image | None, location: int) -> tuple[bytes, int]:
    """The held bytes at a location and the presence mask of its sectors (a store cluster: its own)."""
    number, cluster = location >> 40, location & ((1 << 40) - 1)
    if number == 0 and store is not None:  # locations of number 0 exist only when there is a store
        g = store.geometry
        m = store._map(cluster // CLUSTERS_PER_REGION)
        return store.read(cluster * g.cluster_size, g.cluster_size), m.cluster_mask(cluster % CLUSTERS_PER_REGION)
    layer = opened.get(number)
    m = layer._map(cluster // CLUSTERS_PER_REGION)
    return _held(layer, m, cluster % CLUSTERS_PER_REGION), m.cluster_mask(cluster % CLUSTERS_PER_REGION)


def _free_store_clusters(store: Image) -> Iterator[int]:
    """Free store clusters, ascending, then indices past its end (the store grows to hold them)."""
    used = set(_store_clusters(store))
    s = 0
    while True:
        if s not in used:
            yield s
        s += 1


def _apply(opened: _OpenLayers, store: Image | None, index: dict[int, int], duplicates: dict[int, list[int]],
           report: DedupReport, progress: Progress | None) -> None:
    """Confirm each candidate group by bytes, write the new store clusters (step 2), then the references (step 3)."""
    refs: dict[int, dict[int, int]] = {}  # layer number -> {cluster -> store cluster}
    new: list[tuple[int, bytes, int]] = []  # (store cluster, bytes, mask) to write
    free = _free_store_clusters(store) if store is not None else iter(range(1 << 62))
    size = opened.get(1).cluster_size if len(opened) else 0
    for first, later in duplicates.items():
        reference, mask = _read_location(opened, store, first)
        same = [loc for loc in later if _read_location(opened, store, loc)[0] == reference]  # confirmed by bytes
        if first >> 40:
            if not same:
                continue
            target = next(free)
            new.append((target, reference, mask))
            same.append(first)
            report.store_clusters_added += 1
            report.bytes_saved -= bin(mask).count("1") * SECTOR_SIZE
        else:
            target = first
        for loc in same:
            number, cluster = loc >> 40, loc & ((1 << 40) - 1)
            refs.setdefault(number, {})[cluster] = target
            layer = opened.get(number)
            report.duplicates += 1
            report.bytes_saved += bin(layer._map(cluster // CLUSTERS_PER_REGION).cluster_mask(
                cluster % CLUSTERS_PER_REGION)).count("1") * SECTOR_SIZE
    if report.dry_run or store is None or not refs:
        return
    # Step 2: the store holds every new cluster, durably, before any layer references it.
    needed = max((s for s, _, _ in new), default=-1) + 1
    if needed * size > store.virtual_size:
        grown = min(MAX_VIRTUAL_SIZE // size, max(needed, store.virtual_size // size * 2)) * size
        store.resize(grown)
    for s, data, mask in sorted(new):
        for first_sector, count, present in bit_runs(mask, size // SECTOR_SIZE):
            if present:
                lo = first_sector * SECTOR_SIZE
                store.write(s * size + lo, data[lo : lo + count * SECTOR_SIZE])
    store.flush()
    # Step 3, per layer.
    for i, (number, clusters) in enumerate(sorted(refs.items())):
        reference_clusters(opened.get(number), store.root.image_uuid, clusters, store)
        if progress:
            progress(0.5 + 0.5 * (i + 1) / len(refs))


def reference_clusters(layer: Image, store_uuid: bytes, clusters: dict[int, int], store: Image) -> None:
    """Make `clusters` of a frozen layer references into the store (F-SHARE-005 step 3); contents never change.

    Per batch of regions: a root write listing them (with the feature and the store's uuid), the maps with their
    references committed (both copies), the local clusters punched, then a root write dropping them, after an
    fsync (rule 3).  A crash leaves the batch listed; recovery punches what is left of the local bytes.
    """
    layer.preserve_content = True  # the guest contents stay: data_generation must not move (F-REF-003)
    g = layer.geometry
    by_region: dict[int, dict[int, int]] = {}
    for cluster, s in clusters.items():
        by_region.setdefault(cluster // CLUSTERS_PER_REGION, {})[cluster % CLUSTERS_PER_REGION] = s
    regions = sorted(by_region)
    batch = max(1, layer.max_intents // 2)
    for i in range(0, len(regions), batch):
        group = set(regions[i : i + batch])
        features = layer.root.incompatible_features | FEATURE_SHARED_CLUSTERS
        layer._drop_intents(set(), add=group, incompatible_features=features, store_uuid=store_uuid)
        if layer._store is None:
            layer._store = open_store(layer.root, layer.context, layer._storage, layer.path)
        for region in sorted(group):
            m = layer._map(region, for_write=True)
            for c, s in by_region[region].items():
                m.shared[c] = s + 1
        layer._commit_maps(group)
        for region in sorted(group):
            for c in by_region[region]:
                layer.file.punch_hole(g.region_data_offset(region) + c * g.cluster_size, g.cluster_size)
        layer._unsynced = True
        layer._drop_intents(group)
    layer.file.fsync()
    layer._unsynced = False


# ---------------------------------------------------------------------------- garbage collection
def _layer_files_of(directory: str, storage: Storage) -> Iterator[str]:
    """Every layer file of the directory: each top `*.lam` and each `*.layers/<uuid>.lam` (the store excluded)."""
    for name in sorted(storage.listdir(directory)):
        path = os.path.join(directory, name)
        stat = storage.stat(path)
        if name.endswith(".lam") and name != STORE_NAME and stat.is_file:
            yield path
        elif name.endswith(LAYER_DIR_SUFFIX) and stat.is_dir:
            for inner in sorted(storage.listdir(path)):
                if LAYER_NAME.match(inner) and storage.stat(os.path.join(path, inner)).is_file:
                    yield os.path.join(path, inner)


def referenced_store_clusters(directory: str, store_uuid: bytes, storage: Storage) -> set[int]:
    """Mark: every store cluster any valid map copy of any layer file of the directory references.

    Both copies count, not only the current one: a copy a crash left behind may become current again only
    through recovery, which keeps the references of the copy it selects, so counting both never frees a
    cluster that any outcome still reads.
    """
    marked: set[int] = set()
    for path in _layer_files_of(directory, storage):
        try:
            file = open_tree_file(storage, path, False, ImageContext.for_layer(path))
        except (OSError, LaminaError):
            continue
        try:
            try:
                root = select_root(read_root_copies(file), table=False).current()
            except FormatError:
                continue
            if not uses_store(root) or root.store_uuid != store_uuid:
                continue
            g = root.geometry
            for region in allocated_regions(sorted(file.data_extents()), g):
                for slot, raw in enumerate(read_map_copies(file, g, region)):
                    try:
                        copy = decode_map_copy(raw, g, region, slot, root.image_uuid)
                    except FormatError:
                        continue
                    marked.update(s - 1 for s in copy.shared if s)
        finally:
            file.close()
    return marked


def collect(store: Image, directory: str, storage: Storage) -> int:
    """Sweep: discard every store cluster no layer references; returns how many (F-SHARE-006)."""
    marked = referenced_store_clusters(directory, store.root.image_uuid, storage)
    size = store.cluster_size
    freed = [s for s in _store_clusters(store) if s not in marked]
    for s in freed:
        store.discard(s * size, size)
    store.flush()
    return len(freed)


def gc(directory_or_image: str, storage: Storage | None = None) -> int:
    """`lamina dedup --gc`: collect the store of the directory of an image (or of a directory)."""
    storage = storage or OsStorage()
    directory = directory_or_image if os.path.isdir(directory_or_image) else _directory_of(directory_or_image)
    store = _open_store_image(directory, 16, storage, create=False)
    if store is None:
        return 0
    try:
        return collect(store, directory, storage)
    finally:
        store.close()


def layer_sharing(path: str, storage: Storage) -> tuple[int, int]:
    """(shared, exclusive) bytes of a layer file's present sectors, from its root and current maps alone."""
    file = open_tree_file(storage, path, False, ImageContext.for_layer(path))
    try:
        root = select_root(read_root_copies(file), table=False).current()
        shared = exclusive = 0
        for m in current_maps(file, root):
            here, rest = _sharing(m)
            shared, exclusive = shared + here, exclusive + rest
        return shared, exclusive
    finally:
        file.close()


def shared_bytes(layer: Image) -> tuple[int, int]:
    """(shared, exclusive) bytes of a layer's present sectors: those whose bytes live in the store, and the rest."""
    g = layer.geometry
    shared = exclusive = 0
    for region in allocated_regions(sorted(layer.file.data_extents()), g):
        m = layer._map(region)
        if m is not None:
            here, rest = _sharing(m)
            shared, exclusive = shared + here, exclusive + rest
    return shared, exclusive


def _sharing(m: RegionMap) -> tuple[int, int]:
    """(shared, exclusive) bytes of one region's present sectors: one count over the bitmap, and one per
    shared cluster (a region that shares nothing, the usual one, costs no step per cluster)."""
    present = int.from_bytes(m.present, "little").bit_count()
    shared = sum(m.cluster_mask(c).bit_count() for c in m.shared_clusters())
    return shared * SECTOR_SIZE, (present - shared) * SECTOR_SIZE
