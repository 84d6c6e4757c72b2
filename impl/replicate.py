"""`send` and `receive`: a snapshot, or what changed since another, as a verified stream (spec/stream.py).

What to send comes from the metadata: below the deepest layer two snapshots
share, nothing differs, so an incremental stream holds the sectors the
layers above it hold, skipped where they read as the base snapshot does.
A receiver builds the snapshot as a new frozen layer over its copy of the
base snapshot, unreferenced (so any crash leaves an orphan that the next
writable open removes), verifies the whole stream, and only then renames a
new top over the image: the switch, as `snapshot create` makes it.
"""
from __future__ import annotations

import os
from typing import BinaryIO, Callable

import attrs

from lamina.spec.crc import crc32c
from lamina.spec.errors import InvalidArgument
from lamina.spec.layout import SECTOR_SIZE
from lamina.spec.references import ImageContext, layer_dir_of, layer_file_name, open_tree_file, vmstate_file_name
from lamina.spec.storage import File, Storage
from lamina.spec.stream import (
    KIND_DATA,
    KIND_END,
    KIND_VMSTATE,
    KIND_ZERO,
    MAX_RECORD_PAYLOAD,
    StreamBegin,
    StreamEnd,
    StreamError,
    StreamMismatch,
    StreamReader,
    begin_for,
    encode_begin,
    encode_end,
    encode_record,
    KIND_BEGIN,
)
from lamina.spec.structures import BASE_LAMINA, Root, next_counter
from lamina.spec.check import check_region
from lamina.spec.layout import CLUSTERS_PER_REGION, Geometry, allocated_regions
from lamina.spec.protocol import cluster_crc, current_maps, read_map_copies
from lamina.spec.regionmap import RegionMap, bit_runs, zero_absent
from lamina.spec.replication import select_map
from lamina.spec.tree import layer_files, root_of, sparse_crc32c
from lamina.spec.zeros import is_zero

from . import layers
from .image import Image, image_lock, write_new_layer
from .osfile import OsStorage


@attrs.frozen
class SendStats:
    """What a stream held: for a report, and for the bytes-per-guest-byte measurement."""

    records: int
    data_bytes: int
    zero_bytes: int
    vmstate_bytes: int
    stream_bytes: int
    full: bool


class _Writer:
    """Frames records, numbers them and hashes everything before END."""

    def __init__(self, out: BinaryIO) -> None:
        import hashlib

        self._out = out
        self._hash = hashlib.sha256()
        self.sequence = 0
        self.bytes = 0
        self.counts = {KIND_DATA: 0, KIND_ZERO: 0, KIND_VMSTATE: 0}

    def record(self, kind: int, offset: int = 0, length: int | None = None, payload: bytes = b"") -> None:
        data = encode_record(kind, self.sequence, offset, length, payload)
        if kind != KIND_END:
            self._hash.update(data)
        if kind in self.counts:
            self.counts[kind] += len(payload) if length is None else length
        self._out.write(data)
        self.sequence += 1
        self.bytes += len(data)

    def end(self) -> None:
        self.record(KIND_END, payload=encode_end(StreamEnd(self.sequence, self.counts[KIND_DATA], self.counts[KIND_ZERO],
                                                           self.counts[KIND_VMSTATE], self._hash.digest())))


