"""Workloads, recording and oracle for trees of layers (bases, snapshots, clones, commit, rebase).

A tree workload works on several files of one simulated directory (a raw or
Lamina base, the image, a clone) and mixes guest I/O sessions with the
management operations of `impl/layers.py`.  Its model is a `Tree`: per image
(and per raw file) the guest contents, the sectors its top layer holds
itself, the external base at the bottom of its chain, and its snapshots
(name, contents, VM state, base).  The model is computed here from the
operations' definitions, independently of `impl/`; recording also checks that
the uncrashed run reads exactly the model.

What the oracle accepts after a crash (R5 for trees):

- first, before anything recovers the crashed state, the spec's `check_tree`
  of every top, on storage seen read-only, reports no corruption (R12: a
  crash leaves degraded copies, leaks and pending work, nothing worse);
- every top image is opened writable, in the workload's order (recovery,
  finishing an interrupted commit, removing orphans of the layer directory),
  then the spec's `check_tree` of every top must be clean (exit 0, no finding);
- the whole tree (every branch, every snapshot with its VM state, every raw
  file, which images exist, which external base each chain ends at) must equal
  one *candidate*: the tree after the last durable event with the R5 rules for
  un-flushed guest writes of an open session (each sector old or new, sizes of
  resizes issued after it), or, during a management operation, the tree before
  it or the tree after it, as a whole.

Paths live under `SIM_ROOT`, an absolute directory that exists only in the
simulated storage; every question about a name (does it exist, is it a
regular file, how many links it has) goes through the storage interface.
"""
from __future__ import annotations

import io
import os
from types import MappingProxyType
from typing import Mapping

import attrs

from lamina.impl import dedup as dedup_module, layers, replicate
from lamina.impl.image import Image
from lamina.spec import model
from lamina.spec.abstraction import abstract_layer
from lamina.spec.errors import LaminaError
from lamina.spec.layout import SECTOR_SIZE, ZERO_SECTOR
from lamina.spec.model import Disk
from lamina.spec.references import LAYER_NAME, ImageContext, layer_dir_of, layer_file_name, vmstate_file_name
from lamina.spec.store import STORE_NAME
from lamina.spec.structures import BASE_NONE
from lamina.spec.tree import check_tree, root_of

from .controls import variant
from .memstore import DiskState, MemStorage, Op, ReadOnlyStorage, Trace
from .oracle import Outcome, outcomes_mismatch, outcomes_of, read_only_verdict
from .workloads import CLUSTER, K, pattern_bytes

# An absolute directory that exists only in the simulated storage (never on the machine):
# absolute, so that the spec's realpath/abspath of every name is the name itself.
SIM_ROOT = "/crashsim-simulated/vm"
TREE_SIZE = 64 * K  # one region with 4 KiB clusters: cheap states


def sim_path(name: str) -> str:
    return os.path.join(SIM_ROOT, name)


# ---------------------------------------------------------------------------- the model
@attrs.frozen
class Snap:
    name: str
    disk: Disk
    vmstate: bytes
    base: str | None


@attrs.frozen
class Branch:
    """One file of the tree as the model sees it; `own` is None once it is unknown (after a merge)."""

    disk: Disk
    own: frozenset[int] | None = frozenset()
    base: str | None = None
    snapshots: tuple[Snap, ...] = ()
    raw: bool = False


Tree = Mapping[str, Branch]


def _set(tree: Tree, name: str, branch: Branch | None) -> Tree:
    out = dict(tree)
    if branch is None:
        out.pop(name, None)
    else:
        out[name] = branch
    return MappingProxyType(out)


