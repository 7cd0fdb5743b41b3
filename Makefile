# Two commands on a fresh machine:  `make demo`  and  `make test`.  Each creates .venv when missing;
# a second run installs nothing (the stamp file records the installed lock files).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ghnq-installed

.PHONY: venv demo test test-fast lint system-deps clean

$(STAMP): requirements.lock requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	# triton (pulled in by the CUDA torch build) segfaults when tensorflow is imported first; no CPU path needs it.
	$(PY) -m pip uninstall -q -y triton || true
	touch $(STAMP)

venv: $(STAMP)

system-deps:
	bash scripts/system-deps.sh

demo: $(STAMP)
	$(PY) -m ghnq.demo

test: $(STAMP) system-deps
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

test-fast: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf out
