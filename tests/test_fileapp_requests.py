"""fileapp.http1 in process: what reading a request and building its environ leaves behind."""
from __future__ import annotations

import gc

import pytest
from gunicorn.config import Config

from fileapp import http1
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


def test_header_names_remembered_are_bounded_and_every_name_is_still_read(peers):
    """The upper-case names the header policy reads are remembered by their bytes (the same few
    come in every request), up to a bound: clients may invent any number of names."""
    server, client = peers
    cfg = Config()
    reader = RequestReader(cfg, server, ("127.0.0.1", 1))
    base = base_environ(cfg)
    for batch in range(2 * http1._NAMES_KNOWN // 50):
        names = [f"x-Made-Up-{batch}-{i}" for i in range(50)]
        client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n"
                       + b"".join(b"%s: v\r\n" % n.encode() for n in names) + b"\r\n")
        assert reader.receive()
        environ = build_environ(reader.next_request(), reader, ("127.0.0.1", 1), ("127.0.0.1", 2), base)
        assert all(environ["HTTP_" + n.upper().replace("-", "_")] == "v" for n in names)
        assert len(http1._NAMES) <= http1._NAMES_KNOWN
    assert len(http1._NAMES) == http1._NAMES_KNOWN
