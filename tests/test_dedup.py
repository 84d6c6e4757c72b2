"""Dedup (R8, FORMAT.md section 13): equal frozen clusters stored once in the directory's shared store."""
from __future__ import annotations

import os
import random
import struct

import attrs
import pytest

from lamina.impl import layers
from lamina.impl.cli import main
from lamina.impl.dedup import DedupAcrossDirectories, dedup, gc, referenced_store_clusters
from lamina.impl.image import Image
from lamina.impl.osfile import OsStorage
from lamina.spec.abstraction import abstract_layer
from lamina.spec.protocol import read_map_copies
from lamina.spec.references import ImageContext, layer_file_name
from lamina.spec.replication import select_map, select_root
from lamina.spec.protocol import read_root_copies
from lamina.spec.store import STORE_NAME, SharedReferenceError
from lamina.spec.structures import FEATURE_SHARED_CLUSTERS, decode_map_copy, encode_map_copy
from lamina.spec.tree import check_tree

KiB, MiB = 1 << 10, 1 << 20


def noise(seed: int, length: int) -> bytes:
    """Bytes no two clusters of which are equal (unlike a repeating pattern)."""
    return random.Random(seed).randbytes(length)


def du(directory) -> int:
    """Bytes allocated on disk by every file under `directory` (st_blocks, as `du` counts)."""
    total, seen = 0, set()
    for root, _, files in os.walk(directory):
        for name in files:
            st = os.stat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def contents(targets: list[str]) -> dict[str, bytes]:
    out = {}
    for target in targets:
        with layers.open_target(target) as image:
            out[target] = image.read(0, image.virtual_size)
    return out


def clean(path: str) -> bool:
    report = check_tree(path, OsStorage())
    return report.exit_code == 0 and not report.findings


@pytest.fixture
def two_clones(tmp_path, monkeypatch):
    """Two clones of one snapshot that each write the same 8 MiB (and a little of their own), then snapshot."""
    monkeypatch.chdir(tmp_path)
    with Image.create("img.lam", 32 * MiB) as image:
        image.write(0, noise(1, 2 * MiB))
    layers.create_snapshot("img.lam", "s0")
    same = noise(2, 8 * MiB)
    for i, name in enumerate(("a.lam", "b.lam")):
        layers.clone("img.lam", "s0", name)
        with Image.open(name) as image:
            image.write(4 * MiB, same)
            image.write(20 * MiB, noise(10 + i, 64 * KiB))
        layers.create_snapshot(name, "s1")
    return tmp_path


TARGETS = ["img.lam", "img.lam@s0", "a.lam", "a.lam@s1", "b.lam", "b.lam@s1"]


def test_two_clones_writing_the_same_data_share_it_after_dedup(two_clones):
    """Must show: du drops by about the shared 8 MiB, every branch and snapshot reads the same, check is clean."""
    before, space = contents(TARGETS), du(two_clones)
    report = dedup(["a.lam"], ["b.lam"])
    assert report.duplicates == 2 * 128 and report.store_clusters_added == 128
    assert report.bytes_saved == 8 * MiB
    saved = space - du(two_clones)
    assert 7.5 * MiB <= saved <= 8.5 * MiB, saved
    assert contents(TARGETS) == before
    assert all(clean(p) for p in ("img.lam", "a.lam", "b.lam"))
    for name in ("a.lam", "b.lam"):  # the abstraction function agrees with the reader
        with layers.open_target(f"{name}@s1") as image:
            path = image.path
        disk = abstract_layer(path, OsStorage(), ImageContext.for_layer(path))
        assert disk.read(0, disk.virtual_size) == before[f"{name}@s1"]
    again = dedup(["a.lam", "b.lam"])  # nothing left to share
    assert again.duplicates == 0 and again.bytes_saved == 0


def test_a_dry_run_reports_the_saving_and_writes_nothing(two_clones):
    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    names = [os.path.join(d, n) for d in ("a.lam.layers", "b.lam.layers") for n in sorted(os.listdir(d))]
    snapshot = {p: read(p) for p in names}
    report = dedup(["a.lam", "b.lam"], dry_run=True)
    assert report.dry_run and report.bytes_saved == 8 * MiB
    assert not os.path.exists(STORE_NAME)
    assert {p: read(p) for p in names} == snapshot


