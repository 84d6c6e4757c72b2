"""Where new layer uuids and snapshot creation times come from.

Every `image_uuid` a writer makes and every snapshot's `creation_time_ns`
is drawn here, so that a caller who must reproduce images byte for byte
(the conformance kit's vectors) can fix both with `fixed_identities`
instead of patching the modules that use them.  By default uuids are
random (version 4 uuids, as `uuid.uuid4` makes them, without importing `uuid`:
its import costs every command's start-up) and times are the host clock (`time.time_ns`).
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Iterator

import attrs


@attrs.define
class IdentitySource:
    """A deterministic source: uuids derived from `seed` and a counter, times from a clock that ticks per call."""

    seed: str
    clock_ns: int
    step_ns: int = 1_000_000_000
    drawn: int = 0

    def new_uuid(self) -> bytes:
        import hashlib

        self.drawn += 1
        return _version_4(hashlib.sha256(f"{self.seed}:{self.drawn}".encode()).digest()[:16])

    def now_ns(self) -> int:
        self.clock_ns += self.step_ns
        return self.clock_ns


_local = threading.local()


def _version_4(raw: bytes) -> bytes:
    """16 bytes marked as a version 4 uuid of the RFC 4122 variant, as `uuid.uuid4` marks them."""
    marked = bytearray(raw)
    marked[6] = marked[6] & 0x0F | 0x40
    marked[8] = marked[8] & 0x3F | 0x80
    return bytes(marked)


def _source() -> IdentitySource | None:
    return getattr(_local, "source", None)


def new_uuid() -> bytes:
    """The `image_uuid` of a new layer file."""
    source = _source()
    return source.new_uuid() if source is not None else _version_4(os.urandom(16))


def now_ns() -> int:
    """The host time recorded in a new snapshot entry, ns since the Unix epoch."""
    source = _source()
    return source.now_ns() if source is not None else time.time_ns()


@contextlib.contextmanager
def fixed_identities(seed: str, clock_ns: int = 1_700_000_000 * 10**9) -> Iterator[IdentitySource]:
    """Within the block (in this thread), uuids follow `seed` and the clock starts at `clock_ns`."""
    previous = _source()
    _local.source = IdentitySource(seed, clock_ns)
    try:
        yield _local.source
    finally:
        _local.source = previous
