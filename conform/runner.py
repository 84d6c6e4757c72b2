"""`lamina conform --impl 'COMMAND'`: run every vector on an implementation through the driver protocol.

Each vector's commands run as subprocesses (the command shlex-split, the
vector's directory as working directory, a timeout each); a script vector
runs in a fresh directory holding a copy of its script.  The files of every
vector are hashed before and after (and held against the manifest before),
so a driver that writes to an image it should only read fails the vector.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, TextIO

import attrs

from .errors import BadManifest, ConformError
from .vectors import CATEGORIES, generate, load_manifest, tree_hashes
from .views import dump_mismatch

FEATURES = frozenset({"shared-clusters"})  # the optional format features a vector may need (FORMAT.md §13)
EXIT_PASSED = 0  # every vector passed (or was skipped: the driver does not offer a command it needs)
EXIT_FAILED = 4  # at least one vector failed
DEFAULT_TIMEOUT = 60.0
STDERR_SHOWN = 600  # characters of a failing command's standard error shown with its failure


class DriverFailed(ConformError):
    """The driver cannot even say what it offers: `IMPL capabilities` fails, hangs or prints nothing known."""


@attrs.frozen
class Result:
    """The verdict on one vector."""

    category: str
    name: str
    status: str  # "pass", "fail" or "skip"
    reasons: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"category": self.category, "name": self.name, "status": self.status, "reasons": list(self.reasons),
                "seconds": round(self.seconds, 3)}


@attrs.frozen
class Completed:
    exit: int | None  # None: timed out
    stdout: str
    stderr: str


@attrs.frozen
class Driver:
    """The implementation under test: its command line and the time each command may take."""

    argv: tuple[str, ...]
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def parse(cls, command: str, timeout: float = DEFAULT_TIMEOUT) -> "Driver":
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise ConformError(f"--impl {command!r}: not a valid shell-quoted command: {exc}") from None
        if not argv:
            raise ConformError("--impl is empty: give the driver's command, e.g. --impl 'python -m my.driver'")
        return cls(argv, timeout)

    def run(self, args: list[str], cwd: str) -> Completed:
        try:
            done = subprocess.run([*self.argv, *args], cwd=cwd, capture_output=True, timeout=self.timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            return Completed(None, "", _text(exc.stderr))
        except OSError as exc:
            return Completed(127, "", f"cannot run {self.argv[0]}: {exc.strerror}")
        return Completed(done.returncode, _text(done.stdout), _text(done.stderr))

    def capabilities(self, cwd: str) -> frozenset[str]:
        done = self.run(["capabilities"], cwd)
        if done.exit != 0:
            state = "timed out" if done.exit is None else f"exited {done.exit}"
            raise DriverFailed(f"{shlex.join(self.argv)} capabilities {state}: {done.stderr.strip()[:200]}")
        words = frozenset(done.stdout.split())
        offered = words & {"dump", "check", "apply"}
        if not offered:
            raise DriverFailed(f"{shlex.join(self.argv)} capabilities printed none of dump, check, apply")
        return offered | (words & FEATURES)  # format features a vector may need; unknown words are ignored


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode("utf-8", "backslashreplace")


def _said(what: str, done: Completed) -> str:
    state = "timed out" if done.exit is None else f"exit {done.exit}"
    err = done.stderr.strip()
    return f"{what}: {state}" + (f" (stderr: {err[-STDERR_SHOWN:]})" if err else "")


class _Vector:
    """Runs one vector's commands and gathers the reasons it fails."""

    def __init__(self, root: str, key: str, expect: dict, driver: Driver, scratch: str) -> None:
        self.root, self.key, self.expect, self.driver = root, key, expect, driver
        self.directory = os.path.join(root, key)
        self.scratch = scratch
        self.reasons: list[str] = []
        self.dumps = 0

    def out_file(self) -> str:
        self.dumps += 1
        return os.path.join(self.scratch, f"dump-{self.dumps}.img")

    def check(self, cwd: str, image: str, want: dict) -> None:
        done = self.driver.run(["check", image], cwd)
        if done.exit != want["exit"]:
            self.reasons.append(_said(f"check {image}: expected exit {want['exit']}", done))
            return
        printed = {line.split(":", 1)[0].strip() for line in done.stdout.splitlines() if ":" in line}
        missing = sorted(set(want.get("kinds", ())) - printed)
        if missing:
            self.reasons.append(f"check {image}: exit {done.exit} as expected, but no line of kind {', '.join(missing)}")

    def dump(self, cwd: str, target: str, disk_size: int, alternatives: list[list]) -> None:
        """Dump `target` and hold it against each alternative (a list of ranges); one must match."""
        out = self.out_file()
        done = self.driver.run(["dump", target, out], cwd)
        if done.exit != 0:
            self.reasons.append(_said(f"dump {target}: expected exit 0", done))
            return
        problems = [dump_mismatch(out, disk_size, ranges) for ranges in alternatives]
        if None not in problems:
            self.reasons.append(f"dump {target}: " + ("; ".join(problems) if len(problems) == 1 else
                                                      f"matches none of {len(problems)} allowed outcomes: {problems[0]}"))
        if os.path.exists(out):
            os.unlink(out)

    def crash_dump(self, cwd: str, image: str, outcomes: list[dict]) -> None:
        out = self.out_file()
        done = self.driver.run(["dump", image, out], cwd)
        if done.exit != 0:
            self.reasons.append(_said(f"dump {image}: expected exit 0 (a crash state is readable)", done))
            return
        problems = [dump_mismatch(out, o["disk_size"], o["ranges"]) for o in outcomes]
        if None not in problems:
            self.reasons.append(f"dump {image}: no allowed outcome: " + "; ".join(problems))
        if os.path.exists(out):
            os.unlink(out)

    def refuse(self, cwd: str, target: str, want: int) -> None:
        out = self.out_file()
        done = self.driver.run(["dump", target, out], cwd)
        if done.exit != want:
            self.reasons.append(_said(f"dump {target}: expected exit {want} (the image breaks a rule)", done))
        if os.path.exists(out):
            os.unlink(out)

    def run(self, manifest_files: dict[str, str]) -> None:
        e = self.expect
        before = tree_hashes(self.root, self.key)
        listed = {rel: sha for rel, sha in manifest_files.items() if rel.startswith(self.key + "/")}
        for rel in sorted(set(before) | set(listed)):
            if rel not in before:
                raise BadManifest(f"{os.path.join(self.root, rel)}: listed in the manifest but missing")
            if listed.get(rel) != before[rel]:
                raise BadManifest(f"{os.path.join(self.root, rel)}: its SHA-256 is not the manifest's (altered, added or "
                                  "not generated with it)")
        cwd = self.directory
        if e["category"] == "scripts":
            cwd = os.path.join(self.scratch, "work")
            os.mkdir(cwd)
            shutil.copyfile(os.path.join(self.directory, e["script"]), os.path.join(cwd, e["script"]))
            done = self.driver.run(["apply", e["image"], e["script"]], cwd)
            if done.exit != 0:
                self.reasons.append(_said(f"apply {e['image']} {e['script']}: expected exit 0", done))
                return
        if "check" in e:
            self.check(cwd, e["image"], e["check"])
        for extra in e.get("also_check", ()):
            self.check(cwd, extra["image"], extra)
        for view in e.get("views", ()):
            self.dump(cwd, view["name"], view["disk_size"], [view["ranges"]])
        if "dump" in e:
            for target in e["dump"].get("targets", [e["image"]]):
                self.refuse(cwd, target, e["dump"]["exit"])
        if "outcomes" in e:
            self.crash_dump(cwd, e["image"], e["outcomes"])
        after = tree_hashes(self.root, self.key)
        changed = sorted(rel for rel in set(before) | set(after) if before.get(rel) != after.get(rel))
        if changed:
            self.reasons.append(f"the driver changed, made or removed vector files: {', '.join(changed[:5])}")


