"""Pictures of an image: its layer tree as Graphviz DOT (`info --tree --dot`) and its files as SVG (`map --svg`).

The SVG draws, for each layer file of the chain (top first), where in the
file the root copies, the map copies and the guest data sit, and above them
one bar of the guest disk coloured by the layer that serves each range.
Every shape carries its numbers as attributes (`data-offset`,
`data-length`, `data-start`, `data-layer`), so a test or a script can check
the drawing against `map --output json`.
"""
from __future__ import annotations

import os
from xml.sax.saxutils import escape, quoteattr

from lamina.spec.layout import ROOT_SLOT_SIZE, root_copy_offset

from .image import Image, MetadataRegion, RawBase
from .layers import gaps
from .sizes import format_size

WIDTH, LEFT, BAR, GAP = 960, 10, 22, 44
COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#e15759")
META = {"root": "#d62728", "map": "#222222"}
SLOT = "#f4a6a6"  # a frozen layer's root: its whole fixed slot


# ---------------------------------------------------------------------------- DOT
def _dot_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def tree_dot(data: dict) -> str:
    """The layer tree (`layers.tree`) as a Graphviz digraph: bases at the top, arrows from a layer to what it bears."""
    lines = ["digraph lamina {", "    rankdir=TB;", '    node [shape=box, style="rounded,filled", fontname="Helvetica"];']
    counter = iter(range(1 << 30))

    def node_id() -> str:
        return f"n{next(counter)}"

    def label(node: dict) -> tuple[str, str]:
        kind = node["kind"]
        if kind == "base":
            return f"{node['name']}\nbase ({node['format']})", "#eeeeee"
        if kind == "layer":
            return f"{node['name']}\nfrozen layer of another image\n{format_size(node['disk_size'])}", "#f5f5dc"
        if kind == "current":
            return f"{node['name']}\ncurrent state\n{format_size(node['disk_size'])}", "#c6e5ff"
        vm = f"\nVM state {format_size(node['vmstate_size'])}" if node["vmstate_size"] else ""
        return f"{node['name']}\nsnapshot {node['id']}, {format_size(node['disk_size'])}{vm}", "#fff2b3"

    def walk(node: dict, parent: str | None) -> None:
        me = node_id()
        text, colour = label(node)
        bold = ", penwidth=2" if node["kind"] == "current" else ""
        lines.append(f"    {me} [label={_dot_string(text)}, fillcolor={_dot_string(colour)}{bold}];")
        if parent is not None:
            lines.append(f"    {parent} -> {me};")
        for child in node["children"]:
            walk(child, me)

    for node in data["layers"]:
        walk(node, None)
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- who serves what
def _intersect(ranges: list[tuple[int, int]], other: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(max(lo, a), min(hi, b)) for lo, hi in ranges for a, b in other if max(lo, a) < min(hi, b)]


def served_ranges(image: Image) -> list[tuple[int, int, int]]:
    """(start, end, depth) of every guest range some layer holds, with the depth (0: top) of the layer serving it."""
    remaining = [(0, image.virtual_size)]
    out: list[tuple[int, int, int]] = []
    for depth, layer in enumerate(image.chain()):
        if isinstance(layer, RawBase):
            held = sorted((o, o + n) for o, n in layer.data_extents())
        else:
            held = [(e.start, e.start + e.length) for e in layer.extents() if e.data]
        mine = _intersect(remaining, held)
        out += [(lo, hi, depth) for lo, hi in mine]
        if isinstance(layer, RawBase):
            break
        remaining = _intersect([g for lo, hi in remaining for g in gaps(held, lo, hi)], [(0, layer._base_limit())])
        if not remaining:
            break
    return sorted(out)


# ---------------------------------------------------------------------------- SVG
def _metadata(layer: Image) -> list[MetadataRegion]:
    """A layer's metadata copies; a frozen layer opened in a chain has no snapshot table loaded (its root's
    exact length is unknown), so its root copies are drawn as their whole fixed slots."""
    if layer.root.snapshots is not None:
        return layer.metadata_regions()
    slots = [MetadataRegion(root_copy_offset(slot), ROOT_SLOT_SIZE, "root", slot) for slot in (0, 1)]
    return slots + _maps_of(layer)


def _maps_of(layer: Image) -> list[MetadataRegion]:
    g = layer.geometry
    return [MetadataRegion(g.map_copy_offset(region, slot), g.map_used_length, "map", slot, region)
            for region in layer._regions_in_use() if layer._map(region) is not None for slot in (0, 1)]


def _rect(x: float, y: float, w: float, h: float, fill: str, cls: str, title: str, **data: object) -> str:
    attrs = "".join(f" data-{k.replace('_', '-')}={quoteattr(str(v))}" for k, v in data.items())
    return (f'<rect class="{cls}" x="{x:.2f}" y="{y:.2f}" width="{max(w, 1.0):.2f}" height="{h:.2f}" '
            f'fill="{fill}"{attrs}><title>{escape(title)}</title></rect>')


