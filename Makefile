# `make run`: install everything and start the bot (console chat when no platform token is set).
# `make test`: install everything and run the whole test suite.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run console check test bench system-deps test-deps screenshot install gpu clean

run: install system-deps
	$(PY) -m launcher

console: install
	$(PY) -m launcher console

check: install
	$(PY) -m launcher check

# The tiny test models are built first (tests/prebuild.py, its own progress lines), outside any
# test's timeout; the tests then find them in the cache.
test: install system-deps test-deps
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

# Debian's chromium loads the status page in a test (headless); a CJK font lets it draw the
# page's Chinese. Installed with apt when running as root, like bubblewrap.
test-deps:
	@command -v chromium >/dev/null && fc-list 2>/dev/null | grep -qi wenquanyi || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-microhei >/dev/null; \
	  else echo "note: install chromium (sudo apt-get install chromium fonts-wqy-microhei) for the status page test"; fi; }

# The README's screenshot of the status page, taken by the status page test's browser.
screenshot: install test-deps
	STATUS_SCREENSHOT=docs/status-page.png $(PY) -m pytest -q tests/test_status.py -k chromium

# GPU hosts: torchvision (XComposer2's code imports it), the CUDA build matched to torch 2.13.0.
# Refused on a CPU-only torch, next to which PyPI's torchvision breaks every transformers import.
gpu: install
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.version.cuda else 'error: this torch is a CPU build; PyPI torchvision would break it (README: GPU notes)')"
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[gpu,test]'

bench: install
	$(PY) bench/streaming.py

clean:
	rm -rf $(VENV) .cache .pytest_cache
