"""How a setting is declared and how its JSON value is checked: the value kinds.

A setting is a dataclass field made by `setting()`: its kind (Integer, Choice, AddressKind, ...),
its default as a user would write it in JSON, and its doc. A kind parses one JSON value into what
the master uses (raising a one-line ConfigError naming the key) and describes itself as JSON
Schema, so the loader, the error messages and gows.schema.json all come from one declaration
(gunicorn's config.py is the model).
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from ..addresses import Address

REQUIRED = object()  # the default of a setting a user must give
STDOUT = "-"  # a log target meaning the master's standard output


class ConfigError(Exception):
    """A user mistake in the config file: one line naming the key and the problem."""


def got(value: Any) -> str:
    """A value as a message quotes it (JSON)."""
    return json.dumps(value)


class Kind:
    """How a setting's JSON value is checked and converted."""

    expect = "a value"

    def parse(self, value: Any, key: str, base: Path) -> Any:
        raise ConfigError(f"{key}: must be {self.expect}, got {got(value)}")

    def schema(self) -> dict:
        return {}

    def fail(self, value: Any, key: str) -> ConfigError:
        return ConfigError(f"{key}: must be {self.expect}, got {got(value)}")


class Integer(Kind):
    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum, self.maximum = minimum, maximum
        self.expect = f"an integer from {minimum} to {maximum}"

    def parse(self, value, key, base):
        if isinstance(value, bool) or not isinstance(value, int) or not self.minimum <= value <= self.maximum:
            raise self.fail(value, key)
        return value

    def schema(self):
        return {"type": "integer", "minimum": self.minimum, "maximum": self.maximum}


class Number(Kind):
    """A finite number of seconds or similar; `positive` excludes 0."""

    def __init__(self, maximum: float, positive: bool = True) -> None:
        self.maximum, self.positive = maximum, positive
        self.expect = f"a number {'>' if positive else '>='} 0 and <= {maximum:g}"

    def parse(self, value, key, base):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(value, key)
        if (value <= 0 if self.positive else value < 0) or value > self.maximum:
            raise self.fail(value, key)
        return float(value)

    def schema(self):
        bound = {"exclusiveMinimum": 0} if self.positive else {"minimum": 0}
        return {"type": "number", **bound, "maximum": self.maximum}


class Boolean(Kind):
    expect = "true or false"

    def parse(self, value, key, base):
        if not isinstance(value, bool):
            raise self.fail(value, key)
        return value

    def schema(self):
        return {"type": "boolean"}


class Choice(Kind):
    def __init__(self, *choices: str) -> None:
        self.choices = choices
        self.expect = "one of " + ", ".join(json.dumps(c) for c in choices)

    def parse(self, value, key, base):
        if value not in self.choices or not isinstance(value, str):
            raise self.fail(value, key)
        return value

    def schema(self):
        return {"type": "string", "enum": list(self.choices)}


class UrlPath(Kind):
    # Sent as it is: a query, a fragment or an escape would never equal the path a worker reads.
    expect = 'an absolute URL path such as "/healthcheck" (visible ASCII, no "?", "#" or "%")'
    _pattern = r'^/[!"$&->@-~]{0,1023}$'

    def parse(self, value, key, base):
        if not isinstance(value, str) or not re.fullmatch(self._pattern, value):
            raise self.fail(value, key)
        return value

    def schema(self):
        return {"type": "string", "pattern": self._pattern}


_HOSTNAME = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return len(host) <= 253 and re.fullmatch(_HOSTNAME, host) is not None


class Host(Kind):
    expect = "a host name or IP address"

    def parse(self, value, key, base):
        if not isinstance(value, str) or not _valid_host(value):
            raise self.fail(value, key)
        return value

    def schema(self):
        return {"type": "string", "minLength": 1}


class AddressKind(Kind):
    expect = 'a "host:port" address such as "127.0.0.1:8080" or "[::1]:8080"'

    def parse(self, value, key, base):
        if not isinstance(value, str):
            raise self.fail(value, key)
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})|([^:\[\]]+):([0-9]{1,5})", value)
        if not m:
            raise self.fail(value, key)
        host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{key}: host must be an IP address or localhost, got {got(value)}") from None
        if m.group(1) and ip.version != 6 or not 1 <= int(port) <= 65535:
            raise self.fail(value, key)
        return Address(host, int(port))

    def schema(self):
        port = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
        return {"type": "string", "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):" + port + "$"}


class Nullable(Kind):
    def __init__(self, inner: Kind) -> None:
        self.inner = inner
        self.expect = f"null or {inner.expect}"

    def parse(self, value, key, base):
        if value is None:
            return None
        try:
            return self.inner.parse(value, key, base)
        except ConfigError as e:
            raise ConfigError(str(e).replace(f"must be {self.inner.expect}", f"must be {self.expect}", 1)) from None

    def schema(self):
        inner = self.inner.schema()
        return {"anyOf": [inner, {"type": "null"}]} if inner else {}


