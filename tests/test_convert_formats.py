"""`lamina convert` to and from QEMU's formats through a private qemu-nbd, internal snapshots imported.

qemu-img, qemu-io and qemu-nbd come from Debian's qemu-utils (which .ci/run installs).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading

import pytest

from lamina.impl import qemu
from lamina.impl.cli import main
from lamina.impl.image import Image
from lamina.impl.layers import list_snapshots
from lamina.impl.nbdclient import STATE_ZERO, NbdClient, NbdProtocolError

pytestmark = pytest.mark.skipif(not (shutil.which("qemu-img") and shutil.which("qemu-nbd") and shutil.which("qemu-io")),
                                reason="qemu-img, qemu-io and qemu-nbd are not installed (Debian package qemu-utils)")
MiB = 1 << 20


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


def qemu_io(fmt: str, path: str, *commands: str) -> None:
    run("qemu-io", "-f", fmt, path, *[x for c in commands for x in ("-c", c)])


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """qemu-nbd's socket directories go here, so a test can see that none is left behind."""
    sockets = tmp_path / "tmp"
    sockets.mkdir()
    monkeypatch.setenv("TMPDIR", str(sockets))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(sockets))
    return sockets


def qcow2_with_two_snapshots(path: str) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "8M")
    qemu_io("qcow2", path, "write -P 0x11 0 192k", "write -P 0x12 5M 4k")
    run("qemu-img", "snapshot", "-c", "first", path)
    qemu_io("qcow2", path, "write -P 0x21 64k 512", "write -z 5M 4k", "write -P 0x22 7M 64k")
    run("qemu-img", "snapshot", "-c", "second", path)
    qemu_io("qcow2", path, "write -P 0x31 1M 4k", "discard 0 64k")


def test_qcow2_snapshots_import_as_lamina_snapshots_read_back_identical(tmp_path, private_tmp):
    q, lam = str(tmp_path / "a.qcow2"), str(tmp_path / "a.lam")
    qcow2_with_two_snapshots(q)
    assert 0 == main(["convert", q, lam])
    assert [s.text_name for s in list_snapshots(lam)] == ["first", "second"]
    for snap in ("first", "second", None):
        ours, theirs = str(tmp_path / f"ours-{snap}.raw"), str(tmp_path / f"theirs-{snap}.raw")
        assert 0 == main(["convert", "-O", "raw", lam + (f"@{snap}" if snap else ""), ours])
        run("qemu-img", "convert", *(["-l", f"snapshot.name={snap}"] if snap else []), "-O", "raw", q, theirs)
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            assert a.read() == b.read(), snap
    assert 0 == main(["check", lam])
    assert os.listdir(private_tmp) == []


def test_each_imported_state_is_written_as_its_difference_from_the_one_before(tmp_path, private_tmp):
    q, lam = str(tmp_path / "a.qcow2"), str(tmp_path / "a.lam")
    qcow2_with_two_snapshots(q)
    assert 0 == main(["convert", q, lam])
    with Image.open(lam, readonly=True) as top:
        # The discarded 64 KiB at 0 is present here as zero, hiding the snapshot's data: a write-zeroes, no data.
        assert [(e.start, e.length) for e in top.extents() if e.data] == [(0, 65536), (1 * MiB, 4096)]
        assert top.read(0, 65536) == bytes(65536)
        second = top.base
        assert [(e.start, e.length) for e in second.extents() if e.data] == [(65536, 512), (5 * MiB, 4096),
                                                                             (7 * MiB, 65536)]
        first = second.base
        assert [(e.start, e.length) for e in first.extents() if e.data] == [(0, 192 * 1024), (5 * MiB, 4096)]


def test_lamina_to_each_qemu_format_and_back_is_identical_and_sparse(tmp_path, private_tmp):
    lam, raw = str(tmp_path / "a.lam"), str(tmp_path / "a.raw")
    assert 0 == main(["create", lam, "16M"])
    assert 0 == main(["io", lam, "-c", "write -P 0xab 0 64k", "-c", "write -P 0xcd 9M 1M", "-c", "write -P 0xef 15M 512"])
    assert 0 == main(["convert", "-O", "raw", lam, raw])
    for fmt in ("qcow2", "vmdk", "vhdx", "vdi"):
        out, back = str(tmp_path / f"out.{fmt}"), str(tmp_path / f"back-{fmt}.lam")
        assert 0 == main(["convert", "-O", fmt, lam, out])
        assert "Images are identical." in run("qemu-img", "compare", "-f", "raw", "-F", fmt, raw, out)
        import json
        # 1.1 MiB of data in 16 MiB: the image's file stays sparse (vdi allocates 1 MiB blocks, vhdx keeps a log).
        assert json.loads(run("qemu-img", "info", "-f", fmt, "--output=json", out))["actual-size"] <= 4 * MiB, fmt
        assert 0 == main(["convert", out, back])  # the format is detected from the file
        assert 0 == main(["compare", "-q", lam, back])
    assert os.listdir(private_tmp) == []


def test_a_foreign_snapshot_reads_as_image_at_snap(tmp_path, private_tmp):
    q = str(tmp_path / "a.qcow2")
    qcow2_with_two_snapshots(q)
    assert 0 == main(["convert", "-f", "qcow2", "-O", "raw", q + "@first", str(tmp_path / "first.raw")])
    with open(tmp_path / "first.raw", "rb") as f:
        data = f.read()
    assert data[:192 * 1024] == b"\x11" * (192 * 1024) and data[5 * MiB : 5 * MiB + 4096] == b"\x12" * 4096
    assert 1 == main(["convert", "-f", "qcow2", "-O", "raw", q + "@nosuch", str(tmp_path / "x.raw")])


