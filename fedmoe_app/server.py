"""Server-side pieces: global evaluation, the run directory, the console line of a round."""

from __future__ import annotations

import dataclasses
import time
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from fedmoe_app.backbones import load_tokenizer
from fedmoe_app.budgets import load_tiers
from fedmoe_app.checkpoint import Checkpoint, load_checkpoint
from fedmoe_app.config import ConfigError, RunConfig, config_from_yaml, config_to_dict, resolve_path
from fedmoe_app.model import AdapterModel, load_state
from fedmoe_app.records import from_record
from fedmoe_app.results import CONFIG_FILE, RunResults, best_round
from fedmoe_app.tasks import Task, task_of


def eval_max_length(config: RunConfig) -> int:
    """Tokens per test row of server-side evaluation: eval.max-length, or (0) the largest
    max-length any device tier trains with."""
    if config.eval.max_length:
        return config.eval.max_length
    return max(budget.max_length for budget in load_tiers(config.devices.file).values())


class GlobalEvaluator:
    """Evaluates global arrays on the central test split: a seeded subsample of
    eval.test-samples rows each evaluated round, of eval.final-test-samples after the last."""

    def __init__(self, config: RunConfig, model: AdapterModel) -> None:
        self.config = config
        self.model = model
        self.task = task_of(config)
        self.tokenizer = load_tokenizer(config.model.backbone)
        self.test_sets: dict[int, Any] = {}  # encoded (as the task evaluates them), by number of rows asked for

    def test_set(self, server_round: int):
        """The encoded test rows round `server_round` is scored on."""
        final = server_round == self.config.rounds
        samples = self.config.eval.final_test_samples if final else self.config.eval.test_samples
        if samples not in self.test_sets:
            self.test_sets[samples] = self.task.test_set(samples, self.tokenizer, eval_max_length(self.config))
        return self.test_sets[samples]

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """The task's metrics of `arrays` on the round's test rows."""
        load_state(self.model, from_record(arrays))
        return MetricRecord(self.task.evaluate(self.model, self.test_set(server_round), self.config.eval.batch_size))


def resumed_run(config: RunConfig) -> tuple[RunConfig, Checkpoint]:
    """The configuration and last checkpoint of the stopped run that `resume` names. Its own
    config.yaml governs: a resumed run continues as it was configured (differences in the
    launch's configuration are logged and ignored)."""
    folder = resolve_path(config.results_dir) / config.resume
    if not (folder / CONFIG_FILE).is_file():
        raise ConfigError(f"config key 'resume' is {config.resume!r}, but {folder} holds no {CONFIG_FILE}; "
                          f"allowed: the run-name of a run folder in results-dir {resolve_path(config.results_dir)}")
    writer = RunResults.at(folder)
    if writer.writer_running():
        server = writer.status()["server"]
        raise ConfigError(f"config key 'resume' is {config.resume!r}, but its ServerApp (process {server['pid']}) "
                          f"is still writing {folder}; resume it once that process has ended")
    saved = config_from_yaml((folder / CONFIG_FILE).read_text())
    saved = dataclasses.replace(saved, resume=config.resume, run_name=config.resume, results_dir=config.results_dir)
    ignored = _differing_keys(config_to_dict(config), config_to_dict(saved))
    if ignored:
        log(WARNING, "fedmoe: resuming %s with its own configuration; ignored from this launch: %s",
            config.resume, ", ".join(ignored))
    checkpoint = load_checkpoint(folder)
    if checkpoint.strategy != saved.strategy:
        raise ConfigError(f"checkpoint of run {config.resume!r} is of strategy {checkpoint.strategy!r}, "
                          f"its config.yaml says {saved.strategy!r}")
    return saved, checkpoint


