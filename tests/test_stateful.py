"""Model-based test (S4): random guest I/O on `impl/` agrees with the spec's model.

After every step the implementation's reads equal the model, and the spec's
`check` finds the image clean (exit 0), even between flushes.  After a flush,
the abstraction function applied to the file's bytes equals the model too.
"""
from __future__ import annotations

import os
import tempfile

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from lamina.impl.image import Image
from lamina.spec import model
from lamina.spec.abstraction import abstract_image
from lamina.spec.check import check_image

from conftest import open_file, pattern

CLUSTER = 4096
MAX_SIZE = 3 << 19  # 1.5 MiB: three regions of 512 KiB at 4 KiB clusters


class ImageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "disk.lam")
        self.image = Image.create(self.path, 1 << 20, CLUSTER)
        self.disk = model.empty_disk(1 << 20)
        self.flushed = True
        self.flushed_disk = self.disk
        self.candidates: dict[int, set[bytes]] = {}  # sector -> every value it held since the last flush

    def _changed(self, offset: int, length: int) -> None:
        self.flushed = False
        for sector in range(offset // 512, -(-(offset + length) // 512)):
            self.candidates.setdefault(sector, set()).add(self.disk.read(sector * 512, 512))

    def _mark_flushed(self) -> None:
        self.flushed = True
        self.flushed_disk = self.disk
        self.candidates = {}

    def teardown(self) -> None:
        self.image.close()
        self.dir.cleanup()

    def _range(self, data) -> tuple[int, int]:
        size = self.disk.virtual_size
        offset = data.draw(st.integers(0, size), label="offset")
        length = data.draw(st.integers(0, min(size - offset, 3 * CLUSTER)), label="length")
        return offset, length

    @precondition(lambda self: self.disk.virtual_size > 0)
    @rule(data=st.data(), seed=st.integers(0, 255), aligned=st.booleans())
    def write(self, data, seed, aligned) -> None:
        offset, length = self._range(data)
        if aligned:
            offset -= offset % 512
            length -= length % 512
        payload = pattern(seed, length)
        self.image.write(offset, payload)
        self.disk = model.write(self.disk, offset, payload)
        self._changed(offset, length)

    @precondition(lambda self: self.disk.virtual_size > 0)
    @rule(data=st.data())
    def write_zeroes(self, data) -> None:
        offset, length = self._range(data)
        self.image.write_zeroes(offset, length)
        self.disk = model.write_zeroes(self.disk, offset, length)
        self._changed(offset, length)

    @precondition(lambda self: self.disk.virtual_size > 0)
    @rule(data=st.data())
    def discard(self, data) -> None:
        offset, length = self._range(data)
        self.image.discard(offset, length)
        self.disk = model.discard(self.disk, offset, length)
        self._changed(offset, length)

    @rule()
    def flush(self) -> None:
        self.image.flush()
        self._mark_flushed()

    @rule(sectors=st.integers(0, MAX_SIZE // 512))
    def resize(self, sectors) -> None:
        self.image.resize(sectors * 512)
        self.disk = model.resize(self.disk, sectors * 512)
        self._mark_flushed()

    @rule()
    def close_and_reopen(self) -> None:
        self.image.close()
        self.image = Image.open(self.path)
        self._mark_flushed()

    @rule()
    def abandon_and_reopen(self) -> None:
        """Drop the image without flush or close, as a crash would; recovery decides each unflushed sector.

        Every sector must read its flushed value or a value it held since (R5);
        the model then adopts what recovery chose.
        """
        self.image.file.close()
        self.image._file = None
        self.image = Image.open(self.path)
        size = self.disk.virtual_size
        content = self.image.read(0, size)
        for sector in range(size // 512):
            found = content[sector * 512 : (sector + 1) * 512]
            allowed = {self.flushed_disk.read(sector * 512, 512)} | self.candidates.get(sector, set())
            assert found in allowed, f"sector {sector} reads a value it never held"
        self.disk = model.write(model.empty_disk(size), 0, content)
        self._mark_flushed()

    @invariant()
    def reads_match_model(self) -> None:
        size = self.disk.virtual_size
        assert self.disk.read(0, size) == self.image.read(0, size)

    @invariant()
    def check_is_clean(self) -> None:
        file = open_file(self.path)
        try:
            report = check_image(file)
            assert [] == [f.message for f in report.corruptions + report.leaks]
            assert 0 == report.exit_code
            if self.flushed:
                assert self.disk == abstract_image(file)
        finally:
            file.close()


ImageMachine.TestCase.settings = settings(max_examples=int(os.environ.get("LAMINA_EXAMPLES", 150)),
    stateful_step_count=int(os.environ.get("LAMINA_STEPS", 30)), deadline=None)
TestImageMachine = ImageMachine.TestCase
