"""The on-disk structures of format v1, each declared once (S1).

Two structures carry every piece of metadata: the root (two copies at the
start of the file) and the region map (two copies per region).  Each copy
holds its generation, its own slot number and a CRC32C over all of it, so a
torn, zeroed, stale, misdirected or bit-flipped copy is told from a good one.
"""
from __future__ import annotations

import functools
import struct

import attrs
from .crc import crc32c

from .declare import decode_fields, encode_fields, field
from .errors import BadChecksum, BadMagic, CounterExhausted, FieldOutOfRange, UnknownIncompatibleFeature, UnsupportedVersion
from .layout import (
    CLUSTERS_PER_REGION,
    MAX_BASE_PATH,
    MAX_COUNTER,
    MAX_SNAPSHOTS,
    MAX_VMSTATE_SIZE,
    ROOT_SLOT_SIZE,
    SNAPSHOT_ENTRY_SIZE,
    FORMAT_VERSION,
    MAP_BITMAP_OFFSET,
    MAP_CRCS_OFFSET,
    MAP_HEADER_SIZE,
    MAX_CLUSTER_BITS,
    MAX_INTENTS,
    MAX_VIRTUAL_SIZE,
    MIN_CLUSTER_BITS,
    ROOT_SIZE,
    SECTOR_SIZE,
    SHARED_TABLE_SIZE,
    Geometry,
)

ROOT_MAGIC = b"\x8aLAMINA\n"
MAP_MAGIC = b"\x8aLAMMAP\n"
ROOT_CRC_OFFSET = ROOT_SIZE - 4  # (= 4092)
MAP_CRC_OFFSET = MAP_HEADER_SIZE - 4  # (= 60)

# Feature bits as data.  A reader refuses an image with an incompatible bit it
# does not know, ignores unknown compatible bits, and a writer clears unknown
# auto-clear bits.  The one bit defined: `shared-clusters` (FORMAT.md section 13),
# a frozen layer whose maps reference clusters of the directory's shared store.
FEATURE_SHARED_CLUSTERS = 1 << 0
KNOWN_INCOMPATIBLE_FEATURES: dict[int, str] = {FEATURE_SHARED_CLUSTERS: "shared-clusters"}
KNOWN_COMPATIBLE_FEATURES: dict[int, str] = {}
KNOWN_AUTOCLEAR_FEATURES: dict[int, str] = {}


def structure_crc(data: bytes | bytearray, crc_offset: int) -> int:
    """CRC32C of a structure with its own 4-byte CRC field read as zero."""
    value = crc32c(bytes(data[:crc_offset]))
    value = crc32c(b"\0\0\0\0", value)
    return crc32c(bytes(data[crc_offset + 4 :]), value)


def _zero(value: bytes) -> bool:
    return not any(value)


BASE_NONE, BASE_RAW, BASE_LAMINA = 0, 1, 2
FLAG_COMMITTING = 1  # a `commit` into the base is in progress; recovery finishes it
KNOWN_FLAGS = FLAG_COMMITTING
ROOT_RESERVED_TAIL = ROOT_CRC_OFFSET - 4012  # (= 80)
MAP_FLAG_SHARED_TABLE = 1  # a map copy's `flags` bit 0: the copy carries the shared table after its bitmap
MAP_RESERVED_OFFSET = 44


COUNTER_RULE = "1 to 2^63 - 1 (`MAX_COUNTER`)"


def _counter(value: int) -> bool:
    return 1 <= value <= MAX_COUNTER


def next_counter(value: int, what: str) -> int:
    """`value + 1`, or a named error at the bound: an increment never wraps and never overflows its field."""
    if value >= MAX_COUNTER:
        raise CounterExhausted(f"{what} is at the format's bound 2^63 - 1; the image takes no step that increments it")
    return value + 1


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


