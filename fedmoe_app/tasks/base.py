"""Task: what a row is and everything that depends on it, so that the training loop, the
client, server evaluation, reply checks, round records, results and plots name no task.

A task owns: reading its splits (`splits`, `client_data`, `write_device_data`), the column
partitions are drawn by (`partition_key`), encoding and collation (`encode`, `batches`),
the model's output (`causal_lm`: a classifier head or the causal LM's own frozen LM head),
the loss (`batch_loss`), the metrics it reports with the primary one first (`metrics`,
`evaluate`), and the per-client statistics methods may use (`ClientData.group_counts`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

from fedmoe_app.batches import EncodedSet, iterate_batches
from fedmoe_app.config import RunConfig
from fedmoe_app.numbers import is_number_in
from fedmoe_app.rows import ClientData

BatchLoss = Callable[[torch.nn.Module, dict], torch.Tensor]  # (model, batch on its device) -> mean loss


@dataclass(frozen=True)
class Metric:
    """A number a task reports on an evaluation: its name (a MetricRecord key and, prefixed
    by `global_` / `client_`, a round-record field), which way is better and its range."""

    name: str
    higher_is_better: bool
    low: float = 0.0
    high: float = math.inf
    label: str = ""  # how plots and the round line name it

    def check(self, value: Any) -> bool:
        """Whether `value` is a finite number in this metric's range."""
        return is_number_in(value, self.low, self.high)


ACCURACY = Metric("accuracy", True, 0.0, 1.0, "acc")
LOSS = Metric("loss", False, 0.0, math.inf, "loss")


class Task:
    """Base of the tasks (fedmoe_app/tasks/<name>.py); a subclass fills in every hook."""

    name = ""
    causal_lm = False  # the model: a causal LM with its frozen LM head (else an encoder + classifier head)
    partition_key = ""  # the column partitions are drawn by unless data.partition-by names one
    metrics: tuple[Metric, ...] = ()  # what `evaluate` reports, the primary first
    client_metrics: tuple[Metric, ...] = ()  # what a client's evaluation reports (checked in its reply)

    def __init__(self, config: RunConfig) -> None:
        self.config = config

    @property
    def primary(self) -> Metric:
        """The metric a run is judged by (best round, summary, plots)."""
        return self.metrics[0]

    def tokenizer(self):
        """The backbone's tokenizer (cached per process)."""
        from fedmoe_app.backbones import load_tokenizer

        return load_tokenizer(self.config.model.backbone)

    def pad_token_id(self) -> int:
        """The backbone tokenizer's padding token."""
        return self.tokenizer().pad_token_id

    def partition_column(self) -> str:
        """The column partitions are drawn by: data.partition-by, else the task's."""
        return self.config.data.partition_by or self.partition_key

    # ---- data --------------------------------------------------------------------------
    def splits(self):
        """The dataset's splits (cached per process): `.train` (a datasets.Dataset), `.source`
        (one line: which data, from where), `.num_labels` (0: the model has no head)."""
        raise NotImplementedError

    def client_data(self, node_config: Mapping[str, Any], partition_id: int, num_partitions: int) -> ClientData:
        """A node's rows: a device's own data-path folder, else its simulated partition."""
        raise NotImplementedError

    def encode(self, data: ClientData, tokenizer, max_length: int) -> tuple[EncodedSet, Any]:
        """(the training rows' token ids and targets, the held-out rows as `evaluate` takes
        them), truncated to `max_length`."""
        raise NotImplementedError

    def write_device_data(self, folder, partition, index: int, num_devices: int) -> None:
        """Write a device's data folder (what `client_data` reads from a data-path) holding
        `partition` (a datasets.Dataset of the train split): device `index` of `num_devices`."""
        raise NotImplementedError

    def test_set(self, max_samples: int, tokenizer, max_length: int):
        """The encoded test rows server-side evaluation scores (`max_samples`: 0 = all)."""
        raise NotImplementedError

    def batches(self, encoded: EncodedSet, batch_size: int, pad_token_id: int, **options) -> Iterator[dict]:
        """Padded batches of `encoded` (fedmoe_app.batches.iterate_batches's options)."""
        return iterate_batches(encoded, batch_size, pad_token_id, **options)

    def completed_config(self, splits) -> RunConfig:
        """The run's config completed from its data on the server, before any client is asked
        (e.g. the label names a CSV file uses), so that every client, a device too, reads its
        rows alike (default: as it is)."""
        return self.config

    # ---- learning ----------------------------------------------------------------------
    def batch_loss(self, data: ClientData, num_labels: int) -> BatchLoss:
        """The local training loss of a node holding `data`, for a model of `num_labels` classes."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, encoded, batch_size: int) -> dict[str, Any]:
        """`metrics` (and `num-examples`, the rows scored) of `model` on `encoded`."""
        raise NotImplementedError

    def record_fields(self, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
        """The round record's `global_*` fields of a server evaluation (None: not evaluated)."""
        return {f"global_{m.name}": (metrics[m.name] if metrics and m.name in metrics else None) for m in self.metrics}

    def line(self, record: Mapping[str, Any]) -> str:
        """The round line's part for the global metrics of `record`."""
        values = [(m, record.get(f"global_{m.name}")) for m in self.metrics]
        shown = " ".join(f"{m.label or m.name} {v:.3f}" for m, v in values if v is not None)
        return f"global {shown}" if shown else ""
