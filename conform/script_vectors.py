"""The `scripts` category: operation scripts for writers, with the contents the spec's model says they leave.

The expected views come from `script.model_result` (the spec's model of a
disk); generation also applies each script with the reference and requires
the same views and a clean check, so model and reference are held together.
"""
from __future__ import annotations

import contextlib
import tempfile

from .build import new_vector, reference_check, reference_view
from .errors import GenerationError
from .script import apply_script, model_result, parse_script
from .views import disk_view

SCRIPTS = {
    "write-flush": ("writes, a flush, more writes left to the close",
                    "create 1M 64k\nwrite 0 64k 0xab\nwrite 100000 5000 0x01\nflush\nwrite 65536 4k 0xcd\n"),
    "unaligned": ("writes at byte offsets and lengths that are no multiple of a sector, 4 KiB clusters",
                  "create 300k 4k\nwrite 1 1 0x11\nwrite 700 1000 0x22\nwrite 4095 2 0x33\nflush\n"
                  "write 307000 200 0x44   # ends at the virtual size\n"),
    "zero-discard": ("zeroed and discarded ranges over written data, with unaligned edges",
                     "create 2M 8k\nwrite 0 1M 0x5a\nflush\nzero 1000 9000\ndiscard 64k 64k\ndiscard 524288 513\n"
                     "zero 1048000 576\nwrite 70000 10 0x77\n"),
    "resize": ("grow, write past the old end, shrink below it, grow again: the dropped bytes read zero",
               "create 1M 16k\nwrite 1000k 24k 0x61\nresize 2M\nwrite 1536k 4k 0x62\nflush\nresize 1012k\n"
               "resize 3M\nwrite 2M 512 0x63\n"),
    "snapshots": ("snapshots between writes and a resize: each keeps the disk as it was",
                  "create 1M 4k\nwrite 0 8k 0x01\nsnapshot first\nwrite 4k 8k 0x02\nresize 512k\nsnapshot second\n"
                  "resize 1M\nwrite 600k 4k 0x03\n"),
    "multi-region": ("writes across region boundaries with 4 KiB clusters (512 KiB regions)",
                     "create 3M 4k\nwrite 520192 8192 0x10\nwrite 1572864 4096 0x20\nflush\nwrite 1048064 1024 0x30\n"),
    "large-clusters": ("2 MiB clusters, a guest size that is no multiple of them, a write into the last partial "
                       "cluster", "create 5000k 2M\nwrite 0 3M 0x42\nwrite 4999k 1k 0x43\ndiscard 1M 512k\n"),
    "suffixes": ("sizes written with every suffix and in plain decimal bytes",
                 "# a comment line\ncreate 1G 64k\nwrite 1023M 1M 0xff\nwrite 0 1k 0x01  # trailing comment\n"
                 "write 536870912 512 0x02\nflush\n"),
}


RULES = {"resize": ["F-MEAN-002", "F-LAYOUT-002"], "snapshots": ["F-MEAN-002", "F-SNAP-004", "F-ROOT-006"],
         "multi-region": ["F-MEAN-002", "F-LAYOUT-001"], "large-clusters": ["F-MEAN-002", "F-LAYOUT-001"]}


def generate(root: str) -> None:
    for name, (description, text) in SCRIPTS.items():
        commands = parse_script(text, name)
        result = model_result(commands)
        views = [disk_view("disk.lam", result.disk)] + [disk_view(f"disk.lam@{snap}", d) for snap, d in result.snapshots]
        with new_vector(root, "scripts", name, description, ["apply", "dump", "check"],
                        RULES.get(name, ["F-MEAN-002"])) as v:
            with open("ops.script", "w", encoding="utf-8") as fh:
                fh.write(text)
            v.expect.update({"script": "ops.script", "image": "disk.lam", "check": {"exit": 0, "kinds": []},
                             "views": views})
            with tempfile.TemporaryDirectory(prefix="lamina-conform-") as scratch, contextlib.chdir(scratch):
                apply_script("disk.lam", commands)
                got = [reference_view(view["name"]) for view in views]
                verdict = reference_check("disk.lam")
            if got != views or verdict != {"exit": 0, "kinds": []}:
                raise GenerationError(f"scripts/{name}: the reference's result differs from the spec's model "
                                      f"(check {verdict})")

