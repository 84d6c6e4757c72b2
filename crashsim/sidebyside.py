"""Lamina and qcow2 under the same crash tests: the same workloads, recorder, models, explorer and verdicts.

Each workload is written once per format as a list of real invocations
(`qemu-img`/`qemu-io` on qcow2, the `lamina` command on Lamina), with what
each promises once it has returned.  The invocations run in one directory
under strace (`syscalls.record`), after a setup that is not recorded (it is
the durable start); the record must rebuild the directory's real files.
Every crash state the explorer yields under each model is written out as a
directory and judged by the same steps for both formats:

1. the format's checker, read-only, before anything repairs
   (`qemu-img check --output json`, `lamina check --output json`) on every
   image file of the workload: exit 2 is *corruption*, 3 *leaks* (their
   count from the JSON: qcow2's leaked clusters, Lamina's leaked ranges and
   degraded copies), 1 or no image at all *unopenable*;
2. a writable open of every top, as a VM's boot does (`qemu-io -c 'read 0
   512'`, `lamina io -c 'read 0 512'`): a failure is *unopenable*;
3. every image and snapshot the workload names, dumped with `convert -O
   raw`: every 512 B sector a returned invocation promised (written and
   flushed) must read its pattern, else *lost flushed data*; while an
   invocation runs, a sector it rewrites may read its old or new pattern;
4. a crash inside a management operation (snapshot create and delete,
   commit, clone) must leave every named image and snapshot as the real run
   left them just before it or just after it, all together, else
   *non-atomic*; at a point between invocations they must read as the real
   run left them then (else *lost flushed data*: a returned operation's
   result is gone).

`qemu-io`, `qemu-img commit` and `qemu-img convert` run with `-t writeback`
(a flush is an fdatasync, as Lamina's flush is an fsync); `qemu-img
create` and `snapshot` take no cache option and use QEMU's default,
writeback.  The Lamina side is judged in-process (the CLI's `main` on the
real backend), qcow2's by running the programs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from typing import Callable, Sequence

import attrs

from .cliworkloads import RECORD_CONTROLS, run_lamina
from .errors import CrashsimError, UnknownControl, UnknownWorkload
from .explore import Budget, Materialiser, Model, Plan
from .memstore import DiskState
from .syscalls import ProgramFailed, Recorder, compare_with_directory, judged_states, record, snapshot_directory

FORMATS = ("qcow2", "lamina")
KINDS = ("unopenable", "corruption", "leaks", "degraded", "lost", "non-atomic")  # what a state can show; "ok": none
# Leaks waste space and a stale redundant copy (Lamina's twin of a root or map) has a current twin: neither harms
# data, so both are counted, not failed.
FAILURES = ("unopenable", "corruption", "lost", "non-atomic")
DEFAULT_COMPARE_MODELS = ("strict", "reorder", "namespace")
SECTOR = 512
K = 1024
M = 1024 * K
DISK = "16M"
CLUSTER = "64k"
# Negative controls: `failing-check`, a checker that always reports corruption (every state with an image must then
# fail); and the broken `lamina` processes of `cliworkloads.RECORD_CONTROLS` (`skip-file-fsync`: a flush returns with
# its data in the page cache, so under `reorder` flushed sectors are lost), patched into the recorded Lamina steps only.
CONTROLS = ("failing-check", *RECORD_CONTROLS)


class MissingTool(CrashsimError):
    """A program the side-by-side needs (qemu-img, qemu-io, strace) is not installed."""


class UnknownFormat(CrashsimError):
    """A format `compare` does not know (exit code 6)."""

    exit_code = 6


@attrs.frozen
class Promise:
    """After its invocation returns, `ref` (IMAGE or IMAGE@SNAP) reads `pattern` over the range; None drops the ref."""

    ref: str
    offset: int = 0
    length: int = 0
    pattern: int | None = None


@attrs.frozen
class Step:
    argv: tuple[str, ...]
    promises: tuple[Promise, ...] = ()
    atomic: bool = False  # a management operation: a crash inside it leaves the before or the after view


@attrs.frozen
class Scenario:
    """One workload written for one format."""

    workload: str
    fmt: str
    setup: tuple[tuple[str, ...], ...]  # run before the record: the durable start
    initial: tuple[Promise, ...]  # what the setup left, in force from the start
    steps: tuple[Step, ...]
    images: tuple[str, ...]  # image files, checked read-only in this order
    tops: tuple[str, ...]  # opened writable (a boot) after the check
    views: tuple[str, ...]  # images and snapshots dumped whole for the atomicity and between-steps verdicts


# ---------------------------------------------------------------------------- the workloads, written per format
class _Cmd:
    """The command lines of one format, so that a workload is written once for both."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.ext = "qcow2" if fmt == "qcow2" else "lam"
        self.lamina = (sys.executable, "-m", "lamina.impl.cli")

    def name(self, stem: str) -> str:
        return f"{stem}.{self.ext}"

    def create(self, stem: str, base: str | None = None) -> tuple[str, ...]:
        img = self.name(stem)
        if self.fmt == "qcow2":
            backing = ("-b", self.name(base), "-F", "qcow2") if base else ()
            return ("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER}", *backing, img,
                    *(() if base else (DISK,)))
        backing = ("-b", self.name(base)) if base else ()
        return (*self.lamina, "create", "--cluster-size", CLUSTER, *backing, img, *(() if base else (DISK,)))

    def io(self, stem: str, *commands: str) -> tuple[str, ...]:
        cs = tuple(a for c in commands for a in ("-c", c))
        if self.fmt == "qcow2":
            return ("qemu-io", "-t", "writeback", "-f", "qcow2", *cs, self.name(stem))
        return (*self.lamina, "io", *cs, self.name(stem))

    def snapshot(self, action: str, stem: str, snap: str) -> tuple[str, ...]:
        if self.fmt == "qcow2":
            return ("qemu-img", "snapshot", {"create": "-c", "delete": "-d"}[action], snap, self.name(stem))
        return (*self.lamina, "snapshot", action, self.name(stem), snap)

    def commit(self, stem: str) -> tuple[str, ...]:
        if self.fmt == "qcow2":
            return ("qemu-img", "commit", "-q", "-t", "writeback", "-f", "qcow2", self.name(stem))
        return (*self.lamina, "commit", self.name(stem))

    def clone(self, stem: str, snap: str, new: str) -> tuple[str, ...]:
        if self.fmt == "qcow2":  # a new, independent, writable image holding the internal snapshot's contents
            return ("qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "qcow2", "-o", f"cluster_size={CLUSTER}",
                    "-l", f"snapshot.name={snap}", self.name(stem), self.name(new))
        return (*self.lamina, "clone", self.name(stem), snap, self.name(new))


