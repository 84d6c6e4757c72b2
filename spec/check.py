"""`check`: the spec applied to the bytes of an image (S3).

It reads an image only through the storage interface and judges it by the
format's rules alone, so it works on images written by any implementation.

Invariants of a well-formed image at rest:

- I1 both root copies verify and carry the same version;
- I2 the file is exactly `Geometry.file_length` bytes long;
- I3 every region holding any byte has two valid map copies of one version,
  or none valid and one all zero: never written, so its bytes are leaks
  (F-CHECK-003);
- I4 no sector at or past the virtual size is present;
- I5 every cluster with a present sector matches its recorded CRC32C, and a
  cluster with none records 0;
- I6 every byte that no present sector or used map length accounts for is
  zero (otherwise it is leaked space);
- I7 the intent list is empty (after a crash it is not, and the regions it
  lists are pending until recovery reconciles them, exempt from I3-I6 as
  F-CHECK-002 says: not from an unreadable map or map-cluster padding);
- I8 the root is marked committing only when it has a base to commit into that is not a snapshot.

Every finding has a class (R12), so that `check` right after a crash, before
anything repairs the image, tells what the protocol leaves by design from
what no crash can produce.  With two copies of each structure, a crash
window and rot look the same when one copy is bad and its twin current:
that is `DEGRADED` (redundancy lost, committed data intact), never
`CORRUPTION`.  `FINDING_KINDS` names every finding `check` can report with
its class (a test reads every `Finding(...)` in `spec/` against it), so the
table in the format document is the whole truth.
"""
from __future__ import annotations

import bisect
from typing import Callable

import attrs

from .errors import FormatError
from .layout import CLUSTERS_PER_REGION, MAX_COUNTER, ROOT_AREA_SIZE, ROOT_SLOT_SIZE, SECTOR_SIZE, Geometry, allocated_regions, overlaps, root_copy_offset
from .crc import crc32c
from .protocol import cluster_crc, read_map_copies, read_root_copies
from .regionmap import RegionMap, absent_runs, zero_absent
from .replication import select_map, select_root
from .storage import File
from .references import LAYER_NAME
from .structures import BASE_NONE, FLAG_COMMITTING, Root, encode_root
from .store import SharedReferenceError, StoreView, uses_store
from .zeros import is_zero

CORRUPTION = "corruption"
DEGRADED = "degraded"
LEAK = "leak"
PENDING = "pending"

# class -> (the exit code it gives `check` on its own, what it means)
FINDING_CLASSES: dict[str, tuple[int, str]] = {
    CORRUPTION: (2, "a state no crash of the protocol can produce: committed data is at risk, "
                    "or no valid copy of a structure is left"),
    DEGRADED: (3, "one copy of a replicated structure is invalid or stale while its twin is current: "
                  "committed data is intact but redundancy is lost (a crash window or rot; with two copies "
                  "they look the same); repair is recommended"),
    LEAK: (3, "space that holds bytes no structure accounts for; no harm to data, repair reclaims it"),
    PENDING: (0, "work an interrupted operation left by design (intents, orphans, a `.creating`); "
                 "a writable open finishes or removes it; reported as a note"),
}

