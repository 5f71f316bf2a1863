"""The /status page for people: one self-contained HTML document (no external assets).

The server renders every number into plain tables, so the page is complete without JavaScript
(and then refreshes itself every 10 s with a <noscript> meta refresh). With JavaScript, a small
inline script fetches /status.json every 2 s and updates the same tables in place. Narrow
screens (phones) show each worker and each proxy process as a labelled card instead of a wide row.
"""
from __future__ import annotations

import base64
import hashlib
import time
from html import escape
from typing import Any

REFRESH_SECONDS = 2

CSS = """
:root{color-scheme:light dark;--bg:#fff;--fg:#1d2330;--mute:#5d6675;--line:#dde1e8;--card:#f5f7fa;
--up:#16794a;--upbg:#def5e8;--down:#b42318;--downbg:#fde5e3}
@media (prefers-color-scheme:dark){:root{--bg:#12151b;--fg:#e6e9ef;--mute:#9aa3b2;--line:#2c323d;
--card:#1b2029;--up:#5fd39a;--upbg:#173626;--down:#ff8a80;--downbg:#3d1c1a}}
*{box-sizing:border-box}
body{margin:0;padding:16px;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
background:var(--bg);color:var(--fg)}
main{max-width:1100px;margin:0 auto}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:8px 16px;margin-bottom:12px}
h1{font-size:1.35em;margin:0}
h2{font-size:1.05em;margin:22px 0 8px}
.mute{color:var(--mute)}
.badge{display:inline-block;padding:1px 9px;border-radius:10px;font-weight:600;font-size:.85em}
.up{background:var(--upbg);color:var(--up)}
.down{background:var(--downbg);color:var(--down)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:8px;margin:0;padding:0}
.cards div{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 10px}
.cards dt{font-size:.8em;color:var(--mute)}
.cards dd{margin:2px 0 0;font-size:1.2em;font-weight:600;font-variant-numeric:tabular-nums}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:6px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-size:.8em;color:var(--mute);font-weight:600}
td.n,th.n{text-align:right}
.err{display:block;font-size:.8em;color:var(--down);word-break:break-word}
footer{margin-top:20px;font-size:.85em;color:var(--mute);word-break:break-all}
#live.stale{color:var(--down)}
@media (max-width:640px){
 body{padding:10px}
 table.list thead{display:none}
 table.list tr{display:block;border:1px solid var(--line);border-radius:8px;margin:0 0 10px;padding:6px 10px;
  background:var(--card)}
 table.list td{display:flex;justify-content:space-between;gap:12px;border:0;padding:3px 0;text-align:right}
 table.list td::before{content:attr(data-label);color:var(--mute);font-size:.85em;text-align:left}
 table.list td:first-child{font-weight:600}
}
"""

