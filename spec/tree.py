"""`check` over a whole tree of layers: every layer file, every reference, every snapshot's VM state.

Invariants beyond those of one file (I1-I7):

- T1 every base reference may be followed (references.py) and leads to a
  file whose identity (uuid, data generation, size) is the one recorded;
- T2 every snapshot's layer file exists in the layer directory and is a
  valid layer whose uuid is the entry's;
- T3 every snapshot's VM-state file has the size and CRC32C recorded;
- T4 every file in the layer directory is reached from the top (a snapshot,
  its VM state, or a member of a chain), and no `<top>.creating` is left
  beside the top; anything else is leaked space.
"""
from __future__ import annotations

import os
from typing import Iterator

import attrs
import crc32c

from .check import CORRUPTION, LEAK, CheckReport, Finding, check_image
from .errors import FormatError, LaminaError
from .protocol import read_root_copies
from .references import (ChainWalk, ImageContext, check_identity, image_of, layer_file_name, resolve_base,
                         vmstate_file_name)
from .repair import repair_image
from .replication import select_root
from .storage import Storage
from .structures import BASE_LAMINA, BASE_RAW, Root, SnapshotEntry


def root_of(storage: Storage, path: str, table: bool = True) -> Root:
    """The current root of a layer file (raises a FormatError when neither copy is usable); `table`: see `decode_root`."""
    file = storage.open(path, writable=False)
    try:
        root = select_root(read_root_copies(file), table).value
        assert root is not None
        return root
    finally:
        file.close()


def _file_size(storage: Storage, path: str) -> int:
    file = storage.open(path, writable=False)
    try:
        return file.size()
    finally:
        file.close()


def _prefixed(report: CheckReport, label: str) -> list[Finding]:
    return [attrs.evolve(f, message=f"{label}: {f.message}") for f in report.findings]


VMSTATE_CHUNK = 1 << 20


def read_vmstate_chunks(storage: Storage, path: str, entry: SnapshotEntry) -> Iterator[bytes]:
    """The VM state in chunks, so that a recorded size of any value costs bounded memory."""
    file = storage.open(path, writable=False)
    try:
        for pos in range(0, entry.vmstate_size, VMSTATE_CHUNK):
            yield file.pread(pos, min(VMSTATE_CHUNK, entry.vmstate_size - pos))
    finally:
        file.close()


def vmstate_matches(storage: Storage, path: str, entry: SnapshotEntry) -> bool:
    """T3: the file exists, has the recorded size, and the recorded CRC32C."""
    if not storage.exists(path):
        return False
    file = storage.open(path, writable=False)
    try:
        if file.size() != entry.vmstate_size:
            return False
    finally:
        file.close()
    crc = 0
    for chunk in read_vmstate_chunks(storage, path, entry):
        crc = crc32c.crc32c(chunk, crc)
    return crc == entry.vmstate_crc


def layer_files(top_path: str, storage: Storage, allowed: tuple[str, ...] = ()) -> tuple[list[str], list[Finding]]:
    """The Lamina files of the tree (top first), and the findings T1-T3 met while walking it.

    Given a frozen layer rather than a top, the tree is that layer and its
    chain: the table it kept from when it was frozen is history, not snapshots.
    """
    context = ImageContext.for_layer(top_path, allowed)
    findings: list[Finding] = []
    files: list[str] = []
    top = root_of(storage, top_path)
    starts = [(top_path, top)]
    for entry in top.snapshots if _is_top(top_path) else ():
        path = os.path.join(context.layer_dir, layer_file_name(entry.layer_uuid))
        where = f"snapshot {entry.text_name!r}"
        if not storage.exists(path):
            findings.append(Finding(CORRUPTION, "snapshot-layer", f"{where}: layer file {path} is missing"))
            continue
        try:
            layer = root_of(storage, path)
        except LaminaError as exc:
            findings.append(Finding(CORRUPTION, "snapshot-layer", f"{where}: {exc}"))
            continue
        if layer.image_uuid != entry.layer_uuid:
            findings.append(Finding(CORRUPTION, "snapshot-layer", f"{where}: {path} holds another layer"))
        starts.append((path, layer))
        if entry.vmstate_size:
            vm = os.path.join(context.layer_dir, vmstate_file_name(entry.layer_uuid))
            if not vmstate_matches(storage, vm, entry):
                findings.append(Finding(CORRUPTION, "vmstate", f"{where}: VM state {vm} is missing or does not match its CRC32C"))
    seen: set[str] = set()
    for path, root in starts:
        walk = ChainWalk()
        layer_context = context
        while True:
            real = os.path.realpath(path)
            try:
                walk.visit(real, path)
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
                    check_identity(root, None, _file_size(storage, found.path), path)
                    break
                base_root = root_of(storage, found.path)
                check_identity(root, base_root, base_root.virtual_size, path)
            except LaminaError as exc:
                findings.append(Finding(CORRUPTION, "base-reference", str(exc)))
                break
            if root.base_kind != BASE_LAMINA:
                break
            path, root, layer_context = found.path, base_root, found.context
    return files, findings


