"""The send stream: one snapshot's contents, or what changed since another, as verified records (R13).

A stream is a sequence of records, each a 32-byte header and a payload:
BEGIN (what is sent and what it is relative to), DATA and ZERO (guest
ranges in ascending order), VMSTATE (the snapshot's VM state), END (counts
and a SHA-256 of everything before it).  Every header carries a CRC32C over
itself and its payload and a sequence number, so a flipped bit, a lost,
repeated or reordered record, and a stream cut anywhere are all told apart
from a good stream before a receiver makes anything visible.

The checksums detect damage, not forgery: whoever can rewrite a stream can
rewrite its checksums too.  Carry streams over an authenticated channel (ssh).
"""
from __future__ import annotations

import hashlib
import struct
from typing import BinaryIO, Iterator

import attrs

from .crc import crc32c
from .declare import decode_fields, encode_fields, field
from .errors import LaminaError
from .layout import MAX_CLUSTER_BITS, MAX_VIRTUAL_SIZE, MAX_VMSTATE_SIZE, MIN_CLUSTER_BITS, SECTOR_SIZE, SNAPSHOT_ENTRY_SIZE
from .structures import COUNTER_RULE, SnapshotEntry, _counter, _decode_snapshot, encode_snapshot_entry

STREAM_MAGIC = b"\x8aLAMSND\n"
STREAM_VERSION = 1
RECORD_HEADER_SIZE = 32
BEGIN_SIZE = 512
END_SIZE = 64
MAX_RECORD_PAYLOAD = 1 << 20  # a DATA or VMSTATE record holds at most 1 MiB: a receiver's memory is bounded
KIND_BEGIN, KIND_DATA, KIND_ZERO, KIND_VMSTATE, KIND_END = 1, 2, 3, 4, 5
KIND_NAMES = {KIND_BEGIN: "BEGIN", KIND_DATA: "DATA", KIND_ZERO: "ZERO", KIND_VMSTATE: "VMSTATE", KIND_END: "END"}


class StreamError(LaminaError):
    """A send stream that cannot be received; nothing of it was made visible."""


class StreamCorrupt(StreamError):
    """A send stream's bytes break a rule of the stream format (checksum, order, range, counts)."""


class StreamTruncated(StreamError):
    """A send stream ends before its END record."""


class StreamMismatch(StreamError):
    """A send stream does not apply to the target: its base snapshot is missing, or it is there already."""


@attrs.frozen
class RecordHeader:
    """The 32 bytes before every record's payload."""

    kind: int = field(0, "u32", "1 BEGIN, 2 DATA, 3 ZERO, 4 VMSTATE, 5 END", constraint="1 to 5",
                      valid=lambda v: v in KIND_NAMES, default=KIND_BEGIN)
    crc: int = field(4, "u32", "CRC32C of the header with this field as zero, then of the payload",
                     constraint="matches", default=0)
    sequence: int = field(8, "u64", "0 for BEGIN, one more for each following record",
                          constraint="the record's position in the stream", default=0)
    offset: int = field(16, "u64", "DATA, ZERO: guest offset; VMSTATE: offset in the VM state; else 0",
                        constraint="see F-SEND-002, F-SEND-003", default=0)
    length: int = field(24, "u64", "payload bytes; for ZERO the bytes of the range (ZERO has no payload)",
                        constraint="see F-SEND-001 to F-SEND-003", default=0)


def _zero(value: bytes) -> bool:
    return not any(value)


