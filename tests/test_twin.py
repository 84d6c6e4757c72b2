"""F-TREE-003: every top has a twin, its future frozen name, so replication by name (rsync -H) stays delta-sized.

The property rsync needs: the file a snapshot freezes already had, before the
snapshot, the name it has after it, with the same inode.  Then the rules
around it: `check` tells the twin from a copy by identity, a copy or a link
under that name is never frozen, and no reference may lead to the top through it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from lamina.impl import layers
from lamina.impl.cli import main
from lamina.impl.image import Image
from lamina.impl.osfile import OsStorage
from lamina.spec.errors import FormatError
from lamina.spec.references import BaseLoop, layer_file_name
from lamina.spec.structures import BASE_LAMINA, make_snapshot_entry
from lamina.spec.tree import check_tree

from conftest import pattern

MiB = 1 << 20


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def twin(top: str) -> str:
    with Image.open(top, readonly=True) as image:
        return os.path.join(top + ".layers", layer_file_name(image.root.image_uuid))


def read_all(path: str) -> bytes:
    with layers.open_target(path) as image:
        return image.read(0, image.virtual_size)


def test_a_snapshot_freezes_the_file_under_the_name_it_already_had(workdir):
    with Image.create("d.lam", MiB, 4096) as image:
        image.write(0, pattern(1, 8192))
    before = twin("d.lam")
    assert os.path.samefile("d.lam", before)
    inode = os.stat("d.lam").st_ino
    layers.create_snapshot("d.lam", "s")
    assert os.stat(before).st_ino == inode and os.stat(before).st_nlink == 1  # frozen: same name, same file
    after = twin("d.lam")
    assert after != before and os.path.samefile("d.lam", after)  # the new top has its own twin
    assert 0 == check_tree("d.lam", OsStorage()).exit_code
    assert pattern(1, 8192) == read_all("d.lam@s")[:8192]


def test_revert_and_clone_give_their_new_tops_a_twin_and_drop_the_old(workdir):
    with Image.create("d.lam", MiB, 4096) as image:
        image.write(0, pattern(2, 4096))
    layers.create_snapshot("d.lam", "s")
    old = twin("d.lam")
    layers.revert_snapshot("d.lam", "s")
    assert not os.path.exists(old)  # the dropped top's twin was its last name: collected
    assert os.path.samefile("d.lam", twin("d.lam"))
    layers.clone("d.lam", "s", "c.lam")
    assert os.path.samefile("c.lam", twin("c.lam"))
    frozen = layer_file_name(layers.list_snapshots("d.lam")[0].layer_uuid)
    for top in ("d.lam", "c.lam"):  # the twin and the snapshot's layer (the clone's base), nothing else
        assert 0 == check_tree(top, OsStorage()).exit_code
        assert sorted(os.listdir(top + ".layers")) == sorted({os.path.basename(twin(top)), frozen})


def test_a_top_without_twin_is_valid_and_gets_its_frozen_link_at_the_snapshot(workdir):
    with Image.create("d.lam", MiB, 4096) as image:
        image.write(0, pattern(3, 4096))
    shutil.rmtree("d.lam.layers")  # as an older writer made it
    assert 0 == check_tree("d.lam", OsStorage()).exit_code
    layers.create_snapshot("d.lam", "s")
    assert 0 == check_tree("d.lam", OsStorage()).exit_code
    assert pattern(3, 4096) == read_all("d.lam@s")[:4096]


def test_a_copy_under_the_tops_name_is_an_orphan_and_never_frozen(workdir, capsys):
    with Image.create("d.lam", MiB, 4096) as image:
        image.write(0, pattern(4, 4096))
    shutil.copyfile("d.lam", "old.bin")
    with Image.open("d.lam") as image:  # writes the copy will not have
        image.write(0, pattern(5, 4096))
    name = twin("d.lam")
    os.unlink(name)
    shutil.copyfile("old.bin", name)  # a stale copy under the top's name: a replica made without -H, a swap
    assert 0 == main(["check", "d.lam"])
    assert "PENDING:" in capsys.readouterr().out  # an orphan by identity, though named as the twin
    layers.create_snapshot("d.lam", "s")  # its writable open removes the copy; the top itself is frozen
    assert pattern(5, 4096) == read_all("d.lam@s")[:4096]
    assert 0 == check_tree("d.lam", OsStorage()).exit_code


def test_a_symbolic_link_under_the_tops_name_is_foreign_and_stops_a_snapshot(workdir, capsys):
    Image.create("d.lam", MiB, 4096).close()
    name = twin("d.lam")
    os.unlink(name)
    os.symlink(os.path.abspath("d.lam"), name)
    assert 3 == main(["check", "d.lam"])
    assert "foreign file" in capsys.readouterr().out
    assert 1 == main(["snapshot", "create", "d.lam", "s"])
    err = capsys.readouterr().err
    assert err.startswith("lamina: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert os.path.islink(name) and layers.list_snapshots("d.lam") == ()


def test_a_base_naming_the_tops_own_twin_is_a_loop(workdir):
    with Image.create("d.lam", MiB, 4096) as image:
        root = image.root
        image.set_root(base_kind=BASE_LAMINA, base_path=layer_file_name(root.image_uuid), base_uuid=root.image_uuid,
                       base_data_generation=root.data_generation, base_size=root.virtual_size,
                       base_visible=root.virtual_size)
    with pytest.raises(BaseLoop):
        Image.open("d.lam", readonly=True).close()
    assert 2 == check_tree("d.lam", OsStorage()).exit_code


def test_a_snapshot_entry_naming_the_top_itself_makes_the_root_invalid(workdir):
    Image.create("d.lam", MiB, 4096).close()
    with Image.open("d.lam") as image:
        root = image.root
        entry = make_snapshot_entry("me", id=1, layer_uuid=root.image_uuid, creation_time_ns=0, vm_clock_ns=0,
                                    disk_size=root.virtual_size, vmstate_size=0, vmstate_crc=0)
        image.set_root(snapshots=(entry,), next_snapshot_id=2)  # forged: no operation makes it
    with pytest.raises(FormatError, match="own image_uuid"):
        Image.open("d.lam", readonly=True).close()


@pytest.mark.skipif(shutil.which("rsync") is None, reason="needs rsync")
def test_rsync_after_a_snapshot_sends_the_writes_not_the_image(workdir):
    """The documented command (README): after a snapshot and W bytes written, rsync sends about W."""
    os.mkdir("src")
    size = 8 * MiB
    with Image.create("src/d.lam", size, 4096) as image:
        image.write(0, os.urandom(size))
    command = ["rsync", "-aH", "--no-whole-file", "--fuzzy", "-B", "4096", "--modify-window=-1", "--stats", "src/",
               "dst/"]
    subprocess.run(command, check=True, capture_output=True)
    layers.create_snapshot("src/d.lam", "s")
    with Image.open("src/d.lam") as image:
        for n in range(16):
            image.write(n * 512 * 1024, pattern(n, 4096))
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    literal = int(re.search(r"^Literal data: ([\d,]+)", out, re.M).group(1).replace(",", ""))
    # The 16 writes, one in each of 16 regions: their blocks, two map copies per region, a few root blocks (-B 4096);
    # not the 8 MiB frozen layer, which the replica has under its name
    assert literal <= (16 + 16 * 2 + 8) * 4096
    for path in ("d.lam", "d.lam.layers"):
        assert os.path.exists(os.path.join("dst", path))
    assert 0 == check_tree("dst/d.lam", OsStorage()).exit_code  # the replica is an image, twin included
    assert read_all("src/d.lam@s") == read_all("dst/d.lam@s")
