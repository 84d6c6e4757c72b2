"""The reference implementation of one writable Lamina image.

Every structure comes from `lamina.spec.structures`, every place from
`lamina.spec.layout`, and every ordering of writes and fsyncs from
`lamina.spec.protocol`; this module adds only the working state (which maps
are loaded, which clusters are dirty) and the guest-facing API.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterable, Iterator, TypeVar

import attrs

from lamina.spec.crc import crc32c
from lamina.spec.errors import ImageClosed, InvalidArgument, LaminaError, OutOfBounds, ReadOnlyImage
from lamina.spec.layout import (
    DEFAULT_CLUSTER_BITS,
    MAX_BASE_PATH,
    MAX_INTENTS,
    root_copy_offset,
    SECTOR_SIZE,
    Geometry,
    allocated_regions,
    check_virtual_size,
    cluster_size_to_bits,
)
from lamina.spec.crc import crc32c
from lamina.spec.protocol import (
    SETTLE_INTERVAL,
    cluster_crc,
    commit_maps,
    read_map_copies,
    read_root_copies,
    reconcile_region,
    recover,
    write_root,
)
from lamina.spec.regionmap import RegionMap, bit_runs, zero_absent
from lamina.spec.replication import select_map, select_root
from lamina.spec.storage import File, Storage
from lamina.spec.references import (
    ChainWalk,
    ImageContext,
    check_identity,
    check_layer_file,
    layer_dir_of,
    open_tree_file,
    resolve_base,
)
from lamina.spec.structures import (BASE_LAMINA, BASE_RAW, FLAG_COMMITTING, KNOWN_AUTOCLEAR_FEATURES, ROOT_MAGIC, Root, encode_root,
                                    next_counter)

from lamina.spec.layout import CLUSTERS_PER_REGION
from lamina.spec.store import SharedReferenceError, StoreView, open_store, uses_store

from .identity import new_uuid
from .osfile import OsStorage


@attrs.frozen
class Extent:
    """A run of guest bytes with one state, as `lamina map` reports it."""

    start: int
    length: int
    data: bool  # present in this layer (its own file, or the shared store for a shared cluster)
    offset: int | None  # file offset of the bytes when present
    file: str | None = None  # the file holding them when not the layer's own: the shared store (F-SHARE-003)


@attrs.frozen
class MetadataRegion:
    """A metadata structure's place in the file, as `lamina map --metadata` reports it."""

    offset: int
    length: int
    kind: str  # "root" or "map"
    copy: int  # 0 (A) or 1 (B)
    region: int | None = None


# A region is listed with its aligned group: one root write serves a sequential stream, or random writes after an
# open, for 16 regions.  Listed regions never written are dropped by idle eviction, like any other idle region.
INTENT_GROUP = 16
NO_LIMIT = 1 << 63  # above every virtual size: no layer passed narrows the piece

Method = TypeVar("Method", bound=Callable)


def _marks_failure(method: Method) -> Method:
    """A step that stops midway (ENOSPC, EIO) leaves bytes in unknown state: `close` must know (see there)."""

    @functools.wraps(method)
    def run(self: "Image", *args: object, **kwargs: object) -> object:
        try:
            return method(self, *args, **kwargs)
        except BaseException:
            self._failed = True
            raise

    return run  # type: ignore[return-value]


class RawBase:
    """A raw file as the bottom of a chain: its bytes are the guest's, and it is never written."""

    def __init__(self, path: str, file: File) -> None:
        self.path = path
        self._file = file
        self.virtual_size = file.size()

    def read(self, offset: int, length: int) -> bytes:
        return self._file.pread(offset, length).ljust(length, b"\0")

    def lock(self) -> None:
        """Shared: a raw base is only ever read (R11)."""
        self._file.lock(exclusive=False)

    def data_extents(self) -> list[tuple[int, int]]:
        """(offset, length) of the ranges of the file that may hold data; holes read zero."""
        return self._file.data_extents()

    def close(self) -> None:
        self._file.close()


