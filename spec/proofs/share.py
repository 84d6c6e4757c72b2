"""The order of dedup's writes (F-SHARE-005): store durable before any reference, punch after the map commit.

One cluster of a frozen layer holds the bytes D at its local place; dedup
shares it.  The targets: the store's data cluster (a hole, then D), the
store's map entry saying the cluster is allocated (the store's own two-copy
commit is P-COMMIT-001's; here it is one target that a torn write leaves
invalid), the layer's two map copies (version 1 says "local", version 2
says "shared": store cluster s), and the layer's local place (D, then a
hole).  The trace is `impl/dedup.py`'s: store data and map, fsync (the
store's flush); layer map copy A with the reference, fsync, copy B; punch
the local place; fsync (before the root that drops the intents).  Each
fsync of the trace follows writes of one file only, so modelling it as a
barrier for every earlier write is exact.

Claim P-SHARE-001: after a crash at any point, with any subset, order and
tear of un-synced writes, the cluster reads D: the current map copy (the
spec's selection rule) either says local and the local place holds D, or
says shared and the store's map marks the cluster allocated and its data
is D.  Two negative controls: the references written before the store's
cluster is durable (NEG-SHARE-001), the local place punched before the map
with the reference is committed (NEG-SHARE-002).
"""
from __future__ import annotations

from typing import Literal

import z3

from .commit import recover
from .core import Outcome, as_int, prove
from .disk import Copy, Fsync, Op, SymbolicDisk, Write

Variant = Literal["spec", "reference_before_store", "punch_before_commit"]
D = 7  # the cluster's bytes (a content tag)
HOLE = 0
LOCAL, SHARED = 1, 2  # what a map copy says of the cluster


def _trace(variant: Variant) -> list[Op]:
    store = [Write("store.data", Copy.of(1, D), "store cluster := D"),
             Write("store.map", Copy.of(2, 1), "store map: allocated"), Fsync("fsync (the store's flush)")]
    maps = [Write("map.0", Copy.of(2, SHARED), "map copy A: shared"), Fsync("fsync (first map copies)"),
            Write("map.1", Copy.of(2, SHARED), "map copy B: shared")]
    punch = [Write("local", Copy.of(1, HOLE), "punch the local place")]
    tail = [Fsync("fsync (before the root dropping the intents)")]
    if variant == "reference_before_store":
        return maps + punch + tail + store
    if variant == "punch_before_commit":
        return store + punch + [Fsync("fsync")] + maps + tail
    return store + maps + punch + tail


def check_share_order(variant: Variant = "spec") -> Outcome:
    """After any crash during a dedup of one cluster, the frozen layer still reads its bytes."""
    initial = {"store.data": Copy.of(1, HOLE), "store.map": Copy.of(1, 0),
               "map.0": Copy.of(1, LOCAL), "map.1": Copy.of(1, LOCAL), "local": Copy.of(1, D)}
    disk = SymbolicDisk(_trace(variant), initial, "share_")
    final = {t: disk.final(t) for t in initial}
    chosen = recover(final["map.0"], final["map.1"])
    local = z3.And(final["local"].valid, final["local"].content == D)
    stored = z3.And(final["store.map"].valid, final["store.map"].content == 1,
                    final["store.data"].valid, final["store.data"].content == D)
    claim = z3.And(chosen.found, z3.If(chosen.content == SHARED, stored, local))

    def render(model: z3.ModelRef) -> str:
        lines = disk.render(model, lambda m, c: f"{'valid' if as_int(m, c.valid) else 'INVALID'} "
                                                f"g{as_int(m, c.generation)} c{as_int(m, c.content)}")
        says = "shared" if as_int(model, chosen.content) == SHARED else "local"
        lines.append(f"  recovered map says {says}; the cluster does not read D")
        return "\n".join(lines)

    return prove(disk.constraints, claim, render)
