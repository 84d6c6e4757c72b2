"""A small NBD client over a Unix socket: what `convert` needs to read and write images qemu-nbd exports.

Why not libnbd: its Python binding comes from a Debian package built for
the system interpreter only, not installable into a virtual environment,
and no NBD client is published on PyPI.  The subset needed is small and
fixed by the protocol document (NBD's `doc/proto.md`, "The NBD protocol"):

- the fixed newstyle handshake with `NBD_FLAG_C_NO_ZEROES`;
- `NBD_OPT_STRUCTURED_REPLY` and `NBD_OPT_SET_META_CONTEXT` for
  `base:allocation`, then `NBD_OPT_GO` (with `NBD_INFO_EXPORT`);
- the commands READ, WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS and
  DISC, one request at a time (no pipelining: conversion speed is bounded by
  the image driver, not the round trip on a local socket).

Every reply is checked (magic, cookie, lengths); a server that breaks the
protocol raises `NbdProtocolError`, an error the server reports `NbdError`.
"""
from __future__ import annotations

import socket
import struct
from collections import deque
from typing import Iterable, Iterator

from lamina.spec.errors import LaminaError

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO, OPT_STRUCTURED_REPLY, OPT_SET_META_CONTEXT = 7, 8, 10
REP_ACK, REP_INFO, REP_META_CONTEXT = 1, 3, 4
REP_ERROR_BIT = 1 << 31
INFO_EXPORT = 0

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 0, 1, 2, 3, 4, 6, 7
CMD_FLAG_NO_HOLE = 1 << 1

TFLAG_READ_ONLY, TFLAG_SEND_FLUSH, TFLAG_SEND_TRIM, TFLAG_SEND_WRITE_ZEROES = 1 << 1, 1 << 2, 1 << 5, 1 << 6

REPLY_FLAG_DONE = 1
REPLY_NONE, REPLY_OFFSET_DATA, REPLY_OFFSET_HOLE, REPLY_BLOCK_STATUS = 0, 1, 2, 5
REPLY_ERROR_BIT = 1 << 15

STATE_HOLE, STATE_ZERO = 1, 2  # base:allocation
MAX_REQUEST = 1 << 25  # 32 MiB: qemu-nbd's limit, and the protocol's suggested one


class NbdError(LaminaError):
    """The NBD server refused or failed a request."""


class NbdProtocolError(NbdError):
    """The NBD server sent something the protocol does not allow."""


