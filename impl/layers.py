"""Snapshots, clones, delete-with-merge, commit, rebase and diff over a tree of layer files.

Every operation ends in one atomic step that makes it visible (see the
format document, section "Layers"):

- snapshot create / revert, clone: a complete new top file is renamed over
  the image's name (`write_new_layer`);
- snapshot delete, rebase, commit: a root write in one layer file (the commit
  protocol's switch), after content-preserving copies that any crash leaves
  harmless;
- files a crash leaves behind (a layer linked but never referenced, a
  `.creating` file) are unreferenced, and a writable open removes them.
"""
from __future__ import annotations

import bisect
import functools
import inspect
import os
import time
from typing import Callable, Iterator, TypeVar

import attrs
from lamina.spec.crc import crc32c

from lamina.spec.errors import (CommittingIntoSnapshot, CommittingWithoutBase, ImageLocked, InvalidArgument, LaminaError,
                                UnsafeFile)
from lamina.spec.store import STORE_NAME
from lamina.spec.layout import MAX_CHAIN_DEPTH, MAX_SNAPSHOTS, MAX_VMSTATE_SIZE, SECTOR_SIZE
from lamina.spec.references import (
    LAYER_NAME,
    BaseReferenceError,
    ChainTooDeep,
    ChainWalk,
    ImageContext,
    LayerMismatch,
    check_identity,
    check_layer_dir,
    check_layer_file,
    is_twin,
    layer_dir_of,
    layer_file_name,
    open_tree_file,
    resolve_base,
    twin_of,
    vmstate_file_name,
)
from lamina.spec.protocol import read_root_copies, recover
from lamina.spec.replication import select_root
from lamina.spec.storage import File, Storage
from lamina.spec.tree import orphans, read_vmstate_chunks, root_of, sparse_crc32c, vmstate_problem
from lamina.spec.structures import (
    BASE_LAMINA,
    BASE_NONE,
    FEATURE_SHARED_CLUSTERS,
    FLAG_COMMITTING,
    KNOWN_AUTOCLEAR_FEATURES,
    Root,
    SnapshotEntry,
    make_snapshot_entry,
    next_counter,
    snapshot_name_problem,
)

from .identity import new_uuid, now_ns
from .image import Image, RawBase, image_lock, write_new_layer
from .osfile import OsStorage

CHUNK = 1 << 20
Progress = Callable[[float], None]  # told the fraction of an operation's work done (a progress bar)


class _Share:
    """Bytes done out of a total, reported to a `Progress` as a fraction (within [lo, hi) of the whole)."""

    def __init__(self, progress: Progress | None, total: int, lo: float = 0.0, hi: float = 1.0) -> None:
        self._progress, self._total, self._lo, self._hi, self._done = progress, max(total, 1), lo, hi, 0

    def add(self, n: int) -> None:
        if self._progress is not None:
            self._done += n
            self._progress(self._lo + (self._hi - self._lo) * min(1.0, self._done / self._total))


class SnapshotNotFound(LaminaError):
    """No snapshot of that name or id."""


class SnapshotExists(LaminaError):
    """A snapshot of that name exists already."""


class VmStateCorrupt(LaminaError):
    """A VM-state file does not match the size and CRC32C its snapshot recorded."""


class InvalidSnapshotName(InvalidArgument):
    """A name the format does not admit for a snapshot (F-SNAP-001)."""


def _storage(storage: Storage | None) -> Storage:
    return storage or OsStorage()


Operation = TypeVar("Operation", bound=Callable)


def _holding_lock(exclusive: bool, collect: bool = False) -> Callable[[Operation], Operation]:
    """Hold the image's lock for a whole operation: its steps open and close the image several times,
    and no other process may open it in between (its opens of the image pass `lock=False`).

    With `collect`, the files the operation leaves unreferenced are removed at its end, also when
    it fails after its switch (a root write whose second copy failed is done all the same).
    """

    def wrap(operation: Operation) -> Operation:
        signatures: list[inspect.Signature] = []  # made at the first call, not at import: each costs a walk of the function

        @functools.wraps(operation)
        def run(*args: object, **kwargs: object) -> object:
            if not signatures:
                signatures.append(inspect.signature(operation))
            bound = signatures[0].bind(*args, **kwargs)
            path = bound.arguments["path"]
            storage = bound.arguments["storage"] = _storage(bound.arguments.get("storage"))
            with image_lock(path, exclusive, storage):
                try:
                    result = operation(*bound.args, **bound.kwargs)
                except BaseException:
                    if collect:
                        try:
                            collect_garbage(path, storage)
                        except LaminaError:
                            pass  # the error being raised says what failed; a writable open collects later
                    raise
                if collect:
                    collect_garbage(path, storage)
                return result

        return run  # type: ignore[return-value]

    return wrap


def _entry(root: Root, name: str, path: str) -> SnapshotEntry:
    entry = root.snapshot(name)
    if entry is None:
        raise SnapshotNotFound(f"{path}: no snapshot named {name!r}")
    return entry


def _ensure_layer_dir(storage: Storage, top: str) -> str:
    directory = layer_dir_of(os.path.abspath(top))
    if not storage.exists(directory):
        storage.mkdir(directory)
        storage.fsync_dir(os.path.dirname(directory))
    check_layer_dir(storage, ImageContext.for_top(top))  # never write through a symlinked layer directory
    return directory


