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

# Deployment on this machine (see docs/DEPLOY.md): one SuperNode per tier, `tls` or `insecure`.
DEPLOY_MODE ?= tls
DEPLOY_TIERS ?= rpi4,jetson-nano,jetson-orin
# Logs, keys and per-device data of deployments.
DEPLOY_DIR ?= $(CURDIR)/.deploy
# Credentials for real devices: the names / IPs the SuperLink is reached at, and how many nodes.
CERTS_DIR ?= $(DEPLOY_DIR)/credentials
SUPERLINK_HOSTS ?= 127.0.0.1,localhost
NODES ?= 3

.PHONY: install run test stop clean flwr-config deploy-local certs device-data bench-quick bench-skew bench bench-budgets bench-remedies

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

# Checks the config and data first, exits non-zero if the run fails; Ctrl-C stops the run (fedmoe_app/launch.py).
run: install flwr-config
	$(BIN)/python -m fedmoe_app.launch --config "$(CONFIG)" --overrides "$(OVERRIDES)" \
	  --results-dir "$(RESULTS_DIR)" --data-dir "$(DATA_DIR)"

# Both cores (TEST_WORKERS), a test file per worker at a time: a file's tests share its fixtures and order.
TEST_WORKERS ?= 2
test: install flwr-config
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Benchmarks (docs/RESULTS.md): results/bench/<suite>.json, .md and plots. Finished runs
# under results/bench/<suite>-runs/ are reused; BENCH_ARGS="--fresh" reruns them.
BENCH_ARGS ?=
bench-quick: install
	$(BIN)/python -m bench --suite quick --data-dir "$(DATA_DIR)" --out $(RESULTS_DIR)/bench $(BENCH_ARGS)

bench-skew: install
	$(BIN)/python -m bench --suite skew --data-dir "$(DATA_DIR)" --out $(RESULTS_DIR)/bench $(BENCH_ARGS)

bench: install
	$(BIN)/python -m bench --suite full --data-dir "$(DATA_DIR)" --out $(RESULTS_DIR)/bench $(BENCH_ARGS)

# UB-SMoE's table on our setup (bench/budgets.py): results/budgets/budgets.md and .json.
bench-budgets: install
	$(BIN)/python -m bench.budgets --data-dir "$(DATA_DIR)" --out $(RESULTS_DIR)/budgets $(BENCH_ARGS)

# Label-skew remedies and server optimisers in the headline cell (bench/remedies.py): results/remedies/.
bench-remedies: install
	$(BIN)/python -m bench.remedies --data-dir "$(DATA_DIR)" --out $(RESULTS_DIR)/remedies $(BENCH_ARGS)

# The headline cell's report from make bench's finished runs (bench/headline.py), printed.
bench-headline: install
	$(BIN)/python -m bench.headline --runs $(RESULTS_DIR)/bench/full-runs --data-dir "$(DATA_DIR)" $(BENCH_ARGS)

# Head calibration (ccvr) on the final models of those runs (bench/calibration.py): results/calibration/.
bench-calibration: install
	$(BIN)/python -m bench.calibration --runs $(RESULTS_DIR)/bench/full-runs --out $(RESULTS_DIR)/calibration $(BENCH_ARGS)

# Start a SuperLink and one SuperNode per tier on 127.0.0.1, run the app, stop them all.
deploy-local: install flwr-config
	$(BIN)/python -m deploy.local_federation --mode $(DEPLOY_MODE) --tiers $(DEPLOY_TIERS) \
	  --config $(CONFIG) --overrides "$(OVERRIDES)" --data-dir "$(DATA_DIR)" --results-dir $(RESULTS_DIR) \
	  --work-dir $(DEPLOY_DIR)

# TLS certificates for the SuperLink and key pairs for NODES SuperNodes (real devices).
certs: install
	$(BIN)/python -m deploy.credentials --out $(CERTS_DIR) --hosts $(SUPERLINK_HOSTS) --nodes $(NODES)

# Split the configured dataset into NODES per-device folders (copy one to each device).
device-data: install
	$(BIN)/python -m deploy.device_data --config $(CONFIG) --overrides "$(OVERRIDES)" \
	  --data-dir "$(DATA_DIR)" --devices $(NODES) --out $(DEPLOY_DIR)/devices

# Stop the local SuperLink that `flwr run` started (it outlives the command).
stop:
	-pkill -f "flower-superlink.*$(FLWR_HOME)/local-superlink" && echo "local SuperLink stopped"

clean: stop
	rm -rf $(VENV) $(FLWR_HOME) .pytest_cache $(DEPLOY_DIR)