# (kind, class, when): every finding `check` and the tree check report.
FINDING_KINDS: tuple[tuple[str, str, str], ...] = (
    ("root-unrecoverable", CORRUPTION, "neither root copy is usable (exit 1: the check cannot go on)"),
    ("root-copy", DEGRADED, "one root copy is invalid, zeroed or stale; the other is current"),
    ("commit-flag", CORRUPTION, "the root is marked committing but has no base, or its base is a snapshot (I8)"),
    ("counter-exhausted", CORRUPTION, "a counter of the root or of a map is at `MAX_COUNTER`: no writer may move it on, "
                                      "so the image cannot be written again; no real use gets there (F-ROOT-008)"),
    ("file-length", LEAK, "the file is longer than the root says (a shrink between its root write and the cut)"),
    ("file-length", CORRUPTION, "the file is shorter than the root says"),
    ("intents", PENDING, "the intent list names regions (an unclean shutdown)"),
    ("leaked-bytes", LEAK, "non-zero bytes where nothing is accounted for (root slot tails, map padding, "
                           "absent sectors of a region not in the intent list)"),
    ("map-unrecoverable", CORRUPTION, "neither map copy of a region that holds bytes is valid"),
    ("map-copy", PENDING, "a map copy is invalid or stale in a region in the intent list (being written)"),
    ("map-copy", DEGRADED, "a map copy is invalid or stale in a region not in the intent list; the other is current"),
    ("map-invariant", PENDING, "a map of a region in the intent list marks sectors past the virtual size (a shrink)"),
    ("map-invariant", CORRUPTION, "a map of a region not in the intent list marks sectors past the virtual size"),
    ("unflushed-bytes", PENDING, "absent sectors of a region in the intent list hold bytes (an unflushed write)"),
    ("data-checksum", CORRUPTION, "a data cluster of a region not in the intent list fails its CRC32C"),
    ("shared-reference", CORRUPTION, "a reference into the shared store cannot be followed: no store, another "
                                     "store, a cluster past its end or free (F-SHARE-004)"),
    ("snapshot-layer", CORRUPTION, "a snapshot's layer file is missing, invalid or another layer (T2)"),
    ("vmstate", CORRUPTION, "a snapshot's VM state is missing or fails its size or CRC32C (T3)"),
    ("base-reference", PENDING, "a layer marked committing finds its base written by that commit (T1)"),
    ("base-reference", CORRUPTION, "a base reference may not be followed, loops, or finds another identity (T1)"),
    ("tree", CORRUPTION, "the top's root is unusable, so the tree cannot be walked"),
    ("orphan-file", PENDING, "a file of the layer directory that the top does not reach, or a `<top>.creating` (T4)"),
    ("orphan-file", LEAK, "an unreached `<uuid>.lam` that is not a readable layer of that uuid: no crash leaves one (T4)"),
    ("foreign-file", LEAK, "a file in the layer directory that the format never puts there (a symbolic link, FIFO, "
                           "directory or another name): reported, never removed (F-TREE-002)"),
)


@attrs.frozen
class Finding:
    """One thing `check` found: how bad, what, where, and how `--repair` mends it (None: it cannot)."""

    severity: str  # CORRUPTION, DEGRADED, LEAK or PENDING
    kind: str  # one of FINDING_KINDS
    message: str
    repair: tuple | None = None  # ("root-copy", slot) | ("map-copy", region, slot) | ("punch", off, len) | ("truncate", len) | ("recover",) | ("clear-commit-flag",)
    guest_range: tuple[int, int] | None = None  # (offset, length)

    def to_json(self) -> dict:
        out = {"severity": self.severity, "kind": self.kind, "message": self.message,
               "repairable": self.repair is not None}
        if self.guest_range:
            out["guest_offset"], out["guest_length"] = self.guest_range
        return out


@attrs.frozen
class CheckReport:
    findings: tuple[Finding, ...]
    root: Root | None
    regions_checked: int = 0
    clusters_checked: int = 0
    completed: bool = True

    @property
    def corruptions(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == CORRUPTION]

    @property
    def leaks(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == LEAK]

    @property
    def degraded(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == DEGRADED]

    @property
    def pending(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == PENDING]

    @property
    def exit_code(self) -> int:
        """As `qemu-img check`: 0 clean (pending notes allowed), 1 not completed, 2 corruption, 3 degraded or leaks."""
        if not self.completed:
            return 1
        codes = {FINDING_CLASSES[f.severity][0] for f in self.findings}
        return next((code for code in (2, 3) if code in codes), 0)

    def to_json(self) -> dict:
        return {
            "completed": self.completed,
            "corruptions": len(self.corruptions),
            "leaks": len(self.leaks),
            "degraded": len(self.degraded),
            "pending_recovery": len(self.pending),
            "regions_checked": self.regions_checked,
            "clusters_checked": self.clusters_checked,
            "findings": [f.to_json() for f in self.findings],
            "exit_code": self.exit_code,
        }


