"""Operation scripts (PROTOCOL.md, "Operation scripts"): parsing, applying to the reference, and the model's result.

The expected contents of a script vector come from the spec's model
(`lamina.spec.model`), not from the implementation, so the reference is
judged by the same expectation as any other writer.
"""
from __future__ import annotations

import re

import attrs

from lamina.spec import model
from lamina.spec.model import Disk

from .errors import ScriptError

_SUFFIXES = {"": 1, "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_ARGS = {"create": 2, "write": 3, "zero": 2, "discard": 2, "flush": 0, "resize": 1, "snapshot": 1}


@attrs.frozen
class Command:
    """One script line: its command, its arguments (numbers decoded, a snapshot name as text) and its line number."""

    name: str
    args: tuple[int | str, ...]
    line: int


def parse_number(text: str, where: str) -> int:
    match = re.fullmatch(r"(\d+)([kKMG]?)", text)
    if not match:
        raise ScriptError(f"{where}: {text!r} is not a number (decimal, optionally with k, M or G)")
    return int(match.group(1)) * _SUFFIXES[match.group(2)]


def parse_script(text: str, where: str = "script") -> list[Command]:
    """The commands of a script; the first must be `create`, and only there."""
    out: list[Command] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        at = f"{where} line {number}"
        name, *args = line.split()
        if name not in _ARGS:
            raise ScriptError(f"{at}: unknown command {name!r}; known: {', '.join(_ARGS)}")
        if len(args) != _ARGS[name]:
            raise ScriptError(f"{at}: {name} takes {_ARGS[name]} arguments, not {len(args)}")
        if (name == "create") != (not out):
            raise ScriptError(f"{at}: create must be the first command, and only the first")
        if name == "snapshot":
            values: tuple[int | str, ...] = (args[0],)
        elif name == "write":
            pattern = args[2]
            if not re.fullmatch(r"0x[0-9a-fA-F]{2}", pattern):
                raise ScriptError(f"{at}: pattern {pattern!r} is not a byte 0x00-0xff")
            values = (parse_number(args[0], at), parse_number(args[1], at), int(pattern, 16))
        else:
            values = tuple(parse_number(a, at) for a in args)
        out.append(Command(name, values, number))
    if not out:
        raise ScriptError(f"{where}: empty script: the first command must be create")
    return out


@attrs.frozen
class ScriptResult:
    """What a script leaves: the image's disk and each snapshot's disk, by name, in the order taken."""

    disk: Disk
    snapshots: tuple[tuple[str, Disk], ...]


def model_result(commands: list[Command]) -> ScriptResult:
    """The spec model's disk after the script: the contents every conforming writer must leave."""
    disk = model.empty_disk(int(commands[0].args[0]))
    snapshots: list[tuple[str, Disk]] = []
    for c in commands[1:]:
        if c.name == "write":
            offset, length, byte = c.args
            disk = model.write(disk, int(offset), bytes([int(byte)]) * int(length))
        elif c.name in ("zero", "discard"):
            disk = model.write_zeroes(disk, int(c.args[0]), int(c.args[1]))
        elif c.name == "resize":
            disk = model.resize(disk, int(c.args[0]))
        elif c.name == "snapshot":
            snapshots.append((str(c.args[0]), disk))
    return ScriptResult(disk, tuple(snapshots))


def apply_script(path: str, commands: list[Command]) -> None:
    """Create the image `path` and run the script on the reference implementation."""
    from lamina.impl.image import Image
    from lamina.impl.layers import create_snapshot

    size, cluster = (int(a) for a in commands[0].args)
    image = Image.create(path, size, cluster)
    try:
        for c in commands[1:]:
            if c.name == "write":
                offset, length, byte = (int(a) for a in c.args)
                image.write(offset, bytes([byte]) * length)
            elif c.name == "zero":
                image.write_zeroes(int(c.args[0]), int(c.args[1]))
            elif c.name == "discard":
                image.discard(int(c.args[0]), int(c.args[1]))
            elif c.name == "flush":
                image.flush()
            elif c.name == "resize":
                image.resize(int(c.args[0]))
            elif c.name == "snapshot":
                image.close()
                create_snapshot(path, str(c.args[0]))
                image = Image.open(path)
    finally:
        image.close()