@attrs.frozen
class SnapshotEntry:
    """One snapshot in the root's table: a frozen layer file and what the VM was doing."""

    id: int = field(0, "u64", "snapshot id, unique in the image", constraint=f"{COUNTER_RULE}, below `next_snapshot_id`",
                    valid=_counter, default=1)
    layer_uuid: bytes = field(8, "bytes", "`image_uuid` of the frozen layer file `<uuid hex>.lam`", size=16,
                              constraint="not all zero, unique", valid=lambda v: any(v), default=bytes(16))
    creation_time_ns: int = field(24, "u64", "host time of creation, ns since the Unix epoch", constraint="any", default=0)
    vm_clock_ns: int = field(32, "u64", "guest clock at the snapshot, ns", constraint="any", default=0)
    vmstate_size: int = field(40, "u64", "bytes of the VM-state file `<uuid hex>.vmstate`; 0 for none",
                              constraint="at most `MAX_VMSTATE_SIZE`", valid=lambda v: v <= MAX_VMSTATE_SIZE, default=0)
    disk_size: int = field(48, "u64", "virtual size of the disk at the snapshot",
                           constraint="multiple of 512", valid=lambda v: v % SECTOR_SIZE == 0, default=0)
    vmstate_crc: int = field(56, "u32", "CRC32C of the VM-state file", constraint="0 when `vmstate_size` is 0", default=0)
    name_length: int = field(60, "u32", "bytes of `name`", constraint="1 to 255",
                             valid=lambda v: 1 <= v <= 255, default=1)
    name: bytes = field(64, "bytes", "snapshot name, UTF-8, zero padded", size=256,
                        constraint="unique in the image; a valid name (F-SNAP-001); bytes past `name_length` zero",
                        default=bytes(256))

    @property
    def text_name(self) -> str:
        return self.name[: self.name_length].decode("utf-8")


# Characters a name may not hold: it is printed in a table (`snapshot list`) and must not forge or reorder
# rows: C0 controls, DEL and C1 controls; line and paragraph separators; bidirectional embeddings,
# overrides and isolates.
NAME_FORBIDDEN_CHARS = frozenset([*map(chr, range(0x20)), *map(chr, range(0x7F, 0xA0)), "\u2028", "\u2029",
                                  *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))])
NAME_SEPARATORS = "@/"  # '@' separates IMAGE@SNAPSHOT; '/' separates directories


