# First use of any target builds .venv and makes FashionMNIST available: nothing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SWEEP  ?= sweeps/fashion_mnist.yaml
PORT   ?= 5000
TRACKING_URI ?= $(or $(MLFLOW_TRACKING_URI),sqlite:///mlruns/mlflow.db)
SERVICES ?= .services
ARGS   ?=

.PHONY: install data browser services services-stop sweep ui serve export best confirm train test \
        bench bench-checkpoints bench-core bench-quality bench-scaling bench-slurm bench-suite gpu-check lint clean \
        docs docs-serve docs-screenshots

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,postgres,docs]'
	touch $@

data: install
	$(BIN)/optimsweep data

sweep: data
	$(BIN)/optimsweep sweep $(SWEEP) $(ARGS)

# Debian's chromium, for the test that drives the MLflow UI in a real browser, and tmux, for
# the one that reads the progress bar off a real terminal.
browser:
	@command -v chromium >/dev/null 2>&1 && command -v tmux >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium and tmux for the UI and terminal tests ..."; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends chromium tmux >/dev/null; \
	  else echo "chromium or tmux missing and not root: install them for the UI tests"; fi; }

# PostgreSQL (Optuna's storage) and an MLflow tracking server (records and artifacts) on
# loopback, for workers on many machines or in many folders: docs/guide/scaling-out.md.
services: install
	$(BIN)/optimsweep services start --dir $(SERVICES) $(ARGS)

services-stop: install
	$(BIN)/optimsweep services stop --dir $(SERVICES)

# Against a tracking server (MLFLOW_TRACKING_URI=http://...) the server is the UI.
# The address printed first shows the study's trials side by side, best first, as charts.
# One UI worker: one person reads one SQLite file; MLflow's default of four starts four
# processes that each import MLflow.
ui: install
ifneq (,$(filter http://% https://%,$(TRACKING_URI)))
	@echo "MLflow UI (the tracking server's own): all experiments at"
	@echo "  $(TRACKING_URI)/#/experiments?workflowType=machine_learning"
	-@$(BIN)/optimsweep url $(SWEEP) 2>/dev/null | sed 's/^/  trials of $(notdir $(SWEEP)): /'
else
	@mkdir -p mlruns
	@echo "MLflow UI on http://127.0.0.1:$(PORT) (Ctrl-C to stop)"
	-@$(BIN)/optimsweep url $(SWEEP) --port $(PORT) 2>/dev/null | sed 's/^/  trials of $(notdir $(SWEEP)): /'
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
	  $(BIN)/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT) --workers 1
endif

export: data
	$(BIN)/optimsweep export $(SWEEP) $(ARGS)

# The registered winner (`make export` registers it) served by MLflow itself:
# POST /invocations on 127.0.0.1:$(SERVE_PORT). MODEL: the registered model (the study's name).
MODEL ?= $(basename $(notdir $(SWEEP)))
SERVE_PORT ?= 5002
serve: install
	PATH="$(abspath $(BIN)):$$PATH" MLFLOW_TRACKING_URI=$(TRACKING_URI) \
	  $(BIN)/mlflow models serve -m "models:/$(MODEL)@$(or $(ALIAS),champion)" \
	  --env-manager local --host 127.0.0.1 --port $(SERVE_PORT)

best: install
	$(BIN)/optimsweep best $(SWEEP) $(ARGS)

confirm: data
	$(BIN)/optimsweep confirm $(SWEEP) $(ARGS)

train: data
	$(BIN)/optimsweep train $(ARGS)

# Tests in parallel workers, one per core (conftest.py gives each its share of torch's
# threads, and sends the server tests to one worker, which alone starts the servers).
TEST_WORKERS ?= auto
test: data browser docs
	$(BIN)/python -m pytest -n $(TEST_WORKERS) $(ARGS)

# The docs site (MkDocs, Material theme) into site/, strictly: a broken link, a missing page
# or a reference that can't be written from the code fails the build. docs-serve: on
# http://127.0.0.1:8000, rebuilt as the pages change.
DOCS_ENV := NO_MKDOCS_2_WARNING=1
docs: install
	$(DOCS_ENV) $(BIN)/mkdocs build --strict --quiet

docs-serve: install
	$(DOCS_ENV) $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

# The MLflow UI screenshot the README and the docs show, taken anew (about 2 minutes).
docs-screenshots: data browser
	$(BIN)/python docs/screenshots.py

# Trials per hour: fused against sequential, fp32 against bf16, Adam against SGD, the default
# study end to end (about 15 minutes on 2 cores), then what checkpoints cost a trial (5-10
# minutes more; alone: bench-checkpoints, ARGS to it), then time to quality: the default study
# with its median pruner and a hand-written Optuna peer for seed 0, Optuna's successive halving
# and ASHA for seeds 0, 1 and 2 (about 100 minutes at full scale; alone: bench-quality, ARGS to
# it, e.g. ARGS="--train-subset 2000 --val-size 1000 --epochs 3 --n-trials 6 --seeds 0").
# bench-core: the core against the tutorial.
bench: data
	$(BIN)/python benchmarks/bench_sweep.py --results docs/results $(ARGS)
	$(BIN)/python benchmarks/bench_checkpoints.py --results docs/results
	$(BIN)/python benchmarks/bench_time_to_quality.py --results docs/results

bench-quality: data
	$(BIN)/python benchmarks/bench_time_to_quality.py --results docs/results $(ARGS)

bench-checkpoints: data
	$(BIN)/python benchmarks/bench_checkpoints.py --results docs/results $(ARGS)

bench-core: data
	$(BIN)/python benchmarks/bench_core.py --results docs/results $(ARGS)

bench-scaling: install
	$(BIN)/python benchmarks/bench_scaling.py --results docs/results $(ARGS)

# One study by 1, 2 and 4 Slurm array tasks against --workers 1, 2 and 4, on a one-machine
# Slurm (installed with apt-get when run as root), and what Slurm adds per task start.
bench-slurm: install
	$(BIN)/python benchmarks/bench_slurm.py --results docs/results $(ARGS)

# The CUDA path on a machine with GPUs: one worker per GPU, fused against alone, resume.
gpu-check: data
	$(BIN)/python benchmarks/gpu_check.py $(ARGS)

# The test suite on slow cores (a busy loop on each), against e963250's suite, alternated
# A B B A: about 45 minutes on 2 cores. ARGS="--avx2" holds torch to AVX2 as well.
bench-suite: data browser
	$(BIN)/python benchmarks/bench_suite.py --results docs/results $(ARGS)

lint: install
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
