"""Structure-aware fuzzing of the `lamina` command (R10, R7): valid images of every shape, damaged, run through every command.

A case is (seed, case id).  From it come, reproducibly: a *shape* (a valid
tree of images made with the real API, whose guest contents a small model
tracks), one *damage* (or a stack of them), and one *command*.  Consecutive
case ids share the damage and walk through the commands, so every damaged
tree meets every command.

Each command runs in a child forked from this process (a fork server: the
package is imported once) under an address-space limit and an alarm; its
stdout and stderr go to files.  A case fails when:

- an exception escapes `main` or the CLI prints anything but one line
  `lamina: ...` on error (`traceback`, `message`);
- the child hits its time or memory limit (`hang`, `memory`);
- a file outside the case directory is read, written or deleted: sentinels
  there carry known bytes, mtime and an atime older than their mtime, which
  any read moves forward on a relatime mount (`escape`);
- `check` exits 0 although the damage is of a kind the format says must be
  found: any changed byte of a Lamina file in the checked tree, a changed
  VM-state file, a snapshot's layer replaced, a reference that may not be
  followed (`false-clean`);
- `check` exits other than 0 on an undamaged tree, or after any command on
  one, failed or not (`false-alarm`, `left-unclean`); some undamaged cases
  run under a file size limit, so that writes fail midway as on a full disk;
- `check --repair` does not end at exit 0 although the damage touched only
  one copy of one structure, or only bytes no structure uses (`failed-repair`);
- guest data differs from the model after a successful repair, or as read
  (through the API after `io -r`, or by `convert`) from an undamaged tree or
  one whose damage leaves the current copies intact (`data`).

"Must be found" and "repairable" are claimed only where the format says so:
a field damaged in both copies with a valid CRC is a different image, and is
claimed found only when the spec's decoder refuses it; a copy that wins the
selection (higher generation) may legitimately change the data.

Run longer outside CI: `python tests/fuzzing.py --cases 20000 --seed 7`
(`--shapes deep` adds a chain hundreds of layers deep; `--seed S --case C`
replays one case).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import random
import resource
import select
import shutil
import signal
import stat
import struct
import sys
import tempfile
import time
import traceback
import uuid as uuidlib
from typing import Callable, Iterator

import attrs

from lamina.impl import cli, layers
from lamina.impl.image import Image, write_new_layer
from lamina.impl.osfile import OsStorage
from lamina.spec.declare import declared_fields
from lamina.spec.errors import FormatError, UnknownIncompatibleFeature, UnsupportedVersion
from lamina.spec.layout import ROOT_SLOT_SIZE, SECTOR_SIZE, root_copy_offset
from lamina.spec.references import layer_file_name, vmstate_file_name
from lamina.spec.tree import root_of
from lamina.spec.structures import (
    BASE_LAMINA,
    MAP_CRC_OFFSET,
    ROOT_CRC_OFFSET,
    MapCopy,
    Root,
    SnapshotEntry,
    decode_map_copy,
    decode_root,
    encode_root,
    structure_crc,
)

TIME_LIMIT = 3  # seconds per command: a command on these small images needs milliseconds
MEMORY_BUDGET = 768 << 20  # address space a command may add to the fork server's
EXCEPTION_EXIT = 70  # the child's exit code when an exception escaped `main`
SENTINEL = b"SENTINEL-OUTSIDE-THE-CASE:"
_SCALAR = {"u32": "<I", "u64": "<Q"}


# ---------------------------------------------------------------------------- shapes
@attrs.define
class Tree:
    """One top image of a shape: what its tree holds and what every target reads."""

    top: str
    files: list[str]  # Lamina files of the tree, relative to the case directory (top first)
    vmstates: list[str]
    raws: list[str]
    snapshots: list[str]
    contents: dict[str, bytes]  # target (`top` or `top@snap`) -> guest bytes


@attrs.define
class Shape:
    name: str
    trees: dict[str, Tree]


class _Model:
    """Writes through the real API and into a bytearray per image, so that expected contents never come from reads."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.data: dict[str, bytearray] = {}

    def create(self, path: str, size: int | None, cluster: int, base: str | None = None) -> None:
        with Image.create(path, size, cluster, base=base) as image:
            size = image.virtual_size
        below = bytes(self.data[base]) if base else b""
        self.data[path] = bytearray(below[:size].ljust(size, b"\0"))

    def write(self, path: str, count: int) -> None:
        data = self.data[path]
        with Image.open(path) as image:
            for _ in range(count):
                sectors = len(data) // SECTOR_SIZE
                start = self.rng.randrange(sectors)
                length = min(self.rng.choice((1, 2, 8, 9, 64)), sectors - start) * SECTOR_SIZE
                offset = start * SECTOR_SIZE
                payload = bytes([self.rng.randrange(1, 256)]) * length if self.rng.random() < 0.5 else self.rng.randbytes(length)
                image.write(offset, payload)
                data[offset : offset + length] = payload

    def resize(self, path: str, size: int) -> None:
        with Image.open(path) as image:
            image.resize(size)
        self.data[path] = bytearray(bytes(self.data[path][:size]).ljust(size, b"\0"))


def _size(rng: random.Random, cluster: int) -> int:
    return rng.choice((cluster * 3, 64 << 10, (300 << 10) + 512, 1 << 20))


def _shape_plain(m: _Model, rng: random.Random) -> dict[str, Tree]:
    cluster = rng.choice((4096, 8192, 65536))
    m.create("disk.lam", _size(rng, cluster), cluster)
    m.write("disk.lam", rng.randrange(1, 8))
    return {"disk.lam": Tree("disk.lam", ["disk.lam"], [], [], [], {"disk.lam": bytes(m.data["disk.lam"])})}


def _shape_regions(m: _Model, rng: random.Random) -> dict[str, Tree]:
    m.create("disk.lam", 3 * 128 * 4096 - rng.choice((0, 512, 4096)), 4096)  # three regions
    m.write("disk.lam", 12)
    return {"disk.lam": Tree("disk.lam", ["disk.lam"], [], [], [], {"disk.lam": bytes(m.data["disk.lam"])})}