def link_twin(storage: Storage, top: str, root: Root) -> None:
    """F-TREE-003: give a new top its second name `<uuid hex>.lam` in the layer directory, the name it keeps once
    frozen, so that a replica made by name (rsync -H) already holds a frozen layer under its final name.

    Made after the top is in place (its switch done): a crash before this link leaves a top without a twin, which
    is valid, and no orphan.  A name already there that is not the top itself is left alone (a writable open
    removes such an orphan, F-TREE-001).
    """
    directory = _ensure_layer_dir(storage, top)
    twin = twin_of(top, root)
    if storage.exists(twin):
        return
    storage.link(top, twin)
    storage.fsync_dir(directory)


def _require_own_name(storage: Storage, top: str) -> None:
    """Snapshot create and revert rename a new top over the image's name: through a link they would replace the link."""
    if not storage.stat(top).is_file:
        raise UnsafeFile(f"{top}: is a symbolic link or not a regular file; snapshot create and revert replace the "
                         "image file itself, so name it, not a link to it")


def _durable_file(storage: Storage, path: str, write: Callable[[File], None]) -> None:
    """Make the file under `path` atomically: `write` fills `path.creating`, which is fsynced, then renamed."""
    temporary = path + ".creating"
    if storage.exists(temporary):
        storage.unlink(temporary)
    try:
        file = storage.create(temporary)
        try:
            write(file)
            file.fsync()
        finally:
            file.close()
        storage.rename(temporary, path)
    except BaseException:
        _remove(storage, [temporary])
        raise


def _copy_data(source: File, target: File) -> None:
    """Copy a file's bytes in bounded memory; its holes stay holes."""
    target.truncate(source.size())
    for offset, length in source.data_extents():
        for pos in range(offset, offset + length, CHUNK):
            target.pwrite(pos, source.pread(pos, min(CHUNK, offset + length - pos)))


def _remove(storage: Storage, paths: list[str]) -> None:
    """Undo the files a failed operation made before its switch; what this cannot remove, a writable open does."""
    try:
        for path in paths:
            if storage.exists(path):
                storage.unlink(path)
        for directory in sorted({os.path.dirname(p) for p in paths}):
            storage.fsync_dir(directory)
    except LaminaError:
        pass  # the error being raised already says what failed


def _is_top(storage: Storage, path: str, image_uuid: bytes) -> bool:
    """Whether the layer file under `path` is still the one with `image_uuid` (the switch has not happened)."""
    try:
        return root_of(storage, path).image_uuid == image_uuid
    except LaminaError:
        return False


def _child_root(parent: Root, parent_name: str, **changes: object) -> Root:
    """A fresh empty top over the layer `parent` (stored as `parent_name` in the layer directory)."""
    root = Root(cluster_bits=parent.cluster_bits, virtual_size=parent.virtual_size, image_uuid=new_uuid(),
                base_kind=BASE_LAMINA, base_path=parent_name, base_uuid=parent.image_uuid,
                base_data_generation=parent.data_generation, base_size=parent.virtual_size,
                base_visible=parent.virtual_size)
    return attrs.evolve(root, **changes)


# ---------------------------------------------------------------------------- snapshots
@_holding_lock(exclusive=True)
def create_snapshot(path: str, name: str, vmstate: bytes | File | None = None, vm_clock_ns: int = 0,
                    storage: Storage | None = None) -> SnapshotEntry:
    """Freeze the current contents as snapshot `name`; the image goes on as an empty layer over it.

    `vmstate` is the VM state as bytes, or an open file copied in bounded
    memory (its holes stay holes and are never read).

    Order: flush and close the top; write the VM state; link the top's file
    into the layer directory under its uuid (the frozen layer: its bytes are
    not touched); write a new top over it that lists the snapshot; rename it
    over the image (the switch).
    """
    storage = _storage(storage)
    problem = snapshot_name_problem(name)
    if problem:
        raise InvalidSnapshotName(f"snapshot name {name!r} {problem}")
    if isinstance(vmstate, bytes):
        vm_size, vm_crc = len(vmstate), crc32c(vmstate)
        write_vmstate: Callable[[File], None] = lambda target: target.pwrite(0, vmstate)
    elif vmstate is not None:
        vm_size, vm_crc, source = vmstate.size(), sparse_crc32c(vmstate), vmstate
        write_vmstate = lambda target: _copy_data(source, target)
    else:
        vm_size, vm_crc = 0, 0
    if vm_size > MAX_VMSTATE_SIZE:
        raise InvalidArgument(f"a VM state is at most {MAX_VMSTATE_SIZE} bytes (the format's MAX_VMSTATE_SIZE)")
    _require_own_name(storage, path)
    root = _closed_top(storage, path)
    if root is None:  # work a writable open must do first (a commit to finish, a stray file under the frozen name)
        with Image.open(path, storage=storage, lock=False) as top:
            root = top.root
    if root.snapshot(name) is not None:
        raise SnapshotExists(f"{path}: a snapshot named {name!r} exists")
    if len(root.snapshots) >= MAX_SNAPSHOTS:
        raise InvalidArgument(f"{path}: already {MAX_SNAPSHOTS} snapshots, the format's maximum")
    if chain_depth(storage, path, root) >= MAX_CHAIN_DEPTH:  # the new top adds a file to the chain
        raise ChainTooDeep(f"{path}: its chain is already {MAX_CHAIN_DEPTH} files deep, the format's maximum")
    next_id = next_counter(root.next_snapshot_id, f"{path}: next_snapshot_id")
    directory = _ensure_layer_dir(storage, path)
    entry = make_snapshot_entry(
        name, id=root.next_snapshot_id, layer_uuid=root.image_uuid, creation_time_ns=now_ns(),
        vm_clock_ns=vm_clock_ns, disk_size=root.virtual_size, vmstate_size=vm_size, vmstate_crc=vm_crc if vm_size else 0)
    frozen = layer_file_name(root.image_uuid)
    made: list[str] = []
    try:
        if vm_size:
            made.append(os.path.join(directory, vmstate_file_name(root.image_uuid)))
            _durable_file(storage, made[-1], write_vmstate)
        if not is_twin(storage, path, os.path.join(directory, frozen)):  # a top made before twins (F-TREE-003)
            made.append(os.path.join(directory, frozen))
            storage.link(path, made[-1])
        storage.fsync_dir(directory)  # the VM state's rename (and the link) durable before the switch
        new_root = _child_root(root, frozen, snapshots=root.snapshots + (entry,), next_snapshot_id=next_id)
        write_new_layer(storage, path, new_root)
    except BaseException:
        if _is_top(storage, path, root.image_uuid):  # before the switch: nothing references what was made
            _remove(storage, made)
        raise
    link_twin(storage, path, new_root)
    return entry