def test_dedup_json_and_text_output(two_clones, capsys):
    import json

    assert 0 == main(["dedup", "--dry-run", "--output", "json", "a.lam", "--across", "b.lam"])
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["bytes_saved"] == 8 * MiB and out["duplicates"] == 256
    assert 0 == main(["dedup", "a.lam", "--across", "."])
    text = capsys.readouterr().out
    assert "bytes saved: 8388608" in text and "duplicates found: 256" in text


def test_ten_separate_images_dedup_across_to_about_one_copy(tmp_path, monkeypatch):
    """Must show (CI size): ten images created apart holding the same 2 MiB plus 64 KiB each of their own."""
    monkeypatch.chdir(tmp_path)
    same = noise(3, 2 * MiB)
    for i in range(10):
        with Image.create(f"vm{i}.lam", 8 * MiB) as image:
            image.write(0, same)
            image.write(4 * MiB, noise(100 + i, 64 * KiB))
    targets = [f"vm{i}.lam" for i in range(10)]
    before, space = contents(targets), du(tmp_path)
    assert 0 == main(["dedup", "--snapshot", "frozen", "vm0.lam", "--across", "."])
    after = du(tmp_path)
    one_copy_plus_differences = 2 * MiB + 10 * 64 * KiB
    assert space - after >= 9 * 2 * MiB - 256 * KiB
    assert after <= one_copy_plus_differences + 10 * 256 * KiB  # metadata: root and map copies of each file
    assert contents(targets) == before
    assert contents([f"{t}@frozen" for t in targets]) == {f"{t}@frozen": v for t, v in before.items()}
    assert all(clean(t) for t in targets)


def test_images_of_another_directory_are_refused(two_clones, tmp_path):
    os.mkdir("elsewhere")
    with Image.create("elsewhere/c.lam", MiB):
        pass
    with pytest.raises(DedupAcrossDirectories):
        dedup(["a.lam"], ["elsewhere/c.lam"])
    with pytest.raises(DedupAcrossDirectories):
        dedup(["a.lam"], ["elsewhere"])
    assert 1 == main(["dedup", "a.lam", "--across", "elsewhere"])


def test_deleting_a_snapshot_whose_data_others_share_keeps_every_content_and_gc_frees_the_rest(two_clones):
    dedup(["a.lam", "b.lam"])
    before = contents(TARGETS)
    layers.delete_snapshot("a.lam", "s1")  # a's top takes the snapshot's bytes (a copy, not a reference)
    assert contents(["a.lam", "b.lam", "b.lam@s1", "img.lam@s0"]) == {k: before[k] for k in
                                                                      ("a.lam", "b.lam", "b.lam@s1", "img.lam@s0")}
    assert gc("a.lam") == 0  # b's snapshot still references every store cluster
    assert all(clean(p) for p in ("a.lam", "b.lam"))
    layers.delete_snapshot("b.lam", "s1")
    store_before = os.stat(STORE_NAME).st_blocks * 512
    assert store_before >= 8 * MiB
    assert gc(".") == 128  # nobody references them now
    assert os.stat(STORE_NAME).st_blocks * 512 < 256 * KiB
    assert contents(["a.lam", "b.lam", "img.lam@s0"]) == {k: before[k] for k in ("a.lam", "b.lam", "img.lam@s0")}
    assert all(clean(p) for p in ("a.lam", "b.lam", "img.lam", STORE_NAME))


