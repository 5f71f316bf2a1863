"""Start and stop each server under test on a free loopback port, always stopped again by pid."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .prereqs import FILES, which
from .usage import group_usage

REPO = Path(__file__).resolve().parent.parent
APACHE_ROOT = Path("/etc/apache2")
# Threads per gunicorn gthread worker for the Python peers.
PEER_THREADS = 4
# Python peers run under gunicorn: the WSGI factory in benchmarks.apps and the worker class of each.
PEER_APPS = {"fileapp": "fileapp_app", "fileapp-worker": "fileapp_app", "whitenoise": "whitenoise_app",
             "whitenoise-worker": "whitenoise_app", "werkzeug": "werkzeug_app"}
# What gows' own workers run; whitenoise under it too, to tell the app's share from the worker's.
PEER_WORKERS = {"fileapp-worker": "fileapp.worker.GowsThreadWorker",
                "whitenoise-worker": "fileapp.worker.GowsThreadWorker"}
PEERS = tuple(PEER_APPS)
# Every kind of server and its name in the table.
NAMES = {"apache": "Apache", "nginx": "nginx", "gows": "gows", "gows-metrics": "gows+metrics",
         "gows-noadmin": "gows (no admin)", "fileapp": "fileapp", "fileapp-worker": "fileapp (gows worker)",
         "whitenoise": "gunicorn+whitenoise", "whitenoise-worker": "whitenoise (gows worker)",
         "werkzeug": "gunicorn+SharedData"}
# The servers gows is judged against: a compare run measures them at its start and at its end.
REFERENCES = ("apache", "nginx")
# Kinds measured only as twins beside another row (benchmarks.__main__.twins_of), never on their own.
TWIN_KINDS = ("gows-noadmin",)
# The names --only takes.
KINDS = tuple(kind for kind in NAMES if kind not in TWIN_KINDS)
GOWS_KINDS = ("gows", "gows-metrics", "gows-noadmin")
# gows with its admin listener on: /status.json tells each proxy process's share of a load. The
# proxy then also records every response's latency (with no admin listener nothing could read
# them and it skips the work); gows-metrics is the same server, measured in turn with two
# gows-noadmin twins to tell what that costs.
ADMIN_KINDS = ("gows", "gows-metrics")
# nginx's events.worker_connections: Debian's 768 cannot hold wrk's 5000 keep-alive clients,
# and one worker may accept most of them. Twice that in descriptors (a file open per request).
NGINX_CONNECTIONS = 8192


class ServerError(RuntimeError):
    """A server did not start or answer; the message carries the tail of its log."""


@dataclass(frozen=True)
class ServerSpec:
    """One server configuration to measure."""

    kind: str  # one of KINDS
    workers: int | None = None  # None: the server's own default (Apache, nginx)
    cache: bool | None = None  # gows' front cache; None where it does not apply
    again: bool = False  # a reference measured a second time, at the end of the run

    @property
    def name(self) -> str:
        """The server column of the table."""
        return NAMES[self.kind] + (" (again)" if self.again else "")

    @property
    def workers_label(self) -> str:
        """The workers column: a count, or `auto` for the server's own default."""
        return "auto" if self.workers is None else str(self.workers)

    @property
    def cache_label(self) -> str:
        """The cache column: gows' front cache on/off, `-` elsewhere."""
        return "-" if self.cache is None else ("on" if self.cache else "off")

    @property
    def label(self) -> str:
        """A short unique name for progress lines and the chart legend."""
        parts = [self.name]
        if self.workers is not None:
            parts.append(f"{self.workers}w")
        if self.cache is not None:
            parts.append(f"cache {self.cache_label}")
        return " ".join(parts)

    @property
    def admin(self) -> bool:
        """Whether the server runs an admin listener (/status.json)."""
        return self.kind in ADMIN_KINDS

    @property
    def boot_timeout(self) -> float:
        """Seconds to wait for the first 200: gows' workers must pass health checks first."""
        return 60.0 + 2.0 * (self.workers or 0) if self.kind in GOWS_KINDS else 60.0


@dataclass
class Running:
    """A started server: where it listens and how to find its log."""

    spec: ServerSpec
    port: int
    proc: subprocess.Popen
    log_path: Path
    idle: bool = False  # went idle after booting (False: still busy when the boot timeout ran out)
    admin_port: int | None = None  # gows' admin listener (ServerSpec.admin), None without one
    https_port: int | None = None  # its HTTPS listener (serve's `tls`), None without one

    def url(self, file_name: str) -> str:
        """The URL of a file of the document root on this server."""
        return f"http://127.0.0.1:{self.port}/{file_name}"

    def https_url(self, file_name: str) -> str:
        return f"https://127.0.0.1:{self.https_port}/{file_name}"