def snapshot_name_problem(name: str) -> str | None:
    """F-SNAP-001: why `name` cannot name a snapshot, or None when it can."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if not 1 <= len(raw) <= 255:
        return f"is {len(raw)} bytes of UTF-8; a name is 1 to 255"
    if name.isdigit():
        return "is all digits, which names a snapshot id"
    bad = next((c for c in name if c in NAME_FORBIDDEN_CHARS or c in NAME_SEPARATORS), None)
    if bad is not None:
        return f"holds {bad!r} (U+{ord(bad):04X}); a name holds no control, line-separator or bidirectional " \
               f"control characters, and no '@' or '/'"
    return None


def make_snapshot_entry(name: str, **values: int | bytes) -> SnapshotEntry:
    raw = name.encode("utf-8")
    return SnapshotEntry(name_length=len(raw), name=raw.ljust(256, b"\0"), **values)  # type: ignore[arg-type]


def encode_snapshot_entry(entry: SnapshotEntry) -> bytes:
    record = bytearray(SNAPSHOT_ENTRY_SIZE)
    encode_fields(entry, record)
    return bytes(record)


def _decode_snapshot(data: bytes, where: str) -> SnapshotEntry:
    values = decode_fields(SnapshotEntry, data, where=where)
    entry = SnapshotEntry(**values)
    if any(entry.name[entry.name_length :]):
        raise FieldOutOfRange(f"{where}bytes past name_length are not zero")
    try:
        text = entry.name[: entry.name_length].decode("utf-8")
    except UnicodeDecodeError:
        raise FieldOutOfRange(f"{where}name is not valid UTF-8") from None
    problem = snapshot_name_problem(text)
    if problem:
        raise FieldOutOfRange(f"{where}name {text!r} {problem}")
    if not entry.vmstate_size and entry.vmstate_crc:
        raise FieldOutOfRange(f"{where}vmstate_crc is set but there is no VM state")
    return entry


@attrs.frozen
class Root:
    """The image's root: geometry, identity, write intents, the base reference and the snapshot table."""

    magic: bytes = field(0, "bytes", "identifies a Lamina root copy", size=8,
                         constraint="`8A 4C 41 4D 49 4E 41 0A` (`\\x8aLAMINA\\n`)",
                         valid=lambda v: v == ROOT_MAGIC, default=ROOT_MAGIC)
    version: int = field(8, "u32", "format version", constraint=f"= {FORMAT_VERSION}",
                         valid=lambda v: v == FORMAT_VERSION, default=FORMAT_VERSION)
    cluster_bits: int = field(12, "u32", "log2 of the cluster size",
                              constraint=f"{MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}",
                              valid=lambda v: MIN_CLUSTER_BITS <= v <= MAX_CLUSTER_BITS, default=16)
    virtual_size: int = field(16, "u64", "guest-visible size in bytes",
                              constraint=f"multiple of {SECTOR_SIZE}, at most 2^50",
                              valid=lambda v: v % SECTOR_SIZE == 0 and v <= MAX_VIRTUAL_SIZE, default=0)
    generation: int = field(24, "u64", "incremented by every root write; the higher valid copy is current",
                            constraint=COUNTER_RULE, valid=_counter, default=1)
    incompatible_features: int = field(32, "u64", "features a reader must know to open the image",
                                       constraint="no unknown bit", default=0)
    compatible_features: int = field(40, "u64", "features a reader may ignore",
                                     constraint="any", default=0)
    autoclear_features: int = field(48, "u64", "features a writer that does not know them clears",
                                    constraint="any", default=0)
    image_uuid: bytes = field(56, "bytes", "identity of this layer file; repeated in every map copy", size=16,
                              constraint="not all zero", valid=lambda v: any(v), default=bytes(16))
    slot: int = field(72, "u32", "which copy this is: 0 at file offset 0, 1 at `ROOT_SLOT_SIZE`",
                      constraint="equals the copy's position", valid=lambda v: v in (0, 1), default=0)
    num_intents: int = field(76, "u32", "entries used in `intents`",
                             constraint=f"at most {MAX_INTENTS}", valid=lambda v: v <= MAX_INTENTS, default=0)
    root_length: int = field(80, "u32", "bytes of this copy: the fixed 4096, the base path padded to 8, the snapshot table",
                             constraint="= 4096 + pad8(`base_path_length`) + 320 * `num_snapshots`", default=ROOT_SIZE)
    base_kind: int = field(84, "u32", "0 no base, 1 a raw file, 2 a Lamina layer",
                           constraint="0, 1 or 2", valid=lambda v: v in (BASE_NONE, BASE_RAW, BASE_LAMINA), default=0)
    data_generation: int = field(88, "u64", "changes whenever the guest contents of this layer may change; children record it",
                                 constraint=COUNTER_RULE, valid=_counter, default=1)
    base_uuid: bytes = field(96, "bytes", "`image_uuid` of a Lamina base", size=16,
                             constraint="zero unless `base_kind` = 2", default=bytes(16))
    base_data_generation: int = field(112, "u64", "`data_generation` of a Lamina base when referenced",
                                      constraint="zero unless `base_kind` = 2; at most `MAX_COUNTER`",
                                      valid=lambda v: v <= MAX_COUNTER, default=0)
    base_size: int = field(120, "u64", "virtual size (raw: file size) of the base when referenced",
                           constraint="zero when `base_kind` = 0", default=0)
    intents: tuple[int, ...] = field(128, f"u32[{MAX_INTENTS}]",
                                     "write intents: regions whose data may differ from their map's checksums",
                                     constraint="strictly ascending region indices below the region count; unused entries zero",
                                     default=())
    base_path_length: int = field(3968, "u32", "bytes of the base path in the tail",
                                  constraint=f"at most {MAX_BASE_PATH}; 0 exactly when `base_kind` = 0",
                                  valid=lambda v: v <= MAX_BASE_PATH, default=0)
    num_snapshots: int = field(3972, "u32", "entries in the snapshot table",
                               constraint=f"at most {MAX_SNAPSHOTS}", valid=lambda v: v <= MAX_SNAPSHOTS, default=0)
    next_snapshot_id: int = field(3976, "u64", "the id the next snapshot gets",
                                  constraint=f"{COUNTER_RULE}; greater than every id in the table", valid=_counter, default=1)
    flags: int = field(3984, "u32", "bit 0: a commit into the base is in progress",
                       constraint="no unknown bit", valid=lambda v: not v & ~KNOWN_FLAGS, default=0)
    base_visible: int = field(3988, "u64", "the base shows through only below this guest offset; a shrink lowers it, "
                              "so a later grow reads zeros", constraint="at most `virtual_size` and `base_size`; 0 without a base",
                              default=0)
    store_uuid: bytes = field(3996, "bytes", "`image_uuid` of the shared store `lamina-store.lam` this layer's maps "
                              "reference (F-SHARE-001)", size=16,
                              constraint="not all zero exactly when `incompatible_features` sets `shared-clusters`",
                              default=bytes(16))
    reserved: bytes = field(4012, "bytes", "reserved", size=ROOT_RESERVED_TAIL, constraint="all zero", valid=_zero,
                            default=bytes(ROOT_RESERVED_TAIL))
    crc: int = field(ROOT_CRC_OFFSET, "u32", "CRC32C of the `root_length` bytes with this field as zero",
                     constraint="matches", default=0)
    base_path: str = ""  # tail, at 4096: `base_path_length` bytes of UTF-8, zero padded to a multiple of 8
    snapshots: tuple[SnapshotEntry, ...] = ()  # tail, after the base path: `num_snapshots` entries of 320 bytes

    @functools.cached_property
    def geometry(self) -> Geometry:
        """Made once per root (cached; the root stays frozen), so its own cached sizes are kept too."""
        return Geometry(self.cluster_bits, self.virtual_size, bool(self.incompatible_features & FEATURE_SHARED_CLUSTERS))

    def same_content(self, other: "Root") -> bool:
        """Whether two copies carry the same version (they differ only in slot and CRC)."""
        return all(getattr(self, name) == getattr(other, name) for name in _root_content_fields())

    def snapshot(self, name: str) -> SnapshotEntry | None:
        return next((s for s in self.snapshots if s.text_name == name or str(s.id) == name), None)


