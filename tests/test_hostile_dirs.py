"""R10: hostile layer directories, VM states, snapshot names and command lines.

The CLI is the surface here, so most cases run `lamina` in a subprocess with
a timeout: a hang fails the test instead of blocking it.  Each case checks
that nothing outside the image's own files is read, written or removed, and
that the user sees one line `lamina: ...` and no traceback.
"""
from __future__ import annotations

import os
import shutil
import resource
import subprocess
import sys
import time

import attrs
import crc32c
import pytest

from lamina.impl import layers
from lamina.impl.cli import error_line
from lamina.impl.image import Image
from lamina.spec.errors import FieldOutOfRange, InvalidArgument, UnsafeFile
from lamina.spec.layout import MAX_VMSTATE_SIZE
from lamina.spec.references import LayerMismatch, layer_file_name, vmstate_file_name
from lamina.spec.tree import crc32c_extend_zeros

from conftest import pattern

MiB = 1 << 20
GiB = 1 << 30
TIMEOUT = 60


def lamina(*args: str | bytes, cwd: os.PathLike | None = None, limit_memory: int | None = None,
           timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run the real command (arguments may be bytes, as argv from a shell can be)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit_memory, limit_memory))

    return subprocess.run([sys.executable, "-m", "lamina.impl.cli", *args], capture_output=True, cwd=cwd,
                          timeout=timeout, preexec_fn=limit if limit_memory else None)


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> str:
    stderr = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr
    assert 1 == done.returncode, stderr
    lines = stderr.strip().splitlines()
    assert 1 == len(lines), stderr
    assert lines[0].startswith("lamina: ") and not lines[0].startswith("lamina: lamina")
    for word in words:
        assert word in lines[0]
    return lines[0]


@pytest.fixture
def tree(tmp_path):
    """An image whose snapshot `t` (with VM state) is off the top's chain, and a foreign image outside it.

    Snapshot `s` holds 0xab, `t` 0xcd over it; the image was reverted to `s`
    and then written 0xee, so the top never opens `t`'s layer by itself.
    """
    image = tmp_path / "vm" / "d.lam"
    image.parent.mkdir()
    with Image.create(str(image), MiB, 4096) as top:
        top.write(0, b"\xab" * 8192)
    layers.create_snapshot(str(image), "s")
    with Image.open(str(image)) as top:
        top.write(0, b"\xcd" * 4096)
    entry = layers.create_snapshot(str(image), "t", vmstate=pattern(3, 10_000))
    layers.revert_snapshot(str(image), "s")
    with Image.open(str(image)) as top:
        top.write(0, b"\xee" * 4096)
    outside = tmp_path / "outside"
    outside.mkdir()
    with Image.create(str(outside / "foreign.lam"), MiB, 4096) as foreign:
        foreign.write(0, b"\x66" * 8192)
    layer_dir = tmp_path / "vm" / "d.lam.layers"
    return {"kept": sorted(os.listdir(layer_dir)), "image": str(image), "layer_dir": layer_dir, "outside": outside,
            "layer": layer_dir / layer_file_name(entry.layer_uuid), "vmstate": layer_dir / vmstate_file_name(entry.layer_uuid)}


def snapshot_of(image: str) -> str:
    return f"{image}@t"


def contents(directory) -> dict[str, bytes | str]:
    """What a directory holds, links shown as their targets, so a test can assert nothing changed."""
    out: dict[str, bytes | str] = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.islink(path):
            out[name] = "-> " + os.readlink(path)
        elif os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
        else:
            out[name] = "not a file"
    return out


