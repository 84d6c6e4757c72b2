"""`lamina compare` against `qemu-img compare`: the same verdicts, messages and exit codes on the same disks."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from lamina.impl.cli import main

MiB = 1 << 20
needs_qemu = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is not installed (Debian package qemu-utils)")


def raw(path, size: int, writes: dict[int, bytes] = {}) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes.items():
            f.seek(offset)
            f.write(data)
    return str(path)


def ours(capsys, *args: str) -> tuple[int, str]:
    code = main(["compare", *args])
    return code, capsys.readouterr().out


def theirs(*args: str) -> tuple[int, str]:
    done = subprocess.run(["qemu-img", "compare", *args], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout


@needs_qemu
@pytest.mark.parametrize("case", ["same", "byte", "late", "longer-zero", "longer-data", "strict-size", "shorter-data"])
def test_raw_files_get_qemu_img_compare_verdicts(tmp_path, capsys, case):
    a = raw(tmp_path / "a", MiB, {4096: b"\x01" * 100})
    b = {"same": lambda: raw(tmp_path / "b", MiB, {4096: b"\x01" * 100}),
         "byte": lambda: raw(tmp_path / "b", MiB, {4096: b"\x01" * 99 + b"\x02"}),
         "late": lambda: raw(tmp_path / "b", MiB, {4096: b"\x01" * 100, MiB - 1: b"\x09"}),
         "longer-zero": lambda: raw(tmp_path / "b", 2 * MiB, {4096: b"\x01" * 100}),
         "longer-data": lambda: raw(tmp_path / "b", 2 * MiB, {4096: b"\x01" * 100, 1500000: b"\x07"}),
         "strict-size": lambda: raw(tmp_path / "b", 2 * MiB, {4096: b"\x01" * 100}),
         "shorter-data": lambda: raw(tmp_path / "b", MiB // 2, {4096: b"\x01" * 100})}[case]()
    if case == "shorter-data":  # the first is the longer one, with data past the second's end
        a = raw(tmp_path / "a", MiB, {4096: b"\x01" * 100, 800000: b"\x03"})
    first, second = a, b
    strict = ["-s"] if case == "strict-size" else []
    expected = theirs(*strict, "-f", "raw", "-F", "raw", first, second)
    assert ours(capsys, *strict, "-f", "raw", "-F", "raw", first, second) == expected
    assert expected[0] == (0 if case in ("same", "longer-zero") else 1)


def test_lamina_images_and_snapshots_compare_by_their_metadata(tmp_path, capsys, monkeypatch):
    img, other = str(tmp_path / "a.lam"), str(tmp_path / "b.lam")
    assert 0 == main(["create", img, "64M"])
    assert 0 == main(["io", img, "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 40M 64k"])
    assert 0 == main(["snapshot", "create", img, "s1"])
    assert 0 == main(["io", img, "-c", "write -P 0x12 40M 512", "-c", "write -P 0x13 50M 512"])
    capsys.readouterr()
    reads: list[tuple[int, int]] = []
    # What compare reads: with a shared layer (s1), only what the layer above it holds.
    real_open = __import__("lamina.impl.convert", fromlist=["open_source"]).open_source

    def spying_open(*args, **kwargs):
        source = real_open(*args, **kwargs)
        read = source.read

        def recorded(offset, length):
            reads.append((offset, length))
            return read(offset, length)
        source.read = recorded
        return source

    monkeypatch.setattr("lamina.impl.convert.open_source", spying_open)
    assert ours(capsys, img + "@s1", img) == (1, f"Content mismatch at offset {50 * MiB}!\n")
    assert all(40 * MiB <= o < 51 * MiB for o, _ in reads) and sum(n for _, n in reads) == 2 * 2 * 512
    assert 0 == main(["convert", img + "@s1", other])
    assert ours(capsys, other, img + "@s1") == (0, "Images are identical.\n")
    assert ours(capsys, "-q", other, img) == (1, "")


def test_a_raw_file_and_a_lamina_image_compare_and_json_says_where(tmp_path, capsys):
    img = str(tmp_path / "a.lam")
    assert 0 == main(["create", img, "4M"])
    assert 0 == main(["io", img, "-c", "write -P 0x5a 1M 4k"])
    assert 0 == main(["convert", "-O", "raw", img, str(tmp_path / "a.raw")])
    capsys.readouterr()
    assert ours(capsys, img, str(tmp_path / "a.raw")) == (0, "Images are identical.\n")
    assert 0 == main(["io", img, "-c", "write -P 0x5b 3M 512"])
    capsys.readouterr()
    import json
    code, out = ours(capsys, "--output", "json", img, str(tmp_path / "a.raw"))
    assert code == 1 and json.loads(out) == {"identical": False, "size-a": 4 * MiB, "size-b": 4 * MiB,
                                             "reason": "content", "offset": 3 * MiB}


def test_strict_mode_tells_allocation_apart(tmp_path, capsys):
    a = raw(tmp_path / "a", MiB)
    b = raw(tmp_path / "b", MiB, {8192: bytes(4096)})  # zeros written: allocated, reading the same
    assert ours(capsys, "-f", "raw", "-F", "raw", a, b) == (0, "Images are identical.\n")
    code, out = ours(capsys, "-s", "-f", "raw", "-F", "raw", a, b)
    assert code == 1 and out.startswith("Strict mode: Offset ") and "block status mismatch!" in out


def test_errors_exit_2_on_one_line(tmp_path, capsys):
    a = raw(tmp_path / "a", MiB)
    assert main(["compare", a, str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err
    assert main(["compare", a, str(tmp_path / "a.lam") + "@nosnap"]) == 2
