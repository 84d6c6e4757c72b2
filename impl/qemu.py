"""Images of QEMU's formats (qcow2, VMDK, VHDX, VDI, ...) read and written through `qemu-nbd`, directly.

`qemu-nbd` (Debian's `qemu-utils`) exports the foreign image on a Unix
socket in a private temporary directory; `nbdclient.NbdClient` reads and
writes it.  No temporary raw copy is made, and block status keeps holes
sparse.  The server runs in its own process group (a Ctrl-C reaches only
`lamina`, which then stops it in order), dies with its parent
(`PR_SET_PDEATHSIG`), and is stopped and its directory removed on every
exit path.  Without `-t` it exits by itself after the one client leaves,
which is how a written target is closed cleanly.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Iterator

from lamina.spec.errors import LaminaError

from .nbdclient import NbdClient

#: Formats told apart by their first bytes (QEMU's own probes); anything else is raw or Lamina.
MAGICS = ((0, b"QFI\xfb", "qcow2"), (0, b"KDMV", "vmdk"), (0, b"# Disk DescriptorFile", "vmdk"),
          (0, b"vhdxfile", "vhdx"), (0x40, b"\x7f\x10\xda\xbe", "vdi"), (0, b"conectix", "vpc"),
          (0, b"QFI\x00", "qed"))
START_TIMEOUT = 20.0


class QemuUnavailable(LaminaError):
    """A foreign format needs qemu-img/qemu-nbd, which are not installed."""


class QemuError(LaminaError):
    """qemu-img or qemu-nbd failed on an image."""


def probe_format(path: str) -> str | None:
    """The QEMU format a file's first bytes name, or None."""
    from .osfile import OsStorage

    try:
        file = OsStorage().open(path, writable=False, follow_symlinks=True)  # the guarded open: a FIFO never blocks
    except (OSError, LaminaError):
        return None  # the reader that opens it next names the problem
    try:
        head = file.pread(0, 0x44)
    finally:
        file.close()
    for offset, magic, name in MAGICS:
        if head[offset : offset + len(magic)] == magic:
            return name
    return None


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise QemuUnavailable(f"{name} is needed for formats other than raw and lamina; install it "
                              "(Debian package qemu-utils)")
    return found


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        name = os.path.basename(argv[0])
        message = " ".join((done.stderr or done.stdout).strip().splitlines()) or f"exit {done.returncode}"
        raise QemuError(f"{name}: {message.removeprefix(name + ': ')}")
    return done.stdout


def image_info(path: str, fmt: str) -> dict:
    """`qemu-img info --output=json` of a foreign image (its snapshots included)."""
    return json.loads(_run([tool("qemu-img"), "info", "-U", "-f", fmt, "--output=json", path]))


def create_image(path: str, fmt: str, size: int, options: str | None = None) -> None:
    _run([tool("qemu-img"), "create", "-q", "-f", fmt, *(["-o", options] if options else []), path, str(size)])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Export:
    """A foreign image served by a private `qemu-nbd`, with a connected client (`.client`): a context manager."""

    def __init__(self, path: str, fmt: str, writable: bool = False, snapshot_id: str | None = None) -> None:
        binary = tool("qemu-nbd")
        self._dir = tempfile.mkdtemp(prefix="lamina-nbd-")
        sock = os.path.join(self._dir, "sock")
        argv = [binary, "-f", fmt, "--socket", sock]
        # A target: written back, flushed once at the end; discards punch holes.  A source: read-only (no
        # O_DIRECT: a file system such as tmpfs refuses it).
        argv += ["--cache=writeback", "--discard=unmap"] if writable else ["-r"]
        if snapshot_id is not None:
            argv += ["-l", "snapshot.id=" + snapshot_id.replace(",", ",,")]
        argv.append(path)
        self._log = open(os.path.join(self._dir, "log"), "w+")
        self._proc: subprocess.Popen | None = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log, start_new_session=True,
            preexec_fn=_die_with_parent)
        self.client: NbdClient | None = None
        try:
            self.client = self._connect(sock, path)
        except BaseException:
            self.close()
            raise

    def _connect(self, sock: str, path: str) -> NbdClient:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                self._log.seek(0)
                message = " ".join(self._log.read().strip().splitlines()) or f"exit {self._proc.returncode}"
                raise QemuError(f"qemu-nbd could not serve {path}: {message}")
            if os.path.exists(sock):
                try:
                    return NbdClient(sock)
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise QemuError(f"qemu-nbd did not start serving {path} within {START_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def close(self) -> None:
        """Disconnect, let qemu-nbd close the image and exit (stop it if it does not), remove the directory."""
        try:
            if self.client is not None:
                client, self.client = self.client, None
                if client.busy and self._proc is not None and self._proc.poll() is None:
                    os.killpg(self._proc.pid, signal.SIGTERM)  # interrupted mid-request: stop, do not wait
                client.close()
            if self._proc is not None:
                proc, self._proc = self._proc, None
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.terminate()
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
        finally:
            self._log.close()
            shutil.rmtree(self._dir, ignore_errors=True)

    def abort(self) -> None:
        """Stop the server at once (an error or a signal in `lamina`)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
        self.close()

    def __enter__(self) -> "Export":
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise KeyboardInterrupt while a server runs, so every `finally` stops it and cleans up.

    (A SIGKILL cannot be caught: then `PR_SET_PDEATHSIG` ends the server, and only its empty directory stays.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def snapshots(info: dict) -> list[dict]:
    """Internal snapshots of a foreign image, oldest first (by date, then id)."""
    return sorted(info.get("snapshots", []),
                  key=lambda s: (s.get("date-sec", 0), s.get("date-nsec", 0), int(s["id"]) if s["id"].isdigit() else 0))


def iter_chunks(client: NbdClient, chunk: int) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of at most `chunk` bytes covering every range block status says may hold data."""
    for start, length in client.data_ranges():
        pos, end = start, start + length
        while pos < end:
            step = min(chunk - pos % chunk, end - pos)
            yield pos, step
            pos += step