# ------------------------------------------------------------------------ removal: F-TREE-002
def test_a_symlinked_layer_directory_is_never_emptied(tree):
    """A writable open and check --repair delete nothing in the directory a symlinked `IMAGE.layers` points to."""
    victim = tree["outside"]
    (victim / "keep.txt").write_bytes(b"precious")
    (victim / ("ab" * 16 + ".lam")).write_bytes(b"named like an orphan layer")
    (victim / ("cd" * 16 + ".vmstate.creating")).write_bytes(b"named like an orphan VM state")
    os.rename(tree["layer_dir"], str(tree["layer_dir"]) + ".moved")
    os.symlink(victim, tree["layer_dir"])
    before = contents(victim)
    done = lamina("io", tree["image"], "-c", "read 0 4k")  # writable open: the snapshot below cannot be reached
    assert_one_line_error(done, "layer directory")
    assert_one_line_error(lamina("io", "-r", "-c", "read 0 4k", snapshot_of(tree["image"])), "layer directory")
    done = lamina("check", "--repair", tree["image"])
    assert "Traceback" not in done.stderr.decode()
    assert 2 == done.returncode  # the snapshot's layer is unreachable: corruption
    assert before == contents(victim)


def test_a_symlinked_layer_directory_of_an_image_without_snapshots_is_reported_and_kept(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / ("ab" * 16 + ".lam")).write_bytes(b"named like an orphan layer")
    image = str(tmp_path / "d.lam")
    Image.create(image, MiB, 4096).close()
    shutil.rmtree(image + ".layers")  # the twin's directory (F-TREE-003) replaced by a link to another
    os.symlink(victim, image + ".layers")
    with Image.open(image) as top:  # writable: orphan collection runs
        top.write(0, b"x" * 512)
    assert 3 == lamina("check", "--repair", image).returncode  # a foreign entry, never removed
    done = lamina("check", image)
    assert 3 == done.returncode and b"foreign file" in done.stdout
    assert [("ab" * 16 + ".lam")] == os.listdir(victim)


def test_only_regular_format_named_orphans_are_removed(tree):
    """In a real layer directory: links, FIFOs, directories and other names stay; a regular orphan goes."""
    layer_dir = tree["layer_dir"]
    target = tree["outside"] / "secret"
    target.write_bytes(b"secret")
    os.symlink(target, layer_dir / ("11" * 16 + ".lam"))
    os.mkfifo(layer_dir / ("22" * 16 + ".vmstate"))
    os.mkdir(layer_dir / ("33" * 16 + ".lam"))
    (layer_dir / "notes.txt").write_bytes(b"mine")
    (layer_dir / ("44" * 16 + ".lam.creating")).write_bytes(b"left by a crash")
    os.symlink(target, tree["image"] + ".creating")
    done = lamina("check", tree["image"])
    assert 3 == done.returncode, done.stdout
    assert 5 == done.stdout.count(b"foreign file")
    assert 0 == lamina("io", tree["image"], "-c", "read -P 0xee 0 4k").returncode  # writable open
    assert 3 == lamina("check", "--repair", tree["image"]).returncode
    kept = sorted(os.listdir(layer_dir))
    assert sorted([*tree["kept"], "11" * 16 + ".lam", "22" * 16 + ".vmstate",
                   "33" * 16 + ".lam", "notes.txt"]) == kept
    assert os.path.islink(tree["image"] + ".creating") and b"secret" == target.read_bytes()


# ------------------------------------------------------------------------ opening: F-OPEN-001..003
@pytest.mark.parametrize("command", [["io", "-r", "-c", "read 0 4k", "SNAP"], ["diff", "SNAP", "FOREIGN"],
                                     ["info", "SNAP"], ["map", "SNAP"]])
def test_a_symlinked_snapshot_layer_is_never_followed(tree, command):
    foreign = str(tree["outside"] / "foreign.lam")
    os.unlink(tree["layer"])
    os.symlink(foreign, tree["layer"])
    args = [snapshot_of(tree["image"]) if a == "SNAP" else foreign if a == "FOREIGN" else a for a in command]
    assert_one_line_error(lamina(*args), "symbolic link")
    done = lamina("check", tree["image"])
    assert 2 == done.returncode and b"symbolic link" in done.stdout
    assert b"\x8aLAMINA" not in done.stdout  # nothing of the foreign file is quoted


