"""WSGI entry points for the Python peers, loaded by gunicorn as `benchmarks.apps:NAME('/root')`."""
from __future__ import annotations

from typing import Callable, Iterable

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def not_found(environ: dict, start_response: Callable) -> Iterable[bytes]:
    """The app behind the file middlewares: every request they do not serve is a 404."""
    body = b"Not Found\n"
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def fileapp_app(root: str) -> WSGIApp:
    """gows' own file app, as each worker runs it."""
    import fileapp

    return fileapp.create_app(root)


def whitenoise_app(root: str) -> WSGIApp:
    """WhiteNoise serving `root` (files indexed once at start, as in production)."""
    from whitenoise import WhiteNoise

    return WhiteNoise(not_found, root=root, autorefresh=False)


def werkzeug_app(root: str) -> WSGIApp:
    """Werkzeug's SharedDataMiddleware serving `root` at the URL root."""
    from werkzeug.middleware.shared_data import SharedDataMiddleware

    return SharedDataMiddleware(not_found, {"/": root})
