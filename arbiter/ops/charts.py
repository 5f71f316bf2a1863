"""The status page's pictures: small line charts of the last 5 minutes, rendered by the server
as inline SVG (no script, no external asset; the page's CSS colours them).

Each chart carries its meaning as text too (an SVG <title>/<desc> for screen readers and a
one-line summary under it), so it reads the same without the picture. Every text is escaped,
and a chart never holds more than POINTS points, whatever it is given.
"""
from __future__ import annotations

import math
from html import escape
from typing import Callable, Sequence

from ..proxy.stats import Second

SPAN = 300.0  # seconds shown: the last 5 minutes
POINTS = 300  # at most this many points per chart (one a second)
WIDTH, HEIGHT = 300.0, 90.0  # the viewBox; the page scales it to its column
TOP, BOTTOM = 14.0, 76.0  # the plot's band inside it: labels above and below


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above `value` (a round top for the axis)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return step * power
    return 10 * power


def _path(points: Sequence[tuple[float, float | None]], top: float) -> str:
    """An SVG path through (age, value) points, broken where a value is None (no data then)."""
    parts, pen_down = [], False
    for age, value in points:
        if value is None:
            pen_down = False
            continue
        x = WIDTH * (1 - age / SPAN)
        y = BOTTOM - (BOTTOM - TOP) * min(value, top) / top
        parts.append(f"{'L' if pen_down else 'M'}{x:.1f} {y:.1f}")
        pen_down = True
    return " ".join(parts)


def line_chart(key: str, title: str, points: Sequence[tuple[float, float | None]],
               fmt: Callable[[float], str]) -> str:
    """A <figure> with an inline SVG line chart of `points` ((seconds ago, value or None), oldest
    first) over the last SPAN seconds, and its summary as text: the latest value, the peak and the
    mean. `key` names its elements (ids), `fmt` formats a value with its unit."""
    shown = [(age, v if v is None or math.isfinite(v) else None) for age, v in points if 0 <= age <= SPAN]
    shown = shown[-POINTS:]
    values = [v for _, v in shown if v is not None]
    top = _nice_ceiling(max(values, default=0.0))
    title_id, desc_id = f"chart-{key}-t", f"chart-{key}-d"
    if values:
        summary = (f"now {fmt(values[-1])}, peak {fmt(max(values))}, mean {fmt(sum(values) / len(values))} "
                   "in the last 5 minutes")
        plot = f'<path class="line" d="{_path(shown, top)}"/>'
    else:
        summary = "no data in the last 5 minutes"
        plot = (f'<text class="empty" x="{WIDTH / 2:.0f}" y="{(TOP + BOTTOM) / 2 + 4:.0f}" '
                f'text-anchor="middle">no data yet</text>')
    grid = "".join(f'<line class="grid" x1="0" x2="{WIDTH:.0f}" y1="{y:.1f}" y2="{y:.1f}"/>'
                   for y in (TOP, (TOP + BOTTOM) / 2, BOTTOM))
    return (f'<figure class="chart" id="chart-{escape(key)}">'
            f'<figcaption>{escape(title)}</figcaption>'
            f'<svg viewBox="0 0 {WIDTH:.0f} {HEIGHT:.0f}" role="img" aria-labelledby="{escape(title_id)} '
            f'{escape(desc_id)}">'
            f'<title id="{escape(title_id)}">{escape(title)}, last 5 minutes</title>'
            f'<desc id="{escape(desc_id)}">{escape(summary)}</desc>'
            f'{grid}{plot}'
            f'<text class="axis" x="2" y="{TOP - 4:.0f}">{escape(fmt(top))}</text>'
            f'<text class="axis" x="2" y="{HEIGHT - 2:.0f}">5 min ago</text>'
            f'<text class="axis" x="{WIDTH - 2:.0f}" y="{HEIGHT - 2:.0f}" text-anchor="end">now</text>'
            f'</svg><p class="summary">{escape(summary)}</p></figure>')


def traffic_charts(history: Sequence[Second], rate: Callable[[float], str], latency: Callable[[float], str]) -> str:
    """The status page's two charts, requests/s and p99 latency, from the admin sampler's history."""
    return (line_chart("rate", "Requests/s", [(s.age, s.rate) for s in history], rate)
            + line_chart("p99", "p99 latency", [(s.age, s.p99) for s in history], latency))


CSS = """
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:8px;margin:8px 0 0}
.chart{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 10px}
.chart figcaption{font-size:.8em;color:var(--mute)}
.chart svg{display:block;width:100%;height:auto;margin:4px 0}
.chart .line{fill:none;stroke:var(--up);stroke-width:1.5;stroke-linejoin:round}
.chart .grid{stroke:var(--line);stroke-width:.6}
.chart text{fill:var(--mute);font-size:9px;font-family:inherit}
.chart .summary{margin:0;font-size:.8em;color:var(--mute);font-variant-numeric:tabular-nums}
"""
