"""fileapp: an embeddable WSGI app that serves a directory, fast, with a TTL cache.

Cache policy (defaults): a response for a path is prepared once (header list, ETag, and for
files up to `cache_max_file_size` = 256 KiB the body bytes) and kept `cache_ttl` = 1 s in a
TTLCache bounded to `cache_max_bytes` = 64 MiB. While the entry lives, a hit does no filesystem
work at all; so a changed or deleted file is served stale for at most `cache_ttl` seconds. When
the entry expires, the next request resolves and opens the file again (symlink- and TOCTOU-safe)
and prepares a new entry from the open descriptor's fstat. Larger files are streamed from disk
(`wsgi.file_wrapper`, so gunicorn can sendfile); each such request reopens the file and checks
its (device, inode, size, mtime_ns) against the entry, so their Content-Length and ETag always
describe the bytes actually sent. `cache_ttl=0` or `cache_max_bytes=0` turns caching off.

Health: a request whose PATH_INFO equals `health_path` (default `/healthcheck`) is answered by
the health check *before* any file lookup, so it takes precedence over a file of the same name
under the root (a warning is logged at start when such a file exists). Pass `health_path=None`
to serve that file instead, or pick another path.
"""
from __future__ import annotations

from .app import DEFAULT_IMMUTABLE_PATTERN, FileApp, Health

__all__ = ["create_app", "FileApp", "Health", "DEFAULT_IMMUTABLE_PATTERN"]


def create_app(root: str, **options) -> FileApp:
    """A WSGI callable serving the files under `root`.

    Options (keyword only):
      app: a WSGI app to fall through to when no file matches (404, directory without index,
           methods other than GET/HEAD), making fileapp a middleware.
      prefix: URL prefix the files are served under, e.g. "/static" (default: the whole URL space);
           like health_path, written as it reads ("/stätic"), without '?', '#', '%' or spaces.
      index_names: file names served for a directory URL ending in "/" (default ("index.html",)).
      listing: directory listings when there is no index file (default False): HTML, or JSON
           on Accept: application/json, sorted by name, hidden entries left out, 1000 entries
           a page (fileapp.listing).
      fallback: a file under the root, e.g. "index.html", answering (200) the GET/HEAD of an
           unknown path whose Accept names text/html and whose last segment has no extension,
           as `try_files $uri /index.html` does for single-page apps (default None; fileapp.site).
      error_pages: {status: file under the root}, e.g. {"404": "404.html"}: the body of
           fileapp's own 4xx/5xx answers (404, 405, 412, 503); a missing or unreadable page
           leaves the built-in one (default None).
      headers: [{"match": "/assets/*", "set": {"Cache-Control": "..."}}]: headers set on the
           answers about the files and listings whose URL path matches the glob (fnmatch: `*`
           crosses "/"); hop-by-hop, framing and computed headers are refused (fileapp.headers).
      health_path: path of the health endpoint, or None for none (default "/healthcheck").
      cache_ttl, cache_max_bytes, cache_max_file_size: see the module docstring.
      etag: "mtime" (default: from the file's modification time and size, equal across hosts
           only where files were deployed with their mtimes, as `rsync -a` does) or "content"
           (a hash of the bytes, computed once per file version and kept: equal across hosts
           for equal bytes).
      max_age: Cache-Control max-age in seconds for ordinary files (default 60).
      immutable_pattern: regex (str or compiled) searched in a file's name; a match marks a
           content-hashed name served with "public, max-age=31536000, immutable"
           (default DEFAULT_IMMUTABLE_PATTERN, e.g. app.3f2a9c1b.js); None disables it.
      handoff_token: a secret; requests carrying it in `X-Gows-Handoff` (gows' proxy) get file
           bodies of 32 KiB and more as an `X-Gows-File` header naming the file, which the
           proxy sends itself (fileapp.handoff). gows' master sets it for its own workers.
      sendfile_header: "X-Accel-Redirect" (nginx) or "X-Sendfile" (Apache's mod_xsendfile), or
           None (default: fileapp sends every body). When set, a GET answered with a full 200 of
           32 KiB or more, to a request with no Range and no If-* header and without a
           Content-Encoding, gets the head with an empty body and this header naming the file,
           for the server in front to send; the rest (HEAD, 206, 304, 412, sidecars, small
           files) fileapp sends itself, as nginx and Apache would evaluate ranges and
           preconditions again against their own validators. X-Sendfile's value is the file's
           absolute real path, percent-encoded (mod_xsendfile decodes it by default).
           Only for servers every request comes through: a client reaching fileapp directly
           would get an empty body. See the README's "Embedding behind nginx / Apache".
      sendfile_prefix: for X-Accel-Redirect, the URI prefix of the nginx `internal` location
           that maps to `root` (default "/_fileapp/": `location /_fileapp/ { internal; alias
           /srv/www/; }`); the value is that prefix and the file's percent-encoded path below
           the root. Must start and end with "/".
      Bad values of either raise ValueError.
      compress: compress compressible files (text/*, JSON, JavaScript, SVG, XML, wasm...) of
           1 KiB up to cache_max_file_size without a precompressed sidecar on the fly, with zstd,
           brotli or gzip as the client's Accept-Encoding prefers (default True); once per file
           version and coding, kept in the cache (fileapp.compress). Ranges stay on identity.

    The returned FileApp also exposes `health` (set `health.draining = True` to fail health
    checks while shutting down), `cache` (`cache.stats()` gives hit/miss/evict counters) and
    `compressor` (`compressor.compressions` counts the bodies compressed on the fly).
    """
    return FileApp(root, **options)