class NbdClient:
    """One connection to an export: `size`, `read`, `write`, `zero`, `trim`, `flush`, `block_status`, `close`."""

    def __init__(self, path: str, export: str = "", timeout: float | None = 60.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._cookie = 0
        self.meta_context: int | None = None
        self.structured = False
        self.flags = 0
        self.busy = False  # a request is between its send and its last reply chunk (an interrupt left it so)
        self._writes: set[int] = set()  # cookies of writes sent by `submit_write` and not yet answered
        self.size = 0
        try:
            self._sock.connect(path)
            self._handshake(export.encode())
        except BaseException:
            self._sock.close()
            raise

    # ----------------------------------------------------------------- wire helpers
    def _recv(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            chunk = self._sock.recv(min(n - got, 1 << 20))
            if not chunk:
                raise NbdProtocolError("the NBD server closed the connection")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _recv_into(self, view: memoryview) -> None:
        """Fill `view` from the socket: data goes straight into the caller's buffer, with no copies."""
        got = 0
        while got < len(view):
            n = self._sock.recv_into(view[got:])
            if not n:
                raise NbdProtocolError("the NBD server closed the connection")
            got += n

    def _option(self, option: int, data: bytes = b"") -> None:
        self._sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)

    def _option_reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, kind, length = struct.unpack(">QIII", self._recv(20))
        if magic != OPT_REPLY_MAGIC or opt != option:
            raise NbdProtocolError(f"bad option reply (magic {magic:#x}, option {opt})")
        return kind, self._recv(length)

    def _handshake(self, export: bytes) -> None:
        magic, opt_magic, flags = struct.unpack(">8sQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdProtocolError("the server does not speak the fixed newstyle NBD handshake")
        self._sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        self._option(OPT_STRUCTURED_REPLY)
        kind, _ = self._option_reply(OPT_STRUCTURED_REPLY)
        self.structured = kind == REP_ACK
        if self.structured:
            query = b"base:allocation"
            self._option(OPT_SET_META_CONTEXT,
                         struct.pack(">I", len(export)) + export + struct.pack(">II", 1, len(query)) + query)
            while True:
                kind, data = self._option_reply(OPT_SET_META_CONTEXT)
                if kind == REP_META_CONTEXT and data[4:] == query:
                    self.meta_context = struct.unpack(">I", data[:4])[0]
                elif kind == REP_ACK or kind & REP_ERROR_BIT:
                    break
        self._option(OPT_GO, struct.pack(">I", len(export)) + export + struct.pack(">HH", 1, INFO_EXPORT))
        size = None
        while True:
            kind, data = self._option_reply(OPT_GO)
            if kind == REP_INFO and len(data) >= 12 and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
                size, self.flags = struct.unpack(">QH", data[2:12])
            elif kind == REP_ACK:
                break
            elif kind & REP_ERROR_BIT:
                raise NbdError(f"the NBD server refused export {export.decode(errors='replace')!r}: "
                               f"{data.decode(errors='replace') or kind & ~REP_ERROR_BIT}")
        if size is None:
            raise NbdProtocolError("the NBD server gave no export size")
        self.size = size

    def _request(self, command: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> int:
        self._cookie += 1
        self.busy = command != CMD_DISC
        header = struct.pack(">IHHQQI", REQUEST_MAGIC, flags, command, self._cookie, offset, length)
        if len(data) < 4096:
            self._sock.sendall(header + data)
        else:  # no copy of a large payload
            self._sock.sendall(header)
            self._sock.sendall(data)
        return self._cookie

    def _replies(self, cookie: int, what: str):
        """Yield (type, payload) of the reply chunks to request `cookie`; a simple reply yields (None, b"")."""
        failure: NbdError | None = None  # an error chunk: raised once the reply is complete, keeping the stream in step
        while True:
            magic = struct.unpack(">I", self._recv(4))[0]
            if magic == SIMPLE_REPLY_MAGIC:
                error, got = struct.unpack(">IQ", self._recv(12))
                self._check_cookie(got, cookie)
                if error:
                    self.busy = False
                    raise NbdError(f"NBD {what} failed: error {error}")
                yield None, b""
                self.busy = False
                return
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NbdProtocolError(f"bad reply magic {magic:#x}")
            flags, kind, got, length = struct.unpack(">HHQI", self._recv(16))
            self._check_cookie(got, cookie)
            payload = self._recv(length)
            if kind & REPLY_ERROR_BIT:
                error, msg_len = struct.unpack(">IH", payload[:6])
                message = payload[6 : 6 + msg_len].decode(errors="replace")
                failure = failure or NbdError(f"NBD {what} failed: error {error}{': ' + message if message else ''}")
            elif kind != REPLY_NONE and failure is None:
                yield kind, payload
            if flags & REPLY_FLAG_DONE:
                self.busy = False
                if failure is not None:
                    raise failure
                return

    @staticmethod
    def _check_cookie(got: int, expected: int) -> None:
        if got != expected:
            raise NbdProtocolError(f"reply to request {got}, expected {expected}")

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size or length > MAX_REQUEST:
            raise NbdError(f"request [{offset}, +{length}) is outside the export of {self.size} bytes")

    # ----------------------------------------------------------------- commands
    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        self.drain()
        cookie = self._request(CMD_READ, offset, length)
        out = bytearray(length)
        for kind, payload in self._replies(cookie, "read"):
            if kind is None:
                out[:] = self._recv(length)
            else:
                _place_chunk(out, kind, payload, offset, length)
        return bytes(out)

    def reads(self, pieces: Iterable[tuple[int, int]], depth: int = 8) -> Iterator[tuple[int, int, bytes]]:
        """Read every (offset, length) piece with up to `depth` requests in flight; yield (offset, length, data) in order.

        qemu-nbd serves one request at a time per request: keeping several in
        flight (as `qemu-img convert` does) is what makes a copy fast.  Replies
        may come in any order and, structured, interleave chunk by chunk: each
        is matched to its request by cookie.  Nothing else may be sent meanwhile.
        """
        pending: dict[int, tuple[int, int, bytearray]] = {}
        order: deque[int] = deque()
        finished: set[int] = set()
        source = iter(pieces)
        more = True
        while True:
            while more and len(order) < depth:
                piece = next(source, None)
                if piece is None:
                    more = False
                    break
                offset, length = piece
                self._check(offset, length)
                cookie = self._request(CMD_READ, offset, length)
                pending[cookie] = (offset, length, bytearray(length))
                order.append(cookie)
                self.busy = True
            if not order:
                self.busy = False
                return
            while order[0] not in finished:
                self._read_reply_chunk(pending, finished)
            cookie = order.popleft()
            finished.discard(cookie)
            offset, length, buf = pending.pop(cookie)
            self.busy = bool(order)
            yield offset, length, bytes(buf)

    def _read_reply_chunk(self, pending: dict[int, tuple[int, int, bytearray]], finished: set[int]) -> None:
        """Receive one reply (simple) or reply chunk (structured) to one of the `pending` reads."""
        magic = struct.unpack(">I", self._recv(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self._recv(12))
            if cookie not in pending:
                raise NbdProtocolError(f"reply to unknown request {cookie}")
            if error:
                raise NbdError(f"NBD read at {pending[cookie][0]} failed: error {error}")
            self._recv_into(memoryview(pending[cookie][2]))
            finished.add(cookie)
            return
        if magic != STRUCTURED_REPLY_MAGIC:
            raise NbdProtocolError(f"bad reply magic {magic:#x}")
        flags, kind, cookie, length = struct.unpack(">HHQI", self._recv(16))
        if cookie not in pending:
            raise NbdProtocolError(f"reply to unknown request {cookie}")
        offset, size, buf = pending[cookie]
        if kind == REPLY_OFFSET_DATA and length >= 8:  # the data itself goes straight into its place
            at = struct.unpack(">Q", self._recv(8))[0] - offset
            if at < 0 or at + length - 8 > size:
                raise NbdProtocolError("read reply chunk outside the request")
            self._recv_into(memoryview(buf)[at : at + length - 8])
            if flags & REPLY_FLAG_DONE:
                finished.add(cookie)
            return
        payload = self._recv(length)
        if kind & REPLY_ERROR_BIT:
            error, msg_len = struct.unpack(">IH", payload[:6])
            message = payload[6 : 6 + msg_len].decode(errors="replace")
            raise NbdError(f"NBD read at {offset} failed: error {error}{': ' + message if message else ''}")
        _place_chunk(buf, kind, payload, offset, size)
        if flags & REPLY_FLAG_DONE:
            finished.add(cookie)

    def _simple(self, command: int, offset: int, length: int, what: str, flags: int = 0, data: bytes = b"") -> None:
        self.drain()  # the pipelined writes' replies first: then this request's reply is the next on the wire
        for _ in self._replies(self._request(command, offset, length, flags, data), what):
            pass

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self._simple(CMD_WRITE, offset, len(data), "write", data=data)

    def submit_write(self, offset: int, data: bytes, depth: int = 8) -> None:
        """Send a write without waiting for its reply, keeping at most `depth` in flight; `drain` waits for all.

        An error reply raises at a later `submit_write` or at `drain`.
        """
        self._check(offset, len(data))
        while len(self._writes) >= depth:
            self._write_reply()
        self._writes.add(self._request(CMD_WRITE, offset, len(data), data=data))

    def drain(self) -> None:
        """Wait for the reply to every write `submit_write` sent."""
        while self._writes:
            self._write_reply()
        self.busy = False

    def _write_reply(self) -> None:
        magic = struct.unpack(">I", self._recv(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self._recv(12))
            done, failure = True, f"error {error}" if error else None
        elif magic == STRUCTURED_REPLY_MAGIC:
            flags, kind, cookie, length = struct.unpack(">HHQI", self._recv(16))
            payload = self._recv(length)
            done, failure = bool(flags & REPLY_FLAG_DONE), None
            if kind & REPLY_ERROR_BIT:
                error, msg_len = struct.unpack(">IH", payload[:6])
                failure = f"error {error}: {payload[6 : 6 + msg_len].decode(errors='replace')}"
        else:
            raise NbdProtocolError(f"bad reply magic {magic:#x}")
        if cookie not in self._writes:
            raise NbdProtocolError(f"reply to unknown request {cookie}")
        if failure:
            raise NbdError(f"NBD write failed: {failure}")
        if done:
            self._writes.discard(cookie)

    def zero(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read zero (the server may punch a hole)."""
        self._check(offset, length)
        if self.flags & TFLAG_SEND_WRITE_ZEROES:
            self._simple(CMD_WRITE_ZEROES, offset, length, "write-zeroes")
        else:
            self.write(offset, bytes(length))

    def trim(self, offset: int, length: int) -> None:
        self._check(offset, length)
        if self.flags & TFLAG_SEND_TRIM:
            self._simple(CMD_TRIM, offset, length, "trim")

    def flush(self) -> None:
        self.drain()
        if self.flags & TFLAG_SEND_FLUSH:
            self._simple(CMD_FLUSH, 0, 0, "flush")

    def block_status(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """(start, length, flags) runs from `offset`, covering at least its first byte; flags of `base:allocation`.

        Without the context (a server that lacks it) everything is reported as data.
        """
        length = min(length, self.size - offset, 1 << 30)
        if self.meta_context is None:
            return [(offset, length, 0)]
        self.drain()
        cookie = self._request(CMD_BLOCK_STATUS, offset, length)
        runs: list[tuple[int, int, int]] = []
        for kind, payload in self._replies(cookie, "block status"):
            if kind != REPLY_BLOCK_STATUS or struct.unpack(">I", payload[:4])[0] != self.meta_context:
                continue
            pos = offset
            for i in range(4, len(payload) - 7, 8):
                n, flags = struct.unpack(">II", payload[i : i + 8])
                n = min(n, offset + length - pos)
                if n <= 0:
                    break
                runs.append((pos, n, flags))
                pos += n
        if not runs:
            raise NbdProtocolError(f"no block status for offset {offset}")
        return runs

    def data_ranges(self, chunk: int = 1 << 30):
        """(start, length) of every range not reported as reading zero, merged, in order."""
        pos, current = 0, None
        while pos < self.size:
            for start, n, flags in self.block_status(pos, chunk):
                if not flags & STATE_ZERO:
                    if current and current[0] + current[1] == start:
                        current = (current[0], current[1] + n)
                    else:
                        if current:
                            yield current
                        current = (start, n)
                pos = start + n
        if current:
            yield current

    def close(self) -> None:
        """Say goodbye (NBD_CMD_DISC) and close; a server without `-t` then exits by itself.

        A connection left in the middle of a request is only closed: the stream is out of step.
        """
        try:
            if not self.busy:
                self._request(CMD_DISC, 0, 0)
        except OSError:
            pass
        finally:
            self._sock.close()


def _place_chunk(buf: bytearray, kind: int, payload: bytes, offset: int, size: int) -> None:
    """Put a structured read reply's data or hole chunk in its place in the request's buffer; other kinds: nothing."""
    if kind == REPLY_OFFSET_DATA:
        at = struct.unpack(">Q", payload[:8])[0] - offset
        if at < 0 or at + len(payload) - 8 > size:
            raise NbdProtocolError("read reply chunk outside the request")
        buf[at : at + len(payload) - 8] = payload[8:]
    elif kind == REPLY_OFFSET_HOLE:
        at, hole = struct.unpack(">QI", payload[:12])
        at -= offset
        if at < 0 or at + hole > size:
            raise NbdProtocolError("read hole chunk outside the request")
        buf[at : at + hole] = bytes(hole)
