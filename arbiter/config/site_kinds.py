"""The kinds of the site settings (fallback, errorPages, headers): fileapp checks them, so the
master refuses at config time (one line naming the key, exit 2) exactly what a worker would."""
from __future__ import annotations

from fileapp.headers import REFUSED, REFUSED_PREFIXES, HeaderRules
from fileapp.site import check_error_pages, site_path

from .kinds import ConfigError, Kind

# What the loaders accept, as far as JSON Schema can say it (for editors): segments not hidden.
_SITE_PATH = r"^/?([^./\\\x00][^/\\\x00]*/+)*[^./\\\x00][^/\\\x00]*$"
_VALUE = r"^[!-~]([ -~]*[!-~])?$"


def _any_case(name: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in name)


_REFUSED_NAME = ("^(" + "|".join(_any_case(n) for n in sorted(REFUSED)) + "|("
                 + "|".join(_any_case(p) for p in REFUSED_PREFIXES) + ").*)$")


class SitePath(Kind):
    """A file under the document root, named relative to it ("index.html")."""

    expect = 'a file path under baseDirectory such as "index.html"'

    def parse(self, value, key, base):
        try:
            site_path(value, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return value

    def schema(self):
        return {"type": "string", "pattern": _SITE_PATH}


class ErrorPages(Kind):
    """{"404": "404.html", ...}: 4xx/5xx status to a file under the root; kept as sorted pairs."""

    expect = 'an object like {"404": "404.html"}'

    def parse(self, value, key, base):
        if not isinstance(value, dict):
            raise self.fail(value, key)
        try:
            check_error_pages(value)
        except ValueError as e:
            raise ConfigError(str(e).replace("errorPages", key, 1)) from None
        return tuple(sorted(value.items()))

    def schema(self):
        return {"type": "object", "propertyNames": {"pattern": "^[45][0-9][0-9]$"},
                "additionalProperties": {"type": "string", "pattern": _SITE_PATH}}


class HeaderRuleList(Kind):
    """[{"match": "/assets/*", "set": {...}}, ...]; kept as (match, ((name, value), ...)) pairs."""

    expect = 'a list of {"match": "/path/*", "set": {"Header": "value"}} objects'

    def parse(self, value, key, base):
        if not isinstance(value, list):
            raise self.fail(value, key)
        try:
            rules = HeaderRules(value)
        except ValueError as e:
            raise ConfigError(str(e).replace("headers", key, 1)) from None
        return tuple((r["match"], tuple(r["set"].items())) for r in rules.as_json())

    def schema(self):
        rule = {"type": "object", "required": ["match", "set"], "additionalProperties": False,
                "properties": {"match": {"type": "string", "pattern": "^[/*]"},
                               "set": {"type": "object", "minProperties": 1,
                                       "propertyNames": {"pattern": r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$",
                                                         "not": {"pattern": _REFUSED_NAME}},
                                       "additionalProperties": {"type": "string", "pattern": _VALUE}}}}
        return {"type": "array", "items": rule}