@functools.cache
def _root_content_fields() -> tuple[str, ...]:
    """Every field of a root but the two that differ between its copies: compared without building new roots."""
    return tuple(a.name for a in attrs.fields(Root) if a.name not in ("slot", "crc"))


ROOT_TAIL = [
    ("base_path", "4096", "`base_path_length`", "path of the base: a layer file name `<32 hex>.lam` (found in the image's "
     "layer directory) or a path relative to the image's directory; UTF-8, no NUL, zero padded to a multiple of 8"),
    ("snapshots", "4096 + pad8(`base_path_length`)", "320 * `num_snapshots`", "the snapshot table: `SnapshotEntry` records"),
]


def encode_root(root: Root) -> bytes:
    """The `root_length` bytes of a root copy, CRC included (cached: a pure function of a frozen root)."""
    return _encode_root_cached(root)


def _encode_root(root: Root) -> bytes:
    """The `root_length` bytes of a root copy, CRC included."""
    path = root.base_path.encode("utf-8")
    length = ROOT_SIZE + _pad8(len(path)) + SNAPSHOT_ENTRY_SIZE * len(root.snapshots)
    buf = bytearray(length)
    intents = root.intents + (0,) * (MAX_INTENTS - len(root.intents))
    encode_fields(attrs.evolve(root, intents=intents, num_intents=len(root.intents), crc=0, root_length=length,
                               base_path_length=len(path), num_snapshots=len(root.snapshots)), buf)
    buf[ROOT_SIZE : ROOT_SIZE + len(path)] = path
    at = ROOT_SIZE + _pad8(len(path))
    for entry in root.snapshots:
        buf[at : at + SNAPSHOT_ENTRY_SIZE] = encode_snapshot_entry(entry)
        at += SNAPSHOT_ENTRY_SIZE
    struct.pack_into("<I", buf, ROOT_CRC_OFFSET, structure_crc(buf, ROOT_CRC_OFFSET))
    return bytes(buf)


def root_length_of(head: bytes) -> int:
    """How many bytes to read for a root copy whose first 4096 bytes are `head` (4096 if it is not sane)."""
    if len(head) < ROOT_SIZE or head[:8] != ROOT_MAGIC:
        return ROOT_SIZE
    length = struct.unpack_from("<I", head, 80)[0]
    return length if ROOT_SIZE <= length <= ROOT_SLOT_SIZE else ROOT_SIZE


