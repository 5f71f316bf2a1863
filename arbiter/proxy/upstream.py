"""One keep-alive connection to a worker: it sends requests, parses the responses with httptools
and hands each to the `ResponseSink` (a relay) that asked, telling the worker's failures
(refused, reset, timed out, malformed) from the proxy's own.

To a local worker (over its Unix socket: a gows worker, which answers pipelined requests in
order) a connection carries up to PIPELINE_DEPTH GETs at once: the requests behind the one being
answered are written at once (those of one turn of the event loop in one write), so the worker
reads several in one recv and wakes once for them, and their answers come back in one read. A
request behind never waits long on another: when the answer under way must stop for its slow
client, or takes longer than PIPELINE_PATIENCE (a slow disk, a long body), those behind go to
other connections."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from httptools import HttpParserCallbackError, HttpParserError, HttpResponseParser

from ..state import WorkerState
from .sink import DISCARD, MalformedResponse, ResponseSink, UpstreamError

if TYPE_CHECKING:
    from .pool import UpstreamPool


log = logging.getLogger("gows.proxy")

# Requests in flight on one connection to a local worker: the one being answered and those
# pipelined behind it (each waits at most for the answers in front, all of them small: bodies
# of local files are named, not sent, fileapp.handoff).
PIPELINE_DEPTH = 16
# Seconds an answer may take before the requests pipelined behind it go to other connections
# (checked every proxy tick): the worker answers them on its other threads meanwhile.
PIPELINE_PATIENCE = 0.5
# Bytes a worker may send in a row that carry nothing for the client: before the head of its
# answer is complete (interim 1xx heads included), or after body bytes (trailer fields, chunk
# framing). Past it the answer is malformed (nginx answers "upstream sent too big header" past
# proxy_buffer_size, 4-8 KiB; Go's Transport fails past MaxResponseHeaderBytes). What the parser
# holds of a head or a trailer field is so at most this and one read.
MAX_RESPONSE_HEAD = 65536


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a worker: the request being answered, and to a local worker
    up to PIPELINE_DEPTH - 1 GETs pipelined behind it."""

    __slots__ = ("pool", "worker", "transport", "parser", "sink", "headers", "head_done", "head_only",
                 "interim", "until_close", "keep", "reused", "idle_since", "deadline", "paused", "closed", "active",
                 "incarnation", "behind", "retiring", "alone", "outbox", "answering_since", "spent",
                 "overrun", "overhead")

    def __init__(self, pool: UpstreamPool, worker: WorkerState) -> None:
        self.pool = pool
        self.worker = worker
        self.transport: Any = None
        self.parser = HttpResponseParser(self)
        self.sink: ResponseSink | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.head_only = False
        self.interim = False
        self.until_close = False
        self.keep = False
        self.reused = False
        self.idle_since = 0.0
        self.deadline = 0.0
        self.paused = False
        self.closed = False
        self.active = False  # counted in its worker's connections (busy or connecting)
        # The worker's process when this connection was made: a reload's new process shares the
        # port, and a connection to the old one (about to drain, serving the old settings) is
        # never reused.
        self.incarnation = worker.pid
        self.behind: deque[ResponseSink] = deque()  # pipelined requests, in the order sent
        self.retiring = False  # takes no more requests: closed once the current answer ends
        self.alone = True  # the request being answered takes none behind it (a HEAD, a body)
        self.outbox: list[bytes] = []  # requests behind, written together at the loop's next turn
        self.answering_since = 0.0  # when the answer under way began to be awaited
        # An answer that ends within a read is settled (the connection back to the pool, then
        # its sink told: `spent`) only once the whole read is parsed, and the connection closed
        # instead when bytes followed that answer in it (`overrun`): bytes the worker sent before
        # any request asked for them (a HEAD answered with a body, a body longer than its
        # Content-Length) would otherwise answer the next request sent on it, another client's.
        self.spent: ResponseSink | None = None
        self.overrun = False
        self.overhead = 0  # received since the answer was awaited or body bytes last came (MAX_RESPONSE_HEAD)

    # -- driving a request ----------------------------------------------------------------
    def send(self, sink: ResponseSink, head: bytes, body: bytes | None, head_only: bool) -> None:
        """Write one prepared request (its head, then its body as received) and relay its
        response to `sink`."""
        self.sink = sink
        self.headers = []
        self.head_done = False
        self.overhead = 0
        self.head_only = head_only
        self.until_close = False
        self.alone = head_only or body is not None
        pool = self.pool
        self.answering_since = pool.proxy.clock
        self.deadline = pool.proxy.clock + pool.proxy.config.response_timeout
        pool.busy.add(self)
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)

    def takes_more(self) -> bool:
        """Whether a GET may be pipelined behind the request being answered now."""
        return (self.sink is not None and not self.alone and not self.paused and not self.closed
                and not self.retiring and not self.until_close and (self.keep or not self.head_done)
                and len(self.behind) < PIPELINE_DEPTH - 1)

    def send_behind(self, sink: ResponseSink, head: bytes) -> None:
        """Write a GET (no body) behind the requests in flight; `sink` gets its answer in turn."""
        self.behind.append(sink)
        outbox = self.outbox
        outbox.append(head)
        if len(outbox) == 1:
            self.pool.proxy.loop.call_soon(self._write_outbox)

    def _write_outbox(self) -> None:
        """Write the requests sent behind in this turn of the loop, together (none if they went
        elsewhere meanwhile)."""
        outbox, self.outbox = self.outbox, []
        if outbox and not self.closed and not self.retiring:
            self.transport.write(b"".join(outbox))

    def detach(self, sink: ResponseSink | None = None) -> None:
        """`sink`'s client went away: if it was being answered, this connection's stream is
        unusable (those behind it go elsewhere); if it waited behind, its answer is dropped."""
        if sink is not None and sink is not self.sink:
            self.behind = deque(DISCARD if queued is sink else queued for queued in self.behind)
            return
        self.sink = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.abort()
            self._requeue_behind()

    def stalled(self, now: float) -> bool:
        """Whether requests wait behind an answer that has taken longer than PIPELINE_PATIENCE."""
        return bool(self.behind) and now - self.answering_since > PIPELINE_PATIENCE

    def unpipe(self) -> None:
        """Send the requests behind to other connections; this one takes no more and closes once
        its answer under way ends."""
        if self.behind:
            self.retiring = True
            self.pool.forget_pipe(self)
            self._requeue_behind()

    def _requeue_behind(self) -> None:
        """The requests behind will not be answered here: each goes out again on a connection of
        its own (the worker answered none of them; if it read them, answering again is harmless:
        GETs)."""
        behind, self.behind = self.behind, deque()
        for sink in behind:
            sink.requeue()

    def pause(self, sink: ResponseSink | None = None) -> None:
        """Stop reading the worker (the client of the answer under way reads slower); those
        pipelined behind go elsewhere rather than wait for that client."""
        if sink is not None and sink is not self.sink:
            return  # (its answer has not begun: it pauses this when it does, upstream_head)
        self.unpipe()
        if not self.paused and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self, sink: ResponseSink | None = None) -> None:
        if sink is not None and sink is not self.sink:
            return
        if self.paused:
            self.paused = False
            # The response timeout counts the worker's silence, not the client's.
            self.deadline = self.pool.proxy.clock + self.pool.proxy.config.response_timeout
            if not self.closed:
                self.transport.resume_reading()

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.idle_since = self.pool.proxy.clock  # unused until the first request is sent

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:  # nothing asked: a stray or late response, never relay it
            self.close()
            return
        self.overhead += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserCallbackError as exc:
            self._settle(False)
            cause = exc.__context__
            if isinstance(cause, MalformedResponse):
                self._fail(UpstreamError(f"malformed response from worker: {cause}", passive=True))
            else:  # a bug of the proxy's, in relaying: visible, and no failure of the worker
                log.error("proxy error while relaying a response", exc_info=cause or exc)
                self._proxy_error()
            return
        except HttpParserError:
            self._settle(False)
            self._fail(UpstreamError("malformed response from worker", passive=True))
            return
        if self.spent is not None:
            self._settle(not self.overrun)
            return
        if self.overhead > MAX_RESPONSE_HEAD:
            what = "trailer section" if self.head_done else "response head"
            self._fail(UpstreamError(f"{what} from worker over {MAX_RESPONSE_HEAD} bytes", passive=True))
            return
        if not self.head_done:
            # (the deadline to start the answer stands: neither interim answers nor a head sent a
            # byte at a time push it back)
            return
        self.deadline = self.pool.proxy.clock + self.pool.proxy.config.response_timeout

    def _settle(self, reusable: bool) -> None:
        """The read is parsed: the answer that ended in it (if any) is settled, its connection
        back to the pool when `reusable` (nothing followed the answer), else closed."""
        sink, self.spent = self.spent, None
        if sink is None:
            return
        if reusable and not self.closed:
            self.pool.release(self)
        else:
            self.close()
        sink.upstream_done(self)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        already = self.closed
        self.closed = True
        self.parser = None  # its callbacks are our methods: a cycle no longer needed
        self.pool.forget(self)
        self._requeue_behind()  # (answered by no one: not the worker's failure, nor theirs)
        sink = self.sink
        if sink is None or already:
            return
        if self.head_done and self.until_close and exc is None:  # the body was delimited by the close
            self._complete()
            return
        # (a reset ends such a body short: relayed as whole, it would reach the client, and the
        # front cache, with its last chunk)
        if self.head_done:
            how = "reset the connection" if exc is not None else "closed the connection"
            self._fail(UpstreamError(f"worker {how} mid-response", passive=True))
        elif self.reused or self.incarnation != self.worker.pid:
            # A pooled connection the worker had closed (or a new one this proxy was too late
            # to use: pool.REUSE_WITHIN), or one that reached a process the master has replaced
            # since (its draining process, at a reload): not the fault of the worker now
            # serving, and worth a fresh connection to it.
            self._fail(UpstreamError("stale connection", stale=True))
        else:
            reason = "connection reset by worker" if exc is not None else "worker closed the connection"
            self._fail(UpstreamError(reason, passive=True))

    def pause_writing(self) -> None:  # request bodies are bounded and written at once
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.sink is None:  # an answer no request was sent for (see `spent`)
            self.overrun = True

    def on_header(self, name: bytes, value: bytes) -> None:
        # Trailer fields (after the head) are dropped: never merged into the head, which the
        # front cache may keep and repeat (RFC 9110 6.5.1).
        if not self.head_done:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            # 100 Continue / 103 Early Hints: the request body was sent whole, so skip them.
            if status == 101:
                raise MalformedResponse("unexpected protocol switch")
            self.interim = True
            self.headers = []
            return
        self.head_done = True
        sink = self.sink
        if sink is None:
            return
        self.keep = parser.should_keep_alive()
        sink.upstream_head(self, status, self.headers)
        if self.head_only and self.sink is not None:
            # httptools cannot be told a response answers HEAD, so it would wait for a body
            # that never comes; a fresh parser serves the next request on this connection.
            self.parser = HttpResponseParser(self)
            self._complete()

    def on_body(self, body: bytes) -> None:
        self.overhead = 0
        sink = self.sink
        if sink is not None:
            sink.upstream_body(body)
        else:  # a body after its answer ended (a HEAD's: the old parser, on_headers_complete)
            self.overrun = True

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.sink is not None:
            self._complete()

    # -- outcomes -------------------------------------------------------------------------
    def _complete(self) -> None:
        sink = self.sink
        self.sink = None
        pool = self.pool
        if self.behind:
            if self.keep and not self.closed and not self.until_close and not self.retiring:
                # The next answer on the stream is the next request's.
                self.sink = self.behind.popleft()
                self.headers = []
                self.head_done = False
                self.overhead = 0
                self.until_close = False
                self.alone = False
                self.answering_since = pool.proxy.clock
                self.deadline = pool.proxy.clock + pool.proxy.config.response_timeout
            else:  # the worker closes it (or it retires): the rest go out again elsewhere
                self.close()
            if sink is not None:
                sink.upstream_done(self)
            return
        pool.busy.discard(self)
        # Back in the pool first, so the client's next request can reuse this very connection:
        # once the rest of the read it ended in (an answer that keeps its connection ends only
        # in a parser callback) proved to hold nothing more (_settle).
        if self.keep and not self.closed and not self.until_close and not self.retiring:
            self.spent = sink if sink is not None else DISCARD
            self.overrun = False
            return
        self.close()
        if sink is not None:
            sink.upstream_done(self)

    def abandon(self, error: UpstreamError) -> None:
        """Give up waiting for this connection's answer (its worker is out): close it and tell
        the sink, which may retry elsewhere."""
        self._fail(error)

    def _fail(self, error: UpstreamError) -> None:
        sink = self.sink
        self.sink = None
        self.close()
        if sink is not None:
            sink.upstream_failed(self, error)

    def _proxy_error(self) -> None:
        """The proxy itself failed mid-relay: end both connections, charge no one else."""
        sink = self.sink
        self.sink = None
        self.close()
        if sink is not None:
            sink.abort()
