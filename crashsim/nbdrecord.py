"""Record, at the block level, what programs write to an NBD export (`crashsim record --via nbd`, C6).

nbdkit serves one raw device file in the working directory on a Unix
socket, through `nbdplugin.py`, which logs every request it acknowledged
(write, flush, trim, zero; FUA as a flag).  Any NBD client (qemu-io,
qemu-img, nbdsh ...) runs against it; the log then becomes the trace's
ops on that one file: a write is a pwrite, a flush an fsync, a FUA request
the change then an fsync, a trim or zero a punched hole (it reads zero and
stays sparse).  There is no namespace: the device exists, at its size, in
the initial state, and nothing else changes.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .errors import CrashsimError
from .memstore import FSYNC, PUNCH, PWRITE, DiskState, Op
from .syscalls import ROOT, ProgramFailed, TraceError, prepare_directory, snapshot_directory

PLUGIN = Path(__file__).with_name("nbdplugin.py")
DEFAULT_DEVICE = "disk.raw"
READY_TIMEOUT = 15.0  # seconds for nbdkit to listen (it writes its pid file then)
STOP_TIMEOUT = 10.0
_SIZE = re.compile(r"^(\d+)\s*([kmgt]?)(?:i?b)?$", re.IGNORECASE)


class NbdkitUnavailable(CrashsimError):
    """nbdkit, its Python plugin or the recording plugin file is missing, or the server did not start (exit code 4)."""


def parse_size(text: str) -> int:
    """`16M`, `64k`, `1G`, `4096`: binary multiples (K = 1024); a positive multiple of 512."""
    match = _SIZE.match(text.strip())
    if not match:
        raise CrashsimError(f"--size {text!r}: not a size (a number with an optional K, M, G or T suffix)")
    size = int(match.group(1)) << (10 * " kmgt".index(match.group(2).lower() or " "))
    if size <= 0 or size % 512:
        raise CrashsimError(f"--size {text!r}: the device size must be a positive multiple of 512 bytes")
    return size


def check_nbdkit() -> None:
    """Refuse early, with the missing piece named, if nbdkit cannot run the recording plugin."""
    if shutil.which("nbdkit") is None:
        raise NbdkitUnavailable("nbdkit is not installed: it serves the device to the recorded program (Debian: nbdkit)")
    if not PLUGIN.is_file():
        raise NbdkitUnavailable(f"the recording plugin {PLUGIN.name} is missing from the crashsim package")
    done = subprocess.run(["nbdkit", "--dump-plugin", "python"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", env=_server_env())
    if done.returncode != 0:
        raise NbdkitUnavailable("nbdkit's Python plugin is not installed (Debian: nbdkit-plugin-python): "
                                + ((done.stderr.strip().splitlines() or [""])[-1])[:200])


def _server_env() -> dict[str, str]:
    """nbdkit embeds the system Python: a virtual environment's Python variables must not reach it."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def prepare_device(workdir: str, initial: str | None, device: str, size: int | None) -> str:
    """Make `workdir` (a copy of `initial`, if given) hold the device file: existing, or a new sparse one of `size`."""
    if not device or "/" in device or device in (".", ".."):
        raise CrashsimError(f"--device {device!r}: the device is a file name inside the directory, without '/'")
    prepare_directory(workdir, initial)
    path = os.path.join(workdir, device)
    if os.path.lexists(path):
        if not os.path.isfile(path) or os.path.islink(path):
            raise CrashsimError(f"{path}: the device must be a regular file")
        if size is not None and os.path.getsize(path) != size:
            raise CrashsimError(f"{path}: the device exists with {os.path.getsize(path)} bytes, not --size {size}")
    elif size is None:
        raise CrashsimError(f"{path}: no such device; give --size to make a new sparse one")
    else:
        with open(path, "wb") as fh:
            fh.truncate(size)
    return path


