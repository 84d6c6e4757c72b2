"""The layout proofs: no overlap, no overflow, alignment, for every admitted parameter (S5).

`SymbolicGeometry` restates `lamina.spec.layout.Geometry` over the arithmetic
of `arith`, so the same formulas run on Python ints (cross-checked against the
spec's `Geometry` by `cross_check_geometry`) and on 64-bit z3 bit-vectors (the
proofs).  The spec's `Geometry` itself cannot take z3 values: it uses `max()`
and `//`, which z3 bit-vectors do not support.  Every constant comes from
`lamina.spec.layout` and `lamina.spec.structures`.
"""
from __future__ import annotations

from typing import Any, Callable

import attrs
import z3

from ..declare import declared_fields
from ..layout import (
    CLUSTERS_PER_REGION,
    MAX_CLUSTER_BITS,
    MAX_INTENTS,
    MAX_VIRTUAL_SIZE,
    MAP_BITMAP_OFFSET,
    MIN_CLUSTER_BITS,
    REGION_STRIDE_CLUSTERS,
    ROOT_AREA_SIZE,
    MAX_BASE_PATH,
    MAX_SNAPSHOTS,
    ROOT_SIZE,
    ROOT_SLOT_SIZE,
    ROOT_SLOTS,
    SECTOR_SIZE,
    SNAPSHOT_ENTRY_SIZE,
    Geometry,
    root_copy_offset,
)
from ..structures import MapCopy, Root
from .arith import WORD_BITS, Arith, BitVecArith, ExactArith, IntArith
from .core import Outcome, as_int, find_witness, prove

OFF_T_MAX = (1 << 63) - 1


@attrs.frozen
class SymbolicGeometry:
    """`Geometry`'s formulas over any `Arith`; `stride_clusters` exists only for the negative control."""

    arith: Arith
    cluster_bits: Any
    virtual_size: Any
    stride_clusters: int = REGION_STRIDE_CLUSTERS

    def cluster_size(self) -> Any:
        a = self.arith
        return a.shl(a.const(1), self.cluster_bits)

    def sectors_per_cluster(self) -> Any:
        a = self.arith
        return a.udiv(self.cluster_size(), a.const(SECTOR_SIZE))

    def region_span(self) -> Any:
        a = self.arith
        return a.mul(a.const(CLUSTERS_PER_REGION), self.cluster_size())

    def region_stride(self) -> Any:
        a = self.arith
        return a.mul(a.const(self.stride_clusters), self.cluster_size())

    def first_region_offset(self) -> Any:
        a = self.arith
        return a.umax(a.const(ROOT_AREA_SIZE), self.cluster_size())

    def _ceil_div(self, value: Any, unit: Any) -> Any:
        a = self.arith
        return a.udiv(a.add(value, a.sub(unit, a.const(1))), unit)

    def num_regions(self) -> Any:
        return self._ceil_div(self.virtual_size, self.region_span())

    def num_clusters(self) -> Any:
        return self._ceil_div(self.virtual_size, self.cluster_size())

    def file_length(self) -> Any:
        a = self.arith
        return a.add(self.first_region_offset(), a.mul(self.num_regions(), self.region_stride()))

    def map_bitmap_size(self) -> Any:
        a = self.arith
        return a.udiv(a.mul(a.const(CLUSTERS_PER_REGION), self.sectors_per_cluster()), a.const(8))

    def map_used_length(self) -> Any:
        a = self.arith
        return a.add(a.const(MAP_BITMAP_OFFSET), self.map_bitmap_size())

    def region_offset(self, region: Any) -> Any:
        a = self.arith
        return a.add(self.first_region_offset(), a.mul(region, self.region_stride()))

    def map_copy_offset(self, region: Any, slot: Any) -> Any:
        """As the spec: copy B sits `REGION_STRIDE_CLUSTERS - 1` clusters after copy A, whatever the stride."""
        a = self.arith
        last = a.const(REGION_STRIDE_CLUSTERS - 1)
        return a.add(self.region_offset(region), a.mul(a.mul(slot, last), self.cluster_size()))

    def region_data_offset(self, region: Any) -> Any:
        a = self.arith
        return a.add(self.region_offset(region), self.cluster_size())

    def region_of(self, offset: Any) -> Any:
        return self.arith.udiv(offset, self.region_span())

    def cluster_of(self, offset: Any) -> Any:
        return self.arith.udiv(offset, self.cluster_size())

    def guest_to_file(self, offset: Any) -> Any:
        a = self.arith
        region = a.udiv(offset, self.region_span())
        within = a.urem(offset, self.region_span())
        return a.add(self.region_data_offset(region), within)

    def cluster_file_offset(self, cluster: Any) -> Any:
        a = self.arith
        return self.guest_to_file(a.mul(cluster, self.cluster_size()))