def _sectors(offset: int, length: int) -> range:
    return range(offset // SECTOR_SIZE, (offset + length - 1) // SECTOR_SIZE + 1)


def _overlay_disk(base: Disk, size: int, visible: int) -> Disk:
    limit = min(visible, base.virtual_size) // SECTOR_SIZE
    return Disk(size, MappingProxyType({s: d for s, d in base.sectors.items() if s < limit}))


# ---------------------------------------------------------------------------- workloads
@attrs.frozen
class TreeWorkload:
    """Steps name the file they act on first; `tops` are the images recovery opens, in that order.

    Steps: ("raw", name, size, ((offset, length, pattern), ...)), ("create", name, size, base, format),
    ("write", name, offset, length, pattern), ("zero", name, offset, length), ("flush", name),
    ("resize", name, size), ("close", name), ("snapshot", name, snap, vmstate_bytes),
    ("revert", name, snap), ("delete", name, snap), ("clone", name, snap, new),
    ("commit", name), ("rebase", name, new_base, format, unsafe), ("receive", name, source, snap, since, force):
    send `source@snap` (in full, or since snapshot `since`) and receive the stream into `name`;
    ("dedup", name, (other, ...)): share the equal frozen clusters of `name` and the others through the
    directory's store (no guest contents change); ("gc", name): collect the store of `name`'s directory;
    ("remove", name): delete the image, as `rm` would: its top, then every file of its layer directory.
    """

    name: str
    doc: str
    tops: tuple[str, ...]
    steps: tuple[tuple, ...]
    setup: tuple[tuple, ...] = ()
    cluster_size: int = CLUSTER
    create_in_trace: bool = False

    def without_steps(self, dropped: frozenset[int]) -> "TreeWorkload":
        if not dropped:
            return self
        return attrs.evolve(self, steps=tuple(s for i, s in enumerate(self.steps) if i not in dropped))


S = TREE_SIZE
_RAW_BASE = ("raw", "base.raw", S, ((0, S, 11),))
_LAM_BASE = (("create", "base.lam", S, None, None), ("write", "base.lam", 0, S, 12), ("close", "base.lam"))
_OVER_RAW = ("create", "disk.lam", S, "base.raw", "raw")
_OVER_LAM = ("create", "disk.lam", S, "base.lam", "lamina")
_SNAPS = (("write", "disk.lam", 0, 8 * K, 21), ("close", "disk.lam"), ("snapshot", "disk.lam", "s1", 0),
          ("write", "disk.lam", 4 * K, 8 * K, 22), ("close", "disk.lam"), ("snapshot", "disk.lam", "s2", 0),
          ("write", "disk.lam", 10 * K, 4 * K, 23), ("close", "disk.lam"))

# Two clones of one snapshot that write the same 8 KiB (two 4 KiB clusters) and a sector of their own, then snapshot.
_TWO_CLONES = (("create", "disk.lam", S, None, None), ("write", "disk.lam", 0, 4 * K, 21), ("close", "disk.lam"),
               ("snapshot", "disk.lam", "s0", 0), ("clone", "disk.lam", "s0", "a.lam"), ("clone", "disk.lam", "s0", "b.lam"),
               ("write", "a.lam", 8 * K, 8 * K, 41), ("write", "a.lam", 20 * K, 512, 42), ("close", "a.lam"),
               ("snapshot", "a.lam", "s1", 0),
               ("write", "b.lam", 8 * K, 8 * K, 41), ("write", "b.lam", 24 * K, 512, 43), ("close", "b.lam"),
               ("snapshot", "b.lam", "s1", 0))

_TREE_LIBRARY = [
    TreeWorkload("layer-write-raw", "guest writes over a raw base: absent sectors, partial sectors, zeroes, flush",
                 ("disk.lam",),
                 (("write", "disk.lam", 0, 4 * K, 1), ("flush", "disk.lam"), ("write", "disk.lam", 6 * K, 3 * K, 2),
                  ("write", "disk.lam", 9 * K + 100, 300, 3), ("zero", "disk.lam", 12 * K, 2 * K)),
                 setup=(_RAW_BASE, _OVER_RAW)),
    TreeWorkload("layer-write-lamina", "guest writes over a Lamina base (two images in the directory), overwrite after flush",
                 ("disk.lam", "base.lam"),
                 (("write", "disk.lam", 4 * K, 8 * K, 1), ("flush", "disk.lam"), ("write", "disk.lam", 8 * K, 8 * K, 2),
                  ("write", "disk.lam", 30 * K + 200, 1000, 3)),
                 setup=(*_LAM_BASE, _OVER_LAM)),
    TreeWorkload("layer-base-first-write", "first writes into absent sectors over a non-zero base, then flush (data before map)",
                 ("disk.lam",),
                 (("write", "disk.lam", 0, 8 * K, 1), ("flush", "disk.lam")),
                 setup=(_RAW_BASE, _OVER_RAW)),
    TreeWorkload("layer-snapshot", "snapshot create with VM state over a Lamina base, then writes over the snapshot",
                 ("disk.lam", "base.lam"),
                 (("snapshot", "disk.lam", "s1", 3000), ("write", "disk.lam", 2 * K, 4 * K, 5), ("flush", "disk.lam")),
                 setup=(*_LAM_BASE, _OVER_LAM, ("write", "disk.lam", 0, 8 * K, 4), ("close", "disk.lam"))),
    TreeWorkload("layer-revert", "revert to an older snapshot (contents and size change as a whole)",
                 ("disk.lam", "base.lam"),
                 (("revert", "disk.lam", "s1"),),
                 setup=(*_LAM_BASE, _OVER_LAM, *_SNAPS)),
    TreeWorkload("layer-delete-merge", "delete a middle snapshot with children: its sectors merge into the layer above, "
                 "whole clusters, partial clusters and a sector of a cluster the child holds part of, beside sectors "
                 "the child overwrote (which stay the child's); the deleted snapshot's VM state goes with it",
                 ("disk.lam", "base.lam"),
                 (("delete", "disk.lam", "s1"),),
                 setup=(*_LAM_BASE, _OVER_LAM, ("write", "disk.lam", 0, 8 * K, 21), ("write", "disk.lam", 16 * K + 512, 1 * K, 24),
                        ("write", "disk.lam", 24 * K + 1536, 512, 25), ("close", "disk.lam"), ("snapshot", "disk.lam", "s1", 1000),
                        ("write", "disk.lam", 4 * K, 8 * K, 22), ("write", "disk.lam", 24 * K, 1 * K, 26), ("close", "disk.lam"),
                        ("snapshot", "disk.lam", "s2", 0), ("write", "disk.lam", 10 * K, 4 * K, 23), ("close", "disk.lam"))),
    TreeWorkload("layer-clone", "clone from a snapshot into a new image of the same directory",
                 ("disk.lam", "clone.lam", "base.lam"),
                 (("clone", "disk.lam", "s1", "clone.lam"),),
                 setup=(*_LAM_BASE, _OVER_LAM, *_SNAPS)),
    TreeWorkload("layer-commit-lamina", "commit the top into its Lamina base (committing flag, finished by the next open)",
                 ("disk.lam", "base.lam"),
                 (("commit", "disk.lam"),),
                 setup=(*_LAM_BASE, _OVER_LAM, ("write", "disk.lam", 2 * K, 8 * K, 6), ("write", "disk.lam", 40 * K, 512, 7),
                        ("close", "disk.lam"))),
    TreeWorkload("layer-commit-raw", "commit the top into its raw base",
                 ("disk.lam",),
                 (("commit", "disk.lam"),),
                 setup=(_RAW_BASE, _OVER_RAW, ("write", "disk.lam", 2 * K, 8 * K, 6), ("close", "disk.lam"))),
    TreeWorkload("layer-rebase-safe", "safe rebase onto another Lamina base: differing sectors copied up, then the switch",
                 ("disk.lam", "base.lam", "base2.lam"),
                 (("rebase", "disk.lam", "base2.lam", "lamina", False),),
                 setup=(*_LAM_BASE, ("create", "base2.lam", S, None, None), ("write", "base2.lam", 8 * K, 8 * K, 13),
                        ("close", "base2.lam"), _OVER_LAM, ("write", "disk.lam", 0, 4 * K, 6), ("close", "disk.lam"))),
    TreeWorkload("layer-rebase-unsafe", "unsafe rebase onto another Lamina base: only the reference switches",
                 ("disk.lam", "base.lam", "base2.lam"),
                 (("rebase", "disk.lam", "base2.lam", "lamina", True),),
                 setup=(*_LAM_BASE, ("create", "base2.lam", S, None, None), ("write", "base2.lam", 8 * K, 8 * K, 13),
                        ("close", "base2.lam"), _OVER_LAM, ("write", "disk.lam", 0, 4 * K, 6), ("close", "disk.lam"))),
    TreeWorkload("layer-receive-full", "receive a full stream of a snapshot with VM state as a new image: it "
                 "exists whole, with its snapshot, or not at all",
                 ("disk.lam", "base.lam", "replica.lam"),
                 (("receive", "replica.lam", "disk.lam", "s1", None, False),),
                 setup=(*_LAM_BASE, _OVER_LAM, ("write", "disk.lam", 0, 8 * K, 21), ("close", "disk.lam"),
                        ("snapshot", "disk.lam", "s1", 2000))),
    TreeWorkload("layer-receive-incremental", "receive what changed between two snapshots onto a replica holding the "
                 "first: the old snapshot set or the new one",
                 ("disk.lam", "base.lam", "replica.lam"),
                 (("receive", "replica.lam", "disk.lam", "s2", "s1", False),),
                 setup=(*_LAM_BASE, _OVER_LAM, *_SNAPS, ("receive", "replica.lam", "disk.lam", "s1", None, False))),
    TreeWorkload("layer-dedup", "dedup over two clones' snapshots that wrote the same data: the store is written and "
                 "made durable, then each frozen layer's maps reference it and its local clusters are punched",
                 ("disk.lam", "a.lam", "b.lam"),
                 (("dedup", "a.lam", ("b.lam",)),),
                 setup=_TWO_CLONES),
    TreeWorkload("layer-delete-shared", "delete a snapshot below a deduplicated one: the merge writes into a shared "
                 "cluster of the frozen layer above, which first takes its bytes home from the store",
                 ("disk.lam", "other.lam"),
                 (("delete", "disk.lam", "s1"),),
                 setup=(("create", "disk.lam", S, None, None), ("write", "disk.lam", 0, 8 * K, 21), ("close", "disk.lam"),
                        ("snapshot", "disk.lam", "s1", 0), ("write", "disk.lam", 0, 2 * K, 31), ("close", "disk.lam"),
                        ("snapshot", "disk.lam", "s2", 0), ("create", "other.lam", S, None, None),
                        ("write", "other.lam", 0, 2 * K, 31), ("close", "other.lam"), ("snapshot", "other.lam", "s1", 0),
                        ("dedup", "disk.lam", ("other.lam",)))),
    TreeWorkload("layer-gc", "collect the store after the snapshots that shared its clusters were deleted (their "
                 "bytes merged into the tops): every store cluster is unreferenced and discarded",
                 ("disk.lam", "a.lam", "b.lam"),
                 (("gc", "a.lam"),),
                 setup=(*_TWO_CLONES, ("dedup", "a.lam", ("b.lam",)), ("delete", "a.lam", "s1"), ("delete", "b.lam", "s1"))),
    TreeWorkload("layer-remove-shared", "delete the image whose snapshot is the last to reference the store's "
                 "clusters (the other one deleted its snapshot, merging the bytes into its top), then collect",
                 ("disk.lam", "a.lam", "b.lam"),
                 (("remove", "b.lam"), ("gc", "a.lam")),
                 setup=(*_TWO_CLONES, ("dedup", "a.lam", ("b.lam",)), ("delete", "a.lam", "s1"))),
    TreeWorkload("layer-resize", "shrink then grow over a base: the base must not show through again",
                 ("disk.lam",),
                 (("write", "disk.lam", 0, 4 * K, 1), ("flush", "disk.lam"), ("resize", "disk.lam", 32 * K),
                  ("resize", "disk.lam", S), ("write", "disk.lam", 40 * K, 2 * K, 2), ("flush", "disk.lam")),
                 setup=(_RAW_BASE, _OVER_RAW)),
]
TREE_LIBRARY: dict[str, TreeWorkload] = {w.name: w for w in _TREE_LIBRARY}


# ---------------------------------------------------------------------------- recording
@attrs.frozen
class TreeEvent:
    kind: str
    start: int
    end: int
    tree: Tree  # the model after the event
    durable: bool
    management: bool = False
    changes: tuple[tuple[str, int, bytes], ...] = ()  # (image, sector, new value) of guest writes and resizes
    size: tuple[str, int] | None = None  # (image, new size) of a resize
    step: tuple = ()


@attrs.frozen(eq=False)
class TreeRecording:
    workload: TreeWorkload
    variant: str | None
    base: DiskState
    base_disk: Tree
    ops: tuple[Op, ...]
    events: tuple[TreeEvent, ...]
    raw_inodes: frozenset[int] = frozenset()


class _Runner:
    """Applies steps to the implementation (on one storage) and to the model, side by side."""

    def __init__(self, storage: MemStorage, trace: Trace | None) -> None:
        self.storage = storage
        self.trace = trace
        self.tree: Tree = MappingProxyType({})
        self.sessions: dict[str, Image] = {}
        self.events: list[TreeEvent] = []

    def _mark(self) -> int:
        return len(self.trace) if self.trace is not None else 0

    def _event(self, kind: str, start: int, durable: bool, **extra) -> None:
        self.events.append(TreeEvent(kind, start, self._mark(), self.tree, durable, **extra))

    def session(self, name: str) -> Image:
        image = self.sessions.get(name)
        if image is None:
            start = self._mark()
            image = self.sessions[name] = Image.open(sim_path(name), storage=self.storage)
            self._event("open", start, True)
        return image

    def close(self, name: str) -> None:
        image = self.sessions.pop(name, None)
        if image is not None:
            start = self._mark()
            image.close()
            self._event("close", start, True)

    def close_all(self) -> None:
        for name in list(self.sessions):
            self.close(name)

    def step(self, step: tuple) -> None:
        kind, name = step[0], step[1]
        tree = self.tree
        if kind in ("write", "zero", "flush", "resize"):
            image = self.session(name)
            start = self._mark()
            branch = tree[name]
            disk = branch.disk
            changes: tuple = ()
            size = None
            if kind == "write":
                _, _, offset, length, pat = step
                data = pattern_bytes(pat, offset, length)
                image.write(offset, data)
                disk = model.write(disk, offset, data)
                touched = _sectors(offset, length)
            elif kind == "zero":
                _, _, offset, length = step
                image.write_zeroes(offset, length)
                disk = model.write_zeroes(disk, offset, length)
                touched = _sectors(offset, length)
            elif kind == "flush":
                image.flush()
                self._event("flush", start, True, step=step)
                return
            else:
                new_size = step[2]
                image.resize(new_size)
                dropped = range(new_size // SECTOR_SIZE, disk.virtual_size // SECTOR_SIZE)
                disk = model.resize(disk, new_size)
                changes = tuple((name, s, ZERO_SECTOR) for s in dropped)
                size = (name, new_size)
                own = branch.own
                if own is not None:
                    own = frozenset(s for s in own if s < new_size // SECTOR_SIZE)
                self.tree = _set(tree, name, attrs.evolve(branch, disk=disk, own=own))
                self._event("resize", start, False, changes=changes, size=size, step=step)
                return
            own = branch.own
            if own is not None and (kind == "write" or branch.base is not None):
                own = own | frozenset(touched)  # zeroes over a base stay present (as holes)
            elif own is not None:
                own = own - frozenset(touched)
            changes = tuple((name, s, disk.sectors.get(s, ZERO_SECTOR)) for s in touched)
            self.tree = _set(tree, name, attrs.evolve(branch, disk=disk, own=own))
            self._event(kind, start, False, changes=changes, step=step)
            return
        if kind == "close":
            self.close(name)
            return
        self.close_all()  # management operations work on closed images
        start = self._mark()
        storage = self.storage
        path = sim_path(name)
        if kind == "raw":
            _, _, size, writes = step
            file = storage.create(path)
            disk = model.empty_disk(size)
            file.truncate(size)
            for offset, length, pat in writes:
                data = pattern_bytes(pat, offset, length)
                file.pwrite(offset, data)
                disk = model.write(disk, offset, data)
            file.fsync()
            file.close()
            storage.fsync_dir(SIM_ROOT)
            self.tree = _set(tree, name, Branch(disk, raw=True))
        elif kind == "create":
            _, _, size, base, fmt = step
            Image.create(path, size, CLUSTER, storage=storage, base=sim_path(base) if base else None,
                         base_format=fmt).close()
            disk = model.empty_disk(size) if base is None else _overlay_disk(tree[base].disk, size, size)
            self.tree = _set(tree, name, Branch(disk, base=base))
        elif kind == "snapshot":
            _, _, snap, vm_len = step
            vmstate = pattern_bytes(99, 0, vm_len) if vm_len else b""
            layers.create_snapshot(path, snap, vmstate or None, storage=storage)
            b = tree[name]
            self.tree = _set(tree, name, attrs.evolve(b, own=frozenset(),
                                                     snapshots=b.snapshots + (Snap(snap, b.disk, vmstate, b.base),)))
        elif kind == "revert":
            layers.revert_snapshot(path, step[2], storage=storage)
            b = tree[name]
            s = next(x for x in b.snapshots if x.name == step[2])
            self.tree = _set(tree, name, attrs.evolve(b, disk=s.disk, own=frozenset(), base=s.base))
        elif kind == "delete":
            layers.delete_snapshot(path, step[2], storage=storage)
            b = tree[name]
            self.tree = _set(tree, name, attrs.evolve(b, own=None, snapshots=tuple(x for x in b.snapshots if x.name != step[2])))
        elif kind == "clone":
            _, _, snap, new = step
            layers.clone(path, snap, sim_path(new), storage=storage)
            s = next(x for x in tree[name].snapshots if x.name == snap)
            self.tree = _set(tree, new, Branch(s.disk, base=s.base))
        elif kind == "commit":
            layers.commit(path, storage=storage)
            b = tree[name]
            assert b.own is not None and b.base is not None
            target = tree[b.base]
            limit = min(b.disk.virtual_size, target.disk.virtual_size) // SECTOR_SIZE
            merged = dict(target.disk.sectors)
            for s in b.own:
                if s < limit:
                    value = b.disk.sectors.get(s, ZERO_SECTOR)
                    if any(value):
                        merged[s] = value
                    else:
                        merged.pop(s, None)
            tree = _set(tree, b.base, attrs.evolve(target, disk=Disk(target.disk.virtual_size, MappingProxyType(merged))))
            self.tree = _set(tree, name, attrs.evolve(b, own=frozenset(s for s in b.own if s >= limit)))
        elif kind == "rebase":
            _, _, new_base, fmt, unsafe = step
            layers.rebase(path, sim_path(new_base) if new_base else None, fmt, unsafe=unsafe, storage=storage)
            b = tree[name]
            size = b.disk.virtual_size
            below = _overlay_disk(tree[new_base].disk, size, size) if new_base else model.empty_disk(size)
            if unsafe:
                assert b.own is not None
                sectors = {s: d for s, d in below.sectors.items() if s not in b.own}
                sectors.update({s: d for s, d in b.disk.sectors.items() if s in b.own})
                self.tree = _set(tree, name, attrs.evolve(b, disk=Disk(size, MappingProxyType(sectors)), base=new_base))
            else:
                differ = {s for s in set(below.sectors) | set(b.disk.sectors)
                          if below.sectors.get(s) != b.disk.sectors.get(s)}
                own = None if b.own is None else b.own | differ
                self.tree = _set(tree, name, attrs.evolve(b, own=own, base=new_base))
        elif kind == "receive":
            _, _, source, snap, since, force = step
            stream = io.BytesIO()
            replicate.send(f"{sim_path(source)}@{snap}", stream, since, storage=storage)  # reads only
            replicate.receive(path, io.BytesIO(stream.getvalue()), force, storage=storage)
            s = next(x for x in tree[source].snapshots if x.name == snap)
            held = tree[name].snapshots if name in tree else ()
            self.tree = _set(tree, name, Branch(s.disk, base=None, snapshots=held + (Snap(snap, s.disk, s.vmstate, None),)))
        elif kind == "dedup":
            dedup_module.dedup([path], [sim_path(other) for other in step[2]], storage=storage)  # contents unchanged
        elif kind == "gc":
            dedup_module.gc(path, storage=storage)
        elif kind == "remove":
            storage.unlink(path)
            storage.fsync_dir(SIM_ROOT)
            directory = layer_dir_of(path)
            for entry in sorted(storage.listdir(directory)):
                storage.unlink(os.path.join(directory, entry))
            storage.fsync_dir(directory)
            self.tree = _set(tree, name, None)
        else:
            raise ValueError(f"unknown tree step {step!r}")
        if kind not in ("raw", "create") or self.trace is not None:
            self._event(kind, start, True, management=True, step=step)


def record_tree_workload(workload: TreeWorkload, variant_name: str | None = None) -> TreeRecording:
    """Run a tree workload (under a broken variant when named); record every storage op and the model after each event."""
    storage = MemStorage()
    with variant(variant_name):
        runner = _Runner(storage, None)
        for step in workload.setup:
            runner.step(step)
        runner.close_all()
        base, base_tree = storage.state.copy(), runner.tree
        raw_inodes = frozenset(storage.state.names[sim_path(n)] for n, b in base_tree.items() if b.raw)
        trace = Trace()
        storage.trace = runner.trace = trace
        runner.events = []
        for step in workload.steps:
            runner.step(step)
        runner.close_all()
        rec = TreeRecording(workload, variant_name, base, base_tree, tuple(trace.ops), tuple(runner.events), raw_inodes)
        # The uncrashed run must read exactly the model: otherwise the model, not a crash, is wrong.
        storage.trace = None
        final = read_tree(storage, workload)
        expected = view_of(runner.tree, workload)
        if variant_name is None and final != expected:
            raise AssertionError(f"tree workload {workload.name}: the uncrashed run reads {_differences(final, expected)}")
    return rec


# ---------------------------------------------------------------------------- views: what a reader observes
@attrs.frozen
class BranchView:
    size: int
    sectors: tuple[tuple[int, bytes], ...]  # non-zero sectors, sorted
    base: str | None = None
    snapshots: tuple[tuple[str, int, tuple, bytes, str | None], ...] = ()  # (name, size, sectors, vmstate, base)
    raw: bool = False


View = tuple[tuple[str, BranchView | None], ...]


def _items(disk: Disk) -> tuple[tuple[int, bytes], ...]:
    limit = disk.virtual_size // SECTOR_SIZE
    return tuple(sorted((s, d) for s, d in disk.sectors.items() if s < limit and any(d)))


def _names(workload: TreeWorkload, tree: Tree | None = None) -> list[str]:
    names = list(workload.tops)
    for step in workload.setup:
        if step[0] == "raw" and step[1] not in names:
            names.append(step[1])
    return names


def view_of(tree: Tree, workload: TreeWorkload) -> View:
    out = []
    for name in _names(workload):
        b = tree.get(name)
        if b is None:
            out.append((name, None))
            continue
        snaps = tuple((s.name, s.disk.virtual_size, _items(s.disk), s.vmstate, s.base) for s in b.snapshots)
        out.append((name, BranchView(b.disk.virtual_size, _items(b.disk), b.base, snaps, b.raw)))
    return tuple(out)


def _external_base(storage: MemStorage, layer_dir: str, root) -> str | None:
    while root.base_kind != BASE_NONE and LAYER_NAME.match(root.base_path):
        root = root_of(storage, os.path.join(layer_dir, root.base_path))
    # Bases are referenced by absolute simulated path (reference_base keeps absolute paths as given).
    return None if root.base_kind == BASE_NONE else os.path.basename(root.base_path)


def read_tree(storage: MemStorage, workload: TreeWorkload) -> View:
    """Every branch, snapshot and raw file as the spec's abstraction function reads it."""
    out = []
    for name in _names(workload):
        path = sim_path(name)
        if path not in storage.state.names:
            out.append((name, None))
            continue
        if any(s[0] == "raw" and s[1] == name for s in workload.setup):
            file = storage.open(path, writable=False)
            size = file.size()
            disk = model.write(model.empty_disk(size), 0, file.pread(0, size))
            out.append((name, BranchView(size, _items(disk), raw=True)))
            continue
        context = ImageContext.for_top(path)
        disk = abstract_layer(path, storage, context)
        root = root_of(storage, path)
        snaps = []
        for entry in root.snapshots:
            layer = os.path.join(context.layer_dir, layer_file_name(entry.layer_uuid))
            sdisk = abstract_layer(layer, storage, context)
            vmstate = b""
            if entry.vmstate_size:
                file = storage.open(os.path.join(context.layer_dir, vmstate_file_name(entry.layer_uuid)), writable=False)
                vmstate = file.pread(0, entry.vmstate_size + 1)
            snaps.append((entry.text_name, sdisk.virtual_size, _items(sdisk), vmstate,
                          _external_base(storage, context.layer_dir, root_of(storage, layer))))
        out.append((name, BranchView(disk.virtual_size, _items(disk), _external_base(storage, context.layer_dir, root),
                                     tuple(snaps))))
    return tuple(out)


def _differences(actual: View, expected: View) -> str:
    for (name, a), (_, e) in zip(actual, expected):
        if a == e:
            continue
        if a is None or e is None:
            return f"{name}: {'absent' if a is None else 'present'}, expected {'absent' if e is None else 'present'}"
        for field in ("size", "base", "raw"):
            if getattr(a, field) != getattr(e, field):
                return f"{name}: {field} {getattr(a, field)!r}, expected {getattr(e, field)!r}"
        if [s[0] for s in a.snapshots] != [s[0] for s in e.snapshots]:
            return f"{name}: snapshots {[s[0] for s in a.snapshots]}, expected {[s[0] for s in e.snapshots]}"
        for sa, se in zip(a.snapshots, e.snapshots):
            if sa != se:
                return f"{name}: snapshot {sa[0]!r} differs (size, contents, VM state or base)"
        da, de = dict(a.sectors), dict(e.sectors)
        for s in sorted(set(da) | set(de)):
            if da.get(s) != de.get(s):
                return (f"{name}: guest sector {s} reads {da.get(s, ZERO_SECTOR)[:8].hex()}..., "
                        f"expected {de.get(s, ZERO_SECTOR)[:8].hex()}...")
    return "a different tree"


# ---------------------------------------------------------------------------- the oracle
@attrs.frozen
class TreeOpened:
    """What recovery and check made of one durable state of a tree."""

    problem: str | None
    tree: View = ()
    exists: bool = True
    orphans: tuple[str, ...] = ()
    prechecked: bool = False  # the read-only check before recovery ran
    precheck_exit: int = 0

    @property
    def view(self) -> object:
        return self.tree


@attrs.frozen
class Candidate:
    """One legal whole tree: exact, except the R5 freedom of un-flushed guest writes.

    `outcomes`: per image with unacknowledged guest events, its legal (size,
    contents) outcomes, each judged as a whole (see `oracle.outcomes_of`).
    """

    kind: str  # "before", "after", "flushed"
    view: View
    outcomes: Mapping[str, tuple[Outcome, ...]] = attrs.field(factory=dict)


@attrs.frozen
class TreeLegal:
    candidates: tuple[Candidate, ...]


def open_tree_state(state: DiskState, rec: TreeRecording, trace: Trace | None = None,
                    recovered: dict[tuple, tuple] | None = None) -> TreeOpened:
    """Check every tree read-only, then open every top writable (recovery, commit completion, orphan removal), check, read.

    `recovered` memoizes the checks and the reading after recovery by the
    recovered bytes, as `oracle.open_state` does (one memo per variant).
    """
    workload = rec.workload
    tops = [sim_path(name) for name in workload.tops if sim_path(name) in state.names]
    try:
        read_only = ReadOnlyStorage(MemStorage(state))
        pre_exit, corrupt = read_only_verdict([(path, check_tree(path, read_only)) for path in tops])
    except Exception as exc:  # noqa: BLE001 - the tree check must never raise for a crashed state
        pre_exit, corrupt = 1, f"read-only check before recovery raised {type(exc).__name__}: {exc}"
    checked = {"prechecked": bool(tops), "precheck_exit": pre_exit}
    if corrupt:
        return TreeOpened(corrupt, **checked)
    storage = MemStorage(state, trace)
    try:
        with variant(rec.variant):
            for name in workload.tops:
                if sim_path(name) in state.names:
                    Image.open(sim_path(name), storage=storage).close()
            storage.trace = None
            after = state.key() if recovered is not None else None
            verdict = recovered.get(after) if recovered is not None else None
            if verdict is None:
                verdict = _check_and_read_tree(storage, workload)
                if recovered is not None:
                    recovered[after] = verdict
            problem, view = verdict
            if problem:
                return TreeOpened(problem, **checked)
    except LaminaError as exc:
        return TreeOpened(f"open (recovery) failed: {type(exc).__name__}: {exc}", **checked)
    except Exception as exc:  # noqa: BLE001 - an implementation crash is a finding, not a simulator error
        return TreeOpened(f"open (recovery) crashed: {type(exc).__name__}: {exc}", **checked)
    known = {sim_path(n) for n in _names(workload)} | {sim_path(STORE_NAME)}  # the store is the directory's
    orphans = tuple(sorted(p for p in state.names if p not in known
                           and not any(p.startswith(layer_dir_of(t) + os.sep) for t in known)))
    return TreeOpened(None, view, orphans=orphans, **checked)


def _check_and_read_tree(storage: MemStorage, workload: TreeWorkload) -> tuple[str | None, View]:
    """The spec's check_tree of every recovered top (must be clean) and, if all are, the whole tree as read."""
    for name in workload.tops:
        path = sim_path(name)
        if path not in storage.state.names:
            continue
        report = check_tree(path, storage)
        if report.exit_code != 0 or report.findings:
            kinds = ", ".join(f"{f.severity}:{f.kind}" for f in report.findings)
            first = report.findings[0].message if report.findings else ""
            return f"check_tree({name}) after recovery: exit {report.exit_code} ({kinds}): {first}", ()
    return None, read_tree(storage, workload)


def tree_legal_at(rec: TreeRecording, crash: int) -> TreeLegal:
    flushed: Tree = rec.base_disk
    pending: list[TreeEvent] = []
    for event in rec.events:
        if event.end <= crash and event.durable:
            flushed, pending = event.tree, []
        elif event.start < crash or event.end <= crash:
            pending.append(event)
    candidates = [Candidate("after", view_of(e.tree, rec.workload)) for e in pending if e.management]
    steps: dict[str, list] = {}
    for event in pending:
        if event.management:
            continue
        names = {name for name, _, _ in event.changes} | ({event.size[0]} if event.size else set())
        for name in names:
            resized = event.size[1] if event.size and event.size[0] == name else None
            steps.setdefault(name, []).append((resized, tuple((s, v) for n, s, v in event.changes if n == name)))
    outcomes = {name: outcomes_of(flushed[name].disk, s) for name, s in steps.items()}
    kind = "before" if candidates else "flushed"
    candidates.insert(0, Candidate(kind, view_of(flushed, rec.workload), outcomes))
    return TreeLegal(tuple(candidates))


def _match(actual: View, candidate: Candidate, garbage: Mapping[int, bytes]) -> str | None:
    for (name, a), (_, e) in zip(actual, candidate.view):
        if a == e:
            continue
        outcomes = candidate.outcomes.get(name)
        if a is None or e is None or not outcomes or (a.base, a.raw, a.snapshots) != (e.base, e.raw, e.snapshots):
            return _differences(((name, a),), ((name, e),))
        # Garbage of a torn write is accepted only where an unflushed write may have left new bytes.
        loose = {s: g for s, g in garbage.items() if any(s in o.alternatives for o in outcomes)}
        reason = outcomes_mismatch(a.size, dict(a.sectors), outcomes, loose)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def judge_tree(opened: TreeOpened, legal: TreeLegal, garbage: Mapping[int, bytes] | None = None) -> str | None:
    """None when the recovered tree is one of the legal candidates as a whole, else why not (against the nearest)."""
    if opened.problem:
        return opened.problem
    reasons = []
    for candidate in legal.candidates:
        reason = _match(opened.tree, candidate, garbage or {})
        if reason is None:
            return None
        reasons.append(f"not {candidate.kind}: {reason}")
    return "the tree is no legal outcome: " + "; ".join(reasons)
