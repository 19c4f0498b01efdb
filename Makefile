# Two commands do everything on a fresh machine (Debian/Ubuntu, Python >= 3.10):
#   make demo   - set up .venv, then run the corridor demo (map by service, relocalization, plot)
#   make test   - set up .venv, then run the whole test suite (what CI runs)
# Set-up is incremental: .venv is rebuilt only when a requirements file changes.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REQ_HASH := $(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)
STAMP := $(VENV)/.installed-$(REQ_HASH)
ARGS ?=

.PHONY: setup demo test lint bench clean faults

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py
	rm -f $(VENV)/.installed-*
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(VENV)/COLCON_IGNORE  # keep colcon from crawling the venv when the repo is a workspace's src
	touch $@

demo: setup
	$(PY) -m dinomix_ros.ros.demo $(ARGS)

test: setup
	$(PY) -m pytest $(ARGS)

lint: setup
	$(PY) -m flake8 dinomix_ros test bench launch

bench: setup
	$(PY) bench/bench_model.py $(ARGS)

clean:
	rm -rf build install log runs .pytest_cache

faults: setup
	$(PY) -m pytest test/fault $(ARGS)
