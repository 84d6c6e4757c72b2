"""The `valid` category: well-formed images (and a few with one damaged copy) and the guest contents they denote."""
from __future__ import annotations

import os
import shutil
import tempfile

from lamina.crashsim.syscalls import copy_sparse
from lamina.impl.image import Image
from lamina.impl.layers import clone, create_snapshot
from lamina.spec.layout import CLUSTERS_PER_REGION, MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, Geometry, root_copy_offset

from lamina.spec import model

from .build import KiB, MiB, expect_check, expect_views, flip, forge_root, new_vector, pattern, reference_view, \
    write_image

NEEDS = ["dump", "check"]


def cluster_vector(root: str, bits: int) -> None:
    """Every cluster size: a size not a multiple of the cluster, writes across clusters (and regions), zero and discard."""
    cluster = 1 << bits
    span = CLUSTERS_PER_REGION * cluster
    size = span + 2 * cluster + 1536 if span <= 8 * MiB else 3 * cluster + 1536
    name = f"cluster-{cluster // KiB}k"
    with new_vector(root, "valid", name, f"{cluster // KiB} KiB clusters, guest size {size} (no multiple of the "
                    "cluster): unaligned writes across clusters and region ends, zeroed and discarded ranges, a partial "
                    "last cluster", NEEDS, ["F-LAYOUT-001", "F-LAYOUT-002", "F-MAP-003", "F-MEAN-002"]) as v:
        with Image.create("disk.lam", size, cluster) as image:
            image.write(0, pattern(1, cluster + 1536))
            image.write(cluster - 700, pattern(2, 1400))
            image.write(size - 3000, pattern(3, 3000))  # ends at the virtual size, inside the last partial cluster
            if size > span:
                image.write(span - 2048, pattern(4, 4096))  # across the region boundary
            image.flush()
            image.write_zeroes(512, 1024)
            image.discard(cluster, 1536)
            image.write_zeroes(size - 1100, 600)  # unaligned: merged with the sectors around it
        expect_check(v, "disk.lam", 0, [])
        expect_views(v, ["disk.lam"])


