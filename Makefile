# fedmoe: `make run` (default federated job) and `make test`. Everything installs itself.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# Flower keeps its connections and the local SuperLink's state under FLWR_HOME.
export FLWR_HOME ?= $(CURDIR)/.flwr
# SuperLinks would install app dependencies at run time with uv; ours are installed here.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export PATH := $(BIN):$(PATH)

# AG News beside the repository when present; otherwise the run picks its dataset itself.
DATA_DIR ?= $(firstword $(wildcard $(abspath $(CURDIR)/../shared/data/ag_news)))
RESULTS_DIR ?= $(CURDIR)/results
CONFIG ?= conf/fft_moe.yaml
OVERRIDES ?=
PYTEST_ARGS ?=

.PHONY: install run test stop clean flwr-config

install: $(STAMP)

# torch first, pinned: any other order or range pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

flwr-config: $(FLWR_HOME)/config.toml

$(FLWR_HOME)/config.toml: conf/flwr-config.toml
	mkdir -p $(FLWR_HOME)
	cp conf/flwr-config.toml $@

run: install flwr-config
	$(BIN)/flwr run . local-simulation --stream --run-config \
	  "config='$(CONFIG)' overrides='$(OVERRIDES)' results-dir='$(RESULTS_DIR)' data-dir='$(DATA_DIR)'"

test: install flwr-config
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Stop the local SuperLink that `flwr run` started (it outlives the command).
stop:
	-pkill -f "flower-superlink.*$(FLWR_HOME)/local-superlink" && echo "local SuperLink stopped"

clean: stop
	rm -rf $(VENV) $(FLWR_HOME) .pytest_cache
