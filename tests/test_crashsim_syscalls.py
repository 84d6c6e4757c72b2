"""The system-call-level crash test: strace records of real programs, explored under crashsim's models.

Every test here runs real processes under strace (installed by `.ci/run`).
"""
from __future__ import annotations

import os
import shlex
import sys

import pytest

from lamina.crashsim.cli import main as crashsim_main
from lamina.crashsim.cliworkloads import CLI_WORKLOADS, run_cli_workloads
from lamina.crashsim.explore import Budget
from lamina.crashsim.memstore import CREATE, FSYNC, FSYNC_DIR, PWRITE, RENAME
from lamina.crashsim.syscalls import ROOT, Recorder, TraceError, parse_calls, snapshot_directory, \
    trace_program

CI_BUDGET = Budget(subset_samples=8, torn_samples=4)
CI_MODELS = ("strict", "reorder+torn+namespace")


def _hex(text: str) -> str:
    return "".join(f"\\x{b:02x}" for b in text.encode())


def _recorder(tmp_path) -> Recorder:
    return Recorder(str(tmp_path), snapshot_directory(str(tmp_path)))


def _feed(recorder: Recorder, lines: list[str]) -> None:
    for pid, name, args, ret in parse_calls(lines):
        recorder.call(pid, name, args, ret)


def test_trace_lines_become_operations_on_simulated_paths(tmp_path):
    """openat/write at the file position (joined across unfinished/resumed)/fsync/rename/directory fsync."""
    d = os.path.realpath(tmp_path)
    rec = _recorder(tmp_path)
    _feed(rec, [
        f'7 openat(AT_FDCWD<{_hex(d)}>, "{_hex("a.tmp")}", O_WRONLY|O_CREAT|O_TRUNC|O_CLOEXEC, 0666) = 3<{_hex(d + "/a.tmp")}>\n',
        f'7 write(3<{_hex(d + "/a.tmp")}>, "{_hex("hel")}", 3 <unfinished ...>\n',
        '8 read(0x0, 0x7ffd, 0x10) = 0x2\n',
        '7 <... write resumed>) = 3\n',
        f'7 write(3<{_hex(d + "/a.tmp")}>, "{_hex("lo")}", 2) = 2\n',
        f'7 fsync(3<{_hex(d + "/a.tmp")}>) = 0\n',
        f'7 rename("{_hex("a.tmp")}", "{_hex("a")}") = 0\n',
        f'7 openat(AT_FDCWD<{_hex(d)}>, "{_hex(d)}", O_RDONLY|O_DIRECTORY) = 4<{_hex(d)}>\n',
        f'7 fsync(4<{_hex(d)}>) = 0\n',
        f'7 openat(AT_FDCWD<{_hex(d)}>, "{_hex("/etc/hosts")}", O_RDONLY) = 5<{_hex("/etc/hosts")}>\n',
        f'7 write(5<{_hex("/etc/hosts")}>, "{_hex("x")}", 1) = 1\n',
    ])
    kinds = [(op.kind, op.offset, op.data) for op in rec.ops]
    assert kinds[0][0] == CREATE and rec.ops[0].path == ROOT + "/a.tmp"
    assert kinds[2:4] == [(PWRITE, 0, b"hel"), (PWRITE, 3, b"lo")]  # after the O_TRUNC truncate
    assert [op.kind for op in rec.ops[4:]] == [FSYNC, RENAME, FSYNC_DIR]
    assert rec.ops[5].path2 == ROOT + "/a" and rec.ops[6].target == ROOT
    assert rec.state.files[rec.state.names[ROOT + "/a"]].pread(0, 5) == b"hello"