def test_a_snapshot_layer_under_another_layers_name_is_refused(tree):
    """F-OPEN-003: a copy of another image put under the snapshot's name is not read as the snapshot."""
    os.unlink(tree["layer"])
    tree["layer"].write_bytes((tree["outside"] / "foreign.lam").read_bytes())
    assert_one_line_error(lamina("io", "-r", "-c", "read -P 0x66 0 4k", snapshot_of(tree["image"])), "holds layer")
    with pytest.raises(LayerMismatch):
        layers.revert_snapshot(tree["image"], "t")
    assert 2 == lamina("check", tree["image"]).returncode


def test_a_symlinked_vm_state_is_never_exported(tree, tmp_path):
    """The link points to a file with the right bytes: following it would pass every size and CRC check."""
    copy = tree["outside"] / "state"
    copy.write_bytes(tree["vmstate"].read_bytes())
    os.unlink(tree["vmstate"])
    os.symlink(copy, tree["vmstate"])
    assert_one_line_error(lamina("snapshot", "vmstate", tree["image"], "t", str(tmp_path / "out")), "symbolic link")
    assert not (tmp_path / "out").exists()
    done = lamina("check", tree["image"])
    assert 2 == done.returncode and b"symbolic link" in done.stdout


def test_a_fifo_in_the_layer_directory_never_hangs(tree, tmp_path):
    for path in (tree["layer"], tree["vmstate"]):
        os.unlink(path)
        os.mkfifo(path)
    assert 2 == lamina("check", tree["image"], timeout=30).returncode
    assert 2 == lamina("check", "--repair", tree["image"], timeout=30).returncode
    assert_one_line_error(lamina("snapshot", "vmstate", tree["image"], "t", str(tmp_path / "out"), timeout=30), "FIFO")
    assert_one_line_error(lamina("io", "-r", "-c", "read 0 4k", snapshot_of(tree["image"]), timeout=30), "FIFO")


def test_the_top_may_be_a_symlink_but_nothing_else_is_followed(tmp_path):
    """F-OPEN-001: the name the user gives may be a link, as in qemu; the storage refuses it everywhere else."""
    from lamina.impl.osfile import OsStorage

    with Image.create(str(tmp_path / "d.lam"), MiB, 4096) as top:
        top.write(0, b"\xcd" * 4096)
    link = tmp_path / "link.lam"
    os.symlink(tmp_path / "d.lam", link)
    assert 0 == lamina("io", "-c", "read -P 0xcd 0 4k", str(link)).returncode
    assert 0 == lamina("check", str(link)).returncode
    assert_one_line_error(lamina("snapshot", "create", str(link), "s"), "symbolic link")  # it would replace the link
    assert os.path.islink(link) and not os.path.exists(str(link) + ".layers")
    with pytest.raises(UnsafeFile):
        OsStorage().open(str(link), writable=False)
    os.mkfifo(tmp_path / "fifo")
    started = time.perf_counter()
    with pytest.raises(UnsafeFile):
        OsStorage().open(str(tmp_path / "fifo"), writable=False, follow_symlinks=True)
    assert time.perf_counter() - started < 5
    with pytest.raises(UnsafeFile):
        OsStorage().unlink(str(link))
    os.symlink(tmp_path, tmp_path / "dir-link")
    with pytest.raises(UnsafeFile, match="directory is a symbolic link"):
        OsStorage().open(str(tmp_path / "dir-link" / "d.lam"), writable=False)


def test_convert_follows_a_symlinked_source_and_never_waits_on_a_fifo(tmp_path):
    (tmp_path / "a.raw").write_bytes(pattern(4, MiB))
    os.symlink(tmp_path / "a.raw", tmp_path / "link.raw")
    os.mkfifo(tmp_path / "fifo")
    assert 0 == lamina("convert", str(tmp_path / "link.raw"), str(tmp_path / "a.lam")).returncode
    assert_one_line_error(lamina("convert", str(tmp_path / "fifo"), str(tmp_path / "b.lam"), timeout=30), "FIFO")