# The client side: fetch /status.json and refresh the page's cells (same formatting as below).
SCRIPT = """
(function(){
"use strict";
function dur(s){s=Math.max(0,Math.floor(s));var d=Math.floor(s/86400),h=Math.floor(s%86400/3600),
m=Math.floor(s%3600/60),r=s%60;if(d)return d+"d "+h+"h";if(h)return h+"h "+m+"m";if(m)return m+"m "+r+"s";
return r+"s";}
function ms(s){if(s===null||s===undefined)return "\\u2013";var v=s*1000;
return (v<10?v.toFixed(2):v<100?v.toFixed(1):v.toFixed(0))+" ms";}
function rate(r){return r<10?r.toFixed(2):r<100?r.toFixed(1):r.toFixed(0);}
function num(n){return n.toLocaleString("en-US");}
function bytes(b){var u=["B","KiB","MiB","GiB","TiB"],i=0;while(b>=1024&&i<u.length-1){b/=1024;i++;}
return (i?b.toFixed(1):b)+" "+u[i];}
function pct(x){return x===null||x===undefined?"\\u2013":(x*100).toFixed(1)+" %";}
var fields={
 ready:function(d){return d.stopping?"stopping":d.ready?"ready":"not ready";},
 uptime:function(d){return dur(d.uptime);},
 rate10:function(d){return rate(d.totals.last_10s.rate_per_second);},
 rate5m:function(d){return rate(d.totals.last_5m.rate_per_second);},
 p50:function(d){return ms(d.totals.last_5m.p50_seconds);},
 p99:function(d){return ms(d.totals.last_5m.p99_seconds);},
 requests:function(d){return num(d.totals.requests);},
 connections:function(d){return num(d.proxy.client_connections);},
 r1xx:function(d){return num(d.totals.responses["1xx"]);},
 r2xx:function(d){return num(d.totals.responses["2xx"]);},
 r3xx:function(d){return num(d.totals.responses["3xx"]);},
 r4xx:function(d){return num(d.totals.responses["4xx"]);},
 r5xx:function(d){return num(d.totals.responses["5xx"]);},
 cstate:function(d){return d.front_cache.enabled?"on":"off";},
 centries:function(d){return num(d.front_cache.entries);},
 cbytes:function(d){return bytes(d.front_cache.bytes)+" / "+bytes(d.front_cache.max_bytes);},
 cratio:function(d){return pct(d.front_cache.hit_ratio);},
 astate:function(d){var a=d.access_log;return !a.enabled?"off":a.error?"failing: "+a.error:"on";},
 adropped:function(d){return num(d.access_log.dropped);},
 workersup:function(d){var n=0;d.workers.forEach(function(w){if(w.up)n++;});return n+" / "+d.workers.length;},
 proxiesup:function(d){var n=0;d.proxies.forEach(function(p){if(p.ready)n++;});return n+" / "+d.proxies.length;}
};
function cell(row,label,text,cls){var td=document.createElement("td");td.setAttribute("data-label",label);
if(cls)td.className=cls;td.textContent=text;row.appendChild(td);return td;}
function stateBadge(td,up,text){var b=document.createElement("span");b.className="badge "+(up?"up":"down");
b.textContent=text;td.appendChild(b);}
function pstate(p){return p.ready?"ready":p.pid===null?"down":"starting";}
function render(d){
 var now=Date.now()/1000;
 Object.keys(fields).forEach(function(k){var el=document.getElementById("f-"+k);if(el)el.textContent=fields[k](d);});
 var badge=document.getElementById("f-ready");badge.className="badge "+(d.ready?"up":"down");
 var body=document.getElementById("workers");var rows=document.createDocumentFragment();
 d.workers.forEach(function(w){
  var tr=document.createElement("tr");tr.setAttribute("data-worker",w.address);
  cell(tr,"Worker",(w.name===w.address?w.address:w.name+" ("+w.address+")")+(w.local?"":" (remote)"));
  cell(tr,"PID",w.pid===null?"\\u2013":String(w.pid),"n");
  var st=cell(tr,"State","");stateBadge(st,w.up&&!w.ejected,w.ejected?"ejected":w.up?"up":"down");
  var why=w.ejected?"until "+new Date(w.ejected_until*1000).toISOString().slice(11,19)+" UTC":!w.up?w.last_error:"";
  if(why){var e=document.createElement("span");e.className="err";e.textContent=why;st.appendChild(e);}
  cell(tr,"Weight",w.effective_weight<w.weight?w.effective_weight+" / "+w.weight+" (slow start)":String(w.weight),"n");
  cell(tr,"Ejections",num(w.ejections),"n");
  cell(tr,"Since",dur(now-w.since)+" ago","n").title=new Date(w.since*1000).toISOString();
  cell(tr,"Failures",num(w.consecutive_failures),"n");
  cell(tr,"Restarts",num(w.restarts),"n");
  cell(tr,"Requests",num(w.requests),"n");
  cell(tr,"In flight",num(w.in_flight),"n");
  cell(tr,"Last check",ms(w.last_check_seconds),"n");
  rows.appendChild(tr);
 });
 body.replaceChildren(rows);
 var prows=document.createDocumentFragment();
 d.proxies.forEach(function(p){
  var tr=document.createElement("tr");tr.setAttribute("data-proxy",String(p.index));
  cell(tr,"Proxy",String(p.index));
  cell(tr,"PID",p.pid===null?"\\u2013":String(p.pid),"n");
  stateBadge(cell(tr,"State",""),p.ready,pstate(p));
  cell(tr,"Connections",num(p.client_connections),"n");
  cell(tr,"Requests/s",rate(p.rate),"n");
  cell(tr,"Requests",num(p.requests),"n");
  cell(tr,"Restarts",num(p.restarts),"n");
  prows.appendChild(tr);
 });
 document.getElementById("proxies").replaceChildren(prows);
 document.getElementById("f-updated").textContent=new Date().toLocaleTimeString();
}
var live=document.getElementById("live");
function tick(){
 fetch("status.json",{cache:"no-store"}).then(function(r){if(!r.ok)throw new Error(r.status);return r.json();})
 .then(function(d){render(d);live.textContent="live";live.className="";})
 .catch(function(){live.textContent="not updating: master unreachable";live.className="stale";})
 .then(function(){setTimeout(tick,REFRESH_MS);});
}
live.textContent="live";
setTimeout(tick,REFRESH_MS);
})();
""".replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))

