"""The worker's command line is derived from WorkerOptions' one table: every row reaches the worker."""
from __future__ import annotations

import dataclasses
from operator import attrgetter

import pytest

from arbiter.config import Config, load_data
from arbiter.worker_command import WorkerOptions, worker_argv
from fileapp.__main__ import make_parser

pytestmark = pytest.mark.unit

# Values unlike every default, so a setting that fell off the command line would show.
SETTINGS = {"baseDirectory": "www", "workerCount": 1, "threads": 7, "gracefulTimeout": 2.5, "compress": False,
            "healthCheck": {"path": "/hc", "interval": 0.25, "timeout": 0.75, "bootTimeout": 9.0},
            "cache": {"ttl": 0.5, "maxBytes": 1000, "maxFileSize": 10},
            "restartBackoff": {"initial": 0.125, "max": 3.0, "minUptime": 1.5},
            "logging": {"level": "warning"}, "listing": True, "fallback": "index.html",
            "errorPages": {"404": "404.html"},
            "headers": [{"match": "/assets/*", "set": {"X-Content-Type-Options": "nosniff"}}]}
# How fileapp's parser gives back the settings passed as JSON or switches.
PARSED = {"root": str, "error_pages": lambda pairs: dict(pairs),
          "headers": lambda rules: [{"match": m, "set": dict(s)} for m, s in rules]}


def options(tmp_path) -> tuple[WorkerOptions, Config]:
    (tmp_path / "www").mkdir()
    config = load_data(SETTINGS, tmp_path / "gows.conf.json")
    return WorkerOptions.from_config(config), config


def test_each_option_is_read_from_the_config_attribute_its_row_names(tmp_path):
    opts, config = options(tmp_path)
    for f in dataclasses.fields(WorkerOptions):
        assert getattr(opts, f.name) == attrgetter(f.metadata["source"])(config), f.name
    assert (opts.check_interval, opts.backoff_initial, opts.min_uptime) == (0.25, 0.125, 1.5)


def test_every_option_with_a_flag_reaches_fileapp_with_its_value(tmp_path):
    opts, _ = options(tmp_path)
    args = make_parser().parse_args(worker_argv(opts, 5, "127.0.0.1", 9001)[3:])
    flagged = [f for f in dataclasses.fields(WorkerOptions) if f.metadata["flag"] is not None]
    assert len(flagged) == 15
    for f in flagged:
        dest = f.metadata["flag"].removeprefix("--").replace("-", "_")
        value = getattr(opts, f.name)
        assert getattr(args, dest) == PARSED.get(f.name, lambda v: v)(value), f.name


def test_options_the_master_applies_itself_are_not_passed_to_the_worker(tmp_path):
    opts, _ = options(tmp_path)
    argv = worker_argv(opts, 5, "127.0.0.1", 9001)
    unflagged = [f.name for f in dataclasses.fields(WorkerOptions) if f.metadata["flag"] is None]
    assert unflagged == ["check_interval", "check_timeout", "boot_timeout", "backoff_initial", "backoff_max",
                         "min_uptime"]
    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) == len(set(flags)) == 15 + 4  # the table's flags plus --fd, --host, --port, --parent-pid


@pytest.mark.parametrize("text, value", [("True", True), ("False", False), ("true", True), ("off", False),
                                         ("1", True), ("0", False)])
def test_compress_flag_takes_what_the_master_writes_and_the_usual_spellings(text, value):
    assert make_parser().parse_args(["--root", "www", "--compress", text]).compress is value
    assert make_parser().parse_args(["--root", "www"]).compress is True
