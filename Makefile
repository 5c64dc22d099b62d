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
DIFF_DIR ?= build/diff
DIFF_ARGS ?=
WALK_SCALE ?= 1
WALK_GROW ?= 1.5
WALK_DIR ?= build/walkthrough
REALRES ?=

.PHONY: venv demo serve walkthrough test lint deps bench bench-points release diff clean

venv: $(STAMP)

# The stamp is newer than requirements.txt once the pinned set is installed; edits reinstall.
# Messages go to stderr: `make diff ... > pr.md` must hold the diff alone, even on a first run.
$(STAMP): requirements.txt
	@echo "installing requirements.txt into $(VENV) ..." >&2
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) >&2
	@$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt >&2
	@touch $@

demo: venv
	$(PY) -m stages.demo --scale $(SCALE)

# Serve the demo's upstreams and its DVC remote (kept in build/loopback-s3) again; prints the
# `export` lines that point dvc and the stages at it from another shell.
serve: venv
	$(PY) -m stages.loopback serve --upstream build/upstream --store build/loopback-s3 --overlay build/endpoints.yaml

# The whole release story on loopback (docs/releases.md, "Walkthrough"): build, release v0.1.0,
# grow, build, release v0.2.0, fresh clone + pull, dvc import / get, make diff.
walkthrough: venv
	$(PY) -m stages.walkthrough --workdir $(WALK_DIR) --scale $(WALK_SCALE) --grow-scale $(WALK_GROW)

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check .

# Regenerate the `stages/...` deps of dvc.yaml from each stage's import closure (stages/depgraph.py).
deps: venv
	$(PY) -m stages.depgraph

# 10k images by default; `make bench IMAGES=2000 BENCH_ARGS=--skip-100k` for a quick run.
# `make bench REALRES=1` instead: pack at real resolution (12 MP JPEG/PNG, real points per image)
# against a fixed reference floor (bench/realres.py; BENCH_ARGS="--jpeg-images 8" etc.).
bench: venv
ifeq ($(REALRES),1)
	$(PY) -m bench.realres $(BENCH_ARGS)
else
	$(PY) -m bench.run --images $(IMAGES) $(BENCH_ARGS)
endif

# Points-heavy mode: the table stages at real point counts on small images (bench/points_heavy.py);
# `make bench-points POINTS="1000000 5000000"`.
bench-points: venv
	$(PY) -m bench.points_heavy $(foreach p,$(POINTS),--points $(p)) $(BENCH_ARGS)

release: venv
	@test -n "$(VERSION)" || { echo "usage: make release VERSION=x.y.z"; exit 2; }
	$(PY) -m stages.release_cut $(VERSION)

# Only the diff reaches stdout (no echoed command), so `make diff A=.. B=.. > pr.md` is clean;
# the pictures it embeds are written to $(DIFF_DIR).
diff: venv
	@test -n "$(A)" -a -n "$(B)" || { echo "usage: make diff A=<rev> B=<rev>" >&2; exit 2; }
	@$(PY) -m stages.diff "$(A)" "$(B)" --pictures $(DIFF_DIR) $(DIFF_ARGS)

clean:
	rm -rf build data/.downloads
