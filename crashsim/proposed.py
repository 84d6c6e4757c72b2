"""Changes to `impl/` that the tree workloads showed are needed, as run-time patches (never edited into impl/).

Each entry is the exact change proposed for `impl/`, patched in only for a
`with proposed(name)` block so the simulator can show that it removes the
failures it was written for (tests/test_crashsim_layers.py).  Delete an entry
once `impl/` carries the change.

- `discard-before-punch`: `Image.discard_own` (used by `finish_commit`)
  punched the top's own sectors before a map marking them absent was durable.
  A crash in between left present sectors reading zero; the next writable open
  finished the commit by copying those zeros into the base, so both the top
  and the base lost the committed sectors (workloads layer-commit-lamina,
  layer-commit-raw, every model, strict included).  Fix: mark absent, commit
  the maps (flush), then punch.
- `recover-layers`: `merge_base_into` (delete of a snapshot with children)
  opens the child's *frozen layer file* writable and writes its root (intents,
  generation).  A crash there leaves that layer with a pending intent list and
  root copies of different generations; nothing ever recovers a layer file
  (only tops are opened writable), so `check_tree` reports corruption forever
  (layer-delete-merge, every model).  Fix: a writable open of the top (its
  `collect_garbage`) first runs the spec's `recover` on every layer file of
  its layer directory whose root has intents or a copy problem; merges
  preserve guest contents, so recovery is all that is needed.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import lamina.impl.image as image_module
import lamina.impl.layers as layers_module
from lamina.spec.layout import SECTOR_SIZE
from lamina.spec.protocol import read_root_copies, recover
from lamina.spec.references import LAYER_NAME, layer_dir_of
from lamina.spec.replication import select_root


def _discard_own(self, offset: int, length: int) -> None:
    """Image.discard_own as proposed: the maps say absent (durably) before any byte is punched."""
    self._check_writable()
    start, end = offset // SECTOR_SIZE * SECTOR_SIZE, -(-(offset + length) // SECTOR_SIZE) * SECTOR_SIZE
    ranges: list[tuple[int, int]] = []

    def drop(pos: int, stop: int) -> None:
        self._mark(pos, stop, False)
        ranges.append((pos, stop))

    if end > start:
        self._for_each_region(start, end - start, drop)
    self.flush()
    for pos, stop in ranges:
        self.file.punch_hole(self._geometry.guest_to_file(pos), stop - pos)
        self._unsynced = True


def _recover_layers_then(collect):
    def collect_garbage(path, storage=None):
        """collect_garbage as proposed: recover interrupted layer files of the layer directory first."""
        storage = layers_module._storage(storage)
        directory = layer_dir_of(os.path.abspath(path))
        if storage.exists(directory):
            for name in storage.listdir(directory):
                if not LAYER_NAME.match(name):
                    continue
                file = storage.open(os.path.join(directory, name), writable=True)
                try:
                    selection = select_root(read_root_copies(file))
                    if selection.value is not None and (selection.value.intents or selection.problems):
                        recover(file)
                finally:
                    file.close()
        return collect(path, storage)

    return collect_garbage


PROPOSED = {
    "discard-before-punch": lambda: [(image_module.Image, "discard_own", _discard_own)],
    "recover-layers": lambda: [(layers_module, "collect_garbage", _recover_layers_then(layers_module.collect_garbage))],
}


@contextlib.contextmanager
def proposed(*names: str) -> Iterator[None]:
    saved = []
    try:
        for name in names:
            for owner, attr, value in PROPOSED[name]():
                saved.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)
