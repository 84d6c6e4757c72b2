"""The workload library: guest I/O patterns as compact step tuples (part 1 of 4: workload).

Steps are small tuples, not byte strings, so workloads shrink fast, print in
one line and regenerate exactly from a name (random ones from their seed).
Images are small (4 KiB clusters, one or two regions) so states are cheap.

Step forms: ("write", offset, length, pattern), ("zero", offset, length),
("discard", offset, length), ("flush",), ("resize", new_size).
"""
from __future__ import annotations

import random

import attrs

from lamina.spec.layout import SECTOR_SIZE

from .errors import UnknownWorkload

Step = tuple
K = 1024
CLUSTER = 4 * K
REGION = 128 * CLUSTER  # guest bytes of one region with 4 KiB clusters (512 KiB)


@attrs.frozen
class Workload:
    """A named guest I/O pattern: `setup` runs and is made durable before recording, `steps` are recorded."""

    name: str
    doc: str
    virtual_size: int
    steps: tuple[Step, ...]
    setup: tuple[Step, ...] = ()
    cluster_size: int = CLUSTER
    create_in_trace: bool = False  # record Image.create itself (crashes during creation)
    max_intents: int = 0  # a lowered intent-list limit for the writer (0: the implementation's own)
    settle_interval: int = 0  # a lowered idle-eviction interval in flushes (0: SETTLE_INTERVAL)

    def without_steps(self, dropped: frozenset[int]) -> "Workload":
        """The same workload with some recorded steps removed (used when shrinking a failure)."""
        if not dropped:
            return self
        steps = tuple(s for i, s in enumerate(self.steps) if i not in dropped)
        return attrs.evolve(self, steps=steps)


