"""send/receive (FORMAT.md section 12): streams that replicate snapshots, verified before anything is visible."""
from __future__ import annotations

import io
import os
import random
import struct

import pytest

from lamina.impl import layers
from lamina.impl.cli import main
from lamina.impl.image import Image
from lamina.impl.osfile import OsStorage
from lamina.impl.replicate import receive, repair_data_from, send
from lamina.spec.crc import crc32c
from lamina.spec.stream import (
    KIND_DATA,
    KIND_ZERO,
    RECORD_HEADER_SIZE,
    StreamCorrupt,
    StreamMismatch,
    StreamReader,
    StreamTruncated,
    stream_contents,
)
from lamina.spec.tree import check_tree

from conftest import pattern

MiB = 1 << 20


def _contents(target: str) -> bytes:
    with layers.open_target(target) as image:
        return image.read(0, image.virtual_size)


def _stream(target: str, base: str | None = None) -> bytes:
    out = io.BytesIO()
    send(target, out, base)
    return out.getvalue()


def _files(path: str) -> dict[str, bytes]:
    """Every file of an image (top and layer directory) with its bytes: "unchanged" means all of these."""
    out = {}
    directory = path + ".layers"
    for name in [path] + ([os.path.join(directory, n) for n in sorted(os.listdir(directory))]
                          if os.path.isdir(directory) else []):
        with open(name, "rb") as f:
            out[name] = f.read()
    return out


def _records(stream: bytes) -> list[tuple[int, int]]:
    """(start, end) of every record in a well-formed stream."""
    out, pos = [], 0
    while pos < len(stream):
        kind, _, _, _, length = struct.unpack_from("<IIQQQ", stream, pos)
        size = RECORD_HEADER_SIZE + {1: 512, 5: 64, KIND_ZERO: 0}.get(kind, length)
        out.append((pos, pos + size))
        pos += size
    return out


@pytest.fixture
def source(tmp_path, monkeypatch):
    """An image with three snapshots: s1 (data, VM state), s2 (overwrites, zeroing), s3 (after shrink and grow)."""
    monkeypatch.chdir(tmp_path)
    with Image.create("a.lam", 8 * MiB, 4096) as image:
        image.write(0, pattern(1, MiB))
        image.write(5 * MiB, pattern(2, 300 * 1024))
    layers.create_snapshot("a.lam", "s1", pattern(3, 8192) + bytes(4096) + pattern(4, 512))
    with Image.open("a.lam") as image:
        image.write(4096, pattern(5, 4096))
        image.write_zeroes(5 * MiB, 64 * 1024)
        image.write(7 * MiB, pattern(6, 512))
    layers.create_snapshot("a.lam", "s2")
    with Image.open("a.lam") as image:
        image.resize(6 * MiB)
        image.resize(8 * MiB)  # the bytes past 6 MiB now read as zero, with no sector of the top present there
    layers.create_snapshot("a.lam", "s3")
    return tmp_path


def test_full_then_incremental_streams_rebuild_every_snapshot_and_its_vm_state(source):
    receive("b.lam", io.BytesIO(_stream("a.lam@s1")))
    receive("b.lam", io.BytesIO(_stream("a.lam@s2", "s1")))
    receive("b.lam", io.BytesIO(_stream("a.lam@s3", "s2")))
    for snap in ("s1", "s2", "s3"):
        assert _contents(f"b.lam@{snap}") == _contents(f"a.lam@{snap}"), snap
    assert _contents("b.lam") == _contents("a.lam@s3")
    assert layers.read_vmstate("b.lam", "s1") == layers.read_vmstate("a.lam", "s1")
    assert [e.text_name for e in layers.list_snapshots("b.lam")] == ["s1", "s2", "s3"]
    assert check_tree("b.lam", OsStorage()).exit_code == 0
    # the replica's layers carry the sender's identities, so a stream from the replica applies to the source's copies
    receive("c.lam", io.BytesIO(_stream("b.lam@s1")))
    receive("c.lam", io.BytesIO(_stream("b.lam@s3", "s1")))
    assert _contents("c.lam@s3") == _contents("a.lam@s3")


