"""qemu-img and qemu-io as real peers: what QEMU writes, Lamina reads back byte for byte, and the reverse."""
from __future__ import annotations

import subprocess

from lamina.impl.cli import main

# qemu-img and qemu-io come from Debian's qemu-utils, which .ci/run installs.


def run(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120).stdout


def test_qcow2_written_by_qemu_io_converts_to_lamina_and_back(tmp_path):
    qcow2, raw, lam, back = (str(tmp_path / n) for n in ("a.qcow2", "a.raw", "a.lam", "back.raw"))
    run("qemu-img", "create", "-f", "qcow2", qcow2, "64M")
    run("qemu-io", "-f", "qcow2", qcow2, "-c", "write -P 0x5a 0 64k", "-c", "write -P 0xa5 40M 4k",
        "-c", "write -z 8M 1M", "-c", "write -P 0x11 63M 1M")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow2, raw)
    assert 0 == main(["convert", "-O", "lamina", raw, lam])
    assert 0 == main(["io", "-r", lam, "-c", "read -P 0x5a 0 64k", "-c", "read -P 0xa5 40M 4k",
                      "-c", "read -P 0 8M 1M", "-c", "read -P 0x11 63M 1M"])
    assert 0 == main(["convert", "-O", "raw", lam, back])
    assert "Images are identical." in run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, back)
    assert 0 == main(["check", lam])


def test_lamina_io_and_qemu_io_agree_on_the_same_commands(tmp_path):
    """The same qemu-io command lines, run by qemu-io on a raw file and by `lamina io` on an image, give the same disk."""
    raw, lam, back = (str(tmp_path / n) for n in ("b.raw", "b.lam", "b-back.raw"))
    commands = ["write -P 0x61 0 4k", "write -P 0x62 3584 1k", "write -z 2k 1k", "discard 64k 64k",
                "write -P 0x63 1M 70k", "flush"]
    run("qemu-img", "create", "-f", "raw", raw, "4M")
    run("qemu-io", "-f", "raw", raw, *[x for c in commands for x in ("-c", c)])
    assert 0 == main(["create", lam, "4M"])
    assert 0 == main(["io", lam, *[x for c in commands for x in ("-c", c)]])
    assert 0 == main(["convert", "-O", "raw", lam, back])
    assert "Images are identical." in run("qemu-img", "compare", "-f", "raw", "-F", "raw", raw, back)
