"""The `lamina` command: create, info, check, map, convert, resize, io.

Exit codes: 0 success; 1 an error (message on stderr, one line, no
traceback); `check` as `qemu-img check`: 0 clean, 1 check not completed,
2 corruption found, 3 leaked space only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from tqdm import tqdm

from lamina.spec.check import CheckReport, check_image
from lamina.spec.errors import InvalidArgument, LaminaError
from lamina.spec.repair import repair_image

from .convert import convert, detect_format
from .image import Image
from .iocmd import run_command
from .osfile import OsStorage
from .sizes import format_size, parse_size

EXIT_OK = 0
EXIT_ERROR = 1


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error; 2 means corruption for `check`, so usage errors raise."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InvalidArgument(f"{self.prog}: {message}")


def _emit(args: argparse.Namespace, data: object, text: str) -> None:
    if getattr(args, "output", "human") == "json":
        print(json.dumps(data, indent=4))
    else:
        print(text, end="" if text.endswith("\n") or not text else "\n")


def cmd_create(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    cluster = parse_size(args.cluster_size, "cluster size")
    Image.create(args.image, size, cluster).close()
    print(f"Formatting '{args.image}', fmt=lamina cluster_size={cluster} size={size}")
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    with Image.open(args.image, readonly=True) as image:
        root = image.root
        disk = os.stat(args.image).st_blocks * 512
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
                    "compatible-features": root.compatible_features,
                },
            },
        }
        text = (f"image: {args.image}\nfile format: lamina\n"
                f"virtual size: {format_size(root.virtual_size)} ({root.virtual_size} bytes)\n"
                f"disk size: {format_size(disk)}\ncluster_size: {image.cluster_size}\n"
                f"Format specific information:\n    version: {root.version}\n"
                f"    uuid: {root.image_uuid.hex()}\n    generation: {root.generation}\n"
                f"    unclean shutdown: {'yes, ' + str(len(root.intents)) + ' regions to recover' if root.intents else 'no'}\n")
        _emit(args, data, text)
    return EXIT_OK


def _describe(report: CheckReport) -> str:
    lines = [f"{f.severity.upper()}: {f.message}" for f in report.findings]
    if not report.completed:
        lines.append("Check could not be completed: the image's root is unreadable.")
    elif report.corruptions:
        lines.append(f"\n{len(report.corruptions)} errors were found on the image.\n"
                     "Data may be corrupted, or further writes to the image may corrupt it.")
    if report.completed and report.leaks:
        lines.append(f"\n{len(report.leaks)} leaked ranges were found on the image.\n"
                     "This means waste of disk space, but no harm to data.")
    if report.completed and not report.corruptions and not report.leaks:
        lines.append("No errors were found on the image.")
    lines.append(f"{report.clusters_checked} clusters in {report.regions_checked} regions verified.")
    return "\n".join(lines)


def cmd_check(args: argparse.Namespace) -> int:
    file = OsStorage().open(args.image, writable=args.repair)
    try:
        if args.repair:
            before, after = repair_image(file)
            repaired = len(before.corruptions) + len(before.leaks) - len(after.corruptions) - len(after.leaks)
            data = {"before": before.to_json(), "after": after.to_json(), "repaired": repaired}
            text = ("The following inconsistencies were found and repaired:\n"
                    + "\n".join(f"    {f.message}" for f in before.findings if f.repair) + "\n\n"
                    + _describe(after)) if before.findings else _describe(after)
            _emit(args, data, text)
            return after.exit_code
        report = check_image(file)
        _emit(args, report.to_json(), _describe(report))
        return report.exit_code
    finally:
        file.close()


def cmd_map(args: argparse.Namespace) -> int:
    with Image.open(args.image, readonly=True) as image:
        extents = [{"start": e.start, "length": e.length, "depth": 0, "present": e.data, "zero": not e.data,
                    "data": e.data, **({"offset": e.offset} if e.data else {})} for e in image.extents()]
        data: object = extents
        rows = ["Offset          Length          Mapped to       File"]
        rows += [f"{hex(e['start']):<16}{hex(e['length']):<16}{hex(e['offset']):<16}{args.image}" for e in extents if e["data"]]
        if args.metadata:
            meta = [{"offset": m.offset, "length": m.length, "kind": m.kind, "copy": "AB"[m.copy],
                     **({"region": m.region} if m.region is not None else {})} for m in image.metadata_regions()]
            data = {"extents": extents, "metadata": meta}
            rows += ["", "Metadata        Length          Kind    Copy  Region"]
            rows += [f"{hex(m['offset']):<16}{hex(m['length']):<16}{m['kind']:<8}{m['copy']:<6}{m.get('region', '')}" for m in meta]
        _emit(args, data, "\n".join(rows))
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    src_format = args.f or detect_format(args.src)
    bar = tqdm(total=None, unit="B", unit_scale=True, disable=not args.progress, desc="convert")
    try:
        convert(args.src, args.dst, args.O, src_format, parse_size(args.cluster_size, "cluster size"), bar.update)
    finally:
        bar.close()
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


def cmd_io(args: argparse.Namespace) -> int:
    with Image.open(args.image, readonly=args.read_only) as image:
        for command in args.c or []:
            run_command(image, command, sys.stdout)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lamina", description="Lamina virtual-disk images: create, inspect, check, convert, run I/O.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def output(p: argparse.ArgumentParser) -> None:
        p.add_argument("--output", choices=("human", "json"), default="human")

    p = sub.add_parser("create", help="create a new image")
    p.add_argument("--cluster-size", default="64k", help="4k to 2M, a power of two (default 64k)")
    p.add_argument("image")
    p.add_argument("size")
    p.set_defaults(run=cmd_create)

    p = sub.add_parser("info", help="show an image's geometry and state")
    output(p)
    p.add_argument("image")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("check", help="verify an image against the format; exit 0/1/2/3 as qemu-img check")
    output(p)
    p.add_argument("--repair", action="store_true", help="restore damaged metadata from its good copy, reclaim leaks")
    p.add_argument("image")
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("map", help="list guest extents (and metadata regions)")
    output(p)
    p.add_argument("--metadata", action="store_true", help="also list every metadata copy in the file")
    p.add_argument("image")
    p.set_defaults(run=cmd_map)

    p = sub.add_parser("convert", help="copy between raw and lamina, keeping holes sparse")
    p.add_argument("-f", choices=("raw", "lamina"), help="source format (default: detected)")
    p.add_argument("-O", choices=("raw", "lamina"), default="lamina", help="target format")
    p.add_argument("--cluster-size", default="64k")
    p.add_argument("-p", "--progress", action="store_true")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("resize", help="grow or shrink the guest disk (SIZE, +SIZE or -SIZE)")
    p.add_argument("--shrink", action="store_true")
    p.add_argument("image")
    p.add_argument("size")
    p.set_defaults(run=cmd_resize)

    p = sub.add_parser("io", help="run qemu-io-like commands: -c 'write -P 0xab 0 64k'")
    p.add_argument("-c", action="append", metavar="CMD")
    p.add_argument("-r", "--read-only", action="store_true")
    p.add_argument("image")
    p.set_defaults(run=cmd_io)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["resize"] and argv[-1][:1] == "-" and argv[-1][1:2].isdigit():
        argv.insert(len(argv) - 1, "--")  # `resize IMG -1G` shrinks, as with qemu-img
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except LaminaError as exc:
        print(f"lamina: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"lamina: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
