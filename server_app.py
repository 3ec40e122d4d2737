"""fedmoe ServerApp: config -> model -> strategy -> rounds -> results directory."""

import os
from logging import INFO

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmoe_app.budgets import check_mix
from fedmoe_app.checkpoint import Checkpoint, save_checkpoint
from fedmoe_app.config import config_from_run_config, config_to_yaml
from fedmoe_app.methods import check_method_for_task, method_class
from fedmoe_app.model import num_layers, state_to_numpy
from fedmoe_app.records import from_record, to_record
from fedmoe_app.results import RunResults, this_process
from fedmoe_app.server import GlobalEvaluator, resumed_run, round_line, run_dir, summarise
from fedmoe_app.tasks import task_of
from strategies import make_strategy

app = ServerApp()


class RunStopped(Exception):
    """The user stopped the run (its status.json says `stopped`): end after this round."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy (or resume the stopped run `resume` names) and write
    results/<run-name>/, with a checkpoint after every round and a status that says how
    the run ended."""
    config = config_from_run_config(context.run_config, os.environ)
    checkpoint = None
    if config.resume:
        config, checkpoint = resumed_run(config)
    check_mix(config)
    check_method_for_task(config)
    task = task_of(config)
    splits = task.splits()
    log(INFO, "fedmoe: strategy %s | task %s | dataset: %s", config.strategy, config.task, splits.source)
    config = task.completed_config(splits)  # e.g. label names: clients, devices too, read their rows alike
    task = task_of(config)
    if splits.label_names:
        log(INFO, "fedmoe: labels are names: %s", ", ".join(f"{i} = {n}" for i, n in enumerate(splits.label_names)))

    model = method_class(config.strategy).global_model(config, splits.num_labels)
    log(INFO, "fedmoe: precision %s (%s); each client resolves train.precision on its own hardware",
        model.precision.name, model.precision.reason)
    if checkpoint is None:
        results = RunResults(run_dir(config), config_to_yaml(config))
        initial, first_round = state_to_numpy(model), 1
    else:
        results = RunResults.resume(run_dir(config), checkpoint.server_round)
        initial, first_round = checkpoint.arrays, checkpoint.server_round + 1
        log(INFO, "fedmoe: resuming %s after round %d", config.run_name, checkpoint.server_round)
    log(INFO, "fedmoe: results go to %s", results.run_dir)
    if splits.label_names:
        results.write_labels(splits.label_names)

    server = this_process()  # status.json names the process writing the run

    def on_round(record: dict) -> None:
        results.log_round(record)
        results.set_status("running", last_round=record["round"], rounds=config.rounds, server=server)
        log(INFO, "fedmoe: %s", round_line(record, config.rounds, task))

    def on_checkpoint(state: Checkpoint) -> None:
        save_checkpoint(results.run_dir, state)
        stopped = results.status().get("status") == "stopped"
        if stopped and state.server_round < config.rounds:  # the user stopped the run
            raise RunStopped(state.server_round)

    strategy = make_strategy(config, num_layers(config), on_round, on_checkpoint)
    if checkpoint is not None:
        strategy.load_state_dict(checkpoint.strategy_state)
        strategy.load_state_arrays(checkpoint.strategy_arrays, checkpoint.arrays)
    results.set_status("running", last_round=first_round - 1, rounds=config.rounds, server=server)
    try:
        result = strategy.start(grid, to_record(initial), num_rounds=config.rounds,
                                evaluate_fn=GlobalEvaluator(config, model), first_round=first_round)
    except RunStopped as stopped:
        log(INFO, "fedmoe: stopped by the user after round %d; continue with resume=%s", stopped.args[0], config.run_name)
        return
    except Exception as error:
        results.set_status("failed", error=f"{type(error).__name__}: {error}", last_round=results.last_round())
        raise
    results.save_adapter(from_record(result.arrays), {"strategy": config.strategy, "backbone": config.model.backbone})
    results.write_summary(summarise(config, splits.source, results.rounds()))
    results.write_plots()
    results.set_status("complete", last_round=config.rounds, rounds=config.rounds)
    log(INFO, "fedmoe: done | results in %s", results.run_dir)

