"""Where a crash exploration runs: this process, a local process pool, or a Dask distributed cluster.

`--executor ADDRESS` names it.  `local` (the default) keeps the process pool
of `--jobs` (in this process with `--jobs 1`); `dask://HOST:PORT` or
`tcp://HOST:PORT` connects a `distributed.Client` to a running scheduler and
hands its `concurrent.futures` executor to the runners.  `distributed` is
imported only for such an address, so the simulator does not need it
otherwise (`pip install -e '.[dask]'`).  The runners return their results in
task order whatever runs them, so every executor prints what `--jobs 1` does.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Iterator

from .errors import CrashsimError

LOCAL = "local"
DASK_SCHEMES = ("dask://", "tcp://")
CONNECT_TIMEOUT_S = 5.0


class ExecutorUnavailable(CrashsimError):
    """An `--executor` address is malformed, `distributed` is not installed, or its scheduler is not reachable
    or has no workers (exit code 9)."""

    exit_code = 9


def scheduler_address(address: str) -> str | None:
    """The `tcp://HOST:PORT` of a Dask scheduler an address names; None for `local`."""
    if address == LOCAL:
        return None
    for scheme in DASK_SCHEMES:
        if address.startswith(scheme):
            host, sep, port = address[len(scheme):].rpartition(":")
            if not host or not sep or not port.isdigit():
                raise ExecutorUnavailable(f"executor {address!r}: expected {scheme}HOST:PORT")
            return f"tcp://{host}:{port}"
    raise ExecutorUnavailable(f"executor {address!r}: expected `local`, dask://HOST:PORT or tcp://HOST:PORT")


@contextlib.contextmanager
def open_executor(address: str = LOCAL, jobs: int = 1, timeout: float | None = None) -> Iterator[Executor | None]:
    """The executor an address names, closed on exit; None means run in this process (`local` with one job)."""
    scheduler = scheduler_address(address)
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    if scheduler is None:
        if jobs <= 1:
            yield None
            return
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            yield pool
        return
    try:
        import distributed
    except ImportError:
        raise ExecutorUnavailable(f"executor {address!r} needs the `distributed` package: pip install 'lamina[dask]'") from None
    try:
        client = distributed.Client(scheduler, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ExecutorUnavailable(f"executor {address!r}: no Dask scheduler answered within {timeout:g} s "
                                  f"({type(exc).__name__})") from None
    try:
        try:  # a scheduler without workers would hold every task, and the command, forever
            client.wait_for_workers(1, timeout=timeout)
        except (OSError, TimeoutError):
            raise ExecutorUnavailable(f"executor {address!r}: the scheduler has no workers (none joined within "
                                      f"{timeout:g} s); start some with `dask worker {scheduler}`") from None
        # pure=False: every submission runs (no hashing of large arguments into task keys).
        executor = client.get_executor(pure=False)
        try:
            yield executor
        finally:
            executor.shutdown(wait=True)
    finally:
        client.close()
