"""Driving a real `python -m arbiter` in integration tests: config, log, worker pids, ports."""
from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import requests

from support import PYTHON, pid_alive, python_env, stop_process, wait_until


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


def health(port: int, timeout: float = 2.0) -> int | None:
    """Status of GET /healthcheck on a worker port, None when the request fails."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthcheck", timeout=timeout).status_code
    except requests.RequestException:
        return None


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")[0].decode(errors="replace")
    except FileNotFoundError:
        return ""


class Master:
    """A `python -m arbiter` started by a test, with its config file and log in `directory`."""

    def __init__(self, directory: Path, config: dict, name: str = "gows.conf.json") -> None:
        self.directory = directory
        self.config_path = directory / name
        self.log_path = directory / "master.log"
        self.write_config(config)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([PYTHON, "-m", "arbiter", "-c", str(self.config_path)],
                                     cwd=directory, env=python_env(), stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.seen_workers: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def write_config(self, config: dict) -> None:
        self.config_path.write_text(json.dumps(config, indent=2))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 20.0) -> str:
        wait_until(lambda: self.count(pattern) >= count, timeout=timeout,
                   message=f"{count} x {pattern!r} in the master's log:\n{self.log()[-3000:]}")
        return self.log()

    def workers(self) -> dict[int, int]:
        """{port: pid} of the master's live worker processes, from their process titles."""
        out = {}
        for pid in children(self.pid):
            m = re.fullmatch(r"gows: worker :(\d+)", title(pid))
            if m and pid_alive(pid):
                out[int(m.group(1))] = pid
                self.seen_workers.add(pid)
        return out

    def wait_workers(self, ports: list[int], timeout: float = 30.0) -> dict[int, int]:
        """Wait until exactly `ports` have a worker process answering 200 on its health path."""
        def ready():
            found = self.workers()
            if sorted(found) != sorted(ports):
                return None
            return found if all(health(p) == 200 for p in ports) else None
        return wait_until(ready, timeout=timeout, interval=0.1,
                          message=f"workers on {ports} (log:\n{self.log()[-3000:]})")

    def stop(self) -> None:
        self.workers()
        stop_process(self.proc, timeout=30)
        self._log.close()
        # Only processes this test's master started; they should be gone already.
        for pid in self.seen_workers:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


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


def now() -> float:
    return time.monotonic()