def _closed_top(storage: Storage, path: str) -> Root | None:
    """The top alone, recovered as a writable open recovers it and left durable with no intents: all snapshot create
    needs of it.  None when a full writable open must come first: a commit to finish (F-COMMIT-001), autoclear bits
    to clear, or a file under the frozen name that is not the top's twin (an orphan the open removes, F-TREE-001).

    Snapshot create thus costs O(1) file operations in the number of snapshots, plus one root read per file of the
    chain (`chain_depth`): it neither opens the chain's layers nor recovers or collects the layer directory, which
    it does not read; the next writable open does both (a frozen layer a crash left mid-merge reads the same
    contents either way, section 9).
    """
    context = ImageContext.for_top(path)
    file = open_tree_file(storage, path, True, context)
    try:
        current = select_root(read_root_copies(file)).current()
        check_layer_file(path, current, context)
        if current.flags & FLAG_COMMITTING or current.autoclear_features & ~sum(KNOWN_AUTOCLEAR_FEATURES, 0):
            return None
        frozen = twin_of(path, current)
        if storage.exists(frozen) and not is_twin(storage, path, frozen):
            return None
        return recover(file).root
    finally:
        file.close()


def chain_depth(storage: Storage, path: str, root: Root) -> int:
    """Files in the top's chain (the top and every base, raw included), from their roots alone (F-REF-002).

    Each base is resolved by the one resolution (`resolve_base`) and must have the identity recorded (F-REF-003),
    as an open of the chain checks; its table is not decoded, its maps are not read.  A loop or a chain deeper
    than the format allows is an error here too.
    """
    walk = ChainWalk()
    context = ImageContext.for_top(path)
    depth = 0
    while True:
        walk.visit(os.path.realpath(path), path, storage)
        depth += 1
        found = resolve_base(root, context, path, storage)
        if found is None:
            return depth
        if root.base_kind != BASE_LAMINA:
            walk.visit(found.path, path, storage)
            raw = open_tree_file(storage, found.path, False, found.context)
            try:
                check_identity(root, None, raw.size(), path)
            finally:
                raw.close()
            return depth + 1
        below = root_of(storage, found.path, found.context, table=False)
        check_identity(root, below, below.virtual_size, path)
        path, root, context = found.path, below, found.context


def list_snapshots(path: str, storage: Storage | None = None, force_share: bool = False) -> tuple[SnapshotEntry, ...]:
    with Image.open(path, readonly=True, storage=storage, force_share=force_share) as top:
        return top.root.snapshots


@_holding_lock(exclusive=True, collect=True)
def revert_snapshot(path: str, name: str, storage: Storage | None = None) -> None:
    """Make the image's contents those of snapshot `name` again; the current contents are dropped.

    The switch is the rename of a new empty top over the snapshot's layer.
    """
    storage = _storage(storage)
    _require_own_name(storage, path)
    with Image.open(path, storage=storage, lock=False) as top:
        root = top.root
        entry = _entry(root, name, path)
        frozen = layer_file_name(entry.layer_uuid)
        with Image.open(os.path.join(top.context.layer_dir, frozen), readonly=True, storage=storage,
                        context=top.context) as layer:
            new_root = _child_root(layer.root, frozen, snapshots=root.snapshots, next_snapshot_id=root.next_snapshot_id)
    write_new_layer(storage, path, new_root)
    link_twin(storage, path, new_root)  # the old top's twin is now unreached: collected at the end


def _vmstate(path: str, name: str, storage: Storage, force_share: bool = False) -> tuple[str, SnapshotEntry, ImageContext]:
    """The verified VM-state file of a snapshot (checked before any byte is used)."""
    with Image.open(path, readonly=True, storage=storage, force_share=force_share) as top:
        entry = _entry(top.root, name, path)
        context = top.context
        vm_path = os.path.join(context.layer_dir, vmstate_file_name(entry.layer_uuid))
    problem = vmstate_problem(storage, vm_path, entry, context) if entry.vmstate_size else None
    if problem:
        raise VmStateCorrupt(f"{vm_path}: VM state of snapshot {name!r} {problem}")
    return vm_path, entry, context


