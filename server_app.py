"""fedmoe ServerApp: config -> model -> strategy -> rounds -> results directory."""

import os
from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmoe_app.budgets import check_mix
from fedmoe_app.config import config_from_run_config, config_to_yaml
from fedmoe_app.data import load_splits
from fedmoe_app.model import build_model, num_layers, state_to_numpy
from fedmoe_app.records import from_record, to_record
from fedmoe_app.results import RunResults
from fedmoe_app.server import GlobalEvaluator, round_line, run_dir, summarise
from strategies import make_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy and write results/<run-name>/."""
    config = config_from_run_config(context.run_config, os.environ)
    check_mix(config)
    strategy = make_strategy(config, num_layers(config))
    splits = load_splits(config.data, config.seed)
    log(INFO, "fedmoe: strategy %s | dataset: %s", config.strategy, splits.source)

    model = build_model(config, splits.num_labels, strategy.adapter)
    log(INFO, "fedmoe: precision %s (%s); each client resolves train.precision on its own hardware",
        model.precision.name, model.precision.reason)
    results = RunResults(run_dir(config), config_to_yaml(config))
    log(INFO, "fedmoe: results go to %s", results.run_dir)

    def on_round(record: dict) -> None:
        results.log_round(record)
        log(INFO, "fedmoe: %s", round_line(record, config.rounds))

    initial = to_record(state_to_numpy(model))
    final = strategy.start(grid, initial, config.rounds, GlobalEvaluator(config, model), on_round)
    results.save_adapter(from_record(final), {"strategy": config.strategy, "backbone": config.model.backbone})
    results.write_summary(summarise(config, splits.source, results.rounds()))
    results.write_plots()
    log(INFO, "fedmoe: done | results in %s", results.run_dir)