@dataclass(frozen=True)
class Tls:
    """An HTTPS listener for a server: its port, certificate and key (benchmarks.tlsloads)."""

    port: int
    certificate: Path
    key: Path


# Mozilla's intermediate profile for nginx, as gows' proxies apply it (arbiter/tls.py).
NGINX_TLS = """\t\tssl_protocols TLSv1.2 TLSv1.3;
\t\tssl_ciphers {ciphers};
\t\tssl_prefer_server_ciphers off;
\t\tssl_session_cache shared:MozSSL:10m;
\t\tssl_session_timeout 1d;
\t\tssl_session_tickets off;
"""


def free_port() -> int:
    """An ephemeral loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_range(count: int, low: int = 20000, high: int = 32000) -> int:
    """First port of `count` consecutive free ports below the kernel's ephemeral range (gows' workers)."""
    for _ in range(100):
        base = random.randrange(low, high - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise ServerError(f"no {count} consecutive free ports between {low} and {high}")


def apache_env(envvars: str, workdir: Path) -> dict[str, str]:
    """Debian's envvars (its run user and group), with the runtime, lock and log dirs moved to `workdir`."""
    env = dict(os.environ)
    env.update(re.findall(r"^export (APACHE_RUN_(?:USER|GROUP))=(\S+)", envvars, re.M))
    for key in ("APACHE_RUN_DIR", "APACHE_LOCK_DIR", "APACHE_LOG_DIR"):
        env[key] = str(workdir)
    env["APACHE_PID_FILE"] = str(workdir / "apache2.pid")
    env["LANG"] = "C"
    return env


def apache_config(stock: str, root: Path, port: int) -> str:
    """Debian's apache2.conf as shipped (its mods-enabled and conf-enabled), with one site on our port."""
    # Replace the stock Listen ports and sites with our own single site.
    stock = re.sub(r"^\s*(Include ports\.conf|IncludeOptional sites-enabled/.*)$", "", stock, flags=re.M)
    return stock + f"""
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
<VirtualHost *:{port}>
\tDocumentRoot {root}
\tErrorLog ${{APACHE_LOG_DIR}}/error.log
\tCustomLog ${{APACHE_LOG_DIR}}/access.log combined
</VirtualHost>
<Directory {root}/>
\tOptions Indexes FollowSymLinks
\tAllowOverride None
\tRequire all granted
</Directory>
"""