def decode_root(data: bytes, slot: int | None = None, table: bool = True) -> Root:
    """Decode and validate one root copy; raise a named FormatError saying what is wrong (see `_decode_root`).

    A pure function of its arguments whose result is frozen, so the same
    bytes are decoded once (a small cache: every open, check and reading
    decodes both copies again, usually unchanged); failures are not cached.
    """
    if type(data) is bytes:
        return _decode_root_cached(data, slot, table)
    return _decode_root(data, slot, table)


def _decode_root(data: bytes, slot: int | None = None, table: bool = True) -> Root:
    """Decode and validate one root copy; raise a named FormatError saying what is wrong.

    With `table` false the snapshot table is covered by the CRC but neither
    decoded nor validated, and `snapshots` is None: a frozen layer keeps the
    table its image had when it was frozen, which no reader of the chain
    needs, and decoding every one would make walking N snapshots cost N^2.
    """
    where = f"root copy {'AB'[slot]}: " if slot is not None else "root: "
    if len(data) < ROOT_SIZE:
        raise FieldOutOfRange(f"{where}only {len(data)} bytes, a root copy has at least {ROOT_SIZE}")
    if data[:8] != ROOT_MAGIC:
        raise BadMagic(f"{where}bad magic {bytes(data[:8])!r} at byte 0 (not a Lamina image?)")
    length = struct.unpack_from("<I", data, 80)[0]
    if not ROOT_SIZE <= length <= min(len(data), ROOT_SLOT_SIZE):
        raise FieldOutOfRange(f"{where}Root.root_length at byte 80 is {length}, beyond the bytes of its slot")
    data = data[:length]
    stored = struct.unpack_from("<I", data, ROOT_CRC_OFFSET)[0]
    if stored != structure_crc(data, ROOT_CRC_OFFSET):
        raise BadChecksum(f"{where}CRC32C at byte {ROOT_CRC_OFFSET} does not match its contents")
    version = struct.unpack_from("<I", data, 8)[0]
    if version != FORMAT_VERSION:
        raise UnsupportedVersion(f"{where}format version {version}; this reader knows version {FORMAT_VERSION}")
    incompat = struct.unpack_from("<Q", data, 32)[0]
    unknown = incompat & ~sum(KNOWN_INCOMPATIBLE_FEATURES, 0)
    if unknown:
        raise UnknownIncompatibleFeature(f"{where}unknown incompatible feature bits {unknown:#x}; refusing to open")
    values = decode_fields(Root, data, where=where)
    if slot is not None and values["slot"] != slot:
        raise FieldOutOfRange(f"{where}says it is copy {'AB'[values['slot']]} (a misdirected write?)")
    path_length, count = values["base_path_length"], values["num_snapshots"]
    if length != ROOT_SIZE + _pad8(path_length) + SNAPSHOT_ENTRY_SIZE * count:
        raise FieldOutOfRange(f"{where}root_length {length} does not match base_path_length {path_length} "
                              f"and num_snapshots {count}")
    kind = values["base_kind"]
    if (kind == BASE_NONE) != (path_length == 0):
        raise FieldOutOfRange(f"{where}base_kind {kind} with a base path of {path_length} bytes")
    if kind != BASE_LAMINA and (any(values["base_uuid"]) or values["base_data_generation"]):
        raise FieldOutOfRange(f"{where}base_uuid and base_data_generation must be zero unless the base is a Lamina layer")
    if kind == BASE_NONE and (values["base_size"] or values["base_visible"]):
        raise FieldOutOfRange(f"{where}base_size and base_visible must be zero without a base")
    if bool(incompat & FEATURE_SHARED_CLUSTERS) != any(values["store_uuid"]):
        raise FieldOutOfRange(f"{where}store_uuid must be set exactly when the shared-clusters feature is")
    if values["base_visible"] > min(values["base_size"], values["virtual_size"]):
        raise FieldOutOfRange(f"{where}base_visible {values['base_visible']} is past the base size or the virtual size")
    raw_path = data[ROOT_SIZE : ROOT_SIZE + path_length]
    if any(data[ROOT_SIZE + path_length : ROOT_SIZE + _pad8(path_length)]) or b"\0" in raw_path:
        raise FieldOutOfRange(f"{where}the base path holds a NUL byte or non-zero padding")
    try:
        values["base_path"] = raw_path.decode("utf-8")
    except UnicodeDecodeError:
        raise FieldOutOfRange(f"{where}the base path is not valid UTF-8") from None
    at = ROOT_SIZE + _pad8(path_length)
    entries = []
    for i in range(count if table else 0):
        entries.append(_decode_snapshot(data[at : at + SNAPSHOT_ENTRY_SIZE], f"{where}snapshot entry {i}: "))
        at += SNAPSHOT_ENTRY_SIZE
    for what, keys in (("id", [e.id for e in entries]), ("name", [e.text_name for e in entries]),
                       ("layer_uuid", [e.layer_uuid for e in entries])):
        if len(set(keys)) != len(keys):
            raise FieldOutOfRange(f"{where}two snapshots share one {what}")
    if any(e.layer_uuid == values["image_uuid"] for e in entries):
        raise FieldOutOfRange(f"{where}a snapshot's layer_uuid is the image's own image_uuid (the top is no snapshot)")
    if entries and max(e.id for e in entries) >= values["next_snapshot_id"]:
        raise FieldOutOfRange(f"{where}a snapshot id is not below next_snapshot_id")
    values["snapshots"] = tuple(entries) if table else None
    count = values["num_intents"]
    intents = values["intents"]
    used, unused = intents[:count], intents[count:]
    if any(unused):
        raise FieldOutOfRange(f"{where}intents beyond num_intents={count} are not zero")
    num_regions = Geometry(values["cluster_bits"], values["virtual_size"]).num_regions
    if any(b <= a for a, b in zip(used, used[1:])) or any(r >= num_regions for r in used):
        raise FieldOutOfRange(
            f"{where}intents must be strictly ascending region indices below {num_regions}"
        )
    values["intents"] = tuple(used)
    return Root(**values)


