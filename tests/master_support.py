"""Driving a real `python -m arbiter` in integration tests: config, log, worker pids, ports."""
from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from support import (PYTHON, StoppedOnExit, children, free_ports, pid_alive, python_env, stop_process,
                     wait_until)


def free_port_run(count: int, host: str = "127.0.0.1") -> int:
    """A base port with `count` consecutive free ports, below the kernel's ephemeral range so
    that other tests' kernel-picked ports cannot land on them."""
    for _ in range(200):
        base = random.randrange(20000, 30000 - count)
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports found")


def _limit_files(count: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def health(port: int, timeout: float = 2.0) -> int | None:
    """Status of GET /healthcheck on a worker port, None when the request fails."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthcheck", timeout=timeout).status_code
    except requests.RequestException:
        return None


def title(pid: int) -> str:
    """A process's title; "" once it is gone (reading a process that exits meanwhile gives ESRCH)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


class Master(StoppedOnExit):
    """A `python -m arbiter` started by a test, with its config file and log in `directory`."""

    def __init__(self, directory: Path, config: dict, name: str = "gows.conf.json", nofile: int | None = None,
                 env: dict[str, str] | None = None, wrap: tuple[str, ...] = ()) -> None:
        """`nofile`: the master's open-file limit (RLIMIT_NOFILE, soft and hard), when a test needs it low;
        `env`: variables set in the master's environment besides python_env()'s; `wrap`: a command
        that execs the master (`ip netns exec NAME`)."""
        self.directory = directory
        self.config_path = directory / name
        self.log_path = directory / "master.log"
        self.write_config(config)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([*wrap, PYTHON, "-m", "arbiter", "-c", str(self.config_path)],
                                     cwd=directory, env={**python_env(), **(env or {})}, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=None if nofile is None else lambda: _limit_files(nofile))
        self.seen_children: set[int] = set()  # workers and proxies: what stop() makes sure is gone

    @property
    def pid(self) -> int:
        return self.proc.pid

    def write_config(self, config: dict) -> None:
        self.config = config
        self.config_path.write_text(json.dumps(config, indent=2))

    @property
    def port(self) -> int:
        """The public port of the config it was started with (listen or masterPort)."""
        if "masterPort" in self.config:
            return self.config["masterPort"]
        return int(self.config.get("listen", "127.0.0.1:8080").rsplit(":", 1)[1])

    @property
    def worker_ports(self) -> list[int]:
        return [w["port"] for w in self.config["workers"]]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> str:
        try:
            wait_until(lambda: self.count(pattern) >= count, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"{count} x {pattern!r} not in the master's log after {timeout}s:\n"
                               f"{self.log()[-3000:]}") from None
        return self.log()

    def workers(self) -> dict[int, int]:
        """{port: pid} of the master's live worker processes, from their process titles."""
        return self._children_titled(r"gows: worker :(\d+)")

    def proxies(self) -> dict[int, int]:
        """{index: pid} of the master's live proxy processes, from their process titles."""
        return self._children_titled(r"gows: proxy (\d+)")

    def _children_titled(self, pattern: str) -> dict[int, int]:
        """{number in the title: pid} of the live children whose title matches `pattern`."""
        out = {}
        for pid in children(self.pid):
            m = re.fullmatch(pattern, title(pid))
            if m and pid_alive(pid):
                out[int(m.group(1))] = pid
                self.seen_children.add(pid)
        return out

    def wait_workers(self, ports: list[int], timeout: float = 30.0) -> dict[int, int]:
        """Wait until exactly `ports` have a worker process answering 200 on its health path."""
        def ready():
            found = self.workers()
            if sorted(found) != sorted(ports):
                return None
            return found if all(health(p) == 200 for p in ports) else None
        try:
            return wait_until(ready, timeout=timeout, interval=0.1)
        except TimeoutError:
            raise TimeoutError(f"workers on {ports} not ready after {timeout}s; log:\n{self.log()[-3000:]}") from None

    def stop(self) -> None:
        self.workers()
        self.proxies()
        stop_process(self.proc, timeout=30)
        self._log.close()
        # Only processes this test's master started; they should be gone already.
        for pid in self.seen_children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


class Answer(int):
    """A response's status that also shows how the response began when printed: a failure in
    a test's assertion then says which part answered it (the proxy's own 503 or a worker's)."""

    start: bytes

    def __new__(cls, status: int, start: bytes) -> "Answer":
        answer = super().__new__(cls, status)
        answer.start = start
        return answer

    def __repr__(self) -> str:
        return f"{int(self)} {self.start!r}"


class Hammer:
    """A client thread sending GETs to a port until stopped, recording each outcome (start, end,
    status or exception): a new connection per request, or one keep-alive session with
    `keep_alive`. With `expect` ({path: body}), a wrong body counts as a failure too."""

    def __init__(self, port: int, path: str = "/a.txt", *, paths: tuple[str, ...] | None = None,
                 keep_alive: bool = False, expect: dict[str, bytes] | None = None,
                 pause: float = 0.01) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.paths = paths or (path,)
        self.keep_alive = keep_alive
        self.expect = expect or {}
        self.pause = pause
        self.results: list[tuple[float, float, object]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        session = requests.Session() if self.keep_alive else None
        i = 0
        while not self._stop.is_set():
            path = self.paths[i % len(self.paths)]
            i += 1
            t0 = time.monotonic()
            try:
                r = (session or requests).get(self.base + path, timeout=30)
                outcome: object = r.status_code
                if r.status_code != 200:
                    retry_after = r.headers.get("Retry-After")
                    outcome = Answer(r.status_code, r.content[:120] + (b" [Retry-After]" if retry_after else b""))
                if path in self.expect and r.content != self.expect[path]:
                    outcome = f"wrong body for {path}: {len(r.content)} bytes"
            except requests.RequestException as e:
                outcome = e
            self.results.append((t0, time.monotonic(), outcome))
            if self.pause:
                time.sleep(self.pause)
        if session is not None:
            session.close()

    def __enter__(self) -> "Hammer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(40)

    def refused(self) -> list:
        return [o for _, _, o in self.results if isinstance(o, Exception) and "refused" in str(o).lower()]

    def failed(self) -> list:
        return [o for _, _, o in self.results if o != 200]


def wait_gone(pids, timeout: float = 10.0) -> None:
    wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=timeout,
               message=f"processes {sorted(pids)} gone")


def base_config(root: Path, listen_port: int, worker_ports: list[int], **extra) -> dict:
    """A list-form config with fast checks, so tests converge quickly."""
    config = {
        "baseDirectory": str(root),
        "listen": f"127.0.0.1:{listen_port}",
        "workers": [{"host": "127.0.0.1", "port": p} for p in worker_ports],
        "gracefulTimeout": 5,
        "healthCheck": {"interval": 0.2, "timeout": 1.0, "rise": 2, "fall": 3, "bootTimeout": 15},
        "restartBackoff": {"initial": 0.2, "max": 2, "minUptime": 1},
    }
    config.update(extra)
    return config


def serving(directory: Path, root: Path, count: int, env: dict[str, str] | None = None, **extra) -> Master:
    """A master serving `root` with `count` local workers on kernel-picked ports, returned once
    every worker is up in its table (so the proxy sends it requests); `env`: added to its
    environment."""
    listen, *ports = free_ports(1 + count)
    m = Master(directory, base_config(root, listen, ports, **extra), env=env)
    try:
        m.wait_workers(ports)
        m.wait_log(r"is up \(", count=count)
    except BaseException:
        m.stop()
        raise
    return m


class Admin:
    """A master with an admin listener, and shortcuts to both of its ports."""

    def __init__(self, masters, directory: Path, site: Path, workers: int = 2, nofile: int | None = None,
                 **extra) -> None:
        self.port, self.admin_port, *self.worker_ports = free_ports(2 + workers)
        config = base_config(site, self.port, self.worker_ports, admin=f"127.0.0.1:{self.admin_port}", **extra)
        self.master = Master(directory, config, nofile=nofile)
        masters.append(self.master)

    def ready(self, timeout: float = 40.0) -> dict[int, int]:
        pids = self.master.wait_workers(self.worker_ports, timeout=timeout)
        wait_until(lambda: all(w["up"] for w in self.json()["workers"]), timeout=timeout,
                   message="every worker up in status.json")
        return pids

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10, **kw)

    def json(self) -> dict:
        for _ in range(100):  # the listener opens with the master
            try:
                return self.get("/status.json").json()
            except requests.ConnectionError:
                time.sleep(0.1)
        raise TimeoutError("admin listener never answered")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        text = self.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def public(self, path: str, **kw) -> requests.Response:
        return requests.get(f"http://127.0.0.1:{self.port}{path}", timeout=10, **kw)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def proxies_rss_kib(master_pid: int) -> int:
    """Resident set size of all the master's proxy processes together (they hold the client
    connections, their buffers and the front cache)."""
    pids = [p for p in children(master_pid) if title(p).startswith("gows: proxy")]
    assert pids, f"master {master_pid} has no proxy process"
    return sum(rss_kib(p) for p in pids)


def now() -> float:
    return time.monotonic()
