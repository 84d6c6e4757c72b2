"""Every `--output json` validates against its versioned schema (impl/schemas.py), and a broken output does not."""
from __future__ import annotations

import copy
import json

import jsonschema
import pytest

from lamina.impl.cli import main
from lamina.impl.schemas import COMMANDS, SCHEMAS

MiB = 1 << 20


@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("b.raw", "wb") as f:
        f.truncate(4 * MiB)
    assert 0 == main(["create", "-b", "b.raw", "-F", "raw", "d.lam"])
    assert 0 == main(["io", "d.lam", "-c", "write -P 1 0 1M"])
    assert 0 == main(["snapshot", "create", "--vm-clock", "5000000000", "d.lam", "s1"])
    assert 0 == main(["io", "d.lam", "-c", "write -P 2 512k 64k", "-c", "write -z 3M 4k"])
    return tmp_path


RUNS = {
    "info": (["info", "d.lam"], 0),
    "info --tree": (["info", "--tree", "d.lam"], 0),
    "check": (["check", "d.lam"], 0),
    "check --repair": (["check", "--repair", "d.lam"], 0),
    "scrub": (["scrub", "d.lam"], 0),
    "map": (["map", "d.lam"], 0),
    "map --metadata": (["map", "--metadata", "d.lam"], 0),
    "snapshot list": (["snapshot", "list", "d.lam"], 0),
    "compare": (["compare", "d.lam@s1", "d.lam"], 1),
    "diff": (["diff", "d.lam@s1", "d.lam"], 0),
    "dedup": (["dedup", "--dry-run", "d.lam"], 0),
}


def test_every_schema_is_valid_and_every_command_has_one():
    assert set(RUNS) == set(COMMANDS) and set(COMMANDS.values()) == set(SCHEMAS)
    for name, schema in SCHEMAS.items():
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["$id"] == name


@pytest.mark.parametrize("command", list(RUNS))
def test_each_commands_json_validates_against_its_schema(images, capsys, command):
    argv, code = RUNS[command]
    capsys.readouterr()
    assert code == main([*argv, "--output", "json"])
    out = json.loads(capsys.readouterr().out)
    schema = SCHEMAS[COMMANDS[command]]
    jsonschema.validate(out, schema, cls=jsonschema.Draft202012Validator)
    broken = copy.deepcopy(out)
    target = broken[0] if isinstance(broken, list) else broken
    target["unknown-key"] = 1  # a key the schema does not name: a new version of the schema is due
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)


def test_lamina_schema_prints_each_schema(capsys):
    assert 0 == main(["schema"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in SCHEMAS)
    assert 0 == main(["schema", "lamina.compare/1"])
    assert json.loads(capsys.readouterr().out) == SCHEMAS["lamina.compare/1"]
    assert 1 == main(["schema", "lamina.nothing/9"])
