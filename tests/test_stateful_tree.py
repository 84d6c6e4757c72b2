"""Model-based test over a whole tree: images, snapshots and clones agree with the model after every step.

The model is a dictionary of disks: each image's current contents and each
of its snapshots.  Management operations are pure functions of it: a
snapshot copies a disk, a revert restores one, a delete drops one, a clone
adds an image.  After every step every branch and snapshot reads as the
model says, `convert` (to raw and to Lamina) copies exactly what the guest
sees through the whole chain, and `check` is clean over every tree.
"""
from __future__ import annotations

import os
import tempfile

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lamina.impl import layers
from lamina.impl.convert import convert
from lamina.impl.dedup import dedup, gc
from lamina.impl.image import Image
from lamina.impl.osfile import OsStorage
from lamina.spec import model
from lamina.spec.abstraction import abstract_layer
from lamina.spec.references import ImageContext
from lamina.spec.tree import check_tree

from conftest import pattern

SIZE = 1 << 20
CLUSTER = 4096


class TreeMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        base = os.path.join(self.dir.name, "base.raw")
        with open(base, "wb") as f:
            f.write(pattern(200, SIZE))
        main = self.path("main.lam")
        Image.create(main, base=base, cluster_size=CLUSTER).close()
        under, over = self.path("under.lam"), self.path("over.lam")
        with Image.create(under, SIZE, CLUSTER) as image:
            image.write(0, pattern(201, SIZE // 2))
        Image.create(over, base=under).close()
        self.under = under
        self.images = {main: model.write(model.empty_disk(SIZE), 0, pattern(200, SIZE)),
                       over: model.write(model.empty_disk(SIZE), 0, pattern(201, SIZE // 2))}
        self.snaps: dict[str, dict[str, model.Disk]] = {main: {}, over: {}}
        self.committable = {over}  # images whose base no snapshot or clone shares
        self.counter = 0

    def path(self, name: str) -> str:
        return os.path.join(self.dir.name, name)

    def teardown(self) -> None:
        self.dir.cleanup()

    def _image(self, data) -> str:
        return data.draw(st.sampled_from(sorted(self.images)), label="image")

    @rule(data=st.data(), seed=st.integers(0, 255), sectors=st.integers(1, 24), zero=st.booleans())
    def write(self, data, seed, sectors, zero) -> None:
        path = self._image(data)
        size = self.images[path].virtual_size
        if size == 0:
            return
        offset = data.draw(st.integers(0, size // 512 - 1), label="sector") * 512
        length = min(sectors * 512, size - offset)
        with Image.open(path) as image:
            if zero:
                image.write_zeroes(offset, length)
                self.images[path] = model.write_zeroes(self.images[path], offset, length)
            else:
                image.write(offset, pattern(seed, length))
                self.images[path] = model.write(self.images[path], offset, pattern(seed, length))

    @rule(data=st.data(), sectors=st.integers(0, 2 * SIZE // 512))
    def resize(self, data, sectors) -> None:
        path = self._image(data)
        with Image.open(path) as image:
            image.resize(sectors * 512)
        self.images[path] = model.resize(self.images[path], sectors * 512)

    @rule(data=st.data())
    def snapshot(self, data) -> None:
        path = self._image(data)
        self.counter += 1
        name = f"s{self.counter}"
        layers.create_snapshot(path, name, vmstate=pattern(self.counter, 100), vm_clock_ns=self.counter)
        self.snaps[path][name] = self.images[path]
        self.committable.discard(path)

    def _snap(self, data) -> tuple[str, str] | None:
        choices = sorted((p, n) for p, snaps in self.snaps.items() for n in snaps)
        return data.draw(st.sampled_from(choices), label="snapshot") if choices else None

    @rule(data=st.data())
    def revert(self, data) -> None:
        chosen = self._snap(data)
        if chosen:
            layers.revert_snapshot(*chosen)
            self.images[chosen[0]] = self.snaps[chosen[0]][chosen[1]]

    @rule(data=st.data())
    def delete(self, data) -> None:
        chosen = self._snap(data)
        if chosen:
            layers.delete_snapshot(*chosen)
            del self.snaps[chosen[0]][chosen[1]]

    @precondition(lambda self: len(self.images) < 4)
    @rule(data=st.data())
    def clone(self, data) -> None:
        chosen = self._snap(data)
        if chosen:
            self.counter += 1
            new = self.path(f"clone{self.counter}.lam")
            layers.clone(chosen[0], chosen[1], new)
            self.images[new] = self.snaps[chosen[0]][chosen[1]]
            self.snaps[new] = {}

    @precondition(lambda self: self.committable)
    @rule()
    def commit(self) -> None:
        """Commit into the base: the top's contents are unchanged, and the base now reads the same."""
        path = sorted(self.committable)[0]
        layers.commit(path)
        with Image.open(self.under, readonly=True) as under:
            size = min(under.virtual_size, self.images[path].virtual_size)
            assert self.images[path].read(0, size) == under.read(0, size)

    @rule(data=st.data())
    def flatten(self, data) -> None:
        """Rebase onto nothing in safe mode: every sector the chain provided is copied up; contents unchanged."""
        path = self._image(data)
        layers.rebase(path, None)
        self.committable.discard(path)

    @rule()
    def dedup(self) -> None:
        """Share the equal frozen clusters of every image (R8): no branch or snapshot changes contents."""
        dedup(sorted(self.images))

    @rule()
    def collect(self) -> None:
        """Collect the store: what nobody references goes, nothing any layer reads does."""
        gc(self.dir.name)

    @invariant()
    def every_branch_and_snapshot_matches(self) -> None:
        for path, disk in self.images.items():
            with Image.open(path, readonly=True) as image:
                assert disk.virtual_size == image.virtual_size
                assert disk.read(0, disk.virtual_size) == image.read(0, image.virtual_size), path
            # the spec's abstraction function, applied to the files, means the same disk
            assert disk == abstract_layer(path, OsStorage(), ImageContext.for_top(path)), path
            for name, snap in self.snaps[path].items():
                with layers.open_target(f"{path}@{name}") as image:
                    assert snap.read(0, snap.virtual_size) == image.read(0, image.virtual_size), f"{path}@{name}"
                assert pattern(int(name[1:]), 100) == layers.read_vmstate(path, name)

    @invariant()
    def convert_copies_the_guest_view(self) -> None:
        """The guest view, through every base and snapshot layer, is what `convert` writes out."""
        targets = [(p, d) for p, d in self.images.items()]
        targets += [(f"{p}@{n}", d) for p, snaps in self.snaps.items() for n, d in snaps.items()]
        for source, disk in targets:
            out = self.path("converted")
            for fmt in ("raw", "lamina"):
                convert(source, out, fmt, cluster_size=CLUSTER)
                if fmt == "raw":
                    with open(out, "rb") as f:
                        got = f.read()
                else:
                    with Image.open(out, readonly=True) as image:
                        got = image.read(0, image.virtual_size)
                os.unlink(out)
                assert disk.read(0, disk.virtual_size) == got, (source, fmt)

    @invariant()
    def check_is_clean_over_every_tree(self) -> None:
        for path in self.images:
            report = check_tree(path, OsStorage())
            assert [] == [f.message for f in report.findings], path


TreeMachine.TestCase.settings = settings(max_examples=int(os.environ.get("LAMINA_EXAMPLES", 40)),
    stateful_step_count=int(os.environ.get("LAMINA_STEPS", 20)), deadline=None)
TestTreeMachine = TreeMachine.TestCase
