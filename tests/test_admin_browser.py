"""The /status page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium): it lists the workers and the proxy processes and charts requests/s and p99 latency,
updates them in place (a worker killed, traffic counted per proxy, charts redrawn; no reload),
reads as cards on a phone-sized screen, and is a complete plain page without JavaScript.
Screenshots are saved under test-artifacts/ for a person to look at. `make test-deps`
installs the browser (`make test` runs it first); the tests never install anything."""
from __future__ import annotations

import os
import signal
from html.parser import HTMLParser

import pytest
import requests

from browser_support import chromium_session, screenshot
from master_support import Admin
from support import wait_until

pytestmark = pytest.mark.browser


@pytest.fixture
def browser(chromium):
    with chromium_session(chromium) as driver:
        yield driver


def _rows(driver, table: str = "workers") -> dict[str, dict[str, str]]:
    """{row key: {column label: cell text}} of a table ("workers": by address, "proxies": by
    index) as the browser shows it."""
    return driver.execute_script("""
        var out = {};
        document.querySelectorAll('#' + arguments[0] + ' tr').forEach(function (tr) {
            var row = {};
            tr.querySelectorAll('td').forEach(function (td) { row[td.dataset.label] = td.innerText.trim(); });
            out[tr.dataset.worker || tr.dataset.proxy] = row;
        });
        return out;""", table)


def _proxy_pids(a: Admin) -> dict[str, str]:
    """{index: pid} of the master's proxy processes, once every one accepts clients."""
    rows = wait_until(lambda: (lambda ps: ps if ps and all(p["ready"] for p in ps) else None)(a.json()["proxies"]),
                      timeout=30, message="every proxy ready")
    return {str(p["index"]): str(p["pid"]) for p in rows}


def _requests(rows: dict[str, dict[str, str]]) -> int:
    return sum(int(row["Requests"].replace(",", "")) for row in rows.values())




def test_status_page_shows_workers_and_updates_in_place_after_a_worker_is_killed(masters, tmp_path, site, browser):
    a = Admin(masters, tmp_path, site, proxy={"processes": 2})
    pids = a.ready()
    proxies = _proxy_pids(a)
    for _ in range(30):
        a.public("/a.txt")
    browser.get(f"http://127.0.0.1:{a.admin_port}/status")
    addresses = {f"127.0.0.1:{p}" for p in a.worker_ports}
    assert set(_rows(browser)) == addresses
    wait_until(lambda: browser.find_element("id", "live").text == "live", timeout=20, message="page live")
    for address, row in _rows(browser).items():
        assert row["State"] == "up" and row["PID"] == str(pids[int(address.rsplit(":", 1)[1])])
        assert row["Restarts"] == "0" and row["Last check"].endswith(" ms")
    assert browser.find_element("id", "f-ready").text == "ready"
    assert browser.find_element("id", "f-workersup").text == "2 / 2"
    assert browser.find_element("id", "f-proxiesup").text == "2 / 2"
    shown = _rows(browser, "proxies")
    assert {index: row["PID"] for index, row in shown.items()} == proxies
    assert all(row["State"] == "ready" and row["Restarts"] == "0" for row in shown.values()), shown
    browser.execute_script("window.gowsMarker = 'same page';")  # gone if the page reloads

    victim = a.worker_ports[0]
    address = f"127.0.0.1:{victim}"
    os.kill(pids[victim], signal.SIGKILL)
    wait_until(lambda: _rows(browser)[address]["Restarts"] == "1", timeout=40, message="restart shown")
    wait_until(lambda: (lambda r: r["State"] == "up" and r["PID"] not in ("\u2013", str(pids[victim])))(
        _rows(browser)[address]), timeout=40, message="replacement shown up with its new pid")
    assert browser.execute_script("return window.gowsMarker;") == "same page"
    assert _rows(browser)[f"127.0.0.1:{a.worker_ports[1]}"]["PID"] == str(pids[a.worker_ports[1]])
    wait_until(lambda: int(browser.find_element("id", "f-requests").text.replace(",", "")) >= 30, timeout=10)

    # Traffic after the page loaded: the proxy rows follow each proxy's count (read at once from
    # shared memory), still without a reload.
    for _ in range(40):
        a.public("/b.txt")
    counted = sum(p["requests"] for p in a.json()["proxies"])
    assert counted >= 70
    wait_until(lambda: _requests(_rows(browser, "proxies")) == counted, timeout=20, message="proxy rows updated")
    assert browser.execute_script("return window.gowsMarker;") == "same page"
    screenshot(browser, "admin-status.png")

    # A phone: each worker and each proxy is a labelled card, nothing wider than the screen.
    browser.set_window_size(390, 844)
    wait_until(lambda: browser.execute_script("return window.innerWidth") <= 400, timeout=10)
    for table in ("workers", "proxies"):
        layout = browser.execute_script("""
            var table = document.querySelector('table.' + arguments[0]);
            return {head: getComputedStyle(table.querySelector('thead')).display,
                    row: getComputedStyle(table.querySelector('tbody tr')).display,
                    overflow: document.documentElement.scrollWidth - window.innerWidth};""", table)
        assert layout["head"] == "none" and layout["row"] == "block" and layout["overflow"] <= 0, (table, layout)
    screenshot(browser, "admin-status-phone.png")


