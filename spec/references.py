"""Base references: how a layer names its base, and which names a reader may follow (R1, R10).

Every layer file belongs to one *image*: a file named `<32 hex digits>.lam`
whose parent directory is `X.layers` is a frozen layer of the image whose top
file is `X`; any other file is itself the top of an image.  A layer names its
base in its root's tail, by one of two kinds of name, resolved against the
image that holds the reference (as qemu resolves a backing name relative to
the file that holds it), never against the top the user opened:

- a *layer name*, `<32 hex digits>.lam`: a frozen layer of the same image X,
  found in `X.layers/` under exactly that name (nothing there is resolved
  through a symbolic link: see below);
- a *path*: a base the user chose (`lamina create --base`), raw or Lamina.
  A relative path is joined to the directory of X's top file; an absolute
  path is taken as it is.  Either way it must resolve, with every symbolic
  link resolved, to a file inside that directory's tree, or to a file the
  user explicitly allowed (`--allow-base`).  Following a path into a Lamina
  file switches to that file's image: its own references resolve against it.

So a base is a self-contained image: an image with snapshots can be a base,
and a base in another directory keeps its own relative references.  The
files the user allowed stay allowed along the whole chain.  A chain is
followed at most `MAX_CHAIN_DEPTH` files deep, and a file met twice is a
loop.  The identity the child recorded (uuid, data generation, size) must
match the base found.

Inside the layer directory nothing is followed (F-OPEN-002): the directory
must be a real directory, a layer name is opened as exactly that name (a
symbolic link there is refused, even one to a sibling), and a layer found by
its name must hold the layer of that uuid (F-OPEN-003).  Only the top file
the user named may itself be a symbolic link, as qemu allows; its layer
directory is then the one beside the name the user gave.
"""
from __future__ import annotations

import os
import re

import attrs

from .errors import LaminaError, UnsafeFile
from .layout import MAX_CHAIN_DEPTH
from .storage import File, Storage
from .structures import BASE_LAMINA, BASE_NONE, BASE_RAW, Root

LAYER_NAME = re.compile(r"^[0-9a-f]{32}\.lam$")
# Every name the format puts in a layer directory: layers, VM states, and their files being written.
LAYER_DIR_ENTRY = re.compile(r"^[0-9a-f]{32}\.(lam|vmstate)(\.creating)?$")
LAYER_DIR_SUFFIX = ".layers"


class BaseReferenceError(LaminaError):
    """A base reference that may not be followed: it escapes the image's tree, loops, or is not a file."""


class BaseLoop(BaseReferenceError):
    """A chain of bases that reaches a file it already passed: no layer of it could ever be read."""


class ChainTooDeep(BaseReferenceError):
    """A chain of bases longer than the format allows (MAX_CHAIN_DEPTH files)."""


class BaseChanged(LaminaError):
    """The base found is not the one the child recorded: replaced or modified since."""


def layer_file_name(uuid: bytes) -> str:
    return f"{uuid.hex()}.lam"


def vmstate_file_name(uuid: bytes) -> str:
    return f"{uuid.hex()}.vmstate"


def layer_dir_of(top_path: str) -> str:
    """The directory holding an image's frozen layers: next to the top file, named after it."""
    return top_path + LAYER_DIR_SUFFIX


def image_of(layer_path: str) -> str:
    """The top file of the image a layer file belongs to: `X` for `X.layers/<uuid>.lam`, else the file itself."""
    layer_path = os.path.abspath(layer_path)
    directory = os.path.dirname(layer_path)
    if LAYER_NAME.match(os.path.basename(layer_path)) and directory.endswith(LAYER_DIR_SUFFIX) \
            and len(os.path.basename(directory)) > len(LAYER_DIR_SUFFIX):
        return directory[: -len(LAYER_DIR_SUFFIX)]
    return layer_path


@attrs.frozen
class ImageContext:
    """The image whose references are being resolved: its top's directory, its layer directory, the allowed paths."""

    top_dir: str
    layer_dir: str
    allowed: frozenset[str] = frozenset()

    @classmethod
    def for_top(cls, top_path: str, allowed: tuple[str, ...] = ()) -> "ImageContext":
        top_path = os.path.abspath(top_path)
        return cls(os.path.dirname(top_path), layer_dir_of(top_path), frozenset(os.path.realpath(a) for a in allowed))

    @property
    def top_path(self) -> str:
        """The top file as the user named it (absolute): the one name that may be a symbolic link."""
        return self.layer_dir[: -len(LAYER_DIR_SUFFIX)]

    @classmethod
    def for_layer(cls, layer_path: str, allowed: tuple[str, ...] = ()) -> "ImageContext":
        """The context of the image that a layer file belongs to (see `image_of`)."""
        return cls.for_top(image_of(layer_path), allowed)


class LayerMismatch(LaminaError):
    """A file in the layer directory holds another layer than its name says (copied, linked or swapped in)."""


def check_layer_dir(storage: Storage, context: ImageContext) -> None:
    """F-OPEN-002: nothing inside a layer directory is opened or removed unless it is a real directory."""
    try:
        info = storage.stat(context.layer_dir)
    except FileNotFoundError:
        return  # nothing inside it can be opened either
    if not info.is_dir:
        raise UnsafeFile(f"{context.layer_dir}: the layer directory is not a directory (a symbolic link?); "
                         "refusing to use anything inside it")


def in_layer_dir(path: str, context: ImageContext) -> bool:
    return os.path.dirname(os.path.abspath(path)) == context.layer_dir


