# cloudseg: the few commands a newcomer needs. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BASE ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
# The venv is rebuilt when the declared dependencies change (stamp holds a hash of setup.cfg + pyproject.toml).
STAMP := $(VENV)/.cloudseg-stamp
DEPS_HASH := $(shell cat setup.cfg pyproject.toml | sha256sum | cut -c1-16)
HOST ?= 127.0.0.1
UI_PORT ?= 5000
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1
# No phoning home unasked (README "Privacy / telemetry"): the switches cloudseg/__init__.py sets, for the
# executables ui/dashboard/lab run directly. CLOUDSEG_TELEMETRY=1 leaves the libraries' own defaults.
ifeq ($(filter 1 true yes on TRUE YES ON,$(CLOUDSEG_TELEMETRY)),)
export MLFLOW_DISABLE_TELEMETRY ?= true
export NO_ALBUMENTATIONS_UPDATE ?= 1
export HF_HUB_DISABLE_TELEMETRY ?= 1
LAB_PRIVACY := --LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate --LabApp.news_url=None \
  --LabApp.extension_manager=readonly
endif

.PHONY: help setup demo test test-fast ui screenshots dashboard lab runtime-env real-best gpu-check clean-stores

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(STAMP)  ## create or refresh .venv (idempotent)

$(STAMP): setup.cfg pyproject.toml
	@if [ ! -x $(PY) ] || [ "$$(cat $(STAMP) 2>/dev/null)" != "$(DEPS_HASH)" ]; then \
	  echo "[setup] building $(VENV) with $(PYTHON_BASE)"; \
	  [ -x $(PY) ] || $(PYTHON_BASE) -m venv $(VENV); \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(PY) -m pip install -q -e '.[dev]' && echo "$(DEPS_HASH)" > $(STAMP); \
	else touch $(STAMP); fi

demo: setup  ## the main job on the synthetic default (verified in the runtime's versions where they can be built)
	-@bash scripts/make_runtime_env.sh || echo "[demo] no .venv-runtime: the zip is verified with .venv's torch"
	-@bash scripts/ensure_bwrap.sh
	$(PY) scripts/demo.py

test: setup  ## the whole suite (starts and stops the services it needs)
	@# the competition runtime's versions, for the tests that run main.py there: where it cannot be built they
	@# skip, except under CI=true, where that is a failure (as for every service the suite needs)
	@bash scripts/make_runtime_env.sh || { \
	  case "$${CI,,}" in 1|true|yes) \
	    echo "[test] error: .venv-runtime could not be built (see above); under CI=true the runtime tests are" \
	      "required: fix the build (make runtime-env) or give RUNTIME_PYTHON a Python 3.9" >&2; exit 1;; esac; \
	  echo "[test] no .venv-runtime: the tests that need it will skip (build it with make runtime-env)"; }
	-@bash scripts/ensure_bwrap.sh
	@# a headless Chromium for the MLflow UI test; it skips where none can be had (and fails under CI=true)
	-@bash scripts/ensure_browser.sh || echo "[test] no Chromium: the browser test will skip"
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup  ## the quick lane: the suite without the slow and postgres tests (a few minutes)
	-@bash scripts/ensure_bwrap.sh
	$(PY) -m pytest -m "not slow and not postgres" $(PYTEST_ARGS)

ui: setup  ## MLflow UI for this repository's store; open the address it prints (UI_PORT=0: any free port)
	$(PY) -m cloudseg.tracking.ui --host $(HOST) --port $(UI_PORT)

screenshots: setup  ## the README's MLflow UI pictures (docs/images/) from the demo's store, in headless Chromium
	bash scripts/ensure_browser.sh
	$(PY) scripts/screenshots.py

dashboard: setup  ## optuna-dashboard for optuna.db
	$(VENV)/bin/optuna-dashboard --host $(HOST) --port 8080 sqlite:///$(CURDIR)/optuna.db

lab: setup  ## Jupyter Lab on the notebooks
	$(VENV)/bin/jupyter lab --ip $(HOST) --no-browser $(if $(filter 0,$(shell id -u)),--allow-root,) $(LAB_PRIVACY) notebooks/

runtime-env:  ## .venv-runtime: the competition runtime's Python 3.9 and pinned packages
	bash scripts/make_runtime_env.sh

real-best: setup  ## train the best real-data recipe, promote submissions/real-best/, verify it
	-@bash scripts/ensure_bwrap.sh
	$(PY) scripts/real_best.py $(if $(DATA),--data $(DATA),)

gpu-check: setup  ## every CUDA path on this machine's GPUs (sized for ~5 min); without a GPU it says so and exits 0
	$(PY) experiments/gpu_check.py
