"""Shared fixtures: images are made in a per-test temporary directory."""
from __future__ import annotations

import os

import pytest

from lamina.impl.osfile import OsStorage


@pytest.fixture
def image_path(tmp_path) -> str:
    return os.path.join(tmp_path, "disk.lam")


def open_file(path: str, writable: bool = False):
    """The image file through the storage interface, as the spec's check reads it."""
    return OsStorage().open(path, writable)


def pattern(seed: int, length: int) -> bytes:
    """Self-describing bytes: cheap to make from a seed, different for every seed and offset."""
    block = bytes((seed * 31 + i * 7 + 1) & 0xFF for i in range(256))
    return (block * (length // 256 + 1))[:length]
