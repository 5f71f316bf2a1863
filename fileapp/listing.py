"""Directory listings (`listing=True`): an HTML page, or JSON on `Accept: application/json`,
of a directory that has no index file, showing exactly what fileapp would serve.

Bounded whatever the directory holds: the names are streamed from os.scandir and only one page
(PAGE_SIZE entries) is ever kept, chosen with a heap of that size; the pages are linked by the
name they start after (`?after=NAME`) or end before (`?before=NAME`), not by number, so page
50 costs what page 1 does. Each listing reads the whole directory once (to count and order
it), which takes a thread a fraction of a second for 100,000 entries; at most
LISTINGS_AT_ONCE run at a time in a process, so listings never occupy all of a worker's
threads (others get 503 with Retry-After).
"""
from __future__ import annotations

import heapq
import html
import json
import os
import stat
import threading
import time
from typing import Iterator, NamedTuple
from urllib.parse import parse_qs, quote

from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from .files import Resolver

PAGE_SIZE = 1000
LISTINGS_AT_ONCE = 2

Response = tuple[str, list[tuple[str, str]], bytes]


class Item(NamedTuple):
    """One listed name; size and mtime are read only for the entries of the page shown."""

    name: str
    is_dir: bool


class Page(NamedTuple):
    items: list[tuple[Item, int | None, float | None]]  # (item, size or None, mtime or None)
    offset: int  # how many visible entries sort before the first one shown
    total: int  # visible entries in the directory


def _visible(resolver: Resolver, parts: list[str], entry: os.DirEntry) -> Item | None:
    """The entry as listed, or None when fileapp would not serve it: hidden (dot) names, names
    no URL can reach (not UTF-8, backslash), FIFOs, sockets, devices, and symlinks leading
    outside the root, to a hidden name or to anything but a file or a directory."""
    name = entry.name
    if name[0] == "." or "\\" in name:
        return None
    try:
        name.encode("utf-8")
    except UnicodeError:  # surrogate-escaped bytes: not UTF-8
        return None
    try:
        if entry.is_symlink():
            if resolver.real_parts(parts + [name]) is None:
                return None
            mode = entry.stat().st_mode
            if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                return Item(name, stat.S_ISDIR(mode))
            return None
        if entry.is_dir(follow_symlinks=False):
            return Item(name, True)
        if entry.is_file(follow_symlinks=False):
            return Item(name, False)
    except OSError:
        pass
    return None


def read_page(resolver: Resolver, fd: int, parts: list[str], after: str | None,
              before: str | None) -> Page:
    """The page of the directory open at `fd` (real path `parts`) starting after `after`, or
    ending before `before`, or the first; memory is bounded by PAGE_SIZE, not by the directory."""
    counts = {"total": 0, "lower": 0}
    bound = after if after is not None else before

    def candidates() -> Iterator[Item]:
        with os.scandir(fd) as it:
            for entry in it:
                item = _visible(resolver, parts, entry)
                if item is None:
                    continue
                counts["total"] += 1
                if bound is not None and (item.name <= bound if after is not None
                                          else item.name < bound):
                    counts["lower"] += 1
                    if after is not None:
                        continue
                elif before is not None:
                    continue
                yield item

    if before is not None:
        chosen = sorted(heapq.nlargest(PAGE_SIZE, candidates()))
        offset = counts["lower"] - len(chosen)
    else:
        chosen = heapq.nsmallest(PAGE_SIZE, candidates())
        offset = counts["lower"]
    items = []
    for item in chosen:
        try:
            st = os.stat(item.name, dir_fd=fd)
            items.append((item, None if item.is_dir else st.st_size, st.st_mtime))
        except OSError:  # gone meanwhile: still listed, without details
            items.append((item, None, None))
    return Page(items, offset, counts["total"])


def wants_json(environ: dict) -> bool:
    """Whether the client prefers application/json to text/html (ties go to HTML)."""
    accept = environ.get("HTTP_ACCEPT")
    if not accept:
        return False
    chosen = parse_accept_header(accept, MIMEAccept).best_match(["text/html", "application/json"])
    return chosen == "application/json"


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


def _when(mtime: float | None) -> str:
    return "" if mtime is None else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(mtime))


def _links(page: Page) -> tuple[str | None, str | None]:
    """The query strings of the previous and next pages, None where there is none."""
    prev = nxt = None
    if page.items and page.offset > 0:
        prev = "?before=" + quote(page.items[0][0].name, safe="")
    if page.items and page.offset + len(page.items) < page.total:
        nxt = "?after=" + quote(page.items[-1][0].name, safe="")
    return prev, nxt