def nginx_config(root: Path, port: int, workdir: Path, tls: Tls | None = None) -> str:
    """Debian's nginx.conf defaults (auto workers, sendfile, access log, gzip) with one site on our
    port, and room for wrk's 5000 clients (NGINX_CONNECTIONS); with `tls`, the same site over
    HTTPS on its port too."""
    https = ""
    if tls is not None:
        from arbiter.tls import INTERMEDIATE_CIPHERS
        https = (f"\t\tlisten 127.0.0.1:{tls.port} ssl;\n\t\tssl_certificate {tls.certificate};\n"
                 f"\t\tssl_certificate_key {tls.key};\n" + NGINX_TLS.format(ciphers=INTERMEDIATE_CIPHERS))
    user = "user www-data;\n" if os.geteuid() == 0 else ""
    temp = "".join(f"\t{kind}_temp_path {workdir}/{kind}_temp;\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}worker_processes auto;
worker_rlimit_nofile {2 * NGINX_CONNECTIONS};
pid {workdir}/nginx.pid;
error_log {workdir}/error.log;
include /etc/nginx/modules-enabled/*.conf;
events {{
\tworker_connections {NGINX_CONNECTIONS};
}}
http {{
\tsendfile on;
\ttcp_nopush on;
\ttypes_hash_max_size 2048;
\tinclude /etc/nginx/mime.types;
\tdefault_type application/octet-stream;
\taccess_log {workdir}/access.log;
\tgzip on;
{temp}\tserver {{
\t\tlisten 127.0.0.1:{port};
{https}\t\troot {root};
\t\tindex index.html index.htm;
\t\tlocation / {{
\t\t\ttry_files $uri $uri/ =404;
\t\t}}
\t}}
}}
"""


def gows_config(root: Path, port: int, spec: ServerSpec, admin_port: int | None = None,
                tls: Tls | None = None) -> dict:
    """The arbiter's config for this run (keys as in gows.conf.json); the admin listener on
    `admin_port` when given, HTTPS with `tls`. Everything else is gows' default."""
    workers = spec.workers or 2
    return {
        "baseDirectory": str(root),
        "listen": f"127.0.0.1:{port}",
        "workerCount": workers,
        "workerBasePort": free_port_range(workers),
        "frontCache": {"enabled": bool(spec.cache)},
        **({"admin": f"127.0.0.1:{admin_port}"} if admin_port is not None else {}),
        **({"tls": {"certificate": str(tls.certificate), "key": str(tls.key), "listen": f"127.0.0.1:{tls.port}"}}
           if tls is not None else {}),
    }


def python_env() -> dict[str, str]:
    """Children import this checkout (benchmarks, fileapp, arbiter) with unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def command(spec: ServerSpec, root: Path, port: int, workdir: Path,
            admin_port: int | None = None, tls: Tls | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run `spec` in the foreground, with its files written to `workdir`
    (gows: its admin listener on `admin_port` when given; nginx and gows: HTTPS with `tls`)."""
    if spec.kind == "apache":
        conf = workdir / "apache2.conf"
        conf.write_text(apache_config((APACHE_ROOT / "apache2.conf").read_text(), root, port))
        envvars = APACHE_ROOT / "envvars"
        argv = [which("apache2") or "apache2", "-d", str(APACHE_ROOT), "-f", str(conf), "-DFOREGROUND"]
        return argv, apache_env(envvars.read_text() if envvars.exists() else "", workdir)
    if spec.kind == "nginx":
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_config(root, port, workdir, tls))
        argv = [which("nginx") or "nginx", "-p", str(workdir), "-e", str(workdir / "error.log"),
                "-c", str(conf), "-g", "daemon off;"]
        return argv, dict(os.environ)
    if spec.kind in GOWS_KINDS:
        conf = workdir / "gows.conf.json"
        conf.write_text(json.dumps(gows_config(root, port, spec, admin_port, tls), indent=2))
        return [sys.executable, "-m", "arbiter", "-c", str(conf)], python_env()
    if spec.kind in PEERS:
        app = f"benchmarks.apps:{PEER_APPS[spec.kind]}({str(root)!r})"
        argv = [sys.executable, "-m", "gunicorn", "-k", PEER_WORKERS.get(spec.kind, "gthread"),
                "-w", str(spec.workers or 2),
                "--threads", str(PEER_THREADS), "-b", f"127.0.0.1:{port}", "--log-level", "warning", app]
        return argv, python_env()
    raise ValueError(f"unknown server kind {spec.kind!r}")


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a server's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(running: Running, timeout: float) -> None:
    """Block until the server answers 200 on the small file, or raise ServerError (died or timed out)."""
    url = running.url(FILES[0][0])
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if running.proc.poll() is not None:
            raise ServerError(f"{running.spec.label} exited with status {running.proc.returncode}:\n"
                              f"{log_tail(running.log_path)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
                last = f"status {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise ServerError(f"{running.spec.label} not ready after {timeout:.0f}s ({last}):\n{log_tail(running.log_path)}")


def settle(running: Running, timeout: float, idle_share: float = 0.2) -> bool:
    """Wait until the server stops spawning processes and uses under `idle_share` of a core, so
    booting workers (gows or gunicorn with 100 workers) do not compete with the measurement.
    A server at rest is not at zero: gows health-checks each of 100 workers every few seconds
    (about 2% of a core in all), so the bar sits above that. False if it was still busy
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    before = group_usage(running.proc.pid)
    while time.monotonic() < deadline and running.proc.poll() is None:
        time.sleep(1.0)
        now = group_usage(running.proc.pid)
        if now[0] == before[0] and now[1] - before[1] < idle_share:
            return True
        before = now
    return False


def stop(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """TERM the server by pid, KILL it if it lingers, then KILL any child left in the group it leads."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    # The server was started as the leader of its own session: its pid is its process group id,
    # so this reaches only its own children (workers orphaned by a crash), nothing else.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def serve(spec: ServerSpec, root: Path, workdir: Path,
          certificate: tuple[Path, Path] | None = None) -> Iterator[Running]:
    """Run `spec` serving `root` until the block ends (also on errors and Ctrl-C); with
    `certificate` (and its key), over HTTPS too (nginx and gows)."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    port = free_port()
    admin_port = free_port() if spec.admin else None
    tls = Tls(free_port(), *certificate) if certificate is not None else None
    argv, env = command(spec, root, port, workdir, admin_port, tls)
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    running = Running(spec, port, proc, log_path, admin_port=admin_port,
                      https_port=tls.port if tls is not None else None)
    try:
        wait_ready(running, spec.boot_timeout)
        running.idle = settle(running, spec.boot_timeout)
        yield running
    finally:
        stop(proc, grace=30.0 + (spec.workers or 0) * 0.5)
