# tidepool: `make demo` and `make test` work on a machine that has only Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
SCALE ?= 1
IMAGES ?= 10000
POINTS ?= 100000 1000000
BENCH_ARGS ?=

.PHONY: venv demo test lint deps bench bench-points release diff clean

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

# Regenerate the `stages/...` deps of dvc.yaml from each stage's import closure (stages/depgraph.py).
deps: venv
	$(PY) -m stages.depgraph

# 10k images by default; `make bench IMAGES=2000 BENCH_ARGS=--skip-100k` for a quick run.
bench: venv
	$(PY) -m bench.run --images $(IMAGES) $(BENCH_ARGS)

# Points-heavy mode: the table stages at real point counts on small images (bench/points_heavy.py);
# `make bench-points POINTS="1000000 5000000"`.
bench-points: venv
	$(PY) -m bench.points_heavy $(foreach p,$(POINTS),--points $(p)) $(BENCH_ARGS)

release: venv
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=x.y.z"; exit 2; }
	$(PY) -m stages.release_cut $(VERSION)

diff: venv
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make diff A=<rev> B=<rev>"; exit 2; }
	$(PY) -m stages.diff $(A) $(B)

clean:
	rm -rf build data/.downloads
