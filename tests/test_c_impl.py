"""lamina-c, the second implementation of the format in C, against the reference.

lamina-c is written from spec/FORMAT.md alone; these tests build it (and its four
deliberately broken variants) with the system compiler, make images with the
reference command and API, and hold lamina-c's `dump` to `lamina convert -O raw`
byte for byte and its `check` exit code and finding kinds to `lamina check`'s.
Each broken variant must fail exactly the cases that cover its defect: that is
what shows the cases can fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from lamina.impl.cli import main as lamina_main
from lamina.impl.image import Image

REPO = Path(__file__).resolve().parent.parent
C_SOURCES = sorted((REPO / "c").glob("*.c"))
VARIANTS = ("BROKEN_IGNORE_SECOND_COPY", "BROKEN_TRUST_CRC", "BROKEN_BASE_PAST_END",
            "BROKEN_SNAPSHOT_LAYER")
KiB = 1024
MiB = 1024 * 1024


def lamina(*argv: str, cwd: Path) -> tuple[int, str]:
    """Run the reference command in-process (a subprocess per call costs ~1 s here)."""
    out = io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = lamina_main(list(argv))
    finally:
        os.chdir(old)
    return code, out.getvalue()


def pattern(seed: int, length: int) -> bytes:
    """Bytes that differ at every offset, so a misplaced sector shows."""
    return random.Random(seed).randbytes(length)


# ----------------------------------------------------------------------------
# Image builders: each makes its files in `d` and returns (dump target, check image).


def build_cluster_size(cluster: int) -> Callable[[Path], tuple[str, str]]:
    def build(d: Path) -> tuple[str, str]:
        size = 5 * cluster + 1536  # not a multiple of the cluster size
        if cluster * 128 < 3 * MiB:
            size = 3 * 128 * cluster + 7 * cluster + 512  # several regions
        with Image.create(str(d / "disk.lam"), size, cluster_size=cluster) as img:
            img.write(0, pattern(1, cluster + 512))
            img.write(size - 1024, pattern(2, 1024))
            img.write(2 * cluster, pattern(3, 3 * 512))
            img.write_zeroes(256, 512)
            img.discard(2 * cluster + 512, 512)
        return "disk.lam", "disk.lam"
    return build


def build_raw_base(d: Path) -> tuple[str, str]:
    (d / "base.raw").write_bytes(pattern(10, MiB))
    with Image.create(str(d / "top.lam"), 2 * MiB, cluster_size=4096, base="base.raw",
                      base_format="raw") as img:
        img.write(8192, pattern(11, 4096))
        img.discard(64 * KiB, 64 * KiB)  # over the base: stays present, reads zero
        img.write(MiB + 4096, pattern(12, 512))
    return "top.lam", "top.lam"


def build_lamina_base(d: Path) -> tuple[str, str]:
    with Image.create(str(d / "base.lam"), MiB, cluster_size=8192) as img:
        img.write(0, pattern(20, 300 * KiB))
    with Image.create(str(d / "top.lam"), 3 * MiB, cluster_size=4096, base="base.lam",
                      base_format="lamina") as img:
        img.write(4096, pattern(21, 8192))
        img.write_zeroes(128 * KiB, 4096)
    return "top.lam", "top.lam"


def build_chain3(d: Path) -> tuple[str, str]:
    (d / "a.raw").write_bytes(pattern(30, 2 * MiB))
    with Image.create(str(d / "b.lam"), 2 * MiB, cluster_size=16384, base="a.raw",
                      base_format="raw") as img:
        img.write(512 * KiB, pattern(31, 64 * KiB))
    with Image.create(str(d / "c.lam"), 2 * MiB, cluster_size=4096, base="b.lam",
                      base_format="lamina") as img:
        img.write(520 * KiB, pattern(32, 4096))
    with Image.create(str(d / "top.lam"), 2 * MiB, cluster_size=65536, base="c.lam",
                      base_format="lamina") as img:
        img.write(0, pattern(33, 512))
    return "top.lam", "top.lam"


def make_snapshots(d: Path) -> None:
    if (d / "disk.lam").exists():
        return
    with Image.create(str(d / "disk.lam"), 2 * MiB, cluster_size=4096) as img:
        img.write(0, pattern(40, 64 * KiB))
    (d / "vm.bin").write_bytes(pattern(41, 10000))
    assert lamina("snapshot", "create", "--vmstate", "vm.bin", "--vm-clock", "123", "disk.lam",
                  "monday", cwd=d)[0] == 0
    with Image.open(str(d / "disk.lam")) as img:
        img.write(4096, pattern(42, 4096))
    assert lamina("snapshot", "create", "disk.lam", "tuesday", cwd=d)[0] == 0
    with Image.open(str(d / "disk.lam")) as img:
        img.write(8192, pattern(43, 4096))
        img.resize(3 * MiB)
        img.write(2 * MiB + 512, pattern(44, 512))


def build_snapshot(name: str | None) -> Callable[[Path], tuple[str, str]]:
    def build(d: Path) -> tuple[str, str]:
        make_snapshots(d)
        return ("disk.lam@" + name if name else "disk.lam"), "disk.lam"
    return build


def build_clone(d: Path) -> tuple[str, str]:
    make_snapshots(d)
    assert lamina("clone", "disk.lam", "monday", "branch.lam", cwd=d)[0] == 0
    with Image.open(str(d / "branch.lam")) as img:
        img.write(12288, pattern(45, 4096))
    return "branch.lam", "branch.lam"


def build_crash(d: Path) -> tuple[str, str]:
    """A copy of the file taken while a writer had unflushed writes: intents pending."""
    with Image.create(str(d / "live.lam"), 4 * MiB, cluster_size=4096) as img:
        img.write(0, pattern(50, 16 * KiB))
    img = Image.open(str(d / "live.lam"))
    try:
        img.write(4096, pattern(51, 4096))
        img.write(3 * MiB, pattern(52, 8192))
        shutil.copyfile(d / "live.lam", d / "crash.lam")
    finally:
        img.close()
    return "crash.lam", "crash.lam"


def metadata(d: Path, image: str) -> list[dict]:
    code, out = lamina("map", "--metadata", "--output", "json", image, cwd=d)
    assert code == 0
    return json.loads(out)["metadata"]


def flip(path: Path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def small_image(d: Path) -> None:
    with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(60, 64 * KiB))
        img.write(600 * KiB, pattern(61, 4096))


def build_damaged_root(d: Path) -> tuple[str, str]:
    """Copy A's virtual_size moved by 512: only its CRC tells it is wrong."""
    small_image(d)
    root_a = [m for m in metadata(d, "disk.lam") if m["kind"] == "root" and m["copy"] == "A"][0]
    flip(d / "disk.lam", root_a["offset"] + 17, 0x02)
    return "disk.lam", "disk.lam"


def build_damaged_map(copy: str) -> Callable[[Path], tuple[str, str]]:
    """One map copy's presence bitmap inverted for sectors 0-7: only its CRC tells."""
    def build(d: Path) -> tuple[str, str]:
        small_image(d)
        m = [m for m in metadata(d, "disk.lam")
             if m["kind"] == "map" and m["copy"] == copy and m["region"] == 0][0]
        flip(d / "disk.lam", m["offset"] + 576)
        return "disk.lam", "disk.lam"
    return build


def build_flipped_data(d: Path) -> tuple[str, str]:
    small_image(d)
    code, out = lamina("map", "--output", "json", "disk.lam", cwd=d)
    extent = [e for e in json.loads(out) if e.get("data")][0]
    flip(d / "disk.lam", extent["offset"] + 100, 0x01)
    return "disk.lam", "disk.lam"


def build_both_roots(d: Path) -> tuple[str, str]:
    small_image(d)
    for m in metadata(d, "disk.lam"):
        if m["kind"] == "root":
            flip(d / "disk.lam", m["offset"] + 17, 0x02)
    return "disk.lam", "disk.lam"


