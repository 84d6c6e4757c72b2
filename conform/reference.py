"""The reference driver: the driver protocol (PROTOCOL.md) over `lamina.impl` and `lamina.spec.tree`.

    python -m lamina.conform.reference capabilities
    python -m lamina.conform.reference dump IMAGE[@SNAP] OUT
    python -m lamina.conform.reference check IMAGE
    python -m lamina.conform.reference apply IMAGE SCRIPT

`dump` and `check` open everything read-only and take no lock (nothing is
written, not even a lock record); `dump` reads the guest view through the
whole chain, `check` is the spec's `check_tree`.  Exit codes as the
protocol says.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

CAPABILITIES = ("dump", "check", "apply", "shared-clusters")  # the commands, then the format features read
USAGE = "usage: reference capabilities | dump IMAGE[@SNAP] OUT | check IMAGE | apply IMAGE SCRIPT"
COPY_CHUNK = 1 << 20


def _say(message: str) -> None:
    print(f"reference: {message}", file=sys.stderr)


def _is_invalid(exc: BaseException, top: str) -> bool:
    """Whether an error means the image (or a layer it needs) breaks a rule of the format: dump exit 2."""
    from lamina.impl.layers import SnapshotNotFound
    from lamina.spec.errors import ImageLocked, InvalidArgument, LaminaError

    if isinstance(exc, (SnapshotNotFound, InvalidArgument, ImageLocked)):
        return False
    if isinstance(exc, LaminaError):
        return True
    # A file the chain needs that cannot be opened is damage to the image; the image named itself missing is usage.
    return isinstance(exc, OSError) and os.path.lexists(top)


def dump(target: str, out: str, say: Callable[[str], None] = _say) -> int:
    from lamina.impl.layers import open_target, parse_target

    top, _ = parse_target(target)
    if not os.path.lexists(top):
        say(f"{top}: no such file")
        return 1
    try:
        image = open_target(target, readonly=True, force_share=True)
    except Exception as exc:  # noqa: BLE001 - every error is reported by its class, never a traceback
        say(f"{target}: {type(exc).__name__}: {exc}")
        return 2 if _is_invalid(exc, top) else 1
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        image.close()
        say(f"{out}: cannot create: {exc.strerror}")
        return 1
    try:
        size = image.virtual_size
        for lo, hi in image.guest_data_ranges():
            for pos in range(lo, hi, COPY_CHUNK):
                data = image.read(pos, min(COPY_CHUNK, hi - pos))
                if any(data):
                    os.pwrite(fd, data, pos)
        os.ftruncate(fd, size)
        return 0
    except Exception as exc:  # noqa: BLE001
        say(f"{target}: {type(exc).__name__}: {exc}")
        return 2 if _is_invalid(exc, top) else 1
    finally:
        os.close(fd)
        image.close()


def check(path: str) -> int:
    from lamina.impl.osfile import OsStorage
    from lamina.spec.tree import check_tree

    if not os.path.lexists(path):
        _say(f"{path}: no such file")
        return 1
    try:
        report = check_tree(path, OsStorage())
    except Exception as exc:  # noqa: BLE001
        _say(f"{path}: check could not be completed: {type(exc).__name__}: {exc}")
        return 1
    for finding in report.findings:
        print(f"{finding.kind}: {' '.join(finding.message.split())}")
    return report.exit_code


def apply(path: str, script_path: str) -> int:
    from lamina.spec.errors import LaminaError

    from .script import apply_script, parse_script

    try:
        with open(script_path, encoding="utf-8") as fh:
            commands = parse_script(fh.read(), script_path)
        apply_script(path, commands)
    except (LaminaError, OSError) as exc:
        _say(f"{type(exc).__name__}: {exc}")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"capabilities": 0, "dump": 2, "check": 1, "apply": 2}
    if not args or args[0] not in commands or len(args) != commands[args[0]] + 1:
        _say(USAGE)
        return 1
    if args[0] == "capabilities":
        print(" ".join(CAPABILITIES))
        return 0
    return {"dump": dump, "check": check, "apply": apply}[args[0]](*args[1:])


if __name__ == "__main__":
    sys.exit(main())