def open_tree_file(storage: Storage, path: str, writable: bool, context: ImageContext) -> File:
    """The one guarded open of a file of an image (F-OPEN-001): the storage refuses symlinks, FIFOs and
    anything not a regular file; a symlink is followed only as the top the user named."""
    if in_layer_dir(path, context):
        check_layer_dir(storage, context)
    return storage.open(path, writable, follow_symlinks=os.path.abspath(path) == context.top_path)


def check_layer_file(path: str, root: Root, context: ImageContext) -> None:
    """F-OPEN-003: a layer found by its name `<uuid hex>.lam` holds the layer of that uuid."""
    name = os.path.basename(path)
    if in_layer_dir(path, context) and LAYER_NAME.match(name) and root.image_uuid.hex() != name[:32]:
        raise LayerMismatch(f"{path}: holds layer {root.image_uuid.hex()}, not the layer its name says")


def twin_of(top_path: str, root: Root) -> str:
    """F-TREE-003: the name a top also has in its layer directory, the name it keeps once frozen."""
    return os.path.join(layer_dir_of(os.path.abspath(top_path)), layer_file_name(root.image_uuid))


def is_twin(storage: Storage, top_path: str, path: str) -> bool:
    """Whether `path` is another name of the top file itself (same device and inode, neither a symbolic link).

    By identity, never by name: a copy of the top under its uuid is not its twin (it is an orphan), and
    taking it for one would freeze stale bytes as a snapshot.
    """
    try:
        top, other = storage.stat(top_path), storage.stat(path)
    except FileNotFoundError:
        return False
    return top.is_file and other.is_file and top.identity is not None and top.identity == other.identity


@attrs.frozen
class ResolvedBase:
    """A base that may be followed: its real path, and the image its own references resolve against."""

    path: str
    context: ImageContext


def resolve_base(root: Root, context: ImageContext, where: str, storage: Storage) -> ResolvedBase | None:
    """Where a layer of the image `context` finds its base, refused with a named error unless the rules above allow it.

    This is the one resolution of references: the implementation opens,
    and `check` verifies, exactly the files it returns.
    """
    if root.base_kind == BASE_NONE:
        return None
    name = root.base_path
    layer = LAYER_NAME.match(name) is not None
    directory = context.layer_dir if layer else context.top_dir
    if layer:
        check_layer_dir(storage, context)
        real, inside = os.path.join(directory, name), True  # a layer name has no '/': inside by construction, never resolved (F-OPEN-002)
    else:
        real = os.path.realpath(os.path.join(directory, name))  # an absolute name stays as it is
        inside = os.path.commonpath([real, os.path.realpath(directory)]) == os.path.realpath(directory)
    if not inside and real not in context.allowed:
        raise BaseReferenceError(
            f"{where}: base {name!r} resolves to {real}, outside the image's {'layer directory' if layer else 'directory'} "
            f"{directory} (of the image that holds the reference); refusing to follow it"
            + ("" if layer else " (allow it explicitly with --allow-base)"))
    try:
        info = storage.stat(real)
    except OSError as exc:
        raise BaseReferenceError(f"{where}: base {name!r} cannot be found ({exc.strerror})") from None
    if not info.is_file:
        raise BaseReferenceError(f"{where}: base {name!r} is not a regular file (a symbolic link, FIFO or directory "
                                 "is never followed)")
    below = context if layer else attrs.evolve(ImageContext.for_layer(real), allowed=context.allowed)
    return ResolvedBase(real, below)


def check_identity(root: Root, base_root: Root | None, base_size: int, where: str) -> None:
    """The base found must be the one recorded: same uuid and data generation (Lamina), same size."""
    if root.base_kind == BASE_LAMINA:
        assert base_root is not None
        if base_root.image_uuid != root.base_uuid:
            raise BaseChanged(f"{where}: base {root.base_path!r} is another image (uuid {base_root.image_uuid.hex()}, "
                              f"expected {root.base_uuid.hex()})")
        if base_root.data_generation != root.base_data_generation:
            raise BaseChanged(f"{where}: base {root.base_path!r} was modified after this image was made on it "
                              f"(data generation {base_root.data_generation}, expected {root.base_data_generation})")
    if root.base_kind in (BASE_RAW, BASE_LAMINA) and base_size != root.base_size:
        raise BaseChanged(f"{where}: base {root.base_path!r} is {base_size} bytes, expected {root.base_size}")


class ChainWalk:
    """Loop and depth guard for following a chain of bases."""

    def __init__(self) -> None:
        self.seen: set[str] = set()  # real paths, or `identity:DEV:INO`

    def visit(self, real_path: str, where: str, storage: Storage | None = None) -> None:
        """Count one file of the chain; with `storage`, a file is known by its identity (device and inode), so
        two names of one file (a top and its twin, F-TREE-003) are one file met twice."""
        if storage is not None:
            try:
                identity = storage.stat(real_path).identity
            except (FileNotFoundError, OSError):
                identity = None
            real_path = f"{real_path}" if identity is None else f"identity:{identity[0]}:{identity[1]}"
        if real_path in self.seen:
            raise BaseLoop(f"{where}: base chain loops back to {real_path}")
        if len(self.seen) >= MAX_CHAIN_DEPTH:
            raise ChainTooDeep(f"{where}: base chain is deeper than {MAX_CHAIN_DEPTH} files")
        self.seen.add(real_path)
