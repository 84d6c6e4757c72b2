"""Every property with its stable ID, what it covers, the format rule it covers, and its expected outcome.

IDs are stable: the format document and tests cite them.  `P-` properties
must be proved; `NEG-` properties are negative controls, deliberately broken
variants that z3 must refute with a counterexample.
"""
from __future__ import annotations

from functools import partial

from . import commit, intents, layout, share
from .core import Property

PROPERTIES: tuple[Property, ...] = (
    Property("P-LAYOUT-001", "root slots 0 and 1 are disjoint and inside the root area, the longest root fits its slot, "
             "every region starts after the area",
             "root area (`ROOT_SLOTS` x `ROOT_SLOT_SIZE`) padded to a cluster precedes the regions (F-LAYOUT-001)", "proved",
             layout.prove_root_copies_apart),
    Property("P-LAYOUT-002", "regions follow each other without sharing a byte; the last ends within the file length",
             "region r at `first_region_offset + r * region_stride`; file length", "proved",
             layout.prove_region_windows_apart),
    Property("P-LAYOUT-003", "inside a region: map copy A is cluster 0, data cluster k is cluster k+1, map copy B the last",
             "region = map copy A, `CLUSTERS_PER_REGION` data clusters, map copy B", "proved",
             layout.prove_cluster_slots),
    Property("P-LAYOUT-004", "no two map copies or data clusters (same or different regions) share a byte",
             "regions and their clusters never overlap", "proved", layout.prove_no_overlap),
    Property("P-LAYOUT-005", "every guest byte lands in data cluster k of its region at its own offset; indices in range",
             "identity mapping within a region (`guest_to_file`)", "proved", layout.prove_guest_bytes_in_place),
    Property("P-LAYOUT-006", "offsets and lengths fit a signed 64-bit off_t and the file; region indices fit their u32 fields; no step wraps",
             "field widths of `Root` and `MapCopy`; file length", "proved", layout.prove_extents_fit),
    Property("P-LAYOUT-007", "regions, map copies, data clusters and the file length are cluster-aligned",
             "data clusters aligned to the cluster size in the file", "proved", layout.prove_alignment),
    Property("P-LAYOUT-008", "a map copy's used length fits its cluster; one bitmap bit per guest sector",
             "`map_used_length <= cluster_size`; presence bitmap = cluster_size / 32 bytes", "proved",
             layout.prove_map_copy_fits_cluster),
    Property("P-LAYOUT-009", "the root's declared fields tile its 4096 bytes: no overlap, no gap, none past the end",
             "`Root` declaration (S1)", "proved", layout.prove_root_fields),
    Property("P-LAYOUT-010", "a map copy's declared fields tile its used length, for every cluster size",
             "`MapCopy` declaration (S1)", "proved", layout.prove_map_copy_fields),
    Property("P-LAYOUT-011", "`MAX_VIRTUAL_SIZE` is admitted and laid out soundly for every cluster size (witness model)",
             "virtual size: multiple of 512, at most 2^50", "proved", layout.prove_max_virtual_size_reachable),
    Property("P-COMMIT-001", f"crash anywhere in {commit.COMMITS} commits, any reorder and tear: recovery yields the acknowledged or the in-flight version",
             "protocol rule 2 (one copy at a time); selection rule; R5", "proved",
             partial(commit.check_crash_refinement, "spec")),
    Property("P-COMMIT-002", "at rest after a commit, one copy corrupted or stale: recovery still yields that commit",
             "R7 (two copies, any single corrupted or stale copy repaired)", "proved",
             partial(commit.check_corruption_at_rest, "spec")),
    Property("P-INTENT-001", "after any crash every region with differing map copies or data off its checksums (deferred "
             "ones included) is in the durable root's intents; regions stay listed across flushes, evictions commit first",
             "protocol rules 1 (intent before data) and 3 (barrier before the root); F-PROTO-005", "proved",
             partial(intents.check_intents_cover_unsettled_regions, "spec")),
    Property("P-INTENT-002", "after a crash past a flush, every region's map records the presence it acknowledged and "
             "its data is durable, while overwrite-only flushes write no map",
             "F-PROTO-005 (a flush commits the maps whose presence changed); R5", "proved",
             partial(intents.check_flushed_writes_durable, "spec")),
    Property("P-SHARE-001", "crash anywhere in a dedup of a cluster, any reorder and tear: the frozen layer reads "
             "its bytes, from its local place or from the store", "F-SHARE-005 (store durable before any reference; "
             "punch after the map commit)", "proved", partial(share.check_share_order, "spec")),
    Property("NEG-LAYOUT-001", "control: regions of 129 clusters stride (off by one): map copy B lands on the next region's map copy A",
             "region stride = `CLUSTERS_PER_REGION + 2` clusters", "refuted", layout.refute_layout_with_short_stride),
    Property("NEG-COMMIT-001", "control: both slots written, then one fsync", "protocol rule 2", "refuted",
             partial(commit.check_crash_refinement, "no_fsync_between_slots")),
    Property("NEG-COMMIT-002", "control: the slot holding the durable current copy is written first", "protocol rule 2",
             "refuted", partial(commit.check_crash_refinement, "durable_slot_first")),
    Property("NEG-COMMIT-003", "control: recovery takes the highest generation without verifying the copy",
             "selection rule (valid copies only)", "refuted",
             partial(commit.check_crash_refinement, "unverified_recovery")),
    Property("NEG-COMMIT-004", "control: the selection rule prefers the valid copy with the lower generation",
             "selection rule (highest generation)", "refuted",
             partial(commit.check_crash_refinement, "older_copy_preferred")),
    Property("NEG-INTENT-001", "control: data written before the root listing its region is durable",
             "protocol rule 1", "refuted", partial(intents.check_intents_cover_unsettled_regions, "data_before_intent")),
    Property("NEG-INTENT-002", "control: a root write (dropping a flushed region) without the fsync before it",
             "protocol rule 3", "refuted",
             partial(intents.check_intents_cover_unsettled_regions, "no_barrier_before_root")),
    Property("NEG-INTENT-003", "control: an eviction (or close) drops a region whose deferred map is not committed",
             "protocol rule 1 (a region leaves the list only with its map committed)", "refuted",
             partial(intents.check_intents_cover_unsettled_regions, "evict_uncommitted")),
    Property("NEG-INTENT-004", "control: a flush defers the map of a region whose presence changed",
             "F-PROTO-005", "refuted", partial(intents.check_flushed_writes_durable, "defer_fresh_map")),
    Property("NEG-SHARE-001", "control: the references are written before the store's cluster is durable",
             "F-SHARE-005 step 2 before step 3", "refuted", partial(share.check_share_order, "reference_before_store")),
    Property("NEG-SHARE-002", "control: the local place is punched before the map with the reference is committed",
             "F-SHARE-005 step 3 (punch after the map commit)", "refuted",
             partial(share.check_share_order, "punch_before_commit")),
)


def properties_markdown() -> str:
    """The property table the format document includes."""
    rows = ["| ID | what it covers | format rule | expected |", "|---|---|---|---|"]
    for prop in PROPERTIES:
        expected = "proved" if prop.expected == "proved" else "refuted (negative control)"
        rows.append(f"| {prop.pid} | {prop.covers} | {prop.rule} | {expected} |")
    return "\n".join(rows)