@pytest.mark.parametrize("line", [
    "copy_file_range(3<{f}>, NULL, 4<{f}>, NULL, 5, 0) = 5",
    "mmap(NULL, 4096, PROT_READ|PROT_WRITE, MAP_SHARED, 3<{f}>, 0) = 0x7f00",
    "fallocate(3<{f}>, FALLOC_FL_COLLAPSE_RANGE, 0, 4096) = 0",
    "renameat2(AT_FDCWD<{d}>, \"{a}\", AT_FDCWD<{d}>, \"{b}\", RENAME_EXCHANGE) = 0",
    "io_uring_setup(8, 0x7ffd) = 3",
    "frobnicate(3<{f}>) = 0",
])
def test_a_change_the_record_cannot_express_fails_loudly(tmp_path, line):
    (tmp_path / "a").write_bytes(b"x")
    d = os.path.realpath(tmp_path)
    rec = _recorder(tmp_path)
    text = line.format(f=_hex(d + "/a"), d=_hex(d), a=_hex("a"), b=_hex("b"))
    with pytest.raises(TraceError):
        _feed(rec, [f"9 {text}\n"])


_CHECK = f"{shlex.quote(sys.executable)} -c \"import sys; d=open(sys.argv[1]+'/target','rb').read(); " \
         "sys.exit(d not in (b'old', b'new'*2000))\" {dir}"
_BAD = "open('t','wb').write(b'new'*2000); import os; os.rename('t','target')"
_GOOD = ("import os; f=open('t','wb'); f.write(b'new'*2000); f.flush(); os.fsync(f.fileno()); f.close(); "
         "os.rename('t','target'); d=os.open('.',os.O_RDONLY); os.fsync(d)")


@pytest.fixture
def initial(tmp_path):
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "target").write_bytes(b"old")
    return str(tmp_path / "init")


def test_any_program_with_any_checker_write_rename_without_fsync_fails(initial):
    """C6: the classic bug (a rename persisting before the data it names) is a failing state under reorder."""
    rec, results, _ = trace_program([sys.executable, "-c", _BAD], _CHECK, ["strict", "reorder"],
                                    Budget(), initial=initial)
    assert [op.kind for op in rec.ops] == [CREATE, "truncate", PWRITE, RENAME]
    strict, reorder = results
    assert strict.failing_states == 0 and reorder.failing_states > 0
    assert "checker exited 1" in reorder.failures[0].message


def test_any_program_with_any_checker_fsync_then_rename_passes(initial):
    _, results, _ = trace_program([sys.executable, "-c", _GOOD], _CHECK,
                                  ["strict", "reorder+torn+namespace"], Budget(), initial=initial)
    assert all(r.states > 0 and r.failing_states == 0 for r in results)


def test_trace_command_line(initial, capsys):
    argv = ["trace", "--model", "reorder", "--init", initial, "--checker", _CHECK, "--", sys.executable, "-c"]
    assert crashsim_main(argv + [_BAD]) == 1
    assert "FAIL " in capsys.readouterr().out
    assert crashsim_main(argv + [_GOOD]) == 0
    assert "0 failing" in capsys.readouterr().out


def test_another_implementation_qemu_io_on_qcow2(tmp_path):
    """C6 on a C program with I/O threads: qemu-io on qcow2, `qemu-img check` (leaks allowed) as the checker."""
    import subprocess

    (tmp_path / "init").mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / "init" / "img.qcow2"), "1M"], check=True)
    checker = ("qemu-img check -q {dir}/img.qcow2; r=$?; [ $r = 0 -o $r = 3 ] || exit $r; "
               "[ {done} = 0 ] || qemu-io -r -c 'read -P 0xab 0 64k' {dir}/img.qcow2 >/dev/null")
    rec, results, _ = trace_program(["qemu-io", "-c", "write -P 0xab 0 64k", "-c", "flush", "img.qcow2"], checker,
                                    ["strict", "reorder"], Budget(), initial=str(tmp_path / "init"))
    assert {PWRITE, FSYNC} <= {op.kind for op in rec.ops}
    assert all(r.states > 0 and r.failing_states == 0 for r in results)


