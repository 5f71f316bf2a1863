"""The JSON Schema of gows.conf.json (arbiter/gows.schema.json), derived from the declarations.

Editors use the published file; tests keep it equal to json_schema(). After changing a setting,
regenerate it with `python -m arbiter.config.schema`.
"""
from __future__ import annotations

import json
from pathlib import Path

from .kinds import object_schema
from .settings import Config

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "gows.schema.json"


def json_schema() -> dict:
    """The JSON Schema of gows.conf.json, derived from the declarations in settings.py."""
    schema = object_schema(Config)
    schema["properties"] = {"$schema": {"type": "string", "description": "Editors' schema reference; ignored."},
                            **schema["properties"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "gows.conf.json",
        **schema,
        "description": "Configuration of the gows master and its workers.",
        "allOf": [
            {"not": {"required": ["listen", "masterPort"]}},
            {"oneOf": [{"required": ["workers"]}, {"required": ["workerCount"]}]},
            {"if": {"required": ["workers"]},
             "then": {"not": {"anyOf": [{"required": ["workerBasePort"]}, {"required": ["workerHost"]}]}}},
        ],
    }


def write_schema(path: Path = SCHEMA_PATH) -> None:
    """Regenerate gows.schema.json from the declarations."""
    path.write_text(json.dumps(json_schema(), indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_schema()
    print(f"wrote {SCHEMA_PATH}")