def _start_server(device: str, log: str, socket: str, pidfile: str, errors) -> subprocess.Popen:
    argv = ["nbdkit", "--exit-with-parent", "-f", "-U", socket, "-P", pidfile, "python", str(PLUGIN),
            f"file={device}", f"log={log}"]
    server = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=errors, stderr=errors, env=_server_env())
    deadline = time.monotonic() + READY_TIMEOUT
    while not (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0):
        if server.poll() is not None or time.monotonic() > deadline:
            _stop_server(server)
            errors.seek(0)
            last = (errors.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
            raise NbdkitUnavailable(f"nbdkit did not start serving {device}: {last[:200]}")
        time.sleep(0.02)
    return server


def _stop_server(server: subprocess.Popen) -> int:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    return server.returncode


def ops_from_log(log: str, inode: int) -> list[Op]:
    """The plugin's log as trace ops on the device's inode; a line that is not a request it writes is a TraceError."""
    ops: list[Op] = []
    with open(log, encoding="ascii") as fh:
        for number, text in enumerate(fh, start=1):
            try:
                line = json.loads(text)
                kind, offset, length = line["kind"], int(line["offset"]), int(line["length"])
                if kind == "write":
                    data = base64.b64decode(line["data"], validate=True)
                    if len(data) != length:
                        raise ValueError(f"{len(data)} bytes of data, length {length}")
                    ops.append(Op(PWRITE, inode, offset, data=data))
                elif kind in ("trim", "zero"):
                    ops.append(Op(PUNCH, inode, offset, length))
                elif kind != "flush":
                    raise ValueError(f"unknown request kind {kind!r}")
            except (ValueError, KeyError, TypeError) as exc:
                raise TraceError(f"{log} line {number}: not a request the recording plugin logs: {exc}") from None
            if kind == "flush" or line.get("fua"):
                ops.append(Op(FSYNC, inode))
    return ops


def record_nbd(argv: Sequence[str], workdir: str, initial: str | None = None, device: str = DEFAULT_DEVICE,
               size: int | None = None) -> tuple[DiskState, list[Op]]:
    """Serve DIR/DEVICE over NBD, run `argv` against it, return the starting state and the acknowledged ops.

    `{nbd}` in an argument becomes the export's URI (`nbd+unix:///?socket=PATH`),
    also in `$CRASHSIM_NBD` (the socket alone in `$CRASHSIM_NBD_SOCKET`).
    The program runs in the current directory: it reaches the device only
    through NBD.  The server is stopped whatever happens.
    """
    check_nbdkit()
    path = prepare_device(workdir, initial, device, size)
    base = snapshot_directory(workdir)
    inode = base.names[ROOT + "/" + device]
    with tempfile.TemporaryDirectory(prefix="crashsim-nbd-") as scratch:
        socket, log = os.path.join(scratch, "nbd.sock"), os.path.join(scratch, "requests.jsonl")
        if len(os.fsencode(socket)) >= 108:  # sun_path holds 108 bytes with its NUL
            raise NbdkitUnavailable(f"{socket}: too long for a Unix socket; set TMPDIR to a shorter directory")
        uri = f"nbd+unix:///?socket={socket}"
        command = [a.replace("{nbd}", uri) for a in argv]
        env = {**os.environ, "CRASHSIM_NBD": uri, "CRASHSIM_NBD_SOCKET": socket}
        with open(os.path.join(scratch, "nbdkit.err"), "w+b") as errors:
            server = _start_server(os.path.realpath(path), log, socket, os.path.join(scratch, "nbdkit.pid"), errors)
            try:
                done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, errors="replace")
            except OSError as exc:
                raise ProgramFailed(f"`{' '.join(argv)}`: cannot run it: {exc.strerror}") from None
            finally:
                returncode = _stop_server(server)
            if done.returncode != 0:
                last = done.stdout.strip().splitlines()[-1:] or [""]
                raise ProgramFailed(f"`{' '.join(argv)}` exited {done.returncode} against the NBD export: {last[0][:200]}")
            if returncode not in (0, -signal.SIGTERM):
                errors.seek(0)
                last = (errors.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1]
                raise NbdkitUnavailable(f"nbdkit exited {returncode} while serving {path}: {last[:200]}")
        ops = ops_from_log(log, inode) if os.path.exists(log) else []
    return base, ops
