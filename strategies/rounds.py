"""One round on the server: its state while it runs (RoundState) and the record it leaves
in metrics.jsonl (`round_record`; schema in fedmoe_app/results.py)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from flwr.app import Message, MetricRecord

from fedmoe_app import messages as msg
from fedmoe_app.startup import PHASE_METRICS
from fedmoe_app.system import peak_rss_mb
from fedmoe_app.tasks import Task
from strategies.replies import Reply, example_weighted, train_loss

# The keys of the aggregated client-evaluation MetricRecord (a Flower Result's evaluate_metrics_clientapp),
# for the task's primary metric (e.g. accuracy-mean, accuracy-worst, accuracy.rpi4).
METRIC_MEAN, METRIC_WORST, METRIC_OF_TIER = "{metric}-mean", "{metric}-worst", "{metric}.{tier}"

# Train metrics a round record keeps per client (snake_case), besides its budget.
CLIENT_METRICS = (msg.NUM_EXAMPLES, msg.SAMPLES_PROCESSED, msg.STEPS, msg.STEP_SECONDS, msg.TRAIN_SECONDS,
                  msg.PEAK_RSS_MB, msg.BYTES_DOWN, msg.BYTES_UP, msg.PROXIMAL_TERM, *PHASE_METRICS)


@dataclass
class RoundState:
    """The round under way: whom it sampled, the messages it sent (their ids are set once
    sent) and the tensors each node was sent to train, who failed and why, the replies that
    passed every check, the wall seconds of its phases, and its head calibration."""

    server_round: int
    lr: float | None = None  # the local learning rate sent with this round's train messages
    sampled: list[int] = field(default_factory=list)  # node ids drawn for training
    train_messages: list[Message] = field(default_factory=list)
    sent_arrays: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # node id -> tensors sent to train
    eval_messages: list[Message] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)  # node_id, client_id, tier, reason
    replies: list[Reply] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)
    calibration: dict | None = None  # head calibration after the last round: who reported, rows by class


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall seconds of the `with` block in `phases[name]`."""
    start = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - start


def client_record(reply: Reply) -> dict:
    """What one node did this round: who it is, the budget it trained with, and its costs."""
    node = reply.node
    record: dict[str, Any] = {"node_id": str(node.node_id), "tier": node.tier}
    record.update(node.budget.values)
    record.update({k.replace("-", "_"): reply.metrics[k] for k in CLIENT_METRICS if k in reply.metrics})
    return record


@dataclass
class RoundRecord:
    """One round's record (a line of metrics.jsonl, `as_dict`; schema in fedmoe_app/results.py).
    The evaluation's fields are named by the task: `global_<metric>` for each metric of its
    server evaluation (classification: accuracy, loss, recall; instruction: accuracy, loss,
    perplexity, accuracy_by_benchmark), `client_<primary>` (per tier), `_mean`, `_worst` for
    its personalised evaluation; `method_fields` are the strategy's own (expert utilisation, ...)."""

    round: int
    wall_time_s: float
    phase_seconds: dict[str, float]
    global_metrics: dict[str, Any]  # `global_<name>` -> value (None: not evaluated this round)
    global_test_rows: int | None
    client_metric: str  # the task's primary metric, which personalised evaluation reports
    client_by_tier: dict[str, float]
    client_mean: float | None
    client_worst: float | None
    train_loss: float | None
    lr: float | None  # the local learning rate sent this round
    proximal_term: float | None  # example-weighted mean of the clients' FedProx term (None: off)
    bytes_down: dict[str, int]  # client id -> bytes
    bytes_up: dict[str, int]
    step_seconds: dict[str, float]  # tier -> mean seconds per local step
    peak_rss_mb: dict[str, float]  # tier -> largest peak RSS a client process reported
    server_peak_rss_mb: float
    clients: dict[str, dict]  # client id -> `client_record`
    calibration: dict | None
    num_replies: int
    failed_nodes: list[dict]
    method_fields: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The metrics.jsonl line: flat, the task's and the method's fields by their names."""
        metric = self.client_metric
        return {
            "round": self.round, "wall_time_s": self.wall_time_s, "phase_seconds": self.phase_seconds,
            **self.global_metrics, "global_test_rows": self.global_test_rows,
            f"client_{metric}": self.client_by_tier, f"client_{metric}_mean": self.client_mean,
            f"client_{metric}_worst": self.client_worst, "train_loss": self.train_loss,
            "lr": self.lr, "proximal_term": self.proximal_term,
            "bytes_down": self.bytes_down, "bytes_up": self.bytes_up, "step_seconds": self.step_seconds,
            "peak_rss_mb": self.peak_rss_mb, "server_peak_rss_mb": self.server_peak_rss_mb, "clients": self.clients,
            "calibration": self.calibration, "num_replies": self.num_replies, "failures": len(self.failed_nodes),
            "failed_nodes": self.failed_nodes, **self.method_fields,
        }


def round_record(state: RoundState, wall_time_s: float, server_eval: MetricRecord | None,
                 client_eval: MetricRecord | None, tiers: list[str], extra: dict[str, Any], task: Task) -> RoundRecord:
    """The record of a finished round; per-client fields keyed by client id. `tiers`: the
    tiers client evaluation may report; `extra`: the strategy's own fields; `task`: names
    the evaluation's fields."""
    client_eval = client_eval or {}
    replies = state.replies
    by_tier = sorted({r.node.tier for r in replies})
    primary = task.primary.name
    per_tier = {t: METRIC_OF_TIER.format(metric=primary, tier=t) for t in tiers}
    return RoundRecord(
        round=state.server_round,
        wall_time_s=wall_time_s,
        phase_seconds=dict(state.phases),
        global_metrics=task.record_fields(server_eval),
        global_test_rows=int(server_eval[msg.NUM_EXAMPLES]) if server_eval and msg.NUM_EXAMPLES in server_eval else None,
        client_metric=primary,
        client_by_tier={t: client_eval[key] for t, key in per_tier.items() if key in client_eval},
        client_mean=client_eval.get(METRIC_MEAN.format(metric=primary)),
        client_worst=client_eval.get(METRIC_WORST.format(metric=primary)),
        train_loss=train_loss(replies) if replies else None,
        lr=state.lr,
        proximal_term=example_weighted(replies, msg.PROXIMAL_TERM),
        bytes_down={r.node.client_id: int(r.metrics[msg.BYTES_DOWN]) for r in replies},
        bytes_up={r.node.client_id: int(r.metrics[msg.BYTES_UP]) for r in replies},
        step_seconds={t: float(np.mean([float(r.metrics[msg.STEP_SECONDS]) for r in replies if r.node.tier == t]))
                      for t in by_tier},
        peak_rss_mb={t: max(float(r.metrics[msg.PEAK_RSS_MB]) for r in replies if r.node.tier == t) for t in by_tier},
        server_peak_rss_mb=peak_rss_mb(),
        clients={r.node.client_id: client_record(r) for r in replies},
        calibration=state.calibration,
        num_replies=len(replies),
        failed_nodes=list(state.failures),
        method_fields=extra,
    )
