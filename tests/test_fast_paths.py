"""The fast forms of per-request work agree with their plain definitions.

Runs of presence bits are found a run at a time with integer tricks, zero
buffers by comparing against zeros, command lines without quoting by
`str.split`; each is checked here against the one-bit-, one-byte- or
`shlex`-at-a-time definition it replaces, over random inputs.
"""
from __future__ import annotations

import random
import shlex
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from lamina.impl.cli import take_io_commands
from lamina.impl.image import Image
from lamina.impl.iocmd import split_words
from lamina.spec.errors import InvalidArgument
from lamina.spec.layout import SECTOR_SIZE
from lamina.spec.regionmap import absent_runs, bit_runs, zero_absent
from lamina.spec.zeros import is_zero

from conftest import pattern

# Masks with long runs (a written cluster with a hole or two), not only uniform noise.
runny_masks = st.lists(st.tuples(st.booleans(), st.integers(1, 40)), max_size=12).map(
    lambda runs: int("".join(("1" if bit else "0") * n for bit, n in reversed(runs)) or "0", 2))


def bit_runs_by_bit(bits: int, width: int) -> list[tuple[int, int, bool]]:
    """The definition: walk the bits one by one, cutting where a bit differs from the one before."""
    runs: list[tuple[int, int, bool]] = []
    for k in range(width):
        bit = bool(bits >> k & 1)
        if runs and runs[-1][2] == bit:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, bit)
        else:
            runs.append((k, 1, bit))
    return runs


@given(st.one_of(runny_masks, st.integers(0, (1 << 300) - 1)), st.integers(0, 256))
def test_bit_runs_agree_with_the_bit_by_bit_walk(bits, width):
    assert bit_runs_by_bit(bits, width) == bit_runs(bits, width)


@given(st.one_of(runny_masks, st.integers(0, (1 << 128) - 1)), st.sampled_from([8, 16, 64, 128]))
def test_absent_runs_are_the_clear_runs(mask, sectors):
    mask &= (1 << sectors) - 1
    expected = [(s, n) for s, n, present in bit_runs_by_bit(mask, sectors) if not present]
    assert expected == absent_runs(mask, sectors)


@given(st.one_of(runny_masks, st.integers(0, 255)), st.integers(0, 1 << 32))
def test_zero_absent_zeroes_exactly_the_absent_sectors(mask, seed):
    mask &= 0xFF
    data = pattern(seed, 8 * SECTOR_SIZE)
    got = zero_absent(data, mask, 8)
    for k in range(8):
        sector = slice(k * SECTOR_SIZE, (k + 1) * SECTOR_SIZE)
        assert got[sector] == (data[sector] if mask >> k & 1 else bytes(SECTOR_SIZE))


@given(st.integers(0, 5 << 20), st.lists(st.integers(0, 5 << 20), max_size=3), st.integers(1, 255))
@settings(max_examples=50)
def test_is_zero_is_not_any(length, spots, value):
    buffer = bytearray(length)
    for spot in spots:
        if spot < length:
            buffer[spot] = value
    assert (not any(buffer)) == is_zero(buffer) == is_zero(bytes(buffer)) == is_zero(memoryview(buffer))


@given(st.text(alphabet=st.sampled_from(list("write -P0xab 4k\t\"'\\#\x0b\u00a0")), max_size=30))
def test_split_words_is_shlex_split(line):
    try:
        expected = shlex.split(line)
    except ValueError:
        expected = None
    try:
        got = split_words(line)
    except ValueError:
        got = None
    assert expected == got