@attrs.frozen
class MapCopy:
    """One copy of a region's map: which guest sectors are present, and each cluster's checksum."""

    magic: bytes = field(0, "bytes", "identifies a map copy", size=8,
                         constraint="`8A 4C 41 4D 4D 41 50 0A` (`\\x8aLAMMAP\\n`)",
                         valid=lambda v: v == MAP_MAGIC, default=MAP_MAGIC)
    region: int = field(8, "u32", "index of the region this copy describes",
                        constraint="equals the region it is stored in", default=0)
    slot: int = field(12, "u32", "0 for copy A (first cluster of the region), 1 for copy B (last)",
                      constraint="equals the copy's position", valid=lambda v: v in (0, 1), default=0)
    generation: int = field(16, "u64", "incremented by every commit of this region; the higher valid copy is current",
                            constraint=COUNTER_RULE, valid=_counter, default=1)
    image_uuid: bytes = field(24, "bytes", "the root's `image_uuid`", size=16,
                              constraint="equals the root's", default=bytes(16))
    flags: int = field(40, "u32", "bit 0: the copy carries the `shared` table after `present` (F-SHARE-002)",
                       constraint="no unknown bit; bit 0 only when the root sets `shared-clusters`",
                       valid=lambda v: not v & ~MAP_FLAG_SHARED_TABLE, default=0)
    reserved: bytes = field(MAP_RESERVED_OFFSET, "bytes", "reserved", size=MAP_CRC_OFFSET - MAP_RESERVED_OFFSET,
                            constraint="all zero", valid=_zero, default=bytes(MAP_CRC_OFFSET - MAP_RESERVED_OFFSET))
    crc: int = field(MAP_CRC_OFFSET, "u32", "CRC32C of the used length with this field as zero",
                     constraint="matches", default=0)
    data_crcs: tuple[int, ...] = field(MAP_CRCS_OFFSET, f"u32[{CLUSTERS_PER_REGION}]",
                                       "CRC32C of each data cluster's bytes in the file (holes read as zero)",
                                       constraint="0 for a cluster with no present sector",
                                       default=(0,) * CLUSTERS_PER_REGION)
    present: bytes = field(MAP_BITMAP_OFFSET, "tail",
                           "presence bitmap: bit k (LSB first) set when guest sector k of the region is present",
                           constraint="cluster_size / 32 bytes; bits past the virtual size zero",
                           default=b"")
    # tail, after `present`, only when `flags` bit 0 is set: u64[128], store cluster index + 1 per data cluster (0: local)
    shared: tuple[int, ...] = ()


MAP_TAIL = [
    ("shared", "576 + cluster_size / 32", "1024 when `flags` bit 0 is set, else 0",
     "u64[128]: for data cluster c, 0 when its bytes are local, else 1 + the index of the store cluster that holds "
     "them (F-SHARE-002)"),
]


