"""Generate `spec/FORMAT.md` from its prose template and the spec's declarations.

The field tables, the constants and the list of proved properties are
rendered from the same objects that encode, decode and validate, so the
document cannot drift from the code: a test regenerates it and compares.

    python -m lamina.spec.document          # print the document
    python -m lamina.spec.document --write  # rewrite spec/FORMAT.md
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from . import layout, structures
from .declare import markdown_table

HERE = Path(__file__).parent
TEMPLATE = HERE / "FORMAT.in.md"
OUTPUT = HERE / "FORMAT.md"
EXT4_MAX_FILE = (1 << 44) - 4096  # ext4 with 4 KiB blocks: 16 TiB minus one block


def constants_table() -> str:
    """Every constant of `spec/layout.py` with its value."""
    rows = ["| constant | value |", "|---|---:|"]
    for name in ("FORMAT_VERSION", "SECTOR_SIZE", "MIN_CLUSTER_BITS", "MAX_CLUSTER_BITS", "DEFAULT_CLUSTER_BITS",
                 "CLUSTERS_PER_REGION", "REGION_STRIDE_CLUSTERS", "ROOT_SIZE", "ROOT_SLOT_SIZE", "ROOT_SLOTS",
                 "ROOT_AREA_SIZE", "MAX_VIRTUAL_SIZE", "MAX_INTENTS", "MAP_HEADER_SIZE", "MAP_CRCS_OFFSET",
                 "MAP_BITMAP_OFFSET", "MAX_BASE_PATH", "SNAPSHOT_ENTRY_SIZE", "MAX_SNAPSHOTS", "MAX_CHAIN_DEPTH",
                 "MAX_VMSTATE_SIZE"):
        rows.append(f"| `{name}` | {getattr(layout, name)} |")
    return "\n".join(rows)


def max_virtual_size_for_file_limit(cluster_bits: int, file_limit: int) -> int:
    """The largest virtual size whose image file fits under a host's file-size limit."""
    g = layout.Geometry(cluster_bits, 0)
    regions = (file_limit - g.first_region_offset) // g.region_stride
    return min(layout.MAX_VIRTUAL_SIZE, regions * g.region_span)


def geometry_table() -> str:
    """Per cluster size: region span, map copy length, metadata share, and the ext4 limit."""
    rows = ["| cluster size | region span | map copy (used bytes) | map bytes per guest byte | largest virtual size on ext4 |",
            "|---:|---:|---:|---:|---:|"]
    for bits in range(layout.MIN_CLUSTER_BITS, layout.MAX_CLUSTER_BITS + 1):
        g = layout.Geometry(bits, 0)
        limit = max_virtual_size_for_file_limit(bits, EXT4_MAX_FILE)
        rows.append(f"| {g.cluster_size >> 10} KiB | {g.region_span >> 20 if g.region_span >= 1 << 20 else g.region_span >> 10}"
                    f" {'MiB' if g.region_span >= 1 << 20 else 'KiB'} | {g.map_used_length} | "
                    f"{2 * g.map_used_length / g.region_span:.4%} | {limit} ({limit / (1 << 40):.2f} TiB) |")
    return "\n".join(rows)


def root_tail_table() -> str:
    """The variable part of a root copy, after its fixed 4096 bytes."""
    rows = ["| offset | size | field | meaning |", "|---|---|---|---|"]
    rows += [f"| {offset} | {size} | `{name}` | {doc} |" for name, offset, size, doc in structures.ROOT_TAIL]
    return "\n".join(rows)


def map_tail_table() -> str:
    """The optional part of a map copy after its presence bitmap (F-SHARE-002)."""
    rows = ["| offset | size | field | meaning |", "|---|---|---|---|"]
    rows += [f"| {offset} | {size} | `{name}` | {doc} |" for name, offset, size, doc in structures.MAP_TAIL]
    return "\n".join(rows)


def errors_table() -> str:
    """Every named error the spec raises, with what it means: what a reader must report, by name."""
    from . import errors, references, store, stream

    rows = ["| error | kind of | meaning |", "|---|---|---|"]
    for module in (errors, references, store, stream):
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, errors.LaminaError) and value.__module__ == module.__name__:
                parent = value.__mro__[1].__name__
                rows.append(f"| `{name}` | {parent} | {(value.__doc__ or '').strip().splitlines()[0]} |")
    return "\n".join(rows)


def findings_tables() -> str:
    """The classes of `check` findings with their exit codes, then every finding kind with its class."""
    from .check import FINDING_CLASSES, FINDING_KINDS

    rows = ["| class | exit code | meaning |", "|---|---:|---|"]
    rows += [f"| *{name}* | {code} | {meaning} |" for name, (code, meaning) in FINDING_CLASSES.items()]
    rows += ["", "| finding | class | when |", "|---|---|---|"]
    rows += [f"| `{kind}` | *{cls}* | {when} |" for kind, cls, when in FINDING_KINDS]
    return "\n".join(rows)


def _stream_table(name: str) -> str:
    from . import stream

    return markdown_table(getattr(stream, name))


def proofs_table() -> str:
    try:
        from .proofs import properties_markdown  # type: ignore[attr-defined]
    except ImportError:
        return "_The proofs package does not list its properties yet._"
    return properties_markdown()


PLACEHOLDERS = {
    "fields:Root": lambda: markdown_table(structures.Root),
    "fields:MapCopy": lambda: markdown_table(structures.MapCopy),
    "fields:SnapshotEntry": lambda: markdown_table(structures.SnapshotEntry),
    "fields:RecordHeader": lambda: _stream_table("RecordHeader"),
    "fields:StreamBegin": lambda: _stream_table("StreamBegin"),
    "fields:StreamEnd": lambda: _stream_table("StreamEnd"),
    "root_tail": lambda: root_tail_table(),
    "map_tail": lambda: map_tail_table(),
    "constants": constants_table,
    "geometry": geometry_table,
    "proofs": proofs_table,
    "errors": errors_table,
    "findings": findings_tables,
}


def render() -> str:
    """The format document: the template with every `{{placeholder}}` rendered."""
    text = TEMPLATE.read_text()
    return re.sub(r"\{\{([\w:]+)\}\}", lambda m: PLACEHOLDERS[m.group(1)](), text)


def main(argv: list[str]) -> int:
    document = render()
    if "--write" in argv:
        OUTPUT.write_text(document)
    else:
        sys.stdout.write(document)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
