"""SparseStrategy: per-node messages, sparse key-wise aggregation, and the round loop.

A concrete strategy says only what makes its method different, through these hooks:
`arrays_for` (what a node receives), `config_for` (extra per-node config), `weights_for`
(each reply's weight per tensor), `contribution_of` (what a reply adds to the average),
`aggregate` (the new global tensors; default: the sparse core over the two before),
`update_state` (what it learns from the replies, e.g. the next expert subsets) and
`state_dict` / `load_state_dict` (that knowledge, JSON-able, for resuming a run).

Per-client knowledge is keyed by the client id a node reports (stable across restarts of
the node), never by Flower's node id.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedmoe_app import messages as msg
from fedmoe_app.budgets import BUDGET_FIELDS, DeviceBudget
from fedmoe_app.config import ConfigError, RunConfig, config_to_yaml
from fedmoe_app.records import from_record, to_record, trained_from, unflatten
from fedmoe_app.routing import utilisation
from fedmoe_app.startup import PHASE_METRICS
from fedmoe_app.system import peak_rss_mb
from strategies.core import Contribution, Weight, sparse_weighted_average


@dataclass(frozen=True)
class Node:
    """What the server knows of a node (from its query reply): its stable client id, its
    budget and the number of rows it trains on."""

    node_id: int
    client_id: str
    budget: DeviceBudget
    num_examples: int

    @property
    def tier(self) -> str:
        """The node's device tier."""
        return self.budget.tier


@dataclass
class Reply:
    """A successful train reply, decoded."""

    node: Node
    arrays: dict[str, np.ndarray]
    metrics: MetricRecord
    request: ConfigRecord


@dataclass
class RoundState:
    """The round under way: whom it sampled and messaged, who failed and why, the decoded
    replies, and the wall seconds of its phases."""

    server_round: int
    sampled: list[int] = field(default_factory=list)  # node ids drawn for training
    sent: list[Message] = field(default_factory=list)  # the last messages sent (their ids are set once sent)
    failures: list[dict] = field(default_factory=list)  # node_id, client_id, tier, reason
    replies: list[Reply] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)

    def asked(self) -> dict[str, int]:
        """Message id -> node id of the last messages sent."""
        return {m.metadata.message_id: m.metadata.dst_node_id for m in self.sent}


def examples(reply: Reply) -> int:
    """The local training rows of the client behind a reply."""
    return int(reply.metrics[msg.NUM_EXAMPLES])


def train_loss(replies: list[Reply]) -> float:
    """Example-weighted mean task loss of the replies."""
    total = sum(examples(r) for r in replies)
    return sum(float(r.metrics[msg.TRAIN_LOSS]) * examples(r) for r in replies) / max(total, 1)


