# The README's contract: `make run` serves the bundled site, `make test` passes the tests,
# each from a fresh clone with only Python >= 3.10 and make.

# gows spends most of its CPU in the interpreter, so CPython's build matters. On the many-files
# benchmark (front cache off, 2 workers), gows under Debian's python3 3.11.2 (libpython linked
# into the executable, built as Debian builds it) served 7.9% more requests a second than under
# pyenv's default source build of 3.11.7 (shared libpython, no profile-guided optimisation; the
# first python3 on PATH on this project's machines), with the same packages: 15 alternated runs,
# 13 won (the last 8 alone: 3.5% more), about 5% less CPU a request. So on Linux the venv is
# made with the system's python3 when it is 3.10 or newer and can make venvs (Debian:
# python3-venv); else with the first python3 on PATH. The probe runs only when the venv is made
# (a lazy variable, not on every make). PYTHON=... chooses; an existing venv is kept until
# `make clean`.
SYSTEM_PYTHON = $(if $(filter Linux,$(shell uname -s)),$(shell /usr/bin/python3 -c \
	'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1 && echo /usr/bin/python3))
PYTHON ?= $(or $(SYSTEM_PYTHON),python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= gows.conf.json

.PHONY: install run test test-unit test-deps bench soak clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Stamps make a second `make test` quick: pip runs again only when pyproject.toml changed.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m arbiter -c $(CONFIG)

test: $(VENV)/.installed-test test-deps
	$(PY) -m pytest -n 2 -q

# The tests that run in the test process alone (no server processes, no browser): seconds.
# They write thousands of small files under tmp_path: in memory (/dev/shm, where there is one)
# rather than through a disk's journal, which on a slow virtual disk costs more than the tests;
# only a failed test's files are kept there.
test-unit: $(VENV)/.installed-test
	$(if $(wildcard /dev/shm),TMPDIR=/dev/shm) $(PY) -m pytest -n 2 --dist worksteal -q \
		-o tmp_path_retention_policy=failed -m "unit and not integration"

# Some tests drive system programs: Debian's chromium through chromium-driver (the browser
# tests) and a real nginx in front of fileapp (X-Accel-Redirect). No test installs system
# packages: this step does, in plain sight, when they are missing (as root, with apt-get).
# (Debian starts an nginx it installs, on port 80, unless policy-rc.d forbids it; the tests
# start their own on loopback ports.)
TEST_DEPS     := chromium chromium-driver nginx
TEST_PROGRAMS := /usr/bin/chromium /usr/bin/chromedriver /usr/sbin/nginx
APT_GET       := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600
test-deps:
	@if [ -z "$$(for p in $(TEST_PROGRAMS); do [ -x $$p ] || echo $$p; done)" ]; then \
		echo "test-deps: $(TEST_DEPS) already installed"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "test-deps: the tests need $(TEST_DEPS); install them as root:" \
		     "apt-get install -y --no-install-recommends $(TEST_DEPS)" >&2; exit 2; \
	else \
		echo "test-deps: installing $(TEST_DEPS) with apt-get (for the browser and nginx tests)"; \
		$(APT_GET) install -y -q --no-install-recommends $(TEST_DEPS) || \
		{ $(APT_GET) update -q && $(APT_GET) install -y -q --no-install-recommends $(TEST_DEPS); }; \
	fi

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks $(ARGS)

# SOAK_SECONDS (default 300) sets the duration, from the environment or the make command line.
soak: $(VENV)/.installed-test
	$(if $(SOAK_SECONDS),SOAK_SECONDS=$(SOAK_SECONDS)) $(PY) -m benchmarks.soak $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
