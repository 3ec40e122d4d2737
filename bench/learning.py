"""Learning benchmarks: federated runs of every strategy on each data split and device
population (real `flwr run` simulations), read back from their results directories, and
the centralised ceiling trained on all the data for the same number of sample-steps."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from bench.simulation import LocalSimulation
from bench.suites import HEADLINE, PARTITIONS, Suite
from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import RunConfig, load_config
from fedmoe_app.batches import encode, iterate_batches
from fedmoe_app.data import load_splits
from fedmoe_app.methods import method_class
from fedmoe_app.model import state_to_numpy
from fedmoe_app.backbones import load_tokenizer
from fedmoe_app.records import to_record
from fedmoe_app.results import SUMMARY_FILE, read_rounds
from fedmoe_app.server import GlobalEvaluator
from fedmoe_app.train import train_local
from fedmoe_app.tasks.classification import classifier_loss

CEILING_BATCH_SIZE = 32


def strategy_file(strategy: str) -> str:
    """The config file of a registered strategy."""
    return f"conf/{strategy}.yaml"


def mix_overrides(config: RunConfig, mix: str) -> str:
    """Run-config overrides for a device population: `mixed` keeps the configured mix,
    `high` gives every client the tier with the most experts held, then the largest batch."""
    if mix == "mixed":
        return ""
    tiers = load_tiers(config.devices.file)
    high = max(tiers.values(), key=lambda t: (t.experts_held, t.batch_size * t.local_steps))
    shares = {name: (1 if name == high.tier else 0) for name in {*config.devices.simulation_mix, high.tier}}
    return " ".join(f"devices.simulation-mix.{name}={share}" for name, share in sorted(shares.items()))


def cell_name(strategy: str, partition: str, mix: str, seed: int) -> str:
    """Directory name of one learning run."""
    return f"{strategy}-{partition}-{mix}-s{seed}"


def cell_overrides(suite: Suite, strategy: str, partition: str, mix: str, seed: int, data_dir: str) -> str:
    """All run-config overrides of one learning run (the headline cell's with its own rounds and overrides)."""
    config = load_config(strategy_file(strategy))
    headline = (partition, mix) == HEADLINE
    rounds = (suite.headline_rounds or suite.rounds) if headline else suite.rounds
    return " ".join(filter(None, [
        f"rounds={rounds} seed={seed} run-name={cell_name(strategy, partition, mix, seed)}",
        f"data.data-dir={data_dir}" if data_dir else "",
        PARTITIONS[partition], mix_overrides(config, mix), suite.overrides, suite.headline_overrides if headline else "",
    ]))


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """summary.json and the round records of a finished run."""
    return json.loads((run_dir / SUMMARY_FILE).read_text()), read_rounds(run_dir)


def first_reaching(rounds: list[dict], target: float) -> dict | None:
    """The first round record whose global accuracy reaches `target`, or None."""
    return next((r for r in rounds if (r["global_accuracy"] or 0.0) >= target), None)


def sample_steps(rounds: list[dict]) -> int:
    """Training examples processed by all clients over the run (examples x steps seen)."""
    # runs recorded before samples_processed existed reported samples as num_examples
    return sum(int(c.get("samples_processed", c["num_examples"])) for r in rounds for c in r.get("clients", {}).values())


def overhead_ratio(rounds: list[dict]) -> float | None:
    """Mean over rounds of the train phase's wall time over the sum of the clients' local
    training time (1.0 = no overhead with one client at a time; parallel clients push it below)."""
    ratios = []
    for r in rounds:
        compute = sum(float(c.get("train_seconds", 0.0)) for c in r.get("clients", {}).values())
        if compute > 0 and "train" in r.get("phase_seconds", {}):
            ratios.append(r["phase_seconds"]["train"] / compute)
    return sum(ratios) / len(ratios) if ratios else None


def cell_metrics(run_dir: Path, target: float) -> dict:
    """The learning and cost figures of one finished run."""
    summary, rounds = read_run(run_dir)
    reached = first_reaching(rounds, target)
    trained = [r for r in rounds if r["round"] > 0]
    return {
        "final_global_accuracy": summary["final_global_accuracy"],
        "final_global_recall": summary.get("final_global_recall"),
        "final_test_rows": summary.get("final_test_rows"),
        "rounds": summary["rounds"],
        "best_global_accuracy": summary["best_global_accuracy"],
        "client_accuracy_mean": summary["final_client_accuracy_mean"],
        "client_accuracy_worst": summary["final_client_accuracy_worst"],
        "target_accuracy": target,
        "rounds_to_target": reached["round"] if reached else None,
        "time_to_target_s": reached["wall_time_s"] if reached else None,
        "bytes_total": summary["bytes_down_total"] + summary["bytes_up_total"],
        "bytes_down_total": summary["bytes_down_total"],
        "bytes_up_total": summary["bytes_up_total"],
        "wall_time_s": summary["wall_time_s"],
        "sample_steps": sample_steps(trained),
        "overhead_ratio": overhead_ratio(trained),
        "server_peak_rss_mb": trained[-1].get("server_peak_rss_mb") if trained else None,
        "accuracy_by_round": [r["global_accuracy"] for r in rounds],
        "failures_total": summary["failures_total"],
    }


def simulate(simulation: LocalSimulation, runs_dir: Path, name: str, strategy: str, overrides: str,
             fresh: bool, log=print) -> Path:
    """Run `strategy` with `overrides` (which name the run `name`) unless a finished run of
    that name with the same number of rounds is there and not `fresh`; its results directory."""
    run_dir = runs_dir / name
    rounds = load_config(strategy_file(strategy), overrides).rounds
    finished = (run_dir / SUMMARY_FILE).is_file() and read_run(run_dir)[0]["rounds"] == rounds
    if fresh or not finished:
        if run_dir.is_dir():  # an unfinished run: a run never overwrites a metrics file
            for path in run_dir.iterdir():
                path.unlink()
        log(f"bench: run {name}")
        started = time.time()
        done = simulation.run(strategy_file(strategy), overrides, runs_dir)
        if not (run_dir / SUMMARY_FILE).is_file():
            raise RuntimeError(f"run {name} failed:\n{(done.stdout + done.stderr)[-3000:]}")
        log(f"bench: {name} done in {time.time() - started:.0f} s")
    return run_dir


def run_cells(suite: Suite, strategies: list[str], runs_dir: Path, data_dir: str, fresh: bool,
              log=print) -> list[dict]:
    """Run (or, unless `fresh`, reuse) every learning cell of the suite; one dict per cell."""
    cells = []
    with LocalSimulation(runs_dir / ".flwr", suite.num_clients) as simulation:
        for partition, mix, seed in suite.cells():
            for strategy in strategies:
                name = cell_name(strategy, partition, mix, seed)
                overrides = cell_overrides(suite, strategy, partition, mix, seed, data_dir)
                run_dir = simulate(simulation, runs_dir, name, strategy, overrides, fresh, log)
                cells.append({"strategy": strategy, "partition": partition, "mix": mix, "seed": seed,
                              "run_dir": str(run_dir), **cell_metrics(run_dir, suite.target_accuracy)})
    return cells


def train_centralised(config: RunConfig, steps: int, batch_size: int = CEILING_BATCH_SIZE) -> dict:
    """The ceiling: the global model of the configured method (all experts for MoE) trained on
    the whole training split for `steps` batches with the method's loss terms (no
    heterogeneity term: there is no global usage), scored as the federated runs' final
    models are (eval.final-test-samples)."""
    splits = load_splits(config.data, config.seed)
    largest = max(load_tiers(config.devices.file).values(), key=lambda t: t.max_length)
    max_length = largest.max_length
    tokenizer = load_tokenizer(config.model.backbone)
    train_set = encode(splits.train, tokenizer, max_length)
    kind = method_class(config.strategy)
    model = kind.global_model(config, splits.num_labels)
    method = kind(config, largest, [], {})
    batches = iterate_batches(train_set, batch_size, tokenizer.pad_token_id, shuffle=True, seed=config.seed,
                              num_batches=steps, group_by_length=config.train.group_by_length)
    started = time.perf_counter()
    result = train_local(model, batches, steps, config.train.lr, config.train.weight_decay, method, classifier_loss())
    seconds = time.perf_counter() - started
    evaluation = GlobalEvaluator(config, model)(config.rounds, to_record(state_to_numpy(model)))
    return {"accuracy": evaluation["accuracy"], "steps": result.steps, "batch_size": batch_size,
            "sample_steps": result.num_examples, "train_seconds": seconds, "max_length": max_length}


def run_ceilings(suite: Suite, strategies: list[str], cells: list[dict], runs_dir: Path, data_dir: str,
                 fresh: bool, log=print) -> list[dict]:
    """One centralised ceiling per strategy and device population, matching the sample-steps
    of that population's first federated run (the headline cell's for the mixed tiers;
    sample-steps do not depend on the split), scored on the same test rows as that run."""
    ceilings = []
    for strategy in strategies:
        for mix in dict.fromkeys(c["mix"] for c in cells):
            cell = next(c for c in cells if c["strategy"] == strategy and c["mix"] == mix)
            path = runs_dir / f"ceiling-{strategy}-{mix}.json"
            if fresh or not path.is_file():
                log(f"bench: centralised ceiling {strategy} {mix} ({cell['sample_steps']} sample-steps)")
                headline = (cell["partition"], cell["mix"]) == HEADLINE
                config = load_config(strategy_file(strategy), " ".join(filter(None, [
                    f"data.data-dir={data_dir}" if data_dir else "", suite.overrides,
                    suite.headline_overrides if headline else ""])))
                steps = math.ceil(cell["sample_steps"] / CEILING_BATCH_SIZE)
                path.write_text(json.dumps(train_centralised(config, steps)))
            ceilings.append({"strategy": strategy, "mix": mix, **json.loads(path.read_text())})
    return ceilings
