"""Load and validate gows.conf.json into frozen dataclasses.

Each setting is declared once, as a dataclass field carrying its JSON key, validator, default and
doc (gunicorn's config.py is the model); the loader, the error messages and the published JSON
Schema (gows.schema.json) are all derived from those declarations.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import ipaddress
import json
import math
import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from .addresses import Address, WorkerAddress
from .sockets import ListenError, bind_listener

SCHEMA_PATH = Path(__file__).with_name("gows.schema.json")
_REQUIRED = object()


class ConfigError(Exception):
    """A user mistake in the config file: one line naming the key and the problem."""


# ---------------------------------------------------------------------------------------------
# Value kinds: each parses one JSON value (raising ConfigError) and describes itself as schema.
# ---------------------------------------------------------------------------------------------
def _got(value: Any) -> str:
    return json.dumps(value)


class Kind:
    """How a setting's JSON value is checked and converted."""

    expect = "a value"

    def parse(self, value: Any, key: str, base: Path) -> Any:
        raise ConfigError(f"{key}: must be {self.expect}, got {_got(value)}")

    def schema(self) -> dict:
        return {}

    def fail(self, value: Any, key: str) -> ConfigError:
        return ConfigError(f"{key}: must be {self.expect}, got {_got(value)}")


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
    expect = 'an absolute URL path such as "/healthcheck"'
    _pattern = r"^/[!-~]{0,1023}$"

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
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", value)
        if not m:
            raise self.fail(value, key)
        host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ConfigError(f"{key}: host must be an IP address or localhost, got {_got(value)}") from None
        if m.group(1) and ip.version != 6 or not 1 <= int(port) <= 65535:
            raise self.fail(value, key)
        return Address(host, int(port))

    def schema(self):
        port = r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
        return {"type": "string", "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):" + port + "$"}