def read_vmstate(path: str, name: str, storage: Storage | None = None) -> bytes:
    storage = _storage(storage)
    vm_path, entry, context = _vmstate(path, name, storage)
    return b"".join(read_vmstate_chunks(storage, vm_path, entry, context)) if entry.vmstate_size else b""


def save_vmstate(path: str, name: str, outfile: str, storage: Storage | None = None, force_share: bool = False) -> int:
    """Copy a snapshot's verified VM state to `outfile` in bounded memory; return its size."""
    storage = _storage(storage)
    vm_path, entry, context = _vmstate(path, name, storage, force_share)
    with open(outfile, "xb") as out:
        if entry.vmstate_size:
            source = open_tree_file(storage, vm_path, False, context)
            try:
                for offset, length in source.data_extents():  # holes stay holes
                    for pos in range(offset, min(offset + length, entry.vmstate_size), CHUNK):
                        out.seek(pos)
                        out.write(source.pread(pos, min(CHUNK, offset + length - pos, entry.vmstate_size - pos)))
            finally:
                source.close()
            out.truncate(entry.vmstate_size)
    return entry.vmstate_size


def _layer_root(storage: Storage, context: ImageContext, name: str) -> Root:
    """The root of a frozen layer alone: walking a tree must not open every layer's whole chain (quadratic)."""
    return root_of(storage, os.path.join(context.layer_dir, name), table=False)


def merge_base_into(child_path: str, context: ImageContext, storage: Storage, lock: bool = True,
                    share: _Share | None = None) -> None:
    """Copy the sectors of a child's base layer that the child lacks into the child, then point it past the base.

    The guest contents of the child never change: every sector copied
    already read the same through the base.  So a crash at any point leaves
    the child as it was, and the final root write is the switch.
    """
    with Image.open(child_path, storage=storage, context=context, lock=lock) as child:
        child.preserve_content = True
        base = child.base
        if not isinstance(base, Image):
            raise BaseReferenceError(f"{child_path}: its base {child.root.base_path!r} is not a Lamina layer, "
                                     "so it cannot be the snapshot being deleted")
        visible = min(child.virtual_size, child.root.base_visible)  # the child sees its base only below this
        extents = [e for e in base.extents() if e.data and e.start < visible]
        share = share or _Share(None, 0)
        for extent in extents:
            end = min(extent.start + extent.length, visible)
            _copy_absent(child, base, extent.start, end)
            share.add(end - extent.start)
        child.flush()
        parent = base.root
        # What the removed layer hid of its own base stays hidden: the visible limits combine.
        child.set_root(base_kind=parent.base_kind, base_path=parent.base_path, base_uuid=parent.base_uuid,
                       base_data_generation=parent.base_data_generation, base_size=parent.base_size,
                       base_visible=min(child.root.base_visible, parent.base_visible))


def _copy_absent(child: Image, source: Image | RawBase, start: int, end: int) -> None:
    """Write into `child` what `source` reads over [start, end), wherever `child` has no sector of its own."""
    for lo, hi in child.absent_ranges(start, end):
        pos = lo
        while pos < hi:
            step = min(CHUNK, hi - pos)
            child.write(pos, source.read(pos, step) if pos < source.virtual_size else bytes(step))
            pos += step


@_holding_lock(exclusive=True, collect=True)
def delete_snapshot(path: str, name: str, storage: Storage | None = None, progress: Progress | None = None) -> None:
    """Drop snapshot `name`; layers built on it get its sectors first, so no branch changes content.

    `progress` is told the fraction of the merges done.
    """
    storage = _storage(storage)
    with Image.open(path, storage=storage, lock=False) as top:
        root, context = top.root, top.context
    entry = _entry(root, name, path)
    frozen = layer_file_name(entry.layer_uuid)
    children = [path] if root.base_path == frozen else []
    for other in root.snapshots:
        if other.layer_uuid != entry.layer_uuid:
            other_name = layer_file_name(other.layer_uuid)
            if _layer_root(storage, context, other_name).base_path == frozen:
                children.append(os.path.join(context.layer_dir, other_name))
    work = 0
    if progress is not None:  # the bytes each merge copies at most: the layer's own
        with Image.open(os.path.join(context.layer_dir, frozen), readonly=True, storage=storage, context=context,
                        lock=False) as layer:
            work = sum(e.length for e in layer.extents() if e.data)
    for i, child in enumerate(children):
        if child != path and storage.stat(child).nlink > 1:
            _unshare(storage, child, context)
        merge_base_into(child, context, storage, lock=child != path,
                        share=_Share(progress, work, i / len(children), (i + 1) / len(children)))
    with Image.open(path, storage=storage, lock=False) as top:
        top.set_root(snapshots=tuple(s for s in top.root.snapshots if s.id != entry.id))


def _unshare(storage: Storage, path: str, context: ImageContext) -> None:
    """Give this image its own copy of a frozen layer that a clone also links, before changing its bytes.

    The copy has the same uuid and contents, so nothing that references the
    layer changes; the clone keeps the old file, and the chain it needs.
    """
    source = open_tree_file(storage, path, False, context)
    try:
        _durable_file(storage, path, lambda target: _copy_data(source, target))
    finally:
        source.close()
    storage.fsync_dir(os.path.dirname(path))