def _snapshots(m: _Model, rng: random.Random, top: str, base: str | None = None) -> Tree:
    """A top with two or three snapshots, one with VM state, written between them."""
    contents: dict[str, bytes] = {}
    names, vmstates = [], []
    for i in range(rng.randrange(2, 4)):
        m.write(top, rng.randrange(1, 5))
        name = f"s{i}"
        vmstate = rng.randbytes(rng.randrange(1, 3000)) if i == 0 else None
        entry = layers.create_snapshot(top, name, vmstate, vm_clock_ns=rng.randrange(1 << 40))
        names.append(name)
        contents[f"{top}@{name}"] = bytes(m.data[top])
        if vmstate:
            vmstates.append(os.path.join(f"{top}.layers", vmstate_file_name(entry.layer_uuid)))
    m.write(top, rng.randrange(0, 4))
    contents[top] = bytes(m.data[top])
    with Image.open(top, readonly=True) as image:
        files = [top] + [os.path.join(f"{top}.layers", layer_file_name(e.layer_uuid)) for e in image.root.snapshots]
    return Tree(top, files, vmstates, [base] if base else [], names, contents)


def _shape_snapshots(m: _Model, rng: random.Random) -> dict[str, Tree]:
    cluster = rng.choice((4096, 16384))
    m.create("disk.lam", _size(rng, cluster), cluster)
    return {"disk.lam": _snapshots(m, rng, "disk.lam")}


def _shape_clone(m: _Model, rng: random.Random) -> dict[str, Tree]:
    m.create("disk.lam", 256 << 10, 4096)
    tree = _snapshots(m, rng, "disk.lam")
    snap = rng.choice(tree.snapshots)
    layers.clone("disk.lam", snap, "clone.lam")
    m.data["clone.lam"] = bytearray(tree.contents[f"disk.lam@{snap}"])
    m.write("clone.lam", rng.randrange(1, 4))
    chain = [os.path.join("clone.lam.layers", os.path.basename(target)) for target in tree.files[1:]]
    files = ["clone.lam"] + [f for f in chain if os.path.exists(f)]
    return {"disk.lam": tree, "clone.lam": Tree("clone.lam", files, [], [], [], {"clone.lam": bytes(m.data["clone.lam"])})}


