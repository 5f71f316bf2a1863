"""The settings of gows.conf.json, one frozen dataclass per section: start reading here.

Each field declares one setting once (its kind, default as JSON, and doc; see kinds.py); the
loader, the error messages, gows.schema.json and the README's table are derived from these
declarations. The classes end in Config so they never meet the runtime classes they configure
(the proxy's Proxy and FrontCache, the logging module) under the same name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fileapp import cache as worker_cache
from fileapp import logs as worker_logs

from ..addresses import Address, WorkerAddress
from .kinds import (REQUIRED, AddressKind, Boolean, Choice, Host, Integer, Nullable, Number, UrlPath, WorkerList,
                    section, setting)
from .path_kinds import Directory, FilePath, InputFile, LogTarget, PidFilePath
from .site_kinds import ErrorPages, HeaderRuleList, SitePath


@dataclass(frozen=True)
class HealthCheckConfig:
    """healthCheck: active HTTP checks of every worker (HAProxy's inter/rise/fall)."""

    path: str = setting(UrlPath(), "/healthcheck", "URL path requested on each worker; a 2xx answer is a pass.")
    interval: float = setting(Number(3600), 1.0, "Seconds between two checks of one worker that is up, at most: each wait is shortened at random by up to a fifth, so that the checks of many workers spread out rather than all come at once. One that is not up (starting, or down) is checked at least every second, so that it can pass its rise checks within bootTimeout.")
    timeout: float = setting(Number(600), 1.0, "Seconds a check may take (connect to status line) before it fails.")
    rise: int = setting(Integer(1, 100), 2, "Consecutive passes that mark a worker up.")
    fall: int = setting(Integer(1, 100), 3, "Consecutive failures that mark a worker down (a local one is then replaced).")
    boot_timeout: float = setting(Number(3600), 15.0, "Seconds a newly started local worker has to become healthy before it is killed and retried.")
    idle_interval: float = setting(Number(3600, positive=False), 5.0, "Seconds between two checks of a local worker that is up and was sent no request since its last check (as Envoy's no_traffic_healthy_interval); never less often than interval. A check wakes an idle worker's process for nothing else, at 10-20 times the CPU of a request to a busy one (100 workers on 2 cores: 5-8% of the throughput at 1 s), and an idle worker has no request a failure could cost: the first one sent to it brings its checks back to every interval. Remote and ejected workers are checked every interval. 0: every interval.")


@dataclass(frozen=True)
class RestartBackoffConfig:
    """restartBackoff: how fast a local worker that keeps failing right after start is retried."""

    initial: float = setting(Number(3600), 0.5, "Delay before the second consecutive restart of a failing worker; it doubles each further time.")
    max: float = setting(Number(3600), 30.0, "Upper bound of the restart delay.")
    min_uptime: float = setting(Number(86400, positive=False), 5.0, "A worker that exits, crashes (SIGSEGV, SIGABRT, ...) or is replaced for failing checks sooner than this many seconds after it started, or before it was ever healthy, counts as failing right after start. One killed from outside (SIGKILL, SIGTERM: the OOM killer, an operator) after it had become healthy does not: it restarts at once.")


@dataclass(frozen=True)
class WorkerCacheConfig:
    """cache: each worker's file cache (passed to the workers)."""

    ttl: float = setting(Number(86400, positive=False), worker_cache.DEFAULT_TTL, "Seconds a cached file is served before it is checked against the disk again.")
    max_bytes: int = setting(Integer(0, 1 << 40), worker_cache.DEFAULT_MAX_BYTES, "Byte budget of each worker's cache.")
    max_file_size: int = setting(Integer(0, 1 << 40), worker_cache.DEFAULT_MAX_FILE_SIZE, "Largest file whose bytes are cached; bigger files are streamed with sendfile.")
    etag: str = setting(Choice(*worker_cache.ETAG_KINDS), worker_cache.DEFAULT_ETAG, "How ETags are made: mtime (from the file's modification time and size: equal across hosts only when files are deployed with their mtimes, as rsync -a does) or content (a hash of the bytes, computed once per file version and kept in the worker's cache: equal across hosts for equal bytes).")


@dataclass(frozen=True)
class OutlierDetectionConfig:
    """outlierDetection: passive ejection of workers that keep failing (Envoy's outlier detection)."""

    consecutive_failures: int = setting(Integer(0, 1000), 5, "Consecutive failures a proxy sees from one worker (500, 502, 503 without Retry-After or 504 answered by it, or a refused, reset or timed-out connection) that eject it from balancing; 0 turns ejection off. Any other answer starts the count again.")
    base_ejection_time: float = setting(Number(86400), 30.0, "Seconds of a worker's first ejection; each further one lasts twice the one before.")
    max_ejection_time: float = setting(Number(86400), 300.0, "Upper bound of an ejection; a worker not ejected for this long starts again from baseEjectionTime.")
    max_ejection_percent: int = setting(Integer(0, 100), 50, "Most workers ejected at once, in percent of all workers; never the last worker up.")


@dataclass(frozen=True)
class LoggingConfig:
    """logging: where and how much the master and its workers log."""

    level: str = setting(Choice("debug", "info", "warning", "error", "critical"), "info", "Least severe level that is logged.")
    access_log: Path | str | None = setting(LogTarget(), False, "Access log of the proxy processes, one line per request in Apache's combined format plus the request time in microseconds: false (off), true or \"-\" (stdout), or a file. SIGUSR1 reopens it.")
    file: Path | None = setting(Nullable(FilePath()), None, "Log file (master and workers); null logs to stderr. SIGUSR1 reopens it.")
    format: str = setting(Choice(*worker_logs.FORMATS), "text", "Line format of the master's and the workers' logs: text (time [pid] [LEVEL] logger[:worker port]: message) or json (one object per line, for log shippers).")


@dataclass(frozen=True)
class ProxyConfig:
    """proxy: the front reverse proxy on the public listener."""

    processes: int | None = setting(Nullable(Integer(1, 1024)), None, "Proxy processes serving clients, each accepting on the public port; null: one per CPU the master may run on. Kept-alive client connections are kept spread over them: one holding many more than another (10% of all, 2 at least) lets half the difference go, at most 1/64 of all clients (64 at least) a second, each after a response that says Connection: close, and accepts nothing for half a second while they reconnect. Connections, request body and front cache budgets below are the whole server's, split between them.")
    balance: str | None = setting(Nullable(Choice("first", "round-robin", "least-outstanding", "consistent-hash")), None, "How a worker is chosen: first (the first worker with a thread free, as HAProxy's balance first: the load stays on as few workers as it needs, awake and hot in cache, instead of waking each worker in turn; each proxy process starts at its own place in the table, proxy k of P at worker k·N/P, so the proxies do not queue on the same worker), round-robin (under concurrency a busy worker takes up to 8 requests in a row, never more than its threads or than its weight has earned, sparing context switches), least-outstanding (fewest requests in flight), or consistent-hash (on the path with bounded load, so each worker's cache holds its share); null: first while every worker is spawned here, round-robin once any is another host's (an edge spreads its load across the nodes). Whatever the policy, a worker with a connection in use on each of its threads (requests pipelined on one connection take one thread) is passed over while another has a thread free.")
    hash_balance_factor: float = setting(Number(100, positive=False), 1.25, "consistent-hash's bound on load (HAProxy's hash-balance-factor as a ratio): no worker takes more than this times its weighted share of the requests in flight; the others go to the next worker on the ring. Lower spreads a hot path sooner, higher keeps each path on its own worker (and cache) longer: an edge hashing for its nodes' caches wants 2; 0: no bound (a busy worker's threads still are).")
    retries: int = setting(Integer(0, 10), 2, "Other workers an idempotent request is retried on when a connection fails before any response byte.")
    connect_timeout: float = setting(Number(600), 2.0, "Seconds to connect to a worker.")
    response_timeout: float = setting(Number(3600), 30.0, "Seconds a worker has to start its response, and then between two reads of it; the same time bounds a client that stops reading a response, a request waiting for a free connection to its worker, a request waiting for the first worker to come up while gows starts, and the retries of a failed request.")
    idle_timeout: float = setting(Number(3600), 15.0, "Seconds an idle client keep-alive connection is kept open.")
    header_timeout: float = setting(Number(600), 10.0, "Seconds a client has to send a complete request head.")
    max_connections: int = setting(Integer(1, 1_000_000), 10000, "Client connections served at once by all proxy processes together (each takes up to 10% over its even share, as connections never spread exactly); more wait in the listen backlog, and the longest-idle connections are closed to let them in.")
    max_request_line: int = setting(Integer(256, 1 << 20), 8190, "Longest request line in bytes (414 beyond).")
    max_header_bytes: int = setting(Integer(1024, 1 << 24), 32768, "Largest request head in bytes (431 beyond).")
    max_headers: int = setting(Integer(1, 10000), 100, "Most request header fields (431 beyond).")
    max_body_bytes: int = setting(Integer(0, 1 << 40), 1048576, "Largest request body in bytes (413 beyond).")
    body_buffer_bytes: int = setting(Integer(0, 1 << 40), 67108864, "Request body bytes held for all clients at once; a request whose body would exceed it is answered 503. A body must arrive at 4 KiB/s on average after its first headerTimeout seconds (408 otherwise).")
    pool_size: int = setting(Integer(1, 100000), 64, "Idle keep-alive connections kept per worker.")


@dataclass(frozen=True)
class FrontCacheConfig:
    """frontCache: hot small responses kept in the proxy processes (micro-caching)."""

    enabled: bool = setting(Boolean(), True, "Whether the proxies cache responses.")
    max_bytes: int = setting(Integer(0, 1 << 40), 67108864, "Byte budget of the front cache of the whole server (bodies, prepared heads and bookkeeping: what the proxies really hold), split between the proxy processes.")
    max_object_bytes: int = setting(Integer(0, 1 << 40), 1048576, "Largest response body the front cache keeps (a file body a worker hands off is kept as the file's name, whatever its size).")


@dataclass(frozen=True)
class HstsConfig:
    """tls.hsts: Strict-Transport-Security on HTTPS responses (opt-in)."""

    max_age: int = setting(Integer(0, 1 << 31), 0, "Seconds a browser keeps to HTTPS only for this host once it has seen the header; 0 sends no Strict-Transport-Security header (off). Start small (300) and raise it (31536000, a year) once every page works over HTTPS: a browser cannot be told to forget it early.")
    include_sub_domains: bool = setting(Boolean(), False, "Add includeSubDomains: every subdomain becomes HTTPS-only too.")


@dataclass(frozen=True)
class TlsConfig:
    """tls: HTTPS, terminated in the proxy processes."""

    certificate: Path | None = setting(Nullable(InputFile()), None, "PEM certificate chain, the server's certificate first; null: no HTTPS. SIGHUP loads it again (a broken one keeps the old serving).")
    key: Path | None = setting(Nullable(InputFile()), None, "PEM private key of the certificate, without a passphrase (gows never prompts for one).")
    listen: Address = setting(AddressKind(), "127.0.0.1:8443", "Address of the HTTPS listener (TLS 1.2 and 1.3, Mozilla's intermediate profile, ALPN http/1.1).")
    redirect_listen: Address | None = setting(Nullable(AddressKind()), None, "Address of a plain-HTTP listener answering every request with a 308 redirect to the same path on HTTPS (the host is the request's when the certificate names it, else the certificate's first name); null: none.")
    hsts: HstsConfig = section(HstsConfig, "Strict-Transport-Security on HTTPS responses.")

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


_PORT = Integer(1, 65535)


@dataclass(frozen=True)
class Config:
    """A validated gows.conf.json. `listen` and `workers` are resolved from whichever form was given."""

    listen: Address | None = setting(Nullable(AddressKind()), "127.0.0.1:8080", "Public address the master serves plain HTTP on; IPv6 as \"[::1]:8080\"; null: none (HTTPS only, with tls).")
    master_port: int | None = setting(Nullable(_PORT), None, "Legacy (proof of concept): public port on 127.0.0.1. Give either this or listen.")
    workers: tuple[WorkerAddress, ...] = setting(Nullable(WorkerList()), None, "The workers as a list of {host, port}, each optionally with a weight (its share of the requests against the others' weights, 1 to 1000, default 1), slowStart (seconds over which a worker coming back from down or from an ejection ramps up to its weight, default 0: at once; never at the master's start) and spawn (false: never started here, even when local: another gows, a worker systemd runs). Workers on this machine are spawned here; others are only health-checked. A host given by DNS name is resolved at start and every resolveInterval: each address it yields is a worker (one that vanishes is drained); a name that does not resolve is a warning, not an error. Give either this or workerCount.")
    worker_count: int | None = setting(Nullable(Integer(1, 1024)), None, "Shorthand for workers: this many local workers on consecutive ports from workerBasePort. For files on local disks, workers beyond the CPUs buy little: they take turns on them (on 2 CPUs with the front cache off, 10 workers served 0.88-1.12x the requests per second of 2, and 100 workers 0.93-1.05x, in one benchmark run); more pay when requests wait on slow storage.")
    worker_base_port: int = setting(_PORT, 9001, "First worker port of the workerCount form.")
    worker_host: str = setting(Host(), "127.0.0.1", "Address the workers of the workerCount form listen on.")
    base_directory: Path = setting(Directory(), REQUIRED, "The directory served (the document root).")
    threads: int = setting(Integer(1, 1024), 64, "Threads per worker: one serves all its connections, the others stand by to serve beside it while it waits (on a slow disk); each costs about 16 KB and a process id (workers x threads must fit under the kernel's pid_max, 32,768 on some systems: a worker refused a thread says so and exits). Also how many connections a proxy has in use to a worker (at most proxy.poolSize) before it prefers another with a thread free (proxy.balance): more keeps the load on fewer workers.")
    graceful_timeout: float = setting(Number(3600), 30.0, "Seconds a stopping worker has to finish in-flight requests before it is killed.")
    compress: bool = setting(Boolean(), True, "Compress text, JSON, JavaScript, SVG, XML and wasm files from 1 KiB up to cache.maxFileSize without a precompressed .br/.gz sidecar on the fly (zstd, brotli or gzip, as the client prefers), once per file version, kept in each worker's cache.")
    max_fails: int = setting(Integer(1, 1000), 3, "Proxy connection failures within failTimeout that mark a worker down.")
    fail_timeout: float = setting(Number(3600), 10.0, "Window in seconds for maxFails.")
    resolve_interval: float = setting(Number(86400), 30.0, "Seconds between two resolutions of a worker host given by DNS name (done off the master's loop).")
    lame_duck: float = setting(Number(3600, positive=False), 5.0, "Seconds a master told to stop (TERM) answers its own health path (healthCheck.path on the public listener) 503 while still serving, before it drains: an edge gows checking it with default healthCheck settings (fall 3 x interval 1s + timeout 1s) marks it down meanwhile, so no request is sent to a node that is leaving. Skipped when nothing asked the health path in that time; 0 disables it.")
    pidfile: Path | None = setting(Nullable(PidFilePath()), None, "File the master writes its pid to (removed at exit); null for none. A start is refused while it names a running gows; one naming another program's pid is stale, and replaced.")
    admin: Address | None = setting(Nullable(AddressKind()), None, "Address of the admin listener (status page, metrics); null disables it.")
    listing: bool = setting(Boolean(), False, "List a directory that has no index.html: an HTML page (sorted by name, sizes, modification times, parent link, 1000 entries a page), or JSON on Accept: application/json. Hidden names (dotfiles) and whatever the workers refuse to serve are left out.")
    fallback: str | None = setting(Nullable(SitePath()), None, "Single-page apps: a file under baseDirectory (e.g. \"index.html\") that answers, with 200, a GET or HEAD of a path with no file when the request's Accept names text/html and the path's last segment has no extension (as try_files $uri /index.html); never for the health path or a path refused for security. null: none.")
    error_pages: tuple[tuple[str, str], ...] = setting(ErrorPages(), {}, "Error pages by status, e.g. {\"404\": \"404.html\"}: files under baseDirectory sent as the body of the workers' own 4xx/5xx answers (404, 405, 412, 503) with that status; a missing or unreadable page leaves the built-in one.")
    headers: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = setting(HeaderRuleList(), [], "Headers by path, e.g. [{\"match\": \"/assets/*\", \"set\": {\"Cache-Control\": \"max-age=600\"}}]: set by the workers on the answers about files and listings (200, 206, 304, 416) whose URL path matches the glob (fnmatch, case-sensitive; * also matches /), later rules winning; kept by the front cache. Hop-by-hop, framing and computed headers (Connection, Transfer-Encoding, Content-Length, Content-Range, ETag, Vary, Proxy-*, ...) are refused.")
    health_check: HealthCheckConfig = section(HealthCheckConfig, "Active health checks of every worker.")
    restart_backoff: RestartBackoffConfig = section(RestartBackoffConfig, "Back-off for local workers that keep failing right after start (a crash loop). It does not leave the pool without a worker on its way: when no local worker is up or starting, one that is waiting out its delay starts at once. When such starts exit by themselves before they are up (workers that cannot start at all: the root gone, a bad setting), each next one waits initial, doubling to max, until a worker is up again; one killed from outside does not count.")
    outlier_detection: OutlierDetectionConfig = section(OutlierDetectionConfig, "Workers taken out of balancing for a while after consecutive failures the proxies saw.")
    cache: WorkerCacheConfig = section(WorkerCacheConfig, "Each worker's file cache.")
    logging: LoggingConfig = section(LoggingConfig, "Logging of the master and its workers.")
    proxy: ProxyConfig = section(ProxyConfig, "The front reverse proxy.")
    front_cache: FrontCacheConfig = section(FrontCacheConfig, "Responses cached in the proxy processes.")
    tls: TlsConfig = section(TlsConfig, "HTTPS in the proxy processes (off until a certificate is given).")
    source: Path = field(default=Path("gows.conf.json"), metadata={})  # the file this came from

    @property
    def local_workers(self) -> tuple[WorkerAddress, ...]:
        return tuple(w for w in self.workers if w.local)
