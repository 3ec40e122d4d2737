"""SparseStrategy: per-node messages, sparse key-wise aggregation, and the round loop.

A concrete strategy says only what makes its method different, through four hooks:
`arrays_for` (what a node receives), `config_for` (extra per-node config),
`weights_for` (each reply's weight per tensor) and `update_state` (what it learns from
the replies, e.g. the next expert subsets).
"""

from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Callable, Iterable, Iterator

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedmoe_app.config import RunConfig, config_to_yaml
from fedmoe_app.records import from_record, to_record, trained_from, unflatten
from fedmoe_app.system import peak_rss_mb
from strategies.core import Contribution, Weight, sparse_weighted_average


@dataclass
class NodeInfo:
    """What the server knows of a node: its budget and data size (from the query round)."""

    node_id: int
    tier: str
    experts_held: int
    top_k: int
    lora_rank: int
    num_examples: int


@dataclass
class Reply:
    """A successful train reply, decoded."""

    node: NodeInfo
    arrays: dict[str, np.ndarray]
    metrics: MetricRecord
    request: ConfigRecord


def examples(reply: Reply) -> int:
    """The local training rows of the client behind a reply."""
    return int(reply.metrics["num-examples"])


def train_loss(replies: list[Reply]) -> float:
    """Example-weighted mean task loss of the replies."""
    total = sum(examples(r) for r in replies)
    return sum(float(r.metrics["train-loss"]) * examples(r) for r in replies) / max(total, 1)


CLIENT_METRICS = ("num-examples", "samples-processed", "steps", "batch-size", "max-length", "top-k", "experts-held",
                  "step-seconds", "train-seconds", "peak-rss-mb", "bytes-down", "bytes-up",
                  "startup-seconds", "import-seconds", "data-seconds", "model-seconds")