def _raw(m: _Model, rng: random.Random, path: str, size: int) -> None:
    data = rng.randbytes(size // 2).ljust(size, b"\0")
    with open(path, "wb") as f:
        f.write(data)
    m.data[path] = bytearray(data)


def _shape_raw_base(m: _Model, rng: random.Random) -> dict[str, Tree]:
    _raw(m, rng, "base.raw", rng.choice((64 << 10, 200 << 10)))
    m.create("disk.lam", rng.choice((None, 256 << 10)), rng.choice((4096, 65536)), base="base.raw")
    m.write("disk.lam", rng.randrange(1, 6))
    if rng.random() < 0.4:  # shrink below the base and grow again: the base shows only below the shrink
        size = len(m.data["disk.lam"])
        m.resize("disk.lam", size // 2 // SECTOR_SIZE * SECTOR_SIZE)
        m.resize("disk.lam", size)
    if rng.random() < 0.5:
        return {"disk.lam": _snapshots(m, rng, "disk.lam", "base.raw")}
    return {"disk.lam": Tree("disk.lam", ["disk.lam"], [], ["base.raw"], [], {"disk.lam": bytes(m.data["disk.lam"])})}


def _shape_chain(m: _Model, rng: random.Random) -> dict[str, Tree]:
    """Lamina bases: base.lam <- mid.lam <- disk.lam, each written before the next is made on it."""
    m.create("base.lam", 192 << 10, rng.choice((4096, 8192)))
    m.write("base.lam", 3)
    m.create("mid.lam", None, 4096, base="base.lam")
    m.write("mid.lam", 3)
    m.create("disk.lam", None, rng.choice((4096, 16384)), base="mid.lam")
    m.write("disk.lam", 3)
    files = ["disk.lam", "mid.lam", "base.lam"]
    return {"disk.lam": Tree("disk.lam", files, [], [], [], {"disk.lam": bytes(m.data["disk.lam"])})}


def _shape_chain_elsewhere(m: _Model, rng: random.Random) -> dict[str, Tree]:
    """A Lamina base in a subdirectory whose own base is relative to it, and a decoy of that name beside the top."""
    os.mkdir("sub")
    _raw(m, rng, os.path.join("sub", "base.raw"), 128 << 10)
    m.create(os.path.join("sub", "mid.lam"), None, 4096, base=os.path.join("sub", "base.raw"))
    m.write(os.path.join("sub", "mid.lam"), 2)
    with open("base.raw", "wb") as f:
        f.write(rng.randbytes(128 << 10))
    m.create("disk.lam", None, 4096, base=os.path.join("sub", "mid.lam"))
    m.write("disk.lam", 2)
    files = ["disk.lam", os.path.join("sub", "mid.lam")]
    return {"disk.lam": Tree("disk.lam", files, [], [os.path.join("sub", "base.raw")], [], {"disk.lam": bytes(m.data["disk.lam"])})}


DEEP = 350  # layers under the top (the format allows MAX_CHAIN_DEPTH): past where a recursive walk of reads fails


def _shape_deep(m: _Model, rng: random.Random) -> dict[str, Tree]:
    """A chain of frozen layers hundreds deep, as that many snapshots make, written as `write_new_layer` writes them."""
    os.mkdir("disk.lam.layers")
    size = 64 << 10
    names = []
    below: Root | None = None
    for i in range(DEEP + 1):
        uuid = uuidlib.UUID(int=rng.getrandbits(128), version=4).bytes
        root = Root(cluster_bits=12, virtual_size=size, image_uuid=uuid)
        if below is not None:
            root = attrs.evolve(root, base_kind=BASE_LAMINA, base_path=names[-1], base_uuid=below.image_uuid,
                                base_data_generation=below.data_generation, base_size=size, base_visible=size)
        path = "disk.lam" if i == DEEP else os.path.join("disk.lam.layers", layer_file_name(uuid))
        write_new_layer(OsStorage(), path, root)
        if i == 0:  # the bottom holds data; every layer above records its generation after that
            m.data[path] = bytearray(size)
            m.write(path, 4)
            root = _root_of(path)
        else:
            m.data[path] = bytearray(m.data[files_below[-1]])
        files_below = [path] if i == 0 else files_below + [path]
        names.append(layer_file_name(uuid))
        below = root
    files = ["disk.lam"] + files_below[-2::-1]
    return {"disk.lam": Tree("disk.lam", files, [], [], [], {"disk.lam": bytes(m.data["disk.lam"])})}


SHAPES: dict[str, Callable[[_Model, random.Random], dict[str, Tree]]] = {
    "plain": _shape_plain,
    "regions": _shape_regions,
    "snapshots": _shape_snapshots,
    "clone": _shape_clone,
    "raw-base": _shape_raw_base,
    "chain": _shape_chain,
    "chain-elsewhere": _shape_chain_elsewhere,
    "deep": _shape_deep,
}
VARIANTS = 3  # templates per shape; damage and commands vary per case
# The deep chain costs seconds per writable command (each open walks the chain once per layer): longer runs only
DEFAULT_SHAPES = tuple(sorted(set(SHAPES) - {"deep"}))


@contextlib.contextmanager
def _no_fsync() -> Iterator[None]:
    """Durability is the crash simulator's business; here an fsync only costs time."""
    saved = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = saved


def build_shape(name: str, variant: int, seed: int, directory: str) -> Shape:
    """Make the template of a shape in `directory` (which must be empty)."""
    rng = random.Random(f"shape:{seed}:{name}:{variant}")
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        with _no_fsync():
            return Shape(name, SHAPES[name](_Model(rng), rng))
    finally:
        os.chdir(cwd)


def copy_trees_linked(src: str, dst: str) -> None:
    """Copy a template: hard links across its subdirectories kept too (clones link their source's layers)."""
    inodes: dict[tuple[int, int], str] = {}
    for here, dirs, files in os.walk(src):
        rel = os.path.relpath(here, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for name in files:
            s, d = os.path.join(here, name), os.path.join(dst, rel, name)
            info = os.lstat(s)
            key = (info.st_dev, info.st_ino)
            if stat.S_ISLNK(info.st_mode):
                os.symlink(os.readlink(s), d)
            elif key in inodes:
                os.link(inodes[key], d)
            else:
                _copy_sparse(s, d, info.st_size)
                inodes[key] = d


def _copy_sparse(src: str, dst: str, size: int) -> None:
    fin = os.open(src, os.O_RDONLY)
    fout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.ftruncate(fout, size)
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fin, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fin, start, os.SEEK_HOLE)
            os.pwrite(fout, os.pread(fin, end - start, start), start)
            pos = end
    finally:
        os.close(fin)
        os.close(fout)


# ---------------------------------------------------------------------------- damage
@attrs.define
class Damage:
    """What was done, and what the format then promises about it."""

    text: str
    detect: bool = False  # `check` must not exit 0
    single: bool = False  # only one copy of a structure (or unused bytes) changed: repair succeeds, data intact
    kind: str = "bytes"  # bytes | field | hostile | none

    def stack(self, other: "Damage") -> "Damage":
        """Two damages: found if either must be; single only if both are and they cannot meet in one structure."""
        return Damage(f"{self.text}; {other.text}", self.detect or other.detect, False, f"{self.kind}+{other.kind}")


def _root_of(path: str) -> Root:
    return root_of(OsStorage(), path)


def _allocated_map_copies(path: str, root: Root) -> list[tuple[int, int]]:
    """(region, slot) of map copies that hold a map (never-written regions hold none)."""
    geometry = root.geometry
    out = []
    with open(path, "rb") as f:
        for region in range(geometry.num_regions):
            for slot in (0, 1):
                f.seek(geometry.map_copy_offset(region, slot))
                if any(f.read(64)):
                    out.append((region, slot))
    return out


def _value_for(kind: str, original, rng: random.Random):
    if kind in _SCALAR:
        bits = 32 if kind == "u32" else 64
        top = (1 << bits) - 1
        return rng.choice((0, 1, 2, original - 1, original + 1, top, top - 1, 1 << (bits - 1),
                           rng.getrandbits(bits), original ^ (1 << rng.randrange(bits)))) & top
    if isinstance(original, (bytes, bytearray)):
        size = len(original)
        choice = rng.randrange(4)
        if choice == 0:
            return bytes(size)
        if choice == 1:
            return b"\xff" * size
        if choice == 2:
            return rng.randbytes(size)
        at = rng.randrange(size)
        return bytes(original[:at]) + bytes([original[at] ^ (1 << rng.randrange(8))]) + bytes(original[at + 1:])
    raise ValueError(kind)


def _patch(raw: bytearray, at: int, kind: str, size: int, rng: random.Random) -> str:
    """Overwrite one declared field at `at` with a value drawn for its kind; returns what was written."""
    if kind in _SCALAR:
        fmt = _SCALAR[kind]
        value = _value_for(kind, struct.unpack_from(fmt, raw, at)[0], rng)
        struct.pack_into(fmt, raw, at, value)
        return hex(value)
    if kind.startswith("u32["):
        index = rng.randrange(min(4, size // 4))
        value = _value_for("u32", struct.unpack_from("<I", raw, at + 4 * index)[0], rng)
        struct.pack_into("<I", raw, at + 4 * index, value)
        return f"[{index}]={value:#x}"
    value = _value_for("bytes", bytes(raw[at : at + size]), rng)
    raw[at : at + size] = value
    return f"{len(value)} bytes {bytes(value[:8]).hex()}.."


def _structures(path: str) -> list[tuple[str, int, int, type, int, int]]:
    """Every checksummed copy in a Lamina file: (label, file offset, used length, class, crc offset, slot)."""
    root = _root_of(path)
    used = len(encode_root(root))
    out = [(f"root copy {'AB'[s]}", root_copy_offset(s), used, Root, ROOT_CRC_OFFSET, s) for s in (0, 1)]
    g = root.geometry
    for region, slot in _allocated_map_copies(path, root):
        out.append((f"map copy {'AB'[slot]} of region {region}", g.map_copy_offset(region, slot), g.map_used_length,
                    MapCopy, MAP_CRC_OFFSET, slot))
    return out


def _decodes_as_loser(root: Root, offset: int, raw: bytes, cls: type, slot: int, twin: bytes) -> bool:
    """Whether the spec's selection keeps the twin: the damaged copy is invalid, or valid but not the newer.

    A root copy that verifies but asks for a newer reader (version, incompatible
    feature) stops every reader by design: no repair is promised for it.
    """
    try:
        if cls is Root:
            decode_root(raw, slot)
    except (UnsupportedVersion, UnknownIncompatibleFeature):
        return False
    except FormatError:
        return True
    try:
        if cls is Root:
            damaged, good = decode_root(raw, slot), decode_root(twin, 1 - slot)
        else:
            g = root.geometry
            region = (offset - g.first_region_offset) // g.region_stride
            damaged = decode_map_copy(raw, g, region, slot, root.image_uuid)
            good = decode_map_copy(twin, g, region, 1 - slot, root.image_uuid)
    except FormatError:
        return True
    return (damaged.generation, -slot) < (good.generation, -(1 - slot))


def damage_field(tree: Tree, rng: random.Random, extreme: bool = False) -> Damage:
    """One declared field of one structure (or of both copies) set to a drawn value, the CRC made valid again.

    `extreme`: a scalar of the root, or of a map, in both copies, set to a bound
    of its type (counters at their maximum, every flag bit): what a valid but
    hostile image holds, which no write may then trip over.
    """
    path = rng.choice(tree.files)
    structures = _structures(path)
    label, offset, used, cls, crc_at, slot = rng.choice(structures[:2] if extreme and rng.random() < 0.7 else structures)
    fields = list(declared_fields(cls))
    entries: list[tuple[str, int, str, int]] = [(n, i.offset, i.kind, i.size or 0) for n, i in fields
                                               if n != "crc" and i.kind != "tail" and (not extreme or i.kind in _SCALAR)]
    if cls is MapCopy:
        bitmap = dict(fields)["present"].offset
        entries.append(("present", bitmap + rng.randrange(used - bitmap), "u8", 1))
    root = _root_of(path)
    if cls is Root and root.snapshots:
        first = 4096 + -(-len(root.base_path.encode()) // 8) * 8
        i = rng.randrange(len(root.snapshots))
        entries += [(f"snapshots[{i}].{n}", first + 320 * i + f.offset, f.kind, f.size or 0)
                    for n, f in declared_fields(SnapshotEntry)]
    if extreme:
        entries = [e for e in entries if e[2] in _SCALAR]
    name, at, kind, size = rng.choice(entries)
    both = extreme or rng.random() < 0.3
    twin_offset = offset + (root_copy_offset(1 - slot) - root_copy_offset(slot) if cls is Root
                            else root.geometry.map_copy_offset(0, 1 - slot) - root.geometry.map_copy_offset(0, slot))
    with open(path, "r+b") as f:
        f.seek(offset)
        raw = bytearray(f.read(used))
        before = bytes(raw)
        if kind == "u8":
            raw[at] ^= 1 << rng.randrange(8)
            written = f"bit of byte {at}"
        elif extreme:
            top = (1 << (8 * struct.calcsize(_SCALAR[kind]))) - 1
            value = rng.choice((top, top - 1, 1, 1 << (4 * struct.calcsize(_SCALAR[kind]))))
            struct.pack_into(_SCALAR[kind], raw, at, value)
            written = hex(value)
        else:
            written = _patch(raw, at, kind, size, rng)
        struct.pack_into("<I", raw, crc_at, structure_crc(raw, crc_at))
        f.seek(twin_offset)
        twin = f.read(used)
        f.seek(offset)
        f.write(raw)
        if both:
            copy = bytearray(raw)
            if name != "slot":  # the twin keeps its own slot number
                struct.pack_into("<I", copy, 72 if cls is Root else 12, 1 - slot)
                struct.pack_into("<I", copy, crc_at, structure_crc(copy, crc_at))
            f.seek(twin_offset)
            f.write(copy)
    changed = bytes(raw) != before
    text = f"field {name} of {label}{' and its twin' if both else ''} in {path} := {written}"
    if not changed:
        return Damage(text + " (unchanged)", kind="field")
    if both:
        try:
            ok = decode_root(bytes(raw), slot) if cls is Root else None
        except FormatError:
            ok = None
        return Damage(text, detect=cls is Root and ok is None, kind="field")
    loser = _decodes_as_loser(root, offset, bytes(raw), cls, slot, twin)
    return Damage(text, detect=True, single=loser, kind="field")


def _zones(path: str) -> list[tuple[int, int, str]]:
    """The byte ranges of a Lamina file by what they hold: (offset, length, zone)."""
    root = _root_of(path)
    g = root.geometry
    used = len(encode_root(root))
    zones = [(0, used, "meta"), (used, ROOT_SLOT_SIZE - used, "unused"), (ROOT_SLOT_SIZE, used, "meta"),
             (ROOT_SLOT_SIZE + used, ROOT_SLOT_SIZE - used, "unused")]
    if g.first_region_offset > 2 * ROOT_SLOT_SIZE:
        zones.append((2 * ROOT_SLOT_SIZE, g.first_region_offset - 2 * ROOT_SLOT_SIZE, "unused"))
    for region in range(g.num_regions):
        for slot in (0, 1):
            at = g.map_copy_offset(region, slot)
            zones += [(at, g.map_used_length, "meta"), (at + g.map_used_length, g.cluster_size - g.map_used_length, "unused")]
        zones.append((g.region_data_offset(region), 128 * g.cluster_size, "data"))
    return zones


def damage_bytes(tree: Tree, rng: random.Random) -> Damage:
    """Bit flips, a zeroed or garbage sector, truncation or extension of a file of the tree."""
    lamina = rng.random() < 0.85 or not (tree.vmstates or tree.raws)
    path = rng.choice(tree.files) if lamina else rng.choice(tree.vmstates + tree.raws)
    size = os.path.getsize(path)
    how = rng.choice(("flip", "flip", "zero", "garbage", "garbage", "truncate", "extend"))
    zone = "vmstate" if path in tree.vmstates else "raw" if path in tree.raws else "data"
    with open(path, "r+b") as f:
        if how == "truncate":
            length = rng.choice((0, 100, 4096, size // 2, size - SECTOR_SIZE, max(0, size - 1), -1))
            if length < 0:  # a cut inside a structure: every decoder must see a short copy and say so
                metadata = [(lo, n) for lo, n, z in _zones(path) if z == "meta"] if lamina else []
                lo, n = rng.choice(metadata) if metadata else (0, size)
                length = min(size, lo + 1 + rng.randrange(max(1, n - 1)))
            f.truncate(length)
            return Damage(f"{path} truncated to {length}", detect=length != size)
        if how == "extend":
            extra = rng.choice((1, SECTOR_SIZE, 1 << 20))
            f.truncate(size + extra)
            if rng.random() < 0.5:
                f.seek(size + extra - 1)
                f.write(b"\1")
            return Damage(f"{path} extended by {extra} bytes", detect=True, single=lamina)
        if lamina and rng.random() < 0.7:  # aim at metadata, where a random offset rarely lands
            zones = [z for z in _zones(path) if z[2] != "data" or rng.random() < 0.3]
            lo, length, zone = rng.choice(zones)
            at = lo + rng.randrange(max(1, length))
        else:
            at = rng.randrange(max(1, size))
            if lamina:
                zone = next((z for lo, n, z in _zones(path) if lo <= at < lo + n), "beyond")
        f.seek(at)
        before = f.read(SECTOR_SIZE if how != "flip" else 1)
        if how == "flip":
            after = bytes([before[0] ^ (1 << rng.randrange(8))]) if before else b""
        elif how == "zero":
            after = bytes(len(before))
        else:
            after = rng.randbytes(len(before))
        f.seek(at)
        f.write(after)
    text = f"{how} at byte {at} ({zone}) of {path}"
    if before == after:
        return Damage(text + " (unchanged)")
    if lamina:
        inside = next(((lo, n, z) for lo, n, z in _zones(path) if lo <= at < lo + n), None)
        spans_one = inside is not None and at + len(after) <= inside[0] + inside[1]
        return Damage(text, detect=True, single=spans_one and inside[2] in ("meta", "unused"))
    return Damage(text, detect=zone == "vmstate")


def _snapshot_layer(tree: Tree, rng: random.Random) -> str | None:
    return rng.choice(tree.files[1:]) if len(tree.files) > 1 and "layers" in tree.files[1] else None


def damage_layer_dir(tree: Tree, rng: random.Random, outside: str) -> Damage:
    """Hostile entries in the layer directory: symlinks out, FIFOs, directories, foreign images, look-alike names."""
    layer_dir = f"{tree.top}.layers"
    victim = _snapshot_layer(tree, rng)
    fake = os.path.join(layer_dir, f"{rng.getrandbits(128):032x}.lam")
    how = rng.choice(("symlink-file", "symlink-image", "symlink-dir", "fifo", "directory", "foreign", "look-alike",
                      "vmstate", "layers-symlink", "creating"))
    if how == "layers-symlink":
        if os.path.isdir(layer_dir) and not os.path.islink(layer_dir):
            shutil.rmtree(layer_dir)  # the snapshots' layers are gone too: the tree is broken
            detect = True
        else:
            detect = False
        os.symlink(os.path.join(outside, "victim"), layer_dir)
        return Damage(f"layers-symlink: {layer_dir} is a symlink to a directory outside", detect=detect, kind="hostile")
    os.makedirs(layer_dir, exist_ok=True)
    replace = victim is not None and rng.random() < 0.6
    target = victim if replace else fake
    if how == "vmstate":
        target = rng.choice(tree.vmstates) if tree.vmstates else fake[:-4] + ".vmstate"
        replace = bool(tree.vmstates)
        how = rng.choice(("symlink-file", "fifo", "directory"))
    if how == "creating":
        target, replace = f"{tree.top}.creating", False
        how = rng.choice(("symlink-file", "fifo", "directory", "look-alike"))
    if os.path.lexists(target):
        os.unlink(target)
    if how == "symlink-file":
        os.symlink(os.path.join(outside, "secret.raw"), target)
    elif how == "symlink-image":
        os.symlink(os.path.join(outside, "secret.lam"), target)
    elif how == "symlink-dir":
        os.symlink(os.path.join(outside, "victim"), target)
    elif how == "fifo":
        os.mkfifo(target)
    elif how == "directory":
        os.mkdir(target)
    elif how == "foreign":
        shutil.copyfile(os.path.join(outside, "secret.lam"), target)
    else:
        with open(target, "wb") as f:
            f.write(rng.randbytes(rng.choice((10, 5000))))
    # A regular `<top>.creating` of any bytes is what a crash inside a create leaves (pending work, exit 0).
    crash_leaves_it = how == "look-alike" and target == f"{tree.top}.creating"
    return Damage(f"{how} at {target}{' (replacing it)' if replace else ''}", detect=not crash_leaves_it, kind="hostile")


def damage_reference(tree: Tree, rng: random.Random, outside: str) -> Damage:
    """A root copy pair whose base reference names a file that may not be followed."""
    path = rng.choice(tree.files)
    root = _root_of(path)
    os.mkfifo("pipe.raw") if not os.path.exists("pipe.raw") else None
    name = rng.choice(("../outside/secret.raw", os.path.join(outside, "secret.raw"), "../outside/secret.lam",
                       "pipe.raw", "sub/../../outside/secret.raw", f"{tree.top}.layers"))
    kind = rng.choice((1, 2)) if root.base_kind == 0 else root.base_kind
    new = attrs.evolve(root, base_kind=kind, base_path=name, base_size=root.base_size or 65536,
                       base_uuid=root.base_uuid if kind == 2 else bytes(16),
                       base_data_generation=root.base_data_generation if kind == 2 else 0)
    if kind == 2 and not any(new.base_uuid):
        new = attrs.evolve(new, base_uuid=b"\1" * 16, base_data_generation=1)
    with open(path, "r+b") as f:
        for slot in (0, 1):
            f.seek(root_copy_offset(slot))
            f.write(encode_root(attrs.evolve(new, slot=slot)))
    return Damage(f"base of {path} := {name!r} (kind {kind})", detect=True, kind="hostile")


def damage_vmstate_size(tree: Tree, rng: random.Random) -> Damage:
    """A VM-state file made a sparse file of gigabytes, and its snapshot entry made to declare that size."""
    if not tree.vmstates:
        return damage_field(tree, rng, extreme=True)
    vm = tree.vmstates[0]
    size = rng.choice((1 << 33, 1 << 36))
    os.truncate(vm, size)
    uuid = bytes.fromhex(os.path.basename(vm).split(".")[0])
    root = _root_of(tree.top)
    entries = tuple(attrs.evolve(e, vmstate_size=size) if e.layer_uuid == uuid else e for e in root.snapshots)
    with open(tree.top, "r+b") as f:
        for slot in (0, 1):
            f.seek(root_copy_offset(slot))
            f.write(encode_root(attrs.evolve(root, snapshots=entries, slot=slot)))
    return Damage(f"vmstate-size: {vm} is a sparse file of {size} bytes, and declared so", detect=True, kind="hostile")


DAMAGES = ("none", "none", "field", "field", "field", "extreme", "bytes", "bytes", "bytes", "layer-dir", "layer-dir",
           "reference", "vmstate-size", "stack")


def apply_damage(tree: Tree, rng: random.Random, outside: str, kind: str | None = None) -> Damage:
    kind = kind or rng.choice(DAMAGES)
    if kind == "none":
        return Damage("none", kind="none")
    if kind == "field":
        return damage_field(tree, rng)
    if kind == "extreme":
        return damage_field(tree, rng, extreme=True)
    if kind == "vmstate-size":
        return damage_vmstate_size(tree, rng)
    if kind == "bytes":
        return damage_bytes(tree, rng)
    if kind == "layer-dir":
        return damage_layer_dir(tree, rng, outside)
    if kind == "reference":
        return damage_reference(tree, rng, outside)
    first = apply_damage(tree, rng, outside, rng.choice(("field", "bytes")))
    try:
        second = apply_damage(tree, rng, outside, rng.choice(("field", "bytes", "layer-dir")))
    except (FormatError, OSError, struct.error, ValueError, IndexError) as exc:  # the first left nothing to aim at
        second = Damage(f"second damage not applied ({type(exc).__name__})")
    return first.stack(second)


# ---------------------------------------------------------------------------- commands
def commands(tree: Tree, rng: random.Random) -> list[list[str]]:
    """Every CLI command, with arguments for this tree."""
    img = tree.top
    snap = rng.choice(tree.snapshots) if tree.snapshots else "s0"
    size = len(tree.contents[img])
    offset = rng.randrange(size // SECTOR_SIZE) * SECTOR_SIZE
    name = rng.choice(("new", "new", "n\udcffx", "a\nb", "x@y", "0"))
    base = tree.raws[0] if tree.raws else "other.raw"
    return [
        ["info", img], ["info", "--tree", img], ["info", "--output", "json", img],
        ["map", img], ["map", "--metadata", "--output", "json", img],
        ["check", img], ["check", "--output", "json", img], ["check", "--repair", img],
        ["io", "-r", "-c", f"read 0 {size}", img], ["io", "-r", "-c", f"read -v {offset} 512", f"{img}@{snap}"],
        ["io", "-c", f"write -P 0x5a {offset} 4k", "-c", "flush", "-c", f"read -P 0x5a {offset} 4k", img],
        ["io", "-c", f"write -z {offset} 8k", "-c", f"discard 0 {size // 2 // 512 * 512}", "-c", "truncate 1M", img],
        ["snapshot", "list", img], ["snapshot", "create", img, name], ["snapshot", "delete", img, snap],
        ["snapshot", "revert", img, snap], ["snapshot", "vmstate", img, snap, "out.vmstate"],
        ["clone", img, snap, "fresh.lam"], ["diff", img, f"{img}@{snap}"],
        ["convert", "-O", "raw", img, "out.raw"], ["convert", "-O", "lamina", img, "out.lam"],
        ["resize", img, "+64k"], ["resize", "--shrink", img, "-4k"],
        ["commit", img], ["rebase", "-u", "-b", "", img], ["rebase", "-b", base, img],
        ["io", "-c", "write -P 0x11 0 3G", img], ["frobnicate", img],
    ]


NUM_COMMANDS = 28


@attrs.define
class Outcome:
    rc: int | None
    signal: int | None
    stdout: str
    stderr: str
    seconds: float


def _limit_child(budget: int, seconds: int, file_size: int | None) -> None:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + budget, vm + budget))
    if file_size is not None:  # writes past it fail with EFBIG, as a full disk fails them with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))
    signal.alarm(seconds)


def run_forked(job: Callable[[], int], cwd: str, log: str, time_limit: int = TIME_LIMIT,
               file_size: int | None = None) -> Outcome:
    """Run `job` in a forked child under the limits; its stdout and stderr go to `log`.out / `log`.err."""
    sys.stdout.flush()
    sys.stderr.flush()
    started = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = EXCEPTION_EXIT
        try:
            os.chdir(cwd)
            for fd, suffix in ((1, ".out"), (2, ".err")):
                out = os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(out, fd)
                os.close(out)
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), errors="backslashreplace", line_buffering=False)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), errors="backslashreplace", line_buffering=True)
            sys.stdin = io.TextIOWrapper(io.BytesIO())
            _limit_child(MEMORY_BUDGET, time_limit, file_size)
            with _no_fsync():
                code = job()
        except BaseException:  # the finding itself: whatever escaped
            try:
                traceback.print_exc()
            except BaseException:
                pass
            code = EXCEPTION_EXIT
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code if isinstance(code, int) and 0 <= code < 256 else EXCEPTION_EXIT)
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], time_limit + 5)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - started

    def text(suffix: str) -> str:
        try:
            with open(log + suffix, "rb") as f:  # the end: a traceback's last line names the exception
                f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 16)))
                return f.read().decode("utf-8", "backslashreplace")
        except FileNotFoundError:
            return ""

    if os.WIFSIGNALED(status):
        return Outcome(None, os.WTERMSIG(status), text(".out"), text(".err"), seconds)
    return Outcome(os.WEXITSTATUS(status), None, text(".out"), text(".err"), seconds)


