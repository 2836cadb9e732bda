# calibflow: `make run` runs the pipeline on the embedded default data, `make test` runs the fast tests,
# `make test-all` (CI) the linter and every test.
# Both set up what is missing first: a venv with the exact versions of requirements.lock.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=
export PATH := $(abspath $(BIN)):$(PATH)
# No telemetry from any library: these machines have no way out, and users may not want it.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY := false
export PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS := false
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false

.PHONY: run test test-all lint setup data ui prefect-ui prefect-stop serve lock bench clean

# A long-lived local Prefect server per checkout, started on first use and reused by every later
# run: a temporary API per command cost ~5 s of each run (issue 16). Its home (database) is
# .calibflow/prefect and its port is recorded in .calibflow/prefect-server/, so checkouts never
# share either; PREFECT_HOME or PREFECT_API_URL set by the user wins. `make prefect-stop` stops it;
# without one (no port), runs fall back to the temporary API; a corrupted database stops make.
ifeq ($(origin PREFECT_HOME)$(origin PREFECT_API_URL),undefinedundefined)
run prefect-ui serve: export PREFECT_HOME := $(CURDIR)/.calibflow/prefect
endif
LOCAL_PREFECT = api=$${PREFECT_API_URL:-$$(python -m flows.local_server ensure)} || exit 1

# make exits 2 whatever the recipe's failure, so it cannot pass on calibflow's exit code (1 rejected,
# 2 could not run): the recipe names it, and CD calls `calibflow run` itself (infra/cd/promote.yml).
run: $(STAMP) data
	@$(LOCAL_PREFECT); env $${api:+PREFECT_API_URL=$$api} calibflow run $(ARGS) || { code=$$?; \
	  echo "make run: calibflow run exited $$code ($$([ $$code = 1 ] && echo 'the model was rejected' || echo 'it could not run')); make exits 2 for any failure, so CD calls calibflow run directly" >&2; \
	  exit $$code; }

# The fast tests: no end-to-end flow runs (marker e2e) and no minute-long ones (marker slow).
test: $(STAMP)
	pytest -m "not e2e and not slow" $(PYTEST_ARGS)

# What CI runs: the linter, then every test, naming the slowest (CI has a time limit to keep to).
test-all: $(STAMP) lint
	pytest --durations=25 $(PYTEST_ARGS)

lint: $(STAMP)
	ruff check .
	ruff format --check .

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "calibflow needs Python 3.11 (PYTHON=...)"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

# The default dataset is a DVC stage output: rebuilt when missing, a no-op when up to date.
data: $(STAMP)
	dvc repro prepare

ui: $(STAMP)
	mlflow ui --backend-store-uri sqlite:///$(abspath mlflow.db) --host 127.0.0.1 --port 5000

# The Prefect UI: this checkout's local server, the one `make run` uses (started here when none runs yet).
prefect-ui: $(STAMP)
	@$(LOCAL_PREFECT); echo "Prefect UI: $${api%/api}"

prefect-stop:
	python -m flows.local_server stop

# Serve the scheduled retraining deployment (params.yaml `schedule:`) from this checkout until
# stopped, against the local Prefect server (started here when none runs) or PREFECT_API_URL.
serve: $(STAMP) data
	@$(LOCAL_PREFECT); PREFECT_API_URL=$$api calibflow schedule $(ARGS)

# Re-resolve the pinned versions from pyproject.toml's direct dependencies (needs the registries).
lock:
	rm -rf /tmp/calibflow-lock && $(PYTHON) -m venv /tmp/calibflow-lock
	/tmp/calibflow-lock/bin/pip install --quiet -e '.[test]'
	{ echo "# Exact versions resolved together on Python 3.11 (x86_64). Regenerate: make lock"; \
	  /tmp/calibflow-lock/bin/pip freeze --exclude-editable; } > requirements.lock

# Where a run's time goes (fixed cost vs work), how fast each command answers (against the default
# model `make run` registers), and calibration speed against netcal/torchmetrics (about 6 minutes
# on 2 cores). Each script writes its table to docs/results/<script>.md; docs/results/README.md
# lists every benchmark and how to run it. Compare with another commit: git worktree add --detach
# /tmp/before REV, then the scripts' --baseline /tmp/before. `make test-all` runs every
# benchmark's --smoke mode (tiny sizes, its files in a temporary folder).
bench: $(STAMP) data run
	python benchmarks/run_timing.py
	python benchmarks/command_latency.py
	python benchmarks/calibration_speed.py

clean: prefect-stop
	rm -rf .calibflow reports/metrics.json
