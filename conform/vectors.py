"""`lamina vectors DIR`: generate the conformance vectors, their README and their manifest.

The same spec version always gives the same bytes: every vector is built
with uuids and clocks fixed by its name (`lamina.impl.identity`), crash
states come from seeded explorations, and JSON is written with sorted keys.
`manifest.json` holds the SHA-256 of every file, so two generations compare
by one hash.
"""
from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata

from lamina.spec.layout import FORMAT_VERSION

from . import crash, invalid, script_vectors, valid
from .errors import BadManifest, ConformError

PROTOCOL_VERSION = 1
CATEGORIES = ("valid", "invalid", "scripts", "crash")
GENERATORS = {"valid": valid.generate, "invalid": invalid.generate, "scripts": script_vectors.generate,
              "crash": crash.generate}
MANIFEST = "manifest.json"
HASH_CHUNK = 1 << 20


class VectorsExist(ConformError):
    """The target directory of `lamina vectors` exists and is not empty."""


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes; holes are fed as zeros without being read."""
    h = hashlib.sha256()
    zeros = bytes(HASH_CHUNK)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data_at = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data_at = size
            while pos < data_at:
                take = min(HASH_CHUNK, data_at - pos)
                h.update(zeros[:take])
                pos += take
            if pos >= size:
                break
            hole_at = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole_at:
                data = os.pread(fd, min(HASH_CHUNK, hole_at - pos), pos)
                if not data:
                    break
                h.update(data)
                pos += len(data)
        return h.hexdigest()
    finally:
        os.close(fd)


def tree_hashes(root: str, under: str = "") -> dict[str, str]:
    """Relative path -> SHA-256 of every regular file below `root/under`, the manifest excepted."""
    out: dict[str, str] = {}
    for directory, dirs, files in os.walk(os.path.join(root, under)):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = file_sha256(path)
    return out


def generate(root: str, categories: tuple[str, ...] = CATEGORIES) -> dict:
    """Write every vector of `categories` below `root` (new or empty), then the README and the manifest."""
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise VectorsExist(f"{root}: exists and is not an empty directory; vectors are written into a new one")
    os.makedirs(root, exist_ok=True)
    root = os.path.abspath(root)
    for category in categories:
        os.makedirs(os.path.join(root, category))
        GENERATORS[category](root)
    counts = {c: len(os.listdir(os.path.join(root, c))) for c in categories}
    with open(os.path.join(root, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(readme(counts))
    manifest = {
        "format": "lamina-conform-vectors",
        "protocol_version": PROTOCOL_VERSION,
        "spec_version": FORMAT_VERSION,
        "lamina_version": metadata.version("lamina"),
        "counts": counts,
        "vectors": [f"{c}/{n}" for c in categories for n in sorted(os.listdir(os.path.join(root, c)))],
        "files": tree_hashes(root),
    }
    with open(os.path.join(root, MANIFEST), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.write("\n")
    return manifest


def load_manifest(root: str) -> dict:
    """The manifest of a vectors directory; a named error when it is missing or malformed."""
    from .errors import VectorsMissing

    path = os.path.join(root, MANIFEST)
    if not os.path.isdir(root):
        raise VectorsMissing(f"{root}: no such vectors directory (make one with `lamina vectors DIR`)")
    if not os.path.isfile(path):
        raise VectorsMissing(f"{root}: holds no {MANIFEST}; not a vectors directory")
    try:
        with open(path, encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise BadManifest(f"{path}: does not parse as JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lamina-conform-vectors":
        raise BadManifest(f"{path}: not a lamina-conform-vectors manifest")
    if manifest.get("protocol_version") != PROTOCOL_VERSION:
        raise BadManifest(f"{path}: protocol version {manifest.get('protocol_version')!r}; this kit runs {PROTOCOL_VERSION}")
    if not isinstance(manifest.get("vectors"), list) or not isinstance(manifest.get("files"), dict):
        raise BadManifest(f"{path}: lacks the vectors list or the files table")
    return manifest


def manifest_digest(root: str) -> str:
    """SHA-256 of manifest.json: one hash for a whole generation."""
    return file_sha256(os.path.join(root, MANIFEST))


def readme(counts: dict[str, int]) -> str:
    rows = "\n".join(f"| `{c}` | {n} |" for c, n in counts.items())
    return f"""# Lamina conformance vectors

Generated by `lamina vectors DIR` for format version {FORMAT_VERSION}, driver protocol version {PROTOCOL_VERSION}.
Do not edit: regenerate.  `manifest.json` lists every vector and the SHA-256 of every file; two generations of
one spec version are byte-identical.

| category | vectors |
|---|---:|
{rows}

Each vector is a directory `CATEGORY/NAME/` with its files and `expect.json`.  The driver protocol, the
operation scripts and every key of `expect.json` are defined in the kit's `PROTOCOL.md` (in the Lamina
repository: `conform/PROTOCOL.md`).  To judge an implementation, give it a driver command that speaks the
protocol and run

    lamina conform --impl 'YOUR-DRIVER' --vectors DIR [--category valid ...] [--output human|json|junit]

Image files may be large and are sparse: copy them with holes (`cp --sparse=always`, `rsync -S`, `tar -S`).
The files of `dump` and `check` vectors must not change: the kit compares their SHA-256 before and after.
In `crash/*/`, `sequence.trace` is the recorded storage sequence the state was taken from (crashsim trace
format version 1, the image as `{crash.TRACE_IMAGE}`); `expect.json` names the plan that gives the state.
"""
