"""The format document is generated from the declarations and cannot drift from them (S1)."""
from __future__ import annotations

import re
from pathlib import Path

from lamina.spec import document, layout

ROOT = Path(__file__).resolve().parent.parent


def test_format_document_is_up_to_date():
    committed = (ROOT / "spec" / "FORMAT.md").read_text()
    assert document.render() == committed, "run: python -m lamina.spec.document --write"


def test_annotated_constants_match_their_values():
    """`NAME = expr  # (= 4 KiB)` and `# (= 130: ...)` annotations are checked against the computed value."""
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "PiB": 1 << 50}
    checked = 0
    for line in (ROOT / "spec" / "layout.py").read_text().splitlines():
        match = re.match(r"^([A-Z_]+) = .*# \(= (\d+)(?: (KiB|MiB|GiB|PiB))?[):]", line)
        if match and not match.group(1).endswith("_BITS"):
            name, number, unit = match.groups()
            value = getattr(layout, name)
            expected = int(number) * units[unit] if unit else int(number)
            assert expected == value, f"{name} is {value}, its comment says {number} {unit or ''}"
            checked += 1
        bits = re.match(r"^([A-Z_]+_BITS) = (\d+)  # \(= (\d+) (KiB|MiB)\)", line)
        if bits:
            assert 1 << int(bits.group(2)) == int(bits.group(3)) * units[bits.group(4)]
            checked += 1
    assert checked >= 8


def test_every_rule_id_is_unique():
    text = (ROOT / "spec" / "FORMAT.md").read_text()
    defined = re.findall(r"\b(F-[A-Z]+-\d{3})\b:", text)
    assert len(defined) == len(set(defined))
    assert len(set(re.findall(r"\bF-[A-Z]+-\d{3}\b", text))) >= 15


def test_ext4_limit_is_consistent_with_the_geometry():
    for bits in range(layout.MIN_CLUSTER_BITS, layout.MAX_CLUSTER_BITS + 1):
        size = document.max_virtual_size_for_file_limit(bits, document.EXT4_MAX_FILE)
        assert layout.Geometry(bits, size).file_length <= document.EXT4_MAX_FILE
        bigger = layout.Geometry(bits, size + layout.Geometry(bits, 0).region_span)
        assert bigger.file_length > document.EXT4_MAX_FILE
