"""Counters at their bound: the format stops them at 2^63 - 1, so no increment overflows a u64 field.

Every counter field is found through its declaration (its rule names
`MAX_COUNTER`), set in both root copies with valid CRCs, or in one map copy;
then `check`, a write and `check --repair` run through the CLI's `main`.
Each must end in a verdict or a named one-line error, never an exception.
"""
from __future__ import annotations

import struct

import pytest

from lamina.impl.cli import main
from lamina.impl.image import Image
from lamina.impl.layers import create_snapshot
from lamina.spec.declare import declared_fields
from lamina.spec.errors import CounterExhausted, FieldOutOfRange
from lamina.spec.layout import MAX_COUNTER
from lamina.spec.structures import MAP_CRC_OFFSET, MapCopy, Root, structure_crc

from conftest import pattern
from test_hostile import _rewrite_roots

ROOT_COUNTERS = [name for name, info in declared_fields(Root) if "MAX_COUNTER" in info.constraint]


def _image(path: str) -> str:
    with Image.create(path, 1 << 20, 4096) as image:
        image.write(0, pattern(1, 8192))
    return path


def _run(*args: str) -> int:
    """The CLI in-process: a traceback would surface here as an exception."""
    return main(list(args))


def test_the_counters_are_declared_bounded():
    assert {"generation", "data_generation", "base_data_generation", "next_snapshot_id"} == set(ROOT_COUNTERS)
    assert "MAX_COUNTER" in dict(declared_fields(MapCopy))["generation"].constraint


@pytest.mark.parametrize("name", [n for n in ROOT_COUNTERS if n != "base_data_generation"])
def test_a_root_counter_past_the_bound_is_a_named_format_error(image_path, name, capsys):
    _rewrite_roots(_image(image_path), name, MAX_COUNTER + 1)
    with pytest.raises(FieldOutOfRange, match=name):
        Image.open(image_path, readonly=True)
    assert 1 == _run("check", image_path)  # neither root copy is usable: check cannot complete
    assert 1 == _run("io", image_path, "-c", "write 0 4k")
    assert 1 == _run("check", "--repair", image_path)
    assert name in capsys.readouterr().err


@pytest.mark.parametrize("name", ["generation", "data_generation"])
def test_a_root_counter_at_the_bound_refuses_the_write_by_name(image_path, name, capsys):
    _rewrite_roots(_image(image_path), name, MAX_COUNTER)
    assert 2 == _run("check", image_path)  # valid, but no writer may move it on: no real use gets there
    assert f"the root's {name} is at MAX_COUNTER" in capsys.readouterr().out
    assert 1 == _run("io", image_path, "-c", "write -P 7 0 4k")
    err = capsys.readouterr().err
    assert name in err and "2^63 - 1" in err and 1 == len(err.strip().splitlines())
    assert 2 == _run("check", "--repair", image_path)  # nothing to repair it from: said, not hidden
    with Image.open(image_path, readonly=True) as image:
        assert pattern(1, 8192) == image.read(0, 8192)  # nothing was written past the refusal


def test_next_snapshot_id_at_the_bound_refuses_a_snapshot(image_path):
    _rewrite_roots(_image(image_path), "next_snapshot_id", MAX_COUNTER)
    with pytest.raises(CounterExhausted, match="next_snapshot_id"):
        create_snapshot(image_path, "s")
    assert 2 == _run("check", image_path)
    with Image.open(image_path) as image:
        assert () == image.root.snapshots


def _set_map_generation(path: str, slot: int, value: int) -> None:
    with Image.open(path, readonly=True) as image:
        offset, used = image.geometry.map_copy_offset(0, slot), image.geometry.map_used_length
    with open(path, "r+b") as f:
        f.seek(offset)
        raw = bytearray(f.read(used))
        struct.pack_into("<Q", raw, dict(declared_fields(MapCopy))["generation"].offset, value)
        struct.pack_into("<I", raw, MAP_CRC_OFFSET, structure_crc(raw, MAP_CRC_OFFSET))
        f.seek(offset)
        f.write(raw)


def test_a_map_generation_past_the_bound_is_a_bad_copy_that_repair_mends(image_path):
    _set_map_generation(_image(image_path), 0, (1 << 64) - 1)
    assert 3 == _run("check", image_path)  # one bad copy beside a current twin: degraded
    assert 0 == _run("check", "--repair", image_path)
    assert 0 == _run("io", image_path, "-c", "write -P 9 0 4k", "-c", "read -P 9 0 4k")
    assert 0 == _run("check", image_path)


def test_a_map_generation_at_the_bound_refuses_the_commit_by_name(image_path, capsys):
    _image(image_path)
    _set_map_generation(image_path, 0, MAX_COUNTER)
    _set_map_generation(image_path, 1, MAX_COUNTER)
    assert 2 == _run("check", image_path)
    assert "region 0's map generation is at MAX_COUNTER" in capsys.readouterr().out
    assert 1 == _run("io", image_path, "-c", "write -P 9 0 4k")
    assert "map generation of region 0" in capsys.readouterr().err
    assert 2 == _run("check", image_path)  # still exhausted; the unflushed bytes stay listed in the intents
    with Image.open(image_path, readonly=True) as image:
        assert image.read(0, 4096) in (pattern(1, 4096), b"\x09" * 4096)  # an unflushed write: old or new
        assert pattern(1, 8192)[4096:] == image.read(4096, 4096)
