"""Building blocks of the vector generators: vector directories, expect.json, forged roots, the reference's verdicts.

Generators build each vector's files inside its own directory (the working
directory while it runs, so that every base reference is stored relative),
with uuids and clocks fixed per vector (`lamina.impl.identity`), and ask the
reference for the verdicts through the same functions the driver runs.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Iterator

import attrs

from lamina.impl.identity import fixed_identities
from lamina.impl.image import Image
from lamina.impl.layers import open_target, parse_target
from lamina.impl.osfile import OsStorage
from lamina.spec.abstraction import abstract_layer
from lamina.spec.layout import ROOT_SLOT_SIZE, root_copy_offset
from lamina.spec.model import Disk
from lamina.spec.protocol import read_root_copies
from lamina.spec.references import ImageContext, layer_dir_of
from lamina.spec.replication import select_root
from lamina.spec.structures import Root, encode_root
from lamina.spec.tree import check_tree

from .covers import covers
from .errors import GenerationError
from .views import disk_view, read_ranges

MiB = 1 << 20
KiB = 1 << 10


def pattern(seed: int, length: int) -> bytes:
    """Distinctive, non-zero bytes: every 512-byte sector of every seed differs."""
    block = bytes((seed * 31 + i * 7 + 1) % 255 + 1 for i in range(509))  # 509 is prime: no sector repeats
    return (block * (length // 509 + 1))[:length]


@attrs.define
class Vector:
    """One vector being built: where, what it claims, and the expectation gathered so far."""

    category: str
    name: str
    directory: str
    expect: dict


@contextlib.contextmanager
def new_vector(root: str, category: str, name: str, description: str, needs: list[str],
               rules: list[str]) -> Iterator[Vector]:
    """Make `root/category/name`, run the block in it with fixed identities, then write expect.json."""
    directory = os.path.join(root, category, name)
    os.makedirs(directory)
    expect = {"category": category, "name": name, "description": description, "needs": needs, "rules": rules}
    vector = Vector(category, name, directory, expect)
    with contextlib.chdir(directory), fixed_identities(f"lamina-conform/{category}/{name}"):
        yield vector
    vector.expect["covers"] = covers(directory, vector.expect)
    with open(os.path.join(directory, "expect.json"), "w", encoding="utf-8") as fh:
        json.dump(vector.expect, fh, indent=1, sort_keys=True)
        fh.write("\n")


def reference_view(target: str, against: Disk | None = None) -> dict:
    """The guest view of `target` (IMAGE or IMAGE@SNAP) as the reference reads it, held against the spec's abstraction.

    `against`: the disk the vector's design says, held against the reference as well.
    """
    with open_target(target, readonly=True, force_share=True) as image:
        view = {"name": target, "disk_size": image.virtual_size,
                "ranges": read_ranges(image.read, image.virtual_size, image.guest_data_ranges())}
    if against is not None and disk_view(target, against) != view:
        raise GenerationError(f"{target}: the reference reads other contents than the vector's design says")
    top, snap = parse_target(target)
    if snap is None:
        layer, context = top, ImageContext.for_layer(top)
    else:
        with Image.open(top, readonly=True, force_share=True) as image:
            entry = image.root.snapshot(snap)
        layer = os.path.join(layer_dir_of(os.path.abspath(top)), f"{entry.layer_uuid.hex()}.lam")
        context = ImageContext.for_top(top)
    spec = disk_view(target, abstract_layer(layer, OsStorage(), context))
    if spec != view:
        raise GenerationError(f"{target}: the reference reads other contents than the spec's abstraction")
    return view


def reference_check(path: str) -> dict:
    """The reference's verdict on `path`: exit code and the finding kinds, sorted, each once."""
    report = check_tree(path, OsStorage())
    return {"exit": report.exit_code, "kinds": sorted({f.kind for f in report.findings})}


def expect_views(vector: Vector, targets: list[str]) -> None:
    vector.expect["views"] = [reference_view(t) for t in targets]


def expect_check(vector: Vector, image: str, exit_code: int, kinds: list[str]) -> None:
    """Record the verdict the design says, after making sure the reference gives it.

    `kinds` are the findings the design calls for; the reference may report
    more (a consequence of the same damage), which the vector does not require.
    """
    got = reference_check(image)
    want = {"exit": exit_code, "kinds": sorted(set(kinds))}
    if got["exit"] != exit_code or not set(kinds) <= set(got["kinds"]):
        raise GenerationError(f"{vector.category}/{vector.name}: the reference's check gives {got}, the design says {want}")
    vector.expect["image"] = image
    vector.expect["check"] = want


def current_root(path: str) -> Root:
    file = OsStorage().open(path, False)
    try:
        return select_root(read_root_copies(file)).current()
    finally:
        file.close()


def forge_root(path: str, slots: tuple[int, ...] = (0, 1), **changes: object) -> None:
    """Rewrite root copies with changed fields and a valid CRC: a copy that breaks a field rule, not its checksum."""
    root = attrs.evolve(current_root(path), **changes)
    with open(path, "r+b") as fh:
        for slot in slots:
            data = encode_root(attrs.evolve(root, slot=slot))
            fh.seek(root_copy_offset(slot))
            fh.write(data + bytes(min(4096, ROOT_SLOT_SIZE - len(data))))


def patch(path: str, offset: int, data: bytes) -> None:
    """Overwrite bytes in place (damage), keeping the file's length and its holes elsewhere."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]) if byte else b"\xff")


def write_image(path: str, size: int, cluster: int, writes: list[tuple[int, bytes]], base: str | None = None,
                after: Callable[[Image], None] | None = None) -> None:
    with (Image.create(path, size, cluster) if base is None else Image.create(path, size, cluster, base=base)) as image:
        for offset, data in writes:
            image.write(offset, data)
        if after is not None:
            after(image)
