"""`crashsim record --via nbd`: NBD clients recorded at the block level through nbdkit, explored from the trace file.

Every test runs a real nbdkit (started by the recorder on a Unix socket in a
temporary directory, always stopped) and a real client (qemu-io, qemu-img,
or a libnbd script).
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from lamina.crashsim import nbdrecord
from lamina.crashsim.cli import main as crashsim_main
from lamina.crashsim.memstore import FSYNC, PUNCH, PWRITE
from lamina.crashsim.nbdrecord import NbdkitUnavailable, parse_size, record_nbd
from lamina.crashsim.tracefile import read_trace, replayed


def _nbdkit_python() -> bool:
    if shutil.which("nbdkit") is None:
        return False
    return subprocess.run(["nbdkit", "--dump-plugin", "python"], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode == 0


pytestmark = [
    pytest.mark.skipif(not _nbdkit_python(), reason="nbdkit with its Python plugin (nbdkit-plugin-python) is not installed"),
    pytest.mark.skipif(shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) is not installed"),
]
SMALL = ["--model", "strict,reorder", "--samples", "8", "--torn-samples", "4"]
# A checker: `reads.py DEVICE CRASH FROM:OFFSET:LENGTH:BYTE ...` requires the range to read BYTE once CRASH >= FROM.
READS = """
import sys
device, crash = sys.argv[1], int(sys.argv[2])
with open(device, "rb") as fh:
    for spec in sys.argv[3:]:
        start, offset, length, byte = (int(x, 0) for x in spec.split(":"))
        fh.seek(offset)
        if crash >= start and fh.read(length) != bytes([byte]) * length:
            sys.exit(f"{offset}+{length} does not read {byte:#x} after {crash} ops")
"""


@pytest.fixture()
def reads(tmp_path, monkeypatch) -> str:
    """The checker command's start; the recorded programs run in tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reads.py").write_text(READS)
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'reads.py'))} {{dir}}/disk.raw {{crash}}"


def _record(tmp_path, argv: list[str], *options: str, name: str = "w.trace") -> str:
    out = str(tmp_path / name)
    assert crashsim_main(["record", "--via", "nbd", "--dir", str(tmp_path / ("run-" + name)), "--out", out,
                          *options, "--", *argv]) == 0
    return out


def _explore(trace: str, check: str, capsys, *options: str) -> tuple[int, dict]:
    capsys.readouterr()
    code = crashsim_main(["explore", trace, "--check", check, *SMALL, *options, "--output", "json"])
    return code, json.loads(capsys.readouterr().out)


def test_qemu_io_flushed_write_survives_every_state_and_the_unflushed_one_not(tmp_path, capsys, reads):
    trace = _record(tmp_path, ["qemu-io", "-f", "raw", "-c", "write -P 0xab 0 64k", "-c", "flush",
                               "-c", "write -P 0xcd 64k 64k", "{nbd}"], "--size", "16M")
    assert "over NBD" in capsys.readouterr().out
    recorded = read_trace(trace)
    kinds = [op.kind for op in recorded.ops]
    assert kinds[0] == PWRITE and kinds[1] == FSYNC and PWRITE in kinds[2:] and kinds[-1] == FSYNC
    assert recorded.base.files[1].size == 16 << 20 and not recorded.base.files[1].blocks  # a new sparse device
    final = replayed(recorded).files[1]
    assert sorted(final.blocks) == list(range(32))  # 128 KiB written, the rest a hole
    assert os.stat(tmp_path / "run-w.trace" / "disk.raw").st_blocks * 512 < 1 << 20  # the real device stays sparse

    flush_done = kinds.index(FSYNC) + 1  # ops issued once the flush was acknowledged
    code, summary = _explore(trace, f"{reads} {flush_done}:0:65536:0xab", capsys)
    assert code == 0 and summary["failing"] == 0 and summary["states"] >= 2 * len(kinds)

    code, summary = _explore(trace, f"{reads} {flush_done}:0:65536:0xab 0:65536:65536:0xcd", capsys)
    assert code == 1
    failing = [f for r in summary["results"] for f in r["failures"]]
    assert {r["model"] for r in summary["results"] if r["failures"]} == {"strict", "reorder"}
    assert all("65536+65536 does not read 0xcd" in f["message"] for f in failing)
    assert any(f["plan"].endswith(f"/p={flush_done}") for f in failing)  # after the flush, before the second write
    plan = failing[0]["plan"]
    capsys.readouterr()
    assert crashsim_main(["explore", trace, "--check", f"{reads} 0:65536:65536:0xcd", "--plan", plan]) == 1


