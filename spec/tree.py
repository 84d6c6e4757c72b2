"""`check` over a whole tree of layers: every layer file, every reference, every snapshot's VM state.

Invariants beyond those of one file (I1-I7):

- T1 every base reference may be followed (references.py) and leads to a
  file whose identity (uuid, data generation, size) is the one recorded;
- T2 every snapshot's layer file exists in the layer directory and is a
  valid layer whose uuid is the entry's;
- T3 every snapshot's VM-state file has the size and CRC32C recorded;
- T4 every file in the layer directory is reached from the top (a snapshot,
  its VM state, a member of a chain, or the top's own twin: the same file
  under `<top uuid>.lam`, F-TREE-003), and no `<top>.creating` is left
  beside the top.  What is left there by an interrupted operation (a
  snapshot create or delete, a clone, a new top a crash kept from its
  rename) is pending work, which a writable open removes: a note, not an
  error.  Anything else there is a foreign file: leaked space.

A top marked committing finds its base written by the commit in progress:
its data generation moved on, and that is pending too (a writable open
finishes the commit).

Every file is opened by the guarded open of `references.py` (F-OPEN), and
only what F-TREE-002 allows is ever removed: a regular file, in a layer
directory that is a real directory, named as the format names its files,
and not reached.  Anything else there is reported, never removed.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Iterator

import attrs
from .crc import crc32c

from .errors import FormatError, ImageLocked, LaminaError
from .protocol import read_root_copies
from .references import (
    LAYER_DIR_ENTRY,
    LAYER_NAME,
    ChainWalk,
    ImageContext,
    check_identity,
    check_layer_file,
    image_of,
    is_twin,
    layer_file_name,
    open_tree_file,
    resolve_base,
    twin_of,
    vmstate_file_name,
)
from .replication import select_root
from .storage import File, Storage

if TYPE_CHECKING:  # the check functions import it when they run: opening an image (the tools' start-up) needs none of it
    from .check import CheckReport, Finding
    from .store import StoreView
from .structures import BASE_LAMINA, BASE_RAW, FLAG_COMMITTING, Root, SnapshotEntry


def root_of(storage: Storage, path: str, context: ImageContext | None = None, table: bool = True) -> Root:
    """The current root of a layer file of `context` (None: the image `path` belongs to); a FormatError when
    neither copy is usable.  `table`: see `decode_root`."""
    context = context or ImageContext.for_layer(path)
    file = open_tree_file(storage, path, False, context)
    try:
        root = select_root(read_root_copies(file), table=table).current()
        check_layer_file(path, root, context)
        return root
    finally:
        file.close()


def _file_size(storage: Storage, path: str, context: ImageContext) -> int:
    file = open_tree_file(storage, path, False, context)
    try:
        return file.size()
    finally:
        file.close()


def _prefixed(report: CheckReport, label: str) -> list[Finding]:
    return [attrs.evolve(f, message=f"{label}: {f.message}") for f in report.findings]


VMSTATE_CHUNK = 1 << 20
CRC32C_POLY = 0x82F63B78  # the Castagnoli polynomial, bit-reflected as CRC32C computes


def _multiply_mod_poly(a: int, b: int) -> int:
    """a * b modulo the CRC32C polynomial, in the bit-reflected representation (bit 31 is x^0)."""
    product = 0
    for bit in range(31, -1, -1):
        if a >> bit & 1:
            product ^= b
        b = (b >> 1) ^ CRC32C_POLY if b & 1 else b >> 1
    return product


def crc32c_extend_zeros(crc: int, count: int) -> int:
    """The CRC32C of some bytes followed by `count` zero bytes, from the CRC of those bytes, in O(log count).

    With zero input a CRC register only advances: count zero bytes multiply
    it by x^(8 count) modulo the polynomial (as zlib's crc32_combine uses).
    So a hole of any length costs nothing to checksum.
    """
    power, square = 1 << 31, 1 << 23  # x^0, and x^8 (one zero byte)
    while count:
        if count & 1:
            power = _multiply_mod_poly(square, power)
        square = _multiply_mod_poly(square, square)
        count >>= 1
    return _multiply_mod_poly(power, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def sparse_crc32c(file: File) -> int:
    """The CRC32C of a whole file, reading only its data extents: holes enter by `crc32c_extend_zeros`,
    so the time is that of the bytes the file holds on disk, whatever length it claims."""
    size = file.size()
    crc = pos = 0
    for start, length in file.data_extents():
        start, end = max(start, pos), min(start + length, size)
        if start >= end:
            continue
        crc = crc32c_extend_zeros(crc, start - pos)
        for at in range(start, end, VMSTATE_CHUNK):
            crc = crc32c(file.pread(at, min(VMSTATE_CHUNK, end - at)), crc)
        pos = end
    return crc32c_extend_zeros(crc, size - pos)


def read_vmstate_chunks(storage: Storage, path: str, entry: SnapshotEntry, context: ImageContext) -> Iterator[bytes]:
    """The VM state in chunks, so that a recorded size of any value costs bounded memory."""
    file = open_tree_file(storage, path, False, context)
    try:
        for pos in range(0, entry.vmstate_size, VMSTATE_CHUNK):
            yield file.pread(pos, min(VMSTATE_CHUNK, entry.vmstate_size - pos))
    finally:
        file.close()


def vmstate_problem(storage: Storage, path: str, entry: SnapshotEntry, context: ImageContext) -> str | None:
    """T3: why the VM-state file is not the one recorded (missing, not a regular file, size, CRC32C), or None.

    Only the file's data extents are read (`sparse_crc32c`).
    """
    if not storage.exists(path):
        return "is missing"
    try:
        file = open_tree_file(storage, path, False, context)
    except LaminaError as exc:
        return f"cannot be read ({exc})"
    try:
        size = file.size()
        if size != entry.vmstate_size:
            return f"is {size} bytes, {entry.vmstate_size} recorded"
        crc = sparse_crc32c(file)
    finally:
        file.close()
    return None if crc == entry.vmstate_crc else "does not match its recorded CRC32C"


def layer_files(top_path: str, storage: Storage, allowed: tuple[str, ...] = ()) -> tuple[list[str], list[Finding]]:
    """The Lamina files of the tree (top first), and the findings T1-T3 met while walking it.

    Given a frozen layer rather than a top, the tree is that layer and its
    chain: the table it kept from when it was frozen is history, not snapshots.
    """
    from .check import CORRUPTION, Finding

    context = ImageContext.for_layer(top_path, allowed)
    findings: list[Finding] = []
    files: list[str] = []
    top = root_of(storage, top_path, context)
    starts = [(top_path, top)]
    for entry in top.snapshots if _is_top(top_path) else ():
        path = os.path.join(context.layer_dir, layer_file_name(entry.layer_uuid))
        where = f"snapshot {entry.text_name!r}"
        if not storage.exists(path):
            findings.append(Finding(CORRUPTION, "snapshot-layer", f"{where}: layer file {path} is missing"))
            continue
        try:
            layer = root_of(storage, path, context)  # F-OPEN-003: the layer of the entry's uuid
        except LaminaError as exc:
            findings.append(Finding(CORRUPTION, "snapshot-layer", f"{where}: {exc}"))
            continue
        starts.append((path, layer))
        if entry.vmstate_size:
            vm = os.path.join(context.layer_dir, vmstate_file_name(entry.layer_uuid))
            problem = vmstate_problem(storage, vm, entry, context)
            if problem:
                findings.append(Finding(CORRUPTION, "vmstate", f"{where}: VM state {vm} {problem}"))
    seen: set[str] = set()
    for path, root in starts:
        walk = ChainWalk()
        layer_context = context
        while True:
            real = os.path.realpath(path)
            try:
                walk.visit(real, path, storage)
            except LaminaError as exc:
                findings.append(Finding(CORRUPTION, "base-reference", str(exc)))
                break
            if real in seen:
                break
            seen.add(real)
            files.append(path)
            try:
                found = resolve_base(root, layer_context, path, storage)
                if found is None:
                    break
                if root.base_kind == BASE_RAW:
                    check_identity(root, None, _file_size(storage, found.path, found.context), path)
                    break
                base_root = root_of(storage, found.path, found.context)
                check_identity(_committing_view(root, base_root, path, findings), base_root, base_root.virtual_size, path)
            except LaminaError as exc:
                findings.append(Finding(CORRUPTION, "base-reference", str(exc)))
                break
            if root.base_kind != BASE_LAMINA:
                break
            path, root, layer_context = found.path, base_root, found.context
    return files, findings


def _committing_view(root: Root, base_root: Root, path: str, findings: list[Finding]) -> Root:
    """The root as its identity check must see it: a commit in progress moves its base's data generation on."""
    from .check import PENDING, Finding

    if not root.flags & FLAG_COMMITTING or base_root.data_generation == root.base_data_generation:
        return root
    findings.append(Finding(PENDING, "base-reference", f"{path}: a commit into its base {root.base_path!r} is in progress; "
                            "a writable open finishes it"))
    return attrs.evolve(root, base_data_generation=base_root.data_generation)


def referenced_names(top_path: str, storage: Storage, files: list[str]) -> set[str]:
    """File names in the layer directory that the tree reaches (T4)."""
    top = root_of(storage, top_path)
    layer_dir = ImageContext.for_top(top_path).layer_dir
    names = {os.path.basename(f) for f in files if os.path.dirname(os.path.abspath(f)) == layer_dir}  # this image's own
    names |= {vmstate_file_name(e.layer_uuid) for e in top.snapshots if e.vmstate_size}
    twin = twin_of(top_path, top)
    if is_twin(storage, top_path, twin):  # F-TREE-003: the top's own second name
        names.add(os.path.basename(twin))
    return names


def orphans(storage: Storage, context: ImageContext, keep: set[str]) -> tuple[list[str], list[str]]:
    """Names beside the top and in its layer directory that the top does not reach (T4): (removable, foreign).

    F-TREE-002: removable are regular files (not symbolic links) named as the
    format names its files, `<top>.creating` or in a layer directory that is a
    real directory; a writable open and `check --repair` remove those and only
    those.  Everything else is foreign: reported, never removed.
    """
    removable: list[str] = []
    foreign: list[str] = []
    creating = f"{context.top_path}.creating"
    if storage.exists(creating):
        (removable if storage.stat(creating).is_file else foreign).append(creating)
    if not storage.exists(context.layer_dir):
        return removable, foreign
    if not storage.stat(context.layer_dir).is_dir:
        return removable, foreign + [context.layer_dir]
    for name in storage.listdir(context.layer_dir):
        if name not in keep:
            path = os.path.join(context.layer_dir, name)
            (removable if LAYER_DIR_ENTRY.match(name) and storage.stat(path).is_file else foreign).append(path)
    return removable, foreign


def _is_own_layer(storage: Storage, path: str, context: ImageContext) -> bool:
    """An orphan an interrupted operation can leave: any name the format gives, except a `<uuid>.lam` that is not
    a readable layer of that uuid (every operation links or renames a whole, durable layer under that name)."""
    if not LAYER_NAME.match(os.path.basename(path)):
        return True
    try:
        root_of(storage, path, context, table=False)
        return True
    except LaminaError:
        return False


def _is_top(path: str) -> bool:
    return image_of(path) == os.path.abspath(path)


def _read_lock(file: File, force_share: bool) -> File:
    """A shared lock on a file `check` reads, as every reader takes one (F-LOCK-001), unless `force_share`
    (F-LOCK-003).  A file whose lock cannot be taken (a writer holds it: this process's own, under `check
    --repair`) is read all the same, but never through a mapping (`OsFile.view` says why)."""
    if not force_share:
        try:
            file.lock(False)
        except LaminaError:
            pass
        except BaseException:
            file.close()
            raise
    return file


def check_tree(top_path: str, storage: Storage, allowed: tuple[str, ...] = (),
               progress: Callable[[float], None] | None = None, lock: bool = False,
               force_share: bool = False) -> CheckReport:
    """Check every layer of an image and the references between them; one report for the tree.

    `progress`, if given, is told the fraction of the layer files checked so far.  Every file read (each
    layer, each shared store) is shared-locked while it is checked, as any reader's (F-LOCK-001): with
    `lock`, a file a writer holds (a merge, a `dedup`) raises ImageLocked rather than being judged
    mid-update; without it such a file is read all the same, never through a mapping (`_read_lock`);
    with `force_share` nothing is locked (F-LOCK-003).
    """
    from .check import CORRUPTION, LEAK, PENDING, CheckReport, Finding, check_image

    context = ImageContext.for_layer(top_path, allowed)

    def opened(path: str, own: ImageContext) -> File:
        file = open_tree_file(storage, path, False, own)
        if not lock:
            return _read_lock(file, force_share)
        try:
            file.lock(exclusive=False)
        except BaseException:
            file.close()
            raise
        return file

    try:
        files, findings = layer_files(top_path, storage, allowed)
    except FormatError as exc:
        file = opened(top_path, context)
        try:
            report = check_image(file)
        finally:
            file.close()
        if report.completed:
            report = attrs.evolve(report, findings=report.findings + (Finding(CORRUPTION, "tree", str(exc)),))
        return report
    from .store import open_store, store_path, uses_store

    regions = clusters = 0
    completed = True
    root = None
    stores: list[str] = []
    def store_of(root: Root, path: str, own: ImageContext) -> StoreView:
        view = open_store(root, own, storage, path)
        if not lock:
            _read_lock(view.file, force_share)
            return view
        try:
            view.file.lock(exclusive=False)
        except BaseException:
            view.close()
            raise
        return view

    for index, path in enumerate(files):
        file = opened(path, context)
        own = ImageContext.for_layer(path, allowed)
        try:
            report = check_image(file, (lambda f, i=index: progress((i + f) / len(files))) if progress else None,
                                 lambda r, p=path, c=own: store_of(r, p, c))
        finally:
            file.close()
        if report.root is not None and uses_store(report.root) and store_path(own) not in stores \
                and storage.exists(store_path(own)):
            stores.append(store_path(own))
        root = root or report.root
        findings += _prefixed(report, os.path.basename(path)) if path != top_path else list(report.findings)
        regions, clusters = regions + report.regions_checked, clusters + report.clusters_checked
        completed = completed and report.completed
    for path in stores:  # F-SHARE-004: the store is checked like any layer, once
        try:
            file = opened(path, ImageContext.for_layer(path, allowed))
        except ImageLocked:
            raise
        except (OSError, LaminaError) as exc:
            findings.append(Finding(CORRUPTION, "shared-reference", f"the shared store {path} cannot be opened: {exc}"))
            continue
        try:
            report = check_image(file)
        finally:
            file.close()
        findings += _prefixed(report, os.path.basename(path))
        regions, clusters = regions + report.regions_checked, clusters + report.clusters_checked
        if not report.completed:
            findings.append(Finding(CORRUPTION, "shared-reference", f"the shared store {path} has no usable root"))
    if _is_top(top_path):
        keep = referenced_names(top_path, storage, files) if storage.exists(context.layer_dir) else set()
        removable, foreign = orphans(storage, context, keep)
    else:
        removable, foreign = [], []  # a frozen layer checked by itself: its image's directory is the top's to judge
    for path in removable:
        if path != f"{context.top_path}.creating" and not _is_own_layer(storage, path, context):
            findings.append(Finding(LEAK, "orphan-file", f"{path} is named as a layer but is not that layer (no crash of "
                                    "the protocol leaves one); a writable open removes it", ("unlink", path)))
            continue
        what = ("a new top that a crash kept from its rename" if path == f"{context.top_path}.creating"
                else "not part of the image (an interrupted operation left it)")
        findings.append(Finding(PENDING, "orphan-file", f"{path} is {what}; a writable open removes it", ("unlink", path)))
    for path in foreign:
        findings.append(Finding(LEAK, "foreign-file", f"{path} is a foreign file: not one the format puts there (a "
                                "symbolic link, FIFO, directory or another name); never removed automatically"))
    return CheckReport(tuple(findings), root, regions, clusters, completed)


def repair_tree(top_path: str, storage: Storage, allowed: tuple[str, ...] = ()) -> tuple[CheckReport, CheckReport]:
    """Repair every layer file, then remove orphans; references and VM state cannot be repaired."""
    from .repair import repair_image
    from .store import open_store

    before = check_tree(top_path, storage, allowed)
    try:
        files, _ = layer_files(top_path, storage, allowed)
    except FormatError:
        files = [top_path]
    for path in files:
        file = open_tree_file(storage, path, True, ImageContext.for_top(top_path, allowed))
        try:
            repair_image(file, lambda r, p=path: open_store(r, ImageContext.for_layer(p, allowed), storage, p))
        finally:
            file.close()
    for finding in check_tree(top_path, storage, allowed).findings:
        if finding.repair and finding.repair[0] == "unlink":
            storage.unlink(finding.repair[1])
    return before, check_tree(top_path, storage, allowed)
