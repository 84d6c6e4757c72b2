"""The trace file `crashsim record` writes and `crashsim explore` reads: self-contained, versioned JSON lines.

A record and its exploration can then run apart (on another machine, later,
many times).  The format, version 1, one JSON object per line:

1. header: `{"format": "crashsim-trace", "version": 1, "root": "/crashsim-recorded", "command": [...], "ops": N}`
2. one line per initial directory: `{"dir": PATH}`; one per initial inode:
   `{"inode": I, "size": S, "names": [PATH, ...], "blocks": {"INDEX": BASE64, ...}}`
   holding only its non-zero 4 KiB blocks (a hole costs nothing);
3. N op lines: the `Op` fields that differ from their defaults (`kind`,
   `target`, `offset`, `length`, `data` as base64 of the written bytes only,
   `path`, `path2`, `inode`);
4. the end line: `{"end": N, "sha256": HEX}`, the SHA-256 of every byte
   before it, so a truncated or altered file is refused.

Paths are simulated (`/crashsim-recorded/...`); the initial state's
`next_inode` is one past its largest inode.
"""
from __future__ import annotations

import base64
import hashlib
import json
import attrs

from .errors import CrashsimError
from .memstore import DATA_KINDS, FSYNC, FSYNC_DIR, NAMESPACE_KINDS, DiskState, FileData, Op
from .syscalls import ROOT

FORMAT = "crashsim-trace"
VERSION = 1
_DEFAULTS = Op("", 0)._asdict()


class BadTraceFile(CrashsimError):
    """A trace file is missing, truncated, altered, of another version, or not a trace at all (exit code 7)."""

    exit_code = 7


@attrs.frozen
class TraceFile:
    """A recorded program: its command, the directory it started from and its operations."""

    command: tuple[str, ...]
    base: DiskState
    ops: tuple[Op, ...]


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def encode(trace: TraceFile) -> bytes:
    """The file's bytes (deterministic: the same trace gives the same bytes)."""
    base = trace.base
    lines = [_line({"format": FORMAT, "version": VERSION, "root": ROOT, "command": list(trace.command), "ops": len(trace.ops)})]
    lines += [_line({"dir": d}) for d in sorted(base.dirs)]
    for inode in sorted(base.files):
        data = base.files[inode]
        lines.append(_line({"inode": inode, "size": data.size,
                            "names": sorted(p for p, i in base.names.items() if i == inode),
                            "blocks": {str(i): base64.b64encode(b).decode() for i, b in sorted(data.blocks.items())}}))
    for op in trace.ops:
        fields = {k: v for k, v in op._asdict().items() if v != _DEFAULTS[k] or k in ("kind", "target")}
        if "data" in fields:
            fields["data"] = base64.b64encode(op.data).decode()
        lines.append(_line(fields))
    body = b"".join(lines)
    return body + _line({"end": len(trace.ops), "sha256": hashlib.sha256(body).hexdigest()})


def write_trace(path: str, trace: TraceFile) -> None:
    with open(path, "wb") as fh:
        fh.write(encode(trace))


def decode(raw: bytes, where: str = "trace") -> TraceFile:
    """Parse a trace file's bytes; BadTraceFile says what is wrong and on which line."""
    body, _, last = raw.rstrip(b"\n").rpartition(b"\n")
    body += b"\n"
    try:
        end = json.loads(last)
        if not isinstance(end, dict) or "end" not in end:
            raise BadTraceFile(f"{where}: no end line: the file is truncated")
    except (ValueError, UnicodeDecodeError):
        raise BadTraceFile(f"{where}: no end line: the file is truncated") from None
    if end.get("sha256") != hashlib.sha256(body).hexdigest():
        raise BadTraceFile(f"{where}: the SHA-256 of its contents does not match its end line: the file was altered")
    lines = body.splitlines()
    number = 0
    try:
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise BadTraceFile(f"{where}: not a crashsim trace file")
        if header.get("version") != VERSION:
            raise BadTraceFile(f"{where}: trace format version {header.get('version')!r}; this crashsim reads {VERSION}")
        if header.get("root") != ROOT:
            raise BadTraceFile(f"{where}: root {header.get('root')!r}, expected {ROOT}")
        base, ops = DiskState(), []
        for number, text in enumerate(lines[1:], start=2):
            obj = json.loads(text)
            if "dir" in obj:
                base.dirs.add(str(obj["dir"]))
            elif "inode" in obj and "kind" not in obj:
                inode = int(obj["inode"])
                base.files[inode] = FileData({int(i): base64.b64decode(b, validate=True) for i, b in obj["blocks"].items()},
                                             int(obj["size"]))
                base.names.update({str(p): inode for p in obj["names"]})
                base.next_inode = max(base.next_inode, inode + 1)
            else:
                fields = dict(obj)
                if "data" in fields:
                    fields["data"] = base64.b64decode(fields["data"], validate=True)
                op = Op(**fields)
                if op.kind not in DATA_KINDS | NAMESPACE_KINDS | {FSYNC, FSYNC_DIR}:
                    raise BadTraceFile(f"{where} line {number}: {op.kind!r} is not an operation kind")
                ops.append(op)
    except BadTraceFile:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
        raise BadTraceFile(f"{where} line {number or 1}: {type(exc).__name__}: {exc}") from None
    if len(ops) != header.get("ops") or len(ops) != end["end"]:
        raise BadTraceFile(f"{where}: {len(ops)} ops, but its header and end line say {header.get('ops')} and {end['end']}")
    return TraceFile(tuple(str(a) for a in header.get("command", ())), base, tuple(ops))


def read_trace(path: str) -> TraceFile:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise BadTraceFile(f"{path}: cannot read the trace file: {exc.strerror}") from None
    return decode(raw, path)


def replayed(trace: TraceFile) -> DiskState:
    """The state after every op reached the disk whole (what the program left behind)."""
    state = trace.base.copy()
    for op in trace.ops:
        state.apply(op)
    return state

