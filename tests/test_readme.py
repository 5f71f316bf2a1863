"""The README's configuration table documents exactly the keys of the shipped JSON Schema."""
import json
import re

import pytest

from support import REPO

pytestmark = pytest.mark.unit


def schema_keys(props: dict, prefix: str = "") -> dict[str, dict]:
    keys: dict[str, dict] = {}
    for name, spec in props.items():
        if name == "$schema":
            continue
        keys[prefix + name] = spec
        if "properties" in spec:
            keys.update(schema_keys(spec["properties"], prefix + name + "."))
    return keys


def readme_rows() -> dict[str, tuple[str, str]]:
    """key -> (default cell, meaning cell) of the README's configuration table."""
    text = (REPO / "README.md").read_text()
    table = text.split("<!-- config-table", 1)[1].split("<!-- /config-table -->", 1)[0]
    return {m.group(1): (m.group(2).strip(), m.group(3).strip())
            for m in re.finditer(r"^\| `([\w.]+)` \|([^|]*)\|(.*)\|$", table, re.M)}


def test_readme_config_table_matches_the_schema():
    schema = json.loads((REPO / "arbiter" / "gows.schema.json").read_text())
    documented = readme_rows()
    in_schema = schema_keys(schema["properties"])
    assert set(documented) == set(in_schema)
    for key, spec in in_schema.items():
        default, meaning = documented[key]
        assert meaning == spec["description"], key
        if default and default != "required":
            assert json.loads(default.strip("`")) == spec["default"], key