def test_the_simulated_storage_refuses_directories_as_files():
    from lamina.crashsim.memstore import MemStorage

    storage = MemStorage()
    storage.create("/sim/vm/d.lam.layers/x.lam").close()
    assert storage.stat("/sim/vm/d.lam.layers").is_dir
    with pytest.raises(UnsafeFile):
        storage.open("/sim/vm/d.lam.layers", writable=False)
    with pytest.raises(UnsafeFile):
        storage.unlink("/sim/vm/d.lam.layers")


# ------------------------------------------------------------------------ VM state size: F-SNAP-002
def test_zero_runs_enter_a_crc32c_without_being_read():
    for head in (b"", b"abc", pattern(5, 5000)):
        for count in (0, 1, 511, 4096, 1 << 20):
            assert crc32c.crc32c(head + bytes(count)) == crc32c_extend_zeros(crc32c.crc32c(head), count)


def test_a_sparse_vm_state_of_64_gib_is_checked_in_seconds(tree):
    """Before: check read and checksummed every byte of the hole (minutes); now only the data extents."""
    size = 64 * GiB
    data = tree["vmstate"].read_bytes()
    with open(tree["vmstate"], "r+b") as f:
        f.truncate(size)
    crc = crc32c_extend_zeros(crc32c.crc32c(data), size - len(data))
    with Image.open(tree["image"]) as top:
        s, entry = top.root.snapshots
        top.set_root(snapshots=(s, attrs.evolve(entry, vmstate_size=size, vmstate_crc=crc)))
    started = time.perf_counter()
    done = lamina("check", tree["image"])
    elapsed = time.perf_counter() - started
    assert 0 == done.returncode, done.stdout
    assert elapsed < 20
    with Image.open(tree["image"]) as top:
        top.set_root(snapshots=(s, attrs.evolve(entry, vmstate_size=size, vmstate_crc=crc ^ 1)))
    done = lamina("check", tree["image"])
    assert 2 == done.returncode and b"CRC32C" in done.stdout


def test_a_vm_state_size_past_the_bound_is_refused_on_decode(tree):
    with Image.open(tree["image"]) as top:
        s, entry = top.root.snapshots
        top.set_root(snapshots=(s, attrs.evolve(entry, vmstate_size=MAX_VMSTATE_SIZE + 1)))
    with pytest.raises(FieldOutOfRange, match="vmstate_size"):
        Image.open(tree["image"], readonly=True)


# ------------------------------------------------------------------------ snapshot names: F-SNAP-001
@pytest.mark.parametrize("name", [b"two\nlines", "rtl\u202eevil".encode(), b"a@b", b"a/b", b"\xff\xfe", b"bell\x07",
                                  "next\u0085line".encode(), "iso\u2066late".encode(), b"42", b"", b"x" * 256])
def test_a_name_the_format_refuses_is_one_line_from_argv(tree, name):
    done = lamina("snapshot", "create", os.fsencode(tree["image"]), name)
    assert_one_line_error(done, "snapshot name")
    assert 2 == len(layers.list_snapshots(tree["image"]))


def test_a_name_that_breaks_the_rule_in_an_image_is_a_named_format_error(tree):
    """Written by another tool: a newline would forge a row of `snapshot list`; the root is refused instead."""
    with Image.open(tree["image"]) as top:
        s, entry = top.root.snapshots
        forged = b"t\n3         evil"
        top.set_root(snapshots=(s, attrs.evolve(entry, name_length=len(forged), name=forged.ljust(256, b"\0"))))
    with pytest.raises(FieldOutOfRange, match="name"):
        Image.open(tree["image"], readonly=True)
    assert_one_line_error(lamina("snapshot", "list", tree["image"]), "name")


def test_names_the_format_admits(tree):
    for name in ("before upgrade", "ünïcödé-ß", "v1.2_rc", "😀"):
        layers.create_snapshot(tree["image"], name)
    assert ["s", "t", "before upgrade", "ünïcödé-ß", "v1.2_rc", "😀"] == [
        e.text_name for e in layers.list_snapshots(tree["image"])]
    done = lamina("io", "-r", "-c", "read -P 0xee 0 4k", tree["image"] + "@😀")
    assert 0 == done.returncode, done.stderr