def _w(c: _Cmd, stem: str, pattern: int, offset: int, length: int) -> tuple[str, Promise]:
    """A pattern write as a qemu-io command and the promise it makes once flushed."""
    return f"write -P {pattern:#04x} {offset} {length}", Promise(c.name(stem), offset, length, pattern)


def _io_step(c: _Cmd, stem: str, *writes: tuple[str, Promise]) -> Step:
    """One invocation: the writes, then a flush; it promises them once it returned."""
    return Step(c.io(stem, *(w for w, _ in writes), "flush"), tuple(p for _, p in writes))


def scenario(workload: str, fmt: str) -> Scenario:
    """The workload `workload` written for `fmt`."""
    if fmt not in FORMATS:
        raise UnknownFormat(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    try:
        build = WORKLOADS[workload]
    except KeyError:
        raise UnknownWorkload(f"unknown side-by-side workload {workload!r}; known: {', '.join(WORKLOADS)}") from None
    return build(_Cmd(fmt))


def _create(c: _Cmd) -> Scenario:
    img = c.name("img")
    made = Step(c.create("img"), (Promise(img, 0, 128 * K, 0), Promise(img, 15 * M, M, 0)))
    return Scenario("create", c.fmt, (), (), (made,), (img,), (img,), ())


def _allocate(c: _Cmd) -> Scenario:
    img = c.name("img")
    steps = (_io_step(c, "img", _w(c, "img", 0xA1, 0, 128 * K)),
             _io_step(c, "img", _w(c, "img", 0xA2, M, 64 * K), _w(c, "img", 0xA3, 4 * M + 32 * K, 192 * K)),
             _io_step(c, "img", _w(c, "img", 0xA4, 8 * M, 64 * K), _w(c, "img", 0xA5, 12 * M + 512, 4 * K)))
    return Scenario("allocate", c.fmt, (c.create("img"),), (Promise(img, 0, 128 * K, 0),), steps, (img,), (img,), ())


def _overwrite(c: _Cmd) -> Scenario:
    img = c.name("img")
    setup = (c.create("img"), c.io("img", "write -P 0xab 0 256k", "flush"))
    steps = (_io_step(c, "img", _w(c, "img", 0x11, 0, 64 * K)),
             _io_step(c, "img", _w(c, "img", 0x22, 64 * K + 4 * K, 128 * K)),
             _io_step(c, "img", _w(c, "img", 0x33, 0, 256 * K)))
    return Scenario("overwrite", c.fmt, setup, (Promise(img, 0, 256 * K, 0xAB),), steps, (img,), (img,), ())


def _zero_discard(c: _Cmd) -> Scenario:
    img = c.name("img")
    setup = (c.create("img"), c.io("img", "write -P 0xab 0 256k", "flush"))
    steps = (Step(c.io("img", "write -z 0 64k", "flush"), (Promise(img, 0, 64 * K, 0),)),
             Step(c.io("img", "discard 64k 64k", "flush"), (Promise(img, 64 * K, 64 * K, 0),)),
             _io_step(c, "img", _w(c, "img", 0x44, 64 * K, 64 * K)),
             Step(c.io("img", "write -z 128k 128k", "flush"), (Promise(img, 128 * K, 128 * K, 0),)))
    return Scenario("zero-discard", c.fmt, setup, (Promise(img, 0, 256 * K, 0xAB),), steps, (img,), (img,), ())


def _snapshot(c: _Cmd) -> Scenario:
    img = c.name("img")
    snap = img + "@s1"
    setup = (c.create("img"), c.io("img", "write -P 0xab 0 128k", "flush"))
    steps = (Step(c.snapshot("create", "img", "s1"), (Promise(snap, 0, 128 * K, 0xAB),), True),
             _io_step(c, "img", _w(c, "img", 0xCD, 0, 64 * K)),
             Step(c.snapshot("delete", "img", "s1"), (Promise(snap),), True))
    return Scenario("snapshot", c.fmt, setup, (Promise(img, 0, 128 * K, 0xAB),), steps, (img,), (img,), (img, snap))


def _commit(c: _Cmd) -> Scenario:
    base, over = c.name("base"), c.name("over")
    setup = (c.create("base"), c.io("base", "write -P 0xab 0 128k", "flush"))
    steps = (Step(c.create("over", base="base"), (Promise(over, 0, 128 * K, 0xAB),)),
             _io_step(c, "over", _w(c, "over", 0xCD, 64 * K, 128 * K)),
             Step(c.commit("over"), (Promise(base, 64 * K, 128 * K, 0xCD),), True))
    return Scenario("commit", c.fmt, setup, (Promise(base, 0, 128 * K, 0xAB),), steps, (base, over), (over,), (base, over))


def _clone(c: _Cmd) -> Scenario:
    img, new = c.name("img"), c.name("clone")
    setup = (c.create("img"), c.io("img", "write -P 0xab 0 128k", "flush"), c.snapshot("create", "img", "s1"),
             c.io("img", "write -P 0xcd 0 64k", "flush"))
    steps = (Step(c.clone("img", "s1", "clone"), (Promise(new, 0, 128 * K, 0xAB),), True),
             _io_step(c, "clone", _w(c, "clone", 0xEE, 0, 64 * K)))
    initial = (Promise(img, 0, 64 * K, 0xCD), Promise(img, 64 * K, 64 * K, 0xAB), Promise(img + "@s1", 0, 128 * K, 0xAB))
    return Scenario("clone", c.fmt, setup, initial, steps, (img, new), (img, new), (img, img + "@s1", new))


WORKLOADS: dict[str, Callable[[_Cmd], Scenario]] = {
    "create": _create, "allocate": _allocate, "overwrite": _overwrite, "zero-discard": _zero_discard,
    "snapshot": _snapshot, "commit": _commit, "clone": _clone}


# ---------------------------------------------------------------------------- the format's tools, as a checker sees them
@attrs.frozen
class CheckResult:
    code: int  # the checker's exit code
    leaks: int  # leaked clusters (qcow2) or leaked ranges (Lamina)
    degraded: int  # stale or damaged metadata copies whose twin is current (Lamina; qcow2 keeps one copy)
    message: str


class Tools:
    """Check, open and dump an image of one format: the same questions asked of both formats."""

    def __init__(self, fmt: str, control: str | None = None) -> None:
        if control is not None and control not in CONTROLS:
            raise UnknownControl(f"unknown compare control {control!r}; known: {', '.join(CONTROLS)}")
        self.fmt, self.control = fmt, control  # only `failing-check` changes the tools
        if fmt == "qcow2":
            for tool in ("qemu-img", "qemu-io"):
                if shutil.which(tool) is None:
                    raise MissingTool(f"{tool} is not installed: the qcow2 side runs the real QEMU tools (qemu-utils)")

    def check(self, path: str) -> CheckResult:
        if self.control == "failing-check":
            return CheckResult(2, 0, 0, "the failing-check control reports corruption on every image")
        if self.fmt == "qcow2":
            done = _run(["qemu-img", "check", "-f", "qcow2", "--output", "json", path])
            try:
                report = json.loads(done.stdout)
            except ValueError:
                report = {}
            leaks = int(report.get("leaks", 0)) if isinstance(report, dict) else 0
            return CheckResult(done.returncode, leaks, 0, _last_line(done.stderr or done.stdout))
        code, out = _lamina(["check", "--output", "json", path])
        try:
            report = json.loads(out)
        except ValueError:
            return CheckResult(code, 0, 0, _last_line(out))
        return CheckResult(code, int(report.get("leaks", 0)), int(report.get("degraded", 0)),
                           "; ".join(f["message"] for f in report.get("findings", [])[:2]))

    def open_writable(self, path: str) -> str | None:
        """None if the image opens writable and reads its first sector (a VM's boot), else what went wrong."""
        if self.fmt == "qcow2":
            done = _run(["qemu-io", "-t", "writeback", "-f", "qcow2", "-c", "read 0 512", path])
            return None if done.returncode == 0 and "failed" not in done.stdout else _last_line(done.stderr or done.stdout)
        code, out = _lamina(["io", path, "-c", "read 0 512"])
        return None if code == 0 else _last_line(out)

    def dump(self, where: str, ref: str, out: str) -> str | None:
        """Write IMAGE or IMAGE@SNAP of the state `where` as raw bytes to `out`; None on success, else why not."""
        image, _, snap = ref.partition("@")
        path = os.path.join(where, image)
        if self.fmt == "qcow2":
            done = _run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw",
                         *(("-l", f"snapshot.name={snap}") if snap else ()), path, out])
            return None if done.returncode == 0 else _last_line(done.stderr or done.stdout)
        code, text = _lamina(["convert", "-U", "-O", "raw", path + (f"@{snap}" if snap else ""), out])
        return None if code == 0 else _last_line(text)


