"""One client's work: its budget, its data, local training and personalised evaluation.

The same code runs in simulation and on a device; only where the node's information
comes from differs (node_config `partition-id` / `num-partitions` in simulation,
`device-tier` / `data-path` on a device).
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from fedmoe_app import startup
from fedmoe_app.batches import encode, iterate_batches
from fedmoe_app.budgets import resolve_budget
from fedmoe_app.config import RunConfig, config_from_yaml
from fedmoe_app.losses import heterogeneity_weight
from fedmoe_app.model import build_model, load_tokenizer, load_state, num_layers, state_to_numpy
from fedmoe_app.node import describe as describe_node
from fedmoe_app.records import flatten, held_experts, unflatten
from fedmoe_app.rows import ClientData, device_client_data
from fedmoe_app.system import peak_rss_mb
from fedmoe_app.token_cache import encode_csv
from fedmoe_app.train import evaluate, train_local

startup.mark("imports")


class ClientTask:
    """A node's budget and data for one run, and what it does with global tensors."""

    def __init__(self, config: RunConfig, node_config: Mapping[str, Any]) -> None:
        self.config = config
        self.budget = resolve_budget(node_config, config)
        self.partition_id = int(node_config.get("partition-id", 0))
        self.data = _client_data(config, node_config, self.partition_id)
        self.tokenizer = load_tokenizer(config.model.backbone)
        if self.data.csv_path is not None:  # a device: its train.csv's tokens are cached on disk
            encoded = encode_csv(self.data.csv_path, self.data.rows, self.tokenizer, self.budget.max_length)
        else:
            encoded = encode(self.data.rows, self.tokenizer, self.budget.max_length)
        self.train_set = encoded.select(self.data.train_index)
        self.holdout_set = encoded.select(self.data.holdout_index)
        self.num_layers = num_layers(config)
        startup.mark("data")

    def describe(self) -> dict[str, Any]:
        """What the server needs to tailor messages to this node."""
        return describe_node(self.budget, len(self.data.train_index))

    def model(self, arrays: Mapping[str, np.ndarray], adapter: str):
        """This node's model (its experts and top-k) holding `arrays`."""
        num_labels = arrays["head.weight"].shape[0]
        held = held_experts(list(arrays), self.num_layers) if adapter == "moe" else None
        model = build_model(self.config, num_labels, adapter, held=held, top_k=self.budget.top_k)
        load_state(model, arrays)
        startup.mark("model")
        return model

    def train(
        self, arrays: Mapping[str, np.ndarray], adapter: str, server_round: int,
        global_usage: Sequence[float] | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any], list[int]]:
        """Train on local data within the budget; return the trained tensors, the metrics,
        and (MoE) the experts this node asks to hold next round, flattened [L * held]."""
        start = time.perf_counter()
        torch.set_num_threads(self.config.train.threads)
        model = self.model(arrays, adapter)
        batches = iterate_batches(
            self.train_set, self.budget.batch_size, self.tokenizer.pad_token_id,
            shuffle=True, seed=self.config.seed + 1000 * server_round + self.partition_id,
            num_batches=self.budget.local_steps, group_by_length=self.config.train.group_by_length,
            length_multiple=model.precision.length_multiple,
        )
        usage = torch.tensor(unflatten(global_usage, self.num_layers), dtype=torch.float32) if global_usage else None
        het_weight = heterogeneity_weight(self.data.label_counts, self.budget.experts_held, self.config.moe.num_experts)
        result = train_local(
            model, _marking_first_step(batches), self.budget.local_steps, self.config.train.lr, self.config.train.weight_decay,
            self.config.loss, het_weight if adapter == "moe" else 0.0, usage,
        )
        metrics: dict[str, Any] = {
            "num-examples": len(self.data.train_index),  # Flower's convention: local training rows
            "samples-processed": result.num_examples,  # batch x local steps
            "steps": result.steps,
            "train-loss": result.loss,
            "step-seconds": result.step_seconds,
            "batch-size": self.budget.batch_size,
            "max-length": self.budget.max_length,
            "top-k": self.budget.top_k,
            "experts-held": self.budget.experts_held,
            "peak-rss-mb": peak_rss_mb(),
        }
        next_experts: list[int] = []
        if result.routing is not None:
            metrics["routed-tokens"] = [int(x) for x in result.routing.routed_tokens.reshape(-1)]
            metrics["gate-prob"] = flatten(result.routing.gate_prob)
            next_experts = [e for layer in result.routing.preferred_experts(self.budget.experts_held) for e in layer]
        trained = state_to_numpy(model)
        metrics["train-seconds"] = time.perf_counter() - start
        metrics.update(startup.phase_seconds())
        return trained, metrics, next_experts

    def evaluate(self, arrays: Mapping[str, np.ndarray], adapter: str) -> dict[str, Any]:
        """Accuracy of the personalised model (own experts and top-k) on the held-out slice."""
        torch.set_num_threads(self.config.train.threads)
        model = self.model(arrays, adapter)
        batches = iterate_batches(self.holdout_set, self.config.eval.batch_size, self.tokenizer.pad_token_id,
                                  shuffle=False, group_by_length=True, length_multiple=model.precision.length_multiple)
        result = evaluate(model, batches)
        return {"num-examples": result.num_examples, "loss": result.loss, "accuracy": result.accuracy}


def _client_data(config: RunConfig, node_config: Mapping[str, Any], partition_id: int) -> ClientData:
    """A device's own data-path folder (read without `datasets`), else its simulated partition."""
    data_path = str(node_config.get("data-path", ""))
    if data_path:
        return device_client_data(data_path, config.data.holdout_fraction, config.seed)
    from fedmoe_app.data import load_client_data  # partitioning needs `datasets` and `flwr_datasets`

    return load_client_data(config.data, config.seed, partition_id, int(node_config.get("num-partitions", 1)))


def _marking_first_step(batches: Iterable[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    """`batches`, marking `first-step` when the second is asked for (the first step is done)."""
    first = True
    for batch in batches:
        yield batch
        if first:
            startup.mark("first-step")
            first = False


@lru_cache(maxsize=16)
def _cached_task(config_yaml: str, node_items: tuple) -> ClientTask:
    return ClientTask(config_from_yaml(config_yaml), dict(node_items))


def client_task(config_yaml: str, node_config: Mapping[str, Any], origin: float | None = None) -> ClientTask:
    """The ClientTask of this run and node, built once per process (simulation runs many
    nodes in one process, a node worker serves many messages, and tokenising a partition
    every round would be wasted work). `origin`: see `startup.begin_message`."""
    startup.begin_message(origin)
    return _cached_task(config_yaml, tuple(sorted(node_config.items())))
