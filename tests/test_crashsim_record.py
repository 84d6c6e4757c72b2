"""`crashsim record` then `crashsim explore`: a program's strace record kept in a trace file, explored later.

Every test runs real processes under strace, through the command line.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

from lamina.crashsim.cli import main as crashsim_main
from lamina.crashsim.memstore import CREATE, FSYNC, PWRITE, RENAME, DiskState, FileData, Op
from lamina.crashsim.syscalls import ROOT
from lamina.crashsim.tracefile import BadTraceFile, TraceFile, decode, encode, read_trace, replayed, write_trace

LAMINA = f"{shlex.quote(sys.executable)} -m lamina.impl.cli"
SMALL = ["--model", "strict,reorder", "--samples", "8", "--torn-samples", "4"]


def _record(tmp_path, init, argv, name="t.trace") -> str:
    out = str(tmp_path / name)
    assert crashsim_main(["record", "--dir", str(tmp_path / ("run-" + name)), "--init", str(init), "--out", out, "--", *argv]) == 0
    return out


def test_record_then_explore_the_real_lamina_command(tmp_path, capsys):
    (tmp_path / "init").mkdir()
    subprocess.run([sys.executable, "-m", "lamina.impl.cli", "create", "--cluster-size", "4k",
                    str(tmp_path / "init" / "img.lam"), "1M"], check=True, stdout=subprocess.DEVNULL)
    trace = _record(tmp_path, tmp_path / "init", [sys.executable, "-m", "lamina.impl.cli", "io", "img.lam",
                                                  "-c", "write -P 0xab 0 8k", "-c", "flush"])
    assert "replaying it rebuilds the directory's final files" in capsys.readouterr().out
    assert {PWRITE, FSYNC} <= {op.kind for op in read_trace(trace).ops}
    check = (f"{LAMINA} check {{dir}}/img.lam >/dev/null; r=$?; [ $r = 0 -o $r = 3 ] || exit $r; "
             f"[ {{done}} = 0 ] || {LAMINA} io -r -c 'read -P 0xab 0 8k' {{dir}}/img.lam")
    assert crashsim_main(["explore", trace, "--check", check, *SMALL, "--output", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["failing"] == 0 and summary["states"] > 20 and summary["checked"] > 1


def test_record_then_explore_qemu_io_on_qcow2(tmp_path, capsys):
    (tmp_path / "init").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "init" / "img.qcow2"), "1M"], check=True)
    trace = _record(tmp_path, tmp_path / "init", ["qemu-io", "-c", "write -P 0xab 0 64k", "-c", "flush", "img.qcow2"])
    check = ("qemu-img check -q {dir}/img.qcow2; r=$?; [ $r = 0 -o $r = 3 ] || exit $r; "
             "[ {done} = 0 ] || qemu-io -r -c 'read -P 0xab 0 64k' {dir}/img.qcow2 >/dev/null")
    assert crashsim_main(["explore", trace, "--check", check, *SMALL]) == 0
    assert " 0 failing" in capsys.readouterr().out.splitlines()[-1]


_CHECK = f"{shlex.quote(sys.executable)} -c \"import sys; d=open(sys.argv[1]+'/target','rb').read(); " \
         "sys.exit(d not in (b'old', b'new'*2000))\" {dir}"
_BAD = "open('t','wb').write(b'new'*2000); import os; os.rename('t','target')"


def test_write_rename_without_fsync_fails_under_reorder_through_record_and_explore(tmp_path, capsys):
    """The known-bad program: its rename may persist before its data; the printed plan replays that failure."""
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "target").write_bytes(b"old")
    trace = _record(tmp_path, tmp_path / "init", [sys.executable, "-c", _BAD])
    assert [op.kind for op in read_trace(trace).ops] == [CREATE, "truncate", PWRITE, RENAME]
    capsys.readouterr()
    assert crashsim_main(["explore", trace, "--check", _CHECK, "--model", "strict"]) == 0
    capsys.readouterr()
    assert crashsim_main(["explore", trace, "--check", _CHECK, "--model", "reorder", "--output", "json"]) == 1
    failures = [f for r in json.loads(capsys.readouterr().out)["results"] for f in r["failures"]]
    assert failures and "checker exited 1" in failures[0]["message"]
    assert crashsim_main(["explore", trace, "--check", _CHECK, "--plan", failures[0]["plan"]]) == 1
    assert capsys.readouterr().out.startswith("FAIL: the checker exited 1")


def test_a_trace_file_round_trips_and_stores_only_written_bytes(tmp_path):
    base = DiskState({ROOT + "/a": 1, ROOT + "/d/b": 1}, {1: FileData({3: b"x" * 4096}, 1 << 30)}, 2, {ROOT + "/d"})
    ops = (Op(CREATE, ROOT, path=ROOT + "/c", inode=2), Op(PWRITE, 2, 1 << 40, 3, b"abc"), Op(FSYNC, 2),
           Op(RENAME, ROOT + "/d", path=ROOT + "/c", path2=ROOT + "/d/c"), Op("punch", 1, 0, 4096), Op("truncate", 1, 7))
    trace = TraceFile(("prog", "arg"), base, ops)
    write_trace(str(tmp_path / "t"), trace)
    back = read_trace(str(tmp_path / "t"))
    assert back.ops == ops and back.command == ("prog", "arg") and back.base.key() == base.key()
    assert back.base.next_inode == 2 and encode(back) == encode(trace)
    assert os.path.getsize(tmp_path / "t") < 10_000  # a 1 GiB file and a write at 1 TiB: only the bytes written
    assert replayed(back).files[2].size == (1 << 40) + 3


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "version", "not-json"])
def test_a_damaged_trace_file_is_a_named_error_with_its_exit_code(tmp_path, capsys, damage):
    raw = encode(TraceFile(("p",), DiskState(), (Op(CREATE, ROOT, path=ROOT + "/f", inode=1), Op(PWRITE, 1, 0, 2, b"hi"))))
    if damage == "truncate":
        raw = raw[: len(raw) * 2 // 3]
    elif damage == "flip":
        raw = raw.replace(b'"hi"', b'"ho"') if b'"hi"' in raw else raw.replace(b"aGk=", b"aGo=")
    elif damage == "empty":
        raw = b""
    elif damage == "version":
        body = raw.split(b"\n")[:-2]
        body[0] = body[0].replace(b'"version":1', b'"version":2')
        import hashlib

        text = b"\n".join(body) + b"\n"
        raw = text + json.dumps({"end": 2, "sha256": hashlib.sha256(text).hexdigest()}).encode() + b"\n"
    else:
        raw = b"\x00\xffnot a trace\n"
    with pytest.raises(BadTraceFile):
        decode(raw)
    (tmp_path / "t").write_bytes(raw)
    assert crashsim_main(["explore", str(tmp_path / "t"), "--check", "true {dir}"]) == 7
    err = capsys.readouterr().err
    assert err.startswith("crashsim: error: ") and "Traceback" not in err and len(err.splitlines()) == 1


def test_a_missing_trace_file_is_the_same_named_error(tmp_path, capsys):
    assert crashsim_main(["explore", str(tmp_path / "absent"), "--check", "true {dir}"]) == 7
    assert "cannot read the trace file" in capsys.readouterr().err


def test_a_record_that_misses_a_change_fails_with_its_exit_code(tmp_path, capsys, monkeypatch):
    """Self-verification: a record whose replay differs from the real files (a dropped write here) exits 8."""
    from lamina.crashsim import syscalls

    real = syscalls.Recorder._emit
    monkeypatch.setattr(syscalls.Recorder, "_emit", lambda self, op: None if op.kind == PWRITE else real(self, op))
    (tmp_path / "init").mkdir()
    argv = ["record", "--dir", str(tmp_path / "run"), "--init", str(tmp_path / "init"), "--out", str(tmp_path / "t"),
            "--", sys.executable, "-c", "open('f','wb').write(b'data')"]
    assert crashsim_main(argv) == 8
    assert "f: the record's contents differ from the file's" in capsys.readouterr().err


def test_a_sparse_file_is_recorded_and_explored_without_reading_or_storing_its_holes(tmp_path, capsys):
    """A 4 GiB file with two written blocks: the trace holds those bytes only, and each state is sparse again."""
    (tmp_path / "init").mkdir()
    with open(tmp_path / "init" / "big", "wb") as fh:
        fh.truncate(4 << 30)
        fh.seek(1 << 30)
        fh.write(b"a" * 4096)
    program = "import os; fd=os.open('big', os.O_WRONLY); os.pwrite(fd, b'b'*4096, 3<<30); os.fsync(fd)"
    trace = _record(tmp_path, tmp_path / "init", [sys.executable, "-c", program])
    assert os.path.getsize(trace) < 64 * 1024
    assert os.stat(tmp_path / "run-t.trace" / "big").st_blocks * 512 < 1 << 20  # the working copy kept its holes
    check = (f"{shlex.quote(sys.executable)} -c \"import os,sys; s=os.stat(sys.argv[1]+'/big'); "
             "sys.exit(s.st_size != 4<<30 or s.st_blocks*512 > 1<<20)\" {dir}")
    assert crashsim_main(["explore", trace, "--check", check, "--model", "strict,reorder"]) == 0
