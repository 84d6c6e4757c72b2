"""nbdkit Python plugin for `lamina serve` (run by nbdkit, not imported): the callbacks, handed to `nbdexport.Export`.

nbdkit embeds the system Python, which does not see the environment
`lamina` runs in: `lamina serve` passes that environment's package
directories (`paths=`, JSON), added here with `site.addsitedir` (so the
`.pth` files of an editable install work) ahead of the system's own.
Parameters: `target=IMAGE[@SNAP]`, `readonly=0|1`, `allow=` (JSON list of
bases outside the image's directory), `status=FILE`, `stopfd=N`.

Into the status file go JSON lines `lamina serve` reads: `{"ready": ...}`
once the image is open (its lock taken), `{"error": ...}` when it could
not be opened or closed, `{"closed": true}` once it is flushed and closed.

nbdkit, told to stop, waits for its connected clients to leave; `lamina
serve` wants the image closed now.  So a thread waits on `stopfd` (a pipe
from `lamina serve`): when a byte arrives, or the pipe closes because
`lamina serve` is gone, it waits for the request in progress, closes the
image (flushed, intent list empty, lock given back) and ends the process.
"""
import json
import os
import site
import sys
import threading

import nbdkit

API_VERSION = 2

_config = {}
_state = {}  # "export": the one Export behind every connection
_lock = threading.Lock()  # one request at a time, and none once the image is closed (nbdkit serialises too)


def _status(**line):
    """Append one JSON line to the status file (one write; `lamina serve` reads it after nbdkit is ready or gone)."""
    fd = os.open(_config["status"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def _error(exc):
    """The status line of an exception, so that `lamina serve` raises the same named error."""
    fields = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, OSError):
        fields.update(errno=exc.errno, strerror=exc.strerror,
                      filename=None if exc.filename is None else os.fsdecode(exc.filename))
    _status(**fields)


def config(key, value):
    if key not in ("target", "readonly", "allow", "paths", "status", "stopfd"):
        raise RuntimeError(f"unknown parameter {key!r}: lamina serve passes target, readonly, allow, paths, status, "
                           "stopfd")
    _config[key] = value


def config_complete():
    for key in ("target", "status"):
        if key not in _config:
            raise RuntimeError(f"missing parameter {key}=")
    paths = json.loads(_config.get("paths", "[]"))
    before = list(sys.path)
    for path in paths:
        if os.path.isdir(path):
            site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + before  # the environment of `lamina` wins over the system's packages
    try:
        from lamina.impl import nbdexport
    except Exception as exc:
        _status(error="ServerUnavailable", message=f"nbdkit's Python {sys.version.split()[0]} cannot import lamina "
                f"from the paths lamina serve gave it: {type(exc).__name__}: {exc}")
        raise
    _state["module"] = nbdexport


def get_ready():
    try:
        export = _state["module"].Export.open(_config["target"], _config.get("readonly") == "1",
                                              tuple(json.loads(_config.get("allow", "[]"))))
    except Exception as exc:
        _error(exc)
        raise
    _state["export"] = export
    _status(ready=True, size=export.size(), writable=export.writable)


def after_fork():
    if "stopfd" in _config:
        threading.Thread(target=_stop_when_told, args=(int(_config["stopfd"]),), daemon=True).start()


def _stop_when_told(fd):
    try:
        orphaned = os.read(fd, 1) == b""  # a byte, or nothing once lamina serve is gone
    except OSError:
        orphaned = True
    try:
        cleanup()
    finally:
        if orphaned:
            _remove_scratch()
        os._exit(0)  # the connected clients see the connection close


def _remove_scratch():
    """lamina serve was killed: remove its scratch directory (the status file's), as its own exit would have."""
    directory = os.path.dirname(_config["status"])
    for name in ("status", "nbdkit.err", "nbdkit.pid"):
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass
    try:
        os.rmdir(directory)
    except OSError:
        pass


def cleanup():
    with _lock:
        export = _state.pop("export", None)
        if export is None:
            return
        try:
            export.close()
        except Exception as exc:
            _error(exc)
            raise
        _status(closed=True)


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS  # an Image is not thread-safe; see nbdexport


def open(readonly):
    return _state["export"]


def close(h):
    if h.writable:
        _call(h.flush)  # a client that goes away leaves nothing unflushed behind


def _call(method, *args):
    """Run a request; an error reaches the client with its errno (EIO unless known)."""
    with _lock:
        try:
            if "export" not in _state:
                raise _state["module"].ImageClosed("the image is closed: the server is stopping")
            return method(*args)
        except Exception as exc:
            nbdkit.set_error(_state["module"].errno_of(exc))
            raise


def get_size(h):
    return h.size()


def can_write(h):
    return h.writable


def can_flush(h):
    return h.can_flush


def can_fua(h):
    return nbdkit.FUA_NATIVE if h.writable else nbdkit.FUA_NONE


def can_trim(h):
    return h.can_zero


def can_zero(h):
    return h.can_zero


def can_fast_zero(h):
    return h.can_zero


def can_multi_conn(h):
    return h.can_multi_conn


def can_extents(h):
    return h.can_extents


def can_cache(h):
    return nbdkit.CACHE_NONE


def pread(h, buf, offset, flags):
    _call(h.pread, buf, offset)


def pwrite(h, buf, offset, flags):
    _call(h.pwrite, buf, offset, bool(flags & nbdkit.FLAG_FUA))


def flush(h, flags):
    _call(h.flush)


def trim(h, count, offset, flags):
    _call(h.trim, count, offset, bool(flags & nbdkit.FLAG_FUA))


def zero(h, count, offset, flags):
    _call(h.zero, count, offset, bool(flags & nbdkit.FLAG_MAY_TRIM), bool(flags & nbdkit.FLAG_FUA),
          bool(flags & nbdkit.FLAG_FAST_ZERO))


def extents(h, count, offset, flags):
    hole = nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
    return [(o, n, 0 if data else hole) for o, n, data in
            _call(h.extents, count, offset, bool(flags & nbdkit.FLAG_REQ_ONE))]

