# `make run`: install everything and start the bot (console chat when no platform token is set).
# `make test`: install everything and run the whole test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run console check test bench system-deps install clean

run: install system-deps
	$(PY) -m launcher

console: install
	$(PY) -m launcher console

check: install
	$(PY) -m launcher check

# The tiny test models are built first (tests/prebuild.py, its own progress lines), outside any
# test's timeout; the tests then find them in the cache.
test: install system-deps
	$(PY) -m tests.prebuild
	$(PY) -m pytest

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# bubblewrap sandboxes the agent's code. Installed with apt when running as root; otherwise
# a hint is printed and the agent refuses to run code until it is there.
system-deps:
	@command -v bwrap >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; \
	  else echo "note: install bubblewrap (sudo apt-get install bubblewrap) so /agent can run code"; fi; }

bench: install
	$(PY) bench/streaming.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