def large_sparse(root: str) -> None:
    with new_vector(root, "valid", "large-sparse", "a 256 MiB guest with a few writes at both ends: the image and every "
                    "dump stay sparse", NEEDS, ["F-LAYOUT-001", "F-LAYOUT-002"]) as v:
        size = 256 * MiB
        write_image("disk.lam", size, 64 * KiB, [(0, pattern(1, 8192)), (size // 2 + 512, pattern(2, 512)),
                                                  (size - 70000, pattern(3, 70000))])
        expect_check(v, "disk.lam", 0, [])
        expect_views(v, ["disk.lam"])


def raw_base(root: str) -> None:
    with new_vector(root, "valid", "raw-base", "a Lamina layer over a raw file: writes hide parts of the base, a "
                    "zeroed range hides it too", NEEDS, ["F-MEAN-002", "F-REF-003", "F-REF-005"]) as v:
        with open("base.raw", "wb") as fh:
            fh.write(pattern(7, 256 * KiB))
            fh.truncate(1 * MiB)
        with Image.create("disk.lam", 2 * MiB, 4 * KiB, base="base.raw") as image:
            image.write(4096, pattern(8, 6000))
            image.write_zeroes(64 * KiB, 8 * KiB)
            image.write(1536 * KiB, pattern(9, 4096))  # past the base's end
        expect_check(v, "disk.lam", 0, [])
        expect_views(v, ["disk.lam"])


def raw_base_odd_length(root: str) -> None:
    with new_vector(root, "valid", "raw-base-odd-length", "a raw base of 64 KiB + 100 bytes, recorded as such: the "
                    "base shows through byte by byte, the rest of its last sector reads zero", NEEDS,
                    ["F-MEAN-004", "F-MEAN-002"]) as v:
        with open("base.raw", "wb") as fh:
            fh.write(pattern(7, 64 * KiB))
        write_image("disk.lam", 1 * MiB, 4 * KiB, [(8 * KiB, pattern(8, 4096))], base="base.raw")
        with open("base.raw", "ab") as fh:
            fh.write(pattern(9, 100))
        size = 64 * KiB + 100
        forge_root("disk.lam", base_size=size, base_visible=size)  # no tool makes this reference; a root may hold it
        expect_check(v, "disk.lam", 0, [])
        # The rule's reading, byte by byte (F-MEAN-002), which the spec's abstraction must give too.
        with open("base.raw", "rb") as fh:
            design = model.write(model.write(model.empty_disk(1 * MiB), 0, fh.read()), 8 * KiB, pattern(8, 4096))
        v.expect["views"] = [reference_view("disk.lam", against=design)]


def lamina_base(root: str) -> None:
    with new_vector(root, "valid", "lamina-base", "a Lamina layer over a Lamina image in the same directory",
                    NEEDS, ["F-MEAN-002", "F-REF-003"]) as v:
        write_image("base.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 64 * KiB)), (700 * KiB, pattern(2, 9000))])
        write_image("disk.lam", 1 * MiB, 8 * KiB, [(32 * KiB, pattern(3, 40000))], base="base.lam",
                    after=lambda image: image.discard(700 * KiB, 4096))
        expect_check(v, "disk.lam", 0, [])
        expect_views(v, ["disk.lam", "base.lam"])


def chain_of_three(root: str) -> None:
    with new_vector(root, "valid", "chain-3", "three files: c.lam over b.lam over a.raw, each hiding part of the one "
                    "below; b.lam was shrunk and grown back, so its base shows only below the shrink", NEEDS,
                    ["F-MEAN-002", "F-REF-002", "F-REF-003", "F-ROOT-006"]) as v:
        with open("a.raw", "wb") as fh:
            fh.write(pattern(1, 512 * KiB))
        with Image.create("b.lam", 512 * KiB, 4 * KiB, base="a.raw") as image:
            image.write(100 * KiB, pattern(2, 50 * KiB))
            image.resize(300 * KiB)
            image.resize(512 * KiB)  # [300k, 512k) now reads zero: base_visible stays at 300k
        with Image.create("c.lam", 768 * KiB, 16 * KiB, base="b.lam") as image:
            image.write(120 * KiB, pattern(3, 3000))
            image.write(600 * KiB, pattern(4, 512))
        expect_check(v, "c.lam", 0, [])
        expect_views(v, ["c.lam", "b.lam"])


def snapshots(root: str) -> None:
    with new_vector(root, "valid", "snapshots", "two snapshots, one with a VM state, written between; the image then "
                    "shrunk and grown", NEEDS, ["F-SNAP-003", "F-SNAP-004", "F-OPEN-003", "F-ROOT-006"]) as v:
        write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 20 * KiB)), (900 * KiB, pattern(2, 4096))])
        create_snapshot("disk.lam", "monday", vmstate=pattern(5, 10000) + bytes(3000) + pattern(6, 100),
                        vm_clock_ns=123_456_789)
        with Image.open("disk.lam") as image:
            image.write(8 * KiB, pattern(3, 8 * KiB))
        create_snapshot("disk.lam", "tuesday")
        with Image.open("disk.lam") as image:
            image.resize(512 * KiB)
            image.resize(1 * MiB)
            image.write(4 * KiB, pattern(4, 1024))
        expect_check(v, "disk.lam", 0, [])
        expect_views(v, ["disk.lam", "disk.lam@monday", "disk.lam@tuesday", "disk.lam@1"])


def clones(root: str) -> None:
    with new_vector(root, "valid", "clone", "a clone of a snapshot, written apart from the image it came from", NEEDS,
                    ["F-SNAP-004", "F-OPEN-003", "F-REF-004"]) as v:
        write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 64 * KiB))])
        create_snapshot("disk.lam", "base")
        clone("disk.lam", "base", "branch.lam")
        with Image.open("disk.lam") as image:
            image.write(0, pattern(2, 4096))
        with Image.open("branch.lam") as image:
            image.write(4096, pattern(3, 4096))
            image.write(512 * KiB, pattern(4, 512))
        expect_check(v, "disk.lam", 0, [])
        v.expect["also_check"] = [{"image": "branch.lam", "exit": 0, "kinds": []}]
        expect_views(v, ["disk.lam", "branch.lam", "disk.lam@base"])