class Image:
    """A Lamina image opened for guest I/O.  Use `Image.create` or `Image.open`."""

    def __init__(self, path: str, file: File, root: Root, root_best: int, writable: bool,
                 storage: Storage, context: ImageContext, base: "Image | RawBase | None" = None,
                 force_share: bool = False) -> None:
        self.path = path
        self.force_share = force_share  # a read-only inspection that takes no lock anywhere in the chain (-U)
        self._file: File | None = file
        self._root = root
        self._geometry = root.geometry
        self._intents = frozenset(root.intents)
        self._root_best = root_best
        self._writable = writable
        self._storage = storage
        self.context = context
        self.base = base
        self._store: StoreView | None = None  # the shared store, for a layer with `shared-clusters` (F-SHARE-003)
        self._maps: dict[int, RegionMap] = {}
        self._empty = RegionFlags()  # regions known to hold no sector here: a chain walk skips them unread
        self._span = self._geometry.region_span  # fixed: the cluster size of a layer never changes
        # region -> the holders of each cluster in the read-only run from here down (`_holders`)
        self._tables: dict[int, HoldersTable] = {}
        self._dirty: dict[int, set[int]] = {}  # region -> clusters (within the region) to checksum at flush
        # (region, cluster) -> the checksum of a dirty cluster whose last write covered all of it, made from the
        # bytes in hand: the flush records it without reading the cluster back (any other write of it drops it)
        self._known_crcs: dict[tuple[int, int], int] = {}
        self._fresh: set[int] = set()  # regions whose presence changed since their map's last commit
        self._deferred: set[int] = set()  # listed regions whose working checksums are newer than their durable map
        self._flushes = 0  # flushes since open: the clock of idle eviction
        self._last_written: dict[int, int] = {}  # listed region -> `_flushes` at its last write
        self._unsynced = False
        self._content_changed = False  # whether data_generation was bumped since open
        self._failed = False  # a mutating step failed midway since open
        self.preserve_content = False  # set by merges: they copy bytes the guest already sees
        # The intent-list policy (FORMAT.md section 6); any smaller values are valid too, and the crash
        # simulator lowers them so that small workloads reach eviction.
        self.max_intents = MAX_INTENTS
        self.settle_interval = SETTLE_INTERVAL

    # ----------------------------------------------------------------- life cycle
    @classmethod
    def create(cls, path: str, virtual_size: int | None = None, cluster_size: int = 1 << DEFAULT_CLUSTER_BITS,
               storage: Storage | None = None, base: str | None = None, base_format: str | None = None,
               allow_bases: tuple[str, ...] = ()) -> "Image":
        """Create an image atomically: it appears complete under `path`, or not at all.

        With `base`, the new image starts as a copy-free overlay of that raw
        file or Lamina image; its virtual size defaults to the base's.
        """
        storage = storage or OsStorage()
        bits = cluster_size_to_bits(cluster_size)
        if storage.exists(path):
            raise InvalidArgument(f"{path}: already exists")
        if virtual_size is None and base is None:
            raise InvalidArgument("a size is needed for an image without a base")
        context = ImageContext.for_top(path, allow_bases)
        root = Root(cluster_bits=bits, virtual_size=0, image_uuid=new_uuid())
        if base is not None:
            root = reference_base(root, base, base_format, context, storage, path)
        size = root.base_size if virtual_size is None else virtual_size
        check_virtual_size(size)
        root = attrs.evolve(root, virtual_size=size, base_visible=min(size, root.base_size))
        write_new_layer(storage, path, root)
        from .layers import link_twin

        link_twin(storage, path, root)  # F-TREE-003: the name this top keeps once a snapshot freezes it
        return cls.open(path, storage=storage, allow_bases=allow_bases)

    @classmethod
    def open(cls, path: str, readonly: bool = False, storage: Storage | None = None,
             allow_bases: tuple[str, ...] = (), context: ImageContext | None = None,
             walk: ChainWalk | None = None, lock: bool = True, force_share: bool = False) -> "Image":
        """Open an image and its chain of bases; a writable open recovers it from any crash first.

        `context` is the image the file belongs to (by default the one
        `ImageContext.for_layer` names); each base resolves against its own.
        The image's file is locked exclusive for a writer and shared for a
        reader, and every base below shared (R11).  `lock=False` skips the
        lock on this file alone: the caller holds it (`image_lock`).
        `force_share` takes no lock anywhere, for read-only inspection at
        the caller's risk (`-U/--force-share`, as with qemu-img).
        """
        if force_share and not readonly:
            raise InvalidArgument(f"{path}: -U/--force-share is only for read-only opens")
        storage = storage or OsStorage()
        context = context or ImageContext.for_layer(path, allow_bases)
        walk = walk or ChainWalk()
        image = cls._open_layer(path, readonly, storage, context, walk, lock=lock and not force_share,
                                force_share=force_share)
        try:
            image.base = open_base(image.root, context, storage, walk, path, force_share)
            if not readonly:
                root = image.root
                unknown = root.autoclear_features & ~sum(KNOWN_AUTOCLEAR_FEATURES, 0)
                if unknown:
                    image._write_root(autoclear_features=root.autoclear_features & ~unknown)
                if root.flags & FLAG_COMMITTING:
                    from .layers import finish_commit

                    finish_commit(image)
                if context.layer_dir == layer_dir_of(os.path.abspath(path)):
                    from .layers import collect_garbage

                    collect_garbage(path, storage)
            return image
        except BaseException:
            if image._file is not None:
                image._file.close()
                image._file = None
            _close_chain(image.base)
            raise

    @classmethod
    def _open_layer(cls, path: str, readonly: bool, storage: Storage, context: ImageContext, walk: ChainWalk,
                    table: bool = True, lock: bool = True, force_share: bool = False,
                    store_lock: bool = True) -> "Image":
        """One layer file, without its base, locked unless `lock` is false; a writable open recovers it (and the
        image's frozen layers) first.

        A base is opened with `table` false: its snapshot table is not used (see `decode_root`).
        """
        walk.visit(os.path.realpath(path), path, storage)
        file = open_tree_file(storage, path, not readonly, context)
        image = None
        try:
            if lock:
                file.lock(exclusive=not readonly)
            selection = select_root(read_root_copies(file), table=table)
            check_layer_file(path, selection.current(), context)  # before recovery writes anything into it
            if readonly:
                root, best = selection.current(), selection.slot
            else:
                recovered = recover(file)
                root, best = recovered.root, recovered.root_best_slot
                if context.layer_dir == layer_dir_of(os.path.abspath(path)) and storage.exists(context.layer_dir):
                    from .layers import recover_layers

                    recover_layers(path, storage)
            image = cls(path, file, root, best, not readonly, storage, context, None, force_share)
            if uses_store(root):
                image._store = open_store(root, context, storage, path)
                if lock and store_lock:
                    image._store.file.lock(exclusive=False)  # read, like a base (F-LOCK-001)
            return image
        except BaseException:
            if image is not None and image._store is not None:
                image._store.close()
            file.close()
            raise

    def close(self) -> None:
        """Flush, commit every deferred map, empty the intent list, and make both root copies durable.

        After a step that failed midway, the regions in the intent list may
        hold bytes no map accounts for, so they stay listed (F-PROTO-001) and
        the next writable open reconciles them; the root is still written
        again, so that both copies are current and `check` sees pending work,
        not a root update cut short.
        """
        if self._file is None:
            return
        try:
            if self._writable:
                try:
                    if self._root.intents and not self._failed:
                        self._checksum_dirty()
                        self._drop_intents(set(self._intents))  # one commit of every map not durable yet
                    else:
                        self.flush()
                finally:
                    if self._failed:
                        self._write_root()
                if self._unsynced:
                    self._file.fsync()
                    self._unsynced = False
        finally:
            self._file.close()
            self._file = None
            if self._store is not None:
                self._store.close()
                self._store = None
            _close_chain(self.base)

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- properties
    @property
    def root(self) -> Root:
        return self._root

    @property
    def geometry(self) -> Geometry:
        return self._geometry

    @property
    def virtual_size(self) -> int:
        return self._root.virtual_size

    @property
    def cluster_size(self) -> int:
        return self.geometry.cluster_size

    @property
    def file(self) -> File:
        if self._file is None:
            raise ImageClosed(f"{self.path}: image is closed")
        return self._file

    # ----------------------------------------------------------------- guest I/O
    def read(self, offset: int, length: int) -> bytes:
        """The guest's bytes at [offset, offset+length); absent sectors read from the base, or as zero.

        The chain is walked with a work list, not by recursion, so a chain
        of any depth the format allows reads in bounded stack.
        """
        self._check_range(offset, length)
        g = self._geometry
        end = offset + length
        first = None
        if length and (end - 1) // g.region_span == offset // g.region_span:
            first = self._own_piece(offset, end)
            if first[0] and not first[1]:
                return first[0]  # the whole request in one region of this layer: no copy
            if not first[0]:
                if self._base_limit() <= offset:
                    return bytes(length)  # nothing here and nothing below
                first = None  # none of it here: the walk below passes this layer by (or asks it again)
        out = bytearray(length)
        work: list[tuple[Image | RawBase | None, int, int]] = [(self, offset, end)]
        while work:
            layer, lo, hi = work.pop()
            if layer is None:
                continue  # nothing below holds these bytes: they stay zero
            if isinstance(layer, RawBase):
                out[lo - offset : hi - offset] = layer.read(lo, hi - lo)
                continue
            span = layer._span
            pos = lo
            while pos < hi:
                stop = min(hi, (pos // span + 1) * span)
                if layer._writable:  # its maps change with every write: asked directly
                    data, runs = first if first is not None else layer._own_piece(pos, stop)
                    first = None  # it was the top's only piece
                    _place(out, offset, pos, stop, data, runs)
                    limit = layer._base_limit()
                    work.extend((layer.base, a, min(b, limit)) for a, b in runs if a < min(b, limit))
                else:
                    first = None
                    layer._read_frozen(out, offset, pos, stop, work)
                pos = stop
        return bytes(out)

    def _read_frozen(self, out: bytearray, offset: int, pos: int, stop: int,
                     work: list[tuple["Image | RawBase | None", int, int]]) -> None:
        """Fill `out` for [pos, stop) (one region) from this read-only layer and the layers below it.

        The holders table of the region says, per cluster, which layers of the
        run below hold a sector of it, so a read asks only those, never the
        layers between that hold nothing there; what the last holder lacks goes
        to what ends the run (a raw base, a layer of another region size).
        """
        region = pos // self._span
        holders, end, end_limit = self._holders(region)
        bits = self._geometry.cluster_bits
        base = region * self._span
        c = (pos - base) >> bits
        last = (stop - 1 - base) >> bits
        while c <= last:
            chain = holders[c]
            d = c + 1
            while d <= last and holders[d] is chain:  # clusters with the same holders: one piece
                d += 1
            lo, hi = max(pos, base + (c << bits)), min(stop, base + (d << bits))
            pending = [(lo, hi)]
            for layer, limit in chain:
                pending = [(a, min(b, limit)) for a, b in pending if a < min(b, limit)]
                if not pending:
                    break
                lacking = []
                for a, b in pending:
                    data, runs = layer._own_piece(a, b)
                    _place(out, offset, a, b, data, runs)
                    lacking += runs
                pending = lacking
            work.extend((end, a, min(b, end_limit)) for a, b in pending if a < min(b, end_limit))
            c = d

    def _holders(self, region: int) -> "HoldersTable":
        """Per cluster of `region`, the layers from this one down that hold a sector of it, each with the
        limit the layers above it put on what is seen of it; then what ends the run, and its limit.

        The run is the read-only layers of this region size below (and with) this one: bases and
        frozen layers, which never change while open, so the table is built once per region, from
        maps the walk would load anyway.  Clusters with the same holders share one tuple.
        """
        table = self._tables.get(region)
        if table is None:
            if len(self._tables) >= 4096:  # bounded memory over a disk of any size (R10)
                self._tables.clear()
            lists: list[list[tuple[Image, int]]] = [[] for _ in range(CLUSTERS_PER_REGION)]
            layer: Image | RawBase | None = self
            limit = NO_LIMIT
            while isinstance(layer, Image) and layer._span == self._span and not layer._writable:
                m = layer._map(region)
                if m is not None:
                    for c in m.present_clusters():
                        lists[c].append((layer, limit))
                limit = min(limit, layer._base_limit())
                layer = layer.base
            shared: dict[tuple[tuple[int, int], ...], tuple[tuple[Image, int], ...]] = {}
            holders = tuple(shared.setdefault(tuple((id(h), lim) for h, lim in entry), tuple(entry)) for entry in lists)
            table = self._tables[region] = (holders, layer, limit)
        return table

    def _own_piece(self, pos: int, stop: int) -> tuple[bytes, list[tuple[int, int]]]:
        """This layer's bytes over [pos, stop) within one region, and the runs it lacks (no bytes: it lacks all)."""
        region = pos // self._geometry.region_span
        m = self._map(region)
        if m is None:
            self._empty.add(region)  # until a write here (`_map` for writing clears it)
            return b"", [(pos, stop)]
        runs = self._absent_runs(m, pos, stop)
        if runs == [(pos, stop)]:  # none of these sectors here: nothing to read from this file
            if not m.any_present():
                self._empty.add(region)  # nor anywhere in the region (asked only now: a read of present sectors never scans the bitmap)
            return b"", runs
        data = self.file.pread(self._geometry.guest_to_file(pos), stop - pos)
        if len(data) < stop - pos:
            data = data.ljust(stop - pos, b"\0")
        if m.shared_clusters():
            data = self._with_shared(m, pos, stop, data)
        return data, runs

    def _with_shared(self, m: RegionMap, pos: int, stop: int, data: bytes) -> bytes:
        """F-SHARE-003: the bytes of shared clusters in [pos, stop) come from the store, at the same offsets."""
        g = self._geometry
        size, base = g.cluster_size, m.region * g.region_span
        out = None
        for c in range((pos - base) // size, (stop - 1 - base) // size + 1):
            if not m.shared[c]:
                continue
            if self._store is None:
                raise SharedReferenceError(f"{self.path}: cluster {m.region * CLUSTERS_PER_REGION + c} is shared but "
                                           "the layer names no store")
            held = self._store.cluster(m.shared[c] - 1, f"{self.path}: cluster {m.region * CLUSTERS_PER_REGION + c}: ")
            lo, hi = max(pos, base + c * size), min(stop, base + (c + 1) * size)
            out = out if out is not None else bytearray(data)
            out[lo - pos : hi - pos] = held[lo - base - c * size : hi - base - c * size]
        return bytes(out) if out is not None else data

    def _unshare(self, pos: int, stop: int) -> None:
        """Before a write into shared clusters of this layer (a merge into a frozen layer), copy their bytes home.

        The present sectors of each shared cluster in [pos, stop) get the store's bytes at their local place, and
        the working map drops the reference; the region is listed, so a crash before the map commit leaves the
        reference, and recovery punches the local copy (F-SHARE-003).
        """
        g = self._geometry
        region = pos // g.region_span
        m = self._map(region, for_write=True)
        if m is None or not m.shared_clusters() or self._store is None:
            return
        size, base = g.cluster_size, region * g.region_span
        for c in range((pos - base) // size, (stop - 1 - base) // size + 1):
            if not m.shared[c]:
                continue
            held = self._store.cluster(m.shared[c] - 1, f"{self.path}: cluster {region * CLUSTERS_PER_REGION + c}: ")
            offset = g.region_data_offset(region) + c * size
            for first, count, present in bit_runs(m.cluster_mask(c), g.sectors_per_cluster):
                if present:
                    self.file.pwrite(offset + first * SECTOR_SIZE, held[first * SECTOR_SIZE : (first + count) * SECTOR_SIZE])
            m.shared[c] = 0
            self._unsynced = True
            self._fresh.add(region)
            self._dirty.setdefault(region, set()).add(c)

    def _base_limit(self) -> int:
        """Guest bytes below which this layer sees its base; zero without one."""
        return min(self._root.base_visible, self.base.virtual_size) if self.base is not None else 0

    def write(self, offset: int, data: bytes) -> None:
        """Write guest bytes; unaligned edges are merged with the sectors around them."""
        self._check_writable()
        self._check_range(offset, len(data))
        if not data:
            return
        head = offset % SECTOR_SIZE
        tail = (offset + len(data)) % SECTOR_SIZE
        if head or tail:
            start = offset - head
            end = offset + len(data) + (SECTOR_SIZE - tail if tail else 0)
            buf = bytearray(end - start)
            buf[:SECTOR_SIZE] = self.read(start, SECTOR_SIZE)
            buf[-SECTOR_SIZE:] = self.read(end - SECTOR_SIZE, SECTOR_SIZE)
            buf[head : head + len(data)] = data
            offset, data = start, bytes(buf)
        region = offset // self._span
        if region in self._intents and (offset + len(data) - 1) // self._span == region:
            size = self._geometry.cluster_size
            if not (offset | len(data)) & (size - 1) and self._store is None:
                self._write_whole_clusters(region, offset, data)  # a bulk write: no per-cluster plan
            else:
                self._write_segment(offset, data)  # the common case: one region, already listed (rule 1 holds)
            return
        view = memoryview(data)
        size = self._geometry.cluster_size
        if self._store is None and not (offset | len(data)) & (size - 1):
            self._for_each_region(offset, len(data), lambda pos, stop: self._write_whole_clusters(
                pos // self._span, pos, view[pos - offset : stop - offset]))
        else:
            self._for_each_region(offset, len(data), lambda pos, stop: self._write_segment(pos, view[pos - offset : stop - offset]))

    def own_file_range(self, offset: int, length: int) -> int | None:
        """The file offset that holds guest [offset, offset+length) when this layer holds all of it itself.

        That is: the range lies in one region, every sector of it is present
        here, and none of its clusters is shared (F-SHARE-003: those bytes are
        the store's).  Otherwise None, and `read` is the way to its bytes.
        """
        self._check_range(offset, length)
        span = self._span
        region = offset // span
        if not length or (offset + length - 1) // span != region:
            return None
        m = self._map(region)
        if m is None or m.shared_clusters() or self._absent_runs(m, offset, offset + length):
            return None
        return self._geometry.guest_to_file(offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make a range read as zero, freeing whole sectors of the file (format v1: same as discard)."""
        self._check_writable()
        self._check_range(offset, length)
        start = -(-offset // SECTOR_SIZE) * SECTOR_SIZE
        end = (offset + length) // SECTOR_SIZE * SECTOR_SIZE
        if start >= end:
            self.write(offset, bytes(length))
            return
        if start > offset:
            self.write(offset, bytes(start - offset))
        if offset + length > end:
            self.write(end, bytes(offset + length - end))
        self._for_each_region(start, end - start, self._zero_segment)

    def discard(self, offset: int, length: int) -> None:
        """Drop a range; it reads as zero afterwards."""
        self.write_zeroes(offset, length)

    def list_intents(self, ranges: Iterable[tuple[int, int]]) -> None:
        """List the regions of guest (offset, length) ranges in the intent list now, ahead of writes (rule 1).

        A bulk copy that knows what it will write pays one root write per
        batch of regions (half the list), not one per group of 16 regions
        written; regions listed and never written are dropped like any other.
        """
        self._check_writable()
        span = self._span
        regions: set[int] = set()
        for offset, length in ranges:
            self._check_range(offset, length)
            if length:
                regions.update(range(offset // span, (offset + length - 1) // span + 1))
        ordered = sorted(regions)
        batch = max(1, self.max_intents // 2)
        for i in range(0, len(ordered), batch):
            self._ensure_intents(set(ordered[i : i + batch]))

    def write_clusters(self, offset: int, data: bytes) -> None:
        """Write whole clusters and take their checksums from `data` itself, so the flush reads nothing back.

        What `write` then `flush` would record, for a copy that holds the
        bytes anyway (convert): every sector of these clusters is present, so
        each cluster's checksum is the CRC32C of its bytes as written.
        """
        size = self.cluster_size
        if offset % size or len(data) % size:
            raise InvalidArgument(f"{self.path}: write_clusters at {offset}, {len(data)} bytes: not whole clusters of {size}")
        self.write(offset, data)
        view = memoryview(data)
        span = self._span
        for pos in range(offset, offset + len(data), size):
            region, within = divmod(pos, span)
            c = within // size
            clusters = self._dirty.get(region)
            if clusters is None or c not in clusters:
                continue  # checksummed already (a flush inside the write): nothing is pending for it
            self._maps[region].data_crcs[c] = crc32c(view[pos - offset : pos - offset + size])
            clusters.discard(c)
            if not clusters:
                del self._dirty[region]
            self._deferred.add(region)

    @_marks_failure
    def flush(self) -> None:
        """Make every write so far durable: checksum dirty clusters, then commit the maps whose presence changed.

        A region with only overwrites of present sectors keeps its durable map
        (F-PROTO-005): it is listed, so its checksums can wait until it is
        dropped; the flush costs it one fsync, shared with every other region.
        Every `SETTLE_INTERVAL` flushes the regions idle that long are dropped.
        """
        self._check_open()
        if not self._writable:
            return
        self._checksum_dirty()
        if self._fresh:
            self._commit_maps(self._fresh)
        elif self._unsynced:
            self.file.fsync()
            self._unsynced = False
        self._flushes += 1
        if self._flushes % self.settle_interval == 0 and not self._failed:
            idle = {r for r in self._intents if self._last_written.get(r, -1) < self._flushes - self.settle_interval}
            if idle:
                self._drop_intents(idle)

    @_marks_failure
    def _checksum_dirty(self) -> None:
        """Checksum every cluster written since the last flush into the working maps (their maps become deferred)."""
        g = self.geometry
        spc, size = g.sectors_per_cluster, g.cluster_size
        known = self._known_crcs
        for region, clusters in sorted(self._dirty.items()):
            m = self._maps[region]
            data_offset = g.region_data_offset(region)
            for c in clusters:
                mask = m.cluster_mask(c)
                crc = known.get((region, c)) if known else None
                if mask and m.shared[c] and self._store is not None:  # its bytes are the store's (F-SHARE-003)
                    data = self._store.cluster(m.shared[c] - 1, f"{self.path}: ")
                    m.data_crcs[c] = cluster_crc(zero_absent(data, mask, spc), mask)
                elif crc is not None:  # made by the cluster's last change, a write that left nothing present outside it
                    m.data_crcs[c] = crc
                elif mask:
                    data = self.file.pread(data_offset + c * size, size)
                    m.data_crcs[c] = cluster_crc(zero_absent(data.ljust(size, b"\0"), mask, spc), mask)
                else:
                    m.data_crcs[c] = 0
            self._deferred.add(region)
        self._dirty.clear()
        known.clear()

    def _commit_maps(self, regions: set[int]) -> None:
        """Commit the working maps of `regions` (rule 2): their presence and checksums become durable."""
        regions = set(regions)  # a copy: the caller may pass `_fresh` itself
        try:
            commit_maps(self.file, self.geometry, [self._maps[r] for r in sorted(regions)], self._root.image_uuid)
        except BaseException:
            self._failed = True  # F-PROTO-004: what reached the file is unknown, the regions stay listed
            raise
        self._unsynced = True
        self._fresh -= regions
        self._deferred -= regions

    def _drop_intents(self, regions: set[int], add: set[int] = frozenset(), **changes: object) -> None:
        """One root write listing `add` and no longer `regions`, after their deferred maps are committed (rule 1).

        Only regions whose writes are checksummed (`_checksum_dirty`) may be
        dropped: their working maps then hold what the file holds.
        """
        if regions & set(self._dirty):
            raise AssertionError("a region with unchecksummed writes stays listed (callers checksum or spare it)")
        settle = regions & (self._deferred | self._fresh)
        if settle:
            self._commit_maps(settle)
        self._write_root(intents=tuple(sorted((self._intents - regions) | add)), **changes)
        for r in regions - add:
            self._last_written.pop(r, None)

    @_marks_failure
    def resize(self, virtual_size: int) -> None:
        """Grow or shrink the guest disk; the root write that records the new size is the switch."""
        self._check_writable()
        check_virtual_size(virtual_size)
        self.flush()
        old = self.geometry
        new = old.with_virtual_size(virtual_size)
        if virtual_size >= old.virtual_size:
            self.file.truncate(new.file_length)
            self._unsynced = True
            self._write_root(virtual_size=virtual_size, **self._content_change())
            return
        last = virtual_size // new.region_span if virtual_size % new.region_span else None
        intents = {last} if last is not None else set()
        self._drop_intents(set(self._intents) - intents, add=intents, virtual_size=virtual_size,
                           base_visible=min(self._root.base_visible, virtual_size), **self._content_change())
        self._maps = {r: m for r, m in self._maps.items() if r < new.num_regions}
        self._empty = RegionFlags()
        self.file.truncate(new.file_length)
        if last is not None:
            m = self._map(last, for_write=True)
            reconcile_region(self.file, new, m, sorted(self.file.data_extents()))
            self._commit_maps({last})
            self._last_written[last] = self._flushes
        self._unsynced = True

    # ----------------------------------------------------------------- layer operations
    def set_root(self, **changes: object) -> None:
        """Flush, then switch root fields (base reference, snapshot table, flags) in one root write.

        This is the atomic step of the management operations; it never counts
        as a change of guest contents.
        """
        self._check_writable()
        self.flush()
        self._write_root(**changes)
        self.file.fsync()
        self._unsynced = False

    def absent_ranges(self, start: int, end: int) -> list[tuple[int, int]]:
        """Guest ranges in [start, end) that this layer does not hold itself (they read from the base)."""
        g = self._geometry
        out: list[tuple[int, int]] = []
        pos = start
        while pos < end:
            region = pos // g.region_span
            stop = min(end, (region + 1) * g.region_span)
            m = self._map(region)
            runs = [(pos, stop)] if m is None else self._absent_runs(m, pos, stop)
            for lo, hi in runs:
                if out and out[-1][1] == lo:
                    out[-1] = (out[-1][0], hi)
                else:
                    out.append((lo, hi))
            pos = stop
        return out

    @_marks_failure
    def discard_own(self, offset: int, length: int) -> None:
        """Drop this layer's own sectors in a range so that the base shows through (used by commit).

        The maps saying "absent" are committed before any byte is punched: the
        other order lets a crash leave present sectors that read zero, which
        the resumed commit would then copy into the base (found by crashsim,
        workload layer-commit-lamina).
        """
        self._check_writable()
        start, end = offset // SECTOR_SIZE * SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE) * SECTOR_SIZE
        dropped: list[tuple[int, int]] = []

        def drop(pos: int, stop: int) -> None:
            self._mark(pos, stop, False)
            dropped.append((pos, stop))

        if end > start:
            self._for_each_region(start, end - start, drop)
        self.flush()
        for pos, stop in dropped:  # the regions stay in the intent list: a crash here is reconciled
            self.file.punch_hole(self._geometry.guest_to_file(pos), stop - pos)
            self._unsynced = True

    def reopen_base(self) -> None:
        """Open the base again after its reference or contents changed."""
        if self.base is not None:
            self.base.close()
        self.base = open_base(self._root, self.context, self._storage, ChainWalk(), self.path, self.force_share)

    def chain(self) -> list["Image | RawBase"]:
        """This layer and every base below it, top first."""
        out: list[Image | RawBase] = []
        layer: Image | RawBase | None = self
        while layer is not None:
            out.append(layer)
            layer = layer.base if isinstance(layer, Image) else None
        return out

    def read_padded(self, offset: int, length: int) -> bytes:
        """Like `read`, with bytes past the virtual size read as zero."""
        inside = max(0, min(length, self.virtual_size - offset))
        return (self.read(offset, inside) if inside else b"") + bytes(length - inside)

    # ----------------------------------------------------------------- inspection
    def extents(self) -> Iterator[Extent]:
        """Runs of present and absent guest sectors, merged, in guest order.

        Each region's presence bitmap is split into runs as one integer
        (`bit_runs`): a fully written region is one step, not one per sector.
        Present runs merge only while their file bytes continue too, so never
        across a region's end (its map copies lie between).
        """
        g = self.geometry
        region_span, virtual_size = g.region_span, g.virtual_size
        run: list = []  # [start, length, data, file offset or None, file or None]: the extent being merged

        def emit(start: int, length: int, data: bool, offset: int | None, file: str | None = None) -> Extent | None:
            """Merge into the open extent, or return it closed and open a new one."""
            if run and run[2] == data and run[0] + run[1] == start and (not data or (run[3] + run[1] == offset
                                                                                     and run[4] == file)):
                run[1] += length
                return None
            done = Extent(*run) if run else None
            run[:] = [start, length, data, offset, file]
            return done

        end = 0
        for region in self._regions_in_use():
            base = region * region_span
            span = min(region_span, virtual_size - base)
            m = self._map(region)
            if m is None or not m.any_present():
                continue
            if base > end and (done := emit(end, base - end, False, None)):
                yield done
            end = base + span
            data_offset = g.region_data_offset(region)
            shared = m.shared_clusters()
            for first, count, present in bit_runs(m.region_mask(), span // SECTOR_SIZE):
                for lo, n, offset, file in (self._placed(m, first, count, data_offset) if present and shared
                                            else [(first, count, data_offset + first * SECTOR_SIZE, None)]):
                    done = emit(base + lo * SECTOR_SIZE, n * SECTOR_SIZE, present, offset if present else None, file)
                    if done:
                        yield done
        if virtual_size > end and (done := emit(end, virtual_size - end, False, None)):
            yield done
        if run:
            yield Extent(*run)

    def _placed(self, m: RegionMap, first: int, count: int, data_offset: int) -> list[tuple[int, int, int, str | None]]:
        """A run of present sectors of a region with shared clusters, cut where the bytes change file:
        (first sector, sectors, file offset, the store's path or None for this layer's file)."""
        spc = self._geometry.sectors_per_cluster
        out = []
        end = first + count
        while first < end:
            c = first // spc
            stop = min(end, (c + 1) * spc)
            if m.shared[c] and self._store is not None:
                within = (first - c * spc) * SECTOR_SIZE
                place = self._store.geometry.guest_to_file((m.shared[c] - 1) * self._geometry.cluster_size + within)
                out.append((first, stop - first, place, self._store.path))
            else:
                out.append((first, stop - first, data_offset + first * SECTOR_SIZE, None))
            first = stop
        return out

    def guest_data_ranges(self) -> list[tuple[int, int]]:
        """Guest ranges [start, end) that some layer of the chain holds, merged; everything else reads zero.

        Each layer counts only below the limit where the one above still
        sees it (`base_visible`, sizes), as `read` does.
        """
        ranges: list[tuple[int, int]] = []
        limit = self.virtual_size
        for layer in self.chain():
            if isinstance(layer, RawBase):
                ranges += [(o, min(o + n, limit)) for o, n in layer.data_extents() if o < limit]
                break
            ranges += [(e.start, min(e.start + e.length, limit)) for e in layer.extents() if e.data and e.start < limit]
            limit = min(limit, layer._base_limit())
            if limit == 0:
                break
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged

    def _regions_in_use(self) -> list[int]:
        """Regions with allocated bytes on disk or a working map in memory."""
        on_disk = allocated_regions(sorted(self.file.data_extents()), self.geometry)
        return sorted(set(on_disk) | set(self._maps))

    def metadata_regions(self) -> list[MetadataRegion]:
        """Every metadata structure in the file: both root copies and both copies of each written map."""
        g = self.geometry
        length = len(encode_root(self._root))
        out = [MetadataRegion(root_copy_offset(slot), length, "root", slot) for slot in (0, 1)]
        for region in self._regions_in_use():
            if self._map(region) is None:
                continue
            for slot in (0, 1):
                out.append(MetadataRegion(g.map_copy_offset(region, slot), g.map_used_length, "map", slot, region))
        return out

    # ----------------------------------------------------------------- internals
    def _check_open(self) -> None:
        if self._file is None:
            raise ImageClosed(f"{self.path}: image is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if not self._writable:
            raise ReadOnlyImage(f"{self.path}: opened read-only")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise OutOfBounds(
                f"{self.path}: request at offset {offset}, length {length} reaches past the virtual size {self.virtual_size}"
            )

    def _map(self, region: int, for_write: bool = False) -> RegionMap | None:
        """A region's working map; never-written regions are not cached, so memory follows allocation."""
        m = self._maps.get(region)
        if m is not None:
            if for_write:
                self._empty.discard(region)
            return m
        if for_write:
            self._empty.discard(region)
        elif region in self._empty:
            return None
        g = self.geometry
        chosen = select_map(read_map_copies(self.file, g, region), g, region, self._root.image_uuid)
        if chosen.value is None and not for_write:
            self._empty.add(region)  # no map here: not asked again until a write (above) makes one
            return None
        m = RegionMap.from_copy(chosen.value, g, region, chosen.slot)
        self._maps[region] = m
        return m

    def _absent_runs(self, m: RegionMap, pos: int, stop: int) -> list[tuple[int, int]]:
        """Guest ranges [lo, hi) within [pos, stop) whose sectors are absent from this layer.

        The sectors the request touches are taken from the bitmap as one
        integer: a request whose sectors are all present costs one compare.
        """
        base = m.region * self._geometry.region_span
        first = (pos - base) // SECTOR_SIZE
        width = -(-(stop - base) // SECTOR_SIZE) - first
        skip = first % 8
        everything = (1 << width) - 1
        bits = int.from_bytes(m.present[first // 8 : -(-(first + width) // 8)], "little") >> skip & everything
        if bits == everything:
            return []
        start = base + first * SECTOR_SIZE
        return [(max(pos, start + s * SECTOR_SIZE), min(stop, start + (s + n) * SECTOR_SIZE))
                for s, n, present in bit_runs(bits, width) if not present]

    def _for_each_region(self, offset: int, length: int, action) -> None:
        """Run `action(pos, stop)` per region piece, after the pieces' regions are in the intent list."""
        g = self._geometry
        region = offset // g.region_span
        if (offset + length - 1) // g.region_span == region:  # the common case: one region
            if region not in self._intents:
                self._ensure_intents({region})
            action(offset, offset + length)
            return
        pieces = []
        pos, end = offset, offset + length
        while pos < end:
            stop = min(end, (g.region_of(pos) + 1) * g.region_span)
            pieces.append((pos, stop))
            pos = stop
        batch = max(1, self.max_intents // 2)
        for i in range(0, len(pieces), batch):
            group = pieces[i : i + batch]
            self._ensure_intents({g.region_of(p) for p, _ in group})
            for p, s in group:
                action(p, s)

    def _ensure_intents(self, regions: set[int]) -> None:
        """Rule 1 of the protocol: a region is in the durable intent list before its first write.

        Listed regions stay listed (they are dropped at close, by idle
        eviction in `flush`, or here when the list would overflow: the least
        recently written regions with no write since the last flush, after
        their deferred maps are committed).
        """
        missing = regions - self._intents
        if not missing:
            return
        wanted = set(regions)
        for region in missing:
            first = region - region % INTENT_GROUP
            wanted.update(range(first, min(first + INTENT_GROUP, self._geometry.num_regions)))
        limit = self.max_intents
        after_eviction = limit - limit // 4  # a full list is cut to this, so evictions are rare
        if len(self._intents | wanted) > limit:
            wanted = set(regions)
        drop: set[int] = set()
        if len(self._intents | wanted) > limit:
            if self._failed:
                raise InvalidArgument(f"{self.path}: a write failed earlier and {len(self._intents)} regions stay "
                                      "listed until the image is closed (F-PROTO-004); close and open it again")
            if len(set(self._dirty) | self._fresh | wanted) > after_eviction:
                self.flush()  # then every listed region qualifies
            idle = sorted(self._intents - set(self._dirty) - self._fresh - wanted,
                          key=lambda r: self._last_written.get(r, -1))
            drop = set(idle[: max(0, len(self._intents | wanted) - after_eviction)])
        self._drop_intents(drop, add=wanted, **self._content_change())

    def _content_change(self) -> dict[str, int]:
        """The first root write after open that precedes a guest write bumps `data_generation`, once.

        Children record their base's data generation, so a base written to
        after a child was made on it is detected; merges, which copy bytes
        the guest already sees, leave it alone.
        """
        if self._content_changed or self.preserve_content:
            return {}
        return {"data_generation": next_counter(self._root.data_generation, f"{self.path}: data_generation")}

    def _write_root(self, **changes: object) -> None:
        root = attrs.evolve(self._root, generation=next_counter(self._root.generation, f"{self.path}: the root's generation"),
                           **changes)
        try:
            self._root_best = write_root(self.file, root, self._root_best, self._unsynced)
        except BaseException:
            self._failed = True
            self._reload_root()
            raise
        self._content_changed |= root.data_generation != self._root.data_generation  # only once the bump is written
        self._root = root
        self._geometry = root.geometry
        self._intents = frozenset(root.intents)
        self._unsynced = True

    def _reload_root(self) -> None:
        """After a root write failed midway, which copy is current is on disk: the next write must spare it (rule 2)."""
        try:
            selection = select_root(read_root_copies(self.file))
        except (LaminaError, OSError):
            return  # unreadable now: the error being raised says why; a writable open recovers
        chosen = selection.value
        if chosen is not None and chosen.generation > self._root.generation:
            self._content_changed |= chosen.data_generation != self._root.data_generation
            self._root, self._geometry, self._intents = chosen, chosen.geometry, frozenset(chosen.intents)
        self._root_best = selection.slot
        self._unsynced = True

    def _mark(self, pos: int, stop: int, present: bool) -> None:
        span = self._span
        region = pos // span
        m = self._map(region, for_write=True)
        assert m is not None
        base = region * span
        if m.set_sectors((pos - base) // SECTOR_SIZE, (stop - pos) // SECTOR_SIZE, present):
            self._fresh.add(region)  # its map must be committed at the next flush
        self._last_written[region] = self._flushes
        clusters = self._dirty.get(region)
        if clusters is None:
            clusters = self._dirty[region] = set()
        bits = self._geometry.cluster_bits
        first, last = (pos - base) >> bits, (stop - 1 - base) >> bits
        if first == last:
            clusters.add(first)
        else:
            clusters.update(range(first, last + 1))
        if self._known_crcs:  # these clusters' bytes change here: a checksum made before no longer holds
            for c in range(first, last + 1):
                self._known_crcs.pop((region, c), None)
        if not present and m.shared_clusters():
            for c in range(first, last + 1):  # a shared cluster left with no present sector references nothing (F-SHARE-002)
                if m.shared[c] and not m.cluster_mask(c):
                    m.shared[c] = 0
                    self._fresh.add(region)

    @_marks_failure
    def _write_segment(self, pos: int, data: bytes) -> None:
        """Write sector-aligned bytes within one region, and the checksums of the clusters they touch.

        A cluster's checksum is that of its bytes with absent sectors as zero.
        When this write leaves nothing present outside it in a cluster (whole
        clusters, or a first write into an empty one), that is these bytes with
        zeros around them.  When sectors outside it are present and the
        cluster was not changed since it was last checksummed, the new
        one follows from the old by CRC32C's linearity over GF(2) (for messages
        of one length, crc(a ^ b) = crc(a) ^ crc(b) ^ crc(zeros)), from the
        bytes this write replaces (read before it, absent sectors as zero) and
        the new ones.  Either way the flush records it without reading the
        cluster back; bytes that rotted outside the write before it are not
        blessed into the new checksum, as a read-back would, so `check` still
        finds them.
        """
        if self._store is not None:
            self._unshare(pos, pos + len(data))  # its checksum stays; the cluster is then dirty and read back
        size, span = self._geometry.cluster_size, self._span
        region = pos // span
        base = region * span
        end = pos + len(data)
        first, last = (pos - base) // size, (end - 1 - base) // size
        m = self._map(region, for_write=True)  # loaded before the write (`_mark` would load it after)
        assert m is not None
        dirty = self._dirty.get(region, ())
        known = self._known_crcs
        plans: list = []  # (cluster, lo, hi, the cluster's checksum before, the replaced bytes as seen) or None to read back
        for c in range(first, last + 1):
            start = base + c * size
            lo, hi = max(pos, start) - start, min(end, start + size) - start
            sectors = (hi - lo) // SECTOR_SIZE
            old_mask = m.cluster_mask(c)
            if not old_mask & ~(((1 << sectors) - 1) << (lo // SECTOR_SIZE)):
                plans.append((c, lo, hi, None, None))
                continue
            if c in dirty:  # changed since its last checksum: one read-back at the flush costs less than a CRC per write
                plans.append(None)
                continue
            current = m.data_crcs[c]
            replaced = self.file.pread(self._geometry.guest_to_file(start + lo), hi - lo).ljust(hi - lo, b"\0")
            plans.append((c, lo, hi, current, zero_absent(replaced, old_mask >> (lo // SECTOR_SIZE) & ((1 << sectors) - 1), sectors)))
        self.file.pwrite(self._geometry.guest_to_file(pos), data)
        self._unsynced = True
        self._mark(pos, end, True)
        view = memoryview(data)
        for plan in plans:
            if plan is None:
                continue  # the flush reads the cluster back
            c, lo, hi, current, replaced = plan
            new = view[base + c * size + lo - pos : base + c * size + hi - pos]
            if current is None:  # nothing present outside: these bytes with zeros around them
                known[(region, c)] = _embedded_crc(new, lo, size)
                continue
            # Three messages of the cluster's length: the old cluster, and the replaced and the new bytes each with
            # zeros around them; an odd number of terms, so crc's constant term stays once.
            known[(region, c)] = current ^ _embedded_crc(replaced, lo, size) ^ _embedded_crc(new, lo, size)

    @_marks_failure
    def _write_whole_clusters(self, region: int, pos: int, data: bytes) -> None:
        """`_write_segment` for whole clusters of one listed region of a layer without a store, in one pass.

        Every sector of these clusters becomes present, so each cluster's
        checksum is the CRC32C of its new bytes, taken from the bytes in hand:
        it goes into the working map at once, as `write_clusters`
        puts it, and the region's map is deferred like any other checksummed
        region; the flush reads nothing back and the commit ordering is
        unchanged (the map still reaches the file only in `_commit_maps`).
        """
        g = self._geometry
        size = g.cluster_size
        m = self._maps.get(region)
        if m is None:
            m = self._map(region, for_write=True)
            assert m is not None
        else:
            self._empty.discard(region)
        base = region * self._span
        first = (pos - base) // size
        count = len(data) // size
        self.file.pwrite(g.guest_to_file(pos), data)
        self._unsynced = True
        width = m.sectors_per_cluster // 8
        lo, hi = first * width, (first + count) * width
        if m.present[lo:hi].count(0xFF) != hi - lo:
            m.present[lo:hi] = b"\xff" * (hi - lo)
            self._fresh.add(region)  # its map must be committed at the next flush
        self._last_written[region] = self._flushes
        crcs = m.data_crcs
        if count == 1:
            crcs[first] = crc32c(data)
        else:
            view = memoryview(data)
            for i in range(count):
                crcs[first + i] = crc32c(view[i * size : (i + 1) * size])
        dirty = self._dirty.get(region)
        if dirty:  # an earlier write left these clusters to be checksummed: this one did it
            dirty.difference_update(range(first, first + count))
            if not dirty:
                del self._dirty[region]
        if self._known_crcs:
            for c in range(first, first + count):
                self._known_crcs.pop((region, c), None)
        self._deferred.add(region)

    @_marks_failure
    def _zero_segment(self, pos: int, stop: int) -> None:
        """Punch the bytes; over a base the sectors stay present (as holes) so the base does not show through."""
        if self._store is not None:
            self._unshare(pos, stop)
        self.file.punch_hole(self.geometry.guest_to_file(pos), stop - pos)
        self._unsynced = True
        self._mark(pos, stop, self.base is not None)


_ZERO_BYTES = bytes(1 << 21)  # (= 2 MiB, the largest cluster) zeros for the checksums of partly written clusters


def _zeros(length: int) -> memoryview:
    return memoryview(_ZERO_BYTES)[:length]


@functools.cache
def _zeros_crc(length: int) -> int:
    """crc32c of `length` zero bytes."""
    return crc32c(_zeros(length))


@functools.cache
def _zero_extension(length: int) -> tuple[list[int], ...]:
    """Tables that give crc32c(zeros(length), value) from `value` by four look-ups.

    Appending zeros is affine over GF(2) in the value carried in: g(v) = M v ^ g(0); M is
    found from the 32 unit values, and tabulated per byte of v.
    """
    constant = crc32c(_zeros(length), 0)
    columns = [crc32c(_zeros(length), 1 << k) ^ constant for k in range(32)]
    tables = []
    for byte in range(4):
        table = [0] * 256
        for b in range(1, 256):
            low = b & -b  # the table of b is that of b without its lowest bit, plus that bit's column
            table[b] = table[b ^ low] ^ columns[8 * byte + low.bit_length() - 1]
        tables.append(table)
    tables[0] = [t ^ constant for t in tables[0]]  # the constant, once
    return tuple(tables)


def _embedded_crc(data: bytes | memoryview, lo: int, size: int) -> int:
    """crc32c of `size` bytes: zeros, `data` at `lo`, zeros; only `data` itself is run through the CRC."""
    crc = crc32c(data, _zeros_crc(lo)) if lo else crc32c(data)
    tail = size - lo - len(data)
    if not tail:
        return crc
    t0, t1, t2, t3 = _zero_extension(tail)
    return t0[crc & 0xFF] ^ t1[crc >> 8 & 0xFF] ^ t2[crc >> 16 & 0xFF] ^ t3[crc >> 24]


# Per cluster of a region, the (layer, limit) pairs that hold it; then what ends the run and its limit.
HoldersTable = tuple[tuple[tuple[tuple["Image", int], ...], ...], "Image | RawBase | None", int]


def _place(out: bytearray, offset: int, pos: int, stop: int, data: bytes, runs: list[tuple[int, int]]) -> None:
    """A layer's bytes of [pos, stop) into `out` (which starts at guest `offset`), zero where it lacks sectors."""
    if data:
        out[pos - offset : stop - offset] = data
        for a, b in runs:
            out[a - offset : b - offset] = bytes(b - a)  # the file's bytes there mean nothing


class RegionFlags:
    """A set of region indices, one bit each in 4096-region chunks made on first use.

    Memory follows the regions touched (a 1 PiB disk has up to 2^31
    regions), so every layer of a deep chain can remember its empty ones.
    """

    __slots__ = ("_chunks",)

    def __init__(self) -> None:
        self._chunks: dict[int, bytearray] = {}

    def __contains__(self, region: int) -> bool:
        chunk = self._chunks.get(region >> 12)
        return chunk is not None and chunk[(region >> 3) & 511] >> (region & 7) & 1 == 1

    def add(self, region: int) -> None:
        chunk = self._chunks.get(region >> 12)
        if chunk is None:
            chunk = self._chunks[region >> 12] = bytearray(512)
        chunk[(region >> 3) & 511] |= 1 << (region & 7)

    def discard(self, region: int) -> None:
        chunk = self._chunks.get(region >> 12)
        if chunk is not None:
            chunk[(region >> 3) & 511] &= ~(1 << (region & 7)) & 0xFF


def write_new_layer(storage: Storage, path: str, root: Root) -> None:
    """Write a complete new layer file under `path`: `path.creating`, fsync, rename, fsync the directory."""
    temporary = f"{path}.creating"
    if storage.exists(temporary):
        storage.unlink(temporary)  # left by a crash during an earlier create: never visible, never used
    file = storage.create(temporary)
    try:
        try:
            file.truncate(root.geometry.file_length)
            for slot in (0, 1):
                file.pwrite(root_copy_offset(slot), encode_root(attrs.evolve(root, slot=slot)))
            file.fsync()
        finally:
            file.close()
        storage.rename(temporary, path)
    except BaseException:
        if storage.exists(temporary):
            storage.unlink(temporary)
        raise
    storage.fsync_dir(os.path.dirname(os.path.abspath(path)))


def open_base(root: Root, context: ImageContext, storage: Storage, walk: ChainWalk, where: str,
              force_share: bool = False) -> "Image | RawBase | None":
    """Open a layer's chain of bases read-only and locked shared, each checked to be followable and the one recorded.

    Iterative: each base resolves against its own image (`resolve_base`),
    and `walk` bounds the depth and catches loops.
    """
    first: Image | RawBase | None = None
    above: Image | None = None
    try:
        while True:
            found = resolve_base(root, context, where, storage)
            if found is None:
                return first
            if root.base_kind == BASE_RAW:
                walk.visit(found.path, where, storage)
                layer: Image | RawBase = RawBase(found.path, open_tree_file(storage, found.path, False, found.context))
            else:
                layer = Image._open_layer(found.path, True, storage, found.context, walk, table=False,
                                          lock=not force_share, force_share=force_share)
            if above is None:
                first = layer
            else:
                above.base = layer
            if isinstance(layer, RawBase) and not force_share:
                layer.lock()
            if root.flags & FLAG_COMMITTING and isinstance(layer, Image):
                root = attrs.evolve(root, base_data_generation=layer.root.data_generation)  # the commit in flight writes it
            check_identity(root, layer.root if isinstance(layer, Image) else None, layer.virtual_size, where)
            if isinstance(layer, RawBase):
                return first
            above, root, context, where = layer, layer.root, found.context, found.path
    except BaseException:
        _close_chain(first)
        raise


@contextlib.contextmanager
def image_lock(path: str, exclusive: bool, storage: Storage | None = None) -> Iterator[None]:
    """Hold an image's lock across an operation that opens and closes it several times, or reads it through the spec.

    Opens inside pass `lock=False`: the lock held here, on its own open
    file, keeps every other process out until the operation ends.
    """
    storage = storage or OsStorage()
    file = open_tree_file(storage, path, exclusive, ImageContext.for_top(path))
    try:
        file.lock(exclusive)
        yield
    finally:
        file.close()



def _close_chain(layer: "Image | RawBase | None") -> None:
    """Close every layer of a chain of bases, from the top down, without recursion."""
    while layer is not None:
        below = layer.base if isinstance(layer, Image) else None
        if isinstance(layer, Image):
            layer.base = None
        layer.close()
        layer = below


def reference_base(root: Root, base: str, base_format: str | None, context: ImageContext, storage: Storage,
                   holder: str) -> Root:
    """`root` made to reference `base` (a path as the user gave it), with the identity found there.

    `holder` is the file that will hold the reference: a base whose chain
    reaches it would make a loop, and a chain too deep with it is refused
    too, both before anything is written.
    """
    name = base if os.path.isabs(base) else os.path.relpath(os.path.abspath(base), context.top_dir)
    kind = {"raw": BASE_RAW, "lamina": BASE_LAMINA, None: BASE_RAW}.get(base_format)
    if kind is None:
        raise InvalidArgument(f"base format must be raw or lamina, not {base_format!r}")
    if len(name.encode("utf-8")) > MAX_BASE_PATH:
        raise InvalidArgument(f"base path is longer than {MAX_BASE_PATH} bytes")
    found = resolve_base(attrs.evolve(root, base_kind=kind, base_path=name), context, "base", storage)
    assert found is not None
    file = open_tree_file(storage, found.path, False, found.context)
    try:
        size = file.size()
        if base_format is None and file.pread(0, len(ROOT_MAGIC)) == ROOT_MAGIC:
            kind = BASE_LAMINA
    finally:
        file.close()
    probe = attrs.evolve(root, base_kind=kind, base_path=name)
    walk = ChainWalk()
    walk.visit(os.path.realpath(holder), holder, storage)
    if kind == BASE_RAW:
        if size % SECTOR_SIZE:
            raise InvalidArgument(f"raw base {base} is {size} bytes, not a multiple of {SECTOR_SIZE}")
        walk.visit(found.path, holder, storage)
        return attrs.evolve(probe, base_size=size)
    with Image.open(found.path, readonly=True, storage=storage, context=found.context, walk=walk) as image:
        return attrs.evolve(probe, base_uuid=image.root.image_uuid, base_size=image.virtual_size,
                            base_data_generation=image.root.data_generation)
