"""The versioned JSON Schemas (draft 2020-12) of every `--output json` of the `lamina` command.

A schema's name is `lamina.WHAT/VERSION`; `lamina schema NAME` prints it.
The version rises when a key is removed or changes meaning; a schema is
closed (`additionalProperties: false`), so adding a key is a new version as
well, and the tests (tests/test_schemas.py) fail until this module says so.
README.md, "JSON output", lists which command emits which schema.
"""
from __future__ import annotations

DIALECT = "https://json-schema.org/draft/2020-12/schema"
INT = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
BOOL = {"type": "boolean"}


def _object(required: dict, optional: dict | None = None, **extra: object) -> dict:
    return {"type": "object", "required": sorted(required), "properties": {**required, **(optional or {})},
            "additionalProperties": False, **extra}


def _schema(name: str, title: str, body: dict, defs: dict | None = None) -> dict:
    return {"$schema": DIALECT, "$id": name, "title": title, **body, **({"$defs": defs} if defs else {})}


_FINDING = _object({"severity": {"enum": ["corruption", "degraded", "leak", "pending"]}, "kind": STR, "message": STR,
                    "repairable": BOOL}, {"guest_offset": INT, "guest_length": INT})
_CHECK = _object({"completed": BOOL, "corruptions": INT, "leaks": INT, "degraded": INT, "pending_recovery": INT,
                  "regions_checked": INT, "clusters_checked": INT, "exit_code": {"enum": [0, 1, 2, 3]},
                  "findings": {"type": "array", "items": _FINDING}})
_DATA_REPAIR = _object({"file": STR, "guest_offset": INT, "guest_length": INT, "repaired": BOOL}, {"reason": STR})
_EXTENT = _object({"start": INT, "length": INT, "depth": INT, "present": BOOL, "zero": BOOL, "data": BOOL},
                  {"offset": INT, "filename": STR})  # filename: the shared store, where a cluster's bytes live there
_METADATA = _object({"offset": INT, "length": INT, "kind": {"enum": ["root", "map"]}, "copy": {"enum": ["A", "B"]}},
                    {"region": INT})
_NODE = _object({"kind": {"enum": ["base", "layer", "snapshot", "current"]}, "name": STR,
                 "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                {"format": {"enum": ["raw", "lamina"]}, "id": INT, "created": INT, "vm_clock_ns": INT, "disk_size": INT,
                 "vmstate_size": INT, "disk_usage": INT, "file": STR, "shared_bytes": INT,
                 "exclusive_bytes": INT})

SCHEMAS: dict[str, dict] = {
    "lamina.info/2": _schema("lamina.info/2", "lamina info --output json", _object({
        "filename": STR, "format": {"const": "lamina"}, "virtual-size": INT, "actual-size": INT, "cluster-size": INT,
        "dirty-flag": BOOL,
        "format-specific": _object({"type": {"const": "lamina"}, "data": _object(
            {"version": INT, "uuid": {"type": "string", "pattern": "^[0-9a-f]{32}$"}, "generation": INT,
             "pending-intents": INT, "regions": INT, "incompatible-features": INT, "snapshots": INT,
             "compatible-features": INT, "shared-bytes": INT, "exclusive-bytes": INT},
            {"backing-filename": STR, "backing-format": {"enum": ["raw", "lamina"]}})})})),
    "lamina.tree/2": _schema("lamina.tree/2", "lamina info --tree --output json",
                             _object({"image": STR, "layers": {"type": "array", "items": {"$ref": "#/$defs/node"}}}),
                             {"node": _NODE}),
    "lamina.check/1": _schema("lamina.check/1", "lamina check --output json", _CHECK),
    "lamina.check-repair/1": _schema("lamina.check-repair/1", "lamina check --repair --output json",
                                     _object({"before": _CHECK, "after": _CHECK, "repaired": {"type": "integer"}},
                                             {"data-repairs": {"type": "array", "items": _DATA_REPAIR}})),
    "lamina.scrub/1": _schema("lamina.scrub/1", "lamina scrub --output json", _object(
        _CHECK["properties"], {"data-repairs": {"type": "array", "items": _DATA_REPAIR}})),
    "lamina.map/2": _schema("lamina.map/2", "lamina map --output json", {"type": "array", "items": _EXTENT}),
    "lamina.map-metadata/2": _schema("lamina.map-metadata/2", "lamina map --metadata --output json", _object(
        {"extents": {"type": "array", "items": _EXTENT}, "metadata": {"type": "array", "items": _METADATA}})),
    "lamina.snapshot-list/1": _schema("lamina.snapshot-list/1", "lamina snapshot list --output json", {
        "type": "array", "items": _object({"id": INT, "name": STR, "date-ns": INT, "vm-clock-nsec": INT,
                                           "vm-state-size": INT, "disk-size": INT})}),
    "lamina.compare/1": _schema("lamina.compare/1", "lamina compare --output json", _object(
        {"identical": BOOL, "size-a": INT, "size-b": INT, "reason": {"enum": [None, "content", "size", "allocation"]},
         "offset": {"oneOf": [INT, {"type": "null"}]}})),
    "lamina.diff/1": _schema("lamina.diff/1", "lamina diff --output json",
                             {"type": "array", "items": _object({"start": INT, "length": {"type": "integer", "minimum": 1}})}),
    "lamina.dedup/1": _schema("lamina.dedup/1", "lamina dedup --output json", _object(
        {"dry_run": BOOL, "layers": INT, "layers_skipped": INT, "clusters_scanned": INT, "bytes_scanned": INT,
         "duplicates": INT, "store_clusters_added": INT, "bytes_saved": {"type": "integer"}, "checksum_failures": INT,
         "collected": INT, "seconds": {"type": "number", "minimum": 0}})),
}

#: Which schema each command's JSON follows (the README's table).
COMMANDS = {
    "info": "lamina.info/2", "info --tree": "lamina.tree/2", "check": "lamina.check/1",
    "check --repair": "lamina.check-repair/1", "scrub": "lamina.scrub/1", "map": "lamina.map/2", "map --metadata": "lamina.map-metadata/2",
    "snapshot list": "lamina.snapshot-list/1", "compare": "lamina.compare/1", "diff": "lamina.diff/1",
    "dedup": "lamina.dedup/1",
}
