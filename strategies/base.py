"""SparseStrategy: per-node messages, sparse key-wise aggregation, and the round loop.

A concrete strategy says only what makes its method different, through these hooks:
`arrays_for` (what a node receives), `config_for` (extra per-node config), `weights_for`
(each reply's weight per tensor), `contribution_of` (what a reply adds to the average),
`aggregate` (the round's average; default: the sparse core over the two before),
`to_average_space` / `from_average_space` (where a method averages something other than
the global tensors themselves, e.g. FlexLoRA's full products), `update_state` (what it
learns from the replies, e.g. the next expert subsets), `check_reply` (its own parts of a reply: metrics, requests), `round_metrics` (its own
fields in the round record) and `state_dict` / `load_state_dict` (what it has learnt,
JSON-able, for resuming a run). Replies are checked against what each node was sent
(strategies/replies.py) before any hook sees them. The server's step from the round's
average to the new global model (`federation.server-optimizer`: FedAvg, FedAvgM, FedAdam,
FedYogi) is the base's, the same for every method (strategies/server_optimizer.py), as is
head calibration after the last round (`calibration.method`, `calibrate_head`), and
SCAFFOLD's control variates (`train.drift-correction`, strategies/control_variates.py).

Per-client knowledge is keyed by the client id a node reports (stable across restarts of
the node), never by Flower's node id.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from logging import INFO, WARNING
from typing import Any, Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedmoe_app import messages as msg
from fedmoe_app.calibration import calibrated_head
from fedmoe_app.checkpoint import Checkpoint
from fedmoe_app.config import ConfigError, RunConfig, config_to_yaml
from fedmoe_app.records import from_record, gradient_wire_dtype, to_record
from fedmoe_app.schedule import round_lr
from strategies.control_variates import PREFIX as CONTROL_PREFIX
from strategies.control_variates import ControlVariates
from strategies.core import Contribution, Weight, sparse_weighted_average
from strategies.replies import (MalformedReply, Node, Reply, check_eval_metrics, decode_statistics, decode_train_reply,
                                examples, node_from_query, outliers, train_loss)
from strategies.server_optimizer import ServerOptimizer
from fedmoe_app.tasks import task_of
from strategies.rounds import METRIC_MEAN, METRIC_OF_TIER, METRIC_WORST, RoundState, round_record, timed


class SparseStrategy(Strategy):
    """Base of every fedmoe strategy (see the module docstring for the hooks)."""

    name = "sparse"
    # Whether a tensor means the same from one round to the next (SCAFFOLD's control variates
    # need it; FlexLoRA re-factorises its LoRA by SVD every round).
    keeps_parameterisation = True

    def __init__(self, config: RunConfig, num_layers: int, on_round: Callable[[dict], None] | None = None,
                 on_checkpoint: Callable[[Checkpoint], None] | None = None) -> None:
        self.config = config
        self.num_layers = num_layers
        self.on_round = on_round or (lambda record: None)  # gets every round's record (results, console)
        self.on_checkpoint = on_checkpoint or (lambda checkpoint: None)  # gets the run's state after every round
        self.nodes: dict[int, Node] = {}  # Flower node id -> Node, for the nodes of this server's life
        self.global_arrays: dict[str, np.ndarray] = {}
        self.random = random.Random(config.seed)
        self.round = RoundState(0)
        self.optimizer = ServerOptimizer(config.federation)
        self.task = task_of(config)  # names the metrics of evaluations
        self.control: ControlVariates | None = None  # train.drift-correction: scaffold
        self._control_clients: list[str] = []  # a resumed run's: whose control variates its checkpoint holds
        if config.train.drift_correction == "scaffold":
            if not self.keeps_parameterisation:
                raise ConfigError(f"config key 'train.drift-correction' is 'scaffold', but {self.name} changes the basis "
                                  "of its tensors every round, so a control variate would not carry over; allowed: none")
            self.control = ControlVariates()

    @property
    def config(self) -> RunConfig:
        """The run's configuration."""
        return self._config

    @config.setter
    def config(self, config: RunConfig) -> None:
        self._config = config
        self.config_yaml = config_to_yaml(config)  # sent with every message: serialised once

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
        """This round's average of the replies, in the space of `to_average_space` (default:
        the sparse key-wise weighted average of `contribution_of` by `weights_for`). A
        strategy whose replies change shapes overrides it."""
        contributions = [Contribution(self.contribution_of(r), self.weights_for(r)) for r in replies]
        return sparse_weighted_average(self.global_arrays, contributions)

    def to_average_space(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Global tensors in the form `aggregate` averages and the server optimiser steps
        (default: as they are)."""
        return arrays

    def from_average_space(self, averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global tensors of a stepped average (inverse of `to_average_space`; default: as they are)."""
        return averaged

    def update_state(self, replies: list[Reply]) -> None:
        """Learn from this round's replies (default: nothing)."""

    method_metrics: tuple[str, ...] = ()  # the train metrics its client half adds (checked by `check_reply`)
    method_requests: tuple[str, ...] = ()  # the requests its client half sends (checked by `check_reply`)

    def check_reply(self, reply: Reply) -> None:
        """Raise MalformedReply if the method-specific parts of a reply (metrics, request)
        are not what its client half sends (default: nothing to check)."""

    def round_metrics(self, replies: list[Reply]) -> dict[str, Any]:
        """The method's own fields in this round's record (default: none)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What the strategy has learnt and drawn so far, JSON-able (for resuming a run)."""
        version, internal, gauss = self.random.getstate()
        state: dict[str, Any] = {"random": [version, list(internal), gauss]}
        if self.control is not None:
            state["control_variate_clients"] = self.control.state_arrays()[0]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`."""
        version, internal, gauss = state["random"]
        self.random.setstate((version, tuple(internal), gauss))
        self._control_clients = list(state.get("control_variate_clients", []))

    def state_arrays(self) -> dict[str, np.ndarray]:
        """What the strategy keeps as tensors (the server optimiser's moments, the clients'
        control variates), for the checkpoint."""
        control = self.control.state_arrays()[1] if self.control is not None else {}
        return {**self.optimizer.state_arrays(), **control}

    def load_state_arrays(self, arrays: dict[str, np.ndarray], global_arrays: dict[str, np.ndarray]) -> None:
        """Continue from `state_arrays` saved beside `global_arrays` (after `load_state_dict`)."""
        control = {k: a for k, a in arrays.items() if k.startswith(CONTROL_PREFIX + "/")}
        if self.control is not None:
            self.control.load_state_arrays(self._control_clients, control)
        self.optimizer.load_state_arrays({k: a for k, a in arrays.items() if k not in control},
                                         self.to_average_space(global_arrays))

    # ---- Flower Strategy API -----------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "Strategy %s, %d rounds", self.name, self.config.rounds)

    def _message(self, node: Node, server_round: int, kind: str, config: ConfigRecord,
                 arrays: dict[str, np.ndarray], correction: dict[str, np.ndarray] | None = None) -> Message:
        node_config = ConfigRecord({
            msg.RUN_CONFIG: self.config_yaml, **config, **self.config_for(node, server_round),
            msg.SERVER_ROUND: server_round,
        })
        wire = self.config.federation.wire_dtype
        content = RecordDict({msg.ARRAYS: to_record(arrays, wire), msg.CONFIG: node_config})
        if correction:
            content[msg.CORRECTION] = to_record(correction, gradient_wire_dtype(wire))
        return Message(content=content, dst_node_id=node.node_id, message_type=kind)

    def _draw(self, node_ids: Iterable[int], fraction: float) -> list[int]:
        """`fraction` of `node_ids` (at least `min-nodes`, at most all), drawn with the run's
        seeded generator; in client-id order, so that a run with the same seed and clients
        draws (and FFT-MoE spreads experts) alike whatever node ids Flower hands out."""
        node_ids = sorted(node_ids, key=self._order)
        size = min(len(node_ids), max(self.config.federation.min_nodes, math.ceil(fraction * len(node_ids))))
        return sorted(self.random.sample(node_ids, size), key=self._order) if size < len(node_ids) else node_ids

    def _order(self, node_id: int) -> tuple[int, str, int]:
        """Sort key of a node: known nodes by client id, then unknown ones by node id."""
        node = self.nodes.get(node_id)
        return (0, node.client_id, node_id) if node else (1, "", node_id)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Wait for `min-nodes` connected nodes, sample `fraction-train` of them (querying the
        new ones), and send each a message tailored by `arrays_for` and `config_for`."""
        if self.round.server_round != server_round:
            self.round = RoundState(server_round)
        self.global_arrays = from_record(arrays)
        _, connected = sample_nodes(grid, self.config.federation.min_nodes, 0)
        self.round.sampled = self._draw(connected, self.config.federation.fraction_train)
        self.discover(grid, self.round.sampled)
        self.round.lr = round_lr(self.config.train, server_round, self.config.rounds)
        config = ConfigRecord({**config, msg.LR: self.round.lr, msg.PROXIMAL_MU: self.config.train.proximal_mu})
        variate = self.control.global_variate(self.global_arrays) if self.control is not None else {}
        messages = []
        for node_id in (n for n in self.round.sampled if n in self.nodes):
            node = self.nodes[node_id]
            sent = self.arrays_for(node, server_round)
            self.round.sent_arrays[node_id] = sent
            correction = self.control.correction_for(node.client_id, sent, variate) if self.control is not None else None
            messages.append(self._message(node, server_round, MessageType.TRAIN, config, sent, correction))
        self.round.train_messages = messages
        return messages

    def _send(self, grid: Grid, messages: Iterable[Message]) -> list[Message]:
        """Send the messages and wait for the replies (at most `federation.round-timeout`)."""
        return list(grid.send_and_receive(list(messages), timeout=self.config.federation.round_timeout))

    def _outcomes(self, messages: list[Message], replies: Iterable[Message]) -> list[tuple[int, RecordDict]]:
        """(node id, content) of each successful reply to `messages` (sent). Every other node
        asked (error reply, e.g. the node died, or no reply in time) is logged and counted."""
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
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
        """The successful replies that pass every check (`decode_train_reply`, `check_reply`,
        an update not far larger than the round's others); each other one counts as its
        node's failure, with the reason, and is left out."""
        decoded: dict[int, Reply] = {}
        for node_id, content in self._outcomes(self.round.train_messages, replies):
            try:
                reply = decode_train_reply(self.nodes[node_id], content, self.round.sent_arrays[node_id],
                                           self.method_metrics, self.method_requests,
                                           with_gradients=self.control is not None)
                self.check_reply(reply)
            except MalformedReply as error:
                self._failed(node_id, f"malformed reply: {error}")
                continue
            decoded[node_id] = reply
        rms = {n: r.update_rms for n, r in decoded.items()}
        for node_id, reason in outliers(rms, self.config.federation.max_update_ratio).items():
            self._failed(node_id, f"rejected reply: {reason}")
            del decoded[node_id]
        return list(decoded.values())

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """`aggregate` over the replies that pass every check, if enough nodes replied; the
        round's train metrics."""
        decoded = self._decode(replies)
        self.round.replies = decoded
        sampled = max(len(self.round.sampled), len(self.round.train_messages))
        needed = max(1, math.ceil(self.config.federation.min_reply_fraction * sampled))
        if len(decoded) < needed:
            log(WARNING, "round %d: %d of %d sampled nodes replied, federation.min-reply-fraction needs %d; "
                "the global model is unchanged", server_round, len(decoded), sampled, needed)
            return None, None
        current = self.to_average_space(self.global_arrays)
        self.global_arrays = self.from_average_space(self.optimizer.step(current, self.aggregate(decoded)))
        if self.control is not None:
            self.control.update(decoded, self.weights_for)
        self.update_state(decoded)
        return to_record(self.global_arrays), MetricRecord({
            msg.TRAIN_LOSS: train_loss(decoded), msg.NUM_EXAMPLES: sum(examples(r) for r in decoded)})

    def evaluates(self, server_round: int) -> bool:
        """Whether round `server_round` is evaluated: every `eval.every` rounds and the last."""
        return server_round % self.config.eval.every == 0 or server_round == self.config.rounds

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """In evaluated rounds (`eval.client` on), `fraction-evaluate` of the connected nodes
        with a known budget evaluate their personalised model on their held-out slice."""
        if not (self.config.eval.client and self.evaluates(server_round)):
            self.round.eval_messages = []
            return []
        self.global_arrays = from_record(arrays)  # what each node is sent below (train replies are decoded already)
        known = [n for n in grid.get_node_ids() if n in self.nodes]
        sampled = self._draw(known, self.config.federation.fraction_evaluate)
        self.round.eval_messages = [
            self._message(self.nodes[n], server_round, MessageType.EVALUATE, config, self.arrays_for(self.nodes[n], server_round))
            for n in sampled]
        return self.round.eval_messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean, worst, and per-tier mean of the task's primary metric over
        the personalised evaluations that pass their checks ('worst' is the lowest where
        higher is better, else the highest)."""
        primary = self.task.primary
        results = []
        for node_id, content in self._outcomes(self.round.eval_messages, replies):
            try:
                rows, values = check_eval_metrics(content, self.task.client_metrics)
            except MalformedReply as error:
                self._failed(node_id, f"malformed evaluate reply: {error}")
                continue
            if rows > 0:
                results.append((self.nodes[node_id].tier, rows, values[primary.name]))
        if not results:
            return None
        total = sum(n for _, n, _ in results)
        worst = min if primary.higher_is_better else max
        record = MetricRecord({
            METRIC_MEAN.format(metric=primary.name): sum(n * a for _, n, a in results) / total,
            METRIC_WORST.format(metric=primary.name): worst(a for _, _, a in results),
        })
        for tier in sorted({t for t, _, _ in results}):
            values = [a for t, _, a in results if t == tier]
            record[METRIC_OF_TIER.format(metric=primary.name, tier=tier)] = sum(values) / len(values)
        return record

    # ---- node discovery ----------------------------------------------------------------
    def discover(self, grid: Grid, node_ids: Iterable[int]) -> None:
        """Ask nodes not yet known for their client id, budget and data size (one query
        message each). A malformed answer, or a client id another connected node already
        has, is the node's failure."""
        unknown = [n for n in node_ids if n not in self.nodes]
        if not unknown:
            return
        content = RecordDict({msg.CONFIG: ConfigRecord({msg.RUN_CONFIG: self.config_yaml})})
        queries = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        connected = set(grid.get_node_ids())
        for node_id, reply in self._outcomes(queries, self._send(grid, queries)):
            try:
                node = node_from_query(node_id, reply)
            except MalformedReply as error:
                self._failed(node_id, str(error))
                continue
            twin = next((n for n in self.nodes.values() if n.client_id == node.client_id and n.node_id in connected), None)
            if twin is not None:
                self._failed(node_id, f"client id {node.client_id!r} is already node {twin.node_id}'s; "
                                      "give each node its own node_config client-id")
                continue
            self.nodes[node_id] = node

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
        *,
        first_round: int = 1,
    ) -> Result:
        """Run rounds `first_round`..`num_rounds`, as Flower's `Strategy.start` does (same
        arguments and Result), with what a fedmoe run needs beside it: nodes are queried for
        their budget up front, failures are counted, client-side and server-side evaluation
        run every `eval.every` rounds (and after the last), `on_round` gets every round's
        record and then `on_checkpoint` the run's state after it. `timeout` defaults to
        federation.round-timeout. To resume a run: `load_state_dict` its checkpoint's
        strategy state, pass its arrays and the round after it as `first_round`.

        (Flower's own `Strategy.start` can drive this strategy too, through the configure /
        aggregate methods; it then evaluates every round on the server and writes no round
        records or checkpoints.)"""
        if timeout is not None and timeout != self.config.federation.round_timeout:
            self.config = _with_round_timeout(self.config, timeout)
        if num_rounds != self.config.rounds:
            self.config = dataclasses.replace(self.config, rounds=num_rounds)
        self.summary()
        train_config = train_config or ConfigRecord()
        evaluate_config = evaluate_config or ConfigRecord()
        result = Result(arrays=initial_arrays)
        t_start = time.time()
        arrays = initial_arrays
        # Learn every node's budget up front, so a node that dies later is still named with
        # its tier (nodes that join later are asked when sampled). A one-time cost per node.
        self.round = RoundState(first_round - 1)
        _, connected = sample_nodes(grid, self.config.federation.min_nodes, 0)
        self.discover(grid, connected)
        if first_round == 1:
            server_eval = self._evaluate_on_server(0, arrays, evaluate_fn, result)
            self.on_round(self._round_record(t_start, server_eval, None))
        for server_round in range(first_round, num_rounds + 1):
            self.round = RoundState(server_round)
            with timed(self.round.phases, "train"):
                replies = self._send(grid, self.configure_train(server_round, arrays, train_config, grid))
                new_arrays, train_metrics = self.aggregate_train(server_round, replies)
            if new_arrays is None:
                log(WARNING, "round %d: no successful replies; the global model is unchanged", server_round)
            else:
                arrays = result.arrays = new_arrays
                result.train_metrics_clientapp[server_round] = train_metrics
            if server_round == num_rounds and self.config.calibration.method != "none":
                with timed(self.round.phases, "calibration"):
                    arrays = result.arrays = self.calibrate_head(grid, arrays)
            server_eval = client_eval = None
            if self.evaluates(server_round):
                messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
                if messages:
                    with timed(self.round.phases, "client_eval"):
                        client_eval = self.aggregate_evaluate(server_round, self._send(grid, messages))
                    if client_eval is not None:
                        result.evaluate_metrics_clientapp[server_round] = client_eval
                server_eval = self._evaluate_on_server(server_round, arrays, evaluate_fn, result)
            # The record before the checkpoint: a server killed between the two leaves a record
            # past the checkpoint, which a resume drops and redoes, never a round without a record.
            self.on_round(self._round_record(t_start, server_eval, client_eval))
            self.on_checkpoint(Checkpoint(server_round, self.name, from_record(arrays), self.state_dict(),
                                          self.state_arrays()))
        log(INFO, "Strategy %s finished rounds %d-%d in %.0f s", self.name, first_round, num_rounds, time.time() - t_start)
        return result

    def calibrate_head(self, grid: Grid, arrays: ArrayRecord) -> ArrayRecord:
        """The global arrays with the head refitted by calibration.method (CCVR,
        fedmoe_app/calibration.py): every connected node with a known budget reports the
        per-class moments of the global model's features on its training rows; the head is
        refitted on virtual features drawn from their pool. Nodes that fail are counted as
        in a round; with no valid reply the head stays as it is."""
        self.global_arrays = from_record(arrays)
        weight, bias = self.global_arrays["head.weight"], self.global_arrays["head.bias"]
        known = sorted((n for n in grid.get_node_ids() if n in self.nodes), key=self._order)
        messages = [self._message(self.nodes[n], self.round.server_round, msg.CALIBRATE, ConfigRecord(),
                                  self.global_arrays) for n in known]
        parts = []
        for node_id, content in self._outcomes(messages, self._send(grid, messages)):
            try:
                parts.append(decode_statistics(self.nodes[node_id], content, *weight.shape))
            except MalformedReply as error:
                self._failed(node_id, f"malformed calibrate reply: {error}")
        self.round.calibration = {"nodes": len(parts),
                                  "rows_by_class": [int(n) for n in sum(p.count for p in parts)] if parts else []}
        if not any(p.count.sum() for p in parts):
            log(WARNING, "head calibration: no node reported feature moments of any row; the head is unchanged")
            return arrays
        settings = self.config.calibration
        weight, bias = calibrated_head(weight, bias, parts, settings.virtual_per_class, settings.steps, settings.lr,
                                       seed=self.config.seed)
        self.global_arrays = {**self.global_arrays, "head.weight": weight, "head.bias": bias}
        log(INFO, "head calibration: refitted on the feature moments of %d nodes", len(parts))
        return to_record(self.global_arrays)

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
        tiers = sorted({node.tier for node in self.nodes.values()})
        return round_record(self.round, time.time() - t_start, server_eval, client_eval, tiers,
                            self.round_metrics(self.round.replies), self.task).as_dict()


def _with_round_timeout(config: RunConfig, timeout: float) -> RunConfig:
    """`config` with federation.round-timeout set to `timeout`."""
    return dataclasses.replace(config, federation=dataclasses.replace(config.federation, round_timeout=float(timeout)))