def as_json(url_path: str, page: Page) -> bytes:
    prev, nxt = _links(page)
    entries = [{"name": item.name, "type": "directory" if item.is_dir else "file",
                "size": size, "modified": _when(mtime) or None}
               for item, size, mtime in page.items]
    return json.dumps({"path": url_path, "total": page.total, "offset": page.offset,
                       "pageSize": PAGE_SIZE, "entries": entries, "previous": prev,
                       "next": nxt}, ensure_ascii=False).encode()


_STYLE = ("body{font:15px/1.5 system-ui,sans-serif;margin:2em auto;max-width:60em;padding:0 1em}"
          "table{border-collapse:collapse;width:100%}th,td{padding:.2em .8em;text-align:left}"
          "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}tr:nth-child(even){background:#f4f4f4}"
          "nav a{margin-right:1em}")


def as_html(url_path: str, page: Page, parent: bool) -> bytes:
    title = html.escape(url_path)
    prev, nxt = _links(page)
    first, last = page.offset + 1, page.offset + len(page.items)
    summary = (f"{page.total:,} entries, sorted by name" if page.total <= PAGE_SIZE
               else f"{page.total:,} entries, sorted by name, {PAGE_SIZE:,} per page: "
                    f"showing {first:,}\u2013{last:,}")
    nav = "".join((f'<a href="{html.escape(prev)}" rel="prev">\u2190 previous</a>' if prev else "",
                   f'<a href="{html.escape(nxt)}" rel="next">next \u2192</a>' if nxt else ""))
    rows = []
    if parent:
        rows.append('<tr><td><a href="../">../</a> (parent)</td><td></td><td></td></tr>')
    for item, size, mtime in page.items:
        suffix = "/" if item.is_dir else ""
        href = html.escape("./" + quote(item.name.encode("utf-8"), safe="") + suffix)
        shown = html.escape(item.name + suffix)
        size_cell = "" if size is None else f'<span title="{size:,} bytes">{_human(size)}</span>'
        rows.append(f'<tr><td><a href="{href}">{shown}</a></td><td class="n">{size_cell}</td>'
                    f"<td>{_when(mtime)}</td></tr>")
    return (f'<!doctype html>\n<html lang="en"><meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>Index of {title}</title><style>{_STYLE}</style>\n"
            f"<h1>Index of {title}</h1>\n<p id=\"summary\">{summary}</p>\n"
            + (f"<nav>{nav}</nav>\n" if nav else "")
            + '<table id="listing"><thead><tr><th>Name</th><th class="n">Size</th><th>Modified (UTC)</th>'
            "</tr></thead><tbody>\n" + "\n".join(rows) + "\n</tbody></table>\n"
            + (f"<nav>{nav}</nav>\n" if nav else "") + "</html>\n").encode()


class Lister:
    """Renders listings, at most LISTINGS_AT_ONCE at a time."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.slots = threading.BoundedSemaphore(LISTINGS_AT_ONCE)  # one per listing under way

    def render(self, environ: dict, parts: list[str], url_path: str) -> Response | None:
        """The listing of the directory at URL segments `parts` (shown as `url_path`); None
        when it is not a directory fileapp may list; a 503 while others are being listed."""
        if not self.slots.acquire(blocking=False):
            return _BUSY
        try:
            real = self.resolver.real_parts(parts)
            opened = self.resolver.open(parts) if real is not None else None
            if opened is None:
                return None
            try:
                if not opened.is_dir:
                    return None
                query = parse_qs(environ.get("QUERY_STRING", ""))
                after = query.get("after", [None])[0]
                before = None if after is not None else query.get("before", [None])[0]
                page = read_page(self.resolver, opened.fd, real, after, before)
            except OSError:
                return None
            finally:
                os.close(opened.fd)
        finally:
            self.slots.release()
        if wants_json(environ):
            body, ctype = as_json(url_path, page), "application/json"
        else:
            body, ctype = as_html(url_path, page, bool(parts)), "text/html; charset=utf-8"
        return "200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body))),
                          ("Cache-Control", "no-cache"), ("Vary", "Accept")], body


_BUSY_TEXT = b"503 other directory listings are being produced, retry\n"
_BUSY = ("503 Service Unavailable", [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Content-Length", str(len(_BUSY_TEXT))),
                                     ("Retry-After", "1"), ("Cache-Control", "no-store")], _BUSY_TEXT)