# ---------------------------------------------------------------------------- clones
@_holding_lock(exclusive=False)
def clone(path: str, name: str, new_path: str, storage: Storage | None = None) -> None:
    """A new writable image over snapshot `name`, independent of the source from then on.

    The snapshot's layer and its chain are hard-linked into the clone's own
    layer directory, so deleting the snapshot from the source later frees
    nothing the clone still reads.
    """
    storage = _storage(storage)
    if storage.exists(new_path):
        raise InvalidArgument(f"{new_path}: already exists")
    with Image.open(path, readonly=True, storage=storage, lock=False) as top:
        entry = _entry(top.root, name, path)
        context = top.context
    chain = []
    layer = layer_file_name(entry.layer_uuid)
    current = layer
    while True:
        chain.append(current)
        current_root = _layer_root(storage, context, current)
        if current_root.incompatible_features & FEATURE_SHARED_CLUSTERS \
                and os.path.dirname(os.path.abspath(new_path)) != context.top_dir:
            raise InvalidArgument(f"{new_path}: the snapshot's data is shared through the store of {context.top_dir} "
                                  "(F-SHARE-001); make the clone in that directory, or convert it")
        if current_root.base_kind == BASE_NONE:
            break
        if not LAYER_NAME.match(current_root.base_path):
            same_dir = os.path.dirname(os.path.abspath(new_path)) == context.top_dir
            if not same_dir and not os.path.isabs(current_root.base_path):
                raise InvalidArgument(f"{new_path}: the snapshot's chain ends at {current_root.base_path!r}, relative to "
                                      f"{context.top_dir}; make the clone in that directory")
            break
        current = current_root.base_path
    new_context = ImageContext.for_top(new_path)
    directory = _ensure_layer_dir(storage, new_path)
    made: list[str] = []
    try:
        for name_ in chain:
            target = os.path.join(directory, name_)
            if not storage.exists(target):
                storage.link(os.path.join(context.layer_dir, name_), target)
                made.append(target)
        storage.fsync_dir(directory)
        parent = _layer_root(storage, new_context, layer)
        new_root = _child_root(parent, layer)
        write_new_layer(storage, new_path, new_root)
    except BaseException:
        if not storage.exists(new_path):  # before the switch: the links serve nothing
            _remove(storage, made)
        raise
    link_twin(storage, new_path, new_root)


# ---------------------------------------------------------------------------- commit and rebase
@_holding_lock(exclusive=True)
def commit(path: str, storage: Storage | None = None, allow_bases: tuple[str, ...] = (),
           progress: Progress | None = None) -> None:
    """Write the top's sectors into its base (a file the user chose, never a snapshot) and empty the top.

    The top's root is marked committing first; until the end the top still
    holds every sector, so its contents never change, and a writable open
    finishes an interrupted commit.
    """
    storage = _storage(storage)
    with Image.open(path, storage=storage, allow_bases=allow_bases, lock=False) as top:
        if top.root.base_kind == BASE_NONE:
            raise InvalidArgument(f"{path}: has no base to commit into")
        if LAYER_NAME.match(top.root.base_path):
            raise InvalidArgument(f"{path}: its base is a snapshot; snapshots never change (delete it instead)")
        top.set_root(flags=top.root.flags | FLAG_COMMITTING)
        finish_commit(top, progress)


def finish_commit(top: Image, progress: Progress | None = None) -> None:
    """The body of `commit`, also run by a writable open that finds the committing flag: idempotent."""
    if LAYER_NAME.match(top.root.base_path):  # F-COMMIT-001: only a forged root asks for this
        raise CommittingIntoSnapshot(f"{top.path}: the root is marked committing into its base, a snapshot, which never "
                                     "changes; `lamina check --repair` clears the mark")
    found = resolve_base(top.root, top.context, top.path, top._storage)
    if found is None or top.base is None:
        raise CommittingWithoutBase(f"{top.path}: the root is marked committing but the image has no base to commit into; "
                                    "`lamina check --repair` clears the mark")
    real = found.path
    top.base.close()
    size = top.virtual_size
    if isinstance(top.base, Image):
        target = Image.open(real, storage=top._storage, context=found.context)
        write, flush = target.write, target.close
        base_size = target.virtual_size
    else:
        handle = top._storage.open(real, writable=True)
        try:
            handle.lock(exclusive=True)
        except BaseException:
            handle.close()
            raise
        base_size = handle.size()

        def write(offset: int, data: bytes) -> None:
            handle.pwrite(offset, data)

        def flush() -> None:
            handle.fsync()
            handle.close()
    limit = min(size, base_size)
    hidden = min(top.root.base_visible, limit)
    try:
        extents = [e for e in top.extents() if e.data and e.start < limit]
        hidden_ranges = top.absent_ranges(hidden, limit) if hidden < limit else []
        share = _Share(progress, sum(min(e.start + e.length, limit) - e.start for e in extents)
                       + sum(hi - lo for lo, hi in hidden_ranges))
        for extent in extents:
            _copy_range(write, top.read, extent.start, min(extent.start + extent.length, limit), share)
        # What the top hides of its base (it shrank, then grew) reads zero: so must the base.
        for lo, hi in hidden_ranges:
            _copy_range(write, lambda pos, step: bytes(step), lo, hi, share)
    finally:
        flush()
    generation = 0
    if isinstance(top.base, Image):
        with Image.open(real, readonly=True, storage=top._storage, context=found.context) as reopened:
            generation = reopened.root.data_generation
    top.base = None
    top.preserve_content = True
    top.discard_own(0, min(size, base_size))
    top.flush()
    top.set_root(flags=top.root.flags & ~FLAG_COMMITTING, base_data_generation=generation,
                 base_visible=limit)
    top.reopen_base()