def test_real_lamina_command_every_crash_state_recovers_with_its_promises():
    """The real OS backend, crashed under strict and reorder+torn+namespace on every CLI workload: 0 failing.

    Each state is first checked read-only, as an administrator would after a
    power failure: it must report no corruption (exit 0 or 3)."""
    results, tallies, seconds = run_cli_workloads(list(CLI_WORKLOADS), CI_MODELS, CI_BUDGET)
    assert {r.workload for r in results} == set(CLI_WORKLOADS)
    assert [f for r in results for f in r.failures] == []
    assert sum(r.states for r in results) > 1000
    assert all(sum(t.values()) > 0 for t in tallies.values())


def test_real_lamina_command_read_only_check_before_recovery_finds_no_corruption():
    results, _, _ = run_cli_workloads(["create-write"], ["strict"], CI_BUDGET, stop_at_first=True)
    assert [f.message for r in results for f in r.failures] == []


def test_a_missing_directory_fsync_in_the_os_backend_is_caught():
    """Negative control: OsStorage.fsync_dir as a no-op in the recorded process; the created image can vanish."""
    results, _, _ = run_cli_workloads(["create-write", "snapshot"], ["namespace"], Budget(), control="skip-dir-fsync",
                                      stop_at_first=True, judge_before_recovery=False)
    assert all(r.failing_states for r in results)
    assert "img.lam is missing, though a returned `lamina` promised its contents" in results[0].failures[0].message


def test_a_missing_file_fsync_in_the_os_backend_is_caught():
    """Negative control: OsFile.fsync as a no-op; a flushed write or its metadata can be lost under reorder."""
    results, _, _ = run_cli_workloads(["create-write"], ["reorder"], Budget(), control="skip-file-fsync",
                                      stop_at_first=True, judge_before_recovery=False)
    assert results[0].failing_states


def test_a_state_is_written_out_sparse_with_its_links_and_without_names_in_a_lost_directory(tmp_path):
    from lamina.crashsim.explore import Materialiser
    from lamina.crashsim.memstore import LINK, MKDIR, Op
    from lamina.crashsim.syscalls import materialise

    ops = [Op(CREATE, ROOT, path=ROOT + "/f", inode=1), Op(PWRITE, 1, 1 << 20, 3, b"abc"),
           Op(LINK, ROOT, path=ROOT + "/f", path2=ROOT + "/g"),
           Op(MKDIR, ROOT, path=ROOT + "/d"), Op(LINK, ROOT + "/d", path=ROOT + "/f", path2=ROOT + "/d/h")]
    m = Materialiser(snapshot_directory(str(tmp_path / ".")), ops)
    materialise(m.state(5, {}, 0), str(tmp_path / "all"))
    assert (tmp_path / "all" / "d" / "h").read_bytes()[-3:] == b"abc"
    assert os.stat(tmp_path / "all" / "f").st_ino == os.stat(tmp_path / "all" / "g").st_ino
    assert os.stat(tmp_path / "all" / "f").st_blocks * 512 < 1 << 20  # the hole stays a hole
    materialise(m.state(5, {3: "d"}, 0), str(tmp_path / "lost"))  # the mkdir was lost: so is the name inside
    assert sorted(os.listdir(tmp_path / "lost")) == ["f", "g"]


def test_a_shrink_that_cuts_the_file_before_its_root_write_loses_flushed_data_and_is_caught():
    """Negative control: the file cut before the root records the smaller size; after a crash in between
    the old size is back and a flushed sector past the new size reads zero (the state an outside test found)."""
    results, _, _ = run_cli_workloads(["shrink"], ["strict"], Budget(), control="shrink-cut-first",
                                      stop_at_first=True, judge_before_recovery=False)
    assert results[0].failing_states
    assert "img.lam bytes 614400+8192: sector at 614400 should read 0xcd" in results[0].failures[0].message
