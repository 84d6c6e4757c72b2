"""The `lamina` command as a user meets it: outputs, exit codes, one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lamina.impl.cli import main
from lamina.impl.image import Image
from lamina.impl.sizes import format_size, parse_size
from lamina.spec.errors import InvalidArgument


def lamina(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamina.impl.cli", *args], capture_output=True, text=True, timeout=120)


def test_sizes():
    assert [512, 65536, 1 << 20, 4 << 30, 1 << 40] == [parse_size(t) for t in ("512", "64k", "1M", "4G", "1TiB")]
    assert ["64 KiB", "1.5 MiB", "511 B"] == [format_size(n) for n in (65536, 3 << 19, 511)]
    with pytest.raises(InvalidArgument):
        parse_size("12Q")


@pytest.mark.parametrize("text,value", [("007", 7), ("4K", 4096), ("5b", 5), (" 4k ", 4096), ("2GiB", 2 << 30), ("3kb", 3072),
                                        ("0", 0), ("1p", 1 << 50)])
def test_sizes_with_and_without_the_pattern_agree(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "-1", "-1k", "1x", "1.5k", "1 k k", "k1"])
def test_sizes_refused(text):
    with pytest.raises(InvalidArgument, match="invalid size"):
        parse_size(text)


def test_io_pattern_mismatch_names_the_first_differing_byte(image_path):
    with Image.create(image_path, 1 << 20) as image:
        image.write(0, b"\xab" * 8192)
        image.write(5000, b"\x01")
    done = lamina("io", "-r", image_path, "-c", "read -P 0xab 0 4k", "-c", "read -P 0xab 4k 4k")
    assert 1 == done.returncode
    assert "read 4096/4096 bytes at offset 0" in done.stdout
    assert "Pattern verification failed at offset 5000, 3192 bytes (expected 0xab, found 0x01)" in done.stderr


def test_io_write_flush_read_and_pattern_mismatch(image_path):
    assert 0 == main(["create", image_path, "1M"])
    done = lamina("io", image_path, "-c", "write -P 0xab 0 64k", "-c", "flush", "-c", "read -P 0xab 0 64k")
    assert 0 == done.returncode, done.stderr
    assert "wrote 65536/65536 bytes at offset 0" in done.stdout
    assert "read 65536/65536 bytes at offset 0" in done.stdout
    done = lamina("io", image_path, "-c", "read -P 0xab 4k 64k")
    assert 1 == done.returncode
    assert "Pattern verification failed at offset 65536, 4096 bytes" in done.stderr
    assert "Traceback" not in done.stderr
    done = lamina("io", image_path, "-c", "write -z 0 4k", "-c", "discard 8k 8k", "-c", "read -P 0 0 4k", "-c", "read -P 0xab 4k 4k", "-c", "read -P 0 8k 8k",
                  "-c", "read -P 0xab 16k 48k", "-c", "truncate 2M", "-c", "info")
    assert 0 == done.returncode, done.stderr
    assert "virtual size: 2097152" in done.stdout


@pytest.mark.parametrize("args,message", [
    (["io", "IMG", "-c", "write 1M 4k"], "reaches past the virtual size"),
    (["io", "IMG", "-c", "frobnicate"], "unknown command"),
    (["io", "IMG", "-c", "write -P 0x100 0 4k"], "invalid pattern"),
    (["io", "-r", "IMG", "-c", "write 0 4k"], "read-only"),
    (["create", "IMG", "1M"], "already exists"),
    (["create", "--cluster-size", "1M", "NEW", "3G"], None),
    (["create", "--cluster-size", "3k", "NEW", "1G"], "not a power of two"),
    (["create", "NEW", "2P"], "exceeds the format's maximum"),
    (["info", "MISSING"], "cannot open"),
    (["resize", "IMG", "512k"], "--shrink"),
    (["frob"], "invalid choice"),
])
def test_errors_are_one_line_with_exit_1(image_path, tmp_path, args, message):
    Image.create(image_path, 1 << 20).close()
    args = [a.replace("IMG", image_path).replace("NEW", str(tmp_path / "new.lam")).replace("MISSING", str(tmp_path / "none"))
            for a in args]
    done = lamina(*args)
    if message is None:
        assert 0 == done.returncode, done.stderr
        return
    assert 1 == done.returncode
    assert "Traceback" not in done.stderr
    assert message in done.stderr
    assert 1 == len(done.stderr.strip().splitlines())


def test_info_map_and_check_json(image_path, capsys):
    assert 0 == main(["create", "--cluster-size", "4k", image_path, "4M"])
    assert 0 == main(["io", image_path, "-c", "write -P 1 1M 8k"])
    capsys.readouterr()
    assert 0 == main(["info", "--output", "json", image_path])
    info = json.loads(capsys.readouterr().out)
    assert (4 << 20, 4096, False) == (info["virtual-size"], info["cluster-size"], info["dirty-flag"])
    assert 0 == main(["map", "--output", "json", image_path])
    extents = json.loads(capsys.readouterr().out)
    assert [(0, 1 << 20, False), (1 << 20, 8192, True), ((1 << 20) + 8192, (3 << 20) - 8192, False)] == [
        (e["start"], e["length"], e["data"]) for e in extents]
    assert 0 == main(["check", "--output", "json", image_path])
    report = json.loads(capsys.readouterr().out)
    assert (0, 0, 0) == (report["corruptions"], report["leaks"], report["exit_code"])
    assert 0 == main(["resize", "--shrink", image_path, "-3M"])
    with Image.open(image_path, readonly=True) as image:
        assert 1 << 20 == image.virtual_size


def test_human_outputs_name_the_image(image_path):
    Image.create(image_path, 1 << 30).close()
    done = lamina("info", image_path)
    assert "virtual size: 1 GiB (1073741824 bytes)" in done.stdout
    assert "No errors were found on the image." in lamina("check", image_path).stdout