@contextmanager
def timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall seconds of the `with` block in `phases[name]`."""
    start = time.perf_counter()
    yield
    phases[name] = time.perf_counter() - start


def client_record(reply: Reply) -> dict:
    """What one node did this round: its tier, the budget it trained with, and its costs."""
    record = {"tier": reply.node.tier}
    record.update({k.replace("-", "_"): reply.metrics[k] for k in CLIENT_METRICS if k in reply.metrics})
    return record


class SparseStrategy(Strategy):
    """Base of every fedmoe strategy (see the module docstring for the hooks)."""

    name = "sparse"
    adapter = "moe"  # which adapters the clients build: 'moe' or 'lora'

    def __init__(self, config: RunConfig, num_layers: int) -> None:
        self.config = config
        self.num_layers = num_layers
        self.nodes: dict[int, NodeInfo] = {}
        self.global_arrays: dict[str, np.ndarray] = {}
        self.random = random.Random(config.seed)
        self.failures: list[dict] = []  # this round's failed messages: node_id, tier, reason
        self.asked: dict[str, int] = {}  # message id -> node id, of the last `_send`
        self.num_sampled = 0
        self.last_replies: list[Reply] = []

    # ---- hooks -------------------------------------------------------------------------
    def arrays_for(self, node: NodeInfo, server_round: int) -> dict[str, np.ndarray]:
        """The global tensors node `node` receives this round (default: all)."""
        return self.global_arrays

    def config_for(self, node: NodeInfo, server_round: int) -> dict:
        """Extra per-node config entries (default: none)."""
        return {}

    def weights_for(self, reply: Reply) -> dict[str, Weight]:
        """The weight of each of the reply's tensors in the average."""
        raise NotImplementedError

    def contribution_of(self, reply: Reply) -> dict[str, np.ndarray]:
        """The tensors a reply adds to the average (default: what the client trained)."""
        return reply.arrays

    def update_state(self, replies: list[Reply]) -> None:
        """Learn from this round's replies (default: nothing)."""

    # ---- Flower Strategy API -----------------------------------------------------------
    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "Strategy %s (adapter: %s), %d rounds", self.name, self.adapter, self.config.rounds)

    def _message(self, node: NodeInfo, server_round: int, kind: str, config: ConfigRecord) -> Message:
        arrays = to_record(self.arrays_for(node, server_round), self.config.federation.wire_dtype)
        node_config = ConfigRecord({**config, **self.config_for(node, server_round), "server-round": server_round})
        content = RecordDict({"arrays": arrays, "config": node_config})
        return Message(content=content, dst_node_id=node.node_id, message_type=kind)

    def _draw(self, node_ids: Iterable[int], fraction: float) -> list[int]:
        """`fraction` of `node_ids` (at least `min-nodes`, at most all), drawn with the run's
        seeded generator; sorted."""
        node_ids = sorted(node_ids)
        size = min(len(node_ids), max(self.config.federation.min_nodes, math.ceil(fraction * len(node_ids))))
        return sorted(self.random.sample(node_ids, size)) if size < len(node_ids) else node_ids

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Wait for `min-nodes` connected nodes, sample `fraction-train` of them (querying the
        new ones), and send each a message tailored by `arrays_for` and `config_for`."""
        self.global_arrays = from_record(arrays)
        _, connected = sample_nodes(grid, self.config.federation.min_nodes, 0)
        sampled = self._draw(connected, self.config.federation.fraction_train)
        self.num_sampled = len(sampled)
        self.discover(grid, sampled)
        return [self._message(self.nodes[n], server_round, MessageType.TRAIN, config) for n in sampled if n in self.nodes]

    def _send(self, grid: Grid, messages: list[Message]) -> list[Message]:
        """Send the messages and wait for the replies (at most `federation.round-timeout`)."""
        replies = list(grid.send_and_receive(messages, timeout=self.config.federation.round_timeout))
        self.asked = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
        return replies

    def _outcomes(self, replies: Iterable[Message]) -> list[tuple[int, RecordDict]]:
        """(node id, content) of each successful reply to the last `_send`. Every other node
        asked (error reply, e.g. the node died, or no reply in time) is logged and counted."""
        succeeded, answered = [], set()
        for message in replies:
            node_id = self.asked.get(message.metadata.reply_to_message_id, message.metadata.src_node_id)
            answered.add(node_id)
            if message.has_error():
                self._failed(node_id, message.error.reason)
            else:
                succeeded.append((node_id, message.content))
        for node_id in sorted(set(self.asked.values()) - answered):
            self._failed(node_id, f"no reply within federation.round-timeout ({self.config.federation.round_timeout} s)")
        return succeeded

    def _failed(self, node_id: int, reason: str) -> None:
        node = self.nodes.get(node_id)
        tier = node.tier if node else "unknown"
        self.failures.append({"node_id": str(node_id), "tier": tier, "reason": reason})
        log(WARNING, "node %s (%s) failed: %s", node_id, tier, reason)

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
                                 content["metrics"], content.get("request", ConfigRecord())))
        return decoded

    def _checked_updates(self, content: RecordDict) -> dict[str, np.ndarray]:
        """A train reply's updates, after checking that it names only global tensors, in
        their shapes, with finite values, and says how many rows it trained on."""
        if "arrays" not in content or "metrics" not in content:
            raise ValueError(f"it holds {sorted(content)}; a train reply needs 'arrays' and 'metrics'")
        rows = content["metrics"].get("num-examples")
        if not isinstance(rows, int) or rows < 0:
            raise ValueError(f"metric 'num-examples' is {rows!r}; allowed: an integer >= 0")
        updates = from_record(content["arrays"])
        for key, update in updates.items():
            if key not in self.global_arrays:
                raise ValueError(f"tensor '{key}' is not in the global model")
            if update.shape != self.global_arrays[key].shape:
                raise ValueError(f"tensor '{key}' has shape {update.shape}; the global one {self.global_arrays[key].shape}")
            if not np.isfinite(update).all():
                raise ValueError(f"tensor '{key}' holds NaN or Inf")
        return updates

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sparse weighted average of the replies' tensors; metrics of the round."""
        decoded = self._decode(replies)
        self.last_replies = decoded
        sampled = max(self.num_sampled, len(self.asked))
        needed = max(1, math.ceil(self.config.federation.min_reply_fraction * sampled))
        if len(decoded) < needed:
            log(WARNING, "round %d: %d of %d sampled nodes replied, federation.min-reply-fraction needs %d; "
                "the global model is unchanged", server_round, len(decoded), sampled, needed)
            return None, None
        contributions = [Contribution(self.contribution_of(r), self.weights_for(r)) for r in decoded]
        self.global_arrays = sparse_weighted_average(self.global_arrays, contributions)
        self.update_state(decoded)
        return to_record(self.global_arrays), MetricRecord({"train-loss": train_loss(decoded), "num-examples": sum(examples(r) for r in decoded)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """`fraction-evaluate` of the connected nodes with a known budget evaluate their
        personalised model on their held-out slice."""
        self.global_arrays = from_record(arrays)
        known = [n for n in grid.get_node_ids() if n in self.nodes]
        sampled = self._draw(known, self.config.federation.fraction_evaluate)
        return [self._message(self.nodes[n], server_round, MessageType.EVALUATE, config) for n in sampled]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean, worst, and per-tier personalised accuracy."""
        results = []
        for node_id, content in self._outcomes(replies):
            metrics = content["metrics"]
            if int(metrics["num-examples"]) > 0:
                results.append((self.nodes[node_id].tier, int(metrics["num-examples"]), float(metrics["accuracy"])))
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
        """Ask nodes not yet known for their budget and data size (one query message each)."""
        unknown = [n for n in node_ids if n not in self.nodes]
        if not unknown:
            return
        content = RecordDict({"config": ConfigRecord({"run-config": config_to_yaml(self.config)})})
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown]
        for node_id, reply in self._outcomes(self._send(grid, messages)):
            info = reply["node"]
            self.nodes[node_id] = NodeInfo(
                node_id=node_id,
                tier=str(info["device-tier"]),
                experts_held=int(info["experts-held"]),
                top_k=int(info["top-k"]),
                lora_rank=int(info["lora-rank"]),
                num_examples=int(info["num-examples"]),
            )

    # ---- the round loop ----------------------------------------------------------------
    def start(  # type: ignore[override]
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
        on_round: Callable[[dict], None],
    ) -> ArrayRecord:
        """Run `num_rounds` rounds: train, client-side and server-side evaluation every
        `eval.every` rounds (and after the last); `on_round` gets each round's record."""
        self.summary()
        run_config = ConfigRecord({"run-config": config_to_yaml(self.config), "adapter": self.adapter})
        t_start = time.time()
        arrays = initial_arrays
        # Learn every node's budget up front, so a node that dies later is still named with
        # its tier (nodes that join later are asked when sampled). A one-time cost per node.
        _, connected = sample_nodes(grid, self.config.federation.min_nodes, 0)
        self.discover(grid, connected)
        phases: dict[str, float] = {}
        with timed(phases, "server_eval"):
            server_eval = evaluate_fn(0, arrays)
        on_round(self._round_record(0, t_start, server_eval, None, [], phases))
        for server_round in range(1, num_rounds + 1):
            self.failures, self.last_replies, phases = [], [], {}
            with timed(phases, "train"):
                replies = self._send(grid, list(self.configure_train(server_round, arrays, run_config, grid)))
                new_arrays, _ = self.aggregate_train(server_round, replies)
            if new_arrays is None:
                log(WARNING, "round %d: no successful replies; the global model is unchanged", server_round)
            else:
                arrays = new_arrays
            server_eval = client_eval = None
            if server_round % self.config.eval.every == 0 or server_round == num_rounds:
                if self.config.eval.client:
                    with timed(phases, "client_eval"):
                        eval_replies = self._send(grid, list(self.configure_evaluate(server_round, arrays, run_config, grid)))
                        client_eval = self.aggregate_evaluate(server_round, eval_replies)
                with timed(phases, "server_eval"):
                    server_eval = evaluate_fn(server_round, arrays)
            on_round(self._round_record(server_round, t_start, server_eval, client_eval, self.last_replies, phases))
        return arrays

    def _round_record(self, server_round: int, t_start: float, server_eval: MetricRecord | None,
                      client_eval: MetricRecord | None, replies: list[Reply], phases: dict[str, float]) -> dict:
        client_eval = client_eval or {}
        tiers = sorted({r.node.tier for r in replies})
        return {
            "round": server_round,
            "wall_time_s": time.time() - t_start,
            "phase_seconds": phases,
            "global_accuracy": server_eval["accuracy"] if server_eval else None,
            "global_loss": server_eval["loss"] if server_eval else None,
            "client_accuracy": {k.split(".", 1)[1]: v for k, v in client_eval.items() if k.startswith("accuracy.")},
            "client_accuracy_mean": client_eval.get("accuracy-mean"),
            "client_accuracy_worst": client_eval.get("accuracy-worst"),
            "train_loss": train_loss(replies) if replies else None,
            "expert_utilisation": self.utilisation(replies),
            "bytes_down": {str(r.node.node_id): int(r.metrics["bytes-down"]) for r in replies},
            "bytes_up": {str(r.node.node_id): int(r.metrics["bytes-up"]) for r in replies},
            "step_seconds": {t: float(np.mean([float(r.metrics["step-seconds"]) for r in replies if r.node.tier == t])) for t in tiers},
            "peak_rss_mb": {t: max(float(r.metrics["peak-rss-mb"]) for r in replies if r.node.tier == t) for t in tiers},
            "server_peak_rss_mb": peak_rss_mb(),
            "clients": {str(r.node.node_id): client_record(r) for r in replies},
            "num_replies": len(replies),
            "failures": len(self.failures),
            "failed_nodes": list(self.failures),
        }

    def utilisation(self, replies: list[Reply]) -> list[list[float]] | None:
        """[L][M] share of routed tokens per expert over this round's replies, or None."""
        counts = [unflatten(r.metrics["routed-tokens"], self.num_layers) for r in replies if "routed-tokens" in r.metrics]
        if not counts:
            return None
        total = np.sum(counts, axis=0)
        return (total / np.maximum(total.sum(axis=1, keepdims=True), 1)).tolist()