def _differing_keys(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested config mappings."""
    keys = []
    for key in sorted(set(a) | set(b)):
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            keys += _differing_keys(a[key], b[key], f"{prefix}{key}.")
        elif a.get(key) != b.get(key):
            keys.append(prefix + key)
    return keys


def run_dir(config: RunConfig) -> Path:
    """results/<run-name>/, the name defaulting to <strategy>-<date>-<time>."""
    name = config.run_name or f"{config.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    return resolve_path(config.results_dir) / name


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 1e6:.2f} MB"


def round_line(record: dict, num_rounds: int, task: Task) -> str:
    """One readable console line summarising a round record (the global metrics `task` reports)."""
    parts = [f"round {record['round']:>2}/{num_rounds}"]
    if task.line(record):
        parts.append(task.line(record))
    primary = task.primary
    if record.get(f"client_{primary.name}_mean") is not None:
        parts.append(f"client {primary.label or primary.name} {record[f'client_{primary.name}_mean']:.3f} "
                     f"(worst {record[f'client_{primary.name}_worst']:.3f})")
    if record.get("train_loss") is not None:
        parts.append(f"train loss {record['train_loss']:.3f}")
    if record.get("lr") is not None:
        parts.append(f"lr {record['lr']:.2e}")
    if record.get("proximal_term") is not None:
        parts.append(f"prox {record['proximal_term']:.2e}")
    if record["num_replies"]:
        parts.append(f"down {_mb(sum(record['bytes_down'].values()))} up {_mb(sum(record['bytes_up'].values()))}")
        steps = " ".join(f"{t} {s:.2f}s" for t, s in record["step_seconds"].items())
        parts.append(f"step {steps}")
        rss = " ".join(f"{t} {mb:.0f}MB" for t, mb in record.get("peak_rss_mb", {}).items())
        parts.append(f"peak rss {rss}")
        parts.append(f"{record['num_replies']} replies")
    if record["failures"]:
        parts.append(f"{record['failures']} failed")
    parts.append(f"{record['wall_time_s']:.0f}s")
    return " | ".join(parts)


def memory_by_tier(config: RunConfig, rounds: list[dict]) -> dict[str, dict[str, float]]:
    """Per tier: the largest peak resident memory a client process reported, and the
    tier's RAM from the devices file (`ram-gb`, GiB as vendors mean it); both in MB (10^6 bytes)."""
    tiers = load_tiers(config.devices.file)
    peaks: dict[str, float] = {}
    for record in rounds:
        for tier, peak in record.get("peak_rss_mb", {}).items():
            peaks[tier] = max(peaks.get(tier, 0.0), peak)
    return {t: {"peak_rss_mb": round(p, 1), "ram_mb": round(tiers[t].ram_gb * 2**30 / 1e6, 1) if t in tiers else None}
            for t, p in sorted(peaks.items())}


def summarise(config: RunConfig, dataset: str, rounds: list[dict]) -> dict:
    """summary.json: the run's headline numbers, computed from its round records (the
    metrics the run's task reports: final, best and initial of the primary one)."""
    task = task_of(config)
    primary = task.primary.name
    trained = [r for r in rounds if r["round"] > 0]
    best = best_round(rounds, primary, task.primary.higher_is_better) or (None, None)
    last = rounds[-1]
    finals = {f"final_global_{m.name}": last.get(f"global_{m.name}") for m in task.metrics}
    finals.update({f"final_{k}": last.get(k) for k in task.record_fields(None) if f"final_{k}" not in finals})
    return {
        "strategy": config.strategy,
        "task": config.task,
        "backbone": config.model.backbone,
        "dataset": dataset,
        "partitioner": config.data.partitioner,
        "alpha": config.data.alpha,
        "rounds": config.rounds,
        "seed": config.seed,
        **finals,
        "final_test_rows": last.get("global_test_rows"),
        f"best_global_{primary}": best[1],
        "best_round": best[0],
        f"initial_global_{primary}": rounds[0].get(f"global_{primary}"),
        f"final_client_{primary}_mean": last.get(f"client_{primary}_mean"),
        f"final_client_{primary}_worst": last.get(f"client_{primary}_worst"),
        f"final_client_{primary}_by_tier": last.get(f"client_{primary}", {}),
        "bytes_down_total": sum(sum(r["bytes_down"].values()) for r in trained),
        "bytes_up_total": sum(sum(r["bytes_up"].values()) for r in trained),
        "failures_total": sum(r["failures"] for r in trained),
        "memory_by_tier": memory_by_tier(config, trained),
        "wall_time_s": last["wall_time_s"],
    }
