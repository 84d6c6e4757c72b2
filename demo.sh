#!/usr/bin/env bash
# A short tour of Lamina on a small example: set up, create, write, check,
# damage a metadata copy, watch check find it and repair it.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/lamina ]; then
    python3 -m venv .venv
    .venv/bin/pip install -q -e '.[test]'
fi
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
img="$work/demo.lam"
set -x
lamina create "$img" 1G
lamina io "$img" -c 'write -P 0xab 0 1M' -c 'write -P 0xcd 512M 64k' -c flush -c 'read -P 0xab 0 1M'
lamina info "$img"
du -h --apparent-size "$img"; du -h "$img"
lamina map --metadata "$img"
lamina check "$img"
# damage the first map copy that `lamina map --metadata` lists
offset=$(lamina map --metadata --output json "$img" |
         python3 -c 'import json, sys; print([m for m in json.load(sys.stdin)["metadata"] if m["kind"] == "map"][0]["offset"])')
printf 'garbage' | dd of="$img" bs=1 seek=$((offset + 64)) conv=notrunc status=none
lamina check "$img" || echo "check exit code: $? (3 = one copy damaged, its twin current: degraded, repair recommended)"
lamina check --repair "$img"
lamina io -r "$img" -c 'read -P 0xab 0 1M' -c 'read -P 0xcd 512M 64k'
