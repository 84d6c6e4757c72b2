"""R11: one writer.  The writer's file is locked exclusive, readers' shared, the layers below a writer shared.

The locks are OFD locks, so they conflict between two opens in one process
as between two processes; both are tested, and the in-memory backend's
equivalent too.  `-U/--force-share` inspects without any lock.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lamina.crashsim.memstore import MemStorage
from lamina.impl import layers
from lamina.impl.cli import main
from lamina.impl.image import Image
from lamina.impl.osfile import OsStorage
from lamina.spec.references import twin_of
from lamina.spec.tree import root_of
from lamina.spec.errors import ImageLocked, InvalidArgument

from conftest import pattern

MiB = 1 << 20
HOLDER = """
import sys
from lamina.impl.image import Image
image = Image.open(sys.argv[1], readonly=sys.argv[2] == "r")
print("ready", flush=True)
sys.stdin.read()
image.close()
"""


def lamina(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamina.impl.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture
def holder(image_path):
    """Another process holding the image open (`w`: for writing, `r`: read-only) until the test ends."""
    processes = []

    def start(mode: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLDER, image_path, mode], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True)
        assert "ready" == process.stdout.readline().strip()
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.communicate("", timeout=60)


@pytest.mark.parametrize("storage", [OsStorage, MemStorage], ids=["os", "memory"])
def test_a_writer_excludes_writers_and_readers_in_one_process(tmp_path, storage):
    storage = storage()
    path = os.path.join(tmp_path, "disk.lam")
    with Image.create(path, MiB, storage=storage) as writer:
        writer.write(0, pattern(1, 4096))
        writer.flush()
        for readonly in (False, True):
            with pytest.raises(ImageLocked, match="disk.lam: is locked by another process"):
                Image.open(path, readonly=readonly, storage=storage)
        with Image.open(path, readonly=True, storage=storage, force_share=True) as peek:
            assert pattern(1, 4096) == peek.read(0, 4096)
    with Image.open(path, readonly=True, storage=storage) as a, Image.open(path, readonly=True, storage=storage) as b:
        assert a.read(0, 4096) == b.read(0, 4096)  # readers share
        with pytest.raises(ImageLocked):
            Image.open(path, storage=storage)
    with Image.open(path, storage=storage):
        pass  # every lock went with its close


def test_layers_below_a_writer_are_shared(workdir):
    Image.create("base.lam", MiB).close()
    Image.create("top.lam", base="base.lam").close()
    layers.create_snapshot("top.lam", "s")
    with Image.open("top.lam") as top:
        top.write(0, pattern(2, 4096))
        frozen = top.base.path
        with Image.open("base.lam", readonly=True), Image.open(frozen, readonly=True, context=top.context):
            pass  # reading a base or a frozen layer under a writer is fine
        with layers.open_target("top.lam@s", force_share=True) as snap:
            assert bytes(4096) == snap.read(0, 4096)
        for path in ("base.lam", frozen):
            with pytest.raises(ImageLocked):
                Image.open(path, context=top.context)  # writing one is not
        with pytest.raises(InvalidArgument, match="read-only"):
            Image.open("top.lam", force_share=True)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_management_operation_holds_the_lock_between_its_steps(image_path):
    """Snapshot create closes the top, links it, renames a new top over it: no other open may slip in between."""
    seen = []

    class Probe(OsStorage):
        def link(self, src: str, dst: str) -> None:
            with pytest.raises(ImageLocked):
                Image.open(image_path)
            seen.append(dst)
            super().link(src, dst)

    Image.create(image_path, MiB).close()
    layers.create_snapshot(image_path, "s", storage=Probe())
    assert 1 == len(seen)


def test_two_processes_the_second_writer_gets_a_clear_error(image_path, holder):
    with Image.create(image_path, MiB) as image:
        image.write(0, pattern(3, 65536))
    holder("w")
    done = lamina("io", image_path, "-c", "write -P 0x11 0 4k")
    assert 1 == done.returncode
    assert f"lamina: {image_path}: is locked by another process (use -U/--force-share for read-only inspection)\n" == done.stderr
    for args in (["info"], ["map"], ["check"], ["io", "-r", "-c", "read 0 4k"], ["snapshot", "list"]):
        done = lamina(*args[:1], image_path, *args[1:]) if args[0] != "snapshot" else lamina(*args, image_path)
        assert 1 == done.returncode and "is locked by another process" in done.stderr, args
        forced = (lamina(args[0], "-U", image_path, *args[1:]) if args[0] != "snapshot"
                  else lamina("snapshot", "list", "-U", image_path))
        assert 0 == forced.returncode, (args, forced.stderr)
    assert 1 == lamina("snapshot", "create", image_path, "s").returncode
    # refused before anything was made: the layer directory holds the top's twin (F-TREE-003) and nothing else
    assert os.listdir(image_path + ".layers") == [os.path.basename(twin_of(image_path, root_of(OsStorage(), image_path)))]
    assert "only for read-only" in lamina("io", "-U", image_path, "-c", "read 0 4k").stderr


def test_two_processes_readers_share_and_keep_a_writer_out(image_path, holder):
    Image.create(image_path, MiB).close()
    holder("r")
    assert 0 == lamina("io", "-r", image_path, "-c", "read 0 4k").returncode
    assert 0 == main(["check", image_path])
    done = lamina("io", image_path, "-c", "write 0 4k")
    assert 1 == done.returncode and "is locked" in done.stderr


def test_check_locks_every_layer_it_reads_and_is_kept_out_by_their_writer(workdir, capsys):
    """F-LOCK-001 for `check`: a frozen layer held by a writer (a merge, a dedup) is not judged mid-update."""
    with Image.create("top.lam", MiB) as image:
        image.write(0, pattern(4, 65536))
    layers.create_snapshot("top.lam", "s")
    with layers.open_target("top.lam@s") as snap:
        frozen = snap.path
    writer = OsStorage().open(frozen, True)
    try:
        writer.lock(exclusive=True)
        assert 1 == main(["check", "top.lam"])
        assert "is locked by another process" in capsys.readouterr().err
        assert 0 == main(["check", "-U", "top.lam"])  # force-share reads without a lock, as qemu-img -U
        assert 1 == main(["scrub", "top.lam"])
    finally:
        writer.close()
    capsys.readouterr()
    assert 0 == main(["check", "top.lam"])
