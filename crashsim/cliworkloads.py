"""Crash tests of the real `lamina` command at the system-call level.

A workload is a list of `lamina` invocations, each recorded under strace
(`syscalls.record`) in one directory, with what its success promises: the
byte ranges that read a pattern once it has returned.  Every crash state of
the concatenated trace is written out as a directory and judged in-process
(the CLI's `main` on the real OS backend, no 0.35 s start-up per state):

1. `lamina check TOP` read-only, before anything repairs: exit 0 or 3
   (a crash may leave leaks or pending work, never corruption);
2. a writable open, `lamina io TOP -c 'read 0 512'`: exit 0 (recovery);
3. `lamina check TOP`: exit 0;
4. every 512 B sector of a range a returned invocation promised reads its
   pattern (read through `open_target`, as `lamina io -r REF` does); while
   the crash interrupts an invocation, a range it rewrites reads anything
   (old, new or a torn sector's garbage, as crashsim's oracle allows; the
   read-back check of the sectors is the next invocation's), and a range it
   removes (a deleted snapshot) may be gone or must read its old pattern.

A top that no returned invocation has promised anything about may be absent
(a crash before `create` renamed it into place).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Sequence

import attrs

from .errors import UnknownControl, UnknownWorkload
from .explore import Budget
from .memstore import DiskState
from .syscalls import ProgramFailed, Recorder, TraceResult, compare_with_directory, explore_trace, record, \
    snapshot_directory

Key = tuple[str, int, int]  # (image or IMAGE@SNAP, offset, length)


@attrs.frozen
class Step:
    """One `lamina` invocation and what it promises once it returns (pattern None: the range is no longer promised)."""

    argv: tuple[str, ...]
    promises: tuple[tuple[Key, int | None], ...] = ()


@attrs.frozen
class CliWorkload:
    name: str
    tops: tuple[str, ...]  # writable images, recovered and checked in this order
    steps: tuple[Step, ...]


def _step(*argv: str, p: tuple[tuple[Key, int | None], ...] = ()) -> Step:
    return Step(tuple(argv), p)


K = 1024
SECTOR = 512
_CREATE = ("create", "--cluster-size", "4k")
CLI_WORKLOADS = {w.name: w for w in (
    CliWorkload("create-write", ("img.lam",), (
        _step(*_CREATE, "img.lam", "1M", p=((("img.lam", 0, 8 * K), 0), (("img.lam", 64 * K, 4 * K), 0))),
        _step("io", "img.lam", "-c", "write -P 0xab 0 8k", "-c", "flush", "-c", "write -P 0xcd 64k 4k",
              p=((("img.lam", 0, 8 * K), 0xAB), (("img.lam", 64 * K, 4 * K), 0xCD))),
        _step("io", "img.lam", "-c", "write -P 0x11 0 8k", "-c", "flush", p=((("img.lam", 0, 8 * K), 0x11),)),
    )),
    CliWorkload("snapshot", ("img.lam",), (
        _step(*_CREATE, "img.lam", "1M"),
        _step("io", "img.lam", "-c", "write -P 0xab 0 8k", "-c", "flush", p=((("img.lam", 0, 8 * K), 0xAB),)),
        _step("snapshot", "create", "img.lam", "s1", p=((("img.lam@s1", 0, 8 * K), 0xAB),)),
        _step("io", "img.lam", "-c", "write -P 0xcd 4k 4k", "-c", "flush",
              p=((("img.lam", 0, 4 * K), 0xAB), (("img.lam", 4 * K, 4 * K), 0xCD), (("img.lam", 0, 8 * K), None))),
        _step("snapshot", "delete", "img.lam", "s1", p=((("img.lam@s1", 0, 8 * K), None),)),
    )),
    CliWorkload("clone", ("img.lam", "clone.lam"), (
        _step(*_CREATE, "img.lam", "1M"),
        _step("io", "img.lam", "-c", "write -P 0xab 0 8k", "-c", "flush", p=((("img.lam", 0, 8 * K), 0xAB),)),
        _step("snapshot", "create", "img.lam", "s1"),
        _step("clone", "img.lam", "s1", "clone.lam", p=((("clone.lam", 0, 8 * K), 0xAB),)),
        _step("io", "clone.lam", "-c", "write -P 0xee 0 8k", "-c", "flush", p=((("clone.lam", 0, 8 * K), 0xEE),)),
    )),
    CliWorkload("shrink", ("img.lam",), (  # data past the new size stays readable until the new size is durable
        _step(*_CREATE, "img.lam", "1M"),
        _step("io", "img.lam", "-c", "write -P 0xab 0 8k", "-c", "write -P 0xcd 600k 8k", "-c", "flush",
              p=((("img.lam", 0, 8 * K), 0xAB), (("img.lam", 600 * K, 8 * K), 0xCD))),
        _step("resize", "--shrink", "img.lam", "300k", p=((("img.lam", 600 * K, 8 * K), None),)),
        _step("resize", "img.lam", "1M", p=((("img.lam", 600 * K, 8 * K), 0),)),
    )),
    CliWorkload("commit", ("over.lam",), (
        _step(*_CREATE, "base.lam", "1M"),
        _step("io", "base.lam", "-c", "write -P 0xab 0 8k", "-c", "flush", p=((("base.lam", 0, 8 * K), 0xAB),)),
        _step(*_CREATE, "-b", "base.lam", "over.lam", p=((("over.lam", 0, 8 * K), 0xAB),)),
        _step("io", "over.lam", "-c", "write -P 0xcd 4k 4k", "-c", "flush",
              p=((("over.lam", 0, 4 * K), 0xAB), (("over.lam", 4 * K, 4 * K), 0xCD), (("over.lam", 0, 8 * K), None))),
        _step("commit", "over.lam", p=((("base.lam", 0, 4 * K), 0xAB), (("base.lam", 4 * K, 4 * K), 0xCD),
                                       (("base.lam", 0, 8 * K), None))),
    )),
)}

# Broken variants of the recorded process (negative controls), injected through a `sitecustomize` on its
# PYTHONPATH: the checker runs the real implementation on the states they leave.
RECORD_CONTROLS = {
    "skip-dir-fsync": "from lamina.impl.osfile import OsStorage\n"
                      "OsStorage.fsync_dir = lambda self, path: None  # names stay in the page cache\n",
    "skip-file-fsync": "from lamina.impl.osfile import OsFile\n"
                       "OsFile.fsync = lambda self: None  # a flush returns with its data in the page cache\n",
    "shrink-cut-first": "from lamina.impl.image import Image\n"
                        "_resize = Image.resize\n"
                        "def _cut_first(self, size):  # the file is cut before the root records the smaller size\n"
                        "    if size < self.virtual_size:\n"
                        "        self.file.truncate(self.geometry.with_virtual_size(size).file_length)\n"
                        "    _resize(self, size)\n"
                        "Image.resize = _cut_first\n",
}


def get_cli_workload(name: str) -> CliWorkload:
    try:
        return CLI_WORKLOADS[name]
    except KeyError:
        raise UnknownWorkload(f"unknown lamina trace workload {name!r}; known: {', '.join(CLI_WORKLOADS)}") from None


def promises_after(workload: CliWorkload) -> list[dict[Key, int]]:
    """The promises in force after each step returned (index 0: before any)."""
    out: list[dict[Key, int]] = [{}]
    for step in workload.steps:
        now = dict(out[-1])
        for key, pattern in step.promises:
            if pattern is None:
                now.pop(key, None)
            else:
                now[key] = pattern
        out.append(now)
    return out


@attrs.frozen
class Recording:
    workload: CliWorkload
    base: DiskState  # the empty directory
    ops: tuple
    ends: tuple[int, ...]  # ops issued when each step returned


def record_workload(workload: CliWorkload, control: str | None = None) -> Recording:
    """Run every step of `workload` under strace in a fresh directory (through a broken variant if `control`)."""
    if control is not None and control not in RECORD_CONTROLS:
        raise UnknownControl(f"unknown trace control {control!r}; known: {', '.join(RECORD_CONTROLS)}")
    with tempfile.TemporaryDirectory(prefix="crashsim-lamina-") as scratch:
        workdir = os.path.join(scratch, "dir")
        os.mkdir(workdir)
        env = dict(os.environ)
        if control is not None:
            shim = os.path.join(scratch, "shim")
            os.mkdir(shim)
            with open(os.path.join(shim, "sitecustomize.py"), "w", encoding="utf-8") as fh:
                fh.write(RECORD_CONTROLS[control])
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [shim, env.get("PYTHONPATH")]))
        base = snapshot_directory(workdir)
        recorder: Recorder | None = None
        ends = []
        for step in workload.steps:
            try:
                recorder = record([sys.executable, "-m", "lamina.impl.cli", *step.argv], workdir, base, env, recorder)
            except ProgramFailed as exc:
                raise ProgramFailed(f"workload {workload.name}: {exc}") from None
            ends.append(len(recorder.ops))
        assert recorder is not None
        compare_with_directory(recorder.state, workdir)
    return Recording(workload, base, tuple(recorder.ops), tuple(ends))


def run_lamina(argv: Sequence[str]) -> tuple[int, str]:
    """The `lamina` command run in-process: its exit code and everything it printed (99: it raised)."""
    from lamina.impl.cli import main

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = main(list(argv))
    except Exception as exc:  # a traceback is a failure of the state, reported as one
        return 99, f"{type(exc).__name__}: {exc}"
    return code, out.getvalue()


def _lamina(argv: Sequence[str]) -> tuple[int, str]:
    """Run the `lamina` command in-process; (exit code, its first line of output: the finding or the error)."""
    code, text = run_lamina(argv)
    lines = text.strip().splitlines()
    return code, lines[0] if lines else ""


def _read_patterns(target: str, offset: int, length: int, patterns: set[int] | None) -> str | None:
    """None if the range can be read and every 512 B sector reads one of `patterns` (None: any bytes)."""
    from lamina.impl.layers import open_target
    from lamina.spec.errors import LaminaError

    try:
        with open_target(target, readonly=True) as image:
            data = image.read(offset, length)
    except (LaminaError, OSError) as exc:
        return f"cannot be read: {exc}"
    for at in range(0, length if patterns is not None else 0, SECTOR):
        sector = data[at : at + SECTOR]
        if sector.count(sector[0]) != len(sector) or sector[0] not in patterns:
            want = " or ".join(f"{p:#04x}" for p in sorted(patterns))
            return f"sector at {offset + at} should read {want}, reads {sector[:8].hex()}..."
    return None


def lamina_checker(recording: Recording, judge_before_recovery: bool = True):
    """The checker, the context function (which steps had returned) and the tally of read-only exit codes.

    With `judge_before_recovery` False the read-only check still runs on
    every state, and its exit codes are only counted (`tally`).
    """
    workload, ends = recording.workload, recording.ends
    after = promises_after(workload)
    tally: Counter[str] = Counter()

    def context(crash: int) -> tuple[int, bool]:
        done = sum(1 for e in ends if e <= crash)
        return done, crash in ends or crash == 0

    def check(where: str, crash: int) -> str | None:
        done, between = context(crash)
        # between steps: what the last returned one promised; inside step `done`: its promise before or after it
        allowed: dict[Key, set[int]] = {k: {v} for k, v in after[done].items()}
        optional: set[Key] = set()
        if not between:
            for key, pattern in after[done + 1].items():
                if key in allowed:
                    allowed[key].add(pattern)
            optional = set(allowed) - set(after[done + 1])
            for ref, offset, length in optional:  # a range restated in pieces: each piece's new pattern is allowed too
                allowed[(ref, offset, length)] |= {p for (r, o, n), p in after[done + 1].items()
                                                   if r == ref and o < offset + length and offset < o + n}
        for top in workload.tops:
            path = os.path.join(where, top)
            if not os.path.exists(path):
                if any(k[0].split("@")[0] == top for k in set(allowed) - optional):
                    return f"{top} is missing, though a returned `lamina` promised its contents"
                continue
            code, line = _lamina(["check", path])
            tally[f"exit {code}"] += 1
            if code not in (0, 3) and judge_before_recovery:
                return f"read-only `lamina check {top}` before recovery exited {code}: {line}"
            code, line = _lamina(["io", path, "-c", "read 0 512"])
            if code != 0:
                return f"writable open of {top} exited {code}: {line}"
            code, line = _lamina(["check", path])
            if code != 0:
                return f"`lamina check {top}` after recovery exited {code}: {line}"
        for (ref, offset, length), patterns in sorted(allowed.items()):
            # a range the interrupted step rewrites may hold a torn sector's garbage, as crashsim's oracle allows
            wrong = _read_patterns(os.path.join(where, ref), offset, length, None if len(patterns) > 1 else patterns)
            if wrong is not None and ((ref, offset, length) not in optional or wrong.startswith("sector")):
                return f"{ref} bytes {offset}+{length}: {wrong}"
        return None

    return check, context, tally


def run_cli_workloads(names: Sequence[str], models: Sequence[str], budget: Budget, seed: int = 0,
                      control: str | None = None, stop_at_first: bool = False, judge_before_recovery: bool = True
                      ) -> tuple[list[TraceResult], dict[str, Counter[str]], float]:
    """Record and explore each named workload.

    Returns the results per workload and model, the read-only check's exit
    codes per workload (each distinct state and top once), and the seconds.
    """
    started = time.perf_counter()
    results: list[TraceResult] = []
    tallies = {}
    for name in names:
        recording = record_workload(get_cli_workload(name), control)
        check, context, tallies[name] = lamina_checker(recording, judge_before_recovery)
        results += explore_trace(name, recording.base, recording.ops, models, budget, seed, check, context,
                                 stop_at_first=stop_at_first, variant=control)
    return results, tallies, time.perf_counter() - started
