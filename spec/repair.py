"""`check --repair`: mend what `check` found, never touching the only good copy of anything.

Order: recovery first (it reconciles regions in the intent list and leaves
both root copies current); then each damaged copy is rewritten from its valid
twin, one write at a time followed by an fsync; leaks are punched last.  Every
step is idempotent, so a crash during repair is repaired by running it again.
Data whose checksum fails cannot be repaired from the image (it keeps one
copy of data); it stays reported by guest range, and a replica repairs it
(F-SEND-007, `impl/replicate.py: repair_data_from`).  A committing mark on an image
without a base is cleared by a root write: there is no base the commit
could have written, and the image still holds every sector.
"""
from __future__ import annotations

import attrs

from .check import CheckReport, check_image
from .protocol import read_map_copies, recover, write_root, write_root_copy
from .replication import select_map
from .storage import File
from .structures import FLAG_COMMITTING, encode_map_copy


def repair_image(file: File, store=None) -> tuple[CheckReport, CheckReport]:
    """Repair what can be repaired; return the reports before and after (`store`: as `check_image` takes it)."""
    before = check_image(file, store=store)
    if not before.completed:
        return before, before
    recovered = recover(file)
    root, best = recovered.root, recovered.root_best_slot
    geometry = root.geometry
    for finding in check_image(file, store=store).findings:
        action = finding.repair
        if action is None:
            continue
        if action[0] == "clear-commit-flag":
            root = attrs.evolve(root, flags=root.flags & ~FLAG_COMMITTING, generation=root.generation + 1)
            best = write_root(file, root, best, unsynced=True)
        elif action[0] == "root-copy":
            slot = action[1]
            write_root_copy(file, root, slot)
        elif action[0] == "map-copy":
            region, slot = action[1], action[2]
            good = select_map(read_map_copies(file, geometry, region), geometry, region, root.image_uuid).value
            if good is not None:
                copy = attrs.evolve(good, slot=slot)
                file.pwrite(geometry.map_copy_offset(region, slot), encode_map_copy(copy, geometry))
            else:
                file.punch_hole(geometry.map_copy_offset(region, slot), geometry.map_used_length)
        elif action[0] == "punch":
            file.punch_hole(action[1], action[2])
        elif action[0] == "truncate":
            file.truncate(action[1])
        file.fsync()
    return before, check_image(file, store=store)
