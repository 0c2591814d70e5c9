# fedhosp: `make demo` (install + run the 5-region federation), `make test` (install + tests).
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Our machines hold a CPU build of torch 2.13.0 on disk; GPU users may set TORCH_SPEC="torch" or their own.
TORCH_SPEC ?= torch==2.13.0
# The demo keeps its data, MLflow store and models inside the checkout (`make clean` removes them).
export FEDHOSP_HOME ?= $(CURDIR)/.fedhosp
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true RAY_USAGE_STATS_ENABLED=0

.PHONY: install demo test bench bench-oncology bench-radiology bench-robustness deploy-local clean
SITES ?= 3
ROUNDS ?= 3
TASK ?= oncology

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/fedhosp run --sites 5 $(ARGS)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: bench-oncology bench-radiology bench-robustness

bench-oncology: install
	$(BIN)/python tests/bench_oncology.py $(ARGS)

bench-radiology: install
	$(BIN)/python tests/bench_radiology.py $(ARGS)

# One of five demo sites sends x1000-scaled updates: FedAvg with/without update validation vs Flower's robust strategies.
bench-robustness: install
	$(BIN)/python tests/bench_robustness.py $(ARGS)

# Coordinator + one SuperNode per site on 127.0.0.1: TLS, node authentication, MLflow server on PostgreSQL.
deploy-local: install
	$(BIN)/fedhosp deploy-local --sites $(SITES) --rounds $(ROUNDS) --task $(TASK)

clean:
	rm -rf .fedhosp .pytest_cache
