"""Chains (R1, R10): what a chain means end to end, how its references resolve, how deep it may go, what it costs.

- `convert` copies the guest view, through every base and snapshot layer;
- every reference resolves against the image that holds it, so a base in
  another directory keeps its own relative base, and an image with
  snapshots can be a base;
- a chain of `MAX_CHAIN_DEPTH` files opens, reads and checks without
  recursion, and one file deeper is refused by name;
- a writable open of an image with N snapshots costs storage operations
  linear in N.
"""
from __future__ import annotations

import collections
import os
import uuid

import pytest

from lamina.impl import layers
from lamina.impl.cli import main
from lamina.impl.image import Image, write_new_layer
from lamina.impl.osfile import OsFile, OsStorage
from lamina.spec.layout import MAX_CHAIN_DEPTH
from lamina.spec.abstraction import abstract_layer
from lamina.spec.references import ChainTooDeep, ImageContext
from lamina.spec.structures import BASE_LAMINA, Root
from lamina.spec.tree import check_tree

from conftest import pattern

MiB = 1 << 20


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _guest(target: str) -> bytes:
    with layers.open_target(target) as image:
        return image.read(0, image.virtual_size)


def _clean(path: str, allowed: tuple[str, ...] = ()) -> None:
    report = check_tree(path, OsStorage(), allowed)
    assert [] == [f.message for f in report.findings]
    assert 0 == report.exit_code


def _converted(source: str, fmt: str, *extra: str) -> bytes:
    out = f"out-{fmt}"
    if os.path.exists(out):
        os.unlink(out)
    assert 0 == main(["convert", *extra, "-O", fmt, source, out])
    if fmt == "raw":
        return _bytes(out)
    with Image.open(out, readonly=True) as image:
        return image.read(0, image.virtual_size)


# ---------------------------------------------------------------------------- convert
@pytest.mark.parametrize("fmt", ["raw", "lamina"])
def test_convert_of_an_overlay_on_a_raw_base_is_the_base(workdir, fmt):
    (workdir / "base.raw").write_bytes(pattern(1, MiB))
    assert 0 == main(["create", "-b", "base.raw", "ov.lam"])
    assert pattern(1, MiB) == _converted("ov.lam", fmt)


@pytest.mark.parametrize("fmt", ["raw", "lamina"])
def test_convert_reads_a_lamina_base_with_its_own_base_and_a_snapshot(workdir, fmt):
    (workdir / "base.raw").write_bytes(pattern(1, MiB))
    with Image.create("mid.lam", base="base.raw", cluster_size=4096) as mid:
        mid.write(8192, pattern(2, 4096))
    with Image.create("ov.lam", base="mid.lam") as ov:
        ov.write(0, pattern(3, 1024))
    layers.create_snapshot("ov.lam", "s1")
    with Image.open("ov.lam") as ov:
        ov.write(MiB - 4096, pattern(4, 4096))
        ov.write_zeroes(8192, 512)  # zero over a base: must come out zero, not the base's bytes
    for target in ("ov.lam", "ov.lam@s1"):
        expected = _guest(target)
        assert any(expected[:1024]) and expected[:1024] == pattern(3, 1024)
        assert expected == _converted(target, fmt)
    assert _converted("ov.lam@s1", fmt)[8192:8704] == pattern(2, 512)
    assert _converted("ov.lam", fmt)[8192:8704] == bytes(512)


def test_convert_keeps_ranges_no_layer_holds_sparse(workdir):
    size = 64 * MiB
    with Image.create("base.lam", size) as base:
        base.write(0, pattern(1, 4096))
    Image.create("ov.lam", base="base.lam").close()
    assert pattern(1, 4096) == _converted("ov.lam", "raw")[:4096]
    assert os.stat("out-raw").st_blocks * 512 < MiB


# ---------------------------------------------------------------------------- references
def test_a_base_in_another_directory_resolves_its_own_base_there_not_beside_the_top(workdir):
    """The reproduction: a same-size decoy beside the top is never used, and check does not pass on it."""
    (workdir / "other").mkdir()
    (workdir / "img").mkdir()
    (workdir / "other" / "base.raw").write_bytes(pattern(1, MiB))
    (workdir / "img" / "base.raw").write_bytes(pattern(9, MiB))  # the decoy
    Image.create("other/mid.lam", base="other/base.raw").close()  # references "base.raw", beside itself
    allowed = (str(workdir / "other" / "mid.lam"),)
    assert 0 == main(["create", "--allow-base", allowed[0], "-b", "other/mid.lam", "img/top.lam"])
    with Image.open("img/top.lam", readonly=True, allow_bases=allowed) as top:
        assert pattern(1, MiB) == top.read(0, MiB)
    _clean("img/top.lam", allowed)
    assert pattern(1, MiB) == _converted("img/top.lam", "raw", "--allow-base", allowed[0])
    os.unlink("other/base.raw")  # now only the decoy has that name: it must not stand in
    assert 2 == check_tree("img/top.lam", OsStorage(), allowed).exit_code
    assert 0 != main(["check", "--allow-base", allowed[0], "img/top.lam"])
    assert 0 != main(["info", "--allow-base", allowed[0], "img/top.lam"])


