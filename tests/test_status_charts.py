"""The status page's charts: the master's ring of one-second samples (Window.history) and the
server-rendered SVG of requests/s and p99 latency (arbiter/ops/charts.py)."""
from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

from arbiter.ops import charts, status_page
from arbiter.proxy.stats import BOUNDS, RequestStats, Second, Window

pytestmark = pytest.mark.unit


def count(stats: RequestStats, seconds: float, n: int = 1) -> None:
    """Count `n` responses of `seconds` each, as the proxy does in line (slot ns.bit_length())."""
    ns = int(seconds * 1e9)
    stats.counts[ns.bit_length()] += n
    stats.counts[-1] += n * ns


@pytest.fixture
def ticking():
    clock = [1000.0]
    stats = RequestStats()
    return clock, stats, Window(stats, clock=lambda: clock[0])


def test_history_gives_each_seconds_rate_and_p99_oldest_first(ticking):
    clock, stats, window = ticking
    count(stats, 0.001, 50)  # second 1: 50 fast responses
    clock[0] += 1
    window.sample()
    clock[0] += 1  # second 2: nothing
    window.sample()
    count(stats, 0.001, 99)  # second 3: 99 fast, 1 slow: its p99 is in the fast bucket, the max is not
    count(stats, 0.5, 1)
    clock[0] += 2  # a late sampler: the rate is per second of the interval
    window.sample()
    clock[0] += 0.5
    first, quiet, third = window.history()
    assert first.rate == 50 and first.age == 3.5 and BOUNDS[5] < first.p99 <= BOUNDS[7]
    assert quiet == Second(age=2.5, rate=0.0, p99=None)
    assert third.rate == 50 and third.age == 0.5 and third.p99 <= BOUNDS[7]


def test_the_ring_keeps_five_minutes_of_samples_and_no_more(ticking):
    clock, stats, window = ticking
    for _ in range(1000):
        count(stats, 0.002, 3)
        clock[0] += 1
        window.sample()
    history = window.history()
    assert len(window.samples) == 302 and len(history) == 301
    assert history[0].age == 300 and history[-1].age == 0 and {s.rate for s in history} == {3.0}


class _Svg(HTMLParser):
    """What a browser would find in a chart fragment: its tags, texts and path commands."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.texts: list[str] = []
        self.paths: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "path":
            self.paths.append(dict(attrs)["d"])

    def handle_data(self, data):
        if data.strip():
            self.texts.append(data)


def parse(html: str) -> _Svg:
    svg = _Svg()
    svg.feed(html)
    return svg


def ms(v: float) -> str:
    return f"{v * 1000:.1f} ms"


def test_a_chart_is_inline_svg_with_its_summary_as_text():
    points = [(300 - i, float(i)) for i in range(301)]  # one more than a chart holds: the oldest goes
    html = charts.line_chart("rate", "Requests/s", points, lambda v: f"{v:g} req/s")
    svg = parse(html)
    assert svg.tags[:3] == ["figure", "figcaption", "svg"] and "title" in svg.tags and "desc" in svg.tags
    assert "now 300 req/s, peak 300 req/s, mean 150.5 req/s in the last 5 minutes" in svg.texts
    assert "500 req/s" in svg.texts  # the axis' round top
    (d,) = svg.paths
    xs = [float(x) for x in re.findall(r"[ML]([\d.]+) ", d)]
    assert xs[0] == 1.0 and xs[-1] == charts.WIDTH and xs == sorted(xs) and len(xs) == charts.POINTS
    assert "script" not in html and "href" not in html and "http" not in html


def test_a_chart_escapes_every_text():
    html = charts.line_chart('x"><script>', "<b>&", [(1.0, 2.0)], lambda v: "<i>")
    assert "<script>" not in html and "<b>" not in html and "<i>" not in html
    assert "&lt;b&gt;&amp;" in html and "&lt;i&gt;" in html and 'id="chart-x&quot;&gt;&lt;script&gt;"' in html


def test_a_chart_without_data_says_so():
    for points in ([], [(5.0, None), (4.0, None)], [(400.0, 7.0)]):  # none, all quiet, all too old
        svg = parse(charts.line_chart("p99", "p99 latency", points, ms))
        assert svg.paths == [] and "no data yet" in svg.texts and "no data in the last 5 minutes" in svg.texts


def test_a_chart_breaks_its_line_where_a_second_had_no_data():
    (d,) = parse(charts.line_chart("p99", "p99", [(3.0, 0.001), (2.0, None), (1.0, 0.002), (0.0, 0.004)], ms)).paths
    assert d.count("M") == 2 and d.count("L") == 1


def test_a_chart_is_bounded_whatever_it_is_given():
    points = [(i / 100, float(i % 17)) for i in range(30000, -1, -1)]  # 30,001 points in 5 minutes
    (d,) = parse(charts.line_chart("rate", "r", points, str)).paths
    assert d.count("M") + d.count("L") == charts.POINTS
    (d,) = parse(charts.line_chart("rate", "r", [(1.0, float("inf")), (0.5, float("nan")), (0.0, 1e300)], str)).paths
    assert "nan" not in d and "inf" not in d and d.count("M") == 1


def test_the_status_page_shows_both_charts_beside_the_traffic_cards():
    history = [Second(age=float(300 - i), rate=float(i % 5), p99=0.002 if i % 3 else None) for i in range(301)]
    html = status_page.render(_document(), history)
    traffic = html.index("<h2>Traffic</h2>")
    assert traffic < html.index('id="chart-rate"') < html.index('id="chart-p99"') < html.index("<h2>Responses")
    assert status_page.chart_figures(history) in html
    assert "no data yet" in status_page.render(_document())  # a master that has just started


def _document() -> dict:
    window = {"seconds": 10, "requests": 5, "rate_per_second": 0.5, "p50_seconds": 0.002, "p99_seconds": None}
    return {"version": "0.1.0", "pid": 1, "config": "c.json", "started": 0, "uptime": 3700,
            "ready": True, "stopping": False, "workers": [], "proxies": [],
            "front_cache": {"enabled": True, "entries": 3, "bytes": 2048, "max_bytes": 1 << 20, "hits": 1,
                            "misses": 3, "hit_ratio": 0.25},
            "totals": {"requests": 5, "responses": {"1xx": 0, "2xx": 4, "3xx": 0, "4xx": 1, "5xx": 0},
                       "last_10s": window, "last_5m": window, "all_time": {"p50_seconds": None, "p99_seconds": None}},
            "proxy": {"client_connections": 2},
            "access_log": {"enabled": False, "dropped": 0, "error": ""}}