def test_trim_and_zero_punch_holes_and_fua_is_a_write_then_a_flush(tmp_path, capsys, reads):
    if subprocess.run(["/usr/bin/python3", "-c", "import nbd"], stderr=subprocess.DEVNULL).returncode != 0:
        pytest.skip("python3-libnbd is not installed for the system python3")
    client = tmp_path / "client.py"
    client.write_text(
        "import os, sys, nbd\n"
        "h = nbd.NBD()\n"
        "h.connect_uri(os.environ['CRASHSIM_NBD'])\n"
        "advertised = (h.can_flush(), h.can_fua(), h.can_trim(), h.can_zero(), h.can_multi_conn(), h.is_read_only())\n"
        "if advertised != (True, True, True, True, False, False):\n"
        "    sys.exit(f'advertised {advertised}')\n"
        "h.pwrite(b'\\xab' * 65536, 0)\n"
        "h.flush()\n"
        "h.pwrite(b'\\xcd' * 4096, 65536, nbd.CMD_FLAG_FUA)\n"
        "h.trim(16384, 0)\n"
        "h.zero(4096, 32768)\n"
        "h.shutdown()\n")
    trace = _record(tmp_path, ["/usr/bin/python3", str(client)], "--size", "1M")
    ops = read_trace(trace).ops
    assert [op.kind for op in ops] == [PWRITE, FSYNC, PWRITE, FSYNC, PUNCH, PUNCH]
    assert [(op.offset, op.length) for op in ops[4:]] == [(0, 16384), (32768, 4096)]
    final = replayed(read_trace(trace)).files[1]
    assert sorted(final.blocks) == [4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16]  # trimmed and zeroed blocks are holes
    # The FUA write is durable in every state after it, as the flushed write beside the holes is.
    code, summary = _explore(trace, f"{reads} 4:65536:4096:0xcd 2:16384:16384:0xab", capsys)
    assert code == 0 and summary["failing"] == 0
    # The trim is never flushed: in order (strict) it is there once issued, under reorder it may be lost even at the end.
    code, summary = _explore(trace, f"{reads} 5:0:16384:0", capsys)
    assert code == 1 and {r["model"]: bool(r["failures"]) for r in summary["results"]} == {"strict": False, "reorder": True}
    assert any("/p=6/" in f["plan"] for r in summary["results"] for f in r["failures"])


def test_qcow2_over_nbd_checked_with_qemu_img_check_in_every_state(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "init").mkdir()
    device = tmp_path / "init" / "disk.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(device), "8M"], check=True)
    os.truncate(device, 16 << 20)  # room for clusters: a qcow2 on a fixed-size device, as on a logical volume
    trace = _record(tmp_path, ["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 0 64k", "-c", "flush",
                               "-c", "write -P 0xcd 1M 64k", "{nbd}"], "--init", str(tmp_path / "init"))
    kinds = [op.kind for op in read_trace(trace).ops]
    assert kinds.count(PWRITE) >= 3 and FSYNC in kinds
    check = ("qemu-img check -q -f qcow2 {dir}/disk.raw; r=$?; [ $r = 0 -o $r = 3 ] || exit $r; "
             "[ {done} = 0 ] || qemu-io -f qcow2 -r -c 'read -P 0xab 0 64k' -c 'read -P 0xcd 1M 64k' {dir}/disk.raw >/dev/null")
    code, summary = _explore(trace, check, capsys)
    assert code == 0 and summary["failing"] == 0 and summary["checked"] > 3


