"""nbdkit Python plugin: serve one raw file and log every acknowledged change (run by nbdkit, not imported).

`crashsim record --via nbd` starts `nbdkit python nbdplugin.py file=DEVICE
log=LOG`.  nbdkit embeds the system Python, so this file imports nothing
but the standard library and nbdkit's own module.  Each request that
changes the device (write, flush, trim, zero) is done on the file first and
then appended to LOG as one JSON line, with one unbuffered write, before
the reply goes out: the log holds exactly what the server acknowledged, in
the order it acknowledged it (all requests are serialised).

A FUA write, trim or zero is done natively: the change, then `fdatasync`
of the file; its line carries `"fua": true`.  Trim and zero both punch a
hole (the range reads zero and stays sparse); a file system that cannot
punch makes them fail with EOPNOTSUPP rather than write zeros silently.
"""
import base64
import ctypes
import errno
import json
import os

import nbdkit

API_VERSION = 2

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

_config = {}
_fds = {}  # "device", "log": file descriptors opened once, shared by every connection


def config(key, value):
    if key not in ("file", "log"):
        raise RuntimeError(f"unknown parameter {key!r}: this plugin takes file=DEVICE and log=LOG")
    _config[key] = value


def config_complete():
    missing = [k for k in ("file", "log") if k not in _config]
    if missing:
        raise RuntimeError(f"missing parameter {missing[0]}=")


def get_ready():
    _fds["device"] = os.open(_config["file"], os.O_RDWR)
    _fds["log"] = os.open(_config["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return 1


def get_size(h):
    return os.fstat(_fds["device"]).st_size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return False


def can_multi_conn(h):
    return False


def _log(kind, offset=0, length=0, data=None, fua=False):
    """Append one line; `os.write` on an O_APPEND descriptor reaches the file before the reply is sent."""
    line = {"kind": kind, "offset": offset, "length": length}
    if data is not None:
        line["data"] = base64.b64encode(data).decode("ascii")
    if fua:
        line["fua"] = True
    text = (json.dumps(line, separators=(",", ":")) + "\n").encode("ascii")
    written = 0
    while written < len(text):
        written += os.write(_fds["log"], text[written:])


def pread(h, buf, offset, flags):
    view = memoryview(buf)
    done = 0
    while done < len(view):
        got = os.preadv(_fds["device"], [view[done:]], offset + done)
        if got == 0:
            raise OSError(errno.EIO, f"short read at {offset + done}")
        done += got


def pwrite(h, buf, offset, flags):
    data = bytes(buf)
    done = 0
    while done < len(data):
        done += os.pwrite(_fds["device"], data[done:], offset + done)
    fua = bool(flags & nbdkit.FLAG_FUA)
    if fua:
        os.fdatasync(_fds["device"])
    _log("write", offset, len(data), data, fua)


def flush(h, flags):
    os.fdatasync(_fds["device"])
    _log("flush")


def _punch(kind, count, offset, flags):
    if _libc.fallocate(_fds["device"], _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, count) != 0:
        code = ctypes.get_errno()
        nbdkit.set_error(code)
        raise OSError(code, f"{kind}: cannot punch a hole at {offset} length {count}: {os.strerror(code)}")
    fua = bool(flags & nbdkit.FLAG_FUA)
    if fua:
        os.fdatasync(_fds["device"])
    _log(kind, offset, count, None, fua)


def trim(h, count, offset, flags):
    _punch("trim", count, offset, flags)


def zero(h, count, offset, flags):
    _punch("zero", count, offset, flags)
