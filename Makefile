# tidepool: `make demo` and `make test` work on a machine that has only Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
SCALE ?= 1
IMAGES ?= 10000
BENCH_ARGS ?=
REALRES ?=

.PHONY: venv demo test lint bench release diff clean

venv: $(STAMP)

# The stamp is newer than requirements.txt once the pinned set is installed; edits reinstall.
$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

demo: venv
	$(PY) -m stages.demo --scale $(SCALE)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check .

# 10k images by default; `make bench IMAGES=2000 BENCH_ARGS=--skip-100k` for a quick run.
# `make bench REALRES=1` instead: pack at real resolution (12 MP JPEG/PNG, real points per image)
# against a fixed reference floor (bench/realres.py; BENCH_ARGS="--jpeg-images 8" etc.).
bench: venv
ifeq ($(REALRES),1)
	$(PY) -m bench.realres $(BENCH_ARGS)
else
	$(PY) -m bench.run --images $(IMAGES) $(BENCH_ARGS)
endif

release: venv
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=x.y.z"; exit 2; }
	$(PY) -m stages.release_cut $(VERSION)

diff: venv
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make diff A=<rev> B=<rev>"; exit 2; }
	$(PY) -m stages.diff $(A) $(B)

clean:
	rm -rf build data/.downloads
