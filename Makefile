# Two commands do everything on a fresh machine (Debian/Ubuntu, Python 3.11 and 3.12; see README):
#   make demo   - set up .venv (ROS 2 Kilted), then run the corridor demo (map by service, relocalization, plots)
#   make test   - set up one venv per tested ROS 2 distribution and run the whole test suite in each (what CI runs):
#                 Kilted with Python 3.11 in .venv, Jazzy with Python 3.12 in .venv-jazzy
# Set-up is incremental: a venv is rebuilt only when its requirements files change.
# One distribution only: make test DISTROS=kilted (or jazzy); extra pytest arguments: ARGS="-k node".

DISTROS ?= kilted jazzy
ARGS ?=
# The interpreter of each distribution (Jazzy's wheels are tested with 3.12; pyenv provides it on these machines).
PYTHON_kilted ?= python3
PYTHON_jazzy ?= $(shell command -v python3.12 >/dev/null 2>&1 && python3.12 -c '' 2>/dev/null && echo python3.12 \
	|| { p=$$(pyenv prefix 3.12 2>/dev/null) && echo $$p/bin/python3.12; })
VENV_kilted := .venv
VENV_jazzy := .venv-jazzy
# RMW_IMPLEMENTATION in the caller's shell (e.g. rmw_cyclonedds_cpp) names an RMW these wheels do not have:
# the demo and the tests pin Fast DDS, the only one installed.
export RMW_IMPLEMENTATION := rmw_fastrtps_cpp

VENV := $(VENV_kilted)
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench clean faults

setup: setup-kilted

# setup-<distro>: (re)create the distribution's venv when requirements-<distro>.txt, requirements.txt,
# requirements-dev.txt or setup.py changed (a stamp file named by their hash).
setup-%: FORCE
	@test -n "$(PYTHON_$*)" || { echo "no Python for $*: set PYTHON_$*=/path/to/python (see README)"; exit 2; }
	@stamp=$(VENV_$*)/.installed-$$(cat requirements.txt requirements-$*.txt requirements-dev.txt setup.py \
		| sha1sum | cut -c1-12); \
	if [ ! -f $$stamp ]; then \
		echo "setting up $(VENV_$*) for ROS 2 $* with $(PYTHON_$*) (first time: several minutes)"; \
		rm -f $(VENV_$*)/.installed-*; \
		$(PYTHON_$*) -m venv $(VENV_$*) && \
		$(VENV_$*)/bin/python -m pip install --quiet --disable-pip-version-check \
			-r requirements-$*.txt -r requirements-dev.txt && \
		$(VENV_$*)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
			-e . && \
		touch $(VENV_$*)/COLCON_IGNORE && touch $$stamp || exit 1; \
	fi

test-%: setup-% FORCE
	@echo "== tests on ROS 2 $* ($$($(VENV_$*)/bin/python --version))"
	$(VENV_$*)/bin/python -m pytest $(ARGS)

test: $(addprefix test-,$(DISTROS))

demo: setup
	$(PY) -m dinomix_ros.ros.demo $(ARGS)

lint: setup
	$(PY) -m flake8 dinomix_ros test bench launch setup.py

bench: setup
	$(PY) bench/bench_model.py $(ARGS)

faults: setup
	$(PY) -m pytest test/fault $(ARGS)

clean:
	rm -rf build install log runs .pytest_cache

FORCE:
