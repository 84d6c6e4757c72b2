"""`-p` draws a progress bar on a terminal (a pseudo-terminal here) and nothing when stderr is not one, or with -q."""
from __future__ import annotations

import os
import pty
import select
import subprocess
import sys

import pytest

from lamina.impl.cli import main

LAMINA = [sys.executable, "-m", "lamina.impl.cli"]


def on_terminal(args: list[str], cwd, command: list[str] = LAMINA) -> tuple[int, str]:
    """Run `lamina ARGS` with stderr on a pseudo-terminal; return its exit code and what it drew there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(command + args, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            raise AssertionError("no output from the terminal for 60 s")
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=60), out.decode(errors="replace")


def piped(args: list[str], cwd) -> tuple[int, str]:
    done = subprocess.run(LAMINA + args, cwd=cwd, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert 0 == main(["create", str(tmp_path / "base.lam"), "8M"])
    assert 0 == main(["io", str(tmp_path / "base.lam"), "-c", "write -P 0x11 0 2M"])
    assert 0 == main(["create", "-b", "base.lam", str(tmp_path / "top.lam")])
    assert 0 == main(["io", str(tmp_path / "top.lam"), "-c", "write -P 0x22 1M 2M"])
    assert 0 == main(["snapshot", "create", str(tmp_path / "top.lam"), "s1"])
    assert 0 == main(["io", str(tmp_path / "top.lam"), "-c", "write -P 0x33 4M 1M"])
    assert 0 == main(["create", "-b", "base.lam", str(tmp_path / "ov.lam")])
    assert 0 == main(["io", str(tmp_path / "ov.lam"), "-c", "write -P 0x44 1M 3M"])
    return tmp_path


COMMANDS = {
    "convert": ["convert", "-p", "top.lam", "out.lam"],
    "check": ["check", "-p", "top.lam"],
    "compare": ["compare", "-p", "top.lam", "base.lam"],
    "snapshot delete": ["snapshot", "delete", "-p", "top.lam", "s1"],
    "rebase": ["rebase", "-p", "-b", "", "ov.lam"],
    "commit": ["commit", "-p", "ov.lam"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_progress_is_drawn_on_a_terminal_only(images, name):
    args = COMMANDS[name]
    code, drawn = on_terminal(args, images)
    assert code == (1 if name == "compare" else 0) and "%|" in drawn, drawn
    assert "100%" in drawn or name == "compare", drawn  # compare stops at the first difference, as qemu-img's
    assert drawn.split()[0].startswith(name.split()[-1])
    if name != "convert":
        return  # the quiet runs below are the same code (`progress.Progress`) for every command: once is enough

    def again(out: str) -> list[str]:  # the same work again, into a new file where convert writes one
        return [out if a == "out.lam" else a for a in args]

    assert piped(again("out2.lam"), images) == (code, "")  # no terminal: nothing extra on stderr
    assert on_terminal([a for a in again("out3.lam") if a != "-p"], images) == (code, "")  # no -p
    assert on_terminal(again("out4.lam") + ["-q"], images) == (code, "")  # -q


@pytest.mark.skipif(not __import__("shutil").which("strace"), reason="needs strace (Debian package strace)")
def test_crash_exploration_draws_a_bar_on_a_terminal_only(tmp_path):
    crashsim = [sys.executable, "-m", "lamina.crashsim.cli"]
    os.mkdir(tmp_path / "init")
    subprocess.run(crashsim + ["record", "--dir", "run", "--init", "init", "--out", "p.trace", "--", "sh", "-c",
                               "echo hello > f && sync"], cwd=tmp_path, check=True, capture_output=True, timeout=120)
    explore = ["explore", "p.trace", "--check", "test -d {dir}", "--model", "strict"]
    code, drawn = on_terminal(explore, tmp_path, crashsim)
    assert code == 0 and "exploring" in drawn and "states/s" in drawn
    done = subprocess.run(crashsim + explore, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "exploring" not in done.stderr