class _Table(HTMLParser):
    """Collects the text of every <td> per <tr> of one table body (`body`: its id)."""

    def __init__(self, body: str = "workers") -> None:
        super().__init__()
        self.body = body
        self.rows: list[list[str]] = []
        self.scripts_with_src = 0
        self._in_body = self._in_td = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tbody" and attrs.get("id") == self.body:
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._in_td = True
            self.rows[-1].append("")
        elif tag in ("script", "link", "img") and (attrs.get("src") or attrs.get("href")):
            self.scripts_with_src += 1

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "td":
            self._in_td = False

    def handle_data(self, data):
        if self._in_td:
            self.rows[-1][-1] += data


def test_status_page_is_a_complete_table_without_javascript(masters, tmp_path, site, chromium):
    a = Admin(masters, tmp_path, site, proxy={"processes": 2})
    pids = a.ready()
    proxies = _proxy_pids(a)
    html = requests.get(f"http://127.0.0.1:{a.admin_port}/status", timeout=10).text
    table = _Table()
    table.feed(html)
    assert table.scripts_with_src == 0  # nothing loaded from anywhere else
    assert sorted(row[0] for row in table.rows) == sorted(f"127.0.0.1:{p}" for p in a.worker_ports)
    for row in table.rows:
        assert row[1] == str(pids[int(row[0].rsplit(":", 1)[1])]) and row[2] == "up"
    proxy_table = _Table("proxies")
    proxy_table.feed(html)
    # Proxy, PID, State, Connections, Requests/s, Requests, Restarts
    assert {row[0]: row[1:3] + row[6:] for row in proxy_table.rows} == {
        index: [pid, "ready", "0"] for index, pid in proxies.items()}
    assert all(len(row) == 7 for row in proxy_table.rows)
    assert '<meta http-equiv="refresh" content="10">' in html  # inside <noscript>

    # And as Chromium shows it with JavaScript off: the same rows, and the page says it is static.
    with chromium_session(chromium, javascript=False) as driver:
        driver.get(f"http://127.0.0.1:{a.admin_port}/status")
        assert set(_rows(driver)) == {f"127.0.0.1:{p}" for p in a.worker_ports}  # (WebDriver's own JS still runs)
        assert {index: row["PID"] for index, row in _rows(driver, "proxies").items()} == proxies
        assert driver.find_element("id", "live").text == "static page, reloads every 10 s"
        screenshot(driver, "admin-status-nojs.png")


def _charts(driver) -> dict[str, dict]:
    """{chart id: what the browser shows of it}: its box, its line's length and its summary."""
    return driver.execute_script("""
        var out = {};
        document.querySelectorAll('#charts figure.chart').forEach(function (f) {
            var svg = f.querySelector('svg'), line = f.querySelector('path.line'), box = svg.getBoundingClientRect();
            out[f.id] = {width: box.width, height: box.height, line: line ? line.getTotalLength() : 0,
                         stroke: line ? getComputedStyle(line).stroke : '',
                         title: svg.querySelector('title').textContent,
                         summary: f.querySelector('.summary').textContent};
        });
        return out;""")


def test_status_page_charts_requests_and_p99_and_redraws_them_in_place(masters, tmp_path, site, browser):
    a = Admin(masters, tmp_path, site)
    a.ready()
    served = [0]

    def traffic_charted() -> bool:  # requests in two sampled seconds at least: a line, not a dot
        for _ in range(20):
            a.public("/a.txt")
        served[0] += 20
        return a.get("/status/charts").text.count(" L") >= 1

    wait_until(traffic_charted, timeout=30, interval=0.3, message="a line in /status/charts")
    browser.get(f"http://127.0.0.1:{a.admin_port}/status")
    shown = _charts(browser)
    assert sorted(shown) == ["chart-p99", "chart-rate"]
    for chart in shown.values():
        assert chart["width"] > 200 and chart["height"] > 40 and chart["line"] > 0, shown
        assert chart["stroke"] not in ("", "none") and chart["title"].endswith(", last 5 minutes")
    assert "req/s" in shown["chart-rate"]["summary"] and " ms" in shown["chart-p99"]["summary"]
    wait_until(lambda: browser.find_element("id", "live").text == "live", timeout=20, message="page live")
    browser.execute_script("window.gowsMarker = 'same page';")
    before = _charts(browser)["chart-rate"]["summary"]

    for _ in range(150):  # a burst: the script swaps in the server's new charts, no reload
        a.public("/b.txt")
    wait_until(lambda: _charts(browser)["chart-rate"]["summary"] != before, timeout=20, message="charts redrawn")
    assert browser.execute_script("return window.gowsMarker;") == "same page"
    browser.execute_script("window.scrollTo(0, 0);")  # the traffic cards and their charts
    screenshot(browser, "admin-status-charts.png")

    # Without JavaScript the charts are there all the same: plain SVG in the page.
    html = a.get("/status").text
    assert html.count('<figure class="chart"') == 2 and html.count('<path class="line"') == 2