def _check_root_padding(file: File, root: Root, extents: list[tuple[int, int]], findings: list[Finding]) -> None:
    """I6 for the root area: past each copy's used length, and up to the first region, all is zero."""
    used = len(encode_root(root))
    gaps = [(root_copy_offset(0) + used, ROOT_SLOT_SIZE - used), (root_copy_offset(1) + used, ROOT_SLOT_SIZE - used),
            (ROOT_AREA_SIZE, root.geometry.first_region_offset - ROOT_AREA_SIZE)]
    for lo, length in gaps:
        if length > 0 and overlaps(extents, lo, length):
            # Only the allocated parts can hold bytes: holes read zero (a layer file is mostly holes).
            parts = [(max(lo, o), min(lo + length, o + n)) for o, n in extents if o < lo + length and o + n > lo]
            if not all(is_zero(file.pread(a, b - a)) for a, b in parts):
                findings.append(Finding(LEAK, "leaked-bytes", f"non-zero bytes in the root area at file offset {lo}",
                                        ("punch", lo, length)))


def check_root(file: File, findings: list[Finding]) -> Root:
    """I1: the current root; a differing twin is lost redundancy, repaired from the current copy."""
    selection = select_root(read_root_copies(file))
    for p in selection.problems:
        findings.append(Finding(DEGRADED, "root-copy", p.message, ("root-copy", p.slot)))
    root = selection.current()
    if root.flags & FLAG_COMMITTING and (root.base_kind == BASE_NONE or LAYER_NAME.match(root.base_path)):
        what = "the image has no base" if root.base_kind == BASE_NONE else "its base is a snapshot, which never changes"
        findings.append(Finding(CORRUPTION, "commit-flag", "the root is marked committing (a commit into the base "
                                f"in progress) but {what}; repair clears the mark", ("clear-commit-flag",)))
    exhausted = [name for name in ("generation", "data_generation", "next_snapshot_id") if getattr(root, name) >= MAX_COUNTER]
    if exhausted:
        findings.append(Finding(CORRUPTION, "counter-exhausted", f"the root's {' and '.join(exhausted)} is at MAX_COUNTER: "
                                "no writer may move it on, so the image cannot be written again"))
    return root


# Bytes a walk over a region's data reads with one pread: runs of clusters it must judge, not one read per cluster.
READ_CHUNK = 1 << 20  # (= 1 MiB: the bytes are still in the cache when their checksum reads them)
# Bytes a walk reads through one window where the file offers windows (`Viewable`): runs of READ_CHUNK
# judged in turn, one mapping for several (a mapping costs system calls a read does not).
VIEW_CHUNK = 8 << 20  # (= 8 MiB)


def _allocated_nonzero(file: File, extents: list[tuple[int, int]], lo: int, length: int) -> bool:
    """Whether [lo, lo+length) holds a non-zero byte: only its allocated parts are read (holes read zero)."""
    hi = lo + length
    i = max(0, bisect.bisect_right(extents, (lo,)) - 1)
    for offset, n in extents[i:]:
        if offset >= hi:
            break
        a, b = max(lo, offset), min(hi, offset + n)
        if b > a and not is_zero(file.pread(a, b - a)):
            return True
    return False


def _runs(clusters: list[int], longest: int) -> list[tuple[int, int]]:
    """[first, end) of each run of consecutive values of an ascending list, cut to at most `longest` values."""
    runs: list[tuple[int, int]] = []
    for c in clusters:
        if runs and runs[-1][1] == c and c - runs[-1][0] < longest:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