def _pieces(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges cut into sector-aligned pieces of at most one record's payload."""
    out = []
    for lo, hi in ranges:
        lo, hi = lo // SECTOR_SIZE * SECTOR_SIZE, -(-hi // SECTOR_SIZE) * SECTOR_SIZE
        for pos in range(lo, hi, MAX_RECORD_PAYLOAD):
            out.append((pos, min(hi, pos + MAX_RECORD_PAYLOAD)))
    return out


def send(target: str, out: BinaryIO, base_snapshot: str | None = None, storage: Storage | None = None,
         force_share: bool = False) -> SendStats:
    """Write the stream of snapshot `IMAGE@SNAP` to `out`: in full, or relative to snapshot `base_snapshot`."""
    storage = storage or OsStorage()
    path, snap = layers.parse_target(target)
    if snap is None:
        raise InvalidArgument(f"{target}: send sends a snapshot; name one as IMAGE@SNAPSHOT")
    with Image.open(path, readonly=True, storage=storage, force_share=force_share) as top:
        entry = layers._entry(top.root, snap, path)
        base_entry = layers._entry(top.root, base_snapshot, path) if base_snapshot is not None else None
    if base_entry is not None and base_entry.layer_uuid == entry.layer_uuid:
        raise InvalidArgument(f"{target}: a stream from a snapshot to itself holds nothing")
    with layers.open_target(target, storage, force_share=force_share) as image:
        writer = _Writer(out)
        if base_entry is None:
            begin = begin_for(entry, image.root.cluster_bits, image.virtual_size, image.root.data_generation)
            writer.record(KIND_BEGIN, payload=encode_begin(begin))
            for lo, hi in _pieces(image.guest_data_ranges()):
                data = image.read_padded(lo, hi - lo)
                if not is_zero(data):
                    writer.record(KIND_DATA, lo, payload=data)
        else:
            with layers.open_target(f"{path}@{base_snapshot}", storage, force_share=force_share) as base:
                begin = begin_for(entry, image.root.cluster_bits, image.virtual_size, image.root.data_generation,
                                  (base.root.image_uuid, base.root.data_generation, base.virtual_size))
                writer.record(KIND_BEGIN, payload=encode_begin(begin))
                _send_changes(writer, image, base)
        if entry.vmstate_size:
            _send_vmstate(writer, storage, path, snap, force_share)
        writer.end()
    return SendStats(writer.sequence, writer.counts[KIND_DATA], writer.counts[KIND_ZERO], writer.counts[KIND_VMSTATE],
                     writer.bytes, base_entry is None)


def _send_changes(writer: _Writer, image: Image, base: Image) -> None:
    """DATA and ZERO records for the pieces where `image` does not read as `base` (zero-extended) does."""
    size = image.virtual_size
    pending_zero: list[int] = []  # [start, end] of ZERO pieces being merged

    def flush_zero() -> None:
        if pending_zero:
            writer.record(KIND_ZERO, pending_zero[0], pending_zero[1] - pending_zero[0])
            pending_zero.clear()

    for lo, hi in _pieces([(lo, min(hi, size)) for lo, hi in layers.diff(base, image) if lo < size]):
        data = image.read_padded(lo, hi - lo)
        if data == base.read_padded(lo, hi - lo):
            continue
        if is_zero(data):
            if pending_zero and pending_zero[1] == lo:
                pending_zero[1] = hi
            else:
                flush_zero()
                pending_zero[:] = [lo, hi]
            continue
        flush_zero()
        writer.record(KIND_DATA, lo, payload=data)
    flush_zero()


def _send_vmstate(writer: _Writer, storage: Storage, path: str, snap: str, force_share: bool) -> None:
    vm_path, entry, context = layers._vmstate(path, snap, storage, force_share)  # verified against its entry first
    source = open_tree_file(storage, vm_path, False, context)
    try:
        for offset, length in source.data_extents():  # holes are not sent: they read as zero
            stop = min(offset + length, entry.vmstate_size)
            for pos in range(offset, stop, MAX_RECORD_PAYLOAD):
                data = source.pread(pos, min(MAX_RECORD_PAYLOAD, stop - pos))
                if not is_zero(data):
                    writer.record(KIND_VMSTATE, pos, payload=data)
    finally:
        source.close()


# ---------------------------------------------------------------------------- receive
class _Resumed:
    """The kept prefix of an interrupted stream, then the rest as it arrives; what arrives is appended to it."""

    def __init__(self, kept: BinaryIO, rest: BinaryIO) -> None:
        self._kept = kept
        self._rest = rest
        self._replaying = True

    def read(self, n: int) -> bytes:
        if self._replaying:
            data = self._kept.read(n)
            if data:
                return data
            self._replaying = False
        data = self._rest.read(n)
        self._kept.write(data)
        return data


def receive_resumable(target: str, source: BinaryIO, partial: str, force: bool = False,
                      storage: Storage | None = None) -> str:
    """`receive` that keeps what verified of an interrupted stream in the file `partial`.

    A stream is a function of the two snapshots alone, so the sender can
    start again at any byte (`send --resume-at N`): what it sends then
    continues the kept prefix, and the whole, prefix included, is verified
    as one stream before anything is visible.  On success `partial` is
    removed; on a stream cut short or damaged it keeps the bytes of the
    records that verified, and the error says where to resume.
    """
    with open(partial, "a+b") as kept:
        kept.seek(0)
        stream = _Resumed(kept, source)
        holder: list[StreamReader] = []
        try:
            name = receive(target, stream, force, storage, holder.append)
        except StreamError as error:
            verified = holder[0].verified if holder else 0
            kept.truncate(verified)
            kept.flush()
            os.fsync(kept.fileno())
            raise type(error)(f"{error}; the {verified} bytes that verified are kept in {partial}: resume with "
                              f"`lamina send --resume-at {verified} ... | lamina receive --partial {partial} {target}`"
                              ) from None
    os.unlink(partial)
    return name


def receive(target: str, source: BinaryIO, force: bool = False, storage: Storage | None = None,
            reading: Callable[[StreamReader], None] = lambda reader: None) -> str:
    """Receive a stream into image `target` and return the new snapshot's name.

    A full stream makes a new image; an incremental one needs the target to
    hold the stream's base snapshot.  Nothing is visible until the whole
    stream has verified; `force` lets the switch drop writes the target's top
    made since its last snapshot (as `zfs receive -F`).
    """
    storage = storage or OsStorage()
    reader = StreamReader(source)
    reading(reader)
    begin = reader.begin
    if begin.full:
        if storage.exists(target):
            raise StreamMismatch(f"{target}: exists; a full stream makes a new image (send an incremental stream with "
                                 "-i, or name a new image)")
        directory = layer_dir_of(os.path.abspath(target))
        _clear_interrupted(storage, directory, begin)
        if not storage.exists(directory):
            storage.mkdir(directory)
            storage.fsync_dir(os.path.dirname(directory))
        return _build(storage, target, reader, None, ())
    with image_lock(target, True, storage):
        with Image.open(target, storage=storage, lock=False) as top:
            old = top.root
            own = any(e.data for e in top.extents()) or top.root.base_kind != BASE_LAMINA or (
                top.base is not None and top.virtual_size != top.base.virtual_size)
        context = ImageContext.for_top(target)
        entry = begin.snapshot
        if any(e.layer_uuid == begin.snapshot_uuid for e in old.snapshots):
            raise StreamMismatch(f"{target}: already holds the stream's snapshot (layer {begin.snapshot_uuid.hex()})")
        if old.snapshot(entry.text_name) is not None:
            raise StreamMismatch(f"{target}: a snapshot named {entry.text_name!r} exists already")
        base = next((e for e in old.snapshots if e.layer_uuid == begin.from_uuid), None)
        if base is None:
            raise StreamMismatch(f"{target}: holds no snapshot of layer {begin.from_uuid.hex()}, which the stream is "
                                 "relative to; receive the streams before it first")
        with Image.open(os.path.join(context.layer_dir, layer_file_name(base.layer_uuid)), readonly=True,
                        storage=storage, context=context) as layer:
            have = (layer.root.data_generation, layer.virtual_size)
        if have != (begin.from_data_generation, begin.from_virtual_size):
            raise StreamMismatch(f"{target}: snapshot {base.text_name!r} is layer {base.layer_uuid.hex()} at data "
                                 f"generation {have[0]} and size {have[1]}; the stream is relative to generation "
                                 f"{begin.from_data_generation} and size {begin.from_virtual_size}")
        if own and not force:
            raise StreamMismatch(f"{target}: its top holds writes made since its last snapshot; receiving drops them "
                                 "(pass -F to confirm)")
        return _build(storage, target, reader, old, old.snapshots)


def _clear_interrupted(storage: Storage, directory: str, begin: StreamBegin) -> None:
    """A full receive that crashed before its switch left its own files and nothing else: remove just those."""
    if not storage.exists(directory):
        return
    own = {layer_file_name(begin.snapshot_uuid), vmstate_file_name(begin.snapshot_uuid)}
    names = storage.listdir(directory)
    if any(name.removesuffix(".creating") not in own for name in names):
        raise StreamMismatch(f"{directory}: exists and holds layers of another image; a full stream makes a new image")
    for name in names:
        storage.unlink(os.path.join(directory, name))
    storage.fsync_dir(directory)


def _finish_vmstate(file: File, size: int, crc: int, where: str) -> None:
    """The VM state received must be the one its entry describes, and durable before the switch (T3)."""
    file.truncate(size)
    if sparse_crc32c(file) != crc:
        raise StreamMismatch(f"{where}: the VM state received does not match its entry's CRC32C")
    file.fsync()


def _build(storage: Storage, target: str, reader: StreamReader, old: Root | None, snapshots: tuple) -> str:
    begin = reader.begin
    entry = begin.snapshot
    context = ImageContext.for_top(target)
    name = layer_file_name(begin.snapshot_uuid)
    layer_path = os.path.join(context.layer_dir, name)
    vm_path = os.path.join(context.layer_dir, vmstate_file_name(begin.snapshot_uuid))
    made = [layer_path, layer_path + ".creating", vm_path, vm_path + ".creating"]
    root = Root(cluster_bits=begin.cluster_bits, virtual_size=begin.virtual_size, image_uuid=begin.snapshot_uuid,
                data_generation=begin.snapshot_data_generation)
    if not begin.full:
        root = attrs.evolve(root, base_kind=BASE_LAMINA, base_path=layer_file_name(begin.from_uuid),
                            base_uuid=begin.from_uuid, base_data_generation=begin.from_data_generation,
                            base_size=begin.from_virtual_size, base_visible=min(begin.from_virtual_size,
                                                                                  begin.virtual_size))
    try:
        if storage.exists(layer_path) or storage.exists(vm_path):
            raise StreamMismatch(f"{layer_path}: exists already; the target holds this layer")
        write_new_layer(storage, layer_path, root)
        vmstate: File | None = storage.create(vm_path + ".creating") if entry.vmstate_size else None
        try:
            with Image.open(layer_path, storage=storage, context=context) as layer:
                layer.preserve_content = True  # the layer keeps the sender's data generation: it is that snapshot
                for record in reader:  # each record verified; the loop ends only after END verified
                    if record.kind == KIND_DATA:
                        layer.write(record.offset, record.payload)
                    elif record.kind == KIND_ZERO:
                        layer.write_zeroes(record.offset, record.length)
                    elif vmstate is not None:
                        vmstate.pwrite(record.offset, record.payload)
            if vmstate is not None:
                _finish_vmstate(vmstate, entry.vmstate_size, entry.vmstate_crc, vm_path)
        finally:
            if vmstate is not None:
                vmstate.close()
        if vmstate is not None:
            storage.rename(vm_path + ".creating", vm_path)
        storage.fsync_dir(context.layer_dir)
        snapshot_id = old.next_snapshot_id if old is not None else 1
        new_entry = attrs.evolve(entry, id=snapshot_id)
        with Image.open(layer_path, readonly=True, storage=storage, context=context) as layer:
            new_top = layers._child_root(layer.root, name, snapshots=snapshots + (new_entry,),
                                         next_snapshot_id=next_counter(snapshot_id, f"{target}: next_snapshot_id"))
        write_new_layer(storage, target, new_top)  # the switch
    except BaseException:
        if not storage.exists(target) if old is None else layers._is_top(storage, target, old.image_uuid):
            layers._remove(storage, made)
        raise
    layers.link_twin(storage, target, new_top)  # after the switch, as every new top (F-TREE-003)
    return entry.text_name


# ---------------------------------------------------------------------------- repair from a replica
@attrs.frozen
class DataRepair:
    """One data cluster whose checksum failed: where, and what became of it."""

    file: str
    guest_offset: int
    length: int
    repaired: bool
    reason: str = ""


def repair_data_from(top: str, replica: str, storage: Storage | None = None) -> list[DataRepair]:
    """F-SEND-007: rewrite every data cluster of `top`'s tree that fails its CRC32C from `replica`.

    A cluster of layer (uuid, data generation) is repaired from the replica's
    layer of that identity (which reads the same, by F-SEND-006): its present
    sectors take the bytes the replica's layer reads there, and only if the
    cluster then matches the checksum its own map recorded are they written,
    so a wrong or damaged replica can never make things worse.  Each rewrite
    is followed by an fsync; a crash in between leaves the cluster failing as
    before, and running the repair again finishes it.  The shared store the
    tree references is a layer too (F-SHARE-001): a store cluster is repaired
    from the replica's store of its identity or, failing that (a replica made
    by `send`, which carries shared data in its layers), from the replica's
    layer of any cluster of the tree that references it.
    """
    from lamina.spec.store import store_path, uses_store

    storage = storage or OsStorage()
    sources: dict[tuple[bytes, int], str] = {}
    for path in _with_stores(layer_files(replica, storage)[0], storage):
        root = root_of(storage, path, ImageContext.for_layer(path))
        sources.setdefault((root.image_uuid, root.data_generation), path)
    results: list[DataRepair] = []
    with image_lock(top, True, storage):
        files = layer_files(top, storage)[0]
        referrers: dict[str, dict[int, list[tuple[str, int]]]] = {}  # store -> store cluster -> (layer, guest)
        for path in files:
            context = ImageContext.for_layer(path)
            root = root_of(storage, path, context)
            if uses_store(root):
                _note_references(storage, path, root, referrers.setdefault(store_path(context), {}))
        for path in _with_stores(files, storage):
            context = ImageContext.for_layer(path)
            root = root_of(storage, path, context)
            source = sources.get((root.image_uuid, root.data_generation))
            file = open_tree_file(storage, path, True, context)
            try:
                g = root.geometry
                extents = sorted(file.data_extents())
                for region in set(allocated_regions(extents, g)) - set(root.intents):  # listed regions: not judged (F-CHECK-002)
                    findings: list = []
                    check_region(file, g, root, region, extents, findings)  # no store: shared clusters are the store's
                    bad = [f for f in findings if f.kind == "data-checksum"]
                    if bad:
                        chosen = select_map(read_map_copies(file, g, region), g, region, root.image_uuid)
                        m = RegionMap.from_copy(chosen.value, g, region, chosen.slot)
                        for f in bad:
                            guest = f.guest_range[0]
                            places = [(source, guest)] if source is not None else []
                            places += referrers.get(path, {}).get(guest // g.cluster_size, [])
                            results.append(_repair_cluster(storage, file, path, g, m, f.guest_range, places, sources))
            finally:
                file.close()
    return results


def _with_stores(files: list[str], storage: Storage) -> list[str]:
    """The layer files of a tree and, after them, the shared store of each directory they lie in, once."""
    from lamina.spec.store import store_path

    stores = {store_path(ImageContext.for_layer(path)) for path in files}
    return files + sorted(p for p in stores if storage.exists(p) and p not in files)


def _note_references(storage: Storage, path: str, root: Root, into: dict[int, list[tuple[str, int]]]) -> None:
    """Record, per store cluster, the layer and guest offset of every cluster of `path` that references it."""
    file = open_tree_file(storage, path, False, ImageContext.for_layer(path))
    try:
        for m in current_maps(file, root):
            for c in m.shared_clusters():
                cluster = m.region * CLUSTERS_PER_REGION + c
                into.setdefault(m.shared[c] - 1, []).append((path, cluster * root.geometry.cluster_size))
    finally:
        file.close()


def _repair_cluster(storage: Storage, file: File, path: str, g: Geometry, m: RegionMap, where: tuple[int, int],
                    places: list[tuple[str, int]], sources: dict[tuple[bytes, int], str]) -> DataRepair:
    """Rewrite one failing cluster from the first place that gives bytes matching its recorded checksum.

    `places` are (replica layer, guest offset) pairs, or (a layer of this tree referencing the cluster, its
    guest offset), the latter read from the replica's layer of that layer's identity.
    """
    guest, length = where
    c = guest // g.cluster_size % CLUSTERS_PER_REGION
    mask = m.cluster_mask(c)
    candidate = None
    tried = False
    for place, at in places:
        if place not in sources.values():  # a referencing layer of this tree: its replica of that identity
            root = root_of(storage, place, ImageContext.for_layer(place))
            replica_layer = sources.get((root.image_uuid, root.data_generation))
            if replica_layer is None:
                continue
            place = replica_layer
        tried = True
        with Image.open(place, readonly=True, storage=storage, context=ImageContext.for_layer(place)) as layer:
            bytes_there = zero_absent(layer.read_padded(at, g.cluster_size), mask, g.sectors_per_cluster)
        if cluster_crc(bytes_there, mask) == m.data_crcs[c]:
            candidate = bytes_there
            break
    if not tried:
        return DataRepair(path, guest, length, False, "the replica holds no layer of this identity")
    if candidate is None:
        return DataRepair(path, guest, length, False, "the replica's bytes do not match the recorded CRC32C either")
    offset = g.cluster_file_offset(guest // g.cluster_size)
    for first, count, present in bit_runs(mask, g.sectors_per_cluster):
        if present:
            file.pwrite(offset + first * SECTOR_SIZE, candidate[first * SECTOR_SIZE : (first + count) * SECTOR_SIZE])
    file.fsync()
    return DataRepair(path, guest, length, True)