@attrs.frozen
class StreamBegin:
    """The BEGIN payload: the snapshot sent, and the snapshot it is relative to (none for a full stream)."""

    magic: bytes = field(0, "bytes", "identifies a Lamina send stream", size=8,
                         constraint="`8A 4C 41 4D 53 4E 44 0A` (`\\x8aLAMSND\\n`)",
                         valid=lambda v: v == STREAM_MAGIC, default=STREAM_MAGIC)
    version: int = field(8, "u32", "stream format version", constraint=f"= {STREAM_VERSION}",
                         valid=lambda v: v == STREAM_VERSION, default=STREAM_VERSION)
    cluster_bits: int = field(12, "u32", "log2 of the cluster size of the sending layer",
                              constraint=f"{MIN_CLUSTER_BITS} to {MAX_CLUSTER_BITS}",
                              valid=lambda v: MIN_CLUSTER_BITS <= v <= MAX_CLUSTER_BITS, default=16)
    virtual_size: int = field(16, "u64", "the snapshot's virtual size", constraint="multiple of 512, at most 2^50",
                              valid=lambda v: v % SECTOR_SIZE == 0 and v <= MAX_VIRTUAL_SIZE, default=0)
    snapshot_uuid: bytes = field(24, "bytes", "`image_uuid` of the snapshot's frozen layer", size=16,
                                 constraint="not all zero", valid=lambda v: any(v), default=bytes(16))
    snapshot_data_generation: int = field(40, "u64", "`data_generation` of that layer", constraint=COUNTER_RULE,
                                          valid=_counter, default=1)
    from_uuid: bytes = field(48, "bytes", "`image_uuid` of the layer of the snapshot the stream is relative to; "
                             "zero for a full stream", size=16, constraint="any", default=bytes(16))
    from_data_generation: int = field(64, "u64", "`data_generation` of that layer", constraint="0 for a full stream",
                                      default=0)
    from_virtual_size: int = field(72, "u64", "virtual size of that layer", constraint="0 for a full stream; multiple "
                                   "of 512", valid=lambda v: v % SECTOR_SIZE == 0 and v <= MAX_VIRTUAL_SIZE, default=0)
    reserved: bytes = field(80, "bytes", "reserved", size=112, constraint="all zero", valid=_zero, default=bytes(112))
    entry: bytes = field(192, "bytes", "the snapshot's `SnapshotEntry` as the sender holds it (name, times, VM-state "
                         "size and CRC32C; the receiver gives it its own `id`)", size=SNAPSHOT_ENTRY_SIZE,
                         constraint="a valid entry (F-SNAP-001, F-SNAP-002)", default=bytes(SNAPSHOT_ENTRY_SIZE))

    @property
    def full(self) -> bool:
        return not any(self.from_uuid)

    @property
    def snapshot(self) -> SnapshotEntry:
        return _decode_snapshot(self.entry, "the stream's BEGIN entry: ")


@attrs.frozen
class StreamEnd:
    """The END payload: what came before it, counted and hashed."""

    records: int = field(0, "u64", "records before END, BEGIN included", constraint="= the END record's `sequence`", default=0)
    data_bytes: int = field(8, "u64", "payload bytes of all DATA records", constraint="matches", default=0)
    zero_bytes: int = field(16, "u64", "bytes of all ZERO ranges", constraint="matches", default=0)
    vmstate_bytes: int = field(24, "u64", "payload bytes of all VMSTATE records", constraint="matches", default=0)
    sha256: bytes = field(32, "bytes", "SHA-256 of every stream byte before the END record", size=32,
                          constraint="matches", default=bytes(32))


def encode_record(kind: int, sequence: int, offset: int = 0, length: int | None = None, payload: bytes = b"") -> bytes:
    """One record, header and payload, with its CRC."""
    header = bytearray(RECORD_HEADER_SIZE)
    encode_fields(RecordHeader(kind, 0, sequence, offset, len(payload) if length is None else length), header)
    struct.pack_into("<I", header, 4, crc32c(payload, crc32c(bytes(header))))
    return bytes(header) + payload


def encode_begin(begin: StreamBegin) -> bytes:
    buf = bytearray(BEGIN_SIZE)
    encode_fields(begin, buf)
    return bytes(buf)


def encode_end(end: StreamEnd) -> bytes:
    buf = bytearray(END_SIZE)
    encode_fields(end, buf)
    return bytes(buf)


def begin_for(snapshot: SnapshotEntry, cluster_bits: int, virtual_size: int, data_generation: int,
              base: tuple[bytes, int, int] | None = None) -> StreamBegin:
    """The BEGIN of a stream of `snapshot`, relative to `base` = (uuid, data generation, virtual size) or full."""
    from_uuid, from_generation, from_size = base or (bytes(16), 0, 0)
    return StreamBegin(cluster_bits=cluster_bits, virtual_size=virtual_size, snapshot_uuid=snapshot.layer_uuid,
                       snapshot_data_generation=data_generation, from_uuid=from_uuid,
                       from_data_generation=from_generation, from_virtual_size=from_size,
                       entry=encode_snapshot_entry(snapshot))


