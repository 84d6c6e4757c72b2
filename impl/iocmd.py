"""`lamina io`: a qemu-io-like command runner over an open image.

Commands (offsets and lengths accept k/M/G suffixes):

    read [-P PATTERN] [-v] OFFSET LENGTH   read; with -P, fail unless every byte equals PATTERN
    write [-P PATTERN] [-z] [-u] OFFSET LENGTH
                                           write PATTERN (default 0xcd) bytes, or zeroes with -z
    discard OFFSET LENGTH                  drop a range (reads zero afterwards)
    flush                                  make every write so far durable
    truncate SIZE                          resize the guest disk
    info                                   print the virtual and cluster size

Reads and writes of any length stream in bounded chunks (`IO_CHUNK`), so
memory does not grow with the length asked for; the whole range is checked
against the virtual size before the first byte moves.
"""
from __future__ import annotations

import re
import time
from typing import TextIO

from lamina.spec.errors import InvalidArgument, PatternMismatch

from .image import Image
from .sizes import format_size, parse_size

DEFAULT_PATTERN = 0xCD
IO_CHUNK = 1 << 22  # (= 4 MiB) the most a read or write command holds in memory at once


def _parse_pattern(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise InvalidArgument(f"invalid pattern {text!r}: expected a byte such as 0xab") from None
    if not 0 <= value <= 0xFF:
        raise InvalidArgument(f"invalid pattern {text!r}: a pattern is one byte, 0 to 0xff")
    return value


def _split(args: list[str], flags: str, valued: str) -> tuple[dict[str, str | bool], list[str]]:
    """Single-letter options as qemu-io takes them: `-P 0xab`, `-z`."""
    if len(args) == 2 and not args[0].startswith("-") and not args[1].startswith("-"):
        return {}, args  # the common `OFFSET LENGTH`
    if len(args) == 4 and args[0] == "-P" and "P" in valued and not args[2].startswith("-") and not args[3].startswith("-"):
        return {"P": args[1]}, args[2:]  # and `-P PATTERN OFFSET LENGTH`
    opts: dict[str, str | bool] = {}
    rest = []
    it = iter(args)
    for arg in it:
        if arg.startswith("-") and len(arg) == 2 and arg[1] in flags + valued:
            if arg[1] in valued:
                value = next(it, None)
                if value is None:
                    raise InvalidArgument(f"option {arg} needs a value")
                opts[arg[1]] = value
            else:
                opts[arg[1]] = True
        else:
            rest.append(arg)
    return opts, rest


def _range(rest: list[str], command: str) -> tuple[int, int]:
    if len(rest) != 2:
        raise InvalidArgument(f"{command}: expected OFFSET LENGTH, got {' '.join(rest) or 'nothing'}")
    return parse_size(rest[0], "offset"), parse_size(rest[1], "length")


_SIZE_TEXT: dict[int, str] = {}  # format_size of the lengths seen: a script repeats a few lengths many times


def _done(out: TextIO, verb: str, length: int, offset: int, started: float) -> None:
    elapsed = max(time.perf_counter() - started, 1e-9)
    size = _SIZE_TEXT.get(length)
    if size is None:
        size = _SIZE_TEXT[length] = format_size(length)
    out.write(f"{verb} {length}/{length} bytes at offset {offset}\n{size}, 1 ops; {elapsed:.4f} sec "
              f"({format_size(int(length / elapsed))}/sec and {1 / elapsed:.2f} ops/sec)\n")


def _hexdump(out: TextIO, offset: int, data: bytes) -> None:
    for i in range(0, len(data), 16):
        row = data[i : i + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        out.write(f"{offset + i:08x}:  {' '.join(f'{b:02x}' for b in row):<47}  {text}\n")


def _chunks(image: Image, offset: int, length: int) -> range:
    """Chunk starts over a range; a range reaching past the image is refused whole, before any byte moves."""
    image._check_range(offset, length)
    return range(offset, offset + length, IO_CHUNK)


_FILLED: dict[tuple[int, int], bytes] = {}  # (pattern, length) -> that many bytes of the pattern, for the shapes seen
_FILLED_BUDGET = 1 << 25  # (= 32 MiB) held at most: every pattern byte at 64 KiB, or a few whole IO_CHUNKs


def _filled(pattern: int, length: int) -> bytes:
    """`length` bytes of `pattern`, kept for the next command of the same shape."""
    data = _FILLED.get((pattern, length))
    if data is None:
        if sum(n for _, n in _FILLED) + length > _FILLED_BUDGET:
            _FILLED.clear()
        data = _FILLED[(pattern, length)] = bytes([pattern]) * length
    return data


def _read(image: Image, offset: int, length: int, pattern: int | None, out: TextIO | None) -> None:
    """Read in chunks: verify each against `pattern` (one memory compare), hex-dump each to `out`."""
    for pos in _chunks(image, offset, length):
        data = image.read(pos, min(IO_CHUNK, offset + length - pos))
        if pattern is not None and data != _filled(pattern, len(data)):
            differing = data.lstrip(bytes([pattern]))
            if differing:
                bad = len(data) - len(differing)
                raise PatternMismatch(
                    f"Pattern verification failed at offset {pos + bad}, {offset + length - pos - bad} bytes "
                    f"(expected {pattern:#04x}, found {data[bad]:#04x})")
        if out is not None:
            _hexdump(out, pos, data)


def _write_pattern(image: Image, offset: int, length: int, pattern: int) -> None:
    chunk = _filled(pattern, min(IO_CHUNK, length))
    for pos in _chunks(image, offset, length):
        image.write(pos, chunk[: offset + length - pos])


# Printable ASCII without quotes or backslashes: the only characters where shlex does anything but split on whitespace.
_PLAIN_LINE = re.compile(r"[ \t\r\n!#-&(-\[\]-~]*")


def split_words(line: str) -> list[str]:
    """The words of a command line as `shlex.split` makes them; a line without quoting takes `str.split` (ten times faster)."""
    if _PLAIN_LINE.fullmatch(line):
        return line.split()
    import shlex  # only for a line with quotes or backslashes

    return shlex.split(line)


def run_command(image: Image, line: str, out: TextIO) -> None:
    """Run one qemu-io-style command line against `image`."""
    try:
        words = split_words(line)
    except ValueError as exc:
        raise InvalidArgument(f"cannot parse command {line!r}: {exc}") from None
    if not words:
        return
    name, args = words[0], words[1:]
    started = time.perf_counter()
    if name == "read":
        opts, rest = _split(args, "v", "P")
        offset, length = _range(rest, name)
        pattern = _parse_pattern(str(opts["P"])) if "P" in opts else None
        _read(image, offset, length, pattern, out if opts.get("v") else None)
        _done(out, "read", length, offset, started)
    elif name == "write":
        opts, rest = _split(args, "zu", "P")
        offset, length = _range(rest, name)
        if opts.get("z"):
            image.write_zeroes(offset, length)
        elif opts.get("u"):
            raise InvalidArgument("write: -u (unmap) goes with -z")
        else:
            pattern = _parse_pattern(str(opts["P"])) if "P" in opts else DEFAULT_PATTERN
            _write_pattern(image, offset, length, pattern)
        _done(out, "wrote", length, offset, started)
    elif name == "discard":
        offset, length = _range(args, name)
        image.discard(offset, length)
        _done(out, "discard", length, offset, started)
    elif name == "flush":
        if args:
            raise InvalidArgument("flush takes no arguments")
        image.flush()
    elif name == "truncate":
        if len(args) != 1:
            raise InvalidArgument("truncate: expected SIZE")
        image.resize(parse_size(args[0]))
    elif name == "info":
        out.write(f"virtual size: {image.virtual_size}\ncluster size: {image.cluster_size}\n")
    else:
        raise InvalidArgument(f"unknown command {name!r}; known: read, write, discard, flush, truncate, info")