# ---------------------------------------------------------------- concrete cross-check

SAMPLE_VIRTUAL_SIZES = (0, 512, 4096, 65536 - 512, 1 << 20, 3 * (1 << 23) + 512, (1 << 40) + 1024, MAX_VIRTUAL_SIZE)


def cross_check_geometry() -> int:
    """Evaluate the symbolic formulas on ints and on z3 constants; both must equal `Geometry`.

    Returns the number of values compared; raises AssertionError on the first
    disagreement.  This ties the proofs to the spec's own formulas.
    """
    compared = 0
    names = ("cluster_size", "sectors_per_cluster", "region_span", "region_stride", "first_region_offset",
             "num_regions", "num_clusters", "file_length", "map_bitmap_size", "map_used_length")
    for bits in range(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS + 1):
        for size in SAMPLE_VIRTUAL_SIZES:
            spec = Geometry(bits, size)
            ints = SymbolicGeometry(IntArith(), bits, size)
            vecs = SymbolicGeometry(BitVecArith(), z3.BitVecVal(bits, WORD_BITS), z3.BitVecVal(size, WORD_BITS))
            pairs: list[tuple[str, int, Any, Any]] = [
                (name, getattr(spec, name), getattr(ints, name)(), getattr(vecs, name)()) for name in names]
            regions = sorted({0, max(spec.num_regions - 1, 0)})
            for region in regions:
                for slot in range(2):
                    pairs.append((f"map_copy_offset({region},{slot})", spec.map_copy_offset(region, slot),
                                  ints.map_copy_offset(region, slot),
                                  vecs.map_copy_offset(z3.BitVecVal(region, WORD_BITS), z3.BitVecVal(slot, WORD_BITS))))
            for guest in sorted({0, 511, size // 3 // SECTOR_SIZE * SECTOR_SIZE, max(size - 1, 0)}):
                pairs.append((f"guest_to_file({guest})", spec.guest_to_file(guest), ints.guest_to_file(guest),
                              vecs.guest_to_file(z3.BitVecVal(guest, WORD_BITS))))
            for name, expected, concrete, symbolic in pairs:
                evaluated = z3.simplify(symbolic).as_long()
                assert expected == concrete == evaluated, (
                    f"{name} for cluster_bits={bits} virtual_size={size}: "
                    f"spec {expected}, ints {concrete}, z3 {evaluated}")
                compared += 1
            assert all(ints.arith.no_wrap), f"a formula wraps for cluster_bits={bits} virtual_size={size}"
    return compared


# ---------------------------------------------------------------- the symbolic parameters


def word(name: str) -> z3.BitVecRef:
    return z3.BitVec(name, WORD_BITS)


def c64(value: int) -> z3.BitVecRef:
    return z3.BitVecVal(value, WORD_BITS)


def admitted(cluster_bits: z3.BitVecRef, virtual_size: z3.BitVecRef) -> list[z3.BoolRef]:
    """The parameters the spec admits (`cluster_size_to_bits`, `check_virtual_size`)."""
    return [
        z3.ULE(c64(MIN_CLUSTER_BITS), cluster_bits), z3.ULE(cluster_bits, c64(MAX_CLUSTER_BITS)),
        z3.URem(virtual_size, c64(SECTOR_SIZE)) == 0, z3.ULE(virtual_size, c64(MAX_VIRTUAL_SIZE)),
    ]


def field_limit(cls: type, name: str) -> int:
    """The largest value a declared unsigned field (or one element of a u32 array) holds."""
    info = dict(declared_fields(cls))[name]
    element = 4 if info.kind.startswith("u32[") else info.size
    assert element is not None
    return (1 << (8 * element)) - 1


def disjoint(start_a: Any, length_a: Any, start_b: Any, length_b: Any) -> z3.BoolRef:
    return z3.Or(z3.ULE(start_a + length_a, start_b), z3.ULE(start_b + length_b, start_a))


@attrs.frozen
class Layout:
    """One symbolic image: parameters, the geometry over them, and the admitted-parameter premises."""

    cluster_bits: z3.BitVecRef
    virtual_size: z3.BitVecRef
    geometry: SymbolicGeometry
    premises: list[z3.BoolRef]

    @classmethod
    def fresh(cls, stride_clusters: int = REGION_STRIDE_CLUSTERS) -> "Layout":
        bits, size = word("cluster_bits"), word("virtual_size")
        geometry = SymbolicGeometry(BitVecArith(), bits, size, stride_clusters)
        return cls(bits, size, geometry, admitted(bits, size))

    def cases(self) -> list[z3.BoolRef]:
        """One case per admitted cluster size: together they cover every image the spec admits."""
        return [self.cluster_bits == bits for bits in range(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS + 1)]

    def no_wrap(self) -> z3.BoolRef:
        """Every arithmetic step built so far stays inside 64 bits."""
        return z3.And(*self.geometry.arith.no_wrap)

    def describe(self, model: z3.ModelRef) -> str:
        bits, size = as_int(model, self.cluster_bits), as_int(model, self.virtual_size)
        return f"cluster_bits={bits} (cluster {1 << bits} B), virtual_size={size}"


def _render_objects(layout: Layout | None, objects: list[tuple[str, Any, Any]]) -> Callable[[z3.ModelRef], str]:
    """A counterexample as the file byte ranges of the objects it names (after the geometry, when given)."""
    def render(model: z3.ModelRef) -> str:
        lines = [layout.describe(model)] if layout is not None else []
        for label, start, length in objects:
            begin, size = as_int(model, start), as_int(model, length)
            label = label.format(**{str(d): as_int(model, d()) for d in model.decls()})
            lines.append(f"  {label}: file bytes [{begin}, {begin + size})")
        return "\n".join(lines)
    return render


# ---------------------------------------------------------------- the properties


def prove_root_copies_apart() -> Outcome:
    """Root copies are disjoint, inside the root area, and every region starts after the root area."""
    lay = Layout.fresh()
    g = lay.geometry
    slot_a, slot_b, region = word("root_slot_a"), word("root_slot_b"), word("region")
    premises = lay.premises + [z3.ULT(slot_a, ROOT_SLOTS), z3.ULT(slot_b, ROOT_SLOTS), slot_a != slot_b,
                               z3.ULT(region, g.num_regions())]
    # Each copy owns a slot of ROOT_SLOT_SIZE bytes at `root_copy_offset(slot)`; its longest possible
    # encoding (fixed part, longest base path, fullest snapshot table) must fit the slot.
    start_a, start_b = root_copy_offset(slot_a), root_copy_offset(slot_b)
    longest = ROOT_SIZE + -(-MAX_BASE_PATH // 8) * 8 + SNAPSHOT_ENTRY_SIZE * MAX_SNAPSHOTS
    claim = z3.And(
        z3.ULE(c64(longest), c64(ROOT_SLOT_SIZE)),
        disjoint(start_a, c64(ROOT_SLOT_SIZE), start_b, c64(ROOT_SLOT_SIZE)),
        z3.ULE(start_a + ROOT_SLOT_SIZE, c64(ROOT_AREA_SIZE)),
        z3.ULE(c64(ROOT_AREA_SIZE), g.first_region_offset()),
        z3.ULE(g.first_region_offset(), g.region_offset(region)),
        lay.no_wrap())
    return prove(premises, claim, _render_objects(lay, [
        ("root slot {root_slot_a}", start_a, c64(ROOT_SLOT_SIZE)), ("root slot {root_slot_b}", start_b, c64(ROOT_SLOT_SIZE)),
        ("region {region}", g.region_offset(region), g.region_stride())]), cases=lay.cases())


def _prove_exactly(build: Callable[[SymbolicGeometry, z3.ArithRef], tuple[list[z3.BoolRef], z3.BoolRef, Callable[[z3.ModelRef], str]]]) -> Outcome:
    """Prove a claim over exact integers, once per admitted cluster size (see `ExactArith`)."""
    seconds = 0.0
    for bits in range(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS + 1):
        size = z3.Int("virtual_size")
        g = SymbolicGeometry(ExactArith(), bits, size)
        premises = [size >= 0, size % SECTOR_SIZE == 0, size <= MAX_VIRTUAL_SIZE]
        more, claim, render = build(g, size)
        outcome = prove(premises + more, z3.And(claim, *g.arith.no_wrap),
                        lambda m, render=render, bits=bits: f"cluster_bits={bits}\n" + render(m))
        seconds += outcome.seconds
        if outcome.status == "refuted":
            return attrs.evolve(outcome, seconds=seconds)
    return Outcome("proved", seconds)


def _render_exact(objects: list[tuple[str, Any, Any]]) -> Callable[[z3.ModelRef], str]:
    return _render_objects(None, objects)


def prove_region_windows_apart() -> Outcome:
    """Regions follow each other without sharing a byte, and the last one ends within the file."""
    def build(g: SymbolicGeometry, size: z3.ArithRef) -> Any:
        r1, r2 = z3.Int("region_1"), z3.Int("region_2")
        premises = [0 <= r1, r1 < r2, r2 < g.num_regions()]
        claim = z3.And(g.region_offset(r1) + g.region_stride() <= g.region_offset(r2),
                       g.region_offset(r2) + g.region_stride() <= g.file_length())
        return premises, claim, _render_exact([("region {region_1}", g.region_offset(r1), g.region_stride()),
                                               ("region {region_2}", g.region_offset(r2), g.region_stride())])
    return _prove_exactly(build)


def _cluster_slots_claim(lay: Layout) -> Outcome:
    g = lay.geometry
    a = g.arith
    region, slot, k = word("region"), word("slot"), word("cluster")
    premises = lay.premises + [z3.ULT(region, g.num_regions()), z3.ULE(slot, 1), z3.ULT(k, CLUSTERS_PER_REGION)]
    size = g.cluster_size()
    base = g.region_offset(region)
    window = c64(lay.geometry.stride_clusters)
    map_index = a.mul(slot, c64(REGION_STRIDE_CLUSTERS - 1))
    data_index = a.add(k, c64(1))
    map_start = g.map_copy_offset(region, slot)
    data_start = g.cluster_file_offset(a.add(a.mul(region, c64(CLUSTERS_PER_REGION)), k))
    claim = z3.And(
        map_start == a.add(base, a.mul(map_index, size)), z3.ULT(map_index, window),
        data_start == a.add(base, a.mul(data_index, size)), z3.ULT(data_index, window),
        z3.ULT(c64(0), data_index), z3.ULT(data_index, c64(REGION_STRIDE_CLUSTERS - 1)),
        lay.no_wrap())
    return prove(premises, claim, _render_objects(lay, [
        ("region {region}", base, g.region_stride()),
        ("map copy slot {slot} of region {region}", map_start, size),
        ("data cluster {cluster} of region {region}", data_start, size)]), cases=lay.cases())


def prove_cluster_slots() -> Outcome:
    """Inside its region, map copy A is cluster 0, data cluster k is cluster k+1, map copy B is the last."""
    return _cluster_slots_claim(Layout.fresh())


def refute_layout_with_short_stride() -> Outcome:
    """Control: with regions one cluster short (129-cluster stride) map copy B spills into the next region."""
    outcome = _cluster_slots_claim(Layout.fresh(REGION_STRIDE_CLUSTERS - 1))
    note = "map copy B is not inside its 129-cluster region: it is the next region's map copy A\n"
    return attrs.evolve(outcome, detail=note + outcome.detail)


def prove_no_overlap() -> Outcome:
    """Any two distinct clusters of the region area (map copies or data) share no byte.

    Combines the two lemmas above: each object is cluster j of region r's
    window, windows of different regions are apart (the region bases are left
    free apart from that lemma), and different j are different clusters.
    """
    lay = Layout.fresh()
    g = lay.geometry
    a = g.arith
    r1, j1, b1, r2, j2, b2 = (word(n) for n in ("region_1", "index_1", "base_1", "region_2", "index_2", "base_2"))
    stride, size = g.region_stride(), g.cluster_size()
    window = c64(REGION_STRIDE_CLUSTERS)
    premises = lay.premises + [
        z3.ULT(j1, window), z3.ULT(j2, window), z3.Or(r1 != r2, j1 != j2),
        z3.Implies(r1 == r2, b1 == b2),
        z3.Implies(z3.ULT(r1, r2), z3.ULE(b1 + stride, b2)),
        z3.Implies(z3.ULT(r2, r1), z3.ULE(b2 + stride, b1)),
        z3.BVAddNoOverflow(b1, stride, False), z3.BVAddNoOverflow(b2, stride, False)]
    o1, o2 = a.add(b1, a.mul(j1, size)), a.add(b2, a.mul(j2, size))
    claim = z3.And(disjoint(o1, size, o2, size), lay.no_wrap())
    return prove(premises, claim, _render_objects(lay, [
        ("cluster {index_1} of region {region_1}", o1, size),
        ("cluster {index_2} of region {region_2}", o2, size)]), cases=lay.cases())


def prove_guest_bytes_in_place() -> Outcome:
    """Every guest byte lands in data cluster k of its region, at its own offset within that cluster."""
    lay = Layout.fresh()
    g = lay.geometry
    a = g.arith
    guest = word("guest_offset")
    premises = lay.premises + [z3.ULT(guest, lay.virtual_size)]
    size = g.cluster_size()
    region = g.region_of(guest)
    k = a.udiv(a.urem(guest, g.region_span()), size)
    target = g.guest_to_file(guest)
    claim = z3.And(
        target == a.add(a.add(g.region_offset(region), a.mul(a.add(k, c64(1)), size)), a.urem(guest, size)),
        z3.ULT(region, g.num_regions()), z3.ULT(k, CLUSTERS_PER_REGION),
        z3.ULT(g.cluster_of(guest), g.num_clusters()),
        lay.no_wrap())
    return prove(premises, claim, _render_objects(lay, [("guest byte {guest_offset}", target, c64(1))]),
                 cases=lay.cases())


def prove_extents_fit() -> Outcome:
    """Every offset and length fits a signed 64-bit off_t and the image's length; indices fit their fields."""
    region_limit = min(field_limit(MapCopy, "region"), field_limit(Root, "intents"))

    def build(g: SymbolicGeometry, size: z3.ArithRef) -> Any:
        region, slot, k = z3.Int("region"), z3.Int("slot"), z3.Int("cluster")
        premises = [0 <= region, region < g.num_regions(), z3.Or(slot == 0, slot == 1), 0 <= k,
                    k < CLUSTERS_PER_REGION]
        cluster = g.cluster_size()
        map_start = g.map_copy_offset(region, slot)
        # Data cluster k of the region, in the form P-LAYOUT-003 proves equal to `cluster_file_offset`
        # (the division there makes exact arithmetic slow for no gain).
        data_start = g.arith.add(g.region_data_offset(region), g.arith.mul(k, cluster))
        length = g.file_length()
        claim = z3.And(
            g.first_region_offset() <= map_start, map_start + cluster <= length,
            g.first_region_offset() <= data_start, data_start + cluster <= length,
            length <= OFF_T_MAX, region <= region_limit,
            size <= field_limit(Root, "virtual_size"),
            MAX_CLUSTER_BITS <= field_limit(Root, "cluster_bits"),
            MAX_INTENTS <= field_limit(Root, "num_intents"))
        return premises, claim, _render_exact([("map copy slot {slot} of region {region}", map_start, cluster),
                                               ("data cluster {cluster} of region {region}", data_start, cluster),
                                               ("whole file", z3.IntVal(0), length)])
    return _prove_exactly(build)


def prove_alignment() -> Outcome:
    """Regions, map copies and data clusters start on cluster boundaries, so the file is cluster-aligned."""
    lay = Layout.fresh()
    g = lay.geometry
    a = g.arith
    region, slot, k = word("region"), word("slot"), word("cluster")
    premises = lay.premises + [z3.ULT(region, g.num_regions()), z3.ULE(slot, 1), z3.ULT(k, CLUSTERS_PER_REGION)]
    size = g.cluster_size()
    data_start = g.cluster_file_offset(a.add(a.mul(region, c64(CLUSTERS_PER_REGION)), k))
    claim = z3.And(
        z3.URem(g.first_region_offset(), size) == 0,
        z3.URem(g.region_offset(region), size) == 0,
        z3.URem(g.map_copy_offset(region, slot), size) == 0,
        z3.URem(data_start, size) == 0,
        z3.URem(g.file_length(), size) == 0,
        z3.URem(size, SECTOR_SIZE) == 0,
        lay.no_wrap())
    return prove(premises, claim, _render_objects(lay, [
        ("map copy slot {slot} of region {region}", g.map_copy_offset(region, slot), size),
        ("data cluster {cluster} of region {region}", data_start, size)]), cases=lay.cases())


def prove_map_copy_fits_cluster() -> Outcome:
    """A map copy's used bytes fit its cluster, and its bitmap has one bit per guest sector of the region."""
    lay = Layout.fresh()
    g = lay.geometry
    a = g.arith
    claim = z3.And(
        z3.ULE(g.map_used_length(), g.cluster_size()),
        a.mul(g.map_bitmap_size(), c64(8)) == a.mul(c64(CLUSTERS_PER_REGION), g.sectors_per_cluster()),
        lay.no_wrap())
    return prove(lay.premises, claim, _render_objects(lay, [
        ("map copy used bytes", c64(0), g.map_used_length()), ("its cluster", c64(0), g.cluster_size())]), cases=lay.cases())


def _fields_claim(cls: type, total: Any, tail_size: Any) -> tuple[z3.BitVecRef, z3.BoolRef, list[tuple[str, Any, Any]]]:
    """Every byte below `total` lies in exactly one declared field, and no field runs past `total`."""
    byte = word(f"{cls.__name__}_byte")
    spans: list[tuple[str, Any, Any]] = []
    for name, info in declared_fields(cls):
        size = tail_size if info.size is None else c64(info.size)
        spans.append((f"{cls.__name__}.{name}", c64(info.offset), size))
    inside = [z3.And(z3.ULE(start, byte), z3.ULT(byte, start + size)) for _, start, size in spans]
    count = z3.Sum(*[z3.If(hit, c64(1), c64(0)) for hit in inside])
    claim = z3.And(
        z3.Implies(z3.ULT(byte, total), count == 1),
        *[z3.And(z3.ULE(start + size, total), z3.ULE(start, start + size)) for _, start, size in spans])
    return byte, claim, spans


def prove_root_fields() -> Outcome:
    """The root's declared fields tile its 4096 bytes exactly: no overlap, no gap, nothing past the end."""
    byte, claim, spans = _fields_claim(Root, c64(ROOT_SIZE), None)
    return prove([], claim, _render_fields(byte, spans))


def prove_map_copy_fields() -> Outcome:
    """A map copy's declared fields tile its used length exactly, for every cluster size."""
    lay = Layout.fresh()
    g = lay.geometry
    byte, claim, spans = _fields_claim(MapCopy, g.map_used_length(), g.map_bitmap_size())
    return prove(lay.premises, z3.And(claim, lay.no_wrap()), _render_fields(byte, spans, lay), cases=lay.cases())


def _render_fields(byte: z3.BitVecRef, spans: list[tuple[str, Any, Any]],
                   lay: Layout | None = None) -> Callable[[z3.ModelRef], str]:
    def render(model: z3.ModelRef) -> str:
        at = as_int(model, byte)
        lines = [lay.describe(model)] if lay else []
        lines.append(f"  byte {at}")
        for name, start, size in spans:
            begin, length = as_int(model, start), as_int(model, size)
            mark = "  <- holds it" if begin <= at < begin + length else ""
            lines.append(f"  {name}: [{begin}, {begin + length}){mark}")
        return "\n".join(lines)
    return render


def prove_max_virtual_size_reachable() -> Outcome:
    """The claimed maximum virtual size is admitted and laid out soundly for every cluster size; z3 shows a witness."""
    lay = Layout.fresh()
    g = lay.geometry
    a = g.arith
    last_byte = a.sub(lay.virtual_size, c64(1))
    last_region = a.sub(g.num_regions(), c64(1))
    healthy = z3.And(
        z3.ULT(g.guest_to_file(last_byte), g.file_length()),
        z3.ULE(g.file_length(), c64(OFF_T_MAX)),
        z3.ULE(last_region, c64(field_limit(MapCopy, "region"))),
        lay.no_wrap())
    premises = lay.premises + [lay.virtual_size == c64(MAX_VIRTUAL_SIZE)]
    outcome = prove(premises, healthy, lay.describe, cases=lay.cases())
    if outcome.status != "proved":
        return outcome
    witness = find_witness(premises + [healthy])
    if witness is None:
        return Outcome("refuted", outcome.seconds, "no admitted cluster size reaches MAX_VIRTUAL_SIZE")
    detail = (f"witness: {lay.describe(witness)}, {as_int(witness, g.num_regions())} regions, "
              f"file length {as_int(witness, g.file_length())} B, last guest byte at file offset "
              f"{as_int(witness, g.guest_to_file(last_byte))}")
    return Outcome("proved", outcome.seconds, detail)