# A Content-Security-Policy that allows exactly this inline script and nothing from elsewhere.
SCRIPT_HASH = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
CSP = (f"default-src 'none'; script-src 'sha256-{SCRIPT_HASH}'; style-src 'unsafe-inline'; "
       "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _dur(s: float) -> str:
    s = max(0, int(s))
    d, h, m, r = s // 86400, s % 86400 // 3600, s % 3600 // 60, s % 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m}m"
    if m:
        return f"{m}m {r}s"
    return f"{r}s"


def _ms(s: float | None) -> str:
    if s is None:
        return "\u2013"
    v = s * 1000
    return (f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}") + " ms"


def _rate(r: float) -> str:
    return f"{r:.2f}" if r < 10 else f"{r:.1f}" if r < 100 else f"{r:.0f}"


def _bytes(b: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    while b >= 1024 and i < len(units) - 1:
        b /= 1024
        i += 1
    return f"{b:.1f} {units[i]}" if i else f"{int(b)} B"


def _pct(x: float | None) -> str:
    return "\u2013" if x is None else f"{x * 100:.1f} %"


def _access_state(a: dict[str, Any]) -> str:
    return "off" if not a["enabled"] else f'failing: {a["error"]}' if a["error"] else "on"


def _card(key: str, label: str, value: str) -> str:
    return f'<div><dt>{escape(label)}</dt><dd id="f-{key}">{escape(value)}</dd></div>'


def _td(label: str, text: str, cls: str = "") -> str:
    klass = f' class="{cls}"' if cls else ""
    return f'<td data-label="{label}"{klass}>{text}</td>'


def _badge(up: bool, text: str) -> str:
    return f'<span class="badge {"up" if up else "down"}">{text}</span>'


def _heads(*columns: tuple[str, bool]) -> str:
    """Column headings; numeric ones (True) right-aligned like their cells."""
    return "".join(f'<th{" class=n" if n else ""} scope="col">{h}</th>' for h, n in columns)


def _weight(w: dict[str, Any]) -> str:
    """Its weight, and what it is balanced with while it ramps up (slow start)."""
    if w["effective_weight"] < w["weight"]:
        return f'{w["effective_weight"]:g} / {w["weight"]} (slow start)'
    return str(w["weight"])


def _worker_row(w: dict[str, Any], now: float) -> str:
    state = _badge(w["up"] and not w["ejected"], "ejected" if w["ejected"] else "up" if w["up"] else "down")
    if w["ejected"]:
        state += f'<span class="err">until {time.strftime("%H:%M:%S", time.gmtime(w["ejected_until"]))} UTC</span>'
    elif not w["up"] and w["last_error"]:
        state += f'<span class="err">{escape(w["last_error"])}</span>'
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(w["since"]))
    name = w["address"] if w["name"] == w["address"] else f'{w["name"]} ({w["address"]})'
    return (f'<tr data-worker="{escape(w["address"])}">'
            + _td("Worker", escape(name + ("" if w["local"] else " (remote)")))
            + _td("PID", "\u2013" if w["pid"] is None else str(w["pid"]), "n")
            + _td("State", state)
            + _td("Weight", escape(_weight(w)), "n")
            + _td("Ejections", f'{w["ejections"]:,}', "n")
            + f'<td data-label="Since" class="n" title="{since}">{_dur(now - w["since"])} ago</td>'
            + _td("Failures", f'{w["consecutive_failures"]:,}', "n")
            + _td("Restarts", f'{w["restarts"]:,}', "n")
            + _td("Requests", f'{w["requests"]:,}', "n")
            + _td("In flight", f'{w["in_flight"]:,}', "n")
            + _td("Last check", _ms(w["last_check_seconds"]), "n")
            + "</tr>")


def _proxy_state(p: dict[str, Any]) -> str:
    """ready: accepting clients; starting: spawned, not yet accepting; down: between incarnations."""
    return "ready" if p["ready"] else "down" if p["pid"] is None else "starting"


def _proxy_row(p: dict[str, Any]) -> str:
    return (f'<tr data-proxy="{p["index"]}">'
            + _td("Proxy", str(p["index"]))
            + _td("PID", "\u2013" if p["pid"] is None else str(p["pid"]), "n")
            + _td("State", _badge(p["ready"], _proxy_state(p)))
            + _td("Connections", f'{p["client_connections"]:,}', "n")
            + _td("Requests/s", _rate(p["rate"]), "n")
            + _td("Requests", f'{p["requests"]:,}', "n")
            + _td("Restarts", f'{p["restarts"]:,}', "n")
            + "</tr>")


def render(d: dict[str, Any]) -> str:
    """The page for the status document `d` (arbiter.ops.status.snapshot)."""
    now = time.time()
    t, cache, responses = d["totals"], d["front_cache"], d["totals"]["responses"]
    state = "stopping" if d["stopping"] else "ready" if d["ready"] else "not ready"
    up = sum(1 for w in d["workers"] if w["up"])
    proxies_up = sum(1 for p in d["proxies"] if p["ready"])
    traffic = "".join((
        _card("rate10", "Requests/s, last 10 s", _rate(t["last_10s"]["rate_per_second"])),
        _card("rate5m", "Requests/s, last 5 min", _rate(t["last_5m"]["rate_per_second"])),
        _card("p50", "p50 latency, 5 min", _ms(t["last_5m"]["p50_seconds"])),
        _card("p99", "p99 latency, 5 min", _ms(t["last_5m"]["p99_seconds"])),
        _card("requests", "Requests served", f'{t["requests"]:,}'),
        _card("connections", "Open connections", f'{d["proxy"]["client_connections"]:,}'),
    ))
    classes = "".join(_card(f"r{c}", c, f"{responses[c]:,}") for c in ("1xx", "2xx", "3xx", "4xx", "5xx"))
    front = "".join((
        _card("cstate", "Front cache", "on" if cache["enabled"] else "off"),
        _card("centries", "Entries", f'{cache["entries"]:,}'),
        _card("cbytes", "Bytes", f'{_bytes(cache["bytes"])} / {_bytes(cache["max_bytes"])}'),
        _card("cratio", "Hit ratio", _pct(cache["hit_ratio"])),
    ))
    access = "".join((
        _card("astate", "Access log", _access_state(d["access_log"])),
        _card("adropped", "Lines dropped", f'{d["access_log"]["dropped"]:,}'),
    ))
    rows = "".join(_worker_row(w, now) for w in d["workers"])
    heads = _heads(("Worker", False), ("PID", True), ("State", False), ("Weight", True), ("Ejections", True),
                   ("Since", True), ("Failures", True),
                   ("Restarts", True), ("Requests", True), ("In flight", True), ("Last check", True))
    proxy_rows = "".join(_proxy_row(p) for p in d["proxies"])
    proxy_heads = _heads(("Proxy", False), ("PID", True), ("State", False), ("Connections", True),
                         ("Requests/s", True), ("Requests", True), ("Restarts", True))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>gows status</title>
<noscript><meta http-equiv="refresh" content="10"></noscript>
<style>{CSS}</style></head>
<body><main>
<header><h1>gows</h1>
<span id="f-ready" class="badge {"up" if d["ready"] else "down"}">{state}</span>
<span class="mute">up <span id="f-uptime">{_dur(d["uptime"])}</span> &middot;
workers up <span id="f-workersup">{up} / {len(d["workers"])}</span> &middot;
proxies ready <span id="f-proxiesup">{proxies_up} / {len(d["proxies"])}</span></span></header>
<h2>Traffic</h2><dl class="cards">{traffic}</dl>
<h2>Responses by status</h2><dl class="cards">{classes}</dl>
<h2>Workers</h2>
<table class="list workers"><thead><tr>{heads}</tr></thead>
<tbody id="workers">{rows}</tbody></table>
<h2>Proxies</h2>
<table class="list proxies"><thead><tr>{proxy_heads}</tr></thead>
<tbody id="proxies">{proxy_rows}</tbody></table>
<h2>Front cache</h2><dl class="cards">{front}</dl>
<h2>Access log</h2><dl class="cards">{access}</dl>
<footer>gows {escape(d["version"])} &middot; master pid {d["pid"]} &middot; config {escape(d["config"])}<br>
updated <span id="f-updated">{time.strftime("%H:%M:%S")}</span> &middot; <span id="live">static page, reloads every 10 s</span>
&middot; <a href="status.json">status.json</a> &middot; <a href="metrics">metrics</a></footer>
</main>
<script>{SCRIPT}</script>
</body></html>
"""
