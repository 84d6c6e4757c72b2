"""`lamina serve`: an image over NBD through nbdkit, used by the real clients (qemu-img, qemu-io, libnbd).

Every server is started by the test on a Unix socket in a temporary
directory and stopped by it (SIGTERM, or SIGKILL for the crash test).
The adapter itself (`impl/nbdexport.py`) is also driven in-process, for the
request flags no client here sends on demand.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import contextmanager

import pytest

from lamina.impl import cli
from lamina.impl.image import Image
from lamina.impl.iocmd import run_command
from lamina.impl.layers import create_snapshot, open_target
from lamina.impl.nbdexport import Export, FastZeroUnsupported
from lamina.impl.osfile import OsStorage
from lamina.spec.errors import ImageLocked
from lamina.spec.tree import check_tree

LAMINA = [sys.executable, "-m", "lamina.impl.cli"]
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libnbd installs the `nbd` module for the system Python only


def _has_nbdkit_python() -> bool:
    return shutil.which("nbdkit") is not None and subprocess.run(
        ["nbdkit", "--dump-plugin", "python"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def _has_libnbd() -> bool:
    return os.path.exists(SYSTEM_PYTHON) and subprocess.run(
        [SYSTEM_PYTHON, "-c", "import nbd"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


needs_nbdkit = pytest.mark.skipif(not _has_nbdkit_python(),
                                  reason="nbdkit with its Python plugin is not installed (Debian: nbdkit nbdkit-plugin-python)")
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
                                reason="qemu-img and qemu-io are not installed (Debian: qemu-utils)")
needs_libnbd = pytest.mark.skipif(not _has_libnbd(),
                                  reason="libnbd's Python binding is not installed (Debian: python3-libnbd)")


def lamina(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*LAMINA, *args], capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"lamina {' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def io(target: str, *commands: str, size: int | None = None, readonly: bool = False) -> None:
    """`lamina io` in this process (`size`: create the image first); a failed `read -P` raises."""
    image = Image.create(target, size) if size is not None else open_target(target, readonly=readonly)
    with image:
        for command in commands:
            run_command(image, command, io_sink)


class _Sink:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


io_sink = _Sink()


def check(path: str) -> dict:
    """`lamina check --output json`, in this process, read-only (nothing is recovered first)."""
    return check_tree(path, OsStorage()).to_json()


def closed_cleanly(path: str) -> bool:
    """No pending intents: the last writer closed the image (`lamina info`: unclean shutdown: no)."""
    with Image.open(path, readonly=True) as image:
        return not image.root.intents


def map_json(path: str, capsys) -> list[dict]:
    """`lamina map --output json -U`, through the CLI's own code."""
    capsys.readouterr()
    assert cli.main(["map", "--output", "json", "-U", path]) == 0
    return json.loads(capsys.readouterr().out)