def referenced_names(top_path: str, storage: Storage, files: list[str]) -> set[str]:
    """File names in the layer directory that the tree reaches (T4)."""
    top = root_of(storage, top_path)
    layer_dir = ImageContext.for_top(top_path).layer_dir
    names = {os.path.basename(f) for f in files if os.path.dirname(os.path.abspath(f)) == layer_dir}  # this image's own
    names |= {vmstate_file_name(e.layer_uuid) for e in top.snapshots if e.vmstate_size}
    return names


def _is_top(path: str) -> bool:
    return image_of(path) == os.path.abspath(path)


def check_tree(top_path: str, storage: Storage, allowed: tuple[str, ...] = ()) -> CheckReport:
    """Check every layer of an image and the references between them; one report for the tree."""
    context = ImageContext.for_layer(top_path, allowed)
    try:
        files, findings = layer_files(top_path, storage, allowed)
    except (FormatError, AssertionError) as exc:
        file = storage.open(top_path, writable=False)
        try:
            report = check_image(file)
        finally:
            file.close()
        if report.completed:
            report = attrs.evolve(report, findings=report.findings + (Finding(CORRUPTION, "tree", str(exc)),))
        return report
    regions = clusters = 0
    completed = True
    root = None
    for path in files:
        file = storage.open(path, writable=False)
        try:
            report = check_image(file)
        finally:
            file.close()
        root = root or report.root
        findings += _prefixed(report, os.path.basename(path)) if path != top_path else list(report.findings)
        regions, clusters = regions + report.regions_checked, clusters + report.clusters_checked
        completed = completed and report.completed
    if storage.exists(f"{top_path}.creating"):
        findings.append(Finding(LEAK, "orphan-file", f"{top_path}.creating is a new top that a crash kept from its rename; "
                                "a writable open removes it", ("unlink", f"{top_path}.creating")))
    if _is_top(top_path) and storage.exists(context.layer_dir):
        keep = referenced_names(top_path, storage, files)
        for name in storage.listdir(context.layer_dir):
            if name not in keep:
                path = os.path.join(context.layer_dir, name)
                findings.append(Finding(LEAK, "orphan-file", f"{path} is not part of the image (an interrupted operation left it; a writable open removes it)",
                                        ("unlink", path)))
    return CheckReport(tuple(findings), root, regions, clusters, completed)


def repair_tree(top_path: str, storage: Storage, allowed: tuple[str, ...] = ()) -> tuple[CheckReport, CheckReport]:
    """Repair every layer file, then remove orphans; references and VM state cannot be repaired."""
    before = check_tree(top_path, storage, allowed)
    try:
        files, _ = layer_files(top_path, storage, allowed)
    except (FormatError, AssertionError):
        files = [top_path]
    for path in files:
        file = storage.open(path, writable=True)
        try:
            repair_image(file)
        finally:
            file.close()
    for finding in check_tree(top_path, storage, allowed).findings:
        if finding.repair and finding.repair[0] == "unlink":
            storage.unlink(finding.repair[1])
    return before, check_tree(top_path, storage, allowed)