def pending_intents(root: str) -> None:
    """What a power failure leaves: writes made without a flush, the regions listed in the intents."""
    with new_vector(root, "valid", "pending-intents", "unflushed writes after a crash: overwrites of present sectors "
                    "and first writes into absent ones, their regions listed in the intents; a reader sees what the "
                    "maps say (absent sectors read zero), check reports pending work only", NEEDS,
                    ["F-ROOT-005", "F-PROTO-001", "F-MEAN-001", "F-CHECK-002"]) as v:
        scratch = tempfile.mkdtemp(prefix="lamina-conform-")
        try:
            path = os.path.join(scratch, "disk.lam")
            write_image(path, 2 * MiB, 4 * KiB, [(0, pattern(1, 16 * KiB)), (600 * KiB, pattern(2, 4096))])
            image = Image.open(path)
            try:
                image.write(4 * KiB, pattern(3, 8 * KiB))  # over present sectors: in place
                image.write(64 * KiB, pattern(4, 4096))  # absent sectors: the map does not mark them yet
                image.write(1536 * KiB, pattern(5, 512))  # a third region
                copy_sparse(path, "disk.lam")  # the file as the crash leaves it: the writer never closed
            finally:
                image.close()
        finally:
            shutil.rmtree(scratch)
        expect_check(v, "disk.lam", 0, ["intents", "unflushed-bytes"])
        expect_views(v, ["disk.lam"])


def damaged_root_copy(root: str) -> None:
    with new_vector(root, "valid", "damaged-root-copy", "root copy A's CRC fails (a flipped byte): the reader uses "
                    "copy B; check reports degraded redundancy", NEEDS, ["F-ROOT-001", "F-ROOT-002"]) as v:
        write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 12 * KiB))])
        flip("disk.lam", root_copy_offset(0) + 60)  # inside image_uuid
        expect_check(v, "disk.lam", 3, ["root-copy"])
        expect_views(v, ["disk.lam"])


def damaged_map_copy(root: str) -> None:
    with new_vector(root, "valid", "damaged-map-copy", "map copy A of region 0 has a flipped byte in its bitmap: the "
                    "reader uses copy B; check reports degraded redundancy", NEEDS, ["F-MAP-001", "F-MAP-002"]) as v:
        write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 12 * KiB)), (520 * KiB, pattern(2, 512))])
        g = Geometry(12, 1 * MiB)
        flip("disk.lam", g.map_copy_offset(0, 0) + 576)
        expect_check(v, "disk.lam", 3, ["map-copy"])
        expect_views(v, ["disk.lam"])


def shared_clusters(root: str) -> None:
    """Two clones of one snapshot that wrote the same bytes, deduplicated: their snapshots read through the store."""
    from lamina.impl.dedup import dedup

    with new_vector(root, "valid", "shared-clusters", "two clones wrote the same 48 KiB and took a snapshot each; "
                    "dedup moved the equal clusters of both snapshots' layers into lamina-store.lam and punched "
                    "them: every branch and snapshot reads as before", NEEDS + ["shared-clusters"],
                    ["F-SHARE-001", "F-SHARE-002", "F-SHARE-003", "F-SHARE-004", "F-SHARE-007"]) as v:
        write_image("disk.lam", 1 * MiB, 4 * KiB, [(0, pattern(1, 64 * KiB))])
        create_snapshot("disk.lam", "base")
        for k, name in enumerate(("a.lam", "b.lam")):
            clone("disk.lam", "base", name)
            with Image.open(name) as image:
                image.write(256 * KiB, pattern(2, 48 * KiB))  # the same bytes in both
                image.write(600 * KiB + 512 * k, pattern(3 + k, 512))  # and a little of their own
            create_snapshot(name, "s")
        report = dedup(["a.lam", "b.lam"])
        assert report.duplicates, "the vector must hold shared clusters"
        expect_check(v, "a.lam", 0, [])
        v.expect["also_check"] = [{"image": "b.lam", "exit": 0, "kinds": []}]
        expect_views(v, ["a.lam", "a.lam@s", "b.lam", "b.lam@s", "disk.lam@base"])


def generate(root: str) -> None:
    for bits in range(MIN_CLUSTER_BITS, MAX_CLUSTER_BITS + 1):
        cluster_vector(root, bits)
    for make in (large_sparse, raw_base, raw_base_odd_length, lamina_base, chain_of_three, snapshots, clones, pending_intents,
                 damaged_root_copy, damaged_map_copy, shared_clusters):
        make(root)