def test_a_merge_into_a_shared_cluster_copies_it_home_first(tmp_path, monkeypatch):
    """Snapshot delete writes the deleted layer's sectors into the next snapshot: into its shared clusters too."""
    monkeypatch.chdir(tmp_path)
    half = noise(4, 32 * KiB)
    for i, name in enumerate(("p.lam", "q.lam")):
        with Image.create(name, 4 * MiB) as image:
            image.write(0, noise(50 + i, 64 * KiB))  # s1: the whole first cluster, different per image
        layers.create_snapshot(name, "s1")
        with Image.open(name) as image:
            image.write(0, half)  # s2: the first half of it, the same in both
        layers.create_snapshot(name, "s2")
    report = dedup(["p.lam", "q.lam"])
    assert report.duplicates == 2
    before = contents(["p.lam", "p.lam@s2", "q.lam@s2"])
    layers.delete_snapshot("p.lam", "s1")  # s2 of p gets the second half of s1's cluster, into its shared cluster
    assert contents(["p.lam", "p.lam@s2", "q.lam@s2"]) == before
    assert clean("p.lam") and clean("q.lam")
    assert len(referenced_store_clusters(str(tmp_path), _store_uuid(), OsStorage())) == 1  # q still shares it


def _store_uuid() -> bytes:
    file = OsStorage().open(STORE_NAME, False)
    try:
        return select_root(read_root_copies(file)).current().image_uuid
    finally:
        file.close()


def _shared_layer(top: str) -> tuple[str, int]:
    """The frozen layer of `top@s1` and the first region of it that holds shared clusters."""
    with layers.open_target(f"{top}@s1") as image:
        path = image.path
        g = image.geometry
        for region in range(g.num_regions):
            m = image._map(region)
            if m is not None and m.shared_clusters():
                return path, region
    raise AssertionError("no shared region")


def _flip_store_byte(cluster: int, within: int, bits: int) -> None:
    """Rot: flip `bits` of one byte of store cluster `cluster`, its checksum left as it was."""
    store = OsStorage().open(STORE_NAME, True)
    try:
        offset = select_root(read_root_copies(store)).current().geometry.cluster_file_offset(cluster) + within
        store.pwrite(offset, bytes([store.pread(offset, 1)[0] ^ bits]))
        store.fsync()
    finally:
        store.close()


def test_a_bit_flip_in_a_store_cluster_is_found_by_check_of_every_referencing_image(two_clones):
    dedup(["a.lam", "b.lam"])
    _flip_store_byte(5, 100, 0x10)
    for top in ("a.lam", "b.lam"):
        report = check_tree(top, OsStorage())
        assert report.exit_code == 2
        bad = [f for f in report.findings if f.kind == "data-checksum"]
        assert any("shared" in f.message and f.guest_range == (4 * MiB + 5 * 64 * KiB, 64 * KiB) for f in bad), bad
        assert any(STORE_NAME in f.message for f in bad)  # the store itself fails its own I5


def _rewrite_shared_entry(path: str, region: int, value: int) -> None:
    file = OsStorage().open(path, True)
    try:
        root = select_root(read_root_copies(file)).current()
        g = root.geometry
        for slot, raw in enumerate(read_map_copies(file, g, region)):
            copy = decode_map_copy(raw, g, region, slot, root.image_uuid)
            shared = list(copy.shared)
            c = next(i for i, s in enumerate(shared) if s)
            shared[c] = value
            file.pwrite(g.map_copy_offset(region, slot), encode_map_copy(attrs.evolve(copy, shared=tuple(shared)), g))
        file.fsync()
    finally:
        file.close()


@pytest.mark.parametrize("value", [1 << 40, (1 << 64) - 1, 10_000], ids=["far", "max", "free"])
def test_a_shared_index_out_of_the_store_is_a_clear_error(two_clones, capsys, value):
    dedup(["a.lam", "b.lam"])
    path, region = _shared_layer("a.lam")
    _rewrite_shared_entry(path, region, value)
    with pytest.raises(SharedReferenceError, match="store"):
        contents(["a.lam@s1"])
    capsys.readouterr()
    assert 1 == main(["io", "a.lam@s1", "-r", "-c", f"read 0 {32 * MiB}"])
    assert "shared cluster" in capsys.readouterr().err
    report = check_tree("a.lam", OsStorage())
    assert report.exit_code == 2 and any(f.kind == "shared-reference" for f in report.findings)


def test_a_missing_or_replaced_store_is_a_named_error(two_clones):
    dedup(["a.lam", "b.lam"])
    os.rename(STORE_NAME, "saved")
    with pytest.raises(SharedReferenceError, match="does not exist"):
        contents(["a.lam@s1"])
    assert check_tree("a.lam", OsStorage()).exit_code == 2
    with Image.create(STORE_NAME, MiB):
        pass  # another store under the name
    with pytest.raises(SharedReferenceError, match="references store"):
        contents(["a.lam@s1"])