CLIENT_METRICS = (msg.NUM_EXAMPLES, msg.SAMPLES_PROCESSED, msg.STEPS, msg.STEP_SECONDS, msg.TRAIN_SECONDS,
                  msg.PEAK_RSS_MB, msg.BYTES_DOWN, msg.BYTES_UP, *PHASE_METRICS)


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall seconds of the `with` block in `phases[name]`."""
    start = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - start


def client_record(reply: Reply) -> dict:
    """What one node did this round: who it is, the budget it trained with, and its costs."""
    budget = reply.node.budget
    record: dict[str, Any] = {"client_id": reply.node.client_id, "tier": budget.tier}
    record.update({name: getattr(budget, name) for name in BUDGET_FIELDS})
    record.update({k.replace("-", "_"): reply.metrics[k] for k in CLIENT_METRICS if k in reply.metrics})
    return record


def node_from_query(node_id: int, content: RecordDict) -> Node:
    """The Node a query reply describes; ValueError if it is malformed."""
    try:
        info, budget = content[msg.NODE], content[msg.BUDGET]
        return Node(node_id, str(info[msg.CLIENT_ID]), DeviceBudget.from_record(dict(budget)), int(info[msg.NUM_EXAMPLES]))
    except (KeyError, TypeError, ConfigError) as error:
        raise ValueError(f"malformed query reply: {error}") from error


class SparseStrategy(Strategy):
    """Base of every fedmoe strategy (see the module docstring for the hooks)."""

    name = "sparse"

    def __init__(self, config: RunConfig, num_layers: int, on_round: Callable[[dict], None] | None = None) -> None:
        self.config = config
        self.num_layers = num_layers
        self.on_round = on_round or (lambda record: None)  # gets every round's record (results, console)
        self.nodes: dict[int, Node] = {}  # Flower node id -> Node, for the nodes of this server's life
        self.global_arrays: dict[str, np.ndarray] = {}
        self.random = random.Random(config.seed)
        self.round = RoundState(0)

    # ---- hooks -------------------------------------------------------------------------
    def arrays_for(self, node: Node, server_round: int) -> dict[str, np.ndarray]:
        """The global tensors node `node` receives this round (default: all)."""
        return self.global_arrays

    def config_for(self, node: Node, server_round: int) -> dict:
        """Extra per-node config entries (default: none)."""
        return {}

    def weights_for(self, reply: Reply) -> dict[str, Weight]:
        """The weight of each of the reply's tensors in the average (default: the client's
        training rows for every tensor, FedAvg's weighting)."""
        rows = float(examples(reply))
        return {key: rows for key in reply.arrays}

    def contribution_of(self, reply: Reply) -> dict[str, np.ndarray]:
        """The tensors a reply adds to the average (default: what the client trained)."""
        return reply.arrays

    def aggregate(self, replies: list[Reply]) -> dict[str, np.ndarray]:
        """The new global tensors from this round's replies (default: the sparse key-wise
        weighted average of `contribution_of` by `weights_for`). A strategy whose replies
        change shapes overrides it."""
        contributions = [Contribution(self.contribution_of(r), self.weights_for(r)) for r in replies]
        return sparse_weighted_average(self.global_arrays, contributions)

    def update_state(self, replies: list[Reply]) -> None:
        """Learn from this round's replies (default: nothing)."""

    def state_dict(self) -> dict[str, Any]:
        """What the strategy has learnt and drawn so far, JSON-able (for resuming a run)."""
        version, internal, gauss = self.random.getstate()
        return {"random": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`."""
        version, internal, gauss = state["random"]
        self.random.setstate((version, tuple(internal), gauss))

    # ---- Flower Strategy API -----------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "Strategy %s, %d rounds", self.name, self.config.rounds)

    def _message(self, node: Node, server_round: int, kind: str, config: ConfigRecord) -> Message:
        arrays = to_record(self.arrays_for(node, server_round), self.config.federation.wire_dtype)
        node_config = ConfigRecord({
            msg.RUN_CONFIG: config_to_yaml(self.config), **config, **self.config_for(node, server_round),
            msg.SERVER_ROUND: server_round,
        })
        return Message(content=RecordDict({msg.ARRAYS: arrays, msg.CONFIG: node_config}),
                       dst_node_id=node.node_id, message_type=kind)

    def _draw(self, node_ids: Iterable[int], fraction: float) -> list[int]:
        """`fraction` of `node_ids` (at least `min-nodes`, at most all), drawn with the run's
        seeded generator; sorted."""
        node_ids = sorted(node_ids)
        size = min(len(node_ids), max(self.config.federation.min_nodes, math.ceil(fraction * len(node_ids))))
        return sorted(self.random.sample(node_ids, size)) if size < len(node_ids) else node_ids

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Wait for `min-nodes` connected nodes, sample `fraction-train` of them (querying the
        new ones), and send each a message tailored by `arrays_for` and `config_for`."""
        if self.round.server_round != server_round:
            self.round = RoundState(server_round)
        self.global_arrays = from_record(arrays)
        _, connected = sample_nodes(grid, self.config.federation.min_nodes, 0)
        self.round.sampled = self._draw(connected, self.config.federation.fraction_train)
        self.discover(grid, self.round.sampled)
        self.round.sent = [self._message(self.nodes[n], server_round, MessageType.TRAIN, config)
                           for n in self.round.sampled if n in self.nodes]
        return self.round.sent

    def _send(self, grid: Grid, messages: Iterable[Message]) -> list[Message]:
        """Send the messages and wait for the replies (at most `federation.round-timeout`)."""
        self.round.sent = list(messages)
        return list(grid.send_and_receive(self.round.sent, timeout=self.config.federation.round_timeout))

    def _outcomes(self, replies: Iterable[Message]) -> list[tuple[int, RecordDict]]:
        """(node id, content) of each successful reply to the last messages sent. Every other
        node asked (error reply, e.g. the node died, or no reply in time) is logged and counted."""
        asked = self.round.asked()
        succeeded, answered = [], set()
        for message in replies:
            node_id = asked.get(message.metadata.reply_to_message_id, message.metadata.src_node_id)
            answered.add(node_id)
            if message.has_error():
                self._failed(node_id, message.error.reason)
            else:
                succeeded.append((node_id, message.content))
        for node_id in sorted(set(asked.values()) - answered):
            self._failed(node_id, f"no reply within federation.round-timeout ({self.config.federation.round_timeout} s)")
        return succeeded

    def _failed(self, node_id: int, reason: str) -> None:
        node = self.nodes.get(node_id)
        tier, client_id = (node.tier, node.client_id) if node else ("unknown", "unknown")
        self.round.failures.append({"node_id": str(node_id), "client_id": client_id, "tier": tier, "reason": reason})
        log(WARNING, "node %s (%s, %s) failed: %s", node_id, client_id, tier, reason)

    def _decode(self, replies: Iterable[Message]) -> list[Reply]:
        """The successful, well-formed replies, each with its trained tensors: the global
        tensors that were sent plus the updates it sent back (`self.global_arrays` still holds
        what was sent). A malformed reply counts as its node's failure and is left out."""
        decoded = []
        for node_id, content in self._outcomes(replies):
            try:
                updates = self._checked_updates(content)
            except ValueError as error:
                self._failed(node_id, f"malformed reply: {error}")
                continue
            decoded.append(Reply(self.nodes[node_id], trained_from(self.global_arrays, updates),
                                 content[msg.METRICS], content.get(msg.REQUEST, ConfigRecord())))
        return decoded

    def _checked_updates(self, content: RecordDict) -> dict[str, np.ndarray]:
        """A train reply's updates, after checking that it names only global tensors, in
        their shapes, with finite values, and says how many rows it trained on."""
        if msg.ARRAYS not in content or msg.METRICS not in content:
            raise ValueError(f"it holds {sorted(content)}; a train reply needs '{msg.ARRAYS}' and '{msg.METRICS}'")
        rows = content[msg.METRICS].get(msg.NUM_EXAMPLES)
        if not isinstance(rows, int) or rows < 0:
            raise ValueError(f"metric '{msg.NUM_EXAMPLES}' is {rows!r}; allowed: an integer >= 0")
        updates = from_record(content[msg.ARRAYS])
        for key, update in updates.items():
            if key not in self.global_arrays:
                raise ValueError(f"tensor '{key}' is not in the global model")
            if update.shape != self.global_arrays[key].shape:
                raise ValueError(f"tensor '{key}' has shape {update.shape}; the global one {self.global_arrays[key].shape}")
            if not np.isfinite(update).all():
                raise ValueError(f"tensor '{key}' holds NaN or Inf")
        return updates

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """`aggregate` over the well-formed replies, if enough nodes replied; metrics of the round."""
        decoded = self._decode(replies)
        self.round.replies = decoded
        sampled = max(len(self.round.sampled), len(self.round.sent))
        needed = max(1, math.ceil(self.config.federation.min_reply_fraction * sampled))
        if len(decoded) < needed:
            log(WARNING, "round %d: %d of %d sampled nodes replied, federation.min-reply-fraction needs %d; "
                "the global model is unchanged", server_round, len(decoded), sampled, needed)
            return None, None
        self.global_arrays = self.aggregate(decoded)
        self.update_state(decoded)
        return to_record(self.global_arrays), MetricRecord({
            msg.TRAIN_LOSS: train_loss(decoded), msg.NUM_EXAMPLES: sum(examples(r) for r in decoded)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """`fraction-evaluate` of the connected nodes with a known budget evaluate their
        personalised model on their held-out slice."""
        self.global_arrays = from_record(arrays)
        known = [n for n in grid.get_node_ids() if n in self.nodes]
        sampled = self._draw(known, self.config.federation.fraction_evaluate)
        self.round.sent = [self._message(self.nodes[n], server_round, MessageType.EVALUATE, config) for n in sampled]
        return self.round.sent

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean, worst, and per-tier personalised accuracy."""
        results = []
        for node_id, content in self._outcomes(replies):
            metrics = content[msg.METRICS]
            if int(metrics[msg.NUM_EXAMPLES]) > 0:
                results.append((self.nodes[node_id].tier, int(metrics[msg.NUM_EXAMPLES]), float(metrics[msg.ACCURACY])))
        if not results:
            return None
        total = sum(n for _, n, _ in results)
        record = MetricRecord({
            "accuracy-mean": sum(n * a for _, n, a in results) / total,
            "accuracy-worst": min(a for _, _, a in results),
        })
        for tier in sorted({t for t, _, _ in results}):
            accs = [a for t, _, a in results if t == tier]
            record[f"accuracy.{tier}"] = sum(accs) / len(accs)
        return record

    # ---- node discovery ----------------------------------------------------------------
    def discover(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Ask nodes not yet known for their client id, budget and data size (one query
        message each); a malformed answer is the node's failure."""
        unknown = [n for n in node_ids if n not in self.nodes]
        if not unknown:
            return
        content = RecordDict({msg.CONFIG: ConfigRecord({msg.RUN_CONFIG: config_to_yaml(self.config)})})
        queries = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for node_id, reply in self._outcomes(self._send(grid, queries)):
            try:
                self.nodes[node_id] = node_from_query(node_id, reply)
            except ValueError as error:
                self._failed(node_id, str(error))

    # ---- the round loop ----------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run `num_rounds` rounds, as Flower's `Strategy.start` does (same arguments and
        Result), with what a fedmoe run needs beside it: nodes are queried for their budget
        up front, failures are counted, client-side and server-side evaluation run every
        `eval.every` rounds (and after the last), and `on_round` gets each round's record.
        `timeout` defaults to federation.round-timeout."""
        if timeout is not None and timeout != self.config.federation.round_timeout:
            self.config = _with_round_timeout(self.config, timeout)
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result(arrays=initial_arrays)
        t_start = time.time()
        arrays = initial_arrays
        # Learn every node's budget up front, so a node that dies later is still named with
        # its tier (nodes that join later are asked when sampled). A one-time cost per node.
        self.round = RoundState(0)
        _, connected = sample_nodes(grid, self.config.federation.min_nodes, 0)
        self.discover(grid, connected)
        server_eval = self._evaluate_on_server(0, arrays, evaluate_fn, result)
        self.on_round(self._round_record(t_start, server_eval, None))
        for server_round in range(1, num_rounds + 1):
            self.round = RoundState(server_round)
            with timed(self.round.phases, "train"):
                replies = self._send(grid, self.configure_train(server_round, arrays, train_config, grid))
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is None:
                log(WARNING, "round %d: no successful replies; the global model is unchanged", server_round)
            else:
                arrays = result.arrays = new_arrays
                result.train_metrics_clientapp[server_round] = train_metrics
            server_eval = client_eval = None
            if server_round % self.config.eval.every == 0 or server_round == num_rounds:
                if self.config.eval.client:
                    with timed(self.round.phases, "client_eval"):
                        eval_replies = self._send(grid, self.configure_evaluate(server_round, arrays, evaluate_config, grid))
                        client_eval = self.aggregate_evaluate(server_round, eval_replies)
                    if client_eval is not None:
                        result.evaluate_metrics_clientapp[server_round] = client_eval
                server_eval = self._evaluate_on_server(server_round, arrays, evaluate_fn, result)
            self.on_round(self._round_record(t_start, server_eval, client_eval))
        log(INFO, "Strategy %s finished %d rounds in %.0f s", self.name, num_rounds, time.time() - t_start)
        return result

    def _evaluate_on_server(self, server_round: int, arrays: ArrayRecord,
                            evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None,
                            result: Result) -> MetricRecord | None:
        if evaluate_fn is None:
            return None
        with timed(self.round.phases, "server_eval"):
            metrics = evaluate_fn(server_round, arrays)
        if metrics is not None:
            result.evaluate_metrics_serverapp[server_round] = metrics
        return metrics

    def _round_record(self, t_start: float, server_eval: MetricRecord | None, client_eval: MetricRecord | None) -> dict:
        client_eval = client_eval or {}
        replies = self.round.replies
        tiers = sorted({r.node.tier for r in replies})
        usage = self.utilisation(replies)
        return {
            "round": self.round.server_round,
            "wall_time_s": time.time() - t_start,
            "phase_seconds": dict(self.round.phases),
            "global_accuracy": server_eval[msg.ACCURACY] if server_eval else None,
            "global_loss": server_eval[msg.LOSS] if server_eval else None,
            "client_accuracy": {k.split(".", 1)[1]: v for k, v in client_eval.items() if k.startswith("accuracy.")},
            "client_accuracy_mean": client_eval.get("accuracy-mean"),
            "client_accuracy_worst": client_eval.get("accuracy-worst"),
            "train_loss": train_loss(replies) if replies else None,
            "expert_utilisation": usage.tolist() if usage is not None else None,
            "bytes_down": {str(r.node.node_id): int(r.metrics[msg.BYTES_DOWN]) for r in replies},
            "bytes_up": {str(r.node.node_id): int(r.metrics[msg.BYTES_UP]) for r in replies},
            "step_seconds": {t: float(np.mean([float(r.metrics[msg.STEP_SECONDS]) for r in replies if r.node.tier == t])) for t in tiers},
            "peak_rss_mb": {t: max(float(r.metrics[msg.PEAK_RSS_MB]) for r in replies if r.node.tier == t) for t in tiers},
            "server_peak_rss_mb": peak_rss_mb(),
            "clients": {str(r.node.node_id): client_record(r) for r in replies},
            "num_replies": len(replies),
            "failures": len(self.round.failures),
            "failed_nodes": list(self.round.failures),
        }

    def utilisation(self, replies: list[Reply]) -> np.ndarray | None:
        """[L, M] share of routed tokens per expert over the replies that report routing, or None."""
        return utilisation([unflatten(r.metrics[msg.ROUTED_TOKENS], self.num_layers)
                            for r in replies if msg.ROUTED_TOKENS in r.metrics])


def _with_round_timeout(config: RunConfig, timeout: float) -> RunConfig:
    """`config` with federation.round-timeout set to `timeout`."""
    return dataclasses.replace(config, federation=dataclasses.replace(config.federation, round_timeout=float(timeout)))
