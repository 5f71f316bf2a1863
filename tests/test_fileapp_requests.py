"""fileapp.http1 in process: what reading a request and building its environ leaves behind."""
from __future__ import annotations

import gc

import pytest
from gunicorn.config import Config

from fileapp.http1 import RequestReader, base_environ, build_environ

pytestmark = pytest.mark.unit


def test_a_request_leaves_no_reference_cycle_for_the_garbage_collector(peers):
    """Each request freed by reference counting alone: a cycle per request (a Request and its
    wsgi.input pointing at each other) made the cyclic collector several per cent of a worker."""
    server, client = peers
    cfg = Config()
    reader = RequestReader(cfg, server, ("127.0.0.1", 1))
    base = base_environ(cfg)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector frees is kept in gc.garbage instead
    try:
        for _ in range(3):
            client.sendall(b"POST /u HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
            assert reader.receive()
            req = reader.next_request()
            environ = build_environ(req, reader, ("127.0.0.1", 1), ("127.0.0.1", 2), base)
            assert environ["wsgi.input"].read() == b"hello" and environ["PATH_INFO"] == "/u"
            del req, environ
        gc.collect()
        left = sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == []
