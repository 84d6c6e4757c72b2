"""Negative controls: deliberately broken variants of the implementation (checkers with teeth).

Each variant breaks one rule of `spec/protocol.py` (or of the layer
operations) by patching names in `lamina.impl.image` (the implementation's
view of the protocol), `lamina.impl.layers` (prefix `layers:`), `lamina.impl.replicate` (prefix `replicate:`), `lamina.impl.dedup`
(prefix `dedup:`) or, for
recovery, module globals of `lamina.spec.protocol` (prefix `protocol:`) for
the duration of a `variant(...)` block; no file of `spec/` or `impl/` is edited, and the spec's
`check` (which has its own bindings) stays the real one.  The
manifest `CONTROLS` says, per variant, which rule it breaks, the model and
workload that must catch it, and the expected result.  CI asserts each
`expected: fails` variant is caught with a shrunk, replayable trace.
"""
from __future__ import annotations

import contextlib
import os
import struct
from typing import Callable, Iterator

import attrs

import lamina.impl.dedup as dedup_module
import lamina.impl.image as image_module
import lamina.impl.layers as layers_module
import lamina.impl.replicate as replicate_module
from lamina.spec import protocol
from lamina.spec.layout import ROOT_SIZE
from lamina.spec.references import LAYER_NAME
from lamina.spec.replication import Selection, select_map, select_root, slot_1_is_current
from lamina.spec.structures import MAP_CRC_OFFSET, ROOT_CRC_OFFSET, structure_crc

from .errors import UnknownControl


@attrs.frozen
class Control:
    name: str
    breaks: str  # the rule of spec/protocol.py it breaks
    model: str  # the persistence model that must catch it
    workload: str
    expected: str  # "fails": the simulator must report a failing state
    patches: Callable[[], dict[str, object]] = attrs.field(repr=False)


# ------------------------------------------------------------------ broken commits
# Built around the real protocol functions, so they follow the spec as it evolves
# and differ from it only in the one step they break.
class _SkipFsync:
    """A File that forwards everything except the fsync calls `skip(n)` selects (n counts from 0)."""

    def __init__(self, file, skip: Callable[[int], bool]) -> None:
        self._file = file
        self._skip = skip
        self._count = 0

    def fsync(self) -> None:
        n = self._count
        self._count += 1
        if not self._skip(n):
            self._file.fsync()

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def _commit_maps_skip_data_fsync(file, geometry, maps, image_uuid) -> None:
    """commit_maps without its first fsync (data and earlier second copies before first copies)."""
    protocol.commit_maps(_SkipFsync(file, lambda n: n == 0 and bool(maps)), geometry, maps, image_uuid)


def _commit_maps_skip_copy_fsync(file, geometry, maps, image_uuid) -> None:
    """commit_maps with no fsync between the first and the second copies (breaks rule 2)."""
    protocol.commit_maps(_SkipFsync(file, lambda n: n == 1), geometry, maps, image_uuid)


def _commit_maps_current_slot_first(file, geometry, maps, image_uuid) -> None:
    """commit_maps that writes the slot holding the durable current copy first, with no fsync before it."""
    for m in maps:
        m.best_slot = 1 - m.best_slot
    protocol.commit_maps(_SkipFsync(file, lambda n: n == 0 and bool(maps)), geometry, maps, image_uuid)


def _commit_maps_first_map_only(file, geometry, maps, image_uuid) -> None:
    """commit_maps that makes only the first region's map durable; the other maps' copies follow with no fsync at all."""
    protocol.commit_maps(file, geometry, maps[:1], image_uuid)
    if len(maps) > 1:
        protocol.commit_maps(_SkipFsync(file, lambda n: True), geometry, maps[1:], image_uuid)


_WRITE_ROOT = protocol.write_root  # the real one, also while a variant replaces recovery's binding of it


def _write_root_skip_copy_fsync(file, root, best_slot, unsynced) -> int:
    """write_root with no fsync between the two root copies (breaks rule 2 for the root)."""
    if unsynced:
        file.fsync()
    return _WRITE_ROOT(_SkipFsync(file, lambda n: True), root, best_slot, False)


def _write_root_no_barrier(file, root, best_slot, unsynced) -> int:
    """write_root without the fsync before it (breaks rule 3: the root may overtake data and maps)."""
    return protocol.write_root(file, root, best_slot, False)


# ------------------------------------------------------------------ broken recovery
def _with_fixed_crc(raw: bytes, crc_offset: int, used: int) -> bytes:
    """The copy as if its CRC matched: what a reader that never verifies checksums sees."""
    buf = bytearray(raw)
    struct.pack_into("<I", buf, crc_offset, structure_crc(buf[:used], crc_offset))
    return bytes(buf)


def _trusting_select_root(copies: list[bytes], table: bool = True) -> Selection:
    return select_root([_with_fixed_crc(c, ROOT_CRC_OFFSET, ROOT_SIZE) if c[:8] == b"\x8aLAMINA\n" else c for c in copies],
                       table=table)


def _trusting_select_map(copies, geometry, region, image_uuid) -> Selection:
    fixed = [_with_fixed_crc(c, MAP_CRC_OFFSET, geometry.map_used_length) if c[:8] == b"\x8aLAMMAP\n" else c for c in copies]
    return select_map(fixed, geometry, region, image_uuid)


def _older_copy_preferred(copy_0: tuple, copy_1: tuple) -> bool:
    """The selection rule with generations negated: of two valid copies, the lower generation wins."""
    return slot_1_is_current((copy_0[0], -copy_0[1]), (copy_1[0], -copy_1[1]))


def _older_select_root(copies: list[bytes], table: bool = True) -> Selection:
    return select_root(copies, _older_copy_preferred, table)


def _older_select_map(copies, geometry, region, image_uuid) -> Selection:
    return select_map(copies, geometry, region, image_uuid, _older_copy_preferred)


def _no_reconcile(*args, **kwargs) -> None:
    """reconcile_region that leaves a region's map as it was (recovery trusts stale checksums and presence)."""


# ------------------------------------------------------------------ broken layer operations
_COPY_ABSENT = layers_module._copy_absent


def _copy_absent_whole_clusters(child, source, start: int, end: int) -> None:
    """A merge's copy that skips partial clusters: sectors of a cluster it does not fill are dropped."""
    size = child.cluster_size
    for lo, hi in child.absent_ranges(start, end):
        first, last = -(-lo // size) * size, hi // size * size
        if last > first:
            _COPY_ABSENT(child, source, first, last)


_DURABLE_FILE = layers_module._durable_file
_UNREFERENCED_FILES = layers_module.unreferenced_files


class _NoFsyncStorage:
    """A Storage whose new files forward everything except fsync."""

    def __init__(self, storage) -> None:
        self._storage = storage

    def create(self, path: str):
        return _SkipFsync(self._storage.create(path), lambda n: True)

    def __getattr__(self, name: str):
        return getattr(self._storage, name)


def _durable_file_without_fsync(storage, path: str, write: Callable) -> None:
    """_durable_file that renames the VM state into place without fsyncing its bytes first."""
    _DURABLE_FILE(_NoFsyncStorage(storage), path, write)


def _unreferenced_layers_only(path: str, storage=None) -> list[str]:
    """unreferenced_files that lists only layer files: a VM state nothing references any more stays behind."""
    return [p for p in _UNREFERENCED_FILES(path, storage) if LAYER_NAME.match(os.path.basename(p))]


def _skip_intents(self, regions) -> None:
    """Image._ensure_intents that never lists a region (breaks rule 1: intent before data)."""


def _drop_intents_uncommitted(self, regions, add=frozenset(), **changes) -> None:
    """Image._drop_intents that drops regions without committing their deferred maps (breaks rule 1's drop)."""
    self._deferred -= regions
    self._fresh -= regions
    self._write_root(intents=tuple(sorted((self._intents - regions) | add)), **changes)


def _flush_deferring_fresh(real: Callable) -> Callable:
    """Image.flush that defers the maps of regions whose presence changed too (breaks F-PROTO-005)."""
    def flush(self) -> None:
        fresh, self._fresh = self._fresh, set()
        try:
            real(self)
        finally:
            self._fresh |= fresh  # committed later, by an eviction or the close
    return flush


def _resize_cut_first(real: Callable) -> Callable:
    """Image.resize whose shrink cuts the file (durably) before the root write records the new size."""
    def resize(self, virtual_size: int) -> None:
        if virtual_size < self.virtual_size:
            self.flush()
            self.file.truncate(self.geometry.with_virtual_size(virtual_size).file_length)
            self.file.fsync()
        real(self, virtual_size)
    return resize


def _finish_vmstate_without_fsync(file, size: int, crc: int, where: str) -> None:
    file.truncate(size)


def _punch_before_commit(real: Callable) -> Callable:
    """dedup's step 3 with the local clusters punched before the maps referencing the store are committed."""
    def reference_clusters(layer, store_uuid, clusters, store) -> None:
        g = layer.geometry
        for cluster in clusters:
            region, c = divmod(cluster, 128)
            layer.file.punch_hole(g.region_data_offset(region) + c * g.cluster_size, g.cluster_size)
        layer.file.fsync()
        real(layer, store_uuid, clusters, store)
    return reference_clusters


def _store_without_fsync(real: Callable) -> Callable:
    """dedup's step 2 with no fsync of the store: references may reach the disk before the store's clusters."""
    def apply(opened, store, index, duplicates, report, progress) -> None:
        if store is not None:
            store._file = _SkipFsync(store._file, lambda n: True)
        real(opened, store, index, duplicates, report, progress)
    return apply


CONTROLS: dict[str, Control] = {c.name: c for c in [
    Control("skip-intent", "rule 1: a region is in the durable intent list before its first write",
            "strict", "allocate", "fails", lambda: {"Image._ensure_intents": _skip_intents}),
    Control("drop-uncommitted-map", "rule 1: a region leaves the intent list only once its deferred map is committed",
            "strict", "overwrite", "fails", lambda: {"Image._drop_intents": _drop_intents_uncommitted}),
    Control("defer-fresh-map", "F-PROTO-005: a flush commits the map of every region whose presence changed",
            "strict", "allocate", "fails", lambda: {"Image.flush": _flush_deferring_fresh(image_module.Image.flush)}),
    Control("skip-map-copy-fsync", "rule 2: fsync between the first and the second map copy",
            "torn", "overwrite", "fails", lambda: {"commit_maps": _commit_maps_skip_copy_fsync}),
    Control("map-current-slot-first", "rule 2: never write the slot holding the durable current copy first",
            "torn", "allocate", "fails", lambda: {"commit_maps": _commit_maps_current_slot_first}),
    Control("skip-root-copy-fsync", "rule 2 for the root: fsync between the two root copies",
            "torn", "allocate", "fails", lambda: {"write_root": _write_root_skip_copy_fsync}),
    # Only a tear catches it (both copies torn at once); its failures are crashes of recovery, whose plans
    # the shrinker must rebuild when it drops steps or outcomes of the crash they follow.
    Control("recovery-root-copy-fsync", "rule 2 inside recovery: the root that empties the intent list, one copy at a time",
            "torn", "resize", "fails", lambda: {"protocol:write_root": _write_root_skip_copy_fsync}),
    # Needs a flush of fresh sectors in a region other than the first dirty one, and a crash after it returns.
    Control("first-map-only-durable", "a flush returns only once the first copy of every dirty region's map is durable",
            "reorder", "dirty-regions", "fails", lambda: {"commit_maps": _commit_maps_first_map_only}),
    Control("root-without-barrier", "rule 3: every root write is preceded by an fsync of all earlier writes",
            "reorder", "multi-region", "fails", lambda: {"write_root": _write_root_no_barrier}),
    Control("trust-unverified-copy", "R7: recovery takes only a copy whose CRC32C verifies",
            "torn", "allocate", "fails", lambda: {"protocol:select_root": _trusting_select_root, "protocol:select_map": _trusting_select_map}),
    Control("prefer-older-copy", "selection rule: of two valid copies the one with the higher generation is current",
            "reorder", "allocate", "fails",
            lambda: {"protocol:select_root": _older_select_root, "protocol:select_map": _older_select_map,
                     "select_root": _older_select_root, "select_map": _older_select_map}),
    Control("merge-drops-partial-clusters", "a delete's merge copies every sector of the deleted layer the child lacks",
            "strict", "layer-delete-merge", "fails", lambda: {"layers:_copy_absent": _copy_absent_whole_clusters}),
    Control("vmstate-without-fsync", "T3: a snapshot's VM state is durable, with its size and CRC32C, before the snapshot is",
            "reorder", "layer-snapshot", "fails", lambda: {"layers:_durable_file": _durable_file_without_fsync}),
    Control("received-vmstate-without-fsync", "F-SEND-006: a received snapshot's VM state is durable before the switch",
            "reorder", "layer-receive-full", "fails", lambda: {"replicate:_finish_vmstate": _finish_vmstate_without_fsync}),
    Control("orphan-vmstate-kept", "T4: every file of the layer directory nothing references is removed (VM states too)",
            "strict", "layer-delete-merge", "fails", lambda: {"layers:unreferenced_files": _unreferenced_layers_only}),
    Control("no-reconcile", "recovery reconciles every region in the intent list",
            "reorder", "overwrite", "fails", lambda: {"protocol:reconcile_region": _no_reconcile}),
    # Redundant for a single image (an absent sector whose data is lost reads zero, its old value), but not
    # over a base: a map marking a sector present may reach the disk before its data, and the sector then
    # reads zero instead of the base's bytes (old) or the new bytes.
    # The old oracle judged the size and each sector apart, so "old size, flushed sectors zero" passed.
    Control("shrink-cut-before-root", "a shrink writes the root with the new size before it cuts the file (FORMAT §6)",
            "strict", "resize", "fails", lambda: {"Image.resize": _resize_cut_first(image_module.Image.resize)}),
    Control("dedup-punch-before-commit", "F-SHARE-005: a frozen layer's local clusters are punched only after the maps "
            "referencing the store are committed", "strict", "layer-dedup", "fails",
            lambda: {"dedup:reference_clusters": _punch_before_commit(dedup_module.reference_clusters)}),
    Control("dedup-store-not-durable", "F-SHARE-005: the store's clusters are durable before any layer references them",
            "reorder", "layer-dedup", "fails", lambda: {"dedup:_apply": _store_without_fsync(dedup_module._apply)}),
    Control("skip-data-fsync", "commit_maps' first fsync (data and earlier second copies before first copies)",
            "reorder", "layer-base-first-write", "fails", lambda: {"commit_maps": _commit_maps_skip_data_fsync}),
]}


def get_control(name: str) -> Control:
    if name not in CONTROLS:
        raise UnknownControl(f"no negative control named {name!r}; known: {', '.join(CONTROLS)}")
    return CONTROLS[name]


@contextlib.contextmanager
def variant(name: str | None) -> Iterator[None]:
    """Patch `lamina.impl.image` with a broken variant for the duration of the block (None: no change)."""
    if name is None:
        yield
        return
    patches = get_control(name).patches()
    saved: list[tuple[object, str, object]] = []
    try:
        for target, value in patches.items():
            module, _, dotted = target.rpartition(":")
            owner: object = {"protocol": protocol, "layers": layers_module, "replicate": replicate_module,
                             "dedup": dedup_module}.get(
                module, image_module)
            *path, attr = dotted.split(".")
            for part in path:
                owner = getattr(owner, part)
            saved.append((owner, attr, getattr(owner, attr)))
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
