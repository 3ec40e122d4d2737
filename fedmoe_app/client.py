"""One client's work: its budget, its data, local training and personalised evaluation.

The same code runs in simulation and on a device; only where the node's information
comes from differs (node_config `partition-id` / `num-partitions` in simulation,
`device-tier` / `data-path` on a device).
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any, Iterable, Iterator, Mapping, NamedTuple

import numpy as np
import torch

from fedmoe_app import messages as msg
from fedmoe_app import startup
from fedmoe_app.backbones import load_tokenizer
from fedmoe_app.budgets import resolve_budget
from fedmoe_app.calibration import ClassStatistics, feature_statistics
from fedmoe_app.config import RunConfig, config_from_yaml
from fedmoe_app.methods import method_class
from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.model import AdapterModel, load_state, state_to_numpy
from fedmoe_app.names import num_labels_of
from fedmoe_app.node import describe as describe_node
from fedmoe_app.node import partition_of
from fedmoe_app.numbers import is_number_in
from fedmoe_app.system import peak_rss_mb
from fedmoe_app.tasks import task_of
from fedmoe_app.train import train_local

startup.mark("imports")


class ClientTask:
    """A node's budget and data for one run, and what it does with global tensors."""

    def __init__(self, config: RunConfig, node_config: Mapping[str, Any]) -> None:
        self.config = config
        self.node_config = dict(node_config)
        self.budget = resolve_budget(node_config, config)
        self.partition_id, num_partitions = partition_of(node_config)
        self.task = task_of(config)
        self.data = self.task.client_data(node_config, self.partition_id, num_partitions)
        self.tokenizer = load_tokenizer(config.model.backbone)
        self.train_set, self.holdout_set = self.task.encode(self.data, self.tokenizer, self.budget.max_length)
        startup.mark("data")

    def describe(self) -> dict[str, dict[str, Any]]:
        """What the server needs to tailor messages to this node (a query reply's records)."""
        return describe_node(self.node_config, self.budget, len(self.data.train_index))

    def method(self, server: Mapping[str, Any]) -> ClientMethod:
        """The run's method's client half for one message whose config is `server`."""
        return method_class(self.config.strategy)(self.config, self.budget, self.data.group_counts, server)

    def model(self, method: ClientMethod, arrays: Mapping[str, np.ndarray]) -> AdapterModel:
        """The model `method` builds for this node, holding `arrays`."""
        model = method.build_model(arrays)
        startup.mark("model")
        return model

    def train(
        self, arrays: Mapping[str, np.ndarray], server: Mapping[str, Any],
        correction: Mapping[str, np.ndarray] | None = None,
    ) -> Trained:
        """Train on local data within the budget as the run's method does. `server`: the
        config entries of the message; `correction`: SCAFFOLD's c - c_i from the server
        (train.drift-correction: scaffold; absent tensors are zero)."""
        start = time.perf_counter()
        torch.set_num_threads(self.config.train.threads)
        method = self.method(server)
        model = self.model(method, arrays)
        server_round = int(server.get(msg.SERVER_ROUND, 0))
        batches = self.task.batches(
            self.train_set, self.budget.batch_size, self.tokenizer.pad_token_id,
            shuffle=True, seed=self.config.seed + 1000 * server_round + self.partition_id,
            num_batches=self.budget.local_steps, group_by_length=self.config.train.group_by_length,
            length_multiple=model.precision.length_multiple,
        )
        lr, mu = train_settings(server, self.config)
        scaffold = self.config.train.drift_correction == "scaffold"
        result = train_local(model, _marking_first_step(batches), self.budget.local_steps, lr,
                             self.config.train.weight_decay, method,
                             self.task.batch_loss(self.data, num_labels_of(arrays)), proximal_mu=mu,
                             correction=(correction or {}) if scaffold else None)
        method_metrics, request = method.report()
        metrics: dict[str, Any] = {
            msg.NUM_EXAMPLES: len(self.data.train_index),  # Flower's convention: local training rows
            msg.SAMPLES_PROCESSED: result.num_examples,  # batch x local steps
            msg.STEPS: result.steps,
            msg.TRAIN_LOSS: result.loss,
            msg.STEP_SECONDS: result.step_seconds,
            msg.PEAK_RSS_MB: peak_rss_mb(),
            **({msg.PROXIMAL_TERM: result.proximal_term} if mu > 0 else {}),
            **method_metrics,
        }
        trained = method.trained_arrays(state_to_numpy(model))
        gradients = {k: result.mean_gradients[k] for k in trained} if scaffold else None
        metrics[msg.TRAIN_SECONDS] = time.perf_counter() - start
        metrics.update(startup.phase_seconds())
        return Trained(trained, metrics, request, gradients)

    def evaluate(self, arrays: Mapping[str, np.ndarray], server: Mapping[str, Any]) -> dict[str, Any]:
        """The task's client metrics of the personalised model (as the method builds it for
        this node) on the held-out slice, and the rows scored."""
        torch.set_num_threads(self.config.train.threads)
        model = self.model(self.method(server), arrays)
        result = self.task.evaluate(model, self.holdout_set, self.config.eval.batch_size)
        return {msg.NUM_EXAMPLES: result[msg.NUM_EXAMPLES], **{m.name: result[m.name] for m in self.task.client_metrics}}

    def feature_statistics(self, arrays: Mapping[str, np.ndarray]) -> ClassStatistics:
        """Per-class moments of the head's input features of the global model (as the server
        evaluates it) over this node's training rows: its half of head calibration."""
        torch.set_num_threads(self.config.train.threads)
        num_labels = num_labels_of(arrays)
        model = method_class(self.config.strategy).global_model(self.config, num_labels)
        load_state(model, arrays)
        batches = self.task.batches(self.train_set, self.config.eval.batch_size, self.tokenizer.pad_token_id,
                                    shuffle=False, group_by_length=True, length_multiple=model.precision.length_multiple)
        return feature_statistics(model, batches, num_labels)


class Trained(NamedTuple):
    """What a round of local training gives the reply."""

    arrays: dict[str, np.ndarray]  # the tensors the reply carries (as trained)
    metrics: dict[str, Any]
    request: dict[str, Any]  # the method's requests for the next round
    gradients: dict[str, np.ndarray] | None  # SCAFFOLD: the mean gradient of each tensor in `arrays` (else None)


def train_settings(server: Mapping[str, Any], config: RunConfig) -> tuple[float, float]:
    """(learning rate, FedProx mu) of a train message, as the server sent them for its round
    (the run config's train.lr and train.proximal-mu for a message without them); ValueError
    naming the entry if one is not a number in its range."""
    lr, mu = server.get(msg.LR, config.train.lr), server.get(msg.PROXIMAL_MU, config.train.proximal_mu)
    if not is_number_in(lr, 0.0, above_low=True):
        raise ValueError(f"train message entry '{msg.LR}' is {lr!r}; allowed: a number > 0")
    if not is_number_in(mu, 0.0):
        raise ValueError(f"train message entry '{msg.PROXIMAL_MU}' is {mu!r}; allowed: a number >= 0")
    return float(lr), float(mu)


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