def run_vector(root: str, key: str, driver: Driver, capabilities: frozenset[str], manifest_files: dict[str, str]) -> Result:
    start = time.monotonic()
    category, _, name = key.partition("/")
    path = os.path.join(root, key, "expect.json")
    try:
        with open(path, encoding="utf-8") as fh:
            expect = json.load(fh)
    except (OSError, ValueError) as exc:
        raise BadManifest(f"{path}: cannot be read as JSON: {exc}") from None
    missing = sorted(set(expect.get("needs", ())) - capabilities)
    if missing:
        return Result(category, name, "skip", (f"the driver does not offer {', '.join(missing)}",))
    with tempfile.TemporaryDirectory(prefix="lamina-conform-") as scratch:
        vector = _Vector(root, key, expect, driver, scratch)
        try:
            vector.run(manifest_files)
        except KeyError as exc:
            raise BadManifest(f"{path}: lacks the key {exc}") from None
    status = "fail" if vector.reasons else "pass"
    return Result(category, name, status, tuple(vector.reasons), time.monotonic() - start)


def run_all(root: str, driver: Driver, categories: Iterable[str] = CATEGORIES, jobs: int = 2) -> list[Result]:
    manifest = load_manifest(root)
    wanted = set(categories)
    keys = [k for k in manifest["vectors"] if isinstance(k, str) and k.partition("/")[0] in wanted]
    for key in keys:
        if not os.path.isfile(os.path.join(root, key, "expect.json")):
            raise BadManifest(f"{os.path.join(root, 'manifest.json')}: lists {key}, which has no expect.json")
    capabilities = driver.capabilities(root)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda k: run_vector(root, k, driver, capabilities, manifest["files"]), keys))