@pytest.mark.parametrize("where", ["same", "other"])
def test_an_image_with_snapshots_can_be_a_base(workdir, where):
    directory = "." if where == "same" else "other"
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, "b.lam")
    with Image.create(base, MiB, cluster_size=4096) as image:
        image.write(0, pattern(1, 8192))
    layers.create_snapshot(base, "s1")
    with Image.open(base) as image:
        image.write(4096, pattern(2, 4096))
    layers.create_snapshot(base, "s2")
    allowed = (os.path.realpath(base),) if where == "other" else ()
    top_path = "img/top.lam" if where == "other" else "top.lam"
    os.makedirs("img", exist_ok=True)
    Image.create(top_path, base=base, allow_bases=allowed).close()
    with Image.open(top_path, allow_bases=allowed) as top:
        assert pattern(1, 4096) + pattern(2, 4096) == top.read(0, 8192)
        top.write(0, pattern(3, 512))
    with Image.open(top_path, readonly=True, allow_bases=allowed) as top:
        assert pattern(3, 512) + pattern(1, 4096)[512:] + pattern(2, 4096) == top.read(0, 8192)
    _clean(top_path, allowed)
    _clean(base)
    for entry in layers.list_snapshots(base):  # a frozen layer checked by itself: its chain, found in its own image
        _clean(os.path.join(f"{base}.layers", f"{entry.layer_uuid.hex()}.lam"))


# ---------------------------------------------------------------------------- depth
@pytest.fixture
def no_sync(monkeypatch):
    """Building thousands of throwaway layer files: durability is not what these tests are about."""
    monkeypatch.setattr(OsFile, "fsync", lambda self: None)
    monkeypatch.setattr(OsStorage, "fsync_dir", lambda self, path: None)


def _chain_of(files: int, write_top: bool = True) -> str:
    """A chain of `files` tiny layer files, each the base of the next, built by writing their roots directly."""
    size = 64 * 1024
    with Image.create("l0.lam", size, cluster_size=4096) as bottom:
        bottom.write(0, pattern(1, 4096))
        below = bottom.root
    for i in range(1, files):
        root = Root(cluster_bits=12, virtual_size=size, image_uuid=uuid.uuid4().bytes, base_kind=BASE_LAMINA,
                    base_path=f"l{i - 1}.lam", base_uuid=below.image_uuid, base_data_generation=below.data_generation,
                    base_size=size, base_visible=size)
        write_new_layer(OsStorage(), f"l{i}.lam", root)
        below = root
    top = f"l{files - 1}.lam"
    if write_top:
        with Image.open(top) as image:
            image.write(8192, pattern(2, 4096))
    return top


def test_a_chain_of_the_deepest_allowed_depth_opens_reads_and_checks(workdir, no_sync):
    top = _chain_of(MAX_CHAIN_DEPTH)
    with Image.open(top, readonly=True) as image:
        assert MAX_CHAIN_DEPTH == len(image.chain())
        assert pattern(1, 4096) + bytes(4096) + pattern(2, 4096) == image.read(0, 3 * 4096)
        assert [(0, 4096), (8192, 12288)] == image.guest_data_ranges()
        assert [(8192, 12288)] == list(layers.diff(image, image.base))  # diff walks both chains
    disk = abstract_layer(top, OsStorage(), ImageContext.for_layer(top))  # the spec's meaning, as deep
    assert pattern(1, 4096) + bytes(4096) + pattern(2, 4096) == disk.read(0, 3 * 4096)
    _clean(top)
    for command in (["info", "--tree", top], ["diff", top, "l0.lam"]):
        assert 0 == main(command), command
    with pytest.raises(ChainTooDeep):  # one file more is refused before anything is written
        Image.create("deeper.lam", base=top)
    assert not os.path.exists("deeper.lam")
    with pytest.raises(ChainTooDeep):
        layers.create_snapshot(top, "one-too-many")
    with Image.open(top, readonly=True) as image:
        assert () == image.root.snapshots


def test_a_chain_one_file_deeper_than_allowed_is_refused_by_name(workdir, no_sync):
    top = _chain_of(MAX_CHAIN_DEPTH + 1, write_top=False)
    with pytest.raises(ChainTooDeep, match=f"deeper than {MAX_CHAIN_DEPTH}"):
        Image.open(top, readonly=True)
    assert 1 == main(["info", top])
    assert 2 == main(["check", top])


