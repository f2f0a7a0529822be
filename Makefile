# xenddev developer entry points. `make test` does all set-up itself.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TESTS ?= tests

.PHONY: test test-xen run venv system-deps shim lint typecheck check bench clean

test: venv system-deps shim
	@bash tests/support/run-suite.sh $(PY) $(TESTS)

# The real-Xen lane only: Xen 4.17 and dom0 booted in QEMU, guests made with
# xl (tests/support/realxen; the first run downloads and builds its images).
# Its test modules are tests/test_realxen.py and tests/test_realxen_*.py.
XEN_TESTS = $(subst /,.,$(basename $(wildcard tests/test_realxen.py tests/test_realxen_*.py)))
test-xen: venv system-deps
	@bash tests/support/run-suite.sh $(PY) $(XEN_TESTS)

# The daemon in the foreground; on a machine without Xen it starts the
# embedded xenstored and SIMULATED backends/frontends.
RUN_ARGS ?=
run: venv
	$(VENV)/bin/twistd -n --pidfile= xenddev $(RUN_ARGS)

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

system-deps:
	@bash tests/support/system-deps.sh

shim:
	@bash tests/support/shim/build.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: venv
	$(VENV)/bin/mypy

check: lint typecheck

bench: venv system-deps shim
	$(PY) bench/xenstore_client.py

clean:
	rm -rf _trial_temp* .coverage .coverage.* htmlcov tests/support/shim/build
