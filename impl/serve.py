"""`lamina serve`: an image as an NBD export, through nbdkit and its Python plugin (`nbdkit_plugin.py`).

nbdkit runs in the foreground as a child of this process, and it is the
one that opens the image (in the plugin's `get_ready`, so the lock is
taken before a client can connect) and closes it.  On SIGINT or SIGTERM,
nbdkit is told to stop and the plugin, through a pipe, to close the image
at once, after the request in progress: connected clients are cut off
(nbdkit alone would wait for them to leave), everything acknowledged is
flushed, and `serve` returns 0.  If this process dies, the pipe closes
and the plugin closes the image the same way.  What went wrong inside the server (the image missing or
locked, a Python that cannot import lamina) comes back through a status
file and is raised here as the same named error.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Callable

from lamina.spec import errors as spec_errors
from lamina.spec.errors import InvalidArgument, LaminaError

from .layers import parse_target

PLUGIN = Path(__file__).with_name("nbdkit_plugin.py")
READY_TIMEOUT = 60.0  # seconds for nbdkit to open the image and listen (a writable open recovers first)
DEFAULT_PORT = 10809  # the NBD port
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with its NUL


class ServerUnavailable(LaminaError):
    """nbdkit, its Python plugin or its limit filter is missing, or its Python cannot import lamina."""


class ServerFailed(LaminaError):
    """nbdkit did not start, or stopped without closing the image (it was killed, or crashed)."""


def check_nbdkit() -> None:
    """Refuse early, naming the Debian package, if nbdkit or its Python plugin is not installed."""
    if shutil.which("nbdkit") is None:
        raise ServerUnavailable("nbdkit is not installed: lamina serve exports through it (Debian: nbdkit)")
    done = subprocess.run(["nbdkit", "--dump-plugin", "python"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, errors="replace", env=server_env())
    if done.returncode != 0:
        raise ServerUnavailable("nbdkit's Python plugin is not installed (Debian: nbdkit-plugin-python): "
                                + ((done.stderr.strip().splitlines() or [""])[-1])[:200])


def server_env() -> dict[str, str]:
    """nbdkit embeds the system Python: a virtual environment must not reach it, neither by its variables nor
    by PATH (the embedded interpreter looks `python3` up on PATH and, found in a venv's `bin`, adopts that venv),
    so that it sees exactly its own packages and the `paths=` it is given, whatever shell started `lamina`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    entries = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(e for e in entries if not os.path.isfile(os.path.join(e, os.pardir, "pyvenv.cfg")))
    return env


def package_paths() -> list[str]:
    """This interpreter's package directories (not its standard library), for the plugin to import lamina from."""
    stdlib = [os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")]
    here = os.path.realpath(os.getcwd())
    out = []
    for entry in sys.path:
        real = os.path.realpath(entry) if entry else here
        inside_stdlib = any(real == s or real.startswith(s + os.sep) for s in stdlib) and "site-packages" not in real
        if real != here and not inside_stdlib and os.path.isdir(real) and entry not in out:
            out.append(entry)
    return out


def serve(target: str, socket: str | None = None, port: int | None = None, bind: str = "127.0.0.1",
          readonly: bool = False, shared: int = 1, allow_bases: tuple[str, ...] = (), pid_file: str | None = None,
          announce: Callable[[str], None] = print) -> int:
    """Export `target` until SIGINT or SIGTERM; return 0 once the image is flushed and closed.

    `shared` is the number of clients at once (0: no limit), as qemu-nbd's
    `--shared`; a snapshot (`IMAGE@SNAP`) is always exported read-only.
    """
    if shared < 0:
        raise InvalidArgument(f"--shared {shared}: the number of clients must be 0 (no limit) or more")
    if socket is not None and port is not None:
        raise InvalidArgument("--socket and --port exclude each other")
    if socket is not None and len(os.fsencode(os.path.abspath(socket))) > MAX_SOCKET_PATH:
        raise InvalidArgument(f"{socket}: too long for a Unix socket (at most {MAX_SOCKET_PATH} bytes)")
    if socket is None and port is None:
        port = DEFAULT_PORT
    if port is not None and not 0 < port < 65536:
        raise InvalidArgument(f"--port {port}: not a TCP port")
    exported_readonly = readonly or parse_target(target)[1] is not None
    check_nbdkit()
    if socket is not None:
        _remove_stale_socket(socket)
    scratch = tempfile.mkdtemp(prefix="lamina-serve-")
    try:
        status = os.path.join(scratch, "status")
        pidfile = os.path.abspath(pid_file) if pid_file else os.path.join(scratch, "nbdkit.pid")
        if os.path.lexists(pidfile):
            os.unlink(pidfile)  # readiness is its appearance
        where = ["-U", os.path.abspath(socket)] if socket is not None else ["-p", str(port), "-i", bind]
        argv = ["nbdkit", "-f", "--exit-with-parent", "-P", pidfile, "--filter=limit", *where,
                *(["-r"] if exported_readonly else []), "python", str(PLUGIN), f"target={target}",
                f"readonly={int(exported_readonly)}", f"allow={json.dumps(list(allow_bases))}",
                f"paths={json.dumps(package_paths())}", f"status={status}", f"limit={shared}"]  # stopfd= added by _run
        uri = f"nbd+unix:///?socket={os.path.abspath(socket)}" if socket is not None else f"nbd://{bind}:{port}/"
        with open(os.path.join(scratch, "nbdkit.err"), "w+b") as errors:
            return _run(argv, target, uri, exported_readonly, status, pidfile, errors, announce)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if socket is not None:
            try:
                _remove_stale_socket(socket)  # nbdkit leaves its socket file behind
            except (InvalidArgument, OSError):
                pass


def _run(argv: list[str], target: str, uri: str, readonly: bool, status: str, pidfile: str, errors,
         announce: Callable[[str], None]) -> int:
    stop_read, stop_write = os.pipe()  # a byte, or this end closing, tells the plugin to close the image now
    try:
        server = subprocess.Popen([*argv, f"stopfd={stop_read}"], stdin=subprocess.DEVNULL, stdout=errors,
                                  stderr=errors, env=server_env(), pass_fds=(stop_read,))
    finally:
        os.close(stop_read)
    stopping = []

    def stop(signum: int, frame: object) -> None:
        if not stopping and server.poll() is None:
            server.send_signal(signal.SIGTERM)  # no new connections
            try:
                os.write(stop_write, b"x")  # and the image closed, connected clients or not
            except OSError:
                pass
        stopping.append(signum)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    served = False
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while not (os.path.exists(pidfile) and os.path.getsize(pidfile) > 0):
            if server.poll() is not None or stopping:
                break
            if time.monotonic() > deadline:
                server.kill()
                break
            time.sleep(0.02)
        else:
            served = True
            announce(f"Serving {target} {'read-only' if readonly else 'read-write'} at {uri}")
        returncode = _wait(server)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(stop_write)
    lines = _status_lines(status)
    for line in lines:
        if "error" in line:
            _raise_reported(line)
    errors.seek(0)
    last = (errors.read().decode(errors="replace").strip().splitlines() or ["no message"])[-1][:300]
    closed = any(line.get("closed") for line in lines)
    opened = any(line.get("ready") for line in lines)
    if not served and not (stopping and (closed or not opened)):
        raise ServerFailed(f"nbdkit did not start serving {target} (exit {returncode}): {last}")
    if opened and not closed:
        raise ServerFailed(f"nbdkit stopped (exit {returncode}) without closing {target}: the next writable open "
                           f"recovers it; nbdkit said: {last}")
    return 0


def _remove_stale_socket(path: str) -> None:
    """A socket file no server listens on (left by a killed server) is removed; a live one is an error."""
    import socket as sockets
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise InvalidArgument(f"{path}: exists and is not a socket")
    probe = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return  # let nbdkit say what is wrong with it
    finally:
        probe.close()
    raise InvalidArgument(f"{path}: a server is already listening on this socket")


def _wait(server: subprocess.Popen) -> int:
    while True:
        try:
            return server.wait()
        except KeyboardInterrupt:  # a signal handler of another caller raising: keep waiting for the child
            continue


def _status_lines(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [json.loads(text) for text in fh if text.strip()]
    except FileNotFoundError:
        return []


def _raise_reported(line: dict) -> None:
    """Raise the error the plugin reported, as the same class where it is one of Lamina's."""
    if line.get("errno"):
        raise OSError(line["errno"], line.get("strerror") or line["message"], line.get("filename"))
    name, message = line["error"], line.get("message", "")
    cls = getattr(spec_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, LaminaError):
        raise cls(message)
    if name == ServerUnavailable.__name__:
        raise ServerUnavailable(message)
    raise ServerFailed(f"{name}: {message}")
