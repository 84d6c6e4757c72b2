"""Run a workload against the reference implementation on the recording backend.

The result, a `Recording`, holds every storage operation and every guest
event (with the index range of the operations it issued and the abstract
model after it), which is all the explorer and the oracle need.
"""
from __future__ import annotations

import attrs

from lamina.impl.image import Image
from lamina.spec import model
from lamina.spec.model import Disk

from .controls import variant
from .memstore import DiskState, MemStorage, Op, Trace
from .workloads import Workload, pattern_bytes

IMAGE_PATH = "vm/disk.lam"


@attrs.frozen
class Event:
    """One guest operation: what it was, the ops [start, end) it issued, and its effect on the model."""

    kind: str  # create, open, write, zero, discard, flush, resize, close
    start: int
    end: int
    disk: Disk  # the model after the event
    changes: tuple[tuple[int, bytes], ...] = ()  # (sector, new value) for write-like events
    step: tuple = ()

    @property
    def durable(self) -> bool:
        """Whether completing this event makes everything before it durable (a guest flush)."""
        return self.kind in ("flush", "close", "create", "open")


@attrs.frozen(eq=False)
class Recording:
    workload: Workload
    variant: str | None
    base: DiskState  # durable state before the first recorded op
    base_disk: Disk | None  # the model of the base (None: no image yet)
    ops: tuple[Op, ...]
    events: tuple[Event, ...]


def _apply_step(image: Image, disk: Disk, step: tuple) -> tuple[Disk, tuple]:
    kind = step[0]
    if kind == "write":
        _, offset, length, pat = step
        data = pattern_bytes(pat, offset, length)
        image.write(offset, data)
        new = model.write(disk, offset, data)
    elif kind in ("zero", "discard"):
        _, offset, length = step
        (image.write_zeroes if kind == "zero" else image.discard)(offset, length)
        new = model.write_zeroes(disk, offset, length)
    elif kind == "flush":
        image.flush()
        return disk, ()
    elif kind == "resize":
        image.resize(step[1])
        # A shrink drops sectors; growing back later reads them as zero.
        dropped = range(step[1] // 512, disk.virtual_size // 512)
        return model.resize(disk, step[1]), tuple((s, bytes(512)) for s in dropped)
    else:
        raise ValueError(f"unknown step {step!r}")
    first, last = offset // 512, (offset + length - 1) // 512
    return new, tuple((s, new.sectors.get(s, bytes(512))) for s in range(first, last + 1))


def _policy(image: Image, workload: Workload) -> Image:
    """The workload's lowered intent-list limits, so that a small trace reaches eviction (FORMAT.md section 6)."""
    if workload.max_intents:
        image.max_intents = workload.max_intents
    if workload.settle_interval:
        image.settle_interval = workload.settle_interval
    return image


def record_workload(workload: Workload, variant_name: str | None = None) -> Recording:
    """Run `workload` (under a broken variant when named) and record everything it does."""
    with variant(variant_name):
        storage = MemStorage()
        disk: Disk | None = None
        if not workload.create_in_trace:
            image = _policy(Image.create(IMAGE_PATH, workload.virtual_size, workload.cluster_size, storage=storage),
                            workload)
            disk = model.empty_disk(workload.virtual_size)
            for step in workload.setup:
                disk, _ = _apply_step(image, disk, step)
            image.close()
        base = storage.state.copy()
        base_disk = disk
        trace = Trace()
        storage.trace = trace
        events: list[Event] = []
        start = len(trace)
        if workload.create_in_trace:
            image = _policy(Image.create(IMAGE_PATH, workload.virtual_size, workload.cluster_size, storage=storage),
                            workload)
            disk = model.empty_disk(workload.virtual_size)
            events.append(Event("create", start, len(trace), disk))
        else:
            image = _policy(Image.open(IMAGE_PATH, storage=storage), workload)
            assert disk is not None
            events.append(Event("open", start, len(trace), disk))
        for step in workload.steps:
            start = len(trace)
            disk, changes = _apply_step(image, disk, step)
            events.append(Event(step[0], start, len(trace), disk, changes, step))
        start = len(trace)
        image.close()
        events.append(Event("close", start, len(trace), disk))
    return Recording(workload, variant_name, base, base_disk, tuple(trace.ops), tuple(events))