# ------------------------------------------------------------------------ io and error lines
def test_io_of_gigabytes_streams_in_bounded_memory(tmp_path):
    """Before: `read -P` and `write -P` built the whole buffer (a MemoryError under a 300 MiB limit)."""
    image = str(tmp_path / "big.lam")
    Image.create(image, 4 * GiB).close()
    done = lamina("io", "-c", "write -P 0xab 1G 64M", "-c", "read -P 0 0 1G", "-c", "read -P 0xab 1G 64M",
                  "-c", "write -z 0 2G", image, limit_memory=300 * MiB, timeout=120)
    assert 0 == done.returncode, done.stderr
    assert b"read 1073741824/1073741824 bytes" in done.stdout
    done = lamina("io", "-c", "read -P 0 0 5G", image, limit_memory=300 * MiB)
    assert_one_line_error(done, "past the virtual size")


def test_io_pattern_mismatch_names_the_first_bad_byte_across_chunks(tmp_path):
    from lamina.impl.iocmd import IO_CHUNK, run_command

    image = str(tmp_path / "d.lam")
    with Image.create(image, 16 * MiB) as top:
        top.write(IO_CHUNK + 4096, b"\x01")
        with pytest.raises(Exception, match=f"offset {IO_CHUNK + 4096}, {2 * IO_CHUNK - 4096} bytes"):
            run_command(top, f"read -P 0 0 {3 * IO_CHUNK}", sys.stdout)


@pytest.mark.parametrize("exc,line", [
    (OSError(28, "No space left on device"), "lamina: No space left on device"),
    (FileNotFoundError(2, "No such file or directory", "a.lam"), "lamina: a.lam: No such file or directory"),
    (OSError(18, "Invalid cross-device link", "a", None, "b"), "lamina: a -> b: Invalid cross-device link"),
    (OSError("bare message"), "lamina: bare message"),
    (InvalidArgument("bad size\nsecond line"), "lamina: bad size second line"),
])
def test_every_error_shape_is_one_line(exc, line):
    assert line == error_line(exc)


@pytest.mark.parametrize("args,words", [
    (["frobnicate"], ["invalid choice"]),
    (["snapshot", "create", "x.lam"], ["snapshot create:", "required"]),
    (["io", "-c", "nonsense 0 1", "IMG"], ["unknown command"]),
    (["io", "-c", "read '0", "IMG"], ["cannot parse"]),
])
def test_cli_errors_print_once_without_repeating_the_program_name(tmp_path, args, words):
    image = str(tmp_path / "d.lam")
    Image.create(image, MiB).close()
    assert_one_line_error(lamina(*[image if a == "IMG" else a for a in args]), *words)


def test_a_sparse_vm_state_of_gigabytes_is_kept_and_exported_in_bounded_memory(tmp_path):
    """Before: `snapshot create --vmstate` read the whole file into memory and `snapshot vmstate` wrote its holes out."""
    image, vm, out = str(tmp_path / "d.lam"), tmp_path / "vm", tmp_path / "out"
    Image.create(image, MiB).close()
    with open(vm, "wb") as f:
        f.truncate(8 * GiB)
        f.seek(3 * GiB)
        f.write(b"device state")
    done = lamina("snapshot", "create", "--vmstate", str(vm), image, "s", limit_memory=300 * MiB, timeout=60)
    assert 0 == done.returncode, done.stderr
    assert 0 == lamina("check", image, timeout=60).returncode
    done = lamina("snapshot", "vmstate", image, "s", str(out), limit_memory=300 * MiB, timeout=60)
    assert 0 == done.returncode, done.stderr
    assert 8 * GiB == out.stat().st_size and out.stat().st_blocks * 512 < 16 * MiB  # the holes stay holes
    with open(out, "rb") as f:
        f.seek(3 * GiB)
        assert b"device state" == f.read(12)
    vm_copy = os.path.join(image + ".layers", next(n for n in os.listdir(image + ".layers") if n.endswith(".vmstate")))
    assert os.stat(vm_copy).st_blocks * 512 < 16 * MiB