class Directory(Kind):
    expect = "a readable directory"

    def parse(self, value, key, base):
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: must be a directory path, got {_got(value)}")
        path = (base / value).resolve()
        if not path.exists():
            raise ConfigError(f"{key}: {path} does not exist")
        if not path.is_dir():
            raise ConfigError(f"{key}: {path} is not a directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"{key}: {path} is not readable")
        return path

    def schema(self):
        return {"type": "string", "minLength": 1}


class FilePath(Kind):
    """A file the master writes (log, pidfile): its directory must exist."""

    expect = "a file path"

    def parse(self, value, key, base):
        if not isinstance(value, str) or not value:
            raise self.fail(value, key)
        path = (base / value).resolve()
        if not path.parent.is_dir():
            raise ConfigError(f"{key}: directory {path.parent} does not exist")
        if path.is_dir():
            raise ConfigError(f"{key}: {path} is a directory")
        return path

    def schema(self):
        return {"type": "string", "minLength": 1}


class LogTarget(Kind):
    """Where a log goes: false (off), true or "-" (stdout), or a file path."""

    expect = 'false, true (stdout), "-" (stdout) or a file path'

    def parse(self, value, key, base):
        if value is False or value is None:
            return None
        if value is True or value == "-":
            return STDOUT
        if not isinstance(value, str):
            raise self.fail(value, key)
        return FilePath().parse(value, key, base)

    def schema(self):
        return {"anyOf": [{"type": "boolean"}, {"type": "string", "minLength": 1}]}


STDOUT = "-"


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

    def parse(self, value, key, base):
        if not isinstance(value, list) or not 1 <= len(value) <= 1024:
            raise self.fail(value, key)
        out = []
        for i, item in enumerate(value):
            where = f"{key}[{i}]"
            if not isinstance(item, dict):
                raise ConfigError(f'{where}: must be an object like {{"host": "127.0.0.1", "port": 9001}}, got {_got(item)}')
            _reject_unknown(item, self._item, where + ".")
            for name in self._item:
                if name not in item:
                    raise ConfigError(f"{where}.{name}: required")
            out.append((self._item["host"].parse(item["host"], f"{where}.host", base),
                        self._item["port"].parse(item["port"], f"{where}.port", base), f"{where}.port"))
        return tuple(out)

    def schema(self):
        props = {name: kind.schema() for name, kind in self._item.items()}
        return {"type": "array", "minItems": 1, "maxItems": 1024,
                "items": {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}}


class Section(Kind):
    """A nested object of settings, declared by its own dataclass."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.expect = "an object"

    def parse(self, value, key, base):
        if not isinstance(value, dict):
            raise self.fail(value, key)
        return _parse_object(self.cls, value, key + ".", base)

    def schema(self):
        return _object_schema(self.cls)


# ---------------------------------------------------------------------------------------------
# Declarations
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    kind: Kind
    default: Any  # the JSON value (as a user would write it), or _REQUIRED / None
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


@dataclass(frozen=True)
class HealthCheck:
    """healthCheck: active HTTP checks of every worker (HAProxy's inter/rise/fall)."""

    path: str = setting(UrlPath(), "/healthcheck", "URL path requested on each worker; a 2xx answer is a pass.")
    interval: float = setting(Number(3600), 1.0, "Seconds between two checks of one worker.")
    timeout: float = setting(Number(600), 1.0, "Seconds a check may take (connect to status line) before it fails.")
    rise: int = setting(Integer(1, 100), 2, "Consecutive passes that mark a worker up.")
    fall: int = setting(Integer(1, 100), 3, "Consecutive failures that mark a worker down (a local one is then replaced).")
    boot_timeout: float = setting(Number(3600), 15.0, "Seconds a newly started local worker has to become healthy before it is killed and retried.")


@dataclass(frozen=True)
class RestartBackoff:
    """restartBackoff: how fast a local worker that keeps failing right after start is retried."""

    initial: float = setting(Number(3600), 0.5, "Delay before the second consecutive restart of a failing worker; it doubles each further time.")
    max: float = setting(Number(3600), 30.0, "Upper bound of the restart delay.")
    min_uptime: float = setting(Number(86400, positive=False), 5.0, "A worker that exits, crashes (SIGSEGV, SIGABRT, ...) or is replaced for failing checks sooner than this many seconds after it started, or before it was ever healthy, counts as failing right after start. One killed from outside (SIGKILL, SIGTERM: the OOM killer, an operator) after it had become healthy does not: it restarts at once.")


@dataclass(frozen=True)
class Cache:
    """cache: each worker's file cache (passed to the workers)."""

    ttl: float = setting(Number(86400, positive=False), 1.0, "Seconds a cached file is served before it is checked against the disk again.")
    max_bytes: int = setting(Integer(0, 1 << 40), 67108864, "Byte budget of each worker's cache.")
    max_file_size: int = setting(Integer(0, 1 << 40), 262144, "Largest file whose bytes are cached; bigger files are streamed with sendfile.")


@dataclass(frozen=True)
class Logging:
    """logging: where and how much the master and its workers log."""

    level: str = setting(Choice("debug", "info", "warning", "error", "critical"), "info", "Least severe level that is logged.")
    access_log: Path | str | None = setting(LogTarget(), False, "Access log of the master, one line per request in Apache's combined format plus the request time in microseconds: false (off), true or \"-\" (stdout), or a file. SIGUSR1 reopens it.")
    file: Path | None = setting(Nullable(FilePath()), None, "Log file (master and workers); null logs to stderr. SIGUSR1 reopens it.")


@dataclass(frozen=True)
class Proxy:
    """proxy: the front reverse proxy on the public listener."""

    balance: str = setting(Choice("round-robin", "least-outstanding", "consistent-hash"), "round-robin", "How a worker is chosen: round-robin (under concurrency a busy worker takes up to 8 requests in a row, never more than its threads, sparing context switches), least-outstanding (fewest requests in flight), or consistent-hash (on the path with bounded load, so each worker's cache holds its share). Whatever the policy, a worker with a request in flight on each of its threads is passed over while another has a thread free.")
    retries: int = setting(Integer(0, 10), 2, "Other workers an idempotent request is retried on when a connection fails before any response byte.")
    connect_timeout: float = setting(Number(600), 2.0, "Seconds to connect to a worker.")
    response_timeout: float = setting(Number(3600), 30.0, "Seconds a worker has to start its response.")
    idle_timeout: float = setting(Number(3600), 15.0, "Seconds an idle client keep-alive connection is kept open.")
    header_timeout: float = setting(Number(600), 10.0, "Seconds a client has to send a complete request head.")
    max_connections: int = setting(Integer(1, 1_000_000), 4096, "Client connections served at once; more wait in the listen backlog, and the longest-idle connections are closed to let them in.")
    max_request_line: int = setting(Integer(256, 1 << 20), 8190, "Longest request line in bytes (414 beyond).")
    max_header_bytes: int = setting(Integer(1024, 1 << 24), 32768, "Largest request head in bytes (431 beyond).")
    max_headers: int = setting(Integer(1, 10000), 100, "Most request header fields (431 beyond).")
    max_body_bytes: int = setting(Integer(0, 1 << 40), 1048576, "Largest request body in bytes (413 beyond).")
    body_buffer_bytes: int = setting(Integer(0, 1 << 40), 67108864, "Request body bytes held for all clients at once; a request whose body would exceed it is answered 503. A body must arrive at 4 KiB/s on average after its first headerTimeout seconds (408 otherwise).")
    pool_size: int = setting(Integer(1, 100000), 64, "Idle keep-alive connections kept per worker.")


@dataclass(frozen=True)
class FrontCache:
    """frontCache: hot small responses kept in the master (micro-caching)."""

    enabled: bool = setting(Boolean(), True, "Whether the master caches responses.")
    max_bytes: int = setting(Integer(0, 1 << 40), 67108864, "Byte budget of the front cache (bodies, prepared heads and bookkeeping: what the master really holds).")
    max_object_bytes: int = setting(Integer(0, 1 << 40), 1048576, "Largest response body the front cache keeps.")


_PORT = Integer(1, 65535)


@dataclass(frozen=True)
class Config:
    """A validated gows.conf.json. `listen` and `workers` are resolved from whichever form was given."""

    listen: Address = setting(AddressKind(), "127.0.0.1:8080", "Public address the master serves on; IPv6 as \"[::1]:8080\".")
    master_port: int | None = setting(Nullable(_PORT), None, "Legacy (proof of concept): public port on 127.0.0.1. Give either this or listen.")
    workers: tuple[WorkerAddress, ...] = setting(Nullable(WorkerList()), None, "The workers as a list of {host, port}. Workers on this machine are spawned here; others are only health-checked. Give either this or workerCount.")
    worker_count: int | None = setting(Nullable(Integer(1, 1024)), None, "Shorthand for workers: this many local workers on consecutive ports from workerBasePort.")
    worker_base_port: int = setting(_PORT, 9001, "First worker port of the workerCount form.")
    worker_host: str = setting(Host(), "127.0.0.1", "Address the workers of the workerCount form listen on.")
    base_directory: Path = setting(Directory(), _REQUIRED, "The directory served (the document root).")
    threads: int = setting(Integer(1, 1024), 4, "Threads per worker.")
    graceful_timeout: float = setting(Number(3600), 30.0, "Seconds a stopping worker has to finish in-flight requests before it is killed.")
    max_fails: int = setting(Integer(1, 1000), 3, "Proxy connection failures within failTimeout that mark a worker down.")
    fail_timeout: float = setting(Number(3600), 10.0, "Window in seconds for maxFails.")
    pidfile: Path | None = setting(Nullable(FilePath()), None, "File the master writes its pid to (removed at exit); null for none.")
    admin: Address | None = setting(Nullable(AddressKind()), None, "Address of the admin listener (status page, metrics); null disables it.")
    health_check: HealthCheck = section(HealthCheck, "Active health checks of every worker.")
    restart_backoff: RestartBackoff = section(RestartBackoff, "Back-off for local workers that keep failing right after start (a crash loop). It never leaves the pool without a worker: when no local worker is up or starting, one that is waiting out its delay starts at once.")
    cache: Cache = section(Cache, "Each worker's file cache.")
    logging: Logging = section(Logging, "Logging of the master and its workers.")
    proxy: Proxy = section(Proxy, "The front reverse proxy.")
    front_cache: FrontCache = section(FrontCache, "Responses cached in the master.")
    source: Path = field(default=Path("gows.conf.json"), metadata={})  # the file this came from

    @property
    def local_workers(self) -> tuple[WorkerAddress, ...]:
        return tuple(w for w in self.workers if w.local)

    @property
    def proxy_settings(self) -> dict[str, Any]:
        """Keyword arguments for the proxy's ProxySettings."""
        out = {f.name: getattr(self.proxy, f.name) for f in fields(Proxy)}
        out.update({f"front_cache_{f.name}": getattr(self.front_cache, f.name) for f in fields(FrontCache)})
        out["worker_threads"] = self.threads
        out["front_cache_revalidate"] = self.cache.ttl  # no staler than the workers' own view
        return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _reject_unknown(raw: dict, known: Iterable[str], prefix: str) -> None:
    known = list(known)
    for key in raw:
        if key not in known and not (prefix == "" and key == "$schema"):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")


def _parse_object(cls: type, raw: dict, prefix: str, base: Path) -> Any:
    entries = list(declared(cls))
    _reject_unknown(raw, [key for key, _, _ in entries], prefix)
    values = {}
    for key, f, s in entries:
        if key in raw:
            values[f.name] = s.kind.parse(raw[key], prefix + key, base)
        elif s.default is _REQUIRED:
            raise ConfigError(f"{prefix}{key}: required")
        elif s.default is None:
            values[f.name] = None
        else:
            values[f.name] = s.kind.parse(s.default, prefix + key, base)
    return cls(**values)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"{key}: given twice")
        out[key] = value
    return out


def is_local(host: str) -> bool:
    """True when `host` names this machine: binding one of its addresses succeeds."""
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"cannot resolve {host!r}: {e.strerror}") from None
    for family, _, _, _, sockaddr in infos:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((sockaddr[0], 0))
                return True
            except OSError as e:
                if e.errno != errno.EADDRNOTAVAIL:
                    raise
    return False