@attrs.frozen
class Record:
    """A verified record: DATA (bytes at a guest offset), ZERO (a range reading zero) or VMSTATE."""

    kind: int
    offset: int
    length: int
    payload: bytes = b""


class StreamReader:
    """Read a stream record by record, checking every rule before a record is handed out (F-SEND-001 to -004).

    `begin` is read at construction; iterate for the DATA, ZERO and VMSTATE
    records; the iteration ends normally only after END verified and the
    input ended with it.  Any break raises StreamCorrupt or StreamTruncated
    naming the record and the stream offset.
    """

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.verified = 0
        self._hash = hashlib.sha256()
        self._position = 0
        self._sequence = 0
        self._counts = {KIND_DATA: 0, KIND_ZERO: 0, KIND_VMSTATE: 0}
        try:
            header, payload = self._next()
        except StreamCorrupt as error:
            raise StreamCorrupt(f"not a Lamina send stream: {error}") from None
        if header.kind != KIND_BEGIN:
            raise StreamCorrupt(f"stream offset 0: the first record is {KIND_NAMES[header.kind]}, not BEGIN")
        if header.length != BEGIN_SIZE or header.offset:
            raise StreamCorrupt(f"stream offset 0: BEGIN has offset {header.offset} and length {header.length}; "
                                f"the format requires 0 and {BEGIN_SIZE}")
        self.begin = _decode_begin(payload)
        self._guest_end = 0  # DATA/ZERO ranges ascend: the next starts at or past this
        self._vmstate_end = 0
        self._vmstate_started = False

    def _read(self, n: int, what: str) -> bytes:
        data = self._source.read(n)
        while len(data) < n:
            more = self._source.read(n - len(data))
            if not more:
                break
            data += more
        if len(data) < n:
            raise StreamTruncated(f"stream offset {self._position + len(data)}: the stream ends inside {what} "
                                  f"(record {self._sequence}); it is cut short, nothing was received")
        self._position += n
        return data

    def _next(self) -> tuple[RecordHeader, bytes]:
        at = self._position
        raw = self._read(RECORD_HEADER_SIZE, "a record header")
        where = f"stream offset {at}, record {self._sequence}: "
        try:
            header = RecordHeader(**decode_fields(RecordHeader, raw, where=where))
        except LaminaError as error:
            raise StreamCorrupt(str(error)) from None
        if header.kind in (KIND_DATA, KIND_VMSTATE) and not 0 < header.length <= MAX_RECORD_PAYLOAD:
            raise StreamCorrupt(f"{where}{KIND_NAMES[header.kind]} payload of {header.length} bytes; "
                                f"the format requires 1 to {MAX_RECORD_PAYLOAD}")
        payload_size = {KIND_BEGIN: BEGIN_SIZE, KIND_END: END_SIZE, KIND_ZERO: 0}.get(header.kind, header.length)
        if header.kind in (KIND_BEGIN, KIND_END) and header.length != payload_size:
            raise StreamCorrupt(f"{where}{KIND_NAMES[header.kind]} has length {header.length}; the format requires "
                                f"{payload_size}")
        payload = self._read(payload_size, f"the payload of {KIND_NAMES[header.kind]}")
        zeroed = raw[:4] + bytes(4) + raw[8:]
        if crc32c(payload, crc32c(zeroed)) != header.crc:
            raise StreamCorrupt(f"{where}{KIND_NAMES[header.kind]} fails its CRC32C: the stream was damaged")
        if header.sequence != self._sequence:
            raise StreamCorrupt(f"{where}{KIND_NAMES[header.kind]} carries sequence {header.sequence}; records are "
                                "lost, repeated or reordered")
        if header.kind != KIND_END:
            self._hash.update(raw)
            self._hash.update(payload)
        self._sequence += 1
        self.verified = self._position  # every byte before it belongs to a record that verified
        return header, payload

    def __iter__(self) -> Iterator[Record]:
        begin = self.begin
        vm_size = begin.snapshot.vmstate_size
        while True:
            at = self._position
            header, payload = self._next()
            where = f"stream offset {at}, record {header.sequence}: "
            if header.kind == KIND_END:
                self._finish(header, payload, where)
                return
            if header.kind == KIND_BEGIN:
                raise StreamCorrupt(f"{where}a second BEGIN")
            if header.kind == KIND_VMSTATE:
                self._vmstate_started = True
                if header.offset < self._vmstate_end or header.offset + header.length > vm_size:
                    raise StreamCorrupt(f"{where}VMSTATE bytes {header.offset} to {header.offset + header.length} are "
                                        f"out of order or past the VM state's {vm_size} bytes")
                self._vmstate_end = header.offset + header.length
            else:
                if self._vmstate_started:
                    raise StreamCorrupt(f"{where}{KIND_NAMES[header.kind]} after VMSTATE; guest ranges come first")
                end = header.offset + header.length
                if header.offset % SECTOR_SIZE or header.length % SECTOR_SIZE or not header.length:
                    raise StreamCorrupt(f"{where}{KIND_NAMES[header.kind]} range at {header.offset}, {header.length} "
                                        f"bytes, is not a non-empty run of whole {SECTOR_SIZE}-byte sectors")
                if header.offset < self._guest_end or end > begin.virtual_size:
                    raise StreamCorrupt(f"{where}{KIND_NAMES[header.kind]} range {header.offset} to {end} overlaps "
                                        f"the one before, is out of order or passes the virtual size "
                                        f"{begin.virtual_size}")
                self._guest_end = end
            self._counts[header.kind] += header.length
            yield Record(header.kind, header.offset, header.length, payload)

    def _finish(self, header: RecordHeader, payload: bytes, where: str) -> None:
        end = StreamEnd(**decode_fields(StreamEnd, payload, where=where))  # no field rule can fail
        expected = (header.sequence, self._counts[KIND_DATA], self._counts[KIND_ZERO], self._counts[KIND_VMSTATE])
        if (end.records, end.data_bytes, end.zero_bytes, end.vmstate_bytes) != expected:
            raise StreamCorrupt(f"{where}END counts {end.records} records, {end.data_bytes} DATA, {end.zero_bytes} "
                                f"ZERO and {end.vmstate_bytes} VMSTATE bytes; the stream holds {expected[0]}, "
                                f"{expected[1]}, {expected[2]} and {expected[3]}")
        if end.sha256 != self._hash.digest():
            raise StreamCorrupt(f"{where}END's SHA-256 does not match the stream: it was altered")
        if self._source.read(1):
            raise StreamCorrupt(f"stream offset {self._position}: bytes follow the END record")


