# Two commands on a fresh machine:  `make demo` (set up + run experiments.yaml), `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup chromium postgres demo test test-fast ls ui report clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed          ## install vaebench and its test extras into .venv

demo: setup                       ## the main job: train, evaluate and log every cell of experiments.yaml
	$(BIN)/vaebench run experiments.yaml

# The browser tests open the report and the MLflow UI in Debian's headless chromium, driven by
# Playwright (a test extra; `playwright install` is never needed): chromium is installed with apt
# when missing (as root; otherwise it says what to run).
chromium:
	@[ -x /usr/bin/chromium ] || { \
	  if [ "$$(id -u)" -ne 0 ]; then echo "chromium is missing: sudo apt-get install -y chromium" >&2; exit 1; fi; \
	  echo "installing chromium (apt)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# The cluster tests start a PostgreSQL server of their own (the MLflow and Optuna databases of a
# cluster): Debian's postgresql, installed with apt when missing (as root; otherwise it says what to run).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || { \
	  if [ "$$(id -u)" -ne 0 ]; then echo "postgresql is missing: sudo apt-get install -y postgresql" >&2; exit 1; fi; \
	  echo "installing postgresql (apt)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; }

test: setup chromium postgres     ## the whole suite, slow, browser and cluster tests included (what CI runs)
	$(BIN)/python -m pytest

test-fast: setup                  ## everything but the `slow` tests
	$(BIN)/python -m pytest -m "not slow"

ls: setup
	$(BIN)/vaebench ls experiments.yaml

report: setup                     ## rebuild reports/vaebench-demo.html from what is in MLflow
	$(BIN)/vaebench report experiments.yaml

ui: setup                         ## MLflow UI on http://127.0.0.1:5000
	$(BIN)/vaebench ui experiments.yaml

clean:                            ## remove the demo's results (keeps .venv)
	rm -rf mlruns.db mlartifacts reports/*.html reports/*.csv