def test_the_feature_is_set_only_in_the_frozen_layers_that_share(two_clones):
    dedup(["a.lam", "b.lam"])
    storage = OsStorage()
    for top in ("a.lam", "b.lam", "img.lam"):
        file = storage.open(top, False)
        try:
            assert not select_root(read_root_copies(file)).current().incompatible_features
        finally:
            file.close()
    path, _ = _shared_layer("a.lam")
    file = storage.open(path, False)
    try:
        root = select_root(read_root_copies(file)).current()
        assert root.incompatible_features == FEATURE_SHARED_CLUSTERS and root.store_uuid == _store_uuid()
    finally:
        file.close()
    with pytest.raises(Exception, match="shared through the store"):
        os.mkdir("other")
        layers.clone("a.lam", "s1", "other/c.lam")


def test_info_and_the_tree_report_shared_and_exclusive_bytes(two_clones, capsys):
    import json

    assert 0 == main(["info", "--output", "json", "a.lam@s1"])
    before = json.loads(capsys.readouterr().out)["format-specific"]["data"]
    assert before["shared-bytes"] == 0 and before["exclusive-bytes"] == 8 * MiB + 64 * KiB
    dedup(["a.lam", "b.lam"])
    assert 0 == main(["info", "--output", "json", "a.lam@s1"])
    after = json.loads(capsys.readouterr().out)["format-specific"]["data"]
    assert after["shared-bytes"] == 8 * MiB and after["exclusive-bytes"] == 64 * KiB
    assert 0 == main(["info", "--tree", "--output", "json", "b.lam"])
    data = json.loads(capsys.readouterr().out)

    def nodes(node):
        yield node
        for child in node["children"]:
            yield from nodes(child)

    found = {n["name"]: (n["shared_bytes"], n["exclusive_bytes"]) for root in data["layers"] for n in nodes(root)}
    assert found["s1"] == (8 * MiB, 64 * KiB) and found["b.lam"] == (0, 0)
    assert 0 == main(["info", "--tree", "b.lam"])
    assert "8 MiB shared" in capsys.readouterr().out


def test_check_repair_of_a_deduplicated_image_finds_nothing_to_mend(two_clones, capsys):
    dedup(["a.lam", "b.lam"])
    assert 0 == main(["check", "--repair", "a.lam"])
    assert "No errors were found" in capsys.readouterr().out
    assert 0 == main(["check", STORE_NAME])


def test_a_deduplicated_snapshot_sends_converts_and_clones_with_its_contents(two_clones):
    import io

    from lamina.impl.replicate import receive, send

    dedup(["a.lam", "b.lam"])
    expected = contents(["a.lam@s1"])["a.lam@s1"]
    stream = io.BytesIO()
    send("a.lam@s1", stream)
    receive("replica.lam", io.BytesIO(stream.getvalue()))
    assert contents(["replica.lam@s1"])["replica.lam@s1"] == expected
    assert 0 == main(["convert", "-O", "raw", "a.lam@s1", "a.raw"])
    with open("a.raw", "rb") as f:
        assert f.read() == expected
    layers.clone("a.lam", "s1", "c.lam")  # same directory: the clone reads the shared data
    assert contents(["c.lam"])["c.lam"] == expected and clean("c.lam")


def test_a_store_that_is_a_symbolic_link_is_refused(two_clones):
    os.symlink("elsewhere.lam", STORE_NAME)
    with pytest.raises(Exception, match="not a regular file|symbolic link"):
        dedup(["a.lam", "b.lam"])
    assert not os.path.exists("elsewhere.lam")


def test_check_of_a_tree_whose_store_a_dedup_holds_is_refused_not_judged(two_clones, capsys):
    """A reader holds a shared lock on the store (section 13, F-LOCK-001): `check` too, so it never reads
    the store in the middle of a `dedup` or a collection, which hold it exclusively."""
    dedup(["a.lam", "b.lam"])
    writer = OsStorage().open(STORE_NAME, True)
    try:
        writer.lock(exclusive=True)
        assert 1 == main(["check", "a.lam"])
        assert "lamina-store.lam: is locked by another process" in capsys.readouterr().err
        assert 0 == main(["check", "-U", "a.lam"])
    finally:
        writer.close()
    assert 0 == main(["check", "a.lam"])