_PARSER = cli.build_parser()


def cli_job(argv: list[str]) -> Callable[[], int]:
    """`lamina ARGV` as the child runs it; the parser is built once in the server (argparse parsers are reusable)."""
    def job() -> int:
        cli.parser_for = lambda argv: _PARSER
        return cli.main(argv)
    return job


def read_job(targets: dict[str, bytes], log: str) -> Callable[[], int]:
    """Read every target with the API; exit 0 when all equal the model, else name the first that differs."""
    def job() -> int:
        for target, expected in targets.items():
            with layers.open_target(target) as image:
                got = image.read(0, image.virtual_size)
            if got != expected:
                diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
                print(f"{target}: guest byte {diff} differs from the model (sizes {len(got)}/{len(expected)})")
                return 1
        return 0
    return job


# ---------------------------------------------------------------------------- sentinels
def make_outside(directory: str, secret_image: str) -> None:
    """Files a command must never read, write or delete, each with an atime older than its mtime."""
    os.makedirs(os.path.join(directory, "victim"))
    with open(os.path.join(directory, "secret.raw"), "wb") as f:
        f.write((SENTINEL * 4096)[: 64 << 10])
    _copy_sparse(secret_image, os.path.join(directory, "secret.lam"), os.path.getsize(secret_image))
    for name in ("keep.txt", f"{'ab' * 16}.lam", f"{'cd' * 16}.vmstate", "disk.lam"):
        with open(os.path.join(directory, "victim", name), "wb") as f:
            f.write(SENTINEL + name.encode())
    age_outside(directory)


