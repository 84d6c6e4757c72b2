#!/usr/bin/env python3
"""The floor of `lamina check`: read every data extent of a file once, and nothing else.

Walks the file with SEEK_DATA/SEEK_HOLE and reads each data extent with
`preadv` into one reused 8 MiB buffer (no checksum, no parsing), then prints
the bytes read.  `bench_tools.py` times it as a whole process beside
`lamina check` of the same layer file.

    python bench/read_extents.py FILE
"""
import os
import sys

CHUNK = 8 << 20


def read_extents(path: str) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = memoryview(bytearray(CHUNK))
        pos = total = 0
        while True:
            try:
                pos = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data at or after pos
                break
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            while pos < hole:
                n = os.preadv(fd, [buf[: min(CHUNK, hole - pos)]], pos)
                if n <= 0:
                    break
                total += n
                pos += n
            pos = max(pos, hole)
        return total
    finally:
        os.close(fd)


if __name__ == "__main__":
    print(read_extents(sys.argv[1]))