def sector_presence(image: Image) -> list[bool]:
    """Per guest sector, whether the image's own map marks it present: read bit by bit."""
    g = image.geometry
    out = []
    for sector in range(g.virtual_size // SECTOR_SIZE):
        region, within = divmod(sector * SECTOR_SIZE, g.region_span)
        m = image._map(region)
        out.append(m is not None and bool(m.present[within // SECTOR_SIZE // 8] >> (within // SECTOR_SIZE % 8) & 1))
    return out


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2 * 128 * 8 + 7), st.integers(1, 300)), max_size=12))
@settings(max_examples=25, deadline=None)
def test_extents_and_absent_ranges_follow_the_sector_bits(tmp_path_factory, ops):
    """4 KiB clusters (8 sectors each), 2 regions and a bit: runs cross clusters and regions."""
    path = str(tmp_path_factory.mktemp("fast") / "img.lam")
    size = (2 * 128 * 8 + 8) * SECTOR_SIZE
    with Image.create(path, size, 4096) as image:
        for write, first, count in ops:
            count = min(count, size // SECTOR_SIZE - first)
            if count > 0:
                if write:
                    image.write(first * SECTOR_SIZE, pattern(first, count * SECTOR_SIZE))
                else:
                    image.discard(first * SECTOR_SIZE, count * SECTOR_SIZE)
        present = sector_presence(image)
        extents = list(image.extents())
        assert sum(e.length for e in extents) == size
        pos = 0
        for e in extents:
            assert e.start == pos and e.length > 0
            assert all(present[s] == e.data for s in range(e.start // SECTOR_SIZE, (e.start + e.length) // SECTOR_SIZE))
            if e.data:
                assert e.offset == image.geometry.guest_to_file(e.start)
            pos += e.length
        for a, b in zip(extents, extents[1:]):  # merged: neighbours differ, or their file bytes do not continue
            assert a.data != b.data or (a.data and a.offset + a.length != b.offset)
        rng = random.Random(len(ops))
        for _ in range(20):
            lo = rng.randrange(0, size)
            hi = rng.randrange(lo + 1, min(size, lo + 3 * image.geometry.region_span) + 1)
            absent = [not present[s] for s in range(lo // SECTOR_SIZE, -(-hi // SECTOR_SIZE))]
            got = image.absent_ranges(lo, hi)
            covered = [any(a <= byte < b for a, b in got) for byte in
                       [max(lo, s * SECTOR_SIZE) for s in range(lo // SECTOR_SIZE, -(-hi // SECTOR_SIZE))]]
            assert covered == absent
            assert all(lo <= a < b <= hi for a, b in got)


def test_take_io_commands_keeps_order_and_leaves_the_rest():
    argv = ["io", "-c", "write 0 4k", "-r", "-cflush", "img", "-c", "read 0 4k", "--", "-c"]
    assert (["write 0 4k", "flush", "read 0 4k"], ["io", "-r", "img", "--", "-c"]) == take_io_commands(argv)
    assert ([], ["io", "img", "-c"]) == take_io_commands(["io", "img", "-c"])  # no value: argparse says so


def _lamina(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lamina.impl.cli", *args], capture_output=True, text=True,
                          input=stdin if stdin is not None else "", timeout=120)


def _without_timings(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ops; " not in line]  # the rate lines carry elapsed times


COMMANDS = ["write -P 0x5a 0 64k", "write -z 4k 4k", "flush", "read -P 0x5a 0 4k", "read -P 0 4k 4k",
            "read -v 8k 32", "discard 32k 16k", "read -P 0 32k 16k", "info"]


def test_io_commands_from_stdin_and_a_file_run_as_with_c(tmp_path):
    outputs = {}
    commands_file = tmp_path / "commands.txt"
    commands_file.write_text("\n".join(COMMANDS) + "\n")
    for how in ("c", "stdin", "file", "file-stdin"):
        image = str(tmp_path / f"{how}.lam")
        assert 0 == _lamina("create", "--cluster-size", "4k", image, "1M").returncode
        if how == "c":
            done = _lamina("io", image, *[arg for command in COMMANDS for arg in ("-c", command)])
        elif how == "stdin":
            done = _lamina("io", image, stdin="\n".join(COMMANDS) + "\n")
        elif how == "file":
            done = _lamina("io", "-f", str(commands_file), image)
        else:
            done = _lamina("io", "-f", "-", image, stdin="\n".join(COMMANDS))
        assert 0 == done.returncode, done.stderr
        with Image.open(image, readonly=True) as opened:
            outputs[how] = (_without_timings(done.stdout), opened.read(0, 1 << 20))
    assert outputs["c"][0][-2:] == ["virtual size: 1048576", "cluster size: 4096"]
    assert outputs["c"] == outputs["stdin"] == outputs["file"] == outputs["file-stdin"]


def test_io_c_then_file_and_errors_stop_the_run(tmp_path):
    image = str(tmp_path / "img.lam")
    assert 0 == _lamina("create", image, "1M").returncode
    commands_file = tmp_path / "commands.txt"
    commands_file.write_text("read -P 0x11 0 4k\nwrite -P 0x100 0 4k\nwrite -P 0x22 0 4k\n")
    done = _lamina("io", "-c", "write -P 0x11 0 4k", "-f", str(commands_file), image)
    assert 1 == done.returncode
    assert "invalid pattern" in done.stderr and "Traceback" not in done.stderr
    assert 2 == done.stdout.count("bytes at offset 0")  # the write of -c, the read of the file, nothing after the error
    with Image.open(image, readonly=True) as opened:
        assert bytes([0x11]) * 4096 == opened.read(0, 4096)
    missing = _lamina("io", "-f", str(tmp_path / "nope.txt"), image)
    assert 1 == missing.returncode and "nope.txt" in missing.stderr and "Traceback" not in missing.stderr


def test_clusters_a_region_walk_visits_are_those_the_per_cluster_test_keeps():
    """RegionMap.clusters_to_visit / present_clusters against the test each walk made for all 128 clusters."""
    from array import array

    from lamina.spec.layout import CLUSTERS_PER_REGION, overlaps
    from lamina.spec.regionmap import RegionMap

    rng = random.Random(7)
    for spc, size in ((8, 4096), (128, 65536)):
        width = spc // 8
        data = 1 << 20
        for _ in range(300):
            crcs = array("I", [rng.choice([0, 0, 0, rng.getrandbits(32), 1 << 24, 256]) for _ in range(CLUSTERS_PER_REGION)])
            present = bytearray(rng.choice([0, 0, 0, 0, 1, 128]) for _ in range(CLUSTERS_PER_REGION * width))
            m = RegionMap(0, 1, crcs, present, 0, spc)
            starts = sorted({data - size + size * rng.randrange(CLUSTERS_PER_REGION + 2) for _ in range(rng.randrange(6))})
            extents = [(o + rng.randrange(size), rng.randrange(1, 3 * size)) for o in starts]
            extents = [e for i, e in enumerate(extents) if i == 0 or extents[i - 1][0] + extents[i - 1][1] < e[0]]
            expected = [c for c in range(CLUSTERS_PER_REGION)
                        if m.cluster_mask(c) or crcs[c] or overlaps(extents, data + c * size, size)]
            assert m.clusters_to_visit(extents, data, size) == expected
            assert m.present_clusters() == [c for c in range(CLUSTERS_PER_REGION) if m.cluster_mask(c)]


def _check_region_by_cluster(file, geometry, root, region, extents, findings):
    """The definition `spec.check.check_region` reads faster: one pread and one judgement per cluster, every
    map copy's padding read whole (holes included)."""
    from lamina.spec.check import CORRUPTION, DEGRADED, LEAK, PENDING, MAX_COUNTER, FormatError, Finding
    from lamina.spec.layout import CLUSTERS_PER_REGION, overlaps
    from lamina.spec.protocol import cluster_crc, read_map_copies
    from lamina.spec.regionmap import RegionMap
    from lamina.spec.replication import select_map

    pending = region in root.intents
    span = (region * geometry.region_span, min(geometry.region_span, geometry.virtual_size - region * geometry.region_span))
    try:
        chosen = select_map(read_map_copies(file, geometry, region), geometry, region, root.image_uuid)
    except FormatError as exc:
        findings.append(Finding(CORRUPTION, "map-unrecoverable", str(exc), None, span))
        return 0
    for p in chosen.problems:
        findings.append(Finding(PENDING if pending else DEGRADED, "map-copy", p.message, None if pending else ("map-copy", region, p.slot)))
    if chosen.value is not None and chosen.value.generation >= MAX_COUNTER:
        findings.append(Finding(CORRUPTION, "counter-exhausted", f"region {region}'s map generation is at MAX_COUNTER: "
                                "no commit may move it on, so the region cannot be written again", None, span))
    m = RegionMap.from_copy(chosen.value, geometry, region, chosen.slot)
    size, spc, virtual_size = geometry.cluster_size, geometry.sectors_per_cluster, geometry.virtual_size
    for slot in (0, 1):
        pad = geometry.map_copy_offset(region, slot) + geometry.map_used_length
        tail = size - geometry.map_used_length
        if any(file.pread(pad, tail)):
            findings.append(Finding(LEAK, "leaked-bytes", f"non-zero bytes after map copy {'AB'[slot]} of region {region} at file offset {pad}",
                                    ("punch", pad, tail)))
    verified = 0
    for c in range(CLUSTERS_PER_REGION):
        cluster = region * CLUSTERS_PER_REGION + c
        guest = cluster * size
        offset = geometry.region_data_offset(region) + c * size
        inside = max(0, min(spc, (virtual_size - guest) // SECTOR_SIZE))
        mask = m.cluster_mask(c)
        if mask >> inside:
            findings.append(Finding(PENDING if pending else CORRUPTION, "map-invariant",
                                    f"region {region}'s map marks sectors of cluster {cluster} at or past the virtual size as present"
                                    + ("; recovery drops them" if pending else "")))
            mask &= (1 << inside) - 1
        if not mask and not m.data_crcs[c] and not overlaps(extents, offset, size):
            continue
        data = file.pread(offset, size).ljust(size, b"\0")
        if not mask and not m.data_crcs[c] and not any(data):
            continue
        leaked = [(s, n) for s, n, bit in bit_runs_by_bit(mask, spc) if not bit and any(data[s * SECTOR_SIZE : (s + n) * SECTOR_SIZE])]
        if pending:
            if leaked:
                findings.append(Finding(PENDING, "unflushed-bytes", f"cluster {cluster} holds bytes of an unflushed write; recovery punches them"))
            continue
        for s, n in leaked:
            findings.append(Finding(LEAK, "leaked-bytes",
                                    f"non-zero bytes in absent sectors of cluster {cluster} (guest offset {guest + s * SECTOR_SIZE}, {n * SECTOR_SIZE} bytes, file offset {offset + s * SECTOR_SIZE})",
                                    ("punch", offset + s * SECTOR_SIZE, n * SECTOR_SIZE), (guest + s * SECTOR_SIZE, n * SECTOR_SIZE)))
        seen = bytearray(data)
        for s, n, bit in bit_runs_by_bit(mask, spc):
            if not bit:
                seen[s * SECTOR_SIZE : (s + n) * SECTOR_SIZE] = bytes(n * SECTOR_SIZE)
        verified += 1
        if cluster_crc(bytes(seen), mask) != m.data_crcs[c]:
            length = min(size, virtual_size - guest) if guest < virtual_size else size
            findings.append(Finding(CORRUPTION, "data-checksum",
                                    f"data of guest range [{guest}, {guest + length}) (cluster {cluster}, file offset {offset}) does not match its CRC32C",
                                    None, (guest, length)))
    return verified


def _damaged_image(path: str, rng: random.Random) -> None:
    """A written image (whole, partial and unwritten clusters, maybe a virtual size inside a cluster), some of it
    left unflushed in listed regions, then random bytes written anywhere in the file: data, absent sectors, map
    copies and their padding, past the end."""
    import os

    from lamina.spec.layout import CLUSTERS_PER_REGION

    cluster = rng.choice([4096, 8192])
    size = rng.choice([3, 5]) * CLUSTERS_PER_REGION * cluster - rng.choice([0, 0, SECTOR_SIZE, 7 * SECTOR_SIZE])
    image = Image.create(path, size, cluster)
    for _ in range(rng.randrange(1, 12)):
        start = rng.randrange(size // SECTOR_SIZE) * SECTOR_SIZE
        length = min(size - start, rng.choice([SECTOR_SIZE, cluster, rng.randrange(1, 64) * SECTOR_SIZE,
                                               CLUSTERS_PER_REGION * cluster]))
        image.write(start, bytes([rng.randrange(1, 256)]) * length)
    image.flush()
    if rng.random() < 0.3:  # unflushed writes: listed regions, bytes the maps do not know yet
        image.write(rng.randrange(size // SECTOR_SIZE) * SECTOR_SIZE, b"\x77" * SECTOR_SIZE)
        abandoned, image._file = image.file, None  # as a crash leaves it: no flush, no close
        abandoned.fsync()
        abandoned.close()
    else:
        image.close()
    fd = os.open(path, os.O_RDWR)
    try:
        end = os.fstat(fd).st_size
        for _ in range(rng.randrange(0, 6)):
            os.pwrite(fd, bytes([rng.randrange(1, 256)]) * rng.choice([1, 16, SECTOR_SIZE]),
                      rng.randrange(1 << 20, end + cluster))
        if rng.random() < 0.2:  # cut short, at any byte (not a whole cluster or page): its last region runs off the end
            os.ftruncate(fd, rng.randrange(1 << 20, end))
    finally:
        os.close(fd)


def _in_memory(file):
    """The crash simulator's backend holding the bytes of an OS file, its holes left holes."""
    from lamina.crashsim.memstore import MemStorage

    copy = MemStorage().create("copy.lam")
    for offset, length in file.data_extents():
        copy.pwrite(offset, file.pread(offset, length))
    copy.truncate(file.size())
    return copy


class _PreadOnly:
    """A file with the storage interface's `pread` and no `pread_into`, as the crash simulator's backend."""

    def __init__(self, file) -> None:
        self._file = file

    def pread(self, offset: int, length: int) -> bytes:
        return self._file.pread(offset, length)


def test_check_by_runs_finds_what_the_cluster_by_cluster_definition_finds(tmp_path, monkeypatch):
    """spec.check.check_region (whole runs read at once, full runs judged by their checksums alone, padding read
    only where allocated) against the plain per-cluster walk, finding for finding, on damaged images, through
    each way a backend offers its bytes: windows onto a locked OS file (a mapping), an OS file without a lock of
    its own (`pread_into`), a backend with `pread` alone, and the crash simulator's memory (its windows)."""
    from lamina.impl.osfile import OsStorage
    from lamina.spec import check
    from lamina.spec.layout import allocated_regions

    rng = random.Random(11)
    kinds = set()
    windows = {"os": 0, "memory": 0}
    for case in range(80):
        path = str(tmp_path / f"{case}.lam")
        _damaged_image(path, rng)
        monkeypatch.setattr(check, "READ_CHUNK", rng.choice([1 << 20, 3 * 4096, 1]))  # runs cut short, or not
        monkeypatch.setattr(check, "VIEW_CHUNK", rng.choice([8 << 20, 5 * 4096, 1]))  # windows of one run, or several
        file = OsStorage().open(path, writable=False)
        how = ("mapped", "read-into", "pread", "memory")[case % 4]
        if how == "mapped":
            judged = OsStorage().open(path, writable=False)
            judged.lock(False)  # a lock of its own: the OS backend then maps it
        elif how == "read-into":
            judged = file
        elif how == "pread":
            judged = _PreadOnly(file)
        else:
            judged = _in_memory(file)
        try:
            findings: list = []
            root = check.check_root(file, findings)
            extents = sorted(file.data_extents())
            for region in sorted(set(allocated_regions(extents, root.geometry)) | set(root.intents)):
                fast: list = []
                slow: list = []
                assert (check.check_region(judged, root.geometry, root, region, extents, fast)
                        == _check_region_by_cluster(file, root.geometry, root, region, extents, slow))
                assert fast == slow
                kinds |= {f.kind for f in fast}
            if how in ("mapped", "memory"):
                with judged.view(1 << 20, 4096) as window:
                    windows["os" if how == "mapped" else "memory"] += len(window) == 4096
        finally:
            if how == "mapped":
                judged.close()
            file.close()
    assert {"data-checksum", "leaked-bytes", "unflushed-bytes"} <= kinds  # the damage reached every judgement
    assert windows["os"] and windows["memory"]


def test_a_window_holds_the_bytes_pread_reads(tmp_path):
    """Viewable.view against pread on the OS backend (a mapping) and the memory one: holes, ranges past the end,
    a size that is no multiple of a page or a cluster, offsets off a page, empty ranges and an empty file."""
    import os

    from lamina.impl.osfile import OsStorage

    rng = random.Random(3)
    for size in (0, 1, 4095, 3 * 65536 + 777, 5 << 20):
        path = str(tmp_path / f"{size}.bin")
        with open(path, "wb") as out:
            out.truncate(size)
            for _ in range(6 if size else 0):  # data here and there, holes between
                at = rng.randrange(size)
                out.seek(at)
                out.write(rng.randbytes(min(size - at, rng.choice([1, 4096, 70000]))))
        file = OsStorage().open(path, writable=False)
        try:
            assert file.view(0, 4096) is None  # no lock of its own: a truncation could pull the pages away
            file.lock(False)
            memory = _in_memory(file)
            ranges = [(0, size), (0, 0), (size, 4096), (size + 8192, 10), (max(0, size - 5), 4096)]
            ranges += [(rng.randrange(size + 2), rng.randrange(3 * 65536)) for _ in range(40)]
            for offset, length in ranges:
                expected = file.pread(offset, length)
                for backend in (file, memory):
                    with backend.view(offset, length) as window:
                        assert bytes(window) == expected, (size, offset, length)
        finally:
            file.close()
        assert file.view(0, 1) is None  # closed: its lock went with it
        os.unlink(path)


def test_a_slice_kept_past_its_window_is_refused_but_an_error_inside_it_passes(tmp_path):
    """A mapping cannot be unmapped while a slice of it lives: keeping one is the reader's bug, said at once;
    when the block already fails, that error is the one that propagates."""
    from lamina.impl.osfile import OsStorage

    path = tmp_path / "f.bin"
    path.write_bytes(pattern(1, 3 * 4096))
    file = OsStorage().open(str(path), writable=False)
    try:
        file.lock(False)
        with pytest.raises(BufferError):
            with file.view(100, 8192) as window:
                kept = window[:10]
        assert bytes(kept) == pattern(1, 3 * 4096)[100:110]
        del kept
        with pytest.raises(KeyError):
            with file.view(0, 4096) as window:
                kept = window[:10]
                raise KeyError("inside")
    finally:
        file.close()


def test_check_of_every_image_is_the_same_through_windows_reads_and_memory(tmp_path, monkeypatch):
    """check_image of damaged images on disk (short, zero-length, holes, a size inside a cluster) gives one report
    whether the file is mapped, read, or held by the crash simulator, which takes its windows."""
    import os

    from lamina.crashsim.memstore import MemFile
    from lamina.impl.osfile import OsStorage
    from lamina.spec.check import check_image

    calls = []
    plain = MemFile.view
    monkeypatch.setattr(MemFile, "view", lambda self, offset, length: calls.append(length) or plain(self, offset, length))
    rng = random.Random(23)
    for case in range(24):
        path = str(tmp_path / f"{case}.lam")
        _damaged_image(path, rng)
        if case % 8 == 7:
            os.truncate(path, rng.choice([0, 100, 4096 + 3]))  # no root left, or no region
        reports = []
        for how in ("mapped", "read", "memory"):
            file = OsStorage().open(path, writable=False)
            if how == "mapped":
                file.lock(False)
            try:
                reports.append(check_image(_in_memory(file) if how == "memory" else file).to_json())
            finally:
                file.close()
        assert reports[0] == reports[1] == reports[2]
    assert calls  # the simulator read through windows


def test_check_of_a_chain_and_its_store_reads_every_file_through_windows(tmp_path, monkeypatch):
    """check_tree locks each file it reads (F-LOCK-001), so every layer of a chain and the shared store are
    mapped; with force_share (no lock) none is."""
    import os

    from lamina.impl import layers
    from lamina.impl.dedup import dedup
    from lamina.impl.osfile import OsFile, OsStorage
    from lamina.spec.store import STORE_NAME
    from lamina.spec.tree import check_tree, layer_files

    monkeypatch.chdir(tmp_path)
    mib = 1 << 20

    def noise(seed: int, length: int) -> bytes:  # no two clusters equal (a pattern repeats: the dedup would share it)
        return random.Random(seed).randbytes(length)

    with Image.create("img.lam", 16 * mib) as image:
        image.write(0, noise(1, 2 * mib))
    layers.create_snapshot("img.lam", "s0")
    for i, name in enumerate(("a.lam", "b.lam")):
        layers.clone("img.lam", "s0", name)
        with Image.open(name) as image:
            image.write(4 * mib, noise(2, 2 * mib))  # the same in both: shared by the dedup
            image.write(10 * mib, noise(3 + i, mib))  # its own: kept in the layer
        layers.create_snapshot(name, "s1")
    dedup(["a.lam"], ["b.lam"])
    with Image.open("a.lam") as image:  # and the top holds data of its own
        image.write(12 * mib, noise(5, mib))
    mapped = []
    plain = OsFile.view

    def view(self, offset, length):
        window = plain(self, offset, length)
        if window is not None:
            mapped.append(os.path.realpath(self.path))
        return window

    monkeypatch.setattr(OsFile, "view", view)
    report = check_tree("a.lam", OsStorage())
    assert report.exit_code == 0 and not report.findings, report.findings
    files, _ = layer_files("a.lam", OsStorage())
    assert len(files) >= 3 and os.path.exists(STORE_NAME)
    assert {os.path.realpath(f) for f in files} | {os.path.realpath(STORE_NAME)} == set(mapped)
    mapped.clear()
    assert check_tree("a.lam", OsStorage(), force_share=True).exit_code == 0
    assert not mapped


def test_write_clusters_records_what_write_and_flush_record(tmp_path):
    """Image.write_clusters (checksums taken from the bytes in hand) and list_intents (regions listed ahead) leave
    the maps a plain write and flush leave: the same presence and checksums, and a clean check."""
    from lamina.impl.osfile import OsStorage
    from lamina.spec.check import check_image
    from lamina.spec.protocol import read_map_copies
    from lamina.spec.replication import select_map

    rng = random.Random(5)
    size, cluster = 6 * 128 * 4096 + 3 * SECTOR_SIZE, 4096
    writes = []
    for _ in range(40):
        first = rng.randrange(size // cluster)
        count = min(size // cluster - first, rng.choice([1, 3, 130, 300]))
        writes.append((first * cluster, bytes(rng.getrandbits(8) for _ in range(64)) * (count * cluster // 64)))
    maps = []
    for how in ("plain", "clusters"):
        path = str(tmp_path / f"{how}.lam")
        with Image.create(path, size, cluster) as image:
            image.max_intents = 8  # small: the listing evicts, and a write's own listing flushes midway
            for i, (offset, data) in enumerate(writes):
                if how == "plain":
                    image.write(offset, data)
                else:
                    if i % 3 == 0:
                        image.list_intents([(offset, len(data)), (0, SECTOR_SIZE)])
                    image.write_clusters(offset, data)
                if i % 7 == 6:
                    image.flush()
            with pytest.raises(InvalidArgument):
                image.write_clusters(SECTOR_SIZE, bytes(cluster)) if how == "clusters" else image.write_clusters(0, bytes(100))
        file = OsStorage().open(path, writable=False)
        try:
            report = check_image(file)
            assert report.exit_code == 0 and not report.findings, report.findings
            g = report.root.geometry
            found = {}
            for region in range(g.num_regions):
                chosen = select_map(read_map_copies(file, g, region), g, region, report.root.image_uuid)
                if chosen.value is not None:
                    found[region] = (chosen.value.present, chosen.value.data_crcs)
            maps.append(found)
        finally:
            file.close()
        with Image.open(path, readonly=True) as opened:
            maps[-1] = (maps[-1], opened.read(0, size))
    assert maps[0] == maps[1]


@given(st.lists(st.tuples(st.sampled_from(["clusters", "sectors", "discard", "zeroes", "flush", "reopen"]),
                          st.one_of(st.integers(0, 3), st.integers(126, 129), st.integers(254, 257)),  # a few clusters, often met again
                          st.integers(1, 3)), max_size=14))
@settings(max_examples=40, deadline=None)
def test_checksums_of_whole_cluster_writes_are_those_read_back(tmp_path_factory, ops):
    """A write that leaves no sector of a cluster present outside it (whole clusters, or into an empty one) checksums
    the cluster from the bytes in hand; any other change of the cluster before the flush must make the flush read it
    back instead, and sectors written before a close count as present.  4 KiB clusters, 2 regions and 2 clusters."""
    from lamina.spec.check import check_image
    from lamina.spec.protocol import cluster_crc
    from lamina.impl.osfile import OsStorage

    path = str(tmp_path_factory.mktemp("crcs") / "img.lam")
    cs = 4096
    size = (2 * 128 + 2) * cs
    Image.create(path, size, cs).close()
    image = Image.open(path)
    try:
        for i, (kind, cluster, count) in enumerate(ops):
            offset = cluster * cs
            length = min(count * cs, size - offset)
            if kind == "clusters":
                image.write(offset, pattern(i, length))
            elif kind == "sectors":
                image.write(offset + SECTOR_SIZE * count, pattern(i, SECTOR_SIZE * count))
            elif kind == "discard":
                image.discard(offset + SECTOR_SIZE, min(length, size - offset - SECTOR_SIZE))
            elif kind == "zeroes":
                image.write_zeroes(offset, length)
            elif kind == "reopen":
                image.close()
                image = Image.open(path)
            else:
                image.flush()
        image.flush()
        g = image.geometry
        for region, m in image._maps.items():
            for c in range(128):
                mask = m.cluster_mask(c)
                if region * 128 + c < g.num_clusters:
                    data = image.file.pread(g.region_data_offset(region) + c * cs, cs).ljust(cs, b"\0")
                    assert m.data_crcs[c] == cluster_crc(zero_absent(data, mask, g.sectors_per_cluster), mask)
    finally:
        image.close()
    report = check_image(OsStorage().open(path, writable=False))
    assert report.exit_code == 0, report.findings


def test_a_cluster_changed_without_a_known_checksum_is_read_back(tmp_path):
    """A discard leaves the cluster's checksum unknown until the flush: a later write into it must not start from the
    working map's checksum, which the discard made stale."""
    from lamina.spec.check import check_image
    from lamina.impl.osfile import OsStorage

    path = str(tmp_path / "img.lam")
    with Image.create(path, 1 << 20, 4096) as image:
        image.write(0, pattern(1, 4096))
        image.flush()
        image.discard(SECTOR_SIZE, SECTOR_SIZE)  # sector 1 absent: the cluster is dirty, its checksum not known
        image.write(3 * SECTOR_SIZE, pattern(2, SECTOR_SIZE))  # sectors 0, 2, 4-7 present outside this write
        image.flush()
        assert image.read(0, 4096) == pattern(1, 4096)[:512] + bytes(512) + pattern(1, 4096)[1024:1536] + \
            pattern(2, 512) + pattern(1, 4096)[2048:]
    report = check_image(OsStorage().open(path, writable=False))
    assert report.exit_code == 0, report.findings


def test_whole_cluster_writes_into_a_listed_region_are_never_read_back(tmp_path, monkeypatch):
    """Aligned whole-cluster writes (the bulk path of `Image.write`) record their checksums from the bytes in hand:
    the flush and the close read no data cluster, and the checksums are those of the bytes, as check finds them."""
    from lamina.impl.osfile import OsFile, OsStorage
    from lamina.spec.check import check_image

    path = str(tmp_path / "img.lam")
    cs = 64 << 10
    with Image.create(path, 32 << 20, cs) as image:
        for i in range(0, 32 << 20, 2 * cs):
            image.write(i, pattern(i // cs, 2 * cs if i % (6 * cs) else cs))
        reads: list[tuple[int, int]] = []
        real = OsFile.pread
        monkeypatch.setattr(OsFile, "pread", lambda self, o, n: reads.append((o, n)) or real(self, o, n))
        image.flush()
        data_reads = [r for r in reads if r[1] >= cs]
        assert not data_reads, data_reads
    monkeypatch.undo()
    report = check_image(OsStorage().open(path, writable=False))
    assert report.exit_code == 0 and not report.findings, report.findings