class WorkerList(Kind):
    expect = 'a non-empty list of {"host": ..., "port": ...} objects'
    _item = {"host": Host(), "port": Integer(1, 65535)}
    # Optional per upstream (HAProxy's server line: weight, slowstart; and spawn): what to use when
    # absent, and what it means (the schema's descriptions).
    _optional = {
        "weight": (Integer(1, 1000), 1, "Share of the requests relative to the other workers' weights, whatever proxy.balance is (under first: of the requests in flight it takes before it is passed over)."),
        "slowStart": (Number(3600, positive=False), 0, "Seconds over which a worker coming back (down to up, or out of an ejection) ramps from a small share to its weight; 0 takes it back at full weight at once. Not applied to the workers of a master that has just started."),
        "spawn": (Boolean(), True, "false: never started here, even when its address is local (another gows, a worker systemd runs); only checked and balanced."),
    }

    def parse(self, value, key, base):
        if not isinstance(value, list) or not 1 <= len(value) <= 1024:
            raise self.fail(value, key)
        out = []
        for i, item in enumerate(value):
            where = f"{key}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f'{where}: must be an object like {{"host": "127.0.0.1", "port": 9001}}, got {got(item)}')
            _reject_unknown(item, [*self._item, *self._optional], where + ".")
            for name in self._item:
                if name not in item:
                    raise ConfigError(f"{where}.{name}: required")
            weight, slow_start, spawn = (kind.parse(item.get(name, default), f"{where}.{name}", base)
                                         for name, (kind, default, _) in self._optional.items())
            out.append((self._item["host"].parse(item["host"], f"{where}.host", base),
                        self._item["port"].parse(item["port"], f"{where}.port", base), f"{where}.port",
                        weight, slow_start, spawn))
        return tuple(out)

    def schema(self):
        props = {name: kind.schema() for name, kind in self._item.items()}
        required = list(props)
        for name, (kind, default, doc) in self._optional.items():
            props[name] = {**kind.schema(), "description": doc, "default": default}
        return {"type": "array", "minItems": 1, "maxItems": 1024,
                "items": {"type": "object", "properties": props, "required": required, "additionalProperties": False}}


class Section(Kind):
    """A nested object of settings, declared by its own dataclass."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.expect = "an object"

    def parse(self, value, key, base):
        if not isinstance(value, dict):
            raise self.fail(value, key)
        return parse_object(self.cls, value, key + ".", base)

    def schema(self):
        return object_schema(self.cls)


@dataclass(frozen=True)
class Setting:
    """One declared setting: how its value is checked, its default and its doc."""

    kind: Kind
    default: Any  # the JSON value (as a user would write it), or REQUIRED / None
    doc: str
    key: str = ""  # JSON key; derived from the field name (snake_case -> camelCase) when empty


def setting(kind: Kind, default: Any, doc: str, key: str = "") -> Any:
    """Declare one setting: its validator, default (as JSON) and doc."""
    return field(metadata={"setting": Setting(kind, default, doc, key)})


def section(cls: type, doc: str) -> Any:
    """Declare a nested object of settings."""
    return field(metadata={"setting": Setting(Section(cls), {}, doc)})


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def declared(cls: type) -> Iterable[tuple[str, dataclasses.Field, Setting]]:
    """(json key, field, setting) for every setting of a config dataclass."""
    for f in fields(cls):
        s = f.metadata.get("setting")
        if s is not None:
            yield (s.key or _camel(f.name)), f, s


def _reject_unknown(raw: dict, known: Iterable[str], prefix: str) -> None:
    known = list(known)
    for key in raw:
        if key not in known and not (prefix == "" and key == "$schema"):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")


def parse_object(cls: type, raw: dict, prefix: str, base: Path) -> Any:
    """An instance of the settings dataclass `cls` from its JSON object: declared defaults for
    the keys not given, ConfigError for an unknown key or a bad value."""
    entries = list(declared(cls))
    _reject_unknown(raw, [key for key, _, _ in entries], prefix)
    values = {}
    for key, f, s in entries:
        if key in raw:
            values[f.name] = s.kind.parse(raw[key], prefix + key, base)
        elif s.default is REQUIRED:
            raise ConfigError(f"{prefix}{key}: required")
        elif s.default is None:
            values[f.name] = None
        else:
            values[f.name] = s.kind.parse(s.default, prefix + key, base)
    return cls(**values)


def object_schema(cls: type) -> dict:
    """The JSON Schema of a settings dataclass: its keys, their kinds, docs and defaults."""
    props, required = {}, []
    for key, _, s in declared(cls):
        prop = dict(s.kind.schema())
        prop["description"] = s.doc
        if s.default is REQUIRED:
            required.append(key)
        elif not isinstance(s.kind, Section):
            prop["default"] = s.default
        props[key] = prop
    out = {"type": "object", "description": (cls.__doc__ or "").strip(), "properties": props,
           "additionalProperties": False}
    if required:
        out["required"] = required
    return out
