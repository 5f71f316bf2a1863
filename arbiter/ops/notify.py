"""systemd's sd_notify protocol without a dependency: datagrams to $NOTIFY_SOCKET.

The variable is taken out of the environment when read (as sd_notify's unset_environment), so
worker processes never inherit it and cannot speak for the master. Without it every call is a
no-op; a failed send is logged, never raised: the server runs on without systemd's view.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("gows.notify")


class Notifier:
    """Sends state changes (READY=1, RELOADING=1, STOPPING=1, STATUS=...) to systemd."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]  # abstract namespace
        elif address.startswith("/"):
            self.address = address
        elif address:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying systemd", address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send one notification made of `fields` (each "KEY=value"); True when it was sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)  # a datagram either fits the socket's queue now or is lost
                sock.connect(self.address)
                sock.sendall(message)
        except OSError as e:
            log.warning("cannot notify systemd (%s): %s", fields[0], e.strerror or e)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets Type=notify-reload units match this to the reload they asked for.
        return self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                         "STATUS=reloading the configuration")

    def stopping(self) -> bool:
        return self.send("STOPPING=1", "STATUS=stopping")