# ---------------------------------------------------------------------------- cost
class _CountingStorage(OsStorage):
    """The OS backend, counting the files opened."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> OsFile:
        self.counts["open"] += 1
        return super().open(path, writable, follow_symlinks)


def _opens_for_writable_open(path: str) -> int:
    storage = _CountingStorage()
    Image.open(path, storage=storage).close()
    return storage.counts["open"]


def test_a_writable_open_costs_storage_operations_linear_in_the_snapshots(workdir, no_sync):
    Image.create("disk.lam", MiB, cluster_size=4096).close()
    opens = []
    for i in range(1, 31):
        layers.create_snapshot("disk.lam", f"s{i}")
        if i % 10 == 0:
            opens.append(_opens_for_writable_open("disk.lam"))
    steps = [b - a for a, b in zip(opens, opens[1:])]
    assert steps[1] <= steps[0], opens  # the cost of ten more snapshots does not grow with the snapshots
    assert opens[-1] <= 5 * 31, opens


def test_safe_rebase_onto_nothing_copies_every_chunk_that_differs(workdir):
    """Safe mode walks the absent ranges a chunk at a time: data past the first chunk that differs is copied up too."""
    with Image.create("base.lam", 3 * layers.CHUNK, 4096) as base:
        base.write(0, pattern(1, 4096))  # a difference in the first chunk ...
        base.write(2 * layers.CHUNK + 8192, pattern(2, 4096))  # ... and one two chunks on
    Image.create("top.lam", base="base.lam", base_format="lamina").close()
    with Image.open("top.lam", readonly=True) as top:
        before = top.read(0, top.virtual_size)
    layers.rebase("top.lam", None)
    with Image.open("top.lam", readonly=True) as top:
        assert top.base is None
        assert top.read(0, top.virtual_size) == before


class _CountingReads(OsStorage):
    """The OS backend, counting the preads of every file it opened."""

    def __init__(self) -> None:
        self.preads = 0

    def open(self, path: str, writable: bool, follow_symlinks: bool = False) -> OsFile:
        file = super().open(path, writable, follow_symlinks)
        plain = file.pread

        def pread(offset: int, length: int) -> bytes:
            self.preads += 1
            return plain(offset, length)

        file.pread = pread  # type: ignore[method-assign]
        return file


def test_a_read_through_a_deep_chain_asks_only_the_layers_that_hold_its_clusters(workdir, no_sync, monkeypatch):
    """Issue 10, chains: a layer that holds nothing of a cluster is not asked on every read (`_holders`)."""
    from lamina.spec.regionmap import RegionMap

    KiB = 1024
    looks = collections.Counter()  # per read: layers asked for their bytes, and cluster masks looked at
    own_piece, cluster_mask = Image._own_piece, RegionMap.cluster_mask
    monkeypatch.setattr(Image, "_own_piece", lambda self, *a: looks.update(["piece"]) or own_piece(self, *a))
    monkeypatch.setattr(RegionMap, "cluster_mask", lambda self, *a: looks.update(["mask"]) or cluster_mask(self, *a))
    with Image.create("raw-ish.lam", 2 * MiB, cluster_size=16 * KiB) as below:  # another region size under it all
        below.write(1 * MiB, pattern(3, 8 * KiB))
    with Image.create("disk.lam", 2 * MiB, cluster_size=4 * KiB, base="raw-ish.lam", base_format="lamina") as image:
        image.write(0, pattern(1, 64 * KiB))
    for i in range(1, 31):  # each frozen layer holds one sector of a cluster of its own, all in region 0
        with Image.open("disk.lam") as image:
            image.write(64 * KiB + i * 4 * KiB, pattern(10 + i, 512))
        layers.create_snapshot("disk.lam", f"s{i}")
    storage = _CountingReads()
    with Image.open("disk.lam", readonly=True, storage=storage) as image:
        image.read(0, 2 * MiB)  # every map loaded once
        cases = [(8 * KiB, pattern(1, 64 * KiB)[8 * KiB : 12 * KiB], 1),  # the bottom's data: one read
                 (64 * KiB + 5 * 4 * KiB, pattern(15, 512) + bytes(3584), 1),  # one sector in s5's layer, zero below
                 (1 * MiB, pattern(3, 4 * KiB), 1),  # below the run: the base of another region size
                 (600 * KiB, bytes(4 * KiB), 0)]  # nothing anywhere: no read at all
        for offset, expected, preads in cases:
            storage.preads = 0
            looks.clear()
            assert expected == image.read(offset, 4 * KiB), offset
            assert preads == storage.preads, (offset, storage.preads)
            assert looks["piece"] <= 3 and looks["mask"] == 0, (offset, looks)  # the top, a holder, the base
        whole = image.read(0, 2 * MiB)
    disk = abstract_layer("disk.lam", OsStorage(), ImageContext.for_layer("disk.lam"))  # the spec's meaning agrees
    assert disk.read(0, 2 * MiB) == whole