def _run(argv: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a QEMU tool; one that hangs on a crash state is that state's failure (exit 124), not the explorer's."""
    try:
        return subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(list(argv), 124, "", f"{argv[0]} did not finish in {timeout:g} s")


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1][:200] if lines else ""


_lamina = run_lamina  # the `lamina` command in-process: exit code and all it printed


# ---------------------------------------------------------------------------- observing a directory
View = dict[str, str | None]  # ref -> SHA-256 of its raw contents, None if it cannot be read


def observe(tools: Tools, where: str, refs: Sequence[str], scratch: str) -> tuple[View, dict[str, bytes | None]]:
    """Dump every ref of the directory: its digest and its raw bytes (None: absent or unreadable)."""
    view: View = {}
    raws: dict[str, bytes | None] = {}
    for n, ref in enumerate(refs):
        out = os.path.join(scratch, f"dump-{n}.raw")
        if not os.path.exists(os.path.join(where, ref.partition("@")[0])) or tools.dump(where, ref, out) is not None:
            view[ref], raws[ref] = None, None
        else:
            with open(out, "rb") as fh:
                raws[ref] = fh.read()
            view[ref] = hashlib.sha256(raws[ref]).hexdigest()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
    return view, raws


# ---------------------------------------------------------------------------- recording
@attrs.frozen
class Recording:
    scenario: Scenario
    base: DiskState
    ops: tuple
    ends: tuple[int, ...]  # ops issued when each step had returned
    views: tuple[View, ...]  # the real directory's view after the setup and after each step


def record_scenario(sc: Scenario, tools: Tools, trace_dir: str | None = None, env: dict[str, str] | None = None
                    ) -> Recording:
    """Run the setup, then every step under strace, in a fresh directory.

    The record goes through a trace file (`tracefile`, kept in `trace_dir`
    as WORKLOAD-FORMAT.trace if given, for `crashsim explore`), and the file
    read back must rebuild the directory's real final files.  `env` is the
    recorded steps' environment (the setup always runs in this process's).
    """
    from .tracefile import TraceFile, read_trace, replayed, write_trace

    with tempfile.TemporaryDirectory(prefix="crashsim-compare-") as scratch:
        workdir = os.path.join(scratch, "dir")
        os.mkdir(workdir)
        for argv in sc.setup:
            done = subprocess.run(list(argv), cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  errors="replace")
            if done.returncode != 0:
                raise ProgramFailed(f"{sc.workload}/{sc.fmt} setup `{' '.join(argv)}` exited {done.returncode}: "
                                    f"{_last_line(done.stderr or done.stdout)}")
        base = snapshot_directory(workdir)
        views = [observe(tools, workdir, sc.views, scratch)[0]]
        recorder: Recorder | None = None
        ends = []
        for step in sc.steps:
            try:
                recorder = record(step.argv, workdir, base, env, recorder)
            except ProgramFailed as exc:
                raise ProgramFailed(f"{sc.workload}/{sc.fmt}: {exc}") from None
            ends.append(len(recorder.ops))
            views.append(observe(tools, workdir, sc.views, scratch)[0])
        assert recorder is not None
        path = os.path.join(trace_dir or scratch, f"{sc.workload}-{sc.fmt}.trace")
        write_trace(path, TraceFile(("sh", "-c", " && ".join(shlex.join(step.argv) for step in sc.steps)), base,
                                    tuple(recorder.ops)))
        trace = read_trace(path)
        compare_with_directory(replayed(trace), workdir)  # RecordMismatch (exit 8) if the record missed a change
    return Recording(sc, trace.base, trace.ops, tuple(ends), tuple(views))


# ---------------------------------------------------------------------------- judging one crash state
Expected = dict[str, dict[int, int]]  # ref -> sector index -> pattern


def promised_after(sc: Scenario) -> list[Expected]:
    """What the returned invocations promise, sector by sector, before any step (0) and after each."""
    out: list[Expected] = []
    for promises in (sc.initial, *(step.promises for step in sc.steps)):
        now = {ref: dict(sectors) for ref, sectors in (out[-1] if out else {}).items()}
        for p in promises:
            if p.pattern is None:
                now.pop(p.ref, None)
            else:
                sectors = now.setdefault(p.ref, {})
                for s in range(p.offset // SECTOR, (p.offset + p.length) // SECTOR):
                    sectors[s] = p.pattern
        out.append(now)
    return out


@attrs.frozen
class Verdict:
    kinds: frozenset[str]  # a subset of KINDS; empty: ok
    leaks: int
    messages: tuple[tuple[str, str], ...]  # (kind, the first finding of that kind), for the report
    new: frozenset[str] = frozenset()  # unopenable/corruption found only in images still being made (nothing promised)


class Judge:
    """Classifies crash states of one recording (the same steps for both formats)."""

    def __init__(self, rec: Recording, tools: Tools, scratch: str) -> None:
        self.rec, self.tools, self.scratch = rec, tools, scratch
        self.after = promised_after(rec.scenario)
        self.checks = 0  # checker invocations so far (a row reports that its checker really ran)
        self.torn = False  # under a torn model a sector the interrupted invocation rewrites may read garbage
        self.rewrites = [{p.ref: set(range(p.offset // SECTOR, (p.offset + p.length) // SECTOR)) for p in step.promises
                          if p.pattern is not None} for step in rec.scenario.steps]  # sectors each step writes

    def context(self, crash: int) -> tuple[int, bool]:
        """(steps returned, whether the crash is between steps)."""
        done = sum(1 for e in self.rec.ends if e <= crash)
        return done, crash == 0 or crash in self.rec.ends

    def __call__(self, where: str, crash: int) -> Verdict:
        sc = self.rec.scenario
        done, between = self.context(crash)
        kinds: set[str] = set()
        notes: list[str] = []
        leaks = 0
        in_promised: set[str] = set()  # kinds found in an image a returned invocation promised (not one still being made)

        def note(kind: str, text: str) -> None:
            if kind not in kinds:
                notes.append((kind, text))
            kinds.add(kind)

        required = self.after[done]
        needed = {ref.partition("@")[0] for ref in required}
        for image in sc.images:  # 1. the checker, read-only, before any repair
            if not os.path.exists(os.path.join(where, image)):
                if image in needed:
                    note("lost", f"{image} is missing, though a returned invocation promised its contents")
                continue
            result = self.tools.check(os.path.join(where, image))
            self.checks += 1
            if result.code == 2:
                note("corruption", f"check {image} exited 2: {result.message}")
                in_promised |= {"corruption"} if image in needed else set()
            elif result.code == 3:
                if result.leaks or not result.degraded:
                    note("leaks", f"check {image} exited 3, {result.leaks} leaked: {result.message}")
                if result.degraded:
                    note("degraded", f"check {image} exited 3, {result.degraded} stale copies: {result.message}")
                leaks += result.leaks
            elif result.code != 0:
                note("unopenable", f"check {image} exited {result.code}: {result.message}")
                in_promised |= {"unopenable"} if image in needed else set()
        for top in sc.tops:  # 2. a writable open, as a boot does
            if os.path.exists(os.path.join(where, top)):
                failed = self.tools.open_writable(os.path.join(where, top))
                if failed is not None:
                    note("unopenable", f"{top} does not open: {failed}")
                    in_promised |= {"unopenable"} if top in needed else set()
        refs = list(dict.fromkeys([*sc.views, *required, *(self.after[done + 1] if not between else {})]))
        view, raws = observe(self.tools, where, refs, self.scratch)  # 3. the promised sectors
        following = self.after[min(done + 1, len(self.after) - 1)]
        for ref in refs:
            old, new = required.get(ref, {}), following.get(ref, {}) if not between else {}
            if raws[ref] is None:
                if ref in required and (between or ref in following):
                    note("lost", f"{ref} cannot be read, though a returned invocation promised its contents")
                continue
            torn = self.rewrites[done].get(ref, set()) if self.torn and not between else set()
            wrong = _first_wrong(raws[ref], old, new, between, torn)
            if wrong is not None:
                note("lost", f"{ref}: {wrong}")
        if sc.views:  # 4. atomicity of management operations; a returned operation's result stays
            seen = {ref: view[ref] for ref in sc.views}
            if between:
                if seen != self.rec.views[done]:
                    note("lost", "after the invocation returned, " + _view_difference(seen, self.rec.views[done]))
            elif sc.steps[done].atomic and seen not in (self.rec.views[done], self.rec.views[done + 1]):
                note("non-atomic", f"inside `{' '.join(sc.steps[done].argv[-4:])}`: "
                     + _view_difference(seen, self.rec.views[done]) + " and " + _view_difference(seen, self.rec.views[done + 1]))
        return Verdict(frozenset(kinds), leaks, tuple(notes), frozenset(kinds & {"unopenable", "corruption"} - in_promised))


def _first_wrong(raw: bytes, old: dict[int, int], new: dict[int, int], between: bool,
                 torn: set[int] | frozenset[int] = frozenset()) -> str | None:
    """The first promised sector that reads neither its promised pattern nor (inside a step) the step's new one.

    The sectors `torn` (under a torn model: those the interrupted step
    rewrites) may read anything: a torn write leaves garbage that no
    in-place format can tell from data (the oracle of `crashsim run` allows
    the same).
    """
    for s, pattern in sorted(old.items()):
        if s in torn:
            continue
        allowed = {pattern} if between or s not in new else {pattern, new[s]}
        sector = raw[s * SECTOR : (s + 1) * SECTOR].ljust(SECTOR, b"\0")
        if sector.count(sector[0]) != SECTOR or sector[0] not in allowed:
            want = " or ".join(f"{p:#04x}" for p in sorted(allowed))
            return f"sector at {s * SECTOR} should read {want}, reads {sector[:8].hex()}..."
    return None


def _view_difference(seen: View, want: View) -> str:
    """Which refs read otherwise than in the view `want` (digests shortened)."""
    diff = [ref for ref in want if seen.get(ref) != want[ref]]
    return ", ".join(f"{ref} reads {_state(seen.get(ref))} for {_state(want[ref])}" for ref in diff) or "the same view"


def _state(digest: str | None) -> str:
    return "absent" if digest is None else digest[:8]


# ---------------------------------------------------------------------------- exploring and counting
@attrs.define
class Row:
    """One workload, format and model: how many crash states showed what."""

    workload: str
    fmt: str
    model: str
    ops: int
    states: int = 0
    checked: int = 0  # distinct directories judged
    checks: int = 0  # checker invocations (`qemu-img check`, `lamina check`) on them
    ok: int = 0
    counts: Counter = attrs.Factory(Counter)  # kind -> states
    leaked: int = 0  # leaked clusters (qcow2) / ranges (Lamina), summed over states
    new: Counter = attrs.Factory(Counter)  # kind -> states showing it only in images still being made
    examples: dict = attrs.Factory(dict)  # kind -> (plan, message) of the first state showing it
    seconds: float = 0.0

    @property
    def failing(self) -> int:
        return sum(self.counts[k] for k in FAILURES)

    def to_json(self) -> dict:
        return {"workload": self.workload, "format": self.fmt, "model": self.model, "ops": self.ops, "states": self.states,
                "checked": self.checked, "checks": self.checks, "ok": self.ok, **{k: self.counts[k] for k in KINDS}, "leaked": self.leaked,
                "new": {k: self.new[k] for k in ("unopenable", "corruption")},
                "seconds": round(self.seconds, 2),
                "examples": {k: {"plan": p, "message": m} for k, (p, m) in self.examples.items()}}


def explore_recording(rec: Recording, tools: Tools, models: Sequence[str], budget: Budget, seed: int = 0) -> list[Row]:
    """Judge every crash state of the recording under each model; a directory seen before reuses its verdict."""
    sc = rec.scenario
    materialiser = Materialiser(rec.base, rec.ops)
    verdicts: dict[tuple, Verdict] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="crashsim-compare-states-") as scratch:
        judge = Judge(rec, tools, scratch)
        for name in models:
            model = Model.parse(name)
            started = time.perf_counter()
            row = Row(sc.workload, sc.fmt, model.name, len(rec.ops))
            checks_before = judge.checks
            judge.torn = bool(model.torn_unit)
            def context(crash: int) -> tuple:  # a torn model may read garbage where another may not: judged apart
                return judge.context(crash), judge.torn

            for _tier, crash, outcomes, verdict, fresh in judged_states(rec.ops, materialiser, model, budget, seed,
                                                                        scratch, verdicts, context, judge):
                row.states += 1
                row.checked += fresh
                row.ok += not verdict.kinds
                row.leaked += verdict.leaks
                row.new.update(verdict.new)
                for kind, message in verdict.messages:
                    row.counts[kind] += 1
                    if kind not in row.examples:
                        plan = Plan(f"{sc.workload}-{sc.fmt}", model.name, seed, crash, tuple(sorted(outcomes.items())))
                        row.examples[kind] = (plan.to_string(), message)
            row.seconds = time.perf_counter() - started
            row.checks = judge.checks - checks_before
            rows.append(row)
    return rows


def compare(workloads: Sequence[str], formats: Sequence[str], models: Sequence[str], budget: Budget, seed: int = 0,
            control: str | None = None, on_row: Callable[[Row], None] | None = None,
            trace_dir: str | None = None) -> list[Row]:
    """Record each workload once per format, explore it under every model; the rows in workload, format, model order."""
    if shutil.which("strace") is None:
        raise MissingTool("strace is not installed: it records the system calls of the real programs")
    for name in models:
        Model.parse(name)
    scenarios = [scenario(w, f) for w in workloads for f in formats]  # unknown names fail before any work
    tools = {f: Tools(f, control) for f in formats}
    rows = []
    with tempfile.TemporaryDirectory(prefix="crashsim-compare-shim-") as shim:
        env = None
        if control in RECORD_CONTROLS:
            with open(os.path.join(shim, "sitecustomize.py"), "w", encoding="utf-8") as fh:
                fh.write(RECORD_CONTROLS[control])
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [shim, os.environ.get("PYTHONPATH")])))
        for sc in scenarios:
            rec = record_scenario(sc, tools[sc.fmt], trace_dir, env if sc.fmt == "lamina" else None)
            for row in explore_recording(rec, tools[sc.fmt], models, budget, seed):
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    return rows


HEADER = ("workload", "format", "model", "ops", "states", "ok", "unopenable", "corruption", "leaks", "stale copy",
          "lost flushed", "non-atomic")


def _with_new(row: Row, kind: str) -> str:
    return str(row.counts[kind]) + (f" ({row.new[kind]} new)" if row.new[kind] else "")


def table_lines(rows: Sequence[Row], markdown: bool = False) -> list[str]:
    """The side-by-side table (markdown for the README, aligned text for the terminal)."""
    cells = [[r.workload, r.fmt, r.model, str(r.ops), str(r.states), str(r.ok),
              _with_new(r, "unopenable"), _with_new(r, "corruption"), str(r.counts["leaks"]) + (f" ({r.leaked})" if r.leaked else ""),
              str(r.counts["degraded"]),
              str(r.counts["lost"]), str(r.counts["non-atomic"])] for r in rows]
    if markdown:
        return ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)] + ["| " + " | ".join(c) + " |" for c in cells]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(HEADER)]
    return ["  ".join(h.ljust(w) for h, w in zip(HEADER, widths))] + \
        ["  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))) for c in cells]
