"""Units in the types: a guest offset cannot be passed where a file offset belongs.

These are `typing.NewType`s: free at run time, checked by a type checker, and
they name the role of every integer in signatures.
"""
from typing import NewType

GuestOffset = NewType("GuestOffset", int)
"""Byte offset in the virtual disk as the guest sees it."""

FileOffset = NewType("FileOffset", int)
"""Byte offset in the image file on the host."""

SectorIndex = NewType("SectorIndex", int)
"""Index of a 512-byte guest sector."""

ClusterIndex = NewType("ClusterIndex", int)
"""Index of a guest cluster (the unit of data checksums)."""

RegionIndex = NewType("RegionIndex", int)
"""Index of a region: one map (two copies) plus the data clusters it describes."""

Generation = NewType("Generation", int)
"""Monotonic version counter carried by every copy of a replicated structure."""

Slot = NewType("Slot", int)
"""Which copy of a replicated structure: 0 (copy A) or 1 (copy B)."""
