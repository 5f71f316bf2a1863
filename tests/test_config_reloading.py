"""What a reload takes from a new config (arbiter.config.reloading): everything but what takes a
restart, which stays as it runs, each such change named in a warning."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from arbiter import config as cfg
from arbiter.config.reloading import as_reloaded

pytestmark = pytest.mark.unit


@pytest.fixture
def running(tmp_path: Path) -> cfg.Config:
    (tmp_path / "www").mkdir()
    return cfg.load_data({"baseDirectory": "www", "listen": "127.0.0.1:8080", "workerCount": 2,
                          "workerBasePort": 9000}, tmp_path / "gows.conf.json")


def test_a_new_config_changing_nothing_that_takes_a_restart_is_taken_whole(running):
    new = dataclasses.replace(running, threads=8, lame_duck=0.0)
    assert as_reloaded(running, new) == (new, [])


def test_the_listeners_admin_and_pidfile_stay_as_they_run_and_each_change_is_named(running, tmp_path):
    new = dataclasses.replace(running, listen=cfg.Address("127.0.0.1", 8081), admin=cfg.Address("127.0.0.1", 9900),
                              pidfile=tmp_path / "gows.pid", threads=8)
    kept, warnings = as_reloaded(running, new)
    assert (kept.listen, kept.admin, kept.pidfile, kept.threads) == (running.listen, None, None, 8)
    assert warnings == ["reload: listen changed to 127.0.0.1:8081; that takes a restart, still using 127.0.0.1:8080",
                        "reload: admin changed to 127.0.0.1:9900; that takes a restart, still using None",
                        f"reload: pidfile changed to {tmp_path / 'gows.pid'}; that takes a restart, still using None"]


def test_the_legacy_master_port_is_named_as_written(running):
    new = dataclasses.replace(running, listen=cfg.Address("127.0.0.1", 9090), master_port=9090)
    assert as_reloaded(running, new)[1] == [
        "reload: masterPort changed to 127.0.0.1:9090; that takes a restart, still using 127.0.0.1:8080"]


def test_https_turned_on_or_off_takes_a_restart(running, tmp_path):
    https = dataclasses.replace(running.tls, certificate=tmp_path / "cert.pem", key=tmp_path / "key.pem")
    on = dataclasses.replace(running, tls=https)
    kept, warnings = as_reloaded(running, on)
    assert kept.tls == running.tls and warnings == ["reload: HTTPS turned on; that takes a restart"]
    kept, warnings = as_reloaded(on, running)
    assert kept.tls == https and warnings == ["reload: HTTPS turned off; that takes a restart"]


def test_a_new_certificate_is_taken_and_the_https_listeners_stay(running, tmp_path):
    old = dataclasses.replace(running, tls=dataclasses.replace(running.tls, certificate=tmp_path / "old.pem",
                                                               key=tmp_path / "old.key"))
    tls = dataclasses.replace(old.tls, certificate=tmp_path / "new.pem", key=tmp_path / "new.key",
                              listen=cfg.Address("127.0.0.1", 9443), redirect_listen=cfg.Address("127.0.0.1", 9080))
    kept, warnings = as_reloaded(old, dataclasses.replace(old, tls=tls))
    assert kept.tls == dataclasses.replace(tls, listen=old.tls.listen, redirect_listen=None)
    assert warnings == [
        "reload: tls.listen changed to 127.0.0.1:9443; that takes a restart, still using 127.0.0.1:8443",
        "reload: tls.redirectListen changed to 127.0.0.1:9080; that takes a restart, still using None"]