def test_missing_qemu_tools_are_a_named_one_line_error(tmp_path, monkeypatch, capsys):
    q = str(tmp_path / "a.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", q, "1M")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert 1 == main(["convert", q, str(tmp_path / "a.lam")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "qemu-img is needed" in err and "qemu-utils" in err
    assert not os.path.exists(tmp_path / "a.lam")
    with pytest.raises(qemu.QemuUnavailable, match="qemu-nbd"):
        qemu.Export(q, "qcow2")


def test_an_unknown_target_format_and_a_broken_source_are_one_line_errors(tmp_path, private_tmp, capsys):
    lam = str(tmp_path / "a.lam")
    assert 0 == main(["create", lam, "1M"])
    assert 1 == main(["convert", "-O", "nosuch", lam, str(tmp_path / "x")])
    assert "Unknown file format 'nosuch'" in capsys.readouterr().err
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\xff" * 4092)
    assert 1 == main(["convert", str(bad), str(tmp_path / "y.lam")])
    err = capsys.readouterr().err
    assert err.startswith("lamina: qemu-") and err.count("\n") == 1
    assert os.listdir(private_tmp) == []


# ---------------------------------------------------------------------------- the NBD client itself
def test_nbd_client_reads_writes_zeroes_and_reports_block_status_against_qemu_nbd(tmp_path, private_tmp):
    raw = str(tmp_path / "d.raw")
    with open(raw, "wb") as f:
        f.truncate(4 * MiB)
    with qemu.Export(raw, "raw", writable=True) as export:
        c = export.client
        assert c.size == 4 * MiB
        c.write(MiB, b"\x5a" * 65536)
        c.write(3 * MiB + 512, b"\x01" * 512)
        assert c.read(MiB - 512, 1024) == bytes(512) + b"\x5a" * 512
        c.zero(MiB, 4096)
        assert c.read(MiB, 8192) == bytes(4096) + b"\x5a" * 4096
        data = list(c.data_ranges())
        assert data and all(s <= MiB + 4096 and s + n >= MiB + 65536 or s <= 3 * MiB + 512 < s + n for s, n in data)
        runs = c.block_status(0, 4 * MiB)
        assert runs[0][0] == 0 and runs[0][2] & STATE_ZERO  # the unwritten start reads zero
        c.flush()
        c.trim(3 * MiB, 4096)
    with open(raw, "rb") as f:
        f.seek(MiB + 4096)
        assert f.read(4096) == b"\x5a" * 4096


def test_nbd_client_rejects_a_server_that_breaks_the_protocol(tmp_path):
    path = str(tmp_path / "s")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        conn.sendall(b"NBDMAGIC" + b"\0" * 10)  # not IHAVEOPT: an old-style or foreign server
        conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with pytest.raises(NbdProtocolError, match="fixed newstyle"):
            NbdClient(path, timeout=10)
    finally:
        thread.join()
        server.close()


# ---------------------------------------------------------------------------- the server's life cycle
HOLDER = """
import sys, time
from lamina.impl.qemu import Export, signals_interrupt
with signals_interrupt():
    try:
        with Export(sys.argv[1], "raw") as export:
            print(export._proc.pid, export._dir, flush=True)
            time.sleep(120)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


def _gone(pid: int, seconds: float = 10.0) -> bool:
    """Whether a process has exited (a zombie no one reaped counts as exited)."""
    import time
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("State:") and "Z" in line.split()[1] for line in f):
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_qemu_nbd_stops_when_lamina_is_terminated_or_killed(tmp_path, signal_name):
    import signal
    import sys
    raw = tmp_path / "d.raw"
    raw.write_bytes(bytes(65536))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(raw)], stdout=subprocess.PIPE, text=True)
    try:
        pid, directory = holder.stdout.readline().split()
        os.kill(holder.pid, getattr(signal, signal_name))
        holder.wait(timeout=30)
        assert _gone(int(pid)), f"qemu-nbd {pid} still runs after {signal_name}"
        if signal_name == "SIGTERM":  # caught: the server was stopped in order and its directory removed
            assert holder.stdout.read() == "interrupted\n"
            assert not os.path.exists(directory)
        else:
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_pipelined_reads_match_single_reads_and_an_abandoned_pipeline_stops_the_server(tmp_path, private_tmp):
    q = str(tmp_path / "p.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", q, "8M")
    qemu_io("qcow2", q, "write -P 0x41 0 3M", "write -P 0x42 5M 100k")
    pieces = [(o, 300 * 1024) for o in range(0, 8 * MiB - 300 * 1024, 300 * 1024)] + [(7 * MiB, 512)]
    with qemu.Export(q, "qcow2") as export:
        c = export.client
        got = list(c.reads(iter(pieces), depth=5))
        assert [(o, n) for o, n, _ in got] == pieces
        assert all(data == c.read(o, n) for o, n, data in got)
        stream = c.reads(iter(pieces), depth=8)
        next(stream)  # seven requests still in flight
        assert c.busy
        proc = export._proc
    assert proc.poll() is not None  # closing a connection out of step stopped the server, without a hang
    assert os.listdir(private_tmp) == []
