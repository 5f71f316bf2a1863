# The README's contract: `make run` serves the bundled site, `make test` passes the tests,
# each from a fresh clone with only Python >= 3.10 and make.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= gows.conf.json

.PHONY: install run test test-unit browser-deps bench soak clean

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

test: $(VENV)/.installed-test browser-deps
	$(PY) -m pytest -n 2 -q

# The tests that run in the test process alone (no server processes, no browser): seconds.
# They write thousands of small files under tmp_path: in memory (/dev/shm, where there is one)
# rather than through a disk's journal, which on a slow virtual disk costs more than the tests;
# only a failed test's files are kept there.
test-unit: $(VENV)/.installed-test
	$(if $(wildcard /dev/shm),TMPDIR=/dev/shm) $(PY) -m pytest -n 2 --dist worksteal -q \
		-o tmp_path_retention_policy=failed -m "unit and not integration"

# The browser tests drive Debian's chromium through chromium-driver. No test installs system
# packages: this step does, in plain sight, when they are missing (as root, with apt-get).
BROWSER_DEPS := chromium chromium-driver
APT_GET      := DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600
browser-deps:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		echo "browser-deps: $(BROWSER_DEPS) already installed"; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
		echo "browser-deps: the browser tests need $(BROWSER_DEPS); install them as root:" \
		     "apt-get install -y --no-install-recommends $(BROWSER_DEPS)" >&2; exit 2; \
	else \
		echo "browser-deps: installing $(BROWSER_DEPS) with apt-get (for the browser tests)"; \
		$(APT_GET) install -y -q --no-install-recommends $(BROWSER_DEPS) || \
		{ $(APT_GET) update -q && $(APT_GET) install -y -q --no-install-recommends $(BROWSER_DEPS); }; \
	fi

bench: $(VENV)/.installed-test
	$(PY) -m benchmarks $(ARGS)

# SOAK_SECONDS (default 300) sets the duration, from the environment or the make command line.
soak: $(VENV)/.installed-test
	$(if $(SOAK_SECONDS),SOAK_SECONDS=$(SOAK_SECONDS)) $(PY) -m benchmarks.soak $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