def _copy_range(write, read, start: int, end: int, share: _Share | None = None) -> None:
    pos = start
    while pos < end:
        step = min(CHUNK, end - pos)
        write(pos, read(pos, step))
        if share is not None:
            share.add(step)
        pos += step


@_holding_lock(exclusive=True, collect=True)
def rebase(path: str, new_base: str | None, base_format: str | None = None, unsafe: bool = False,
           storage: Storage | None = None, allow_bases: tuple[str, ...] = (), progress: Progress | None = None) -> None:
    """Put the image on another base.  Safe mode first copies every sector where old and new bases differ."""
    from .image import reference_base

    storage = _storage(storage)
    with Image.open(path, storage=storage, allow_bases=allow_bases, lock=False) as top:
        probe = attrs.evolve(top.root, base_kind=BASE_NONE, base_path="", base_uuid=bytes(16), base_data_generation=0,
                             base_size=0)
        new_root = reference_base(probe, new_base, base_format, top.context, storage, path) if new_base else probe
        if not unsafe:
            top.preserve_content = True
            found = resolve_base(new_root, top.context, path, storage)
            with (Image.open(found.path, readonly=True, storage=storage, context=found.context)
                  if found is not None and new_root.base_kind == BASE_LAMINA else _NoImage(new_root, top, storage)) as fresh:
                absent = top.absent_ranges(0, top.virtual_size)
                share = _Share(progress, sum(hi - lo for lo, hi in absent))
                for lo, hi in absent:
                    pos = lo
                    while pos < hi:
                        step = min(CHUNK, hi - pos)
                        old = top.read(pos, step)
                        new = fresh.read_padded(pos, step)
                        if old != new:  # (names of their own: `lo, hi` bound the range being walked)
                            for start, stop in _differing_sectors(old, new):
                                top.write(pos + start, old[start:stop])
                        share.add(step)
                        pos += step
            top.flush()
        top.set_root(base_kind=new_root.base_kind, base_path=new_root.base_path, base_uuid=new_root.base_uuid,
                     base_data_generation=new_root.base_data_generation, base_size=new_root.base_size,
                     base_visible=min(new_root.base_size, top.virtual_size))


def _differing_sectors(a: bytes, b: bytes) -> list[tuple[int, int]]:
    """Byte ranges, in whole sectors, where two equally long buffers differ."""
    runs: list[tuple[int, int]] = []
    for lo in range(0, len(a), SECTOR_SIZE):
        if a[lo : lo + SECTOR_SIZE] != b[lo : lo + SECTOR_SIZE]:
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], lo + SECTOR_SIZE)
            else:
                runs.append((lo, lo + SECTOR_SIZE))
    return runs


class _NoImage:
    """A raw base, or no base at all, read as a rebase target."""

    def __init__(self, root: Root, top: Image, storage: Storage) -> None:
        found = resolve_base(root, top.context, top.path, storage)
        self._raw = RawBase(found.path, storage.open(found.path, writable=False)) if found else None

    def read_padded(self, offset: int, length: int) -> bytes:
        if self._raw is None or offset >= self._raw.virtual_size:
            return bytes(length)
        inside = min(length, self._raw.virtual_size - offset)
        return self._raw.read(offset, inside) + bytes(length - inside)

    def __enter__(self) -> "_NoImage":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._raw is not None:
            self._raw.close()


# ---------------------------------------------------------------------------- garbage
def referenced_files(path: str, storage: Storage | None = None) -> set[str]:
    """Names in the layer directory that the image reaches: snapshot layers, their VM state, every chain member.

    Its callers hold the image (a writable open, an operation): so it takes no lock of its own.
    """
    storage = _storage(storage)
    context, root = ImageContext.for_layer(path), root_of(storage, path)  # roots only: linear in the layers
    names: set[str] = set()
    pending = [root.base_path] if LAYER_NAME.match(root.base_path) else []
    for entry in root.snapshots:
        pending.append(layer_file_name(entry.layer_uuid))
        if entry.vmstate_size:
            names.add(vmstate_file_name(entry.layer_uuid))
    while pending:
        name = pending.pop()
        if name in names:
            continue
        names.add(name)
        if storage.exists(os.path.join(context.layer_dir, name)):
            below = _layer_root(storage, context, name).base_path
            if LAYER_NAME.match(below):
                pending.append(below)
    twin = twin_of(path, root)
    if is_twin(storage, path, twin):  # the top's own second name (F-TREE-003)
        names.add(os.path.basename(twin))
    return names


def unreferenced_files(path: str, storage: Storage | None = None) -> list[str]:
    """What a writable open removes: the orphans F-TREE-002 allows removing, and nothing else."""
    storage = _storage(storage)
    context = ImageContext.for_top(path)
    keep = referenced_files(path, storage) if storage.exists(context.layer_dir) else set()
    return orphans(storage, context, keep)[0]


