"""The on-disk structures of format v1, each declared once (S1).

Two structures carry every piece of metadata: the root (two copies at the
start of the file) and the region map (two copies per region).  Each copy
holds its generation, its own slot number and a CRC32C over all of it, so a
torn, zeroed, stale, misdirected or bit-flipped copy is told from a good one.
"""
from __future__ import annotations

import struct

import attrs
import crc32c

from .declare import decode_fields, encode_fields, field
from .errors import BadChecksum, BadMagic, FieldOutOfRange, UnknownIncompatibleFeature, UnsupportedVersion
from .layout import (
    CLUSTERS_PER_REGION,
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
    Geometry,
)

ROOT_MAGIC = b"\x8aLAMINA\n"
MAP_MAGIC = b"\x8aLAMMAP\n"
ROOT_CRC_OFFSET = ROOT_SIZE - 4  # (= 4092)
MAP_CRC_OFFSET = MAP_HEADER_SIZE - 4  # (= 60)

# Feature bits as data.  v1 defines none; a reader refuses an image with an
# incompatible bit it does not know, ignores unknown compatible bits, and a
# writer clears unknown auto-clear bits.
KNOWN_INCOMPATIBLE_FEATURES: dict[int, str] = {}
KNOWN_COMPATIBLE_FEATURES: dict[int, str] = {}
KNOWN_AUTOCLEAR_FEATURES: dict[int, str] = {}


def structure_crc(data: bytes | bytearray, crc_offset: int) -> int:
    """CRC32C of a structure with its own 4-byte CRC field read as zero."""
    value = crc32c.crc32c(bytes(data[:crc_offset]))
    value = crc32c.crc32c(b"\0\0\0\0", value)
    return crc32c.crc32c(bytes(data[crc_offset + 4 :]), value)


def _zero(value: bytes) -> bool:
    return not any(value)


@attrs.frozen
class Root:
    """The image's root: geometry, identity, and the write-intent list."""

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
                            constraint=">= 1", valid=lambda v: v >= 1, default=1)
    incompatible_features: int = field(32, "u64", "features a reader must know to open the image",
                                       constraint="no unknown bit", default=0)
    compatible_features: int = field(40, "u64", "features a reader may ignore",
                                     constraint="any", default=0)
    autoclear_features: int = field(48, "u64", "features a writer that does not know them clears",
                                    constraint="any", default=0)
    image_uuid: bytes = field(56, "bytes", "identity of the image; repeated in every map copy", size=16,
                              constraint="not all zero", valid=lambda v: any(v), default=bytes(16))
    slot: int = field(72, "u32", "which copy this is: 0 at file offset 0, 1 at file offset 4096",
                      constraint="equals the copy's position", valid=lambda v: v in (0, 1), default=0)
    num_intents: int = field(76, "u32", "entries used in `intents`",
                             constraint=f"at most {MAX_INTENTS}", valid=lambda v: v <= MAX_INTENTS, default=0)
    reserved: bytes = field(80, "bytes", "reserved", size=48, constraint="all zero", valid=_zero,
                            default=bytes(48))
    intents: tuple[int, ...] = field(128, f"u32[{MAX_INTENTS}]",
                                     "write intents: regions whose data may differ from their map's checksums",
                                     constraint="strictly ascending region indices below the region count; unused entries zero",
                                     default=())
    reserved_tail: bytes = field(128 + 4 * MAX_INTENTS, "bytes", "reserved",
                                 size=ROOT_CRC_OFFSET - 128 - 4 * MAX_INTENTS,
                                 constraint="all zero", valid=_zero, default=bytes(ROOT_CRC_OFFSET - 128 - 4 * MAX_INTENTS))
    crc: int = field(ROOT_CRC_OFFSET, "u32", "CRC32C of the 4096 bytes with this field as zero",
                     constraint="matches", default=0)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.cluster_bits, self.virtual_size)

    def same_content(self, other: "Root") -> bool:
        """Whether two copies carry the same version (they differ only in slot and CRC)."""
        return attrs.evolve(self, slot=0, crc=0) == attrs.evolve(other, slot=0, crc=0)


def encode_root(root: Root) -> bytes:
    """The 4096 bytes of a root copy, CRC included."""
    buf = bytearray(ROOT_SIZE)
    intents = root.intents + (0,) * (MAX_INTENTS - len(root.intents))
    encode_fields(attrs.evolve(root, intents=intents, num_intents=len(root.intents), crc=0), buf)
    struct.pack_into("<I", buf, ROOT_CRC_OFFSET, structure_crc(buf, ROOT_CRC_OFFSET))
    return bytes(buf)


def decode_root(data: bytes, slot: int | None = None) -> Root:
    """Decode and validate one root copy; raise a named FormatError saying what is wrong."""
    where = f"root copy {slot}: " if slot is not None else "root: "
    if len(data) < ROOT_SIZE:
        raise FieldOutOfRange(f"{where}only {len(data)} bytes, a root copy has {ROOT_SIZE}")
    data = data[:ROOT_SIZE]
    if data[:8] != ROOT_MAGIC:
        raise BadMagic(f"{where}bad magic {bytes(data[:8])!r} at byte 0 (not a Lamina image?)")
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
        raise FieldOutOfRange(f"{where}says it is copy {values['slot']} (a misdirected write?)")
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
                            constraint=">= 1", valid=lambda v: v >= 1, default=1)
    image_uuid: bytes = field(24, "bytes", "the root's `image_uuid`", size=16,
                              constraint="equals the root's", default=bytes(16))
    reserved: bytes = field(40, "bytes", "reserved", size=MAP_CRC_OFFSET - 40, constraint="all zero",
                            valid=_zero, default=bytes(MAP_CRC_OFFSET - 40))
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


def encode_map_copy(copy: MapCopy, geometry: Geometry) -> bytes:
    """The used bytes of a map copy, CRC included (the rest of its cluster stays a hole)."""
    if len(copy.present) != geometry.map_bitmap_size:
        raise ValueError("presence bitmap length does not match the geometry")
    buf = bytearray(geometry.map_used_length)
    encode_fields(attrs.evolve(copy, crc=0), buf)
    struct.pack_into("<I", buf, MAP_CRC_OFFSET, structure_crc(buf, MAP_CRC_OFFSET))
    return bytes(buf)


def decode_map_copy(data: bytes, geometry: Geometry, region: int, slot: int, image_uuid: bytes) -> MapCopy:
    """Decode and validate one map copy as found at (region, slot)."""
    where = f"map copy {'AB'[slot]} of region {region} (file offset {geometry.map_copy_offset(region, slot)}): "
    used = geometry.map_used_length
    data = data[:used]
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
    return MapCopy(**values)