def check_region(file: File, geometry: Geometry, root: Root, region: int, extents: list[tuple[int, int]],
                 findings: list[Finding], store: "StoreView | SharedReferenceError | None" = None,
                 buffer: memoryview | None = None) -> int:
    """I3-I6 for one region; returns the number of data clusters verified.

    A shared cluster (F-SHARE-004) is judged by the store's bytes (I5), and its local place must be a hole (I6):
    one cluster at a time in no order, by `pread` (a window per cluster would cost more than the read).
    The region's own data is read through windows (`Viewable.view`) where the backend offers them, with
    no copy; else into `buffer` (`read_buffer`) when the backend can read into one; else each read is a
    new object.  The three give the same bytes and so the same findings (tests/test_fast_paths.py)."""
    pending = region in root.intents
    span = (region * geometry.region_span, min(geometry.region_span, geometry.virtual_size - region * geometry.region_span))
    try:
        chosen = select_map(read_map_copies(file, geometry, region), geometry, region, root.image_uuid)
    except FormatError as exc:
        findings.append(Finding(CORRUPTION, "map-unrecoverable", str(exc), None, span))
        return 0
    for p in chosen.problems:
        findings.append(Finding(PENDING if pending else DEGRADED, "map-copy", p.message, None if pending else ("map-copy", region, p.slot)))
    if chosen.value is not None and chosen.value.generation >= MAX_COUNTER:
        findings.append(Finding(CORRUPTION, "counter-exhausted", f"region {region}'s map generation is at MAX_COUNTER: "
                                "no commit may move it on, so the region cannot be written again", None, span))
    m = RegionMap.from_copy(chosen.value, geometry, region, chosen.slot)
    size, spc, virtual_size = geometry.cluster_size, geometry.sectors_per_cluster, geometry.virtual_size
    for slot in (0, 1):
        pad = geometry.map_copy_offset(region, slot) + geometry.map_read_length
        tail = size - geometry.map_read_length
        if _allocated_nonzero(file, extents, pad, tail):
            findings.append(Finding(LEAK, "leaked-bytes", f"non-zero bytes after map copy {'AB'[slot]} of region {region} at file offset {pad}",
                                    ("punch", pad, tail)))
    # Plain integers for the loop: cluster c of the region lies at data_offset + c * size (identity mapping).
    full = (1 << spc) - 1
    first_cluster = region * CLUSTERS_PER_REGION
    data_offset = geometry.region_data_offset(region)
    width = spc // 8  # bytes of one cluster's presence mask
    present, crcs = bytes(m.present), m.data_crcs
    all_present = b"\xff" * width
    # Clusters wholly inside the virtual size: their masks need no clipping.
    inside_clusters = max(0, min(CLUSTERS_PER_REGION, (virtual_size - first_cluster * size) // size))
    verified = 0
    longest = max(1, READ_CHUNK // size)
    # A backend that can read into a buffer (`pread_into`, the OS one) fills one for the whole walk.  Only
    # its own class's method counts: a wrapper that forwards what it does not define (one that paces or
    # counts reads) would otherwise be passed by.
    read_into = file.pread_into if hasattr(type(file), "pread_into") else None  # type: ignore[attr-defined]
    viewer = file.view if hasattr(type(file), "view") else None  # type: ignore[attr-defined]
    if read_into is None:
        buffer = None
    elif buffer is None or len(buffer) < longest * size:
        buffer = read_buffer(geometry)
    visit = m.clusters_to_visit(extents, data_offset, size)
    if any(m.shared):  # shared clusters are judged by the store's bytes, one by one
        local = []
        for c in visit:
            if m.shared[c]:
                verified += _check_shared(file, geometry, m, region, c, extents, findings, store, pending)
            else:
                local.append(c)
        visit = local

    def judge(a: int, b: int, view: memoryview) -> int:
        """I5 and I6 for clusters [a, b) of the region, whose bytes are `view`; the clusters verified."""
        judged = 0
        if not pending and b <= inside_clusters and present[a * width : b * width] == all_present * (b - a):
            # Every sector of the run present (a written run): no absent bytes to judge, the checksums alone.
            got = [crc32c(view[i : i + size]) for i in range(0, (b - a) * size, size)]
            judged = b - a
            if got != crcs[a:b].tolist():
                for c in range(a, b):
                    if got[c - a] != crcs[c]:
                        findings.append(_checksum_finding(geometry, first_cluster + c, data_offset + c * size))
            return judged
        for c in range(a, b):
            cluster = first_cluster + c
            guest = cluster * size
            offset = data_offset + c * size
            inside = max(0, min(spc, (virtual_size - guest) // SECTOR_SIZE))
            mask = int.from_bytes(present[c * width : (c + 1) * width], "little")
            if mask >> inside:
                findings.append(Finding(PENDING if pending else CORRUPTION, "map-invariant",
                                        f"region {region}'s map marks sectors of cluster {cluster} at or past the virtual size as present"
                                        + ("; recovery drops them" if pending else "")))
                mask &= (1 << inside) - 1
            if not mask and not crcs[c] and not overlaps(extents, offset, size):
                continue
            cdata = view[(c - a) * size : (c - a + 1) * size]
            if not mask and not crcs[c] and is_zero(cdata):
                continue
            if mask == full:  # every sector present: no absent bytes to judge, nothing to zero
                leaked = []
            else:
                leaked = [(s, n) for s, n in absent_runs(mask, spc) if not is_zero(cdata[s * SECTOR_SIZE : (s + n) * SECTOR_SIZE])]
            if pending:
                if leaked:
                    findings.append(Finding(PENDING, "unflushed-bytes", f"cluster {cluster} holds bytes of an unflushed write; recovery punches them"))
                continue
            for s, n in leaked:
                findings.append(Finding(LEAK, "leaked-bytes",
                                        f"non-zero bytes in absent sectors of cluster {cluster} (guest offset {guest + s * SECTOR_SIZE}, {n * SECTOR_SIZE} bytes, file offset {offset + s * SECTOR_SIZE})",
                                        ("punch", offset + s * SECTOR_SIZE, n * SECTOR_SIZE), (guest + s * SECTOR_SIZE, n * SECTOR_SIZE)))
            expected = crc32c(cdata) if mask == full else cluster_crc(zero_absent(bytes(cdata), mask, spc), mask)
            judged += 1
            if expected != crcs[c]:
                findings.append(_checksum_finding(geometry, cluster, offset))
        return judged

    # The clusters not visited are absent, checksum 0 and a hole.  The others are read a run at a time: by a
    # window onto the file where it offers one (`Viewable`: no copy, several runs at once), else by a read.
    windows = longest * max(1, VIEW_CHUNK // (longest * size)) if viewer is not None else longest
    for wa, wb in _runs(visit, windows):
        window = viewer(data_offset + wa * size, (wb - wa) * size) if viewer is not None else None
        if window is not None:
            with window as mapped:
                if len(mapped) == (wb - wa) * size:
                    for a in range(wa, wb, longest):
                        b = min(wb, a + longest)
                        verified += judge(a, b, mapped[(a - wa) * size : (b - wa) * size])  # a slice gone with the call
                    continue
            # The file ends inside the window (a short file, I2): read as below, zeros past its end.
        for a in range(wa, wb, longest):
            b = min(wb, a + longest)
            if buffer is not None:
                view = buffer[: (b - a) * size]
                got = read_into(data_offset + a * size, view)
                if got < len(view):
                    view[got:] = bytes(len(view) - got)  # past the end of the file: read as zero
            else:
                data = file.pread(data_offset + a * size, (b - a) * size)
                view = memoryview(data.ljust((b - a) * size, b"\0"))
            verified += judge(a, b, view)
    return verified


def _check_shared(file: File, geometry: Geometry, m: RegionMap, region: int, c: int, extents: list[tuple[int, int]],
                  findings: list[Finding], store: "StoreView | SharedReferenceError | None", pending: bool) -> int:
    """I5 and I6 of shared cluster `c` (F-SHARE-004): its bytes are the store's, its local place a hole."""
    size, spc, virtual_size = geometry.cluster_size, geometry.sectors_per_cluster, geometry.virtual_size
    cluster = region * CLUSTERS_PER_REGION + c
    guest = cluster * size
    offset = geometry.region_data_offset(region) + c * size
    inside = max(0, min(spc, (virtual_size - guest) // SECTOR_SIZE))
    mask = m.cluster_mask(c)
    if mask >> inside:
        findings.append(Finding(PENDING if pending else CORRUPTION, "map-invariant",
                                f"region {region}'s map marks sectors of cluster {cluster} at or past the virtual size as present"
                                + ("; recovery drops them" if pending else "")))
        mask &= (1 << inside) - 1
    length = min(size, virtual_size - guest) if guest < virtual_size else size
    if overlaps(extents, offset, size) and not is_zero(file.pread(offset, size)):
        findings.append(Finding(PENDING, "unflushed-bytes", f"shared cluster {cluster} still holds its local bytes; "
                                "recovery punches them") if pending else
                        Finding(LEAK, "leaked-bytes", f"non-zero bytes at the local place of shared cluster {cluster} "
                                f"(file offset {offset})", ("punch", offset, size), (guest, length)))
    if not mask:
        if not pending:
            findings.append(Finding(CORRUPTION, "shared-reference", f"cluster {cluster} has no present sector but "
                                    f"references store cluster {m.shared[c] - 1}", None, (guest, length)))
        return 0
    if isinstance(store, SharedReferenceError) or store is None:
        why = str(store) if store is not None else "the layer names no store"
        findings.append(Finding(CORRUPTION, "shared-reference", f"guest range [{guest}, {guest + length}) "
                                f"(cluster {cluster}) is shared, but {why}", None, (guest, length)))
        return 0
    try:
        data = store.cluster(m.shared[c] - 1, f"guest range [{guest}, {guest + length}) (cluster {cluster}): ")
    except FormatError as exc:
        findings.append(Finding(CORRUPTION, "shared-reference", str(exc), None, (guest, length)))
        return 0
    if pending:
        return 0
    if cluster_crc(zero_absent(data, mask, spc), mask) != m.data_crcs[c]:
        findings.append(Finding(CORRUPTION, "data-checksum",
                                f"data of guest range [{guest}, {guest + length}) (cluster {cluster}, shared: "
                                f"store cluster {m.shared[c] - 1} of {store.path}) does not match its CRC32C",
                                None, (guest, length)))
    return 1


def read_buffer(geometry: Geometry) -> memoryview:
    """A buffer for `check_region`'s reads at this geometry's cluster size, to be reused region after region."""
    return memoryview(bytearray(max(1, READ_CHUNK // geometry.cluster_size) * geometry.cluster_size))


def _checksum_finding(geometry: Geometry, cluster: int, offset: int) -> Finding:
    size, virtual_size = geometry.cluster_size, geometry.virtual_size
    guest = cluster * size
    length = min(size, virtual_size - guest) if guest < virtual_size else size
    return Finding(CORRUPTION, "data-checksum",
                   f"data of guest range [{guest}, {guest + length}) (cluster {cluster}, file offset {offset}) does not match its CRC32C",
                   None, (guest, length))


def check_image(file: File, progress: Callable[[float], None] | None = None,
                store: "Callable[[Root], StoreView] | None" = None) -> CheckReport:
    """Judge an image against the invariants I1-I7; never raises for a damaged image.

    `progress`, if given, is told the fraction of regions checked (a progress bar).  `store`, for a layer
    whose root sets `shared-clusters`, opens the store its references lead to (F-SHARE-004).
    """
    findings: list[Finding] = []
    try:
        root = check_root(file, findings)
    except FormatError as exc:
        return CheckReport((Finding(CORRUPTION, "root-unrecoverable", str(exc)),), None, completed=False)
    geometry = root.geometry
    actual = file.size()
    if actual > geometry.file_length:
        findings.append(Finding(LEAK, "file-length", f"file is {actual} bytes, {actual - geometry.file_length} past its end at {geometry.file_length}",
                                ("truncate", geometry.file_length)))
    elif actual < geometry.file_length:
        findings.append(Finding(CORRUPTION, "file-length", f"file is {actual} bytes, shorter than its {geometry.file_length}",
                                ("truncate", geometry.file_length)))
    if root.intents:
        findings.append(Finding(PENDING, "intents", f"{len(root.intents)} regions have unflushed writes from an unclean shutdown; opening the image for writing recovers them",
                                ("recover",)))
    extents = sorted(file.data_extents())
    _check_root_padding(file, root, extents, findings)
    regions = set(allocated_regions(extents, geometry)) | set(root.intents)
    clusters = 0
    view: StoreView | SharedReferenceError | None = None
    if uses_store(root):
        try:
            if store is None:
                raise SharedReferenceError("no store was given to check against")
            view = store(root)
        except (FormatError, OSError) as exc:
            view = SharedReferenceError(str(exc))
    buffer = read_buffer(geometry)
    try:
        for i, region in enumerate(sorted(regions)):
            clusters += check_region(file, geometry, root, region, extents, findings, view, buffer)
            if progress:
                progress((i + 1) / len(regions))
    finally:
        if isinstance(view, StoreView):
            view.close()
    return CheckReport(tuple(findings), root, len(regions), clusters)