def build_missing_snapshot_layer(d: Path) -> tuple[str, str]:
    make_snapshots(d)
    # monday is the snapshot taken with VM state: its layer is the one beside a .vmstate
    vmstate = next((d / "disk.lam.layers").glob("*.vmstate"))
    vmstate.with_suffix(".lam").unlink()
    return "disk.lam@monday", "disk.lam"


def build_base_shrunk(d: Path) -> tuple[str, str]:
    """A shrink then a grow of the top: the base must not show through again."""
    with Image.create(str(d / "base.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(70, MiB))
    with Image.create(str(d / "top.lam"), MiB, cluster_size=4096, base="base.lam",
                      base_format="lamina") as img:
        img.write(4096, pattern(71, 4096))
    assert lamina("resize", "--shrink", "top.lam", "512k", cwd=d)[0] == 0
    assert lamina("resize", "top.lam", "1M", cwd=d)[0] == 0
    return "top.lam", "top.lam"


def frozen_layers(d: Path, top: str = "disk.lam"):
    """The frozen layers of `top`: the files of its layer directory but the top's own twin (F-TREE-003)."""
    return (p for p in (d / f"{top}.layers").glob("*.lam") if not os.path.samefile(p, d / top))


def build_layer_directory(d: Path) -> tuple[str, str]:
    """T4: every kind of stray file a layer directory can hold, and a <top>.creating."""
    with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(100, 64 * KiB))
    assert lamina("snapshot", "create", "disk.lam", "s1", cwd=d)[0] == 0
    layers = d / "disk.lam.layers"
    frozen = next(frozen_layers(d))
    (layers / "junk").write_bytes(b"junk")
    shutil.copyfile(frozen, layers / ("0" * 31 + "1.lam"))  # named as a layer it is not
    (layers / ("1" * 32 + ".lam")).symlink_to(frozen.name)
    (layers / ("2" * 32 + ".vmstate")).mkdir()
    (layers / ("3" * 32 + ".vmstate.creating")).write_bytes(b"v")
    with Image.create(str(d / "other.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(101, 512))
    code, out = lamina("info", "--output", "json", "other.lam", cwd=d)
    uuid = json.loads(out)["format-specific"]["data"]["uuid"]
    shutil.move(d / "other.lam", layers / (uuid + ".lam"))  # a readable, unreached layer
    shutil.copyfile(d / "disk.lam", d / "disk.lam.creating")
    return "disk.lam", "disk.lam"


def build_layer_directory_link(d: Path) -> tuple[str, str]:
    """F-OPEN-002: nothing is used inside a layer directory that is a symbolic link."""
    with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(170, 4096))
    assert lamina("snapshot", "create", "disk.lam", "s1", cwd=d)[0] == 0
    (d / "disk.lam.layers").rename(d / "real.layers")
    (d / "disk.lam.layers").symlink_to("real.layers")
    return "disk.lam", "disk.lam"


def make_linked_tops(d: Path) -> None:
    """F-OPEN-001, F-REF-001: a top named through symbolic links, beside it and elsewhere."""
    if (d / "sub").exists():
        return
    (d / "sub").mkdir()
    with Image.create(str(d / "sub" / "b.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(180, 8192))
    with contextlib.chdir(d / "sub"):
        with Image.create("top.lam", MiB, cluster_size=4096, base="b.lam",
                          base_format="lamina") as img:
            img.write(4096, pattern(181, 512))
    (d / "sub" / "beside.lam").symlink_to("top.lam")
    (d / "elsewhere.lam").symlink_to("sub/top.lam")  # its base would be ./b.lam: not there


def build_linked_top(name: str) -> Callable[[Path], tuple[str, str]]:
    def build(d: Path) -> tuple[str, str]:
        make_linked_tops(d)
        return name, name
    return build


def build_base_outside(d: Path) -> tuple[str, str]:
    """F-REF-001: a base outside the top's directory is never followed."""
    (d / "outside").mkdir()
    (d / "sub").mkdir()
    (d / "outside" / "base.raw").write_bytes(pattern(110, MiB))
    assert lamina("create", "-b", "outside/base.raw", "--allow-base", "outside/base.raw",
                  "sub/top.lam", cwd=d)[0] == 0
    return "sub/top.lam", "sub/top.lam"


def build_snapshot_by_id(d: Path) -> tuple[str, str]:
    make_snapshots(d)
    return "disk.lam@2", "disk.lam"


# Deduplicated trees (FORMAT.md section 13): frozen layers whose equal clusters
# `lamina dedup` moved into the directory's shared store lamina-store.lam.

SHARED_A = pattern(60, 16 * KiB)  # data written into several images, so dedup shares it


def make_shared_clones(d: Path) -> None:
    """Two clones of one snapshot, each written (partly the same bytes), snapshotted, deduplicated."""
    if (d / "disk.lam").exists():
        return
    with Image.create(str(d / "disk.lam"), 2 * MiB, cluster_size=4096) as img:
        img.write(0, pattern(61, 64 * KiB))
        img.write(256 * KiB, SHARED_A)
    assert lamina("snapshot", "create", "disk.lam", "gold", cwd=d)[0] == 0
    for n, name in enumerate(("a.lam", "b.lam")):
        assert lamina("clone", "disk.lam", "gold", name, cwd=d)[0] == 0
        with Image.open(str(d / name)) as img:
            img.write(128 * KiB, SHARED_A)             # equal in both clones and the base
            img.write(4096 + 512, pattern(62, 1024))   # a partly present cluster, equal in both
            img.write(1 * MiB + 4096 * n, pattern(63 + n, 8192))  # data of its own
        assert lamina("snapshot", "create", name, "s", cwd=d)[0] == 0
        with Image.open(str(d / name)) as img:
            img.write(128 * KiB + 4096, pattern(70 + n, 4096))  # the top moves on over shared data
    code, _ = lamina("dedup", "a.lam", "b.lam", cwd=d)
    assert code == 0
    assert (d / "lamina-store.lam").exists()


def build_shared_clones(target: str, image: str) -> Callable[[Path], tuple[str, str]]:
    def build(d: Path) -> tuple[str, str]:
        make_shared_clones(d)
        return target, image
    return build


TEN = 10


def make_ten_images(d: Path) -> None:
    """Ten images sharing clusters from one pool, frozen and deduplicated with `dedup --across`."""
    if (d / "i0.lam").exists():
        return
    pool = [pattern(80 + k, 4096) for k in range(6)]
    rng = random.Random(81)
    for i in range(TEN):
        with Image.create(str(d / f"i{i}.lam"), MiB, cluster_size=4096) as img:
            for c in rng.sample(range(64), 12):
                img.write(c * 4096, rng.choice(pool))
            img.write(512 * KiB + 512 * i, pattern(90 + i, 512))  # one sector of its own
    code, _ = lamina("dedup", "--snapshot", "s", "i0.lam", "--across", ".", cwd=d)
    assert code == 0


def build_ten(i: int, snap: bool) -> Callable[[Path], tuple[str, str]]:
    def build(d: Path) -> tuple[str, str]:
        make_ten_images(d)
        return f"i{i}.lam" + ("@s" if snap else ""), f"i{i}.lam"
    return build


def make_shared_pair(d: Path) -> Path:
    """Two images with equal data, snapshotted and deduplicated: the frozen layer of p.lam."""
    from lamina.impl import layers

    for n, name in enumerate(("p.lam", "q.lam")):
        with Image.create(str(d / name), MiB, cluster_size=4096) as img:
            img.write(0, SHARED_A)
            img.write(64 * KiB, pattern(100 + n, 4096))
        assert lamina("snapshot", "create", name, "s", cwd=d)[0] == 0
    assert lamina("dedup", "p.lam", "--across", "q.lam", cwd=d)[0] == 0
    entry = layers.list_snapshots(str(d / "p.lam"))[0]
    return d / "p.lam.layers" / f"{entry.layer_uuid.hex()}.lam"


def build_shared_cluster_size(cluster: int) -> Callable[[Path], tuple[str, str]]:
    """Two images of one cluster size with equal data (whole and partly present clusters), deduplicated."""
    def build(d: Path) -> tuple[str, str]:
        for n, name in enumerate(("p.lam", "q.lam")):
            with Image.create(str(d / name), 4 * cluster + MiB, cluster_size=cluster) as img:
                img.write(0, pattern(120, 2 * cluster))
                img.write(2 * cluster + 1024, pattern(121, 2048))
                img.write(3 * cluster, pattern(122 + n, 512))
            assert lamina("snapshot", "create", name, "s", cwd=d)[0] == 0
        assert lamina("dedup", "p.lam", "q.lam", cwd=d)[0] == 0
        return "p.lam@s", "p.lam"
    return build


MAP_USED_4K = 576 + 4096 // 32
SHARED_USED_4K = MAP_USED_4K + 1024


def set_shared(buf: bytearray, cluster: int, value: int | None = None,
               clear_presence: bool = False) -> None:
    """Region 0 of a 4 KiB-cluster layer whose maps carry the shared table: both copies."""
    for copy in (0, 129):
        start = MiB + copy * 4096
        assert int.from_bytes(buf[start + 40:start + 44], "little") & 1, "no shared table"
        if value is not None:
            at = start + MAP_USED_4K + 8 * cluster
            buf[at:at + 8] = value.to_bytes(8, "little")
        if clear_presence:
            buf[start + 576 + cluster] = 0  # 8 sectors of a 4 KiB cluster: one byte of bits
            buf[start + 64 + 4 * cluster:start + 68 + 4 * cluster] = bytes(4)
        forge_map_crc(buf, start, SHARED_USED_4K)


def store_clusters(d: Path) -> int:
    store = (d / "lamina-store.lam").read_bytes()[:4096]
    return int.from_bytes(store[16:24], "little") // (1 << int.from_bytes(store[12:16], "little"))


def build_shared_hostile(change: Callable[[Path, Path], None]) -> Callable[[Path], tuple[str, str]]:
    def build(d: Path) -> tuple[str, str]:
        frozen = make_shared_pair(d)
        change(d, frozen)
        return "p.lam@s", "p.lam"
    return build


def edit(path: Path, change: Callable[[bytearray], None]) -> None:
    buf = bytearray(path.read_bytes())
    change(buf)
    path.write_bytes(bytes(buf))


def ref_past_end(d: Path, frozen: Path) -> None:
    edit(frozen, lambda b: set_shared(b, 0, 1 + store_clusters(d)))


def ref_to_free_cluster(d: Path, frozen: Path) -> None:
    """The store grown (its root forged, as a resize leaves it) and a reference to a cluster past the old end."""
    used = store_clusters(d)
    assert used < 64  # one region of 4 KiB clusters either way: the file length stays right
    edit(d / "lamina-store.lam", lambda b: set_root_field(b, 16, 8, 64 * 4096))
    edit(frozen, lambda b: set_shared(b, 0, 1 + used + 3))


def ref_without_present_sector(d: Path, frozen: Path) -> None:
    edit(frozen, lambda b: set_shared(b, 1, clear_presence=True))


def another_store_uuid(d: Path, frozen: Path) -> None:
    def change(buf: bytearray) -> None:
        for slot in SLOTS:
            buf[slot + 3996] ^= 0x5A
            forge_root_crc(buf, slot)
    edit(frozen, change)


def store_missing(d: Path, frozen: Path) -> None:
    (d / "lamina-store.lam").unlink()


def store_of_another_cluster_size(d: Path, frozen: Path) -> None:
    """An empty 8 KiB-cluster layer with the store's uuid in place of the store."""
    uuid = (d / "lamina-store.lam").read_bytes()[56:72]
    (d / "lamina-store.lam").unlink()
    with Image.create(str(d / "lamina-store.lam"), MiB, cluster_size=8192):
        pass
    shutil.rmtree(d / "lamina-store.lam.layers", ignore_errors=True)  # its twin
    def change(buf: bytearray) -> None:
        for slot in SLOTS:
            buf[slot + 56:slot + 72] = uuid
            forge_root_crc(buf, slot)
    edit(d / "lamina-store.lam", change)


def store_data_flipped(d: Path, frozen: Path) -> None:
    """A bit of the store's first data cluster: the store's I5 and each referencing image's I5."""
    flip(d / "lamina-store.lam", MiB + 4096 + 100, 0x01)


def local_bytes_under_a_reference(d: Path, frozen: Path) -> None:
    """I6 (F-SHARE-004): the local place of a shared cluster is not a hole."""
    with open(frozen, "r+b") as fh:
        fh.seek(MiB + 4096)
        fh.write(b"left over")


def table_only_in_copy_a(d: Path, frozen: Path) -> None:
    """Copy B without the table (flags 0, the shorter used length): valid twins that differ, B is stale."""
    def change(buf: bytearray) -> None:
        start = MiB + 129 * 4096
        buf[start + 40:start + 44] = bytes(4)
        forge_map_crc(buf, start, MAP_USED_4K)
    edit(frozen, change)


def listed_ref_past_end(d: Path, frozen: Path) -> None:
    """F-CHECK-002 exempts I5 of a listed region, not its references."""
    clusters = store_clusters(d)
    def change(buf: bytearray) -> None:
        set_shared(buf, 0, 1 + clusters)
        set_root_field(buf, 76, 4, 1)  # intents: region 0
    edit(frozen, change)


def table_dropped_leaving_its_place(d: Path, frozen: Path) -> None:
    """F-MAP-006: both copies drop the table (the clusters read their punched local places), its bytes stay."""
    def change(buf: bytearray) -> None:
        for copy in (0, 129):
            start = MiB + copy * 4096
            buf[start + 40:start + 44] = bytes(4)
            forge_map_crc(buf, start, MAP_USED_4K)
    edit(frozen, change)


def bytes_after_the_table(d: Path, frozen: Path) -> None:
    flip(frozen, MiB + SHARED_USED_4K + 3, 0x07)


def store_sector_absent(d: Path, frozen: Path) -> None:
    """A present sector of a shared cluster whose store sector is absent: it reads what the store denotes, zero."""
    def change(buf: bytearray) -> None:
        for copy in (0, 129):
            start = MiB + copy * 4096
            buf[start + 576] = 0x01  # store cluster 0: its first sector alone stays present
            forge_map_crc(buf, start, MAP_USED_4K)
    edit(d / "lamina-store.lam", change)


def store_map_flag(d: Path, frozen: Path) -> None:
    """Map flags bit 0 in copy A of the store, a layer without shared-clusters: that copy is invalid."""
    def change(buf: bytearray) -> None:
        buf[MiB + 40] |= 1
        forge_map_crc(buf, MiB, MAP_USED_4K)
    edit(d / "lamina-store.lam", change)


def store_with_shared_clusters(d: Path, frozen: Path) -> None:
    """F-SHARE-001: the store is a layer without shared-clusters."""
    def change(buf: bytearray) -> None:
        for slot in SLOTS:
            buf[slot + 32] |= 1
            buf[slot + 3996:slot + 4012] = b"\x11" * 16
            forge_root_crc(buf, slot)
    edit(d / "lamina-store.lam", change)


SHARED_HOSTILE = {
    "shared-ref-past-the-store-end": ref_past_end,
    "shared-ref-to-a-free-cluster": ref_to_free_cluster,
    "shared-ref-without-present-sector": ref_without_present_sector,
    "shared-another-store-uuid": another_store_uuid,
    "shared-store-missing": store_missing,
    "shared-store-of-another-cluster-size": store_of_another_cluster_size,
    "shared-store-data-flipped": store_data_flipped,
    "shared-local-bytes-under-a-reference": local_bytes_under_a_reference,
    "shared-table-only-in-copy-a": table_only_in_copy_a,
    "shared-listed-ref-past-the-store-end": listed_ref_past_end,
    "shared-table-dropped-leaving-its-place": table_dropped_leaving_its_place,
    "shared-bytes-after-the-table": bytes_after_the_table,
    "shared-store-sector-absent": store_sector_absent,
    "shared-map-flag-in-the-store": store_map_flag,
    "shared-store-with-shared-clusters": store_with_shared_clusters,
}


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], tuple[str, str]]
    group: str = ""  # cases of one group share a directory


# Forged images: fields only a forger (or a future writer) sets, with their
# CRCs recomputed so that the field rules and check's invariants must judge them.

MAX_COUNTER = (1 << 63) - 1
SLOTS = (0, 524288)


def set_root_field(buf: bytearray, offset: int, size: int, value: int,
                   slots: tuple[int, ...] = SLOTS) -> None:
    for slot in slots:
        buf[slot + offset:slot + offset + size] = value.to_bytes(size, "little")
        forge_root_crc(buf, slot)


def set_map_field(buf: bytearray, offset: int, size: int, value: int) -> None:
    """Region 0 of a 4 KiB-cluster image, both copies."""
    for copy in (0, 129):
        start = MiB + copy * 4096
        buf[start + offset:start + offset + size] = value.to_bytes(size, "little")
        forge_map_crc(buf, start, 576 + 4096 // 32)


def forged(change: Callable[[bytearray], None]) -> Callable[[Path], tuple[str, str]]:
    def build(d: Path) -> tuple[str, str]:
        with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096) as img:
            img.write(0, pattern(120, 8192))
        buf = bytearray((d / "disk.lam").read_bytes())
        change(buf)
        (d / "disk.lam").write_bytes(bytes(buf))
        return "disk.lam", "disk.lam"
    return build


def shrunk_listed(buf: bytearray) -> None:
    """What a crash in a shrink leaves: the last region listed, bits past the new size."""
    set_root_field(buf, 16, 8, 4096)
    set_root_field(buf, 76, 4, 1)


def build_overlay(change: Callable[[Path], None]) -> Callable[[Path], tuple[str, str]]:
    def build(d: Path) -> tuple[str, str]:
        with Image.create(str(d / "b.lam"), MiB, cluster_size=4096) as img:
            img.write(0, pattern(130, 8192))
        with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096, base="b.lam",
                          base_format="lamina") as img:
            img.write(4096, pattern(131, 512))
        change(d)
        return "disk.lam", "disk.lam"
    return build


def base_generation_moved(committing: bool) -> Callable[[Path], None]:
    def change(d: Path) -> None:
        buf = bytearray((d / "disk.lam").read_bytes())
        moved = int.from_bytes(buf[112:120], "little") + 1
        set_root_field(buf, 112, 8, moved)
        if committing:
            set_root_field(buf, 3984, 4, 1)
        (d / "disk.lam").write_bytes(bytes(buf))
    return change


def set_base_path(buf: bytearray, path: bytes) -> None:
    """Replace the base path of both root copies, moving the snapshot table after it."""
    for slot in SLOTS:
        length = int.from_bytes(buf[slot + 80:slot + 84], "little")
        old = int.from_bytes(buf[slot + 3968:slot + 3972], "little")
        tail = bytes(buf[slot + 4096 + ((old + 7) & ~7):slot + length])
        root = bytearray(buf[slot:slot + 4096]) + path + bytes(-len(path) % 8) + tail
        root[3968:3972] = len(path).to_bytes(4, "little")
        root[80:84] = len(root).to_bytes(4, "little")
        buf[slot:slot + len(root)] = root
        forge_root_crc(buf, slot)


def build_base_loop(d: Path) -> tuple[str, str]:
    """F-REF-002: disk.lam over b.lam over disk.lam, a chain no tool makes."""
    def change(d: Path) -> None:
        buf = bytearray((d / "b.lam").read_bytes())
        set_root_field(buf, 84, 4, 2)  # base_kind: a Lamina layer
        set_base_path(buf, b"disk.lam")
        (d / "b.lam").write_bytes(bytes(buf))
    return build_overlay(change)(d)


def build_vmstate_damaged(d: Path) -> tuple[str, str]:
    with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(140, 8192))
    (d / "vm.bin").write_bytes(pattern(141, 3000))
    assert lamina("snapshot", "create", "--vmstate", "vm.bin", "disk.lam", "s1", cwd=d)[0] == 0
    flip(next((d / "disk.lam.layers").glob("*.vmstate")), 5, 0x01)
    return "disk.lam", "disk.lam"