def test_a_stream_means_its_base_with_its_ranges_replaced(source):
    """F-SEND-005 as an executable rule: the spec's meaning of each stream equals the snapshot it was made from."""
    base = b""
    for snap, since in (("s1", None), ("s2", "s1"), ("s3", "s2")):
        reader = StreamReader(io.BytesIO(_stream(f"a.lam@{snap}", since)))
        records = list(reader)
        assert stream_contents(reader.begin, records, base) == _contents(f"a.lam@{snap}")
        base = _contents(f"a.lam@{snap}")


def test_an_incremental_stream_holds_about_the_bytes_written(tmp_path, monkeypatch):
    """R13: 1,000 random 4 KiB writes cost the stream their bytes plus 32 bytes a record, not the image."""
    monkeypatch.chdir(tmp_path)
    rng = random.Random(7)
    with Image.create("a.lam", 32 * MiB) as image:
        image.write(0, pattern(1, 32 * MiB))
    layers.create_snapshot("a.lam", "s0")
    blocks = rng.sample(range(32 * MiB // 4096), 1000)
    with Image.open("a.lam") as image:
        for b in blocks:
            image.write(b * 4096, os.urandom(4096))
    layers.create_snapshot("a.lam", "s1")
    stream = _stream("a.lam@s1", "s0")
    written = 1000 * 4096
    assert written <= len(stream) <= 1.1 * written + 4096
    receive("b.lam", io.BytesIO(_stream("a.lam@s0")))
    receive("b.lam", io.BytesIO(stream))
    assert _contents("b.lam@s1") == _contents("a.lam@s1")


def test_a_stream_cut_anywhere_is_refused_and_leaves_the_target_as_it_was(source):
    receive("b.lam", io.BytesIO(_stream("a.lam@s1")))
    before = _files("b.lam")
    stream = _stream("a.lam@s2", "s1")
    cuts = sorted({0, 1, RECORD_HEADER_SIZE - 1, RECORD_HEADER_SIZE, len(stream) - 1}
                  | {end for _, end in _records(stream)[:-1]} | {start + 40 for start, _ in _records(stream)})
    for cut in cuts:
        with pytest.raises(StreamTruncated, match="cut short"):
            receive("b.lam", io.BytesIO(stream[:cut]))
        assert _files("b.lam") == before, cut
    full = _stream("a.lam@s1")
    for cut in (100, len(full) // 2, len(full) - 1):
        with pytest.raises(StreamTruncated):
            receive("new.lam", io.BytesIO(full[:cut]))
        assert not os.path.exists("new.lam")
        assert not os.path.exists("new.lam.layers") or os.listdir("new.lam.layers") == []
    receive("new.lam", io.BytesIO(full))  # an interrupted full receive is no obstacle to the next
    assert _contents("new.lam") == _contents("a.lam@s1")


def test_a_damaged_reordered_or_altered_stream_is_refused(source):
    receive("b.lam", io.BytesIO(_stream("a.lam@s1")))
    before = _files("b.lam")
    stream = _stream("a.lam@s2", "s1")
    records = _records(stream)
    rng = random.Random(3)
    for at in rng.sample(range(len(stream)), 40):  # one flipped bit anywhere (a longer length reads as a cut)
        bad = bytearray(stream)
        bad[at] ^= 1 << rng.randrange(8)
        with pytest.raises((StreamCorrupt, StreamTruncated)):
            receive("b.lam", io.BytesIO(bytes(bad)))
    (a0, a1), (b0, b1) = records[1], records[2]
    swapped = stream[:a0] + stream[b0:b1] + stream[a0:a1] + stream[b1:]
    with pytest.raises(StreamCorrupt, match="lost, repeated or reordered"):
        receive("b.lam", io.BytesIO(swapped))
    dropped = stream[:a0] + stream[a1:]
    with pytest.raises(StreamCorrupt, match="lost, repeated or reordered"):
        receive("b.lam", io.BytesIO(dropped))
    # a DATA payload altered and its CRC recomputed: only the END hash can tell
    data = next((s, e) for s, e in records if struct.unpack_from("<I", stream, s)[0] == KIND_DATA)
    forged = bytearray(stream)
    forged[data[0] + RECORD_HEADER_SIZE] ^= 0xFF
    struct.pack_into("<I", forged, data[0] + 4, 0)
    header = bytes(forged[data[0] : data[0] + RECORD_HEADER_SIZE])
    struct.pack_into("<I", forged, data[0] + 4, crc32c(bytes(forged[data[0] + RECORD_HEADER_SIZE : data[1]]),
                                                        crc32c(header)))
    with pytest.raises(StreamCorrupt, match="SHA-256"):
        receive("b.lam", io.BytesIO(bytes(forged)))
    with pytest.raises(StreamCorrupt, match="follow the END"):
        receive("b.lam", io.BytesIO(stream + b"\0"))
    with pytest.raises(StreamCorrupt, match="not a Lamina send stream"):
        receive("b.lam", io.BytesIO(bytes(RECORD_HEADER_SIZE) + b"x" * 600))
    assert _files("b.lam") == before


def test_a_stream_that_does_not_apply_is_refused_before_anything_is_written(source):
    receive("b.lam", io.BytesIO(_stream("a.lam@s1")))
    with pytest.raises(StreamMismatch, match="holds no snapshot"):
        receive("b.lam", io.BytesIO(_stream("a.lam@s3", "s2")))
    with pytest.raises(StreamMismatch, match="exists; a full stream"):
        receive("b.lam", io.BytesIO(_stream("a.lam@s2")))
    with Image.open("b.lam") as image:
        image.write(0, b"\1" * 512)
    before = _files("b.lam")
    stream = _stream("a.lam@s2", "s1")
    with pytest.raises(StreamMismatch, match="writes made since its last snapshot"):
        receive("b.lam", io.BytesIO(stream))
    assert _files("b.lam") == before
    receive("b.lam", io.BytesIO(stream), force=True)
    assert _contents("b.lam") == _contents("a.lam@s2")
    with pytest.raises(StreamMismatch, match="already holds"):
        receive("b.lam", io.BytesIO(stream))


def test_the_cli_sends_to_a_file_and_receives_from_one_with_one_line_errors(source, capsys):
    assert main(["send", "-o", "s1.st", "a.lam@s1"]) == 0
    assert main(["send", "-o", "s2.st", "-i", "s1", "a.lam@s2"]) == 0
    assert main(["receive", "-i", "s2.st", "b.lam"]) == 1
    assert "holds no snapshot" not in capsys.readouterr().err  # b.lam does not exist: it says so
    assert main(["receive", "-i", "s1.st", "b.lam"]) == 0
    with open("s2.st", "rb") as f:
        cut = f.read()[:-10]
    with open("cut.st", "wb") as f:
        f.write(cut)
    capsys.readouterr()
    assert main(["receive", "-i", "cut.st", "b.lam"]) == 1
    err = capsys.readouterr().err
    assert "cut short" in err and "Traceback" not in err and err.count("\n") == 1
    assert main(["receive", "-i", "s2.st", "b.lam"]) == 0
    assert _contents("b.lam@s2") == _contents("a.lam@s2")
    capsys.readouterr()
    assert main(["send", "-o", "x.st", "a.lam"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lamina: ") and "IMAGE@SNAPSHOT" in err and err.count("\n") == 1
    assert not os.path.exists("x.st")


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def test_a_bit_flip_in_a_frozen_layer_is_detected_and_repaired_from_a_replica(source, capsys):
    """R13: the replica's layer of the same identity restores the cluster; every other byte stays as it was."""
    receive("b.lam", io.BytesIO(_stream("a.lam@s1")))
    receive("b.lam", io.BytesIO(_stream("a.lam@s2", "s1")))
    with layers.open_target("a.lam@s2") as layer:
        path, offset = layer.path, layer.geometry.guest_to_file(4096) + 100  # a sector s2's own layer holds
    before = _files("a.lam")
    _flip(path, offset)
    report = check_tree("a.lam", OsStorage())
    assert report.exit_code == 2 and [f.kind for f in report.corruptions] == ["data-checksum"]
    assert main(["check", "--repair", "--from", "b.lam", "a.lam"]) == 0
    assert "from b.lam" in capsys.readouterr().out
    assert _files("a.lam") == before  # that sector restored, nothing else touched
    assert check_tree("a.lam", OsStorage()).exit_code == 0


def test_repair_from_a_replica_that_cannot_vouch_for_the_bytes_changes_nothing(source, capsys):
    receive("b.lam", io.BytesIO(_stream("a.lam@s1")))
    with layers.open_target("a.lam@s1") as layer:
        path, offset = layer.path, layer.geometry.guest_to_file(0) + 7
    with layers.open_target("b.lam@s1") as layer:
        replica_path = layer.path
    _flip(path, offset)
    _flip(replica_path, offset)  # the replica's copy of that cluster is damaged too
    damaged = _files("a.lam")
    assert main(["check", "--repair", "--from", "b.lam", "a.lam"]) == 2
    assert "do not match the recorded CRC32C either" in capsys.readouterr().out
    with Image.create("other.lam", 8 * MiB) as image:
        image.write(0, b"x" * 4096)
    assert main(["check", "--repair", "--from", "other.lam", "a.lam"]) == 2
    assert "holds no layer of this identity" in capsys.readouterr().out
    assert _files("a.lam") == damaged
    assert main(["check", "--from", "b.lam", "a.lam"]) == 1
    assert "needs --repair" in capsys.readouterr().err


def test_a_crash_at_any_point_of_a_repair_from_a_replica_loses_nothing():
    """Every crash state of the repair, under every persistence model: before anything else runs, `check` finds
    at most the damaged cluster; repairing again leaves the layer file exactly as it was before the fault."""
    from lamina.crashsim.explore import DEFAULT_MODELS, Budget, Materialiser, Model, explore
    from lamina.crashsim.memstore import MemStorage, ReadOnlyStorage, Trace
    from lamina.crashsim.trees import sim_path

    storage = MemStorage()
    top, replica = sim_path("a.lam"), sim_path("b.lam")
    with Image.create(top, 64 * 1024, 4096, storage=storage) as image:
        image.write(0, pattern(1, 12 * 1024))
        image.write(8 * 1024 + 512, pattern(2, 1024))  # a cluster with absent sectors around present ones
    layers.create_snapshot(top, "s1", storage=storage)
    stream = io.BytesIO()
    send(f"{top}@s1", stream, storage=storage)
    receive(replica, io.BytesIO(stream.getvalue()), storage=storage)
    with layers.open_target(f"{top}@s1", storage) as layer:
        path, offset = layer.path, layer.geometry.guest_to_file(0)
    file = storage.open(path, True)
    good = file.pread(0, file.size())
    for at in (offset + 100, offset + 8 * 1024 + 600):  # two damaged clusters, one of them partly present
        file.pwrite(at, bytes([good[at] ^ 0xFF]))
    file.fsync()
    file.close()
    base = storage.state.copy()
    storage.trace = Trace()
    assert all(fix.repaired for fix in repair_data_from(top, replica, storage))
    ops = tuple(storage.trace.ops)
    assert ops  # the repair wrote
    materialise = Materialiser(base, ops)
    states = 0
    for name in DEFAULT_MODELS:
        model = Model.parse(name)
        for _, crash, outcomes, _ in explore(ops, model, Budget(), seed=0):
            state = materialise.state(crash, outcomes, seed=0, unit=model.torn_unit)
            crashed = MemStorage(state)
            report = check_tree(top, ReadOnlyStorage(crashed))
            assert {f.kind for f in report.findings} <= {"data-checksum"}, (name, crash, outcomes)
            assert len(report.findings) <= 2
            assert all(f.repaired for f in repair_data_from(top, replica, crashed))
            assert check_tree(top, crashed).exit_code == 0
            repaired = crashed.open(path, False)
            assert repaired.pread(0, repaired.size()) == good, (name, crash, outcomes)
            states += 1
    assert states > len(ops), states


def test_scrub_reads_every_data_cluster_at_the_rate_asked_and_repairs_from_a_replica(source, capsys):
    import lamina.impl.scrub as scrub_module

    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    counted: list[int] = []
    with pytest.MonkeyPatch.context() as patch:  # a simulated clock: the pacing is judged, not timed
        patch.setattr(scrub_module.time, "monotonic", lambda: clock[0])
        patch.setattr(scrub_module.time, "sleep", sleep)
        report, fixes = scrub_module.scrub("a.lam", rate=1 << 20, progress=counted.append)
    assert report.exit_code == 0 and not fixes
    total = sum(counted)
    assert total >= scrub_module.data_bytes("a.lam", OsStorage())  # every data byte of every layer read
    assert abs(clock[0] - total / (1 << 20)) < 1e-6  # paced to exactly 1 MiB/s of simulated time
    receive("b.lam", io.BytesIO(_stream("a.lam@s1")))
    with layers.open_target("a.lam@s1") as layer:
        path, offset = layer.path, layer.geometry.guest_to_file(0) + 3
    _flip(path, offset)
    assert main(["scrub", "a.lam"]) == 2
    assert "does not match its CRC32C" in capsys.readouterr().out
    assert main(["scrub", "--from", "b.lam", "a.lam"]) == 0
    assert "rewritten from b.lam" in capsys.readouterr().out


def test_an_interrupted_stream_resumes_where_it_stopped(source, capsys):
    """receive --partial keeps the bytes that verified; send --resume-at N sends the rest, even twice over."""
    assert main(["send", "-o", "s1.st", "a.lam@s1"]) == 0
    with open("s1.st", "rb") as f:
        stream = f.read()
    records = _records(stream)
    first_cut, second_cut = records[1][0] + 1000, records[-2][1] - 3  # inside a DATA record, inside the last one
    with open("cut1.st", "wb") as f:
        f.write(stream[:first_cut])
    assert main(["receive", "--partial", "p.st", "-i", "cut1.st", "b.lam"]) == 1
    err = capsys.readouterr().err
    kept = os.path.getsize("p.st")
    assert kept == records[1][0] and f"--resume-at {kept}" in err  # BEGIN verified; the cut record did not
    assert not os.path.exists("b.lam")
    assert main(["send", "-o", "rest1.st", "--resume-at", str(kept), "a.lam@s1"]) == 0
    with open("rest1.st", "rb") as f:
        rest = f.read()
    assert rest == stream[kept:]  # a stream is a function of its snapshots: the rest continues the prefix
    with open("cut2.st", "wb") as f:
        f.write(rest[: second_cut - kept])
    assert main(["receive", "--partial", "p.st", "-i", "cut2.st", "b.lam"]) == 1
    kept = os.path.getsize("p.st")
    assert kept == records[-2][0]
    assert main(["send", "-o", "rest2.st", "--resume-at", str(kept), "a.lam@s1"]) == 0
    assert main(["receive", "--partial", "p.st", "-i", "rest2.st", "b.lam"]) == 0
    assert not os.path.exists("p.st")
    assert _contents("b.lam@s1") == _contents("a.lam@s1")
    assert layers.read_vmstate("b.lam", "s1") == layers.read_vmstate("a.lam", "s1")
    # a damaged record keeps only what verified before it
    assert main(["send", "-o", "s2.st", "-i", "s1", "a.lam@s2"]) == 0
    with open("s2.st", "rb") as f:
        bad = bytearray(f.read())
    at = _records(bytes(bad))[2][0] + 5  # in its CRC
    bad[at] ^= 1
    with open("bad.st", "wb") as f:
        f.write(bad)
    assert main(["receive", "--partial", "q.st", "-i", "bad.st", "b.lam"]) == 1
    assert os.path.getsize("q.st") == _records(bytes(bad))[2][0]
    assert main(["send", "-o", "rest3.st", "--resume-at", str(os.path.getsize("q.st")), "-i", "s1", "a.lam@s2"]) == 0
    assert main(["receive", "--partial", "q.st", "-i", "rest3.st", "b.lam"]) == 0
    assert _contents("b.lam@s2") == _contents("a.lam@s2")