def _resolve_workers(raw: dict, values: Config) -> tuple[WorkerAddress, ...]:
    shorthand = [k for k in ("workerCount", "workerBasePort", "workerHost") if k in raw]
    if "workers" in raw and shorthand:
        raise ConfigError(f"{shorthand[0]}: give either workers or workerCount, not both")
    if values.workers is None and values.worker_count is None:
        if shorthand:
            raise ConfigError(f"workerCount: required with {shorthand[0]}")
        raise ConfigError("workers: required (a list of {host, port}), or give workerCount")
    if values.workers is not None:
        pairs = list(values.workers)
    else:
        last = values.worker_base_port + values.worker_count - 1
        if last > 65535:
            raise ConfigError(f"workerCount: {values.worker_count} ports from workerBasePort {values.worker_base_port} run past 65535")
        pairs = [(values.worker_host, values.worker_base_port + i, "workerBasePort") for i in range(values.worker_count)]
    out = []
    for host, port, label in pairs:
        try:
            local = is_local(host)
        except ConfigError as e:
            raise ConfigError(f"{label.rsplit('.', 1)[0] + '.host' if label != 'workerBasePort' else 'workerHost'}: {e}") from None
        out.append(WorkerAddress(host, port, local, label))
    return tuple(out)


def _check_ports(config: Config, listen_key: str) -> None:
    """No two listeners on one port: public, admin, local workers (any host); remote by host:port."""
    seen: dict[Any, str] = {}

    def claim(key: Any, label: str, what: str) -> None:
        if key in seen:
            raise ConfigError(f"{label}: {what} is already used by {seen[key]}")
        seen[key] = label

    claim(("local", config.listen.port), listen_key, f"port {config.listen.port}")
    if config.admin is not None:
        claim(("local", config.admin.port), "admin", f"port {config.admin.port}")
    for w in config.workers:
        claim(("local", w.port) if w.local else (w.host, w.port), w.label, f"{'port ' + str(w.port) if w.local else str(w)}")


