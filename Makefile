# The README's contract: `make run` serves the bundled site, `make test` passes the tests,
# each from a fresh clone with only Python >= 3.10 and make.
PYTHON ?= python3
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