def age_outside(directory: str) -> None:
    """An atime older than the mtime: on a relatime mount the next read moves it to now."""
    for here, _, files in os.walk(directory):
        for name in files:
            os.utime(os.path.join(here, name), ns=(1_000_000_000, 2_000_000_000))


def snapshot_outside(directory: str) -> dict[str, tuple]:
    state = {}
    for here, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(here, name)
            info = os.lstat(path)
            content = b""
            if stat.S_ISREG(info.st_mode):
                fd = os.open(path, os.O_RDONLY | os.O_NOATIME) if os.geteuid() == info.st_uid else None
                if fd is not None:
                    content = os.read(fd, 1 << 20)
                    os.close(fd)
            state[os.path.relpath(path, directory)] = (info.st_mode, info.st_size, info.st_mtime_ns,
                                                       info.st_atime_ns if stat.S_ISREG(info.st_mode) else 0, content)
    return state


def outside_changes(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    out = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a == b:
            continue
        if a is None or b is None:
            out.append(f"{name} {'created' if a is None else 'deleted'}")
        elif a[:3] != b[:3] or a[4] != b[4]:
            out.append(f"{name} written")
        else:
            out.append(f"{name} read")
    return out


# ---------------------------------------------------------------------------- cases
@attrs.define
class Failure:
    seed: int
    case: int
    oracle: str
    shape: str
    damage: str
    command: list[str]
    detail: str
    shapes: tuple[str, ...] = DEFAULT_SHAPES

    def reproduction(self) -> str:
        option = "" if self.shapes == DEFAULT_SHAPES else f" --shapes {','.join(self.shapes)}"
        return f"python tests/fuzzing.py --seed {self.seed} --case {self.case}{option}  # {self.oracle}: lamina {' '.join(map(repr, self.command))}"

    def __str__(self) -> str:
        return (f"[{self.oracle}] seed {self.seed} case {self.case}: shape {self.shape}, damage {self.damage}\n"
                f"    command: lamina {' '.join(self.command)}\n    {self.detail}\n    reproduce: {self.reproduction()}")


class Fuzzer:
    """Templates made once per run; each case copies one, damages it, and runs one command in a forked child."""

    def __init__(self, seed: int, workdir: str, shapes: tuple[str, ...] = DEFAULT_SHAPES) -> None:
        self.seed = seed
        self.shapes = tuple(sorted(shapes))
        self.workdir = workdir
        self.templates: dict[tuple[str, int], tuple[str, Shape]] = {}
        self.claims: collections.Counter[str] = collections.Counter()  # how often each oracle had something to judge
        secret = os.path.join(workdir, "secret-template", "secret.lam")
        os.makedirs(os.path.dirname(secret))
        with Image.create(secret, 256 << 10, 4096) as image:
            image.write(0, SENTINEL * 64)
        self.secret = secret

    def template(self, name: str, variant: int) -> tuple[str, Shape]:
        key = (name, variant)
        if key not in self.templates:
            directory = os.path.join(self.workdir, f"template-{name}-{variant}")
            os.makedirs(directory)
            self.templates[key] = (directory, build_shape(name, variant, self.seed, directory))
        return self.templates[key]

    def plan(self, case: int) -> tuple[str, int, random.Random, int]:
        """Shape, variant, damage rng and command index of a case: consecutive cases share the damage."""
        group, command = divmod(case, NUM_COMMANDS)
        rng = random.Random(f"case:{self.seed}:{group}")
        name = rng.choice(self.shapes)
        return name, rng.randrange(VARIANTS), rng, command

    def run_case(self, case: int) -> list[Failure]:
        name, variant, rng, index = self.plan(case)
        template, shape = self.template(name, variant)
        tree = shape.trees[rng.choice(sorted(shape.trees))]
        work, outside = os.path.join(self.workdir, "work"), os.path.join(self.workdir, "outside")
        if os.path.exists(work):
            shutil.rmtree(work)
        copy_trees_linked(template, work)
        if not os.path.exists(outside):
            make_outside(outside, self.secret)
        cwd = os.getcwd()
        os.chdir(work)
        try:
            damage = apply_damage(tree, rng, outside)
        finally:
            os.chdir(cwd)
        argv = commands(tree, rng)[index]
        file_size = None
        if damage.kind == "none" and rng.random() < 0.3:
            file_size = rng.randrange((1 << 20) + 4096, max(os.path.getsize(os.path.join(work, f)) for f in tree.files) + 4096)
            damage = Damage(f"none, files limited to {file_size} bytes", kind="none")
        age_outside(outside)
        before = snapshot_outside(outside)
        failures: list[Failure] = []

        def fail(oracle: str, detail: str, command: list[str] = argv) -> None:
            failures.append(Failure(self.seed, case, oracle, f"{name}/{variant} top {tree.top}", damage.text, command, detail,
                                    self.shapes))

        logs = os.path.join(self.workdir, "log")
        self.claims.update([damage.kind.split("+")[0]]
                           + (["must-detect"] if damage.detect and argv[0] == "check" and "--repair" not in argv else [])
                           + (["must-repair"] if (damage.single or damage.kind == "none") and argv[:2] == ["check", "--repair"] else []))
        outcome = run_forked(cli_job(argv), work, logs, file_size=file_size)
        self._judge(outcome, argv, damage, fail)
        if outcome.rc is not None and (damage.kind == "none" or damage.single):
            self._data_oracles(argv, outcome, damage, tree, work, logs, fail)
        if outcome.rc is not None and damage.kind == "none" and argv[0] != "check":
            after = run_forked(cli_job(["check", tree.top]), work, logs)
            if after.rc != 0:
                fail("left-unclean", f"check exits {after.rc} after the command, which exited {outcome.rc}: "
                     f"{after.stdout.strip()[:300]!r}")
        changes = outside_changes(before, snapshot_outside(outside))
        if changes:
            fail("escape", "outside the case: " + ", ".join(changes))
            shutil.rmtree(outside)
        if failures:  # kept for a look; the reproduction rebuilds it anyway
            os.rename(work, os.path.join(self.workdir, f"case-{case}"))
        return failures

    @staticmethod
    def _judge(outcome: Outcome, argv: list[str], damage: Damage, fail) -> None:
        err = outcome.stderr
        if outcome.signal is not None:
            fail("hang" if outcome.signal in (signal.SIGALRM, signal.SIGKILL) else "signal",
                 f"killed by signal {outcome.signal} after {outcome.seconds:.1f} s")
            return
        if outcome.rc == EXCEPTION_EXIT or "Traceback" in err:
            last = err.strip().splitlines()[-1] if err.strip() else ""
            fail("memory" if "MemoryError" in last else "traceback", last)
            return
        allowed = {0, 1, 2, 3} if argv[0] == "check" else {0, 1}
        if outcome.rc not in allowed:
            fail("exit-code", f"exit {outcome.rc}")
        lines = err.strip().splitlines()
        if lines and (len(lines) != 1 or not lines[0].startswith("lamina: ") or lines[0].startswith(("lamina: : ", "lamina: lamina:"))):
            fail("message", f"stderr is not one line `lamina: ...`: {err.strip()[:300]!r}")
        if argv[0] == "check" and "--repair" not in argv:
            if damage.detect and outcome.rc == 0:
                fail("false-clean", f"check exits 0: {outcome.stdout.strip()[-200:]!r}")
            if damage.kind == "none" and outcome.rc != 0:
                fail("false-alarm", f"check exits {outcome.rc} on an undamaged tree: {outcome.stdout.strip()[:300]}")

    def _data_oracles(self, argv: list[str], outcome: Outcome, damage: Damage, tree: Tree, work: str, logs: str, fail) -> None:
        """Guest data must be the model's after a repair, and through `convert`, when the damage leaves it intact."""
        if argv[:2] == ["check", "--repair"]:
            if outcome.rc != 0:
                fail("failed-repair", f"check --repair exits {outcome.rc}: {outcome.stdout.strip()[-300:]}")
                return
            again = run_forked(cli_job(["check", tree.top]), work, logs)
            if again.rc != 0:
                fail("failed-repair", f"check after a successful repair exits {again.rc}", ["check", tree.top])
            read = run_forked(read_job(tree.contents, ""), work, logs)
            if read.rc != 0:
                fail("data", f"after repair: {read.stdout.strip() or read.stderr.strip()[-300:]}")
        elif argv[:3] == ["convert", "-O", "raw"]:
            if outcome.rc != 0:
                if damage.kind == "none":
                    fail("data", f"convert fails on an undamaged tree: {outcome.stderr.strip()}")
                return
            with open(os.path.join(work, "out.raw"), "rb") as f:
                got = f.read()
            if got != tree.contents[tree.top]:
                diff = next((i for i, (a, b) in enumerate(zip(got, tree.contents[tree.top])) if a != b), None)
                fail("data", f"convert -O raw output differs from the model at guest byte {diff} (sizes {len(got)}/{len(tree.contents[tree.top])})")
        elif argv[:2] == ["io", "-r"]:
            read = run_forked(read_job(tree.contents, ""), work, logs)
            if read.rc != 0:
                fail("data", f"read through the API: {read.stdout.strip() or read.stderr.strip()[-300:]}")


def run(seed: int, cases: range, workdir: str | None = None, progress: Callable[[int, list[Failure]], None] | None = None,
        claims: collections.Counter[str] | None = None, shapes: tuple[str, ...] = DEFAULT_SHAPES) -> list[Failure]:
    """Run `cases` of `seed`; return every failure (each one carries its reproduction); count the claims judged."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="lamina-fuzz-")
    failures: list[Failure] = []
    try:
        fuzzer = Fuzzer(seed, os.path.join(workdir, f"seed-{seed}"), shapes)
        for case in cases:
            found = fuzzer.run_case(case)
            failures += found
            if progress:
                progress(case, found)
        if claims is not None:
            claims.update(fuzzer.claims)
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return failures


def signature(failure: Failure) -> str:
    """A short key that groups the failures of one defect, to print each defect once."""
    verb = " ".join(w for w in failure.command[:2] if not w.startswith("-") and "." not in w)
    damage = " ".join(sorted({w for w in failure.damage.replace(";", " ").split()
                              if w in HOSTILE_KINDS or w.startswith("base")})) or failure.damage.split(" ")[0]
    if failure.oracle in ("traceback", "memory", "message"):
        return f"{failure.oracle} | {verb} | {failure.detail.split(':')[0][:60]}"
    if failure.oracle == "escape":
        changes = sorted({w.rstrip(",") for w in failure.detail.split() if w.rstrip(",") in ("read", "written", "deleted", "created")})
        return f"{failure.oracle} | {damage} | {' '.join(changes)} | {'writable' if verb not in READ_ONLY else verb}"
    if failure.oracle == "data":
        return f"{failure.oracle} | {verb} | {failure.shape.split('/')[0]}"
    return f"{failure.oracle} | {verb} | {damage}"


HOSTILE_KINDS = ("symlink-file", "symlink-image", "symlink-dir", "fifo", "directory", "foreign", "look-alike", "layers-symlink:")
READ_ONLY = ("info", "map", "check", "snapshot list", "diff", "convert", "io")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--case", type=int, help="run this one case and print its failures")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep failing cases there")
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated, of {', '.join(sorted(SHAPES))}")
    args = parser.parse_args(argv)
    cases = range(args.case, args.case + 1) if args.case is not None else range(args.first, args.first + args.cases)
    started = time.perf_counter()
    groups: dict[str, list[Failure]] = {}

    def progress(case: int, found: list[Failure]) -> None:
        for failure in found:
            key = signature(failure)
            if key not in groups:
                print(failure, flush=True)
            groups.setdefault(key, []).append(failure)
        done = case - cases.start + 1
        if done % 500 == 0:
            print(f"... {done} cases, {done / (time.perf_counter() - started):.1f}/s, {len(groups)} distinct findings", file=sys.stderr)

    claims: collections.Counter[str] = collections.Counter()
    run(args.seed, cases, args.keep and os.path.abspath(args.keep), progress, claims, tuple(args.shapes.split(",")))
    elapsed = time.perf_counter() - started
    print("cases by damage, and claims judged:", ", ".join(f"{k} {v}" for k, v in sorted(claims.items())))
    print(f"\n{len(cases)} cases in {elapsed:.1f} s ({len(cases) / elapsed:.1f}/s); "
          f"{sum(map(len, groups.values()))} failures, {len(groups)} distinct:")
    for key, found in sorted(groups.items()):
        print(f"  {len(found):5d}  {key}   e.g. case {found[0].case}")
    return 1 if groups else 0


if __name__ == "__main__":
    sys.exit(main())
