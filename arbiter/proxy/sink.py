"""What an upstream connection (upstream.py) tells whoever asked it for an answer: the sink's
protocol, the sink that drops an answer no one waits for any more, and how a request to a
worker fails."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ..state import WorkerState

if TYPE_CHECKING:
    from .upstream import UpstreamConnection


class UpstreamError(Exception):
    """Why a request to a worker failed; `status` is what the client gets if no retry helps.

    Only what the worker did (refused, reset, timed out, sent malformed bytes) is `passive`, a
    failure counted against it; the proxy's own troubles are not the worker's.
    """

    def __init__(self, reason: str, status: int = 502, passive: bool = False, stale: bool = False,
                 local: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.passive = passive  # counts as a passive failure of the worker (max_fails)
        self.stale = stale  # a reused keep-alive connection the worker had closed
        self.local = local  # the proxy ran short of descriptors or memory


class ResponseSink(Protocol):
    """Who asked for a connection and receives the response on it (the proxy's Relay)."""

    def wants(self, worker: WorkerState) -> bool: ...
    def may_resend(self) -> bool: ...
    def pipelinable(self) -> bool: ...
    def start(self, conn: UpstreamConnection) -> None: ...
    def start_behind(self, conn: UpstreamConnection) -> None: ...
    def requeue(self) -> None: ...
    def upstream_head(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...
    def upstream_body(self, data: bytes) -> None: ...
    def upstream_done(self, conn: UpstreamConnection) -> None: ...
    def upstream_failed(self, conn: UpstreamConnection | None, error: UpstreamError) -> None: ...
    def abort(self) -> None: ...


class _Discard:
    """The sink of a pipelined request whose client left: its answer is read and dropped."""

    def wants(self, worker: WorkerState) -> bool:
        return False

    def may_resend(self) -> bool:
        return False

    def pipelinable(self) -> bool:
        return False

    def start(self, conn: UpstreamConnection) -> None:
        pass

    start_behind = start

    def requeue(self) -> None:
        pass

    def upstream_head(self, conn: UpstreamConnection, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        pass

    def upstream_body(self, data: bytes) -> None:
        pass

    def upstream_done(self, conn: UpstreamConnection) -> None:
        pass

    def upstream_failed(self, conn: UpstreamConnection | None, error: UpstreamError) -> None:
        pass

    def abort(self) -> None:
        pass


DISCARD = _Discard()


class MalformedResponse(Exception):
    """Raised in a parser callback: the worker's response breaks HTTP in a way httptools allows."""
