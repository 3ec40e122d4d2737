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
from fedmoe_app.budgets import BUDGET_FIELDS
from fedmoe_app.startup import PHASE_METRICS
from fedmoe_app.system import peak_rss_mb
from fedmoe_app.tasks import Task
from strategies.replies import Reply, train_loss

# The keys of the aggregated client-evaluation MetricRecord (a Flower Result's evaluate_metrics_clientapp),
# for the task's primary metric (e.g. accuracy-mean, accuracy-worst, accuracy.rpi4).
METRIC_MEAN, METRIC_WORST, METRIC_OF_TIER = "{metric}-mean", "{metric}-worst", "{metric}.{tier}"

# Train metrics a round record keeps per client (snake_case), besides its budget.
CLIENT_METRICS = (msg.NUM_EXAMPLES, msg.SAMPLES_PROCESSED, msg.STEPS, msg.STEP_SECONDS, msg.TRAIN_SECONDS,
                  msg.PEAK_RSS_MB, msg.BYTES_DOWN, msg.BYTES_UP, *PHASE_METRICS)


@dataclass
class RoundState:
    """The round under way: whom it sampled, the messages it sent (their ids are set once
    sent) and the tensors each node was sent to train, who failed and why, the replies that
    passed every check, the wall seconds of its phases, and its head calibration."""

    server_round: int
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
    record.update({name: getattr(node.budget, name) for name in BUDGET_FIELDS})
    record.update({k.replace("-", "_"): reply.metrics[k] for k in CLIENT_METRICS if k in reply.metrics})
    return record


def round_record(state: RoundState, wall_time_s: float, server_eval: MetricRecord | None,
                 client_eval: MetricRecord | None, tiers: list[str], extra: dict[str, Any], task: Task) -> dict:
    """The metrics.jsonl line of a finished round; per-client fields keyed by client id.
    `tiers`: the tiers client evaluation may report; `extra`: the strategy's own fields;
    `task`: names the evaluation's fields (`global_<metric>`, `client_<primary metric>...`)."""
    client_eval = client_eval or {}
    replies = state.replies
    by_tier = sorted({r.node.tier for r in replies})
    primary = task.primary.name
    per_tier = {t: METRIC_OF_TIER.format(metric=primary, tier=t) for t in tiers}
    return {
        "round": state.server_round,
        "wall_time_s": wall_time_s,
        "phase_seconds": dict(state.phases),
        **task.record_fields(server_eval),
        "global_test_rows": int(server_eval[msg.NUM_EXAMPLES]) if server_eval and msg.NUM_EXAMPLES in server_eval else None,
        f"client_{primary}": {t: client_eval[key] for t, key in per_tier.items() if key in client_eval},
        f"client_{primary}_mean": client_eval.get(METRIC_MEAN.format(metric=primary)),
        f"client_{primary}_worst": client_eval.get(METRIC_WORST.format(metric=primary)),
        "train_loss": train_loss(replies) if replies else None,
        "bytes_down": {r.node.client_id: int(r.metrics[msg.BYTES_DOWN]) for r in replies},
        "bytes_up": {r.node.client_id: int(r.metrics[msg.BYTES_UP]) for r in replies},
        "step_seconds": {t: float(np.mean([float(r.metrics[msg.STEP_SECONDS]) for r in replies if r.node.tier == t]))
                         for t in by_tier},
        "peak_rss_mb": {t: max(float(r.metrics[msg.PEAK_RSS_MB]) for r in replies if r.node.tier == t) for t in by_tier},
        "server_peak_rss_mb": peak_rss_mb(),
        "clients": {r.node.client_id: client_record(r) for r in replies},
        "calibration": state.calibration,
        "num_replies": len(replies),
        "failures": len(state.failures),
        "failed_nodes": list(state.failures),
        **extra,
    }