def map_used_length_of(copy_flags: int, geometry: Geometry) -> int:
    """The used length of a map copy: the fixed part and bitmap, plus the shared table when its flag is set."""
    return geometry.map_used_length + (SHARED_TABLE_SIZE if copy_flags & MAP_FLAG_SHARED_TABLE else 0)


def encode_map_copy(copy: MapCopy, geometry: Geometry) -> bytes:
    """The used bytes of a map copy, CRC included (the rest of its cluster stays a hole)."""
    if len(copy.present) != geometry.map_bitmap_size:
        raise ValueError("presence bitmap length does not match the geometry")
    flags = copy.flags | (MAP_FLAG_SHARED_TABLE if any(copy.shared) else 0)
    if flags & MAP_FLAG_SHARED_TABLE and not geometry.shared:
        raise ValueError("a map copy with shared clusters in a layer without the shared-clusters feature")
    buf = bytearray(map_used_length_of(flags, geometry))
    encode_fields(attrs.evolve(copy, crc=0, flags=flags), buf)
    if flags & MAP_FLAG_SHARED_TABLE:
        struct.pack_into(f"<{CLUSTERS_PER_REGION}Q", buf, geometry.map_used_length, *copy.shared)
    struct.pack_into("<I", buf, MAP_CRC_OFFSET, structure_crc(buf, MAP_CRC_OFFSET))
    return bytes(buf)


def decode_map_copy(data: bytes, geometry: Geometry, region: int, slot: int, image_uuid: bytes) -> MapCopy:
    """Decode and validate one map copy as found at (region, slot); cached as `decode_root` is."""
    if type(data) is bytes and type(image_uuid) is bytes:
        return _decode_map_copy_cached(data, geometry, region, slot, image_uuid)
    return _decode_map_copy(data, geometry, region, slot, image_uuid)


def _decode_map_copy(data: bytes, geometry: Geometry, region: int, slot: int, image_uuid: bytes) -> MapCopy:
    """Decode and validate one map copy as found at (region, slot)."""
    where = f"map copy {'AB'[slot]} of region {region} (file offset {geometry.map_copy_offset(region, slot)}): "
    used = geometry.map_used_length
    if len(data) >= MAP_HEADER_SIZE and data[:8] == MAP_MAGIC:
        flags = struct.unpack_from("<I", data, 40)[0]
        if flags & MAP_FLAG_SHARED_TABLE and geometry.shared:
            used = map_used_length_of(flags, geometry)  # F-SHARE-002: the copy itself says it carries the table
    data = data[:used]
    if len(data) < used:
        raise FieldOutOfRange(f"{where}only {len(data)} bytes before the end of the file, a map copy has {used}")
    if data[:8] != MAP_MAGIC:
        raise BadMagic(f"{where}bad magic {bytes(data[:8])!r}")
    if struct.unpack_from("<I", data, MAP_CRC_OFFSET)[0] != structure_crc(data, MAP_CRC_OFFSET):
        raise BadChecksum(f"{where}CRC32C at byte {MAP_CRC_OFFSET} does not match its contents")
    values = decode_fields(MapCopy, data, tail_size=geometry.map_bitmap_size, where=where)
    if values["region"] != region or values["slot"] != slot:
        raise FieldOutOfRange(
            f"{where}says it is copy {'AB'[values['slot'] & 1]} of region {values['region']} (a misdirected write?)"
        )
    if values["image_uuid"] != image_uuid:
        raise FieldOutOfRange(f"{where}belongs to another image (uuid {values['image_uuid'].hex()})")
    if values["flags"] & MAP_FLAG_SHARED_TABLE:
        if not geometry.shared:
            raise FieldOutOfRange(f"{where}carries a shared table but the root does not set shared-clusters")
        values["shared"] = struct.unpack_from(f"<{CLUSTERS_PER_REGION}Q", data, geometry.map_used_length)
    return MapCopy(**values)


_decode_root_cached = functools.lru_cache(maxsize=1024)(_decode_root)
_decode_map_copy_cached = functools.lru_cache(maxsize=2048)(_decode_map_copy)
_encode_root_cached = functools.lru_cache(maxsize=1024)(_encode_root)