@contextmanager
def serving(target: str, *options: str, expect_exit: int = 0, stop: int = signal.SIGTERM):
    """Run `lamina serve TARGET --socket S`, yield (uri, process, pid file), stop it with `stop` (SIGTERM)."""
    scratch = tempfile.mkdtemp(prefix="lsv-")  # short: a socket path holds at most 107 bytes
    socket, pidfile = os.path.join(scratch, "s"), os.path.join(scratch, "pid")
    server = subprocess.Popen([*LAMINA, "serve", "--socket", socket, "--pid-file", pidfile, *options, target],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("Serving "), f"no server: {line!r} {server.stderr.read() if server.poll() is not None else ''}"
        assert line.strip().endswith(f"nbd+unix:///?socket={socket}")
        yield f"nbd+unix:///?socket={socket}", server, pidfile
    finally:
        if server.poll() is None:
            server.send_signal(stop)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        err = server.stderr.read()
        server.stdout.close()
        server.stderr.close()
        shutil.rmtree(scratch, ignore_errors=True)
    assert server.returncode == expect_exit, f"lamina serve exited {server.returncode}: {err}"
    server.stopped_with = err  # what it printed, for the tests that look


def libnbd(script: str, uri: str, *args: str) -> dict:
    """Run a libnbd script under the system Python; it prints one JSON document."""
    done = subprocess.run([SYSTEM_PYTHON, "-c", textwrap.dedent(script), uri, *args], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def merged(extents, keys=("data", "zero")) -> list[tuple]:
    """(start, end, data, zero) runs, neighbours with the same state merged."""
    out: list[list] = []
    for e in extents:
        state = tuple(bool(e[k]) for k in keys)
        if out and out[-1][1] == e["start"] and tuple(out[-1][2:]) == state:
            out[-1][1] = e["start"] + e["length"]
        else:
            out.append([e["start"], e["start"] + e["length"], *state])
    return [tuple(r) for r in out]


@pytest.fixture
def disk(tmp_path) -> str:
    """A 16 MiB image: data, written zeros, an unaligned write, a hole punched in data, a write past 8 MiB."""
    path = str(tmp_path / "disk.lam")
    io(path, "write -P 0xab 0 192k", "write -z 64k 64k", "write -P 0x11 1000 3000", "write -P 0xcd 5M 1M",
       "discard 5248k 64k", "write -P 0xef 9M 4k", size=16 << 20)
    return path


# ------------------------------------------------------------------ the adapter, in-process
def test_export_zero_keeps_or_punches_as_the_flags_say(image_path):
    with Image.create(image_path, 4 << 20) as image:
        export = Export(image, writable=True)
        export.pwrite(b"\x5a" * (1 << 20), 0)
        export.zero(64 << 10, 0, may_trim=True)                # punched: a hole
        export.zero(64 << 10, 128 << 10, may_trim=False)       # NO_HOLE: zeros written, still data
        with pytest.raises(FastZeroUnsupported):
            export.zero(4096, 512 << 10, may_trim=False, fast=True)  # would be a write, not fast
        export.zero(4096, 768 << 10, may_trim=True, fast=True)
        buf = bytearray(1 << 20)
        export.pread(buf, 0)
        expected = bytearray(b"\x5a" * (1 << 20))
        expected[0:64 << 10] = bytes(64 << 10)
        expected[128 << 10:192 << 10] = bytes(64 << 10)
        expected[768 << 10:(768 << 10) + 4096] = bytes(4096)
        assert buf == expected
        runs = export.extents(4 << 20, 0)
        assert runs[0] == (0, 64 << 10, False)
        assert (128 << 10) < runs[1][0] + runs[1][1]  and runs[1][2]  # the NO_HOLE zeros are data
        assert (768 << 10, 4096, False) in runs
        assert runs[-1] == (1 << 20, 3 << 20, False)
        assert sum(n for _, n, _ in runs) == 4 << 20 and all(a + n == b for (a, n, _), (b, _, _) in zip(runs, runs[1:]))
        assert export.extents(100, 10, req_one=True) == [(10, 100, False)]
        assert export.extents(4 << 20, 4096, req_one=True) == [(4096, (64 << 10) - 4096, False)]
        assert export.can_multi_conn and export.can_zero and export.can_extents


def _runs_from(data_ranges, offset, count):
    """The extents of a window as the chain's merged data ranges define them."""
    end, out, pos = offset + count, [], offset
    for lo, hi in data_ranges:
        lo, hi = max(lo, offset), min(hi, end)
        if lo >= hi:
            continue
        if lo > pos:
            out.append((pos, lo - pos, False))
        out.append((lo, hi - lo, True))
        pos = hi
    if pos < end:
        out.append((pos, end - pos, False))
    return out


def test_export_extents_agree_with_the_chain_over_any_window(tmp_path):
    import random

    rng = random.Random(11)
    base, top = str(tmp_path / "base.raw"), str(tmp_path / "top.lam")
    with open(base, "wb") as fh:
        fh.truncate(8 << 20)
        fh.seek(3 << 20)
        fh.write(b"\x01" * (1 << 20))
    plain = Image.create(str(tmp_path / "plain.lam"), 8 << 20, cluster_size=4096)
    over = Image.create(top, base=base, cluster_size=4096)
    for image in (plain, over):
        for _ in range(40):
            offset, length = rng.randrange(0, 16000) * 512, rng.randrange(1, 400) * 512
            length = min(length, image.virtual_size - offset)
            if rng.random() < 0.6:
                image.write(offset, b"\x07" * length)
            else:
                image.write_zeroes(offset, length)
    for image in (plain, over):
        export = Export(image, writable=True)
        ranges = image.guest_data_ranges()
        for _ in range(60):
            offset = rng.randrange(0, 16384) * 512
            count = rng.randrange(1, 16384 - offset // 512 + 1) * 512
            got = export.extents(count, offset)
            assert got == _runs_from(ranges, offset, count), (offset, count)
            assert export.extents(count, offset, req_one=True) == got[:1]
        data = bytearray(image.virtual_size)
        export.pread(data, 0)
        for offset, length, is_data in export.extents(image.virtual_size, 0):
            assert is_data or not any(data[offset:offset + length])  # a hole reads zero
    assert any(d for o, n, d in Export(over, True).extents(1 << 20, 3 << 20))  # the base's data shows
    plain.close()
    over.close()


def test_export_of_a_snapshot_is_read_only(tmp_path):
    path = str(tmp_path / "disk.lam")
    io(path, "write -P 0x42 0 4k", size=1 << 20)
    create_snapshot(path, "s1")
    export = Export.open(path + "@s1")
    try:
        assert not export.writable and not export.can_zero
        buf = bytearray(4096)
        export.pread(buf, 0)
        assert buf == b"\x42" * 4096
    finally:
        export.close()


# ------------------------------------------------------------------ real clients through nbdkit
@needs_nbdkit
@needs_qemu
def test_qemu_img_convert_over_nbd_equals_lamina_convert(disk, tmp_path, capsys):
    with serving(disk, "--readonly") as (uri, _, _):
        subprocess.run(["qemu-img", "convert", "-f", "raw", uri, "-O", "raw", str(tmp_path / "nbd.raw")], check=True,
                       timeout=60)
        # the map, as QEMU sees it over NBD block status, is the image's map
        qemu = json.loads(subprocess.run(["qemu-img", "map", "--output", "json", "-f", "raw", uri], check=True,
                                         capture_output=True, text=True, timeout=60).stdout)
        ours = map_json(disk, capsys)
    assert cli.main(["convert", "-O", "raw", disk, str(tmp_path / "lamina.raw")]) == 0
    assert (tmp_path / "nbd.raw").read_bytes() == (tmp_path / "lamina.raw").read_bytes()
    assert merged(qemu) == merged(ours)
    assert [r for r in merged(ours) if r[2]] == [(0, 64 << 10, True, False), (128 << 10, 192 << 10, True, False),
                                                 (5 << 20, 5248 << 10, True, False),
                                                 (5312 << 10, 6 << 20, True, False), (9 << 20, (9 << 20) + 4096, True, False)]


@needs_nbdkit
@needs_qemu
def test_qemu_io_writes_flushes_discards_and_zeroes_then_check_is_clean(tmp_path, capsys):
    path = str(tmp_path / "disk.lam")
    Image.create(path, 8 << 20).close()
    commands = ["write -P 0xab 0 256k", "flush", "write -P 0xcd 1M 64k", "write -P 0x77 1000 100",
                "discard 64k 64k", "write -z 128k 64k", "write -z -u 192k 64k", "flush",
                "read -P 0xab 0 1000", "read -P 0x77 1000 100", "read -P 0xab 1100 64436",
                "read -P 0 64k 192k", "read -P 0xcd 1M 64k", "read -P 0 2M 6M"]
    with serving(path, stop=signal.SIGINT) as (uri, _, _):  # Ctrl-C
        args = ["qemu-io", "-f", "raw"] + [a for c in commands for a in ("-c", c)] + [uri]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "Pattern verification failed" not in done.stdout, done.stdout + done.stderr
        denied = lamina("info", path, check=False)  # the server holds the writer's lock
        assert denied.returncode == 1 and "is locked by another process" in denied.stderr
    report = check(path)
    assert report["exit_code"] == 0 and report["findings"] == []
    assert closed_cleanly(path)
    io(path, "read -P 0xab 0 1000", "read -P 0x77 1000 100", "read -P 0 64k 192k", "read -P 0xcd 1M 64k", readonly=True)
    runs = merged(map_json(path, capsys))
    # discard and `write -z -u` left holes; `write -z` (NO_HOLE) wrote zeros that stay allocated
    assert runs[:5] == [(0, 64 << 10, True, False), (64 << 10, 128 << 10, False, True),
                        (128 << 10, 192 << 10, True, False), (192 << 10, 1 << 20, False, True),
                        (1 << 20, (1 << 20) + (64 << 10), True, False)]


@needs_nbdkit
@needs_libnbd
def test_libnbd_multi_conn_fast_zero_block_status_and_a_stop_with_a_client_connected(tmp_path):
    path = str(tmp_path / "disk.lam")
    Image.create(path, 4 << 20).close()
    script = """
        import errno, json, sys
        import nbd
        uri = sys.argv[1]
        def connect():
            h = nbd.NBD()
            h.add_meta_context("base:allocation")
            h.connect_uri(uri)
            return h
        a, b = connect(), connect()
        out = {"multi_conn": a.can_multi_conn(), "fast_zero": a.can_fast_zero(), "read_only": a.is_read_only(),
               "fua": a.can_fua(), "trim": a.can_trim(), "zero": a.can_zero(), "flush": a.can_flush(),
               "size": a.get_size(), "allocation": a.can_meta_context("base:allocation")}
        a.pwrite(b"\\x61" * 65536, 0)
        a.flush()
        out["seen_by_other"] = b.pread(65536, 0) == b"\\x61" * 65536
        b.pwrite(b"\\x62" * 65536, 65536, nbd.CMD_FLAG_FUA)
        try:
            a.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
            out["fast_no_hole"] = "accepted"
        except nbd.Error as exc:
            out["fast_no_hole"] = exc.errnum == errno.ENOTSUP or exc.errnum == errno.EOPNOTSUPP
        a.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
        entries = []
        def status(metacontext, offset, e, err):
            if metacontext == "base:allocation":
                entries.extend(e)
        a.block_status(4 << 20, 0, status)
        out["status"] = [(entries[i], entries[i + 1]) for i in range(0, len(entries), 2)]
        a.pwrite(b"\\x63" * 4096, 1 << 20)  # not flushed: the server's stop must make it durable
        print(json.dumps(out))
        sys.stdout.flush()
        sys.stdin.read()  # stay connected until the test has stopped the server
    """
    with serving(path, "--shared", "3") as (uri, server, _):
        client = subprocess.Popen([SYSTEM_PYTHON, "-c", textwrap.dedent(script), uri], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out = json.loads(client.stdout.readline() or "null")
        assert out is not None, client.stderr.read()
        server.send_signal(signal.SIGTERM)  # with the client still connected
        server.wait(30)
        client.communicate("", timeout=30)
    assert out["multi_conn"] and out["fast_zero"] and not out["read_only"]
    assert out["fua"] and out["trim"] and out["zero"] and out["flush"] and out["allocation"]
    assert out["size"] == 4 << 20 and out["seen_by_other"] and out["fast_no_hole"] is True
    hole = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO
    assert out["status"][0] == [4096, hole] and out["status"][1] == [131072 - 4096, 0]
    assert out["status"][2][1] == hole
    io(path, "read -P 0 0 4k", "read -P 0x61 4k 60k", "read -P 0x62 64k 64k", "read -P 0x63 1M 4k", readonly=True)
    assert check(path)["exit_code"] == 0 and closed_cleanly(path)


@needs_nbdkit
@needs_qemu
@needs_libnbd
def test_a_snapshot_is_exported_read_only_and_a_readonly_export_shares_the_lock(tmp_path):
    path = str(tmp_path / "disk.lam")
    io(path, "write -P 0x42 0 64k", size=2 << 20)
    create_snapshot(path, "s1")
    io(path, "write -P 0x43 0 64k")
    probe = """
        import json, sys
        import nbd
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        out = {"read_only": h.is_read_only(), "bytes": h.pread(4, 0).hex()}
        try:
            h.pwrite(b"x" * 512, 0)
            out["write"] = "accepted"
        except nbd.Error as exc:
            out["write"] = "refused"
        print(json.dumps(out))
    """
    with serving(path + "@s1") as (uri, _, _):
        assert libnbd(probe, uri) == {"read_only": True, "bytes": "42424242", "write": "refused"}
        refused = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x99 0 4k", uri], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode == 1 and "Permission denied" in refused.stderr  # qemu-io asks for write access
        io(path, "write -P 0x44 64k 4k")  # the top stays writable: the snapshot is another file
    with serving(path, "--readonly") as (uri, _, _):
        assert libnbd(probe, uri) == {"read_only": True, "bytes": "43434343", "write": "refused"}
        io(path, "read -P 0x43 0 64k", readonly=True)  # a reader alongside: shared locks
        with pytest.raises(ImageLocked):
            io(path, "write -P 0x45 0 4k")
    io(path, "write -P 0x45 0 4k")  # the lock was given back
    io(path + "@s1", "read -P 0x42 0 64k", readonly=True)


@needs_nbdkit
@needs_libnbd
def test_sigkill_mid_write_leaves_an_image_that_opens_with_flushed_data(tmp_path):
    path = str(tmp_path / "disk.lam")
    Image.create(path, 32 << 20).close()
    writer = """
        import sys
        import nbd
        h, other = nbd.NBD(), nbd.NBD()
        h.connect_uri(sys.argv[1])
        other.connect_uri(sys.argv[1])
        h.pwrite(b"\\x5f" * (1 << 20), 0)
        other.flush()  # multi-conn: a flush on any connection makes the write durable
        print("flushed", flush=True)
        n = 0
        while True:  # until the server dies
            h.pwrite(bytes([n & 0xFF]) * 65536, (1 << 20) + (n * 65536) % (30 << 20))
            n += 1
    """
    with serving(path, "--shared", "2", expect_exit=1) as (uri, server, pidfile):
        client = subprocess.Popen([SYSTEM_PYTHON, "-c", textwrap.dedent(writer), uri], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "flushed", client.stderr.read()
        time.sleep(0.3)  # writes in flight
        with open(pidfile) as fh:
            os.kill(int(fh.read()), signal.SIGKILL)
        server.wait(30)
        client.communicate(timeout=30)
        assert client.returncode != 0  # its connection died under it
    assert "without closing" in server.stopped_with and server.stopped_with.count("\n") == 1
    before = lamina("check", "--output", "json", path, check=False)  # the real command, read-only
    report = json.loads(before.stdout)
    assert before.returncode in (0, 3) and report["corruptions"] == 0, report  # pending work or a stale copy
    assert not closed_cleanly(path)  # killed mid-write: the intent list was left behind
    io(path, "read -P 0x5f 0 1M")  # a writable open recovers; the write flushed by the other connection is there
    assert check(path)["exit_code"] == 0 and check(path)["findings"] == [] and closed_cleanly(path)


@needs_nbdkit
@needs_libnbd
def test_when_lamina_serve_itself_is_killed_the_server_closes_the_image(tmp_path):
    path = str(tmp_path / "disk.lam")
    Image.create(path, 4 << 20).close()
    writer = """
        import sys
        import nbd
        h = nbd.NBD()
        h.connect_uri(sys.argv[1])
        h.pwrite(b"\x3c" * 65536, 0)  # acknowledged, not flushed
        print("written", flush=True)
        sys.stdin.read()
    """
    with serving(path, expect_exit=-signal.SIGKILL) as (uri, server, pidfile):
        with open(pidfile) as fh:
            nbdkit = int(fh.read())
        client = subprocess.Popen([SYSTEM_PYTHON, "-c", textwrap.dedent(writer), uri], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout.readline().strip() == "written", client.stderr.read()
        second = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd, sys; nbd.NBD().connect_uri(sys.argv[1])", uri],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode != 0 and "nbd.Error" in second.stderr  # --shared 1, the default: one client
        server.kill()  # lamina serve, not nbdkit: its pipe to the plugin closes
        server.wait(30)
        deadline = time.monotonic() + 30
        while os.path.exists(f"/proc/{nbdkit}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{nbdkit}")
        client.communicate("", timeout=30)
    assert closed_cleanly(path) and check(path)["exit_code"] == 0
    io(path, "read -P 0x3c 0 64k", readonly=True)


# ------------------------------------------------------------------ errors, one line each
@needs_nbdkit
def test_errors_are_named_and_on_one_line(tmp_path):
    missing = subprocess.run([*LAMINA, "serve", "--socket", str(tmp_path / "s"), str(tmp_path / "none.lam")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "none.lam" in missing.stderr and "No such file" in missing.stderr
    path = str(tmp_path / "disk.lam")
    Image.create(path, 1 << 20).close()
    with Image.open(path):  # another writer
        locked = subprocess.run([*LAMINA, "serve", "--socket", str(tmp_path / "s"), path], capture_output=True,
                                text=True, timeout=60)
    assert locked.returncode == 1 and locked.stderr.count("\n") == 1 and "is locked by another process" in locked.stderr
    snap = subprocess.run([*LAMINA, "serve", "--socket", str(tmp_path / "s"), path + "@nope"], capture_output=True,
                          text=True, timeout=60)
    assert snap.returncode == 1 and snap.stderr.count("\n") == 1 and "nope" in snap.stderr


def test_missing_nbdkit_or_its_python_plugin_is_named(tmp_path, image_path):
    Image.create(image_path, 1 << 20).close()
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty)}
    done = subprocess.run([*LAMINA, "serve", "--socket", str(tmp_path / "s"), image_path], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "(Debian: nbdkit)" in done.stderr
    fake = empty / "nbdkit"
    fake.write_text("#!/bin/sh\necho 'nbdkit: error: cannot open plugin \"python\"' >&2\nexit 1\n")
    fake.chmod(0o755)
    done = subprocess.run([*LAMINA, "serve", "--socket", str(tmp_path / "s"), image_path], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "(Debian: nbdkit-plugin-python)" in done.stderr


@needs_nbdkit
def test_a_server_python_that_cannot_import_lamina_is_named(tmp_path, image_path, monkeypatch):
    from lamina.impl import serve as serve_module

    Image.create(image_path, 1 << 20).close()
    monkeypatch.setattr(serve_module, "package_paths", lambda: [])  # nbdkit's Python sees only its own packages
    # ...even from a shell with the venv activated: its `bin` first on PATH (where the embedded Python looked up
    # `python3` and adopted the venv, so the import succeeded and the server ran: a hang in CI)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("VIRTUAL_ENV", sys.prefix)
    import signal
    import threading

    watchdog = threading.Timer(60, os.kill, (os.getpid(), signal.SIGTERM))  # a server that did start: stop it, fail
    watchdog.start()
    try:
        with pytest.raises(serve_module.ServerUnavailable, match="cannot import lamina"):
            serve_module.serve(image_path, socket=str(tmp_path / "s"), announce=lambda line: None)
    finally:
        watchdog.cancel()
    Image.open(image_path).close()  # nothing holds the lock