def pattern_bytes(pattern: int, offset: int, length: int) -> bytes:
    """Distinctive bytes: each 512 B sector of a write gets its own byte value, never zero."""
    out = bytearray()
    pos = offset
    end = offset + length
    while pos < end:
        sector_end = min(end, (pos // SECTOR_SIZE + 1) * SECTOR_SIZE)
        out += bytes([(pattern * 37 + pos // SECTOR_SIZE) % 251 + 1]) * (sector_end - pos)
        pos = sector_end
    return bytes(out)


_LIBRARY = [
    Workload("overwrite", "overwrite flushed data in place, partly flushed again, partly not",
             REGION, (("write", 0, 8 * K, 2), ("flush",), ("write", 4 * K, 8 * K, 3), ("write", 512, 1024, 4)),
             setup=(("write", 0, 16 * K, 1),)),
    Workload("allocate", "first writes into never-written clusters of a fresh image, with a flush between",
             REGION, (("write", 0, 4 * K, 1), ("flush",), ("write", 64 * K, 8 * K, 2), ("write", 12 * K, 4 * K, 3))),
    Workload("partial-cluster", "sub-cluster and unaligned writes that merge with neighbouring sectors",
             REGION, (("write", 100, 300, 1), ("write", 1536, 2048, 2), ("flush",), ("write", 3000, 2000, 3)),
             setup=(("write", 0, 8 * K, 5),)),
    Workload("discard", "discard and write-zeroes over flushed data, then rewrite part of it",
             REGION, (("discard", 0, 4 * K), ("zero", 6 * K, 1536), ("flush",), ("discard", 8 * K, 8 * K), ("write", 9 * K, 1 * K, 4)),
             setup=(("write", 0, 16 * K, 1),)),
    Workload("resize", "grow, write in the new space, shrink back below it, grow again",
             REGION, (("resize", REGION + 64 * K), ("write", REGION + 4 * K, 4 * K, 2), ("flush",),
                      ("resize", REGION - 32 * K), ("resize", REGION)),
             setup=(("write", REGION - 40 * K, 16 * K, 1),)),
    Workload("multi-region", "writes that span two regions and so two intents and two maps",
             2 * REGION, (("write", REGION - 4 * K, 8 * K, 2), ("flush",), ("write", 0, 4 * K, 3), ("write", REGION + 8 * K, 4 * K, 4)),
             setup=(("write", REGION - 8 * K, 16 * K, 1),)),
    Workload("dirty-regions", "two regions dirty before one flush: fresh sectors in both (one write across the region "
             "boundary, overwriting flushed data on its way), then an overwrite of what that flush acknowledged",
             2 * REGION, (("write", 4 * K, 4 * K, 2), ("write", REGION - 4 * K, 8 * K, 3), ("flush",),
                          ("write", REGION + 512, 1 * K, 4)),
             setup=(("write", REGION - 8 * K, 8 * K, 1),)),
    Workload("overwrite-flushes", "overwrites of present sectors across several flushes: the region stays listed "
             "and its checksums are deferred (no map write), then an allocation in the same region commits its map",
             REGION, (("write", 0, 4 * K, 2), ("flush",), ("write", 4 * K, 8 * K, 3), ("flush",), ("write", 512, 1024, 4),
                      ("flush",), ("write", 20 * K, 4 * K, 5), ("write", 2 * K, 4 * K, 6)),
             setup=(("write", 0, 16 * K, 1),)),
    Workload("evict-full", "the intent list (lowered to 2 regions) overflows: the least recently written region's "
             "deferred map is committed before a root write drops it, once after a flush and once forcing one",
             4 * REGION, (("write", 0, 4 * K, 2), ("flush",), ("write", REGION, 4 * K, 3), ("write", 2 * REGION, 4 * K, 4),
                          ("write", 3 * REGION + 8 * K, 4 * K, 5)),
             setup=tuple(("write", r * REGION, 16 * K, 1) for r in range(4)), max_intents=2),
    Workload("idle-evict", "idle eviction (interval lowered to 2 flushes): a region not written for that long has its "
             "deferred map committed and is dropped by one root write, then is written and listed again",
             2 * REGION, (("write", 0, 4 * K, 2), ("flush",), ("write", REGION, 4 * K, 3), ("flush",),
                          ("write", REGION + 4 * K, 4 * K, 4), ("flush",), ("flush",), ("write", 8 * K, 4 * K, 5),
                          ("flush",), ("write", 4 * K, 4 * K, 6)),
             setup=(("write", 0, 16 * K, 1), ("write", REGION, 16 * K, 1)), settle_interval=2),
    Workload("shrink-deferred", "a shrink over regions with deferred checksums: their maps are committed before "
             "the root with the new size lists only the last partial region",
             2 * REGION, (("write", 4 * K, 4 * K, 2), ("write", REGION + 4 * K, 4 * K, 3), ("flush",),
                          ("resize", REGION - 32 * K), ("write", 8 * K, 4 * K, 4), ("resize", 2 * REGION)),
             setup=(("write", 0, 16 * K, 1), ("write", REGION, 16 * K, 1))),
    Workload("create", "creation of the image itself (temporary file, rename, directory fsync) and a first write",
             REGION, (("write", 0, 4 * K, 1), ("flush",)), create_in_trace=True),
]
LIBRARY: dict[str, Workload] = {w.name: w for w in _LIBRARY}


def random_workload(seed: int, length: int = 8) -> Workload:
    """A seeded random workload of `length` steps over a two-region image."""
    rng = random.Random(seed)
    size = 2 * REGION
    steps: list[Step] = []
    for i in range(length):
        kind = rng.choices(["write", "flush", "zero", "discard", "resize"], [6, 2, 1, 1, 1])[0]
        if kind == "flush":
            steps.append(("flush",))
        elif kind == "resize":
            size = rng.choice([REGION, REGION + 16 * K, 2 * REGION - 64 * K, 2 * REGION])
            steps.append(("resize", size))
        else:
            sectors = size // SECTOR_SIZE
            start = rng.randrange(sectors)
            count = rng.choice([1, 3, 8, 16])
            count = min(count, sectors - start)
            offset, length_ = start * SECTOR_SIZE, count * SECTOR_SIZE
            if kind == "write" and rng.random() < 0.3 and length_ > 200:
                offset, length_ = offset + 100, length_ - 200  # unaligned
            if kind == "write":
                steps.append(("write", offset, length_, i + 1))
            else:
                steps.append((kind, offset, length_))
    return Workload(f"random-{seed}-{length}", f"seeded random workload (seed {seed}, {length} steps)", 2 * REGION,
                    tuple(steps))


def get_workload(name: str) -> Workload:
    """A library workload by name, or `random-SEED-LENGTH`."""
    if name in LIBRARY:
        return LIBRARY[name]
    from .trees import TREE_LIBRARY

    if name in TREE_LIBRARY:
        return TREE_LIBRARY[name]
    if name.startswith("random-"):
        parts = name.split("-")
        try:
            return random_workload(int(parts[1]), int(parts[2]) if len(parts) > 2 else 8)
        except (ValueError, IndexError):
            pass
    raise UnknownWorkload(f"no workload named {name!r}; known: {', '.join(LIBRARY)}, {', '.join(TREE_LIBRARY)} "
                          "or random-SEED-LENGTH")