def recover_layers(path: str, storage: Storage | None = None) -> None:
    """Recover every frozen layer file that a crash left mid-update (a merge writes into them).

    Merges preserve guest contents, so the spec's recovery is all they need;
    a writable open of the top runs this before it opens its chain (found by
    crashsim, workload layer-delete-merge).
    """
    storage = _storage(storage)
    context = ImageContext.for_top(path)
    if not storage.stat(context.layer_dir).is_dir:
        return  # a symbolic link: nothing inside is touched (F-OPEN-002); check reports it
    for name in storage.listdir(context.layer_dir):
        layer = os.path.join(context.layer_dir, name)
        if not LAYER_NAME.match(name) or not storage.stat(layer).is_file:
            continue  # not a layer: check reports it, nothing writes into it
        if is_twin(storage, path, layer):
            continue  # the top itself (F-TREE-003), recovered as the top
        file = open_tree_file(storage, layer, True, context)
        try:
            selection = select_root(read_root_copies(file), table=False)
            if selection.value is not None:
                try:
                    check_layer_file(layer, selection.value, context)
                except LayerMismatch:
                    continue  # another layer under this name: never written; check reports it
            if selection.value is not None and (selection.value.intents or selection.problems):
                recover(file)
        finally:
            file.close()
    recover_store(context.top_dir, storage)


def recover_store(directory: str, storage: Storage) -> None:
    """Recover the directory's shared store when a crash left it mid-update (a dedup or collection).

    The store is shared by the images of the directory, so it is recovered under its own exclusive lock,
    and left alone while another process holds it (that one recovers it, or the next writable open does).
    """
    path = os.path.join(directory, STORE_NAME)
    if not storage.exists(path) or not storage.stat(path).is_file:
        return
    file = open_tree_file(storage, path, True, ImageContext.for_top(path))
    try:
        try:
            file.lock(exclusive=True)
        except ImageLocked:
            return
        selection = select_root(read_root_copies(file), table=False)
        if selection.value is not None and (selection.value.intents or selection.problems):
            recover(file)
    finally:
        file.close()


def collect_garbage(path: str, storage: Storage | None = None) -> list[str]:
    """Remove what a crash or a finished operation left unreferenced in the layer directory."""
    storage = _storage(storage)
    removed = unreferenced_files(path, storage)
    for name in removed:
        storage.unlink(name)
    for directory in sorted({os.path.dirname(name) for name in removed}):
        storage.fsync_dir(directory)
    return removed


# ---------------------------------------------------------------------------- diff and tree
def parse_target(text: str) -> tuple[str, str | None]:
    """`IMAGE` or `IMAGE@SNAPSHOT`; a file whose own name holds an `@` wins."""
    if os.path.exists(text) or "@" not in text:
        return text, None
    image, _, snap = text.rpartition("@")
    return image, snap


def open_target(text: str, storage: Storage | None = None, readonly: bool = True,
                allow_bases: tuple[str, ...] = (), force_share: bool = False) -> Image:
    """Open `IMAGE` or the frozen layer of `IMAGE@SNAPSHOT` (read-only), with its chain."""
    storage = _storage(storage)
    path, snap = parse_target(text)
    if snap is None:
        return Image.open(path, readonly=readonly, storage=storage, allow_bases=allow_bases, force_share=force_share)
    if not readonly:
        raise InvalidArgument(f"{text}: a snapshot is read-only")
    context = ImageContext.for_top(path, allow_bases)
    with Image.open(path, readonly=True, storage=storage, context=context, force_share=force_share) as top:
        entry = _entry(top.root, snap, path)
    return Image.open(os.path.join(context.layer_dir, layer_file_name(entry.layer_uuid)), readonly=True,
                      storage=storage, context=context, force_share=force_share)


def _chain(image: Image) -> list[Image]:
    out = []
    layer: Image | RawBase | None = image
    while isinstance(layer, Image):
        out.append(layer)
        layer = layer.base
    return out


def diff(a: Image, b: Image) -> Iterator[tuple[int, int]]:
    """Guest ranges where `a` and `b` may differ, from metadata alone when they share a layer.

    Below a layer both chains share, contents are equal; so only sectors
    present in the layers above it, on either side, can differ.  Images with
    nothing in common are compared by reading.
    """
    chain_a, chain_b = _chain(a), _chain(b)
    ids_b = {(layer.root.image_uuid, layer.root.data_generation): i for i, layer in enumerate(chain_b)}
    common = next(((i, ids_b[(layer.root.image_uuid, layer.root.data_generation)]) for i, layer in enumerate(chain_a)
                   if (layer.root.image_uuid, layer.root.data_generation) in ids_b), None)
    size = max(a.virtual_size, b.virtual_size)
    if common is None:
        yield from _merge(_compare_by_reading(a, b, size))
        return
    ranges = []
    for layer in chain_a[: common[0]] + chain_b[: common[1]]:
        ranges += [(e.start, e.start + e.length) for e in layer.extents() if e.data]
        limit = layer._base_limit()  # past it the layer hides its base: absent sectors read zero there
        if limit < layer.virtual_size:
            ranges.append((limit, layer.virtual_size))
    small = min(a.virtual_size, b.virtual_size)
    if size > small:
        ranges.append((small, size))
    yield from _merge(sorted(ranges))


def _compare_by_reading(a: Image, b: Image, size: int) -> Iterator[tuple[int, int]]:
    step = 1 << 16
    for pos in range(0, size, step):
        n = min(step, size - pos)
        da = a.read(pos, min(n, max(0, a.virtual_size - pos))).ljust(n, b"\0")
        db = b.read(pos, min(n, max(0, b.virtual_size - pos))).ljust(n, b"\0")
        if da != db:
            yield pos, pos + n


