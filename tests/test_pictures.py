"""Pictures: `info --tree --dot` is Graphviz DOT of the layer tree; `map --svg` draws the layer files as `map` lists them."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import pytest

from lamina.impl.cli import main
from lamina.impl.image import Image

SVG = "{http://www.w3.org/2000/svg}"
MiB = 1 << 20


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A raw base, two snapshots over it, a current state, and a clone of the first snapshot."""
    monkeypatch.chdir(tmp_path)
    with open("b.raw", "wb") as f:
        f.truncate(8 * MiB)
        f.seek(6 * MiB)
        f.write(b"\x77" * 4096)
    assert 0 == main(["create", "-b", "b.raw", "-F", "raw", "d.lam"])
    assert 0 == main(["io", "d.lam", "-c", "write -P 1 0 1M", "-c", "write -P 2 3M 512k"])
    assert 0 == main(["snapshot", "create", "d.lam", "s1"])
    assert 0 == main(["io", "d.lam", "-c", "write -P 3 512k 1M"])
    assert 0 == main(["snapshot", "create", "d.lam", "s2"])
    assert 0 == main(["io", "d.lam", "-c", "write -P 4 7M 64k", "-c", "write -z 3M 4k"])
    assert 0 == main(["clone", "d.lam", "s1", "c.lam"])
    return tmp_path


def json_of(capsys, *args: str):
    capsys.readouterr()
    assert 0 == main([*args, "--output", "json"])
    return json.loads(capsys.readouterr().out)


def test_tree_dot_is_well_formed_and_has_every_layer(tree, capsys):
    data = json_of(capsys, "info", "--tree", "d.lam")
    capsys.readouterr()
    assert 0 == main(["info", "--tree", "--dot", "d.lam"])
    dot = capsys.readouterr().out
    assert dot.startswith("digraph lamina {") and dot.rstrip().endswith("}")
    nodes = dict(re.findall(r'^\s*(n\d+) \[label="((?:[^"\\]|\\.)*)"', dot, re.M))
    edges = re.findall(r"^\s*(n\d+) -> (n\d+);", dot, re.M)

    def walk(node, parent=None):
        yield node, parent
        for child in node["children"]:
            yield from walk(child, node)
    expected = [(n, p) for root in data["layers"] for n, p in walk(root)]
    assert len(nodes) == len(expected) == 4 and len(edges) == 3
    assert all(a in nodes and b in nodes for a, b in edges)
    names = [label.split("\\n")[0] for label in nodes.values()]
    assert names == [n["name"] for n, _ in expected]
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed (Debian package graphviz): DOT checked structurally only")
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, check=True, timeout=60).stdout
    drawn = ET.fromstring(svg)
    assert len(drawn.findall(f".//{SVG}g[@class='node']")) == 4 and len(drawn.findall(f".//{SVG}g[@class='edge']")) == 3


def rects(svg: ET.Element, cls: str, layer: int | None = None) -> list[dict]:
    out = []
    for r in svg.iter(f"{SVG}rect"):
        if r.get("class") == cls and (layer is None or r.get("data-layer") == str(layer)):
            out.append({k[5:]: int(v) if v.isdigit() else v for k, v in r.attrib.items() if k.startswith("data-")})
    return out


def test_map_svg_draws_what_map_lists_and_which_layer_serves_each_range(tree, capsys):
    assert 0 == main(["map", "--svg", "m.svg", "d.lam"])
    svg = ET.parse("m.svg").getroot()
    assert svg.tag == f"{SVG}svg"
    listed = json_of(capsys, "map", "--metadata", "d.lam")
    data = [{"layer": 0, "offset": e["offset"], "length": e["length"], "start": e["start"]}
            for e in listed["extents"] if e["data"]]
    assert rects(svg, "data", 0) == data and data
    meta = [{"layer": 0, "offset": m["offset"], "length": m["length"], "copy": m["copy"],
             **({"region": m["region"]} if "region" in m else {})} for m in listed["metadata"]]
    assert sorted(rects(svg, "root", 0) + rects(svg, "map", 0), key=lambda m: m["offset"]) == \
        sorted(meta, key=lambda m: m["offset"])
    served = rects(svg, "serve")
    with Image.open("d.lam", readonly=True) as image:
        chain = image.chain()
        assert _merged(served) == image.guest_data_ranges()
        for s in served:
            layer = chain[s["layer"]]
            assert image.read(s["start"], s["length"]) == layer.read(s["start"], s["length"]), s
        assert {s["layer"] for s in served} == {0, 1, 2, 3}  # every file serves something here
        assert [f["layer"] for f in rects(svg, "file")] == list(range(len(chain)))
    assert 0 == main(["map", "--svg", "-", "c.lam"])
    clone = ET.fromstring(capsys.readouterr().out)
    assert {s["layer"] for s in rects(clone, "serve")} == {1, 2}  # the clone reads s1's layer and the raw base


def _merged(served: list[dict]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in sorted(served, key=lambda s: s["start"]):
        lo, hi = s["start"], s["start"] + s["length"]
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out
