"""The `lamina` command: create, info, check, map, convert, compare, resize, io, snapshot, clone, commit, rebase,
diff, dedup, send, receive, scrub, serve (an NBD export through nbdkit), schema, vectors and conform (the conformance kit,
`conform/`).

Exit codes: 0 success; 1 an error (message on stderr, one line, no
traceback); `check` as `qemu-img check`: 0 clean (pending work of an
interrupted operation is only noted), 1 check not completed, 2 corruption
found, 3 degraded redundancy or leaked space only (`scrub` likewise); `compare` as `qemu-img compare`: 0 identical,
1 different, 2 an error; `conform` 0 every vector passed, 4 at least one failed;
`serve` 0 once stopped by SIGINT/SIGTERM with the image flushed and closed, 1 an error (also a server that
was killed and left the image to be recovered).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING, Iterator, Sequence

from lamina.spec.errors import InvalidArgument, LaminaError

from . import layers
from .image import Image, image_lock
from .osfile import OsStorage
from .sizes import format_size, parse_size

if TYPE_CHECKING:  # a handler imports what only it needs: every command pays for what is imported here
    from lamina.spec.check import CheckReport

EXIT_OK = 0
EXIT_ERROR = 1
PROG = "lamina"


class UsageError(InvalidArgument):
    """The command line does not parse: an unknown command, a missing or unknown argument."""


def _terminal_columns() -> int:
    """`shutil.get_terminal_size().columns`, without importing shutil (and the compression modules it loads)."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout at the same width; argparse makes one per `add_argument`, each importing shutil."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; 2 means corruption for `check`, so usage errors raise."""

    def __init__(self, *args: object, formatter_class: type[argparse.HelpFormatter] = _Formatter, **kwargs: object) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)  # type: ignore[misc, arg-type]

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.removeprefix(PROG).strip()  # "snapshot create" below the top parser
        raise UsageError(f"{command}: {message}" if command else message)


def error_line(exc: BaseException) -> str:
    """The one line the command prints for an error: `lamina: WHAT`, with the file names an OSError carries."""
    if isinstance(exc, OSError):
        names = " -> ".join(os.fsdecode(n) if isinstance(n, bytes) else str(n)
                            for n in (exc.filename, exc.filename2) if n is not None)
        reason = exc.strerror or str(exc) or type(exc).__name__
        text = f"{names}: {reason}" if names else reason
    else:
        text = str(exc) or type(exc).__name__
    return f"{PROG}: " + " ".join(text.splitlines())


def _emit(args: argparse.Namespace, data: object, text: str) -> None:
    if getattr(args, "output", "human") == "json":
        import json  # only JSON output needs it: every other run is spared the import

        print(json.dumps(data, indent=4))
    else:
        print(text, end="" if text.endswith("\n") or not text else "\n")


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size) if args.size is not None else None
    cluster = parse_size(args.cluster_size, "cluster size")
    with Image.create(args.image, size, cluster, base=args.base, base_format=args.base_format,
                      allow_bases=tuple(args.allow_base or ())) as image:
        size = image.virtual_size
    base = f" base={args.base}" if args.base else ""
    print(f"Formatting '{args.image}', fmt=lamina cluster_size={cluster} size={size}{base}")
    return EXIT_OK


def _open(args: argparse.Namespace, readonly: bool = True) -> Image:
    return layers.open_target(args.image, readonly=readonly, allow_bases=tuple(getattr(args, "allow_base", None) or ()),
                              force_share=_force_share(args, readonly))


def _force_share(args: argparse.Namespace, readonly: bool = True) -> bool:
    """`-U`: inspect without the shared lock, as `qemu-img -U` does; a command that writes cannot."""
    if getattr(args, "force_share", False) and not readonly:
        raise InvalidArgument("-U/--force-share is only for read-only inspection (with io: add -r)")
    return getattr(args, "force_share", False)


def _snapshot_json(entry) -> dict:
    return {"id": entry.id, "name": entry.text_name, "date-ns": entry.creation_time_ns, "vm-clock-nsec": entry.vm_clock_ns,
            "vm-state-size": entry.vmstate_size, "disk-size": entry.disk_size}


def _bar(args: argparse.Namespace, desc: str):
    """The `-p` bar of a command whose work reports a fraction done (see `progress.Progress.to`)."""
    from .progress import Progress

    return Progress(getattr(args, "progress", False) and not getattr(args, "quiet", False), desc, unit="%")


def cmd_snapshot(args: argparse.Namespace) -> int:
    if args.action == "create":
        vmstate = OsStorage().open(args.vmstate, False, follow_symlinks=True) if args.vmstate else None  # a file the user named
        try:
            layers.create_snapshot(args.image, args.name, vmstate, args.vm_clock or 0)
        finally:
            if vmstate is not None:
                vmstate.close()
    elif args.action == "list":
        entries = layers.list_snapshots(args.image, force_share=_force_share(args))
        rows = ["ID        TAG                 VM SIZE                DATE       VM CLOCK     DISK SIZE"]
        for e in entries:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.creation_time_ns / 1e9))
            clock = e.vm_clock_ns // 10**9
            rows.append(f"{e.id:<10}{e.text_name:<20}{format_size(e.vmstate_size):>7} {when} "
                        f"{clock // 3600:04d}:{clock // 60 % 60:02d}:{clock % 60:02d}.{e.vm_clock_ns // 10**6 % 1000:03d} "
                        f"{format_size(e.disk_size):>9}")
        _emit(args, [_snapshot_json(e) for e in entries], "Snapshot list:\n" + "\n".join(rows))
    elif args.action == "revert":
        layers.revert_snapshot(args.image, args.name)
    elif args.action == "delete":
        with _bar(args, "delete") as bar:
            layers.delete_snapshot(args.image, args.name, progress=bar.to if bar.active else None)
    elif args.action == "vmstate":
        size = layers.save_vmstate(args.image, args.name, args.outfile, force_share=_force_share(args))
        print(f"{size} bytes of VM state written to {args.outfile}")
    return EXIT_OK


def cmd_clone(args: argparse.Namespace) -> int:
    layers.clone(args.image, args.name, args.new_image)
    return EXIT_OK


def cmd_commit(args: argparse.Namespace) -> int:
    with _bar(args, "commit") as bar:
        layers.commit(args.image, allow_bases=tuple(args.allow_base or ()), progress=bar.to if bar.active else None)
    print("Image committed.")
    return EXIT_OK


def cmd_rebase(args: argparse.Namespace) -> int:
    with _bar(args, "rebase") as bar:
        layers.rebase(args.image, args.b or None, args.F, args.u, allow_bases=tuple(args.allow_base or ()),
                      progress=bar.to if bar.active else None)
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    share = _force_share(args)
    with layers.open_target(args.a, force_share=share) as a, layers.open_target(args.b, force_share=share) as b:
        ranges = [{"start": lo, "length": hi - lo} for lo, hi in layers.diff(a, b)]
    text = "\n".join(f"{hex(r['start']):<16}{hex(r['length']):<16}" for r in ranges)
    _emit(args, ranges, ("Offset          Length\n" + text) if ranges else "The images are identical.")
    return EXIT_OK


EXIT_DIFFERENT, EXIT_COMPARE_ERROR = 1, 2


def cmd_compare(args: argparse.Namespace) -> int:
    """Exit 0 identical, 1 different, 2 an error (qemu-img compare's codes): errors are caught here."""
    from .compare import compare
    from .progress import Progress
    from .qemu import signals_interrupt

    try:
        with signals_interrupt(), Progress(args.progress and not args.quiet, "compare") as bar:
            verdict = compare(args.a, args.b, args.f, args.F, args.strict, bar, tuple(args.allow_base or ()),
                              force_share=_force_share(args))
    except (LaminaError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_COMPARE_ERROR
    if args.output == "json":
        import json

        print(json.dumps(verdict.to_json(), indent=4))
    elif not args.quiet:
        print("\n".join(verdict.lines()))
    return EXIT_OK if verdict.identical else EXIT_DIFFERENT


def cmd_info(args: argparse.Namespace) -> int:
    if args.tree or args.dot:
        data = layers.tree(layers.parse_target(args.image)[0], force_share=_force_share(args))
        if args.dot:
            from .pictures import tree_dot

            print(tree_dot(data), end="")
        else:
            _emit(args, data, layers.draw_tree(data))
        return EXIT_OK
    from .dedup import shared_bytes

    with _open(args) as image:
        root = image.root
        disk = os.stat(image.path).st_blocks * 512
        shared, exclusive = shared_bytes(image)
        data = {
            "filename": args.image,
            "format": "lamina",
            "virtual-size": root.virtual_size,
            "actual-size": disk,
            "cluster-size": image.cluster_size,
            "dirty-flag": bool(root.intents),
            "format-specific": {
                "type": "lamina",
                "data": {
                    "version": root.version,
                    "uuid": root.image_uuid.hex(),
                    "generation": root.generation,
                    "pending-intents": len(root.intents),
                    "regions": image.geometry.num_regions,
                    "incompatible-features": root.incompatible_features,
                    "snapshots": len(root.snapshots),
                    **({"backing-filename": root.base_path, "backing-format": "raw" if root.base_kind == 1 else "lamina"}
                       if root.base_kind else {}),
                    "compatible-features": root.compatible_features,
                    "shared-bytes": shared,
                    "exclusive-bytes": exclusive,
                },
            },
        }
        text = (f"image: {args.image}\nfile format: lamina\n"
                f"virtual size: {format_size(root.virtual_size)} ({root.virtual_size} bytes)\n"
                f"disk size: {format_size(disk)}\ncluster_size: {image.cluster_size}\n"
                f"Format specific information:\n    version: {root.version}\n"
                f"    uuid: {root.image_uuid.hex()}\n    generation: {root.generation}\n"
                f"    unclean shutdown: {'yes, ' + str(len(root.intents)) + ' regions to recover' if root.intents else 'no'}\n"
                + (f"backing file: {root.base_path}\n" if root.base_kind else "")
                + (f"snapshots: {len(root.snapshots)}\n" if root.snapshots else "")
                + f"data held by this layer: {format_size(exclusive)} exclusive, {format_size(shared)} shared "
                  f"(in {'the store' if shared else 'no store'})\n")
        _emit(args, data, text)
    return EXIT_OK


def _describe(report: CheckReport) -> str:
    lines = [f"{f.severity.upper()}: {f.message}" for f in report.findings]
    if not report.completed:
        lines.append("Check could not be completed: the image's root is unreadable.")
    elif report.corruptions:
        lines.append(f"\n{len(report.corruptions)} errors were found on the image.\n"
                     "Data may be corrupted, or further writes to the image may corrupt it.")
    if report.completed and report.degraded:
        lines.append(f"\n{len(report.degraded)} metadata copies are damaged or stale while their twin is current.\n"
                     "Committed data is intact but has lost its redundancy; repair is recommended (check --repair).")
    if report.completed and report.leaks:
        lines.append(f"\n{len(report.leaks)} leaked ranges were found on the image.\n"
                     "This means waste of disk space, but no harm to data.")
    if report.completed and report.pending:
        lines.append(f"\nNote: {len(report.pending)} findings are pending work of an interrupted operation "
                     "(an unclean shutdown); a writable open finishes it.")
    if report.completed and report.exit_code == 0:
        lines.append("No errors were found on the image.")
    lines.append(f"{report.clusters_checked} clusters in {report.regions_checked} regions verified.")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    from lamina.spec.tree import check_tree, repair_tree

    storage = OsStorage()
    allowed = tuple(args.allow_base or ())
    if args.replica is not None and not args.repair:
        raise InvalidArgument("--from names a replica to repair data from: it needs --repair")
    if args.repair:
        _force_share(args, readonly=False)
        with image_lock(args.image, True, storage):
            before, after = repair_tree(args.image, storage, allowed)
        fixes = []
        if args.replica is not None:
            from .replicate import repair_data_from

            fixes = repair_data_from(args.image, args.replica, storage)
            after = check_tree(args.image, storage, allowed)

        def problems(r: CheckReport) -> int:
            return len(r.corruptions) + len(r.degraded) + len(r.leaks)

        repaired = problems(before) - problems(after)
        data = {"before": before.to_json(), "after": after.to_json(), "repaired": repaired,
                **({"data-repairs": [{"file": f.file, "guest_offset": f.guest_offset, "guest_length": f.length,
                                      "repaired": f.repaired, **({"reason": f.reason} if f.reason else {})}
                                     for f in fixes]} if args.replica is not None else {})}
        mended = [f"    {f.message}" for f in before.findings if f.repair]
        mended += [f"    data of guest range [{f.guest_offset}, {f.guest_offset + f.length}) in {f.file}, from "
                   f"{args.replica}" for f in fixes if f.repaired]
        failed = [f"    data of guest range [{f.guest_offset}, {f.guest_offset + f.length}) in {f.file}: {f.reason}"
                  for f in fixes if not f.repaired]
        text = (("The following inconsistencies were found and repaired:\n" + "\n".join(mended) + "\n\n" if mended else "")
                + ("Not repaired from the replica:\n" + "\n".join(failed) + "\n\n" if failed else "") + _describe(after))
        _emit(args, data, text)
        return after.exit_code
    with _bar(args, "check") as bar:
        tick = bar.to if bar.active else None
        if args.force_share:
            report = check_tree(args.image, storage, allowed, tick, force_share=True)
        else:
            with image_lock(args.image, False, storage):
                report = check_tree(args.image, storage, allowed, tick, lock=True)
    _emit(args, report.to_json(), _describe(report))
    return report.exit_code


def cmd_scrub(args: argparse.Namespace) -> int:
    from .progress import Progress
    from .scrub import data_bytes, scrub

    rate = parse_size(args.rate, "rate") if args.rate else None
    with Progress(args.progress and not args.quiet, "scrub") as bar:
        if bar.active:
            bar.set_total(data_bytes(args.image, OsStorage()))
        report, fixes = scrub(args.image, rate, args.replica, progress=bar.update)
    lines = [f"data of guest range [{f.guest_offset}, {f.guest_offset + f.length}) in {f.file}: "
             + (f"rewritten from {args.replica}" if f.repaired else f"NOT repaired, {f.reason}") for f in fixes]
    data = {**report.to_json(), **({"data-repairs": [{"file": f.file, "guest_offset": f.guest_offset,
                                                      "guest_length": f.length, "repaired": f.repaired,
                                                      **({"reason": f.reason} if f.reason else {})}
                                                     for f in fixes]} if args.replica else {})}
    _emit(args, data, "\n".join(lines + [_describe(report)]))
    return report.exit_code


def cmd_dedup(args: argparse.Namespace) -> int:
    from .dedup import dedup, images_in

    if args.snapshot:  # freeze each top first: only frozen data is shared
        for image in images_in(args.image + (args.across or []), OsStorage()):
            layers.create_snapshot(image, args.snapshot)
    with _bar(args, "dedup") as bar:
        report = dedup(args.image, args.across or [], dry_run=args.dry_run, gc_only=args.gc,
                       progress=bar.to if bar.active else None)
    saved = "would save" if report.dry_run else "saved"
    text = (f"layers scanned: {report.layers} ({report.layers_skipped} skipped: another cluster size or directory)\n"
            f"clusters scanned: {report.clusters_scanned} ({format_size(report.bytes_scanned)})\n"
            f"duplicates found: {report.duplicates} (new store clusters: {report.store_clusters_added})\n"
            f"bytes {saved}: {report.bytes_saved} ({format_size(max(0, report.bytes_saved))})\n"
            f"store clusters collected: {report.collected}"
            + (f"\nclusters failing their checksum, not shared: {report.checksum_failures}" if report.checksum_failures else ""))
    if args.gc:
        text = f"store clusters collected: {report.collected}"
    _emit(args, report.to_json(), text)
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    with _open(args) as image:
        if args.svg:
            from .pictures import map_svg

            picture = map_svg(image)
            if args.svg == "-":
                sys.stdout.write(picture)
                return EXIT_OK
            with open(args.svg, "x", encoding="utf-8") as out:
                out.write(picture)
        extents = [{"start": e.start, "length": e.length, "depth": 0, "present": e.data, "zero": not e.data,
                    "data": e.data, **({"offset": e.offset} if e.data else {}),
                    **({"filename": e.file} if e.file is not None else {})} for e in image.extents()]
        data: object = extents
        rows = ["Offset          Length          Mapped to       File"]
        rows += [f"{hex(e['start']):<16}{hex(e['length']):<16}{hex(e['offset']):<16}{e.get('filename', args.image)}"
                 for e in extents if e["data"]]
        if args.metadata:
            meta = [{"offset": m.offset, "length": m.length, "kind": m.kind, "copy": "AB"[m.copy],
                     **({"region": m.region} if m.region is not None else {})} for m in image.metadata_regions()]
            data = {"extents": extents, "metadata": meta}
            rows += ["", "Metadata        Length          Kind    Copy  Region"]
            rows += [f"{hex(m['offset']):<16}{hex(m['length']):<16}{m['kind']:<8}{m['copy']:<6}{m.get('region', '')}" for m in meta]
        if getattr(args, "output", "human") == "json" and isinstance(data, list):
            import json

            # One extent a line, as `qemu-img map --output=json` prints them (and by json's compiled encoder,
            # which an indented document does without: a map of many extents is mostly encoding).
            print("[" + ",\n".join(json.dumps(e) for e in data) + "]")
            return EXIT_OK
        _emit(args, data, "\n".join(rows))
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    import contextlib

    from .convert import NATIVE, check_cache, convert, detect_format
    from .progress import Progress

    check_cache(args.t)  # before anything is opened
    src_format = args.f or detect_format(args.src)
    if src_format in NATIVE and args.O in NATIVE:
        guard = contextlib.nullcontext()  # no server to stop: the qemu module and its imports are not needed
    else:
        from .qemu import signals_interrupt

        guard = signals_interrupt()
    notes: list[str] = []
    with guard, Progress(args.progress and not args.quiet, "convert") as bar:
        convert(args.src, args.dst, args.O, src_format, parse_size(args.cluster_size, "cluster size"), bar,
                tuple(args.allow_base or ()), force_share=_force_share(args), options=args.o, notes=notes,
                cache=args.t)
    for note in notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    return EXIT_OK


class _Skip:
    """An output that drops its first `skip` bytes: `send --resume-at N` continues a stream a receiver kept N bytes of."""

    def __init__(self, out, skip: int) -> None:
        self._out = out
        self._skip = skip

    def write(self, data: bytes) -> None:
        if self._skip >= len(data):
            self._skip -= len(data)
            return
        self._out.write(data[self._skip :])
        self._skip = 0


def cmd_send(args: argparse.Namespace) -> int:
    from .replicate import send

    if args.o is None and sys.stdout.isatty():
        raise InvalidArgument("send writes a binary stream: redirect standard output to a file or pipe, or pass -o FILE")
    if args.o is not None:
        with open(args.o, "xb") as out:
            try:
                stats = send(args.image, _Skip(out, args.resume_at), args.i, force_share=_force_share(args))
            except BaseException:
                os.unlink(args.o)  # ours, made just now: a stream that failed midway is no stream
                raise
    else:
        sys.stdout.flush()
        stats = send(args.image, _Skip(sys.stdout.buffer, args.resume_at), args.i, force_share=_force_share(args))
        sys.stdout.buffer.flush()
    if args.verbose:
        print(f"sent {stats.stream_bytes} bytes: {stats.data_bytes} of data, {stats.zero_bytes} zeroed, "
              f"{stats.vmstate_bytes} of VM state, in {stats.records} records", file=sys.stderr)
    return EXIT_OK


def cmd_receive(args: argparse.Namespace) -> int:
    from .replicate import receive, receive_resumable

    def run(source) -> str:
        if args.partial is not None:
            return receive_resumable(args.image, source, args.partial, args.F)
        return receive(args.image, source, args.F)

    if args.i is not None:
        with open(args.i, "rb") as source:
            name = run(source)
    else:
        name = run(sys.stdin.buffer)
    print(f"Received snapshot {name!r} into {args.image}.")
    return EXIT_OK


def cmd_resize(args: argparse.Namespace) -> int:
    with Image.open(args.image) as image:
        text = args.size
        if text[:1] in "+-":
            delta = parse_size(text[1:])
            size = image.virtual_size + (delta if text[0] == "+" else -delta)
        else:
            size = parse_size(text)
        if size < image.virtual_size and not args.shrink:
            raise InvalidArgument("shrinking drops data past the new size; pass --shrink to confirm")
        image.resize(size)
    print("Image resized.")
    return EXIT_OK


def _command_lines(args: argparse.Namespace) -> Iterator[str]:
    """`io`'s commands: every `-c`, then the lines of `-f FILE` (`-` is standard input); neither: standard input."""
    yield from args.c or []
    if args.f is None and args.c:
        return
    if args.f in (None, "-"):
        yield from (line.rstrip("\n") for line in sys.stdin)
        return
    try:
        with open(args.f, encoding="utf-8") as lines:
            yield from (line.rstrip("\n") for line in lines)
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{args.f}: the command file is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def cmd_io(args: argparse.Namespace) -> int:
    from .iocmd import run_command

    with _open(args, readonly=args.read_only) as image:
        for command in _command_lines(args):
            run_command(image, command, sys.stdout)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import serve

    return serve(args.image, socket=args.socket, port=args.port, bind=args.bind, readonly=args.readonly,
                 shared=args.shared, allow_bases=tuple(args.allow_base or ()), pid_file=args.pid_file,
                 announce=lambda line: print(line, flush=True))


def cmd_schema(args: argparse.Namespace) -> int:
    from .schemas import COMMANDS, SCHEMAS

    if args.name is None:
        print("\n".join(f"{name:<26}{command}" for command, name in COMMANDS.items()))
        return EXIT_OK
    if args.name not in SCHEMAS:
        raise InvalidArgument(f"no JSON schema named {args.name!r}; `lamina schema` lists them")
    import json

    print(json.dumps(SCHEMAS[args.name], indent=4))
    return EXIT_OK


def cmd_vectors(args: argparse.Namespace) -> int:
    from lamina.conform.vectors import generate  # the kit is loaded only when asked for

    manifest = generate(args.dir)
    counts = ", ".join(f"{n} {c}" for c, n in manifest["counts"].items())
    print(f"{len(manifest['vectors'])} vectors ({counts}) for format version {manifest['spec_version']} in {args.dir}")
    return EXIT_OK


def cmd_conform(args: argparse.Namespace) -> int:
    from lamina.conform.runner import conform

    return conform(args.impl, args.vectors, args.category, args.output, sys.stdout, args.timeout, args.jobs)


def take_io_commands(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `io`'s `-c CMD` (and `-cCMD`) options off its arguments, in order, before argparse sees them.

    argparse looks for the next option by scanning every option position
    left (`_parse_known_args`), a cost quadratic in the number of options:
    65,536 `-c` took minutes.  One pass here keeps it linear; what follows
    `--`, and a `-c` with no value, are left to argparse.
    """
    commands: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        if arg == "-c" and i + 1 < len(argv):
            commands.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("-c") and len(arg) > 2:
            commands.append(arg[2:])
        else:
            rest.append(arg)
        i += 1
    return commands, rest


class _Skipped:
    """Stands in for the parser of a command that is not being run: every call on it does nothing."""

    def __getattr__(self, name: str) -> object:
        return lambda *args, **kwargs: self


def _only(sub: argparse._SubParsersAction, command: str) -> None:
    """Let `sub` build the parser of `command` alone: the others' arguments are never added.

    Building every command's parser was the largest part of the start-up
    after the imports (each `add_argument` makes a help formatter); the
    command being run cannot tell the difference.
    """
    add_parser = sub.add_parser

    def add_only(name: str, **kwargs: object) -> argparse.ArgumentParser | _Skipped:
        return add_parser(name, **kwargs) if name == command else _Skipped()

    sub.add_parser = add_only  # type: ignore[method-assign]


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: with only its command's parser built when that names a command, else all."""
    if argv and not argv[0].startswith("-"):
        parser = build_parser(only=argv[0])
        if argv[0] in _commands(parser):
            return parser
    return build_parser()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; `only`: build that command's parser alone (see `_only`)."""
    parser = _Parser(prog=PROG, description="Lamina virtual-disk images: create, inspect, check, convert, run I/O.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    if only is not None:
        _only(sub, only)

    def output(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", choices=("human", "json"), default="human")

    def share(p: argparse.ArgumentParser) -> None:
        p.add_argument("-U", "--force-share", action="store_true",
                       help="read without the shared lock, even while another process writes (results may be inconsistent)")

    def progress_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("-p", "--progress", action="store_true", help="draw a progress bar (on a terminal)")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    def allow(p: argparse.ArgumentParser) -> None:
        p.add_argument("--allow-base", action="append", metavar="PATH",
                       help="a base outside the image's directory that may be followed")

    p = sub.add_parser("create", help="create a new image, optionally over a base")
    p.add_argument("--cluster-size", default="64k", help="4k to 2M, a power of two (default 64k)")
    p.add_argument("-b", "--base", help="a raw file or Lamina image the new image starts from")
    p.add_argument("-F", "--base-format", choices=("raw", "lamina"), help="the base's format (default: detected)")
    allow(p)
    p.add_argument("image")
    p.add_argument("size", nargs="?", help="virtual size (default: the base's)")
    p.set_defaults(run=cmd_create)

    p = sub.add_parser("snapshot", help="create, list, revert, delete snapshots; extract VM state")
    snap = p.add_subparsers(dest="action", required=True, parser_class=_Parser)
    q = snap.add_parser("create")
    q.add_argument("--vmstate", metavar="FILE", help="VM state to keep with the snapshot")
    q.add_argument("--vm-clock", type=int, metavar="NS", help="guest clock at the snapshot, in ns")
    q.add_argument("image")
    q.add_argument("name")
    q = snap.add_parser("list")
    output(q)
    share(q)
    q.add_argument("image")
    for action in ("revert", "delete"):
        q = snap.add_parser(action)
        if action == "delete":
            progress_options(q)
        q.add_argument("image")
        q.add_argument("name")
    q = snap.add_parser("vmstate")
    share(q)
    q.add_argument("image")
    q.add_argument("name")
    q.add_argument("outfile")
    p.set_defaults(run=cmd_snapshot)

    p = sub.add_parser("clone", help="a new writable image from a snapshot")
    p.add_argument("image")
    p.add_argument("name")
    p.add_argument("new_image")
    p.set_defaults(run=cmd_clone)

    p = sub.add_parser("commit", help="write the image's sectors into its base and empty it")
    progress_options(p)
    allow(p)
    p.add_argument("image")
    p.set_defaults(run=cmd_commit)

    p = sub.add_parser("rebase", help="put the image on another base (-u: only rewrite the reference)")
    p.add_argument("-b", default="", metavar="NEWBASE", help="the new base; empty for none")
    p.add_argument("-F", choices=("raw", "lamina"), help="the new base's format")
    p.add_argument("-u", action="store_true", help="unsafe: do not copy differing sectors")
    progress_options(p)
    allow(p)
    p.add_argument("image")
    p.set_defaults(run=cmd_rebase)

    p = sub.add_parser("diff", help="guest ranges that differ between two images or snapshots (IMAGE@SNAP)")
    output(p)
    share(p)
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(run=cmd_diff)

    p = sub.add_parser("compare", help="whether two disks read the same (exit 0), differ (1, with the first "
                                       "differing offset) or an error (2), as qemu-img compare")
    output(p)
    share(p)
    allow(p)
    p.add_argument("-f", metavar="FMT", help="format of A (default: detected; qemu-img formats need qemu-utils)")
    p.add_argument("-F", metavar="FMT", help="format of B")
    p.add_argument("-s", "--strict", action="store_true", help="differing sizes or allocation are a difference too")
    progress_options(p)
    p.add_argument("a", help="IMAGE, IMAGE@SNAP, a raw file or a qemu-img format's image")
    p.add_argument("b")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("info", help="show an image's geometry and state; --tree draws its layers")
    output(p)
    share(p)
    p.add_argument("--tree", action="store_true", help="the layer tree: bases, snapshots, clones' origins, current state")
    p.add_argument("--dot", action="store_true", help="the layer tree as Graphviz DOT (`dot -Tsvg` draws it)")
    allow(p)
    p.add_argument("image")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("check", help="verify an image and its layers; exit 0/1/2/3 as qemu-img check")
    output(p)
    p.add_argument("--repair", action="store_true", help="restore damaged metadata from its good copy, reclaim leaks")
    p.add_argument("--from", dest="replica", metavar="REPLICA", help="with --repair: rewrite data clusters that fail "
                   "their checksum from REPLICA, an image holding the same snapshots (made by send/receive)")
    progress_options(p)
    share(p)
    p.add_argument("--allow-base", action="append", metavar="PATH", help="a base outside the image's directory to follow")
    p.add_argument("image")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("scrub", help="read and verify every data cluster of every layer; exit as check")
    output(p)
    progress_options(p)
    p.add_argument("--rate", metavar="BYTES", help="read at most this much a second (k/M/G suffixes), to spare the host")
    p.add_argument("--from", dest="replica", metavar="REPLICA", help="rewrite data that fails its checksum from REPLICA")
    p.add_argument("image")
    p.set_defaults(run=cmd_scrub)

    p = sub.add_parser("dedup", help="store equal clusters of frozen layers (snapshots, bases) once, in the "
                       "directory's shared store lamina-store.lam")
    output(p)
    progress_options(p)
    p.add_argument("--across", action="append", metavar="IMAGE_OR_DIR",
                   help="also deduplicate against these images (or every image of a directory): same directory only")
    p.add_argument("--dry-run", action="store_true", help="report what would be saved; write nothing")
    p.add_argument("--gc", action="store_true", help="only collect store clusters that no layer references")
    p.add_argument("--snapshot", metavar="NAME", help="first take a snapshot NAME of each image, freezing its top")
    p.add_argument("image", nargs="+")
    p.set_defaults(run=cmd_dedup)

    p = sub.add_parser("map", help="list guest extents (and metadata regions)")
    output(p)
    share(p)
    allow(p)
    p.add_argument("--metadata", action="store_true", help="also list every metadata copy in the file")
    p.add_argument("--svg", metavar="FILE", help="also draw the layer files as SVG into a new FILE (- for standard "
                                                "output, then alone): where data, map copies and roots sit, and "
                                                "which layer serves each guest range")
    p.add_argument("image")
    p.set_defaults(run=cmd_map)

    p = sub.add_parser("convert", help="copy between lamina, raw and every format qemu-img knows (qcow2, vmdk, vhdx, "
                                       "vdi...), keeping holes sparse")
    p.add_argument("-f", metavar="FMT", help="source format: lamina, raw, or a qemu-img format (default: detected)")
    p.add_argument("-O", metavar="FMT", default="lamina", help="target format: lamina (default), raw, or a qemu-img "
                                                            "format such as qcow2, vmdk, vhdx, vdi (needs qemu-utils)")
    p.add_argument("-o", metavar="OPTIONS", help="qemu-img create options of a foreign target (e.g. subformat=...)")
    p.add_argument("-t", metavar="CACHE", default="writeback",
                   help="the target's cache mode, as with qemu-img: writeback (default) makes the copy durable before "
                        "exit; unsafe (qemu-img convert's default) makes no fsync: faster, but until the host has "
                        "written the file back a power loss or host crash can keep any part of the copy, the commit "
                        "protocol's ordering is not kept, and check may then find nothing wrong with an incomplete "
                        "copy (a lamina or raw target; an exit of this process alone loses nothing)")
    p.add_argument("--cluster-size", default="64k")
    progress_options(p)
    share(p)
    allow(p)
    p.add_argument("src", help="a raw file, IMAGE or IMAGE@SNAPSHOT, or an image of a qemu-img format (qcow2@SNAP too)")
    p.add_argument("dst")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("send", help="write a snapshot (IMAGE@SNAP) as a verified stream, or only what changed since -i SNAP")
    p.add_argument("-i", metavar="SNAP", help="send only what changed since this snapshot (the receiver holds it)")
    p.add_argument("-o", metavar="FILE", help="write the stream to a new FILE (default: standard output)")
    p.add_argument("-v", "--verbose", action="store_true", help="report the stream's size on standard error")
    p.add_argument("--resume-at", type=int, default=0, metavar="N", help="leave out the first N bytes: the rest of a "
                   "stream a receiver kept N bytes of (receive --partial)")
    share(p)
    p.add_argument("image", help="IMAGE@SNAPSHOT")
    p.set_defaults(run=cmd_send)

    p = sub.add_parser("receive", help="receive a stream made by send: a new image, or a snapshot on top of one held")
    p.add_argument("-i", metavar="FILE", help="read the stream from FILE (default: standard input)")
    p.add_argument("-F", action="store_true", help="drop writes the image made since its last snapshot")
    p.add_argument("--partial", metavar="FILE", help="keep what verified of an interrupted stream in FILE, and read "
                   "FILE's bytes first when it exists (resume with send --resume-at)")
    p.add_argument("image")
    p.set_defaults(run=cmd_receive)

    p = sub.add_parser("resize", help="grow or shrink the guest disk (SIZE, +SIZE or -SIZE)")
    p.add_argument("--shrink", action="store_true")
    p.add_argument("image")
    p.add_argument("size")
    p.set_defaults(run=cmd_resize)

    p = sub.add_parser("serve", help="export IMAGE or IMAGE@SNAP over NBD through nbdkit, until SIGINT/SIGTERM")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on this Unix socket")
    where.add_argument("--port", type=int, metavar="N", help="listen on this TCP port (default 10809, the NBD port)")
    p.add_argument("--bind", default="127.0.0.1", metavar="ADDR", help="the TCP address to listen on (default 127.0.0.1)")
    p.add_argument("-r", "--readonly", action="store_true", help="export read-only (a snapshot always is)")
    p.add_argument("--shared", type=int, default=1, metavar="N", help="clients at once (default 1; 0: no limit)")
    p.add_argument("--pid-file", metavar="PATH", help="nbdkit writes its process id here once it is serving")
    allow(p)
    p.add_argument("image", help="IMAGE or IMAGE@SNAPSHOT")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("schema", help="list the JSON Schemas of --output json, or print one (lamina.info/2...)")
    p.add_argument("name", nargs="?")
    p.set_defaults(run=cmd_schema)

    p = sub.add_parser("vectors", help="generate the conformance kit's vectors into a new directory")
    p.add_argument("dir")
    p.set_defaults(run=cmd_vectors)

    p = sub.add_parser("conform", help="run the conformance vectors on an implementation's driver (conform/PROTOCOL.md)")
    p.add_argument("--impl", required=True, metavar="COMMAND", help="the driver command, shell-quoted, e.g. "
                   "'python -m lamina.conform.reference'")
    p.add_argument("--vectors", metavar="DIR", help="vectors made by `lamina vectors` (default: generate them afresh)")
    p.add_argument("--output", choices=("human", "json", "junit"), default="human")
    p.add_argument("--category", action="append", choices=("valid", "invalid", "scripts", "crash"),
                   help="run only this category (repeatable)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="seconds each driver command may take")
    p.add_argument("--jobs", type=int, default=2, metavar="N", help="vectors run at once (default 2)")
    p.set_defaults(run=cmd_conform)

    p = sub.add_parser("io", help="run qemu-io-like commands: -c 'write -P 0xab 0 64k', or one a line from -f FILE "
                                  "or standard input")
    p.add_argument("-c", action="append", metavar="CMD", help="a command to run (repeatable, in order)")
    p.add_argument("-f", metavar="FILE", help="run the commands of FILE, one a line, after any -c (- for standard input; "
                                              "with neither, commands come from standard input)")
    p.add_argument("-r", "--read-only", action="store_true")
    share(p)
    allow(p)
    p.add_argument("image")
    p.set_defaults(run=cmd_io)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="backslashreplace")  # a file name that is not UTF-8 prints escaped, as on stderr
    if argv[:1] == ["resize"] and argv[-1][:1] == "-" and argv[-1][1:2].isdigit():
        argv.insert(len(argv) - 1, "--")  # `resize IMG -1G` shrinks, as with qemu-img
    commands: list[str] = []
    if argv[:1] == ["io"]:
        commands, argv = take_io_commands(argv)
    try:
        args = parser_for(argv).parse_args(argv)
        if commands:
            args.c = commands + (args.c or [])
        return args.run(args)
    except (LaminaError, OSError) as exc:
        print(error_line(exc), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