def conform(impl: str, vectors: str | None, categories: list[str] | None, output: str, stream: TextIO,
            timeout: float = DEFAULT_TIMEOUT, jobs: int = 2) -> int:
    """The `lamina conform` command: run, report, and return the exit code."""
    driver = Driver.parse(impl, timeout)
    chosen = tuple(categories or CATEGORIES)
    start = time.monotonic()
    if vectors is None:
        with tempfile.TemporaryDirectory(prefix="lamina-vectors-") as scratch:
            root = os.path.join(scratch, "vectors")
            generate(root, chosen)
            results = run_all(root, driver, chosen, jobs)
    else:
        results = run_all(os.path.abspath(vectors), driver, chosen, jobs)
    seconds = time.monotonic() - start
    stream.write({"human": human, "json": as_json, "junit": junit}[output](results, chosen, seconds))
    return EXIT_FAILED if any(r.status == "fail" for r in results) else EXIT_PASSED


def _tally(results: list[Result], categories: tuple[str, ...]) -> dict[str, dict[str, int]]:
    out = {c: {"pass": 0, "fail": 0, "skip": 0} for c in categories}
    for r in results:
        out[r.category][r.status] += 1
    return out


def human(results: list[Result], categories: tuple[str, ...], seconds: float) -> str:
    tally = _tally(results, categories)
    lines = [f"{'category':<10} {'pass':>5} {'fail':>5} {'skip':>5}"]
    lines += [f"{c:<10} {t['pass']:>5} {t['fail']:>5} {t['skip']:>5}" for c, t in tally.items()]
    total = {s: sum(t[s] for t in tally.values()) for s in ("pass", "fail", "skip")}
    lines.append(f"{'total':<10} {total['pass']:>5} {total['fail']:>5} {total['skip']:>5}   ({seconds:.1f} s)")
    failed = [r for r in results if r.status == "fail"]
    if failed:
        lines.append("")
        lines += [f"FAIL {r.category}/{r.name}: {' | '.join(r.reasons)}" for r in failed]
    return "\n".join(lines) + "\n"


def as_json(results: list[Result], categories: tuple[str, ...], seconds: float) -> str:
    return json.dumps({"summary": _tally(results, categories), "seconds": round(seconds, 3),
                       "results": [r.to_json() for r in results]}, indent=1) + "\n"


def _xml_safe(text: str) -> str:
    """Text without the characters XML 1.0 cannot hold (a driver's stderr may print anything)."""
    return "".join(c if c in "\t\n\r" or " " <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd" or c > "\uffff" else "?"
                   for c in text)


def junit(results: list[Result], categories: tuple[str, ...], seconds: float) -> str:
    suites = ET.Element("testsuites", name="lamina-conform", time=f"{seconds:.3f}")
    tally = _tally(results, categories)
    for category in categories:
        mine = [r for r in results if r.category == category]
        suite = ET.SubElement(suites, "testsuite", name=category, tests=str(len(mine)),
                              failures=str(tally[category]["fail"]), skipped=str(tally[category]["skip"]), errors="0",
                              time=f"{sum(r.seconds for r in mine):.3f}")
        for r in mine:
            case = ET.SubElement(suite, "testcase", classname=f"conform.{category}", name=r.name, time=f"{r.seconds:.3f}")
            if r.status == "fail":
                ET.SubElement(case, "failure", message=_xml_safe(r.reasons[0][:200])).text = _xml_safe("\n".join(r.reasons))
            elif r.status == "skip":
                ET.SubElement(case, "skipped", message=_xml_safe(r.reasons[0]) if r.reasons else "skipped")
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
