"""Config loading: the seed file, the extended keys, and one clear error line per mistake."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import jsonschema
import pytest

from arbiter import config as cfg
from arbiter.__main__ import main
from arbiter.config.kinds import REQUIRED, Section, Setting, declared
from arbiter.config.schema import SCHEMA_PATH, json_schema
from arbiter.proxy import Proxy
from arbiter.proxy.balancer import Balancer
from arbiter.state import WorkerTable
from support import PYTHON, REPO, free_port, python_env, running

pytestmark = pytest.mark.unit

SEED = {"workers": [{"host": "127.0.0.1", "port": 9000}, {"host": "127.0.0.1", "port": 9001}],
        "baseDirectory": "www", "masterPort": 9090}


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello")
    return tmp_path


def write(directory: Path, data, name: str = "gows.conf.json") -> Path:
    path = directory / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def check(path: Path, capsys) -> tuple[int, str, str]:
    code = main(["-c", str(path), "--check-config"])
    out, err = capsys.readouterr()
    return code, out, err


def test_seed_config_of_the_proof_of_concept_loads_unchanged(site):
    c = cfg.load(write(site, SEED))
    assert c.listen == cfg.Address("127.0.0.1", 9090)
    assert [(w.host, w.port, w.local) for w in c.workers] == [("127.0.0.1", 9000, True), ("127.0.0.1", 9001, True)]
    assert c.base_directory == (site / "www").resolve()
    assert c.threads == 64 and c.proxy.balance is None and c.health_check.path == "/healthcheck" and c.pidfile is None


def test_shorthand_defaults_and_relative_paths(site):
    (site / "run").mkdir()
    c = cfg.load(write(site, {"$schema": "arbiter/gows.schema.json", "baseDirectory": "www", "workerCount": 3,
                              "workerBasePort": 9101, "pidfile": "run/gows.pid", "listen": "[::1]:8443",
                              "logging": {"file": "run/gows.log"}}))
    assert [w.port for w in c.workers] == [9101, 9102, 9103] and all(w.local for w in c.workers)
    assert c.listen == cfg.Address("::1", 8443) and str(c.listen) == "[::1]:8443"
    assert c.pidfile == (site / "run" / "gows.pid").resolve()
    assert c.logging.file == (site / "run" / "gows.log").resolve()
    assert c.health_check == cfg.HealthCheckConfig("/healthcheck", 1.0, 1.0, 2, 3, 15.0, 5.0)
    assert (c.max_fails, c.fail_timeout, c.graceful_timeout) == (3, 10.0, 30.0)


def test_default_listen_is_loopback_8080(site):
    c = cfg.load(write(site, {"baseDirectory": "www", "workerCount": 1}))
    assert c.listen == cfg.Address("127.0.0.1", 8080) and c.workers[0].port == 9001


def test_the_proxy_takes_its_settings_from_the_config_sections(site):
    c = cfg.load(write(site, {"baseDirectory": "www", "workerCount": 1, "threads": 6, "cache": {"ttl": 2.5},
                              "proxy": {"balance": "consistent-hash", "poolSize": 8},
                              "frontCache": {"enabled": False, "maxObjectBytes": 1024}}))
    proxy = Proxy(WorkerTable(), c.proxy, c.front_cache, c.threads, c.cache.ttl)
    assert proxy.config is c.proxy and proxy.config.pool_size == 8 and proxy.cache is None
    assert (proxy.balancer.policy, proxy.balancer.worker_threads) == ("consistent-hash", 6)
    # A worker's threads past the pool's connections never serve the proxy: no more are counted.
    few = cfg.load(write(site, {"baseDirectory": "www", "workerCount": 1, "threads": 6, "proxy": {"poolSize": 4}}))
    assert Proxy(WorkerTable(), few.proxy, few.front_cache, few.threads, 1.0).balancer.worker_threads == 4
    on = Proxy(WorkerTable(), c.proxy, cfg.configured(cfg.FrontCacheConfig), c.threads, c.cache.ttl)
    assert on.cache.revalidate_after == 2.5  # no staler than the workers' own view


def test_the_balance_choices_are_the_balancers_policies():
    choice = next(s for key, _, s in declared(cfg.ProxyConfig) if key == "balance").kind
    assert set(choice.inner.choices) == set(Balancer.POLICIES)  # (null: the balancer's default)


def test_a_body_limit_past_the_shared_body_budget_is_refused(site):
    with pytest.raises(cfg.ConfigError, match=r"^proxy.maxBodyBytes: 2048 exceeds proxy.bodyBufferBytes 1024$"):
        cfg.load(write(site, {"baseDirectory": "www", "workerCount": 1,
                              "proxy": {"maxBodyBytes": 2048, "bodyBufferBytes": 1024}}))


@pytest.mark.parametrize("factor", [0.5, 1])
def test_a_hash_balance_factor_that_would_refuse_every_worker_is_refused(site, factor):
    with pytest.raises(cfg.ConfigError, match=rf"^proxy.hashBalanceFactor: must be 0 \(no bound\) or more than 1, got {factor}$"):
        cfg.load(write(site, {"baseDirectory": "www", "workerCount": 1, "proxy": {"hashBalanceFactor": factor}}))
    for fine in (0, 1.25, 2):
        assert cfg.load(write(site, {"baseDirectory": "www", "workerCount": 1,
                                     "proxy": {"hashBalanceFactor": fine}})).proxy.hash_balance_factor == fine


def test_a_non_local_worker_is_not_spawned_only_checked(site):
    # 192.0.2.1 is TEST-NET-1: never an address of this machine. Nothing is sent to it here.
    c = cfg.load(write(site, {"baseDirectory": "www", "listen": "127.0.0.1:8080",
                              "workers": [{"host": "127.0.0.1", "port": 9001}, {"host": "192.0.2.1", "port": 9001}]}))
    assert [w.local for w in c.workers] == [True, False]
    assert [w.port for w in c.local_workers] == [9001]


def test_bundled_config_serves_www_with_two_workers_on_8080(capsys):
    c = cfg.load(REPO / "gows.conf.json")
    assert c.base_directory == (REPO / "www").resolve()
    assert c.listen == cfg.Address("127.0.0.1", 8080) and len(c.local_workers) == 2
    code, out, err = check(REPO / "gows.conf.json", capsys)
    assert code == 0 and "OK (2 local and 0 remote workers, listening on 127.0.0.1:8080)" in out and err == ""


BAD = [
    ({"baseDirectory": "www", "workerCount": 1, "unknownKey": 1}, "unknownKey: unknown key"),
    ({"baseDirectory": "www", "workerCount": 1, "healthCheck": {"interval": "fast"}},
     'healthCheck.interval: must be a number > 0 and <= 3600, got "fast"'),
    ({"baseDirectory": "www", "workerCount": 1, "healthCheck": {"intervall": 1}},
     'healthCheck.intervall: unknown key (did you mean "interval"?)'),
    ({"baseDirectory": "www", "workerCount": 1, "healthcheck": {}}, 'healthcheck: unknown key (did you mean "healthCheck"?)'),
    ({"baseDirectory": "www", "workerCount": 1, "healthCheck": 5}, "healthCheck: must be an object, got 5"),
    ({"baseDirectory": "www", "workerCount": 1, "healthCheck": {"path": "health"}}, "healthCheck.path: must be an absolute URL path"),
    # Sent as it is, so never equal to the path a worker reads (its query and fragment cut off,
    # its escapes decoded):
    *[({"baseDirectory": "www", "workerCount": 1, "healthCheck": {"path": bad}}, "healthCheck.path: must be an absolute URL path")
      for bad in ("/health?full=1", "/health#x", "/health%20check")],
    ({"baseDirectory": "www", "workerCount": 1, "healthCheck": {"rise": 0}}, "healthCheck.rise: must be an integer from 1 to 100, got 0"),
    ({"baseDirectory": "www", "workerCount": 1, "threads": 0}, "threads: must be an integer from 1 to 1024, got 0"),
    ({"baseDirectory": "www", "workerCount": 1, "threads": True}, "threads: must be an integer from 1 to 1024, got true"),
    ({"baseDirectory": "www", "workerCount": 2.5}, "workerCount: must be null or an integer from 1 to 1024, got 2.5"),
    ({"baseDirectory": "www", "workerCount": 1, "gracefulTimeout": -1}, "gracefulTimeout: must be a number > 0"),
    ({"baseDirectory": "www", "workerCount": 1, "listen": "8080"}, 'listen: must be null or a "host:port" address'),
    ({"baseDirectory": "www", "workerCount": 1, "listen": "example.com:80"}, "listen: host must be an IP address or localhost"),
    ({"baseDirectory": "www", "workerCount": 1, "listen": "127.0.0.1:99999"}, "listen: must be null or a"),
    ({"baseDirectory": "www", "workerCount": 1, "listen": "127.0.0.1:8000", "masterPort": 8000},
     "masterPort: give either listen or masterPort, not both"),
    ({"baseDirectory": "www", "workerCount": 1, "workers": [{"host": "127.0.0.1", "port": 9001}]},
     "workerCount: give either workers or workerCount, not both"),
    ({"baseDirectory": "www", "workerBasePort": 9001, "workers": [{"host": "127.0.0.1", "port": 9001}]},
     "workerBasePort: give either workers or workerCount, not both"),
    ({"baseDirectory": "www"}, "workers: required"),
    ({"baseDirectory": "www", "workers": []}, "workers: must be null or a non-empty list"),
    ({"baseDirectory": "www", "workers": [9001]}, "workers[0]: must be an object like"),
    ({"baseDirectory": "www", "workers": [{"host": "127.0.0.1"}]}, "workers[0].port: required"),
    ({"baseDirectory": "www", "workers": [{"host": "127.0.0.1", "port": 70000}]},
     "workers[0].port: must be an integer from 1 to 65535, got 70000"),
    ({"baseDirectory": "www", "workers": [{"host": "127.0.0.1", "port": 9001, "wieght": 2}]},
     'workers[0].wieght: unknown key (did you mean "weight"?)'),
    ({"baseDirectory": "www", "workers": [{"host": "127.0.0.1", "port": 9001, "weight": 0}]},
     "workers[0].weight: must be an integer from 1 to 1000, got 0"),
    ({"baseDirectory": "www", "workers": [{"host": "127.0.0.1", "port": 9001, "slowStart": -1}]},
     "workers[0].slowStart: must be a number >= 0 and <= 3600, got -1"),
    ({"baseDirectory": "www", "workerCount": 1, "cache": {"etag": "sha1"}},
     'cache.etag: must be one of "mtime", "content", got "sha1"'),
    ({"baseDirectory": "www", "workerCount": 1, "outlierDetection": {"maxEjectionPercent": 101}},
     "outlierDetection.maxEjectionPercent: must be an integer from 0 to 100, got 101"),
    ({"baseDirectory": "www", "workers": [{"host": "bad host!", "port": 9001}]}, "workers[0].host: must be a host name or IP address"),
    ({"baseDirectory": "www", "workers": [{"host": "127.0.0.1", "port": 9001}, {"host": "127.0.0.1", "port": 9001}]},
     "workers[1].port: port 9001 is already used by workers[0].port"),
    ({"baseDirectory": "www", "listen": "127.0.0.1:9001", "workers": [{"host": "127.0.0.1", "port": 9001}]},
     "workers[0].port: port 9001 is already used by listen"),
    ({"baseDirectory": "www", "masterPort": 9002, "workerCount": 2, "workerBasePort": 9001},
     "workerBasePort: port 9002 is already used by masterPort"),
    ({"baseDirectory": "www", "workerCount": 1, "admin": "127.0.0.1:8080"}, "admin: port 8080 is already used by listen"),
    ({"baseDirectory": "www", "workerCount": 10, "workerBasePort": 65530}, "workerCount: 10 ports from workerBasePort 65530 run past 65535"),
    ({"workerCount": 1}, "baseDirectory: required"),
    ({"baseDirectory": "missing", "workerCount": 1}, "missing does not exist"),
    ({"baseDirectory": "www/index.html", "workerCount": 1}, "index.html is not a directory"),
    ({"baseDirectory": "www", "workerCount": 1, "logging": {"level": "loud"}},
     'logging.level: must be one of "debug", "info", "warning", "error", "critical", got "loud"'),
    ({"baseDirectory": "www", "workerCount": 1, "logging": {"accessLog": 1}},
     'logging.accessLog: must be false, true (stdout), "-" (stdout) or a file path, got 1'),
    ({"baseDirectory": "www", "workerCount": 1, "logging": {"accessLog": "nodir/access.log"}}, "logging.accessLog: directory"),
    ({"baseDirectory": "www", "workerCount": 1, "logging": {"file": "nodir/gows.log"}}, "logging.file: directory"),
    ({"baseDirectory": "www", "workerCount": 1, "pidfile": "nodir/gows.pid"}, "pidfile: directory"),
    ({"baseDirectory": "www", "workerCount": 1, "proxy": {"balance": "random"}}, "proxy.balance: must be null or one of"),
    ({"baseDirectory": "www", "workerCount": 1, "proxy": {"retries": -1}}, "proxy.retries: must be an integer from 0 to 10, got -1"),
    ({"baseDirectory": "www", "workerCount": 1, "restartBackoff": {"max": 0}}, "restartBackoff.max: must be a number > 0"),
    ({"baseDirectory": "www", "workerCount": 1, "frontCache": {"maxBytes": 10, "maxObjectBytes": 11}},
     "frontCache.maxObjectBytes: 11 exceeds frontCache.maxBytes 10"),
    ({"baseDirectory": "www", "workerCount": 1, "listing": "yes"}, 'listing: must be true or false, got "yes"'),
    ({"baseDirectory": "www", "workerCount": 1, "fallback": ".env"}, "fallback: '.env' is not a file fileapp would serve"),
    ({"baseDirectory": "www", "workerCount": 1, "fallback": "../index.html"}, "fallback: '../index.html' is not a file"),
    ({"baseDirectory": "www", "workerCount": 1, "errorPages": {"200": "ok.html"}},
     "errorPages.200: keys must be 4xx or 5xx status codes"),
    ({"baseDirectory": "www", "workerCount": 1, "errorPages": {"404": "errors/.404.html"}},
     "errorPages.404: 'errors/.404.html' is not a file fileapp would serve"),
    ({"baseDirectory": "www", "workerCount": 1, "errorPages": ["404.html"]}, "errorPages: must be an object like"),
    *[({"baseDirectory": "www", "workerCount": 1, "headers": [{"match": "/assets/*", "set": {name: "x"}}]},
       f"headers[0].set.{name}: hop-by-hop, framing and computed headers cannot be set")
      for name in ("Connection", "keep-alive", "Transfer-Encoding", "Content-Length", "TE", "Trailer", "Upgrade",
                   "Proxy-Authorization", "Content-Range", "ETag", "Vary", "X-Accel-Redirect")],
    ({"baseDirectory": "www", "workerCount": 1, "headers": [{"match": "/a", "set": {"X-A": "a\r\nSet-Cookie: b"}}]},
     "headers[0].set.X-A: the value must be non-empty visible ASCII"),
    ({"baseDirectory": "www", "workerCount": 1, "headers": [{"match": "assets/*", "set": {"X-A": "b"}}]},
     "headers[0].match: must be a URL path glob starting with '/' or '*'"),
    ({"baseDirectory": "www", "workerCount": 1, "headers": [{"match": "/a"}]},
     'headers[0]: must be an object with "match" and "set" exactly'),
    ({"baseDirectory": "www", "workerCount": 1, "headers": {"/a": {"X-A": "b"}}}, "headers: must be a list of"),
    ('{"baseDirectory": "www", "workerCount": 1,}', "invalid JSON at line 1 column"),
    ('{"baseDirectory": "www", "workerCount": 1, "threads": 2, "threads": 3}', "threads: given twice"),
    ('{"baseDirectory": "www", "workerCount": 1, "threads": NaN}', "invalid JSON: NaN is not a JSON number"),
    ("[1, 2]", "must be a JSON object, got list"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m[:40] for _, m in BAD])
def test_each_mistake_exits_2_with_one_line_naming_the_key(site, capsys, data, message):
    path = write(site, data)
    code, out, err = check(path, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"{path}: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("data, message", [
    ({"baseDirectory": "loop", "workerCount": 1}, "baseDirectory: "),  # a symlink loop
    ({"baseDirectory": "x" * 300, "workerCount": 1}, "baseDirectory: "),  # a name too long
    ({"baseDirectory": "www", "workerCount": 1, "pidfile": "a\0b"}, "pidfile: must not contain a NUL"),
    ({"baseDirectory": "www", "workerCount": 1, "pidfile": "loop/gows.pid"}, "pidfile: "),
    ({"baseDirectory": "www", "workerCount": 1, "pidfile": "fifo"}, "pidfile: "),  # read for ever, then replaced
    ({"baseDirectory": "www", "workerCount": 1, "logging": {"file": "y" * 300}}, "logging.file: "),
    ({"baseDirectory": "www", "workerCount": 1, "listen": "127.0.0.1:\u0668\u0660"}, "listen: "),  # Arabic-Indic 80
    ('{"baseDirectory": "www", "workerCount": ' + "9" * 5000 + "}", "invalid JSON"),
    ("[" * 100000 + "]" * 100000, "invalid JSON"),
])
def test_paths_and_json_the_system_refuses_are_one_line_mistakes_too(site, capsys, data, message):
    """What the operating system or the JSON reader refuses (a symlink loop, a name too long, a
    NUL, a FIFO for a pidfile, digits int() will not take, nesting deeper than the parser goes)
    is named in one line with exit 2, as every other mistake, never a traceback."""
    (site / "loop").symlink_to(site / "loop")
    os.mkfifo(site / "fifo")
    path = write(site, data)
    code, out, err = check(path, capsys)
    assert code == 2 and out == "" and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_missing_config_file(tmp_path, capsys):
    code, _, err = check(tmp_path / "nope.json", capsys)
    assert code == 2 and err == f"{tmp_path / 'nope.json'}: cannot read: No such file or directory\n"


def test_unreadable_base_directory(site, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests may run as root
    code, _, err = check(write(site, {"baseDirectory": "www", "workerCount": 1}), capsys)
    assert code == 2 and "baseDirectory: " in err and "www is not readable" in err


def run_master(path: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "arbiter", "-c", str(path)], env=python_env(), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_worker_port_in_use_exits_2_naming_the_key(site):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(site, {"baseDirectory": "www", "listen": f"127.0.0.1:{free_port()}",
                            "workers": [{"host": "127.0.0.1", "port": port}]})
        result = run_master(path)
    assert result.returncode == 2
    assert result.stderr == f"{path}: workers[0].port: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_public_port_in_use_exits_2_naming_the_key(site):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = write(site, {"baseDirectory": "www", "masterPort": port, "workers": [{"host": "127.0.0.1", "port": free_port()}]})
        result = run_master(path)
    assert result.returncode == 2
    assert result.stderr == f"{path}: masterPort: cannot listen on 127.0.0.1:{port}: address already in use\n"


def _waiting(*code: str, args: tuple[str, ...] = ()) -> subprocess.Popen:
    """A Python that runs `code` (with `args` after it on its command line), says so with a line on
    stdout and waits for its stdin to close."""
    proc = subprocess.Popen([PYTHON, "-c", "; ".join((*code, "print(flush=True)", "import sys", "sys.stdin.read()")),
                             *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=python_env())
    proc.stdout.readline()
    return proc


def test_pidfile_of_a_running_master_exits_2(site):
    with running(_waiting("import setproctitle", "setproctitle.setproctitle('gows: master')")) as other:
        (site / "gows.pid").write_text(f"{other.pid}\n")  # a live process titled as a master
        path = write(site, {"baseDirectory": "www", "listen": f"127.0.0.1:{free_port()}", "pidfile": "gows.pid",
                            "workers": [{"host": "127.0.0.1", "port": free_port()}]})
        result = run_master(path)
    assert result.returncode == 2
    assert f"pidfile: {(site / 'gows.pid').resolve()} names running process {other.pid}" in result.stderr
    assert (site / "gows.pid").read_text() == f"{other.pid}\n"


def test_a_stale_pidfile_naming_a_pid_another_program_now_has_is_replaced_not_refused(tmp_path, caplog):
    from arbiter.__main__ import write_pidfile

    path = tmp_path / "gows.pid"
    with running(_waiting()) as other:  # the pid a killed master had, reused by another program
        path.write_text(f"{other.pid}\n")
        write_pidfile(path)  # (ConfigError before: "names running process N; is gows already running?")
    assert path.read_text() == f"{os.getpid()}\n"
    assert [r.getMessage() for r in caplog.records] == [
        f"pidfile {path} named process {other.pid}, which is not gows: a stale pidfile, replaced"]
    from arbiter.__main__ import may_be_gows
    with running(_waiting("import setproctitle", "setproctitle.setproctitle('gows: master')")) as master:
        assert may_be_gows(master.pid)
    with running(_waiting(args=("-m", "arbiter"))) as starting:  # its command line as `python -m arbiter`
        assert may_be_gows(starting.pid)  # (a master before it sets its title)


def test_the_pidfile_is_never_written_through_a_symlink_planted_in_its_directory(tmp_path):
    from arbiter.__main__ import write_pidfile

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "gows.pid"
    (tmp_path / f".gows.pid.{os.getpid()}").symlink_to(victim)  # the name the master wrote first
    write_pidfile(path)
    assert victim.read_text() == "precious\n"  # (before: our pid, written through the link)
    assert path.read_text() == f"{os.getpid()}\n" and not path.is_symlink()
    assert path.stat().st_mode & 0o777 == 0o644


def test_invalid_config_from_the_command_line_is_one_line_without_traceback(site):
    path = write(site, {"baseDirectory": "www", "workerCount": 1, "healthCheck": {"interval": "fast"}})
    result = run_master(path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f'{path}: healthCheck.interval: must be a number > 0 and <= 3600, got "fast"\n'


def test_a_refused_header_stops_the_master_at_start_with_one_line(site):
    path = write(site, {"baseDirectory": "www", "listen": f"127.0.0.1:{free_port()}",
                        "workers": [{"host": "127.0.0.1", "port": free_port()}],
                        "headers": [{"match": "/*", "set": {"Transfer-Encoding": "chunked"}}]})
    result = run_master(path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"{path}: headers[0].set.Transfer-Encoding: hop-by-hop, framing and computed "
                             "headers cannot be set\n")


def test_site_settings_load_as_the_workers_take_them(site):
    c = cfg.load(write(site, {"baseDirectory": "www", "workerCount": 1, "listing": True, "fallback": "index.html",
                              "errorPages": {"404": "errors/404.html", "503": "busy.html"},
                              "headers": [{"match": "/assets/*", "set": {"Cache-Control": "max-age=600"}}]}))
    assert c.listing is True and c.fallback == "index.html"
    assert c.error_pages == (("404", "errors/404.html"), ("503", "busy.html"))
    assert c.headers == (("/assets/*", (("Cache-Control", "max-age=600"),)),)
    default = cfg.load(write(site, {"baseDirectory": "www", "workerCount": 1}))
    assert (default.listing, default.fallback, default.error_pages, default.headers) == (False, None, (), ())


# -- the JSON Schema ------------------------------------------------------------------------
def documented_keys(cls=cfg.Config, prefix="") -> dict[str, Setting]:
    out = {}
    for key, _, s in declared(cls):
        out[prefix + key] = s
        if isinstance(s.kind, Section):
            out.update(documented_keys(s.kind.cls, prefix + key + "."))
    return out


def schema_keys(schema: dict, prefix="") -> dict[str, dict]:
    out = {}
    for key, prop in schema.get("properties", {}).items():
        out[prefix + key] = prop
        if prop.get("type") == "object":
            out.update(schema_keys(prop, prefix + key + "."))
    return out


def test_published_schema_is_generated_from_the_declarations():
    shipped = json.loads(SCHEMA_PATH.read_text())
    assert shipped == json_schema(), "regenerate: python -m arbiter.config.schema"
    jsonschema.Draft202012Validator.check_schema(shipped)


def test_every_documented_key_is_in_the_schema_and_vice_versa():
    shipped = json.loads(SCHEMA_PATH.read_text())
    documented = documented_keys()
    in_schema = schema_keys(shipped)
    assert set(in_schema) - {"$schema"} == set(documented)
    for key, s in documented.items():
        assert s.doc and in_schema[key]["description"] == s.doc, key
        if not isinstance(s.kind, Section) and s.default is not REQUIRED:
            assert in_schema[key]["default"] == s.default, key
    assert "baseDirectory" in shipped["required"]


def test_schema_agrees_with_the_loader_on_examples(site):
    """What the schema can express (types, ranges, names, exclusive forms) it rejects too."""
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()))
    assert not list(validator.iter_errors(SEED))
    assert not list(validator.iter_errors(json.loads((REPO / "gows.conf.json").read_text())))
    structural = [data for data, message in BAD if isinstance(data, dict) and not any(
        word in message for word in ("already used", "exist", "directory", "run past", "exceeds", "IP address"))]
    assert len(structural) > 25
    for data in structural:
        assert list(validator.iter_errors(data)), data


@pytest.mark.unit
def test_a_worker_with_spawn_false_is_only_checked_even_on_this_machine(tmp_path):
    c = cfg.load_data({"baseDirectory": str(tmp_path), "workers": [
        {"host": "127.0.0.1", "port": 9001}, {"host": "127.0.0.1", "port": 9002, "spawn": False}]},
        tmp_path / "g.json")
    assert [(w.port, w.local, w.named) for w in c.workers] == [(9001, True, False), (9002, False, False)]


@pytest.mark.unit
def test_a_worker_named_by_an_unresolvable_dns_name_is_no_error_but_a_name_to_resolve(tmp_path):
    c = cfg.load_data({"baseDirectory": str(tmp_path), "workers": [{"host": "nodes.invalid", "port": 8080}]},
                      tmp_path / "g.json")
    assert [(w.host, w.local, w.named) for w in c.workers] == [("nodes.invalid", False, True)]
    assert c.resolve_interval == 30.0 and c.lame_duck == 5.0


@pytest.mark.unit
def test_spawn_must_be_a_boolean(tmp_path):
    with pytest.raises(cfg.ConfigError, match=r"workers\[0\]\.spawn"):
        cfg.load_data({"baseDirectory": str(tmp_path), "workers": [{"host": "127.0.0.1", "port": 1, "spawn": 0}]},
                      tmp_path / "g.json")
def test_a_workers_weight_and_slow_start_are_optional_and_default_to_1_and_0(site):
    c = cfg.load(write(site, {"baseDirectory": "www", "workers": [
        {"host": "127.0.0.1", "port": 9001, "weight": 3, "slowStart": 20},
        {"host": "127.0.0.1", "port": 9002}]}))
    assert [(w.weight, w.slow_start) for w in c.workers] == [(3, 20.0), (1, 0.0)]
    c = cfg.load(write(site, {"baseDirectory": "www", "workerCount": 2}))
    assert [(w.weight, w.slow_start) for w in c.workers] == [(1, 0.0), (1, 0.0)]
    assert (c.outlier_detection.consecutive_failures, c.cache.etag) == (5, "mtime")