def gaps(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of [start, end) outside the sorted, disjoint [lo, hi) `ranges` (found by bisection)."""
    out = []
    pos = start
    for lo, hi in ranges[max(0, bisect.bisect_right(ranges, (start, start)) - 1):]:
        if lo >= end:
            break
        if hi <= pos:
            continue
        if lo > pos:
            out.append((pos, lo))
        pos = max(pos, hi)
    if pos < end:
        out.append((pos, end))
    return out


def _merge(ranges) -> Iterator[tuple[int, int]]:
    current = None
    for lo, hi in ranges:
        if current and lo <= current[1]:
            current = (current[0], max(current[1], hi))
            continue
        if current:
            yield current
        current = (lo, hi)
    if current:
        yield current


def tree(path: str, storage: Storage | None = None, force_share: bool = False) -> dict:
    """The image's layers as nested nodes: bases at the root, snapshots, and the current state."""
    storage = _storage(storage)
    with Image.open(path, readonly=True, storage=storage, force_share=force_share) as top:
        root, context = top.root, top.context
        disk_usage = os.stat(path).st_blocks * 512 if os.path.exists(path) else 0
    nodes: dict[str, dict] = {}
    parents: dict[str, str | None] = {}

    def node_for_external(base_path: str, kind: int) -> str:
        key = "base:" + base_path
        nodes.setdefault(key, {"kind": "base", "name": base_path, "format": "lamina" if kind == BASE_LAMINA else "raw",
                               "children": []})
        parents.setdefault(key, None)
        return key

    def parent_key(layer_root: Root) -> str | None:
        if layer_root.base_kind == BASE_NONE:
            return None
        if LAYER_NAME.match(layer_root.base_path):
            return "layer:" + layer_root.base_path
        return node_for_external(layer_root.base_path, layer_root.base_kind)

    from .dedup import layer_sharing

    def sharing(layer_path: str) -> dict[str, int]:
        shared, exclusive = layer_sharing(layer_path, storage)
        return {"shared_bytes": shared, "exclusive_bytes": exclusive}

    for entry in root.snapshots:
        name = layer_file_name(entry.layer_uuid)
        layer_root = _layer_root(storage, context, name)
        nodes["layer:" + name] = {"kind": "snapshot", "name": entry.text_name, "id": entry.id,
                                  "created": entry.creation_time_ns, "vm_clock_ns": entry.vm_clock_ns,
                                  "disk_size": entry.disk_size, "vmstate_size": entry.vmstate_size,
                                  "file": os.path.join(os.path.basename(context.layer_dir), name), "children": [],
                                  **sharing(os.path.join(context.layer_dir, name))}
        parents["layer:" + name] = parent_key(layer_root)
    nodes["top"] = {"kind": "current", "name": os.path.basename(path), "disk_size": root.virtual_size,
                    "disk_usage": disk_usage, "children": [], **sharing(path)}
    parents["top"] = parent_key(root)
    # Layers a chain reaches that are no snapshot of this image: a clone's origin, shared by hard link.
    pending = [p for p in list(parents.values()) if p and p.startswith("layer:") and p not in nodes]
    while pending:
        key = pending.pop()
        if key in nodes:
            continue
        name = key[len("layer:"):]
        layer_root = _layer_root(storage, context, name)
        nodes[key] = {"kind": "layer", "name": name, "disk_size": layer_root.virtual_size,
                      "file": os.path.join(os.path.basename(context.layer_dir), name), "children": [],
                      **sharing(os.path.join(context.layer_dir, name))}
        parents[key] = parent_key(layer_root)
        if parents[key] and parents[key].startswith("layer:") and parents[key] not in nodes:
            pending.append(parents[key])
    roots = []
    for key, parent in parents.items():
        if parent is None or parent not in nodes:
            roots.append(nodes[key])
        else:
            nodes[parent]["children"].append(nodes[key])
    return {"image": path, "layers": roots}


def draw_tree(data: dict) -> str:
    """The layer tree as terminal lines, with box-drawing branches."""
    from .sizes import format_size

    lines: list[str] = []

    def label(node: dict) -> str:
        return plain(node) + (f" [{format_size(node['exclusive_bytes'])} exclusive, "
                              f"{format_size(node['shared_bytes'])} shared]" if node.get("shared_bytes") else "")

    def plain(node: dict) -> str:
        if node["kind"] == "base":
            return f"{node['name']} (base, {node['format']})"
        if node["kind"] == "layer":
            return f"{node['name']} (frozen layer from another image, {format_size(node['disk_size'])})"
        if node["kind"] == "current":
            return f"* {node['name']} (current state, {format_size(node['disk_size'])})"
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(node["created"] / 1e9))
        vm = f", VM state {format_size(node['vmstate_size'])}" if node["vmstate_size"] else ""
        return f"{node['name']} (snapshot {node['id']}, {when} UTC, {format_size(node['disk_size'])}{vm})"

    def walk(node: dict, prefix: str, last: bool, top: bool) -> None:
        lines.append((prefix + ("└── " if last else "├── ") if not top else "") + label(node))
        children = node["children"]
        for i, child in enumerate(children):
            walk(child, prefix + ("" if top else ("    " if last else "│   ")), i == len(children) - 1, False)

    for node in data["layers"]:
        walk(node, "", True, True)
    return "\n".join(lines)
