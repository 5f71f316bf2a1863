"""The gows command line: `serve [DIR]` without a config file, flags over a config file,
one-line errors with status 2, and `--version` on every entry point."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import requests

from arbiter.__main__ import main
from arbiter.config import ConfigError
from arbiter.config.source import SERVE_WORKERS, ConfigSource
from master_support import free_port_run, title
from support import PYTHON, children, free_port, python_env, running, wait_until

pytestmark = pytest.mark.unit

GOWS = Path(PYTHON).parent / "gows"  # the console script of the installed distribution


@pytest.fixture
def site(tmp_path: Path) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    (root / "hello.txt").write_text("hello from serve\n")
    return root


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# -- serve without a config file ------------------------------------------------------------
@pytest.mark.integration
def test_serve_without_a_config_file_serves_the_working_directory_until_term(site):
    assert not (site / "gows.conf.json").exists()
    listen, base = free_port(), free_port_run(SERVE_WORKERS)
    argv = [str(GOWS), "serve", "--listen", f"127.0.0.1:{listen}", "--worker-base-port", str(base)]
    proc = subprocess.Popen(argv, cwd=site, env=python_env(), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with running(proc):
        def fetched():
            try:
                r = requests.get(f"http://127.0.0.1:{listen}/hello.txt", timeout=2)
            except requests.RequestException:
                return None
            return r if r.status_code == 200 else None
        response = wait_until(fetched, timeout=30, message="GET /hello.txt answered 200")
        assert response.text == "hello from serve\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    log = proc.stdout.read()
    assert "Traceback" not in log and f"127.0.0.1:{base + SERVE_WORKERS - 1}" in log


def test_serve_defaults_to_the_working_directory_loopback_8080_and_two_workers(site, monkeypatch, capsys):
    monkeypatch.chdir(site)
    config = ConfigSource().load()
    assert config.base_directory == site.resolve() and str(config.listen) == "127.0.0.1:8080"
    assert [w.port for w in config.local_workers] == [9001, 9002] and config.admin is None
    code, out, err = run(["serve", "--check-config"], capsys)
    assert (code, err) == (0, "") and out == "gows serve: OK (2 local and 0 remote workers, listening on 127.0.0.1:8080)\n"


def test_serve_flags_set_directory_listen_workers_and_admin(site, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["serve", "site", "--listen", "[::1]:8000", "--workers", "3", "--worker-base-port", "9100",
            "--admin", "127.0.0.1:8001"]
    from arbiter.__main__ import config_source, make_parser
    source = config_source(make_parser().parse_args(args))
    config = source.load()
    assert config.base_directory == site.resolve()
    assert (config.listen.host, config.listen.port) == ("::1", 8000)
    assert [w.port for w in config.local_workers] == [9100, 9101, 9102]
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 8001)
    assert source.describe() == (f"gows serve {site} --listen [::1]:8000 --workers 3 --worker-base-port 9100 "
                                 "--admin 127.0.0.1:8001")


# -- flags over a config file ---------------------------------------------------------------
@pytest.fixture
def conf(tmp_path: Path, site: Path) -> Path:
    """A legacy config beside `site` (masterPort, a workers list, and a setting no flag touches)."""
    (tmp_path / "other").mkdir()
    path = tmp_path / "gows.conf.json"
    path.write_text(json.dumps({"baseDirectory": "other", "masterPort": 9090, "threads": 7,
                                "workers": [{"host": "127.0.0.1", "port": 9300}]}))
    return path


@pytest.mark.parametrize("where", ["before serve", "after serve"])
def test_flags_override_the_config_file_and_keep_its_other_settings(conf, site, tmp_path, monkeypatch, capsys, where):
    monkeypatch.chdir(tmp_path)
    flags = ["site", "--listen", "127.0.0.1:8500", "--workers", "2", "--check-config"]
    argv = ["-c", str(conf), "serve", *flags] if where == "before serve" else ["serve", "-c", str(conf), *flags]
    code, out, err = run(argv, capsys)
    assert (code, err) == (0, "")
    assert out == f"{conf}: OK (2 local and 0 remote workers, listening on 127.0.0.1:8500)\n"
    config = ConfigSource(conf, {"baseDirectory": ("directory", str(site)), "listen": ("--listen", "127.0.0.1:8500"),
                                 "workerCount": ("--workers", 2)}).load()
    assert config.base_directory == site.resolve() and config.threads == 7 and config.master_port is None
    assert [w.port for w in config.workers] == [9001, 9002]


def test_without_flags_serve_with_a_config_file_is_the_file(conf, tmp_path, capsys):
    code, out, _ = run(["serve", "-c", str(conf), "--check-config"], capsys)
    assert code == 0 and out == f"{conf}: OK (1 local and 0 remote workers, listening on 127.0.0.1:9090)\n"
    assert ConfigSource(conf).load().base_directory == (tmp_path / "other").resolve()


def test_a_reload_reads_the_file_again_under_the_same_flags(conf, capsys):
    source = ConfigSource(conf, {"listen": ("--listen", "127.0.0.1:8500")})
    assert source.load().threads == 7
    conf.write_text(conf.read_text().replace('"threads": 7', '"threads": 9'))
    again = source.load()  # what the master does on HUP (Arbiter._reload)
    assert again.threads == 9 and str(again.listen) == "127.0.0.1:8500"


@pytest.mark.integration
def test_a_hup_reload_keeps_the_flags_over_the_file(site, tmp_path):
    listen, base = free_port(), free_port_run(3)
    conf = tmp_path / "gows.conf.json"
    conf.write_text(json.dumps({"baseDirectory": str(site), "workerCount": 1, "workerBasePort": base,
                                "listen": f"127.0.0.1:{listen}", "healthCheck": {"interval": 0.2}}))
    log_path = tmp_path / "master.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([str(GOWS), "-c", str(conf), "serve", "--workers", "2"], env=python_env(),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    with running(proc):
        def worker_ports() -> list[int]:
            titles = (title(pid) for pid in children(proc.pid))
            # a set: a replaced worker may still be draining beside its successor on the same port
            return sorted({int(t.rsplit(":", 1)[1]) for t in titles if t.startswith("gows: worker :")})

        wait_until(lambda: worker_ports() == [base, base + 1], timeout=30, message="the flag's 2 workers")
        url = f"http://127.0.0.1:{listen}/hello.txt"
        # Served before the HUP: a HUP at the very moment the master turns ready can leave a
        # request right after the reload answered 503 (seen on main as well; reported).
        wait_until(lambda: requests.get(url, timeout=10).status_code == 200, timeout=30, message="served")
        conf.write_text(conf.read_text().replace('"workerCount": 1', '"workerCount": 3'))
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload done" in log_path.read_text(), timeout=60, message="reload done")
        # The file now says 3, the flag still says 2: both kept workers replaced, none added.
        assert "reload done: 2 local workers (0 added, 2 replaced" in log_path.read_text()
        wait_until(lambda: worker_ports() == [base, base + 1], timeout=30, message="the 2 workers after the reload")
        assert requests.get(url, timeout=10).text == "hello from serve\n"


def test_the_command_without_serve_is_unchanged(conf, capsys):
    code, out, err = run(["-c", str(conf), "--check-config"], capsys)
    assert (code, err) == (0, "") and out == f"{conf}: OK (1 local and 0 remote workers, listening on 127.0.0.1:9090)\n"


# -- mistakes: one line, status 2 -----------------------------------------------------------
MISTAKES = [
    (["serve", "missing"], "gows serve: directory: {cwd}/missing does not exist"),
    (["serve", "site/hello.txt"], "gows serve: directory: {cwd}/site/hello.txt is not a directory"),
    (["serve", "--workers", "x"], "gows serve: argument --workers: invalid int value: 'x'"),
    (["serve", "--workers", "0"], "gows serve: --workers: must be null or an integer from 1 to 1024, got 0"),
    (["serve", "--listen", "8080"], 'gows serve: --listen: must be null or a "host:port" address'),
    (["serve", "--admin", "127.0.0.1:8080"], "gows serve: --admin: port 8080 is already used by listen"),
    (["serve", "--worker-base-port", "70000"], "gows serve: --worker-base-port: must be an integer from 1 to 65535"),
    (["serve", "--bogus"], "gows: unrecognized arguments: --bogus"),
    (["--bogus"], "gows: unrecognized arguments: --bogus"),
    (["serv"], "gows: argument {{serve}}: invalid choice: 'serv'"),
    (["-c", "a.json", "serve", "-c", "b.json"], "gows serve: -c: give the config file once"),
    (["-c", "nope.json", "serve"], "nope.json: cannot read: No such file or directory"),
]


@pytest.mark.parametrize("argv,message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_each_command_line_mistake_exits_2_with_one_line(site, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(site.parent)
    code, out, err = run(argv + ["--check-config"] if argv[0] == "serve" else argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(message.format(cwd=site.parent)), err
    assert err.count("\n") == 1 and "Traceback" not in err and "usage:" not in err


@pytest.mark.integration
def test_a_listen_port_in_use_names_the_flag(site):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([PYTHON, "-m", "arbiter", "serve", str(site), "--listen", f"127.0.0.1:{port}",
                                 "--worker-base-port", str(free_port_run(SERVE_WORKERS))],
                                env=python_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"gows serve: --listen: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_a_flag_error_names_the_flag_only_when_a_flag_gave_the_key(conf):
    with pytest.raises(ConfigError, match=r"^--listen: must be"):
        ConfigSource(conf, {"listen": ("--listen", "nope")}).load()
    conf.write_text(json.dumps({"baseDirectory": ".", "workerCount": 1, "listen": "nope"}))
    with pytest.raises(ConfigError, match=r"^listen: must be"):
        ConfigSource(conf, {"workerCount": ("--workers", 2)}).load()


# -- --version ------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [[PYTHON, "-m", "arbiter", "--version"], [str(GOWS), "--version"],
                                  [str(GOWS), "serve", "--version"], [PYTHON, "-m", "fileapp", "--version"]],
                         ids=["python -m arbiter", "gows", "gows serve", "python -m fileapp"])
def test_version_everywhere_is_the_installed_distributions(argv):
    result = subprocess.run(argv, env=python_env(), capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"gows {metadata.version('gows')}\n"