def _decode_begin(payload: bytes) -> StreamBegin:
    where = "stream offset 32, BEGIN: "
    if payload[:8] != STREAM_MAGIC:
        raise StreamCorrupt(f"{where}no stream magic: this is not a Lamina send stream")
    try:
        begin = StreamBegin(**decode_fields(StreamBegin, payload, where=where))
        snapshot = begin.snapshot
    except LaminaError as error:
        raise StreamCorrupt(str(error)) from None
    if begin.full and (begin.from_data_generation or begin.from_virtual_size):
        raise StreamCorrupt(f"{where}a full stream (zero from_uuid) names a base generation or size")
    if snapshot.layer_uuid != begin.snapshot_uuid:
        raise StreamCorrupt(f"{where}the entry's layer uuid differs from snapshot_uuid")
    if snapshot.disk_size != begin.virtual_size:
        raise StreamCorrupt(f"{where}the entry's disk size {snapshot.disk_size} differs from the virtual size "
                            f"{begin.virtual_size}")
    if snapshot.vmstate_size > MAX_VMSTATE_SIZE:
        raise StreamCorrupt(f"{where}VM state of {snapshot.vmstate_size} bytes")
    return begin


def stream_contents(begin: StreamBegin, records: list[Record], base: bytes) -> bytes:
    """F-SEND-005, the meaning of a stream: the guest disk it describes, given the contents of its base.

    `base` is what the base snapshot reads (ignored for a full stream):
    the snapshot reads that, cut or zero-extended to its own size, with every
    DATA range replaced by its bytes and every ZERO range by zeros.
    """
    start = b"" if begin.full else base[: begin.virtual_size]
    disk = bytearray(start.ljust(begin.virtual_size, b"\0"))
    for record in records:
        if record.kind == KIND_DATA:
            disk[record.offset : record.offset + record.length] = record.payload
        elif record.kind == KIND_ZERO:
            disk[record.offset : record.offset + record.length] = bytes(record.length)
    return bytes(disk)
