"""fedmoe ServerApp: config -> model -> strategy -> rounds -> results directory."""

import os
from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmoe_app.budgets import check_mix
from fedmoe_app.config import config_from_run_config, config_to_yaml
from fedmoe_app.data import load_splits
from fedmoe_app.methods import method_class
from fedmoe_app.model import num_layers, state_to_numpy
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
    splits = load_splits(config.data, config.seed)
    log(INFO, "fedmoe: strategy %s | dataset: %s", config.strategy, splits.source)

    model = method_class(config.strategy).global_model(config, splits.num_labels)
    log(INFO, "fedmoe: precision %s (%s); each client resolves train.precision on its own hardware",
        model.precision.name, model.precision.reason)
    results = RunResults(run_dir(config), config_to_yaml(config))
    log(INFO, "fedmoe: results go to %s", results.run_dir)

    def on_round(record: dict) -> None:
        results.log_round(record)
        log(INFO, "fedmoe: %s", round_line(record, config.rounds))

    strategy = make_strategy(config, num_layers(config), on_round)

    initial = to_record(state_to_numpy(model))
    result = strategy.start(grid, initial, num_rounds=config.rounds, evaluate_fn=GlobalEvaluator(config, model))
    results.save_adapter(from_record(result.arrays), {"strategy": config.strategy, "backbone": config.model.backbone})
    results.write_summary(summarise(config, splits.source, results.rounds()))
    results.write_plots()
    log(INFO, "fedmoe: done | results in %s", results.run_dir)