def build_layers_swapped(d: Path) -> tuple[str, str]:
    """F-OPEN-003: two frozen layers' contents exchanged under their names."""
    with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(150, 8192))
    assert lamina("snapshot", "create", "disk.lam", "s1", cwd=d)[0] == 0
    with Image.open(str(d / "disk.lam")) as img:
        img.write(0, pattern(151, 512))
    assert lamina("snapshot", "create", "disk.lam", "s2", cwd=d)[0] == 0
    first, second = sorted(frozen_layers(d))
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    return "disk.lam", "disk.lam"


def build_raw_base_odd(d: Path) -> tuple[str, str]:
    """F-MEAN-004: a recorded raw base of a length no tool makes, read byte by byte."""
    (d / "a.raw").write_bytes(pattern(160, MiB))
    with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096, base="a.raw",
                      base_format="raw") as img:
        img.write(0, pattern(161, 512))
    (d / "a.raw").write_bytes(pattern(160, MiB - 100))
    buf = bytearray((d / "disk.lam").read_bytes())
    set_root_field(buf, 120, 8, MiB - 100)   # base_size
    set_root_field(buf, 3988, 8, MiB - 100)  # base_visible
    (d / "disk.lam").write_bytes(bytes(buf))
    return "disk.lam", "disk.lam"