def test_a_change_made_behind_the_servers_back_is_a_record_mismatch(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    device = tmp_path / "run" / "disk.raw"
    command = f"qemu-io -f raw -c 'write -P 0xab 0 4k' \"$CRASHSIM_NBD\" && printf x | dd of={device} bs=1 seek=9000 conv=notrunc 2>/dev/null"
    code = crashsim_main(["record", "--via", "nbd", "--dir", str(tmp_path / "run"), "--size", "64k",
                          "--out", str(tmp_path / "w.trace"), "--", "sh", "-c", command])
    assert code == 8
    err = capsys.readouterr().err.strip()
    assert err.startswith("crashsim: error:") and "disk.raw" in err and "\n" not in err


def _nbdkit_children() -> list[int]:
    """Our own nbdkit children still alive (the recorder must have stopped every server it started)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)
        except OSError:
            continue
        if fields[0].endswith("(nbdkit") and int(fields[1].split()[1]) == os.getpid():
            found.append(int(entry))
    return found


def test_errors_are_named_and_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = ["record", "--via", "nbd", "--dir", str(tmp_path / "run"), "--out", str(tmp_path / "w.trace")]

    def fails(argv: list[str], code: int, words: str) -> None:
        assert crashsim_main(argv) == code
        err = capsys.readouterr().err.strip()
        assert err.startswith("crashsim: error:") and words in err and "\n" not in err, err

    fails(run + ["--", "true"], 4, "no such device; give --size")
    fails(run + ["--size", "12x", "--", "true"], 4, "not a size")
    fails(run + ["--size", "64k", "--", "sh", "-c", "exit 3"], 4, "exited 3 against the NBD export")
    fails(run + ["--", "no-such-program-here"], 4, "cannot run it")
    assert _nbdkit_children() == []
    fails(run + ["--size", "128k", "--", "true"], 4, "not --size 131072")  # the device now exists with 64 KiB
    fails(["record", "--dir", str(tmp_path / "r2"), "--out", str(tmp_path / "x"), "--size", "1M", "--", "true"], 4,
          "go with --via nbd")
    monkeypatch.setattr(nbdrecord, "PLUGIN", tmp_path / "absent.py")
    fails(run + ["--", "true"], 4, "recording plugin absent.py is missing")
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no nbdkit on it
    with pytest.raises(NbdkitUnavailable, match="nbdkit is not installed"):
        record_nbd(["true"], str(tmp_path / "run"))
    fake = tmp_path / "bin" / "nbdkit"  # an nbdkit without its Python plugin
    fake.write_text("#!/bin/sh\necho 'nbdkit: error: cannot open plugin \"python\"' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(NbdkitUnavailable, match="Python plugin is not installed.*cannot open plugin"):
        record_nbd(["true"], str(tmp_path / "run"))
    assert parse_size("16M") == 16 << 20 and parse_size("64k") == 65536 and parse_size("4096") == 4096


def test_qemu_img_convert_zeroes_become_holes_on_a_full_device(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / "src.raw"
    with open(source, "wb") as fh:
        fh.truncate(1 << 20)
        fh.seek(300 << 10)
        fh.write(b"hello")
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "disk.raw").write_bytes(os.urandom(1 << 20))  # every block non-zero before the copy
    trace = _record(tmp_path, ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), "{nbd}"],
                    "--init", str(tmp_path / "init"))
    recorded = read_trace(trace)
    assert len(recorded.base.files[1].blocks) == 256
    assert PUNCH in {op.kind for op in recorded.ops} and recorded.ops[-1].kind == FSYNC
    assert sorted(replayed(recorded).files[1].blocks) == [75]  # the one block holding data; the rest punched
    device = tmp_path / "run-w.trace" / "disk.raw"
    assert device.read_bytes() == source.read_bytes() and os.stat(device).st_blocks * 512 <= 64 << 10
    code, summary = _explore(trace, f"[ {{done}} = 0 ] || cmp -s {source} {{dir}}/disk.raw", capsys)
    assert code == 0 and summary["failing"] == 0
    code, summary = _explore(trace, f"cmp -s {source} {{dir}}/disk.raw", capsys)  # before the flush, old blocks remain
    assert code == 1 and all(r["failures"] for r in summary["results"])
