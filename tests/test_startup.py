"""Start-up of the `lamina` command: what the common commands import, and the one-command parser.

Start-up time is measured in bench/; here the guard is the set of modules a
command pulls in, which a stray top-level import changes at once.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from lamina.impl import cli
from lamina.impl.image import Image

_DUMP = ("import sys\nfrom lamina.impl.cli import main\nrc = main(sys.argv[2:])\n"
         "with open(sys.argv[1], 'w') as out:\n    out.write('\\n'.join(sorted(sys.modules)))\nsys.exit(rc)\n")

# Never needed to inspect an image: the simulator, the conformance kit, the test and proof tools,
# progress bars, JSON (unless asked for), child processes, shutil and its compression modules.
NOT_ON_THE_PATH = ("lamina.crashsim", "lamina.conform", "hypothesis", "z3", "tqdm", "rich", "json", "subprocess",
                   "shutil", "bz2", "lzma", "dask", "concurrent", "multiprocessing", "tempfile",
                   # nor what the standard library loads for uuids, hashes, paths, sockets, logging or libraries
                   # looked up by name (`ctypes.util.find_library` forks `ldconfig`)
                   "ctypes", "uuid", "hashlib", "pathlib", "importlib.metadata", "zipfile", "socket", "selectors",
                   "signal", "email", "urllib", "pickle", "datetime", "decimal", "logging", "asyncio", "textwrap",
                   "random", "shlex", "numpy")


def modules_of(tmp_path, *argv: str) -> set[str]:
    """The modules loaded by `lamina ARGV`, less those the interpreter loads for any `python -c`."""
    out, base = tmp_path / "modules.txt", tmp_path / "base.txt"
    done = subprocess.run([sys.executable, "-c", _DUMP, str(out), *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 3), done.stderr
    subprocess.run([sys.executable, "-c", "import sys\nwith open(sys.argv[1], 'w') as out: out.write('\\n'.join(sys.modules))",
                    str(base)], check=True, timeout=120)
    return set(out.read_text().split()) - set(base.read_text().split())


def unwanted(modules: set[str], allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(m for m in modules for bad in NOT_ON_THE_PATH
                  if (m == bad or m.startswith(bad + ".")) and bad not in allowed)


@pytest.mark.parametrize("command", [["info"], ["check"], ["map"], ["map", "--metadata"], ["snapshot", "list"]])
def test_inspecting_commands_import_only_what_they_need(tmp_path, command):
    path = str(tmp_path / "disk.lam")
    with Image.create(path, 1 << 20) as image:
        image.write(0, b"\xab" * 4096)
    modules = modules_of(tmp_path, *command, path)
    assert "lamina.impl.cli" in modules and "lamina.impl.image" in modules  # the dump saw the command's imports
    assert unwanted(modules) == []
    assert ("lamina.spec.check" in modules) == (command == ["check"])  # the checker is check's alone
    assert ("mmap" in modules) == (command == ["check"])  # so is the mapping it reads data through, loaded when it maps


@pytest.mark.parametrize("direction", ["to raw", "from raw"])
def test_convert_between_native_formats_starts_no_qemu_machinery(tmp_path, direction):
    """Lamina to raw and back need no qemu-nbd: the qemu module (child processes, sockets, JSON) stays unloaded."""
    path, raw = str(tmp_path / "disk.lam"), str(tmp_path / "disk.raw")
    with Image.create(path, 1 << 20) as image:
        image.write(0, b"\xab" * 4096)
    if direction == "to raw":
        modules = modules_of(tmp_path, "convert", "-O", "raw", path, raw)
    else:
        with open(raw, "wb") as f:
            f.write(b"\xcd" * 8192)
        modules = modules_of(tmp_path, "convert", "-f", "raw", raw, str(tmp_path / "new.lam"))
    assert "lamina.impl.convert" in modules
    # ctypes is convert's own: sync_file_range starts the write-back of what it copied (impl/osfile.py)
    assert "lamina.impl.qemu" not in modules and unwanted(modules, allowed=("ctypes",)) == []


@pytest.mark.parametrize("commands", [["read -P 0xab 0 4k", "read 4k 4k"], ["write -P 0x11 8k 4k", "flush", "write 0 512"]])
def test_io_of_plain_commands_imports_only_what_it_needs(tmp_path, commands):
    path = str(tmp_path / "disk.lam")
    with Image.create(path, 1 << 20) as image:
        image.write(0, b"\xab" * 4096)
    modules = modules_of(tmp_path, "io", *(a for c in commands for a in ("-c", c)), path)
    assert "lamina.impl.iocmd" in modules  # the commands ran
    assert unwanted(modules) == []  # no shlex for lines without quotes either


def test_json_is_imported_for_json_output_only(tmp_path):
    path = str(tmp_path / "disk.lam")
    Image.create(path, 1 << 20).close()
    modules = modules_of(tmp_path, "info", "--output", "json", path)
    assert unwanted(modules) == ["json", "json.decoder", "json.encoder", "json.scanner"]
    assert unwanted(modules, allowed=("json",)) == []


ARGVS = [
    ["info", "disk.lam"], ["info", "--output", "json", "-U", "--tree", "disk.lam"], ["check", "--repair", "disk.lam"],
    ["map", "--metadata", "--output=json", "disk.lam"], ["snapshot", "create", "--vm-clock", "5", "disk.lam", "s"],
    ["snapshot", "list", "disk.lam"], ["convert", "-O", "raw", "-p", "a", "b"], ["io", "-r", "-f", "-", "disk.lam"],
    ["create", "--cluster-size", "4k", "-b", "base.raw", "disk.lam"], ["resize", "disk.lam", "+1G"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=lambda argv: " ".join(argv))
def test_the_one_command_parser_parses_as_the_whole_one(argv):
    assert vars(cli.parser_for(argv).parse_args(argv)) == vars(cli.build_parser().parse_args(argv))
    assert list(cli._commands(cli.parser_for(argv))) == [argv[0]]  # only the command run was built


@pytest.mark.parametrize("argv", [[], ["-h"], ["--version"], ["nosuch", "x"]])
def test_anything_but_a_command_gets_the_whole_parser(argv):
    assert set(cli._commands(cli.parser_for(argv))) == set(cli._commands(cli.build_parser()))


def test_usage_errors_and_help_are_those_of_the_whole_parser(capsys):
    for argv in (["info"], ["snapshot", "nosuch"], ["map", "--output", "xml", "disk.lam"]):
        with pytest.raises(cli.UsageError) as one:
            cli.parser_for(argv).parse_args(argv)
        with pytest.raises(cli.UsageError) as whole:
            cli.build_parser().parse_args(argv)
        assert str(one.value) == str(whole.value)
    for argv in (["info", "-h"], ["snapshot", "create", "-h"]):
        texts = []
        for parser in (cli.parser_for(argv), cli.build_parser()):
            with pytest.raises(SystemExit):
                parser.parse_args(argv)
            texts.append(capsys.readouterr().out)
        assert texts[0] == texts[1] and texts[0].startswith("usage: lamina " + argv[0])