def build_twin_copied(d: Path) -> tuple[str, str]:
    """F-TREE-003: the top's twin replaced by a copy (a replica without -H): an orphan by identity in both."""
    with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(170, 8192))
    twin, = (p for p in (d / "disk.lam.layers").glob("*.lam") if os.path.samefile(p, d / "disk.lam"))
    twin.unlink()
    shutil.copyfile(d / "disk.lam", twin)
    return "disk.lam", "disk.lam"


def build_entry_naming_the_top(d: Path) -> tuple[str, str]:
    """F-ROOT-007: a snapshot entry whose layer_uuid is the root's own image_uuid makes the copy invalid."""
    from lamina.spec.structures import make_snapshot_entry

    with Image.create(str(d / "disk.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(171, 4096))
        entry = make_snapshot_entry("me", id=1, layer_uuid=img.root.image_uuid, creation_time_ns=0, vm_clock_ns=0,
                                    disk_size=MiB, vmstate_size=0, vmstate_crc=0)
        img.set_root(snapshots=(entry,), next_snapshot_id=2)
    return "disk.lam", "disk.lam"


FORGED_CASES = [
    Case("forged-generation-at-bound", forged(lambda b: set_root_field(b, 24, 8, MAX_COUNTER))),
    Case("forged-data-generation-at-bound", forged(lambda b: set_root_field(b, 88, 8, MAX_COUNTER))),
    Case("forged-next-snapshot-id-at-bound",
         forged(lambda b: set_root_field(b, 3976, 8, MAX_COUNTER))),
    Case("forged-map-generation-at-bound", forged(lambda b: set_map_field(b, 16, 8, MAX_COUNTER))),
    Case("forged-committing-without-base", forged(lambda b: set_root_field(b, 3984, 4, 1))),
    Case("forged-version-2-in-copy-b",
         forged(lambda b: set_root_field(b, 8, 4, 2, slots=(524288,)))),
    # bit 1: unknown to both readers (bit 0 is shared-clusters, known to both)
    Case("forged-incompatible-feature-in-copy-a",
         forged(lambda b: set_root_field(b, 32, 8, 2, slots=(0,)))),
    Case("forged-crc-of-an-empty-cluster", forged(lambda b: set_map_field(b, 64 + 4 * 5, 4, 1234))),
    Case("forged-presence-past-the-size", forged(lambda b: set_root_field(b, 16, 8, 4096))),
    Case("forged-shrink-crash", forged(shrunk_listed)),
    Case("committing-base-moved-on", build_overlay(base_generation_moved(True))),
    Case("base-moved-on", build_overlay(base_generation_moved(False))),
    Case("vmstate-damaged", build_vmstate_damaged),
    Case("layers-swapped", build_layers_swapped),
    Case("twin-copied", build_twin_copied),
    Case("entry-naming-the-top", build_entry_naming_the_top),
    Case("raw-base-of-odd-length", build_raw_base_odd),
    Case("base-loop", build_base_loop),
]

SHARED_CASES = [
    Case("shared-clones-a", build_shared_clones("a.lam", "a.lam"), "shared-clones"),
    Case("shared-clones-a-snapshot", build_shared_clones("a.lam@s", "a.lam"), "shared-clones"),
    Case("shared-clones-b", build_shared_clones("b.lam", "b.lam"), "shared-clones"),
    Case("shared-clones-b-snapshot", build_shared_clones("b.lam@s", "b.lam"), "shared-clones"),
    Case("shared-clones-base-gold", build_shared_clones("disk.lam@gold", "disk.lam"), "shared-clones"),
    Case("shared-cluster-64k", build_shared_cluster_size(64 * KiB)),
    Case("shared-cluster-2048k", build_shared_cluster_size(2048 * KiB)),
] + [Case(f"shared-ten-i{i}" + ("-snapshot" if snap else ""), build_ten(i, snap), "shared-ten")
     for i in range(TEN) for snap in (True, False)] + [
    Case(name, build_shared_hostile(change)) for name, change in SHARED_HOSTILE.items()]


CASES = [Case(f"cluster-{c // KiB}k", build_cluster_size(c)) for c in
         (4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB,
          1024 * KiB, 2048 * KiB)] + [
    Case("raw-base", build_raw_base),
    Case("lamina-base", build_lamina_base),
    Case("chain-of-3", build_chain3),
    Case("snapshot-monday", build_snapshot("monday"), "snap"),
    Case("snapshot-tuesday", build_snapshot("tuesday"), "snap"),
    Case("snapshot-top", build_snapshot(None), "snap"),
    Case("clone", build_clone, "snap"),
    Case("snapshot-by-id", build_snapshot_by_id, "snap"),
    Case("layer-directory-files", build_layer_directory),
    Case("layer-directory-is-a-link", build_layer_directory_link),
    Case("base-outside-directory", build_base_outside),
    Case("top-through-a-link-beside-it", build_linked_top("sub/beside.lam"), "links"),
    Case("top-through-a-link-elsewhere", build_linked_top("elsewhere.lam"), "links"),
    Case("crash-pending", build_crash),
    Case("damaged-root-a", build_damaged_root),
    Case("damaged-map-a", build_damaged_map("A")),
    Case("damaged-map-b", build_damaged_map("B")),
    Case("flipped-data", build_flipped_data),
    Case("both-roots-damaged", build_both_roots),
    Case("missing-snapshot-layer", build_missing_snapshot_layer),
    Case("base-shrunk-then-grown", build_base_shrunk),
] + FORGED_CASES + SHARED_CASES

# The cases each broken variant must fail, and no others.
DEFECT_CASES = {
    "BROKEN_IGNORE_SECOND_COPY": {"damaged-root-a", "damaged-map-a", "damaged-map-b",
                                  "forged-version-2-in-copy-b", "shared-table-only-in-copy-a",
                                  "shared-map-flag-in-the-store"},
    "BROKEN_TRUST_CRC": {"damaged-root-a", "damaged-map-a", "flipped-data", "both-roots-damaged",
                         "forged-crc-of-an-empty-cluster", "forged-presence-past-the-size",
                         "shared-store-data-flipped", "shared-store-sector-absent",
                         "shared-table-dropped-leaving-its-place"},
    "BROKEN_BASE_PAST_END": {"base-shrunk-then-grown"},
    "BROKEN_SNAPSHOT_LAYER": {"snapshot-monday", "snapshot-tuesday", "snapshot-by-id",
                              "shared-clones-a-snapshot", "shared-clones-b-snapshot"},
}


@dataclass
class Expected:
    directory: Path
    target: str
    image: str
    raw: bytes | None  # None: the reference refuses to read it
    check_exit: int
    kinds: set[str]


@pytest.fixture(scope="module")
def binaries(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (cc) on this machine: lamina-c cannot be built")
    out = tmp_path_factory.mktemp("bin")
    built, jobs = {}, []
    for variant in ("", *VARIANTS):
        exe = out / ("lamina-c" + ("-" + variant if variant else ""))
        flags = ["-O2"] if not variant else ["-O0", "-D" + variant]
        jobs.append(subprocess.Popen([cc, "-std=c11", *flags, "-Wall", "-Wextra", "-Werror",
                                      "-o", str(exe), *map(str, C_SOURCES)],
                                     stderr=subprocess.PIPE, text=True))
        built[variant] = exe
    # and one with the sanitizers, for hostile input, where the compiler has them
    sanitized = subprocess.Popen([cc, "-std=c11", "-O1", "-g", "-fsanitize=address,undefined",
                                  "-fno-sanitize-recover=undefined", "-Wall", "-Wextra", "-Werror",
                                  "-o", str(out / "lamina-c-sanitized"), *map(str, C_SOURCES)],
                                 stderr=subprocess.PIPE, text=True)
    for job in jobs:
        _, err = job.communicate()
        assert job.returncode == 0, err
    sanitized.communicate()
    built["sanitized"] = out / "lamina-c-sanitized" if sanitized.returncode == 0 else built[""]
    return built


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Expected]:
    root = tmp_path_factory.mktemp("cases")
    result = {}
    for case in CASES:
        d = root / (case.group or case.name)
        d.mkdir(exist_ok=True)
        with contextlib.chdir(d):  # bases are recorded relative to the image
            target, image = case.build(d)
        raw_name = f"{case.name}.reference.raw"
        code, _ = lamina("convert", "-O", "raw", target, raw_name, cwd=d)
        raw = (d / raw_name).read_bytes() if code == 0 else None
        (d / raw_name).unlink(missing_ok=True)
        code, out = lamina("check", "--output", "json", image, cwd=d)
        report = json.loads(out) if out.strip().startswith("{") else {"findings": []}
        result[case.name] = Expected(d, target, image, raw, code,
                                     {f["kind"] for f in report.get("findings", [])})
    return result


def fingerprints(d: Path) -> dict[str, tuple[int, int, int]]:
    """Size and change times of every file: a write to any of them changes these."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ctime_ns)
            for p in sorted(d.rglob("*")) if p.is_file() and not p.name.endswith(".out")}


def run_case(exe: Path, exp: Expected, name: str) -> list[str]:
    """Every way lamina-c's answer differs from the reference's (empty: it agrees)."""
    problems = []
    before = fingerprints(exp.directory)
    out = exp.directory / f"{name}.{exe.name}.out"
    dump = subprocess.run([str(exe), "dump", exp.target, out.name], cwd=exp.directory,
                          capture_output=True, text=True, timeout=60)
    if exp.raw is None:
        if dump.returncode != 2:
            problems.append(f"dump exit {dump.returncode}, the reference refuses (expected 2)")
    elif dump.returncode != 0:
        problems.append(f"dump exit {dump.returncode}: {dump.stderr.strip()}")
    elif out.read_bytes() != exp.raw:
        problems.append("dump differs from lamina convert -O raw")
    out.unlink(missing_ok=True)
    check = subprocess.run([str(exe), "check", exp.image], cwd=exp.directory,
                           capture_output=True, text=True, timeout=60)
    kinds = {line.split(":", 1)[0] for line in check.stdout.splitlines() if ":" in line}
    if check.returncode != exp.check_exit:
        problems.append(f"check exit {check.returncode}, lamina check {exp.check_exit}:"
                        f" {check.stdout.strip()}")
    elif kinds != exp.kinds:
        problems.append(f"check kinds {sorted(kinds)}, lamina check {sorted(exp.kinds)}")
    if fingerprints(exp.directory) != before:
        problems.append("an image file changed")
    return problems


def test_capabilities(binaries: dict[str, Path]) -> None:
    done = subprocess.run([str(binaries[""]), "capabilities"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "dump check shared-clusters\n"
    bad = subprocess.run([str(binaries[""]), "apply", "x", "y"], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_agrees_with_reference(binaries: dict[str, Path], expected: dict[str, Expected],
                               name: str) -> None:
    assert run_case(binaries[""], expected[name], name) == []


def test_reference_verdicts_cover_every_class(expected: dict[str, Expected]) -> None:
    """The cases reach every exit code of check and both refusal and success of a read."""
    assert {e.check_exit for e in expected.values()} == {0, 1, 2, 3}
    assert any(e.raw is None for e in expected.values())
    assert expected["crash-pending"].kinds >= {"intents"}


def test_dump_is_sparse(binaries: dict[str, Path], expected: dict[str, Expected]) -> None:
    exp = expected["cluster-2048k"]
    out = exp.directory / "sparse.out"
    subprocess.run([str(binaries[""]), "dump", exp.target, out.name], cwd=exp.directory,
                   check=True)
    st = out.stat()
    assert st.st_size == len(exp.raw or b"")
    assert st.st_blocks * 512 < st.st_size // 2
    out.unlink()


def test_dump_exit_codes_for_files(binaries: dict[str, Path],
                                            expected: dict[str, Expected]) -> None:
    exp = expected["snapshot-top"]
    for target in ("nosuch.lam", "disk.lam@nosuch"):
        done = subprocess.run([str(binaries[""]), "dump", target, "x.out"], cwd=exp.directory,
                              capture_output=True, text=True)
        assert done.returncode == 1 and done.stderr, target
    assert not (exp.directory / "x.out").exists()
    (exp.directory / "there.out").write_bytes(b"keep")
    done = subprocess.run([str(binaries[""]), "dump", "disk.lam", "there.out"],
                          cwd=exp.directory, capture_output=True, text=True)
    assert done.returncode == 1 and (exp.directory / "there.out").read_bytes() == b"keep"
    (exp.directory / "there.out").unlink()
    (exp.directory / "a-directory.lam").mkdir()
    done = subprocess.run([str(binaries[""]), "dump", "a-directory.lam", "x.out"],
                          cwd=exp.directory, capture_output=True, text=True)
    assert done.returncode == 2 and not (exp.directory / "x.out").exists()
    (exp.directory / "a-directory.lam").rmdir()


@pytest.mark.parametrize("variant", VARIANTS)
def test_broken_variant_fails_exactly_its_cases(binaries: dict[str, Path],
                                                expected: dict[str, Expected],
                                                variant: str) -> None:
    failing = {name for name in expected if run_case(binaries[variant], expected[name], name)}
    assert failing == DEFECT_CASES[variant]


def test_a_writer_keeps_lamina_c_out(binaries: dict[str, Path], tmp_path: Path) -> None:
    """F-LOCK-001/002: lamina-c takes shared locks, so an open writer makes it fail at once."""
    with Image.create(str(tmp_path / "disk.lam"), MiB, cluster_size=4096) as img:
        img.write(0, pattern(80, 4096))
        for command in (["dump", "disk.lam", "x.out"], ["check", "disk.lam"]):
            done = subprocess.run([str(binaries[""]), *command], cwd=tmp_path,
                                  capture_output=True, text=True)
            assert done.returncode == 1 and "locked" in done.stderr
    done = subprocess.run([str(binaries[""]), "check", "disk.lam"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == ""


def test_a_writer_of_the_store_keeps_lamina_c_out(binaries: dict[str, Path], tmp_path: Path) -> None:
    """F-LOCK-001/002 for the store (section 13, Limits): a writer holding it makes lamina-c fail with ImageLocked, exit 1."""
    make_shared_pair(tmp_path)
    with Image.open(str(tmp_path / "lamina-store.lam")):
        for command in (["dump", "p.lam@s", "x.out"], ["check", "p.lam"]):
            done = subprocess.run([str(binaries[""]), *command], cwd=tmp_path, capture_output=True, text=True)
            assert done.returncode == 1 and "ImageLocked" in done.stderr and done.stdout == "", (command, done)
    assert not (tmp_path / "x.out").exists()
    done = subprocess.run([str(binaries[""]), "check", "p.lam"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == ""


# ----------------------------------------------------------------------------
# Hostile input: mutated images, many with their CRCs forged so that the field
# rules, not the checksums, must catch them.  lamina-c (built with the address
# and undefined-behaviour sanitizers where the compiler has them) must never
# crash and must give the reference's verdict on every one.

HOSTILE_VALUES = (0, 1, 2, 511, 512, 4095, 4096, 4097, 1 << 20, 1 << 31, (1 << 32) - 1, 1 << 50,
                  (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
ROOT_FIELDS = ((12, 4), (16, 8), (24, 8), (72, 4), (76, 4), (80, 4), (84, 4), (88, 8), (112, 8),
               (120, 8), (128, 4), (132, 4), (3968, 4), (3972, 4), (3976, 8), (3984, 4), (3988, 8))
HOSTILE_BASE_PATHS = (b"../a.raw", b"/etc/passwd", b"a.raw\0", b"b.lam", b"disk.lam",
                      b"0" * 32 + b".lam", b"A" * 32 + b".lam", b"\xff\xfe", b"../" * 40 + b"x")


def forge_root_crc(buf: bytearray, slot: int) -> None:
    import crc32c
    length = int.from_bytes(buf[slot + 80:slot + 84], "little")
    if 4096 <= length <= 524288 and slot + length <= len(buf):
        copy = bytearray(buf[slot:slot + length])
        copy[4092:4096] = bytes(4)
        buf[slot + 4092:slot + 4096] = crc32c.crc32c(bytes(copy)).to_bytes(4, "little")


def forge_map_crc(buf: bytearray, offset: int, used: int) -> None:
    import crc32c
    copy = bytearray(buf[offset:offset + used])
    copy[60:64] = bytes(4)
    buf[offset + 60:offset + 64] = crc32c.crc32c(bytes(copy)).to_bytes(4, "little")


def mutate(buf: bytearray, rng: random.Random) -> None:
    """One hostile change to a layer file of 4 KiB clusters."""
    slots = [0, 524288] if rng.random() < 0.5 else [rng.choice([0, 524288])]
    kind = rng.randrange(6)
    if kind == 0:  # random bits of the fixed root, CRC mostly forged
        forge = rng.random() < 0.7
        for slot in slots:
            for _ in range(rng.randrange(1, 4)):
                buf[slot + rng.randrange(4096)] ^= 1 << rng.randrange(8)
            if forge:
                forge_root_crc(buf, slot)
    elif kind == 1:  # a field set to a boundary value, CRC forged
        offset, size = rng.choice(ROOT_FIELDS)
        value = rng.choice(HOSTILE_VALUES) & ((1 << (8 * size)) - 1)
        for slot in slots:
            buf[slot + offset:slot + offset + size] = value.to_bytes(size, "little")
            forge_root_crc(buf, slot)
    elif kind == 2:  # bits of the tail (base path, snapshot table), CRC forged
        for slot in slots:
            length = int.from_bytes(buf[slot + 80:slot + 84], "little")
            if 4096 < length <= 524288:
                buf[slot + 4096 + rng.randrange(length - 4096)] ^= 1 << rng.randrange(8)
            forge_root_crc(buf, slot)
    elif kind == 3:  # another base path, lengths and CRC forged
        if int.from_bytes(buf[84:88], "little") != 0:
            set_base_path(buf, rng.choice(HOSTILE_BASE_PATHS))
    elif kind == 4:  # bits of one or both map copies of a region, CRC mostly forged
        first, stride, used = MiB, 130 * 4096, 576 + 4096 // 32
        region = rng.randrange(max(1, (len(buf) - first) // stride))
        copies = rng.choice([[0], [1], [0, 1]])
        forge = rng.random() < 0.7
        for copy in copies:
            offset = first + region * stride + copy * 129 * 4096
            if offset + used > len(buf):
                continue
            for _ in range(rng.randrange(1, 4)):
                buf[offset + rng.randrange(used)] ^= 1 << rng.randrange(8)
            if forge:
                forge_map_crc(buf, offset, used)
    elif rng.random() < 0.5:  # the file cut short
        del buf[rng.randrange(len(buf)):]
    else:  # any byte
        buf[rng.randrange(len(buf))] ^= 0xFF


def test_hostile_images_agree_with_reference(binaries: dict[str, Path], tmp_path: Path) -> None:
    sanitized = binaries["sanitized"]
    seed = tmp_path / "seed"
    seed.mkdir()
    with contextlib.chdir(seed):
        (seed / "a.raw").write_bytes(pattern(90, MiB))
        with Image.create("b.lam", MiB, cluster_size=4096, base="a.raw", base_format="raw") as img:
            img.write(4096, pattern(91, 8192))
        with Image.create("disk.lam", 2 * MiB, cluster_size=4096, base="b.lam",
                          base_format="lamina") as img:
            img.write(0, pattern(92, 4096))
            img.write(600 * KiB, pattern(93, 4096))
        (seed / "vm.bin").write_bytes(pattern(94, 5000))
        assert lamina("snapshot", "create", "--vmstate", "vm.bin", "disk.lam", "s1", cwd=seed)[0] == 0
        with Image.open("disk.lam") as img:
            img.write(8192, pattern(95, 4096))
    rng = random.Random(20261201)
    disagreements = []
    for n in range(16):
        d = tmp_path / f"m{n}"
        shutil.copytree(seed, d)
        target = rng.choice([d / "disk.lam", d / "b.lam", *sorted(frozen_layers(d))])
        buf = bytearray(target.read_bytes())
        mutate(buf, rng)
        target.write_bytes(bytes(buf))
        for image in ("disk.lam", "disk.lam@s1"):
            code, _ = lamina("convert", "-O", "raw", image, "ref.out", cwd=d)
            done = subprocess.run([str(sanitized), "dump", image, "c.out"], cwd=d,
                                  capture_output=True, text=True, timeout=60)
            assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr
            assert done.returncode in (0, 1, 2), done.stderr
            if (code == 0) != (done.returncode == 0) or (
                    code == 0 and (d / "ref.out").read_bytes() != (d / "c.out").read_bytes()):
                disagreements.append((n, target.name, image, code, done.returncode, done.stderr))
            for out_name in ("ref.out", "c.out"):
                (d / out_name).unlink(missing_ok=True)
        code, out = lamina("check", "--output", "json", "disk.lam", cwd=d)
        ref_kinds = {f["kind"] for f in json.loads(out)["findings"]} if out.startswith("{") else set()
        done = subprocess.run([str(sanitized), "check", "disk.lam"], cwd=d, capture_output=True,
                              text=True, timeout=60)
        assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr
        kinds = {line.split(":", 1)[0] for line in done.stdout.splitlines()}
        if code != done.returncode or kinds != ref_kinds:
            disagreements.append((n, target.name, "check", code, done.returncode, done.stdout))
        shutil.rmtree(d)
    assert disagreements == [], "\n".join(map(repr, disagreements))


def forged_layer(image_uuid: bytes, slot: int, base_name: str | None,
                 base_uuid: bytes | None) -> bytes:
    """A root copy of an empty layer (virtual size 0) over a Lamina base, built field by field."""
    import crc32c
    path = base_name.encode() if base_name else b""
    root = bytearray(4096 + (-len(path) % 8) + len(path))
    root[0:8] = b"\x8aLAMINA\n"
    root[8:32] = (1).to_bytes(4, "little") + (12).to_bytes(4, "little") + bytes(8) + \
        (1).to_bytes(8, "little")  # version, cluster_bits, virtual_size, generation
    root[56:72] = image_uuid
    root[72:88] = b"".join(v.to_bytes(4, "little") for v in
                           (slot, 0, len(root), 2 if base_name else 0))
    root[88:96] = (1).to_bytes(8, "little")  # data_generation
    if base_name and base_uuid:
        root[96:112] = base_uuid
        root[112:120] = (1).to_bytes(8, "little")
    root[3968:3972] = len(path).to_bytes(4, "little")
    root[3976:3984] = (1).to_bytes(8, "little")  # next_snapshot_id
    root[4096:4096 + len(path)] = path
    root[4092:4096] = crc32c.crc32c(bytes(root)).to_bytes(4, "little")
    return bytes(root)


def test_chain_depth_bound(binaries: dict[str, Path], tmp_path: Path) -> None:
    """F-REF-002: a chain of MAX_CHAIN_DEPTH (2048) files is read; one more is ChainTooDeep."""
    count = 2049
    uuids = [random.Random(n).randbytes(16) for n in range(count)]
    for n in range(count):
        base = f"l{n + 1}.lam" if n + 1 < count else None
        with open(tmp_path / f"l{n}.lam", "wb") as f:
            for slot in (0, 1):
                f.seek(slot * 524288)
                f.write(forged_layer(uuids[n], slot, base, uuids[n + 1] if base else None))
            f.truncate(MiB)
    exe = str(binaries[""])
    fits = subprocess.run([exe, "check", "l1.lam"], cwd=tmp_path, capture_output=True, text=True)
    assert fits.returncode == 0 and fits.stdout == ""
    assert subprocess.run([exe, "dump", "l1.lam", "l1.out"], cwd=tmp_path).returncode == 0
    deep = subprocess.run([exe, "check", "l0.lam"], cwd=tmp_path, capture_output=True, text=True)
    code, out = lamina("check", "--output", "json", "l0.lam", cwd=tmp_path)
    assert (deep.returncode, code) == (2, 2)
    assert {line.split(":", 1)[0] for line in deep.stdout.splitlines()} == \
        {f["kind"] for f in json.loads(out)["findings"]} == {"base-reference"}
    done = subprocess.run([exe, "dump", "l0.lam", "l0.out"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "ChainTooDeep" in done.stderr


# The conformance kit's view of the same defects: which vectors each broken build must fail, at least (the vectors
# built for that defect), and at most (the vectors whose `covers` names the defect's class, conform/covers.py).
DEFECT_CLASSES = {
    "BROKEN_IGNORE_SECOND_COPY": ("second-copy", {"valid/damaged-root-copy", "valid/damaged-map-copy",
                                                  "invalid/unknown-incompatible-feature"}),
    "BROKEN_TRUST_CRC": ("unverified-crc", {"valid/damaged-root-copy", "valid/damaged-map-copy", "invalid/data-checksum",
                                            "invalid/root-both-checksum", "invalid/map-both-copies-bad"}),
    "BROKEN_BASE_PAST_END": ("base-past-end", {"valid/chain-3"}),
    "BROKEN_SNAPSHOT_LAYER": ("snapshot-layer", {"valid/snapshots", "valid/clone", "invalid/snapshot-layer-missing",
                                                 "invalid/snapshot-layer-other-uuid"}),
}


@pytest.fixture(scope="module")
def vectors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lamina.conform.vectors import generate

    root = tmp_path_factory.mktemp("kit") / "vectors"
    generate(str(root))
    return root


def _conform(exe: Path, vectors: Path) -> tuple[int, dict[str, str]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = lamina_main(["conform", "--impl", str(exe), "--vectors", str(vectors), "--output", "json"])
    return code, {f"{r['category']}/{r['name']}": r["status"] for r in json.loads(out.getvalue())["results"]}


def test_lamina_c_passes_every_vector_of_the_kit(binaries: dict[str, Path], vectors: Path) -> None:
    """The proof that FORMAT.md and the kit serve another language: every vector it can run passes."""
    code, statuses = _conform(binaries[""], vectors)
    assert 0 == code, {k: s for k, s in statuses.items() if s == "fail"}
    assert {"pass"} == {s for k, s in statuses.items() if not k.startswith("scripts/")}
    assert {"skip"} == {s for k, s in statuses.items() if k.startswith("scripts/")}  # no `apply`: a reader


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_broken_build_fails_the_vectors_of_its_defect_and_only_those(binaries: dict[str, Path], vectors: Path,
                                                                        variant: str) -> None:
    defect, built_for = DEFECT_CLASSES[variant]
    code, statuses = _conform(binaries[variant], vectors)
    failed = {k for k, s in statuses.items() if s == "fail"}
    covering = {k for k in statuses if defect in json.loads((vectors / k / "expect.json").read_text())["covers"]}
    assert 4 == code
    assert built_for <= failed, f"{variant} passes vectors built for its defect: {sorted(built_for - failed)}"
    assert failed <= covering, f"{variant} fails vectors that do not cover {defect}: {sorted(failed - covering)}"


def test_lamina_c_reads_deduplicated_trees(expected: dict[str, Expected]) -> None:
    """The trees of SHARED_CASES are deduplicated: frozen layers set shared-clusters and a store holds data."""
    for group in ("shared-clones", "shared-ten"):
        d = expected[f"{group}-{'a' if group == 'shared-clones' else 'i0'}"].directory
        roots = [p.read_bytes()[:4096] for p in d.glob("*.layers/*.lam")]
        assert any(int.from_bytes(r[32:40], "little") & 1 for r in roots), group
        assert (d / "lamina-store.lam").exists()
    assert all(expected[c.name].raw is not None and expected[c.name].check_exit == 0
               for c in SHARED_CASES if c.name not in SHARED_HOSTILE)
    for name in ("shared-cluster-64k", "shared-cluster-2048k"):
        d = expected[name].directory
        store = (d / "lamina-store.lam").read_bytes()[:4096]
        assert int.from_bytes(store[16:24], "little") >= 2 * (1 << int.from_bytes(store[12:16], "little"))


# The verdict FORMAT.md section 13 gives each hostile reference: (dump refused, check kinds that must appear).
SHARED_VERDICTS = {
    "shared-ref-past-the-store-end": (True, {"shared-reference"}),
    "shared-ref-to-a-free-cluster": (True, {"shared-reference"}),
    "shared-ref-without-present-sector": (False, {"shared-reference"}),
    "shared-another-store-uuid": (True, {"shared-reference"}),
    "shared-store-missing": (True, {"shared-reference"}),
    "shared-store-of-another-cluster-size": (True, {"shared-reference"}),
    "shared-store-data-flipped": (False, {"data-checksum"}),
    "shared-local-bytes-under-a-reference": (False, {"leaked-bytes"}),
    "shared-table-only-in-copy-a": (False, {"map-copy"}),
    "shared-listed-ref-past-the-store-end": (True, {"shared-reference", "intents"}),
    "shared-table-dropped-leaving-its-place": (False, {"data-checksum"}),
    "shared-bytes-after-the-table": (False, {"leaked-bytes"}),
    "shared-store-sector-absent": (False, {"data-checksum"}),
    "shared-map-flag-in-the-store": (False, {"map-copy"}),
    "shared-store-with-shared-clusters": (True, {"shared-reference"}),
}


@pytest.mark.parametrize("name", sorted(SHARED_VERDICTS))
def test_hostile_shared_references(binaries: dict[str, Path], expected: dict[str, Expected], name: str) -> None:
    """Each forged reference gets FORMAT.md's verdict from both readers (agreement itself: test_agrees_with_reference)."""
    refused, kinds = SHARED_VERDICTS[name]
    exp = expected[name]
    assert (exp.raw is None) == refused and kinds <= exp.kinds
    done = subprocess.run([str(binaries["sanitized"]), "dump", exp.target, "x.out"], cwd=exp.directory,
                          capture_output=True, text=True, timeout=60)
    assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr
    (exp.directory / "x.out").unlink(missing_ok=True)
    if refused:
        assert done.returncode == 2 and "SharedReferenceError" in done.stderr, done.stderr
    else:
        assert done.returncode == 0, done.stderr
    check = subprocess.run([str(binaries["sanitized"]), "check", exp.image], cwd=exp.directory,
                           capture_output=True, text=True, timeout=60)
    assert "Sanitizer" not in check.stderr and "runtime error" not in check.stderr, check.stderr
    assert check.returncode == exp.check_exit


def mutate_shared(buf: bytearray, rng: random.Random) -> None:
    """One hostile change to a deduplicated 4 KiB-cluster layer: its shared tables, its map flags, its root."""
    kind = rng.randrange(4)
    copies = rng.choice([[0], [1], [0, 1]])
    for copy in copies:
        start = MiB + copy * 129 * 4096
        if start + SHARED_USED_4K > len(buf):
            return
        if kind == 0:  # a table entry set to a boundary value
            at = start + MAP_USED_4K + 8 * rng.randrange(8)
            buf[at:at + 8] = (rng.choice(HOSTILE_VALUES + (2, 3, 4, 5)) & ((1 << 64) - 1)).to_bytes(8, "little")
        elif kind == 1:  # bits anywhere in the used length, table included
            for _ in range(rng.randrange(1, 4)):
                buf[start + rng.randrange(SHARED_USED_4K)] ^= 1 << rng.randrange(8)
        elif kind == 2:  # the flags word
            buf[start + 40:start + 44] = rng.choice([0, 2, 3, 1 << 31]).to_bytes(4, "little")
        if kind < 3 and rng.random() < 0.8:
            forge_map_crc(buf, start, SHARED_USED_4K if buf[start + 40] & 1 else MAP_USED_4K)
    if kind == 3:  # the feature word or store_uuid of the root, CRC forged
        offset, size = rng.choice(((32, 8), (3996, 16), (4004, 8)))
        for slot in SLOTS:
            value = rng.choice((0, 1, 2, 3, 1 << 63)) if size == 8 else 0
            buf[slot + offset:slot + offset + size] = value.to_bytes(size, "little")
            forge_root_crc(buf, slot)


def test_hostile_deduplicated_trees_agree_with_reference(binaries: dict[str, Path], tmp_path: Path) -> None:
    """Mutated frozen layers and stores of a deduplicated tree: the sanitized lamina-c gives the reference's verdicts."""
    sanitized = binaries["sanitized"]
    seed = tmp_path / "seed"
    seed.mkdir()
    with contextlib.chdir(seed):
        make_shared_pair(seed)
        with Image.open("p.lam") as img:
            img.write(8192, pattern(110, 4096))
    rng = random.Random(20261202)
    disagreements = []
    for n in range(24):
        d = tmp_path / f"m{n}"
        shutil.copytree(seed, d, symlinks=True)
        target = rng.choice([d / "lamina-store.lam", *sorted(frozen_layers(d, "p.lam")),
                             *sorted(frozen_layers(d, "q.lam"))])
        buf = bytearray(target.read_bytes())
        (mutate if target.name == "lamina-store.lam" and rng.random() < 0.5 else mutate_shared)(buf, rng)
        target.write_bytes(bytes(buf))
        for image in ("p.lam", "p.lam@s", "q.lam@s"):
            code, _ = lamina("convert", "-O", "raw", image, "ref.out", cwd=d)
            done = subprocess.run([str(sanitized), "dump", image, "c.out"], cwd=d,
                                  capture_output=True, text=True, timeout=60)
            assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr
            assert done.returncode in (0, 1, 2), done.stderr
            if (code == 0) != (done.returncode == 0) or (
                    code == 0 and (d / "ref.out").read_bytes() != (d / "c.out").read_bytes()):
                disagreements.append((n, target.name, image, code, done.returncode, done.stderr))
            for out_name in ("ref.out", "c.out"):
                (d / out_name).unlink(missing_ok=True)
        for image in ("p.lam", "q.lam"):
            code, out = lamina("check", "--output", "json", image, cwd=d)
            ref_kinds = {f["kind"] for f in json.loads(out)["findings"]} if out.startswith("{") else set()
            done = subprocess.run([str(sanitized), "check", image], cwd=d, capture_output=True,
                                  text=True, timeout=60)
            assert "Sanitizer" not in done.stderr and "runtime error" not in done.stderr, done.stderr
            kinds = {line.split(":", 1)[0] for line in done.stdout.splitlines()}
            if code != done.returncode or kinds != ref_kinds:
                disagreements.append((n, target.name, "check " + image, code, done.returncode, done.stdout,
                                      sorted(ref_kinds)))
        shutil.rmtree(d)
    assert disagreements == [], "\n".join(map(repr, disagreements))