def test_map_of_a_deduplicated_snapshot_points_into_the_store(two_clones, capsys):
    """A shared cluster's bytes are the store's (F-SHARE-003): map says which file and where, as `qemu-img map`
    names the file of each extent, and the bytes found there are the guest's."""
    import json

    dedup(["a.lam", "b.lam"])
    capsys.readouterr()
    assert 0 == main(["map", "--output", "json", "a.lam@s1"])
    extents = json.loads(capsys.readouterr().out)
    stored = [e for e in extents if e.get("filename")]
    assert stored and all(e["filename"].endswith(STORE_NAME) for e in stored)
    assert sum(e["length"] for e in stored) == 8 * MiB
    with layers.open_target("a.lam@s1") as image:
        for e in extents:
            if e["data"]:
                with open(e.get("filename") or image.path, "rb") as fh:
                    fh.seek(e["offset"])
                    assert fh.read(e["length"]) == image.read(e["start"], e["length"]), e
    assert 0 == main(["map", "a.lam@s1"])
    assert STORE_NAME in capsys.readouterr().out
    assert 0 == main(["map", "--svg", "-", "a.lam@s1"])


def test_dedup_of_more_layers_than_it_keeps_open_shares_them_all(tmp_path, monkeypatch):
    """R10: a dedup over many snapshots holds at most MAX_OPEN_LAYERS layers open; the rest are reopened."""
    from lamina.impl import dedup as module

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(module, "MAX_OPEN_LAYERS", 2)
    most = []
    keep = module._OpenLayers._keep
    monkeypatch.setattr(module._OpenLayers, "_keep", lambda self, n, layer: keep(self, n, layer) or
                        most.append(len(self._open)))
    same = noise(5, 256 * KiB)
    names = [f"i{k}.lam" for k in range(3)]
    for k, name in enumerate(names):
        with Image.create(name, 4 * MiB) as image:
            image.write(0, same)
            image.write(1 * MiB, noise(20 + k, 64 * KiB))
        layers.create_snapshot(name, "s")
        with Image.open(name) as image:
            image.write(2 * MiB, same)
        layers.create_snapshot(name, "t")
    targets = [t for name in names for t in (name, f"{name}@s", f"{name}@t")]
    before = contents(targets)
    report = dedup(names)
    assert max(most) <= 2
    assert report.layers == 6 and report.bytes_saved == 5 * 256 * KiB, report
    assert contents(targets) == before
    assert all(clean(name) for name in names)


@pytest.mark.parametrize("kind", ["copied-directory", "sent"])
def test_a_rotten_store_cluster_is_repaired_from_a_replica(two_clones, capsys, kind):
    """F-SEND-007 over F-SHARE-001: the store is a layer of the tree, repaired from the replica's store of its
    identity (a copied directory) or from the replica's layer of a cluster that references it (`send`, which
    carries shared data in its layers)."""
    import io
    import shutil

    from lamina.impl.replicate import receive, send

    dedup(["a.lam", "b.lam"])
    if kind == "copied-directory":
        shutil.copytree(two_clones, two_clones.parent / "replica")
        replica = str(two_clones.parent / "replica" / "a.lam")
    else:
        stream = io.BytesIO()
        send("a.lam@s1", stream)
        receive("r.lam", io.BytesIO(stream.getvalue()))
        replica = "r.lam"
    before = contents(["a.lam@s1", "b.lam@s1"])
    _flip_store_byte(3, 10, 0x20)
    assert check_tree("a.lam", OsStorage()).exit_code == 2
    capsys.readouterr()
    assert 0 == main(["check", "--repair", "--from", replica, "a.lam"])
    assert STORE_NAME in capsys.readouterr().out
    assert contents(["a.lam@s1", "b.lam@s1"]) == before
    assert clean("a.lam") and clean("b.lam")
