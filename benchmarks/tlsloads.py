"""Issue 13's loads: HTTPS against nginx with the same certificate and the same TLS profile
(Mozilla's intermediate), ab with a full handshake per request and wrk keep-alive over TLS.

The certificate is made for the run with the openssl command line (ECDSA P-256, as the tests'
trustme certificates): ab and wrk do not verify it, and neither server is asked to. Session
resumption plays no part: ab makes every connection without a session to resume, and wrk keeps
its connections open.
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterator

from . import loads
from .loads import Measurement
from .prereqs import FILES
from .servers import NAMES, Running

TLS_AB_TOOL = "ab TLS1.2"  # ab -f TLS1.2: a TLS 1.2 handshake for each of its requests
TLS_WRK_TOOL = "wrk TLS"  # wrk -t1 -c100 keep-alive over TLS 1.3
TLS_TOOLS = (TLS_AB_TOOL, TLS_WRK_TOOL)


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key, written to `directory`."""
    certificate, key = directory / "bench.crt", directory / "bench.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "7", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(certificate)],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return certificate, key


def planned() -> list[tuple[str, str]]:
    """The (tool, file label) of each row these loads add to a server, in the order they run."""
    return [(tool, FILES[0][2]) for tool in TLS_TOOLS]


def runs(server: Running, requests: int, concurrency: int, connections: int, seconds: int
         ) -> Iterator[tuple[str, str, Callable[[], Measurement]]]:
    """Each load as (tool, file label, a function running it once against `server`'s HTTPS port)."""
    name, _, label = FILES[0]
    yield TLS_AB_TOOL, label, lambda: loads.ab(server.https_url(name), requests, concurrency, protocol="TLS1.2")
    yield TLS_WRK_TOOL, label, lambda: loads.wrk(server.https_url(name), connections, seconds)


def notes(kinds: list[str], requests: int, concurrency: int, connections: int, seconds: int) -> list[str]:
    """The report's notes on these loads ([] when no server gets them)."""
    if not kinds:
        return []
    return [
        f"{TLS_AB_TOOL}: ab -f TLS1.2 -n {requests} -c {concurrency} over HTTPS (a full handshake per request); "
        f"{TLS_WRK_TOOL}: wrk -t1 -c{connections} -d{seconds}s --latency over HTTPS (keep-alive, TLS 1.3); both on "
        f"the {FILES[0][2]} file, for {', '.join(NAMES[k] for k in kinds)} (gows with its front cache on), after "
        "the plain loads, with one self-signed ECDSA P-256 certificate and Mozilla's intermediate profile on both "
        "servers (nginx: ssl_protocols TLSv1.2 TLSv1.3, the same cipher list, prefer_server_ciphers off, "
        "shared session cache, no tickets)",
    ]