def _text(x: float, y: float, text: str, size: int = 12, weight: str = "normal") -> str:
    return (f'<text x="{x:.2f}" y="{y:.2f}" font-family="Helvetica, Arial, sans-serif" font-size="{size}" '
            f'font-weight="{weight}">{escape(text)}</text>')


def _layer_name(layer: Image | RawBase, top: Image) -> str:
    path = layer.path
    return os.path.relpath(path, os.path.dirname(os.path.abspath(top.path)) or ".") if path != top.path else os.path.basename(path)


def map_svg(image: Image) -> str:
    """The SVG picture of an open image's files (see the module's docstring)."""
    chain = image.chain()
    names = [_layer_name(layer, image) for layer in chain]
    scale_w = WIDTH - 2 * LEFT
    parts: list[str] = []
    y = 20
    parts.append(_text(LEFT, y, f"{os.path.basename(image.path)}: guest disk of {format_size(image.virtual_size)}, "
                       f"{len(chain)} layer file(s)", 15, "bold"))
    y += 18
    parts.append(_text(LEFT, y, "Guest view: each range in the colour of the layer that serves it; blank reads zero. "
                       "Below, each layer file from offset 0 to its end."))
    y += 8
    size = max(image.virtual_size, 1)
    parts.append(f'<rect class="guest" x="{LEFT}" y="{y}" width="{scale_w}" height="{BAR}" fill="#ffffff" '
                 f'stroke="#888888" data-length="{image.virtual_size}"/>')
    for lo, hi, depth in served_ranges(image):
        parts.append(_rect(LEFT + lo / size * scale_w, y, (hi - lo) / size * scale_w, BAR, COLOURS[depth % len(COLOURS)],
                           "serve", f"guest {lo:#x}+{hi - lo:#x} from {names[depth]}", start=lo, length=hi - lo,
                           layer=depth))
    y += BAR + GAP
    for depth, layer in enumerate(chain):
        colour = COLOURS[depth % len(COLOURS)]
        if isinstance(layer, RawBase):
            length = max(layer.virtual_size, 1)
            rows = [("data", o, n, None) for o, n in layer.data_extents()]
            heading = f"layer {depth}: {names[depth]} (raw base, {format_size(layer.virtual_size)})"
        else:
            length = max(layer.geometry.file_length, 1)
            rows = [("data", e.offset, e.length, e.start) for e in layer.extents() if e.data and e.file is None]
            rows += [(m.kind, m.offset, m.length, m) for m in _metadata(layer)]
            kind = "top" if depth == 0 else "frozen layer"
            heading = f"layer {depth}: {names[depth]} ({kind}, file of {format_size(length)})"
        parts.append(_text(LEFT, y - 6, heading, 13, "bold"))
        parts.append(f'<rect class="file" x="{LEFT}" y="{y}" width="{scale_w}" height="{BAR}" fill="#f7f7f7" '
                     f'stroke="#888888" data-layer="{depth}" data-length="{length}"/>')
        for kind, offset, n, extra in rows:
            x, w = LEFT + offset / length * scale_w, n / length * scale_w
            if kind == "data":
                data = {"layer": depth, "offset": offset, "length": n}
                if extra is not None:
                    data["start"] = extra
                where = f", guest {extra:#x}" if extra is not None else ""
                parts.append(_rect(x, y + 4, w, BAR - 8, colour, "data", f"data at {offset:#x}+{n:#x}{where}", **data))
            else:
                region = "" if extra.region is None else f" of region {extra.region}"
                data = {"layer": depth, "offset": offset, "length": n, "copy": "AB"[extra.copy]}
                if extra.region is not None:
                    data["region"] = extra.region
                slot = kind == "root" and n == ROOT_SLOT_SIZE and layer.root.snapshots is None
                what = f"root slot {'AB'[extra.copy]} (the copy's exact length is not loaded)" if slot else \
                    f"{kind} copy {'AB'[extra.copy]}{region}"
                parts.append(_rect(x, y, w, BAR, SLOT if slot else META[kind], kind, f"{what} at {offset:#x}+{n:#x}",
                                   **data))
        y += BAR + GAP
    legend = [("root copy", META["root"]), ("root slot", SLOT), ("map copy", META["map"])] + [
        (f"data of layer {d}", COLOURS[d % len(COLOURS)]) for d in range(len(chain))]
    x = LEFT
    for label, colour in legend:
        parts.append(f'<rect x="{x}" y="{y - 12}" width="12" height="12" fill="{colour}"/>')
        parts.append(_text(x + 16, y - 2, label, 11))
        x += 24 + 7 * len(label)
    height = y + 10
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
            f'viewBox="0 0 {WIDTH} {height}">\n<rect width="100%" height="100%" fill="#ffffff"/>\n'
            + "\n".join(parts) + "\n</svg>\n")
