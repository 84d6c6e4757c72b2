"""Delta-friendliness (R6): bytes of image files changed by small guest writes right after a snapshot.

Both formats start from the same disk, written in full, take a snapshot
(qcow2: an internal snapshot with `qemu-img snapshot -c`; Lamina:
`snapshot create`), then take the same 1,000 random 4 KiB writes. The bytes
of every image file are compared before and after; the ratio is bytes
changed over bytes written. rsync and ZFS pay for what changed.

    python bench/bench_delta.py [--size 256M] [--writes 1000] [--cluster-size 64k] [--output json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

from lamina.impl import layers
from lamina.impl.image import Image
from lamina.impl.sizes import parse_size

BLOCK = 4096


def read_files(paths: list[str]) -> dict[str, bytes]:
    out = {}
    for path in paths:
        with open(path, "rb") as f:
            out[path] = f.read()
    return out


def bytes_changed(before: dict[str, bytes], after: dict[str, bytes]) -> int:
    """Bytes that differ, file by file; a file that appeared counts its non-zero bytes."""
    changed = 0
    for path in set(before) | set(after):
        a, b = before.get(path, b""), after.get(path, b"")
        n = max(len(a), len(b))
        a, b = a.ljust(n, b"\0"), b.ljust(n, b"\0")
        for pos in range(0, n, BLOCK):
            x, y = a[pos : pos + BLOCK], b[pos : pos + BLOCK]
            if x != y:
                changed += sum(p != q for p, q in zip(x, y))
    return changed


def lamina_files(path: str) -> list[str]:
    """The image's files, each once: the top's twin (F-TREE-003) is the top itself, not a second file."""
    directory = path + ".layers"
    extra = [os.path.join(directory, n) for n in os.listdir(directory)] if os.path.isdir(directory) else []
    return [path] + [p for p in extra if not os.path.samefile(p, path)]


FILL = 0x5A
CHUNK = 1 << 20


def run_lamina(work: str, size: int, cluster: int, writes: list[tuple[int, int]]) -> dict:
    path = os.path.join(work, "disk.lam")
    with Image.create(path, size, cluster) as image:
        for offset in range(0, size, CHUNK):
            image.write(offset, bytes([FILL]) * min(CHUNK, size - offset))
    layers.create_snapshot(path, "before")
    before = read_files(lamina_files(path))
    with Image.open(path) as image:
        for offset, seed in writes:
            image.write(offset, bytes([seed]) * BLOCK)
    after = read_files(lamina_files(path))
    return {"changed": bytes_changed(before, after), "files": len(after)}


def run_qcow2(work: str, size: int, cluster: int, writes: list[tuple[int, int]]) -> dict | None:
    if shutil.which("qemu-img") is None or shutil.which("qemu-io") is None:
        return None
    path = os.path.join(work, "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", path, str(size)], check=True)

    def io(ops: list[tuple[int, int]]) -> None:
        commands = [x for offset, seed in ops for x in ("-c", f"write -P {seed} {offset} {BLOCK}")]
        subprocess.run(["qemu-io", "-f", "qcow2", path, *commands, "-c", "flush"], check=True, capture_output=True)

    subprocess.run(["qemu-io", "-f", "qcow2", path, "-c", f"write -P {FILL} 0 {size}"], check=True, capture_output=True)
    subprocess.run(["qemu-img", "snapshot", "-c", "before", path], check=True)
    before = read_files([path])
    io(writes)
    after = read_files([path])
    return {"changed": bytes_changed(before, after), "files": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256M")
    parser.add_argument("--writes", type=int, default=1000)
    parser.add_argument("--cluster-size", default="64k")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", choices=("human", "json"), default="human")
    args = parser.parse_args(argv)
    size, cluster = parse_size(args.size), parse_size(args.cluster_size)
    rng = random.Random(args.seed)
    writes = [(rng.randrange(size // BLOCK) * BLOCK, rng.choice([b for b in range(1, 256) if b != FILL]))
              for _ in range(args.writes)]
    written = BLOCK * len(writes)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        results["lamina"] = run_lamina(work, size, cluster, writes)
        qcow2 = run_qcow2(work, size, cluster, writes)
        if qcow2:
            results["qcow2"] = qcow2
    for result in results.values():
        result["ratio"] = result["changed"] / written
    report = {"written": written, "cluster_size": cluster, "virtual_size": size, "results": results}
    if args.output == "json":
        print(json.dumps(report, indent=4))
    else:
        print(f"{args.writes} random 4 KiB writes ({written} bytes) right after a snapshot, {cluster // 1024} KiB clusters:")
        for name, result in results.items():
            print(f"  {name:<7} {result['changed']:>10} bytes changed  ratio {result['ratio']:.2f}x")
        if "qcow2" in results:
            print(f"  qcow2 / lamina: {results['qcow2']['ratio'] / results['lamina']['ratio']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