def load_data(raw: Any, source: Path) -> Config:
    """Validate an already-parsed config object; relative paths resolve against source's directory."""
    if not isinstance(raw, dict):
        raise ConfigError(f"must be a JSON object, got {type(raw).__name__}")
    base = source.parent.resolve()
    values = _parse_object(Config, raw, "", base)
    listen_key = "listen"
    if "masterPort" in raw and "listen" in raw:
        raise ConfigError("masterPort: give either listen or masterPort, not both")
    listen = values.listen
    if values.master_port is not None:
        listen, listen_key = Address("127.0.0.1", values.master_port), "masterPort"
    fc = values.front_cache
    if fc.max_object_bytes > fc.max_bytes:
        raise ConfigError(f"frontCache.maxObjectBytes: {fc.max_object_bytes} exceeds frontCache.maxBytes {fc.max_bytes}")
    px = values.proxy
    if px.max_body_bytes > px.body_buffer_bytes:
        raise ConfigError(f"proxy.maxBodyBytes: {px.max_body_bytes} exceeds proxy.bodyBufferBytes {px.body_buffer_bytes}")
    config = dataclasses.replace(values, listen=listen, workers=_resolve_workers(raw, values), source=source)
    _check_ports(config, listen_key)
    return config


def load(path: str | os.PathLike) -> Config:
    """Read, parse and validate the config file at `path` (ConfigError on any problem)."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    try:
        raw = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    return load_data(raw, source)


def _reject_constant(name: str) -> Any:
    raise ConfigError(f"invalid JSON: {name} is not a JSON number")


def listen_key(config: Config) -> str:
    """The key the public address came from, for error messages."""
    return "masterPort" if config.master_port is not None else "listen"


def bind_configured(host: str, port: int, key: str) -> socket.socket:
    """A listening socket on an address the config names; a failure is a ConfigError naming `key`."""
    try:
        return bind_listener(host, port)
    except ListenError as e:
        raise ConfigError(f"{key}: {e}") from None


# ---------------------------------------------------------------------------------------------
# JSON Schema (published for editors; tests keep gows.schema.json equal to this)
# ---------------------------------------------------------------------------------------------
def _object_schema(cls: type) -> dict:
    props, required = {}, []
    for key, _, s in declared(cls):
        prop = dict(s.kind.schema())
        prop["description"] = s.doc
        if s.default is _REQUIRED:
            required.append(key)
        elif not isinstance(s.kind, Section):
            prop["default"] = s.default
        props[key] = prop
    out = {"type": "object", "description": (cls.__doc__ or "").strip(), "properties": props,
           "additionalProperties": False}
    if required:
        out["required"] = required
    return out


def json_schema() -> dict:
    """The JSON Schema of gows.conf.json, derived from the declarations above."""
    schema = _object_schema(Config)
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
