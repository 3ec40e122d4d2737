"""Text classification: a frozen encoder, adapters and a linear head on the pooled output.

Rows are `text,label` (CSV files, a hub dataset, or the bundled fallbacks: fedmoe_app/data.py
and fedmoe_app/rows.py); partitions are drawn by the label by default; the loss is
cross-entropy, with the label-skew remedies of fedmoe_app/task_loss.py (logit adjustment,
FedRS) as options; metrics: accuracy (primary), loss and per-class recall. The per-client
statistics methods may use are its label counts. Head calibration (CCVR) and label names
belong here too: they are errors under another task (fedmoe_app/config.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F

from fedmoe_app import messages as msg
from fedmoe_app.batches import EncodedSet, encode
from fedmoe_app.rows import ClientData, device_client_data, label_counts, write_csv
from fedmoe_app.task_loss import TaskLoss, local_task_loss
from fedmoe_app.tasks.base import ACCURACY, LOSS, BatchLoss, Task
from fedmoe_app.train import model_device, to_device



def classifier_loss(task_loss: TaskLoss = F.cross_entropy) -> BatchLoss:
    """loss(model, batch): `task_loss` of the classifier's logits and the batch's labels."""
    def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
        return task_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
    return loss


@dataclass
class EvalResult:
    """Loss, accuracy and per-class recall of a model on a dataset."""

    num_examples: int
    loss: float
    accuracy: float
    recall: list[float]  # per class of the head: the share of its rows predicted right (NaN: no row of it)


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> EvalResult:
    """Mean cross-entropy, accuracy and per-class recall over `batches` (on the model's
    device, in its precision)."""
    model.train(False)
    device = model_device(model)
    examples, correct, loss_sum = 0, 0, 0.0
    hits = rows = None  # per class
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        right = logits.argmax(-1) == labels
        if hits is None:
            hits = torch.zeros(logits.shape[-1], dtype=torch.long, device=device)
            rows = torch.zeros_like(hits)
        hits.index_add_(0, labels, right.long())
        rows.index_add_(0, labels, torch.ones_like(labels))
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += right.sum().item()
        examples += len(labels)
    if examples == 0:
        return EvalResult(0, math.nan, math.nan, [])
    recall = [h / n if n else math.nan for h, n in zip(hits.tolist(), rows.tolist())]
    return EvalResult(examples, loss_sum / examples, correct / examples, recall)


class ClassificationTask(Task):
    """Text classification (see the module docstring)."""

    name = "classification"
    partition_key = "label"
    metrics = (ACCURACY, LOSS)
    client_metrics = (ACCURACY, LOSS)

    def splits(self):
        """The TextSplits of the configured dataset (fedmoe_app.data.load_splits)."""
        from fedmoe_app.data import load_splits  # `datasets` only where splits are read

        return load_splits(self.config.data, self.config.seed)

    def __init__(self, config) -> None:
        super().__init__(config)
        self._counted: ClientData | None = None
        self._train_label_counts: tuple[int, ...] = ()

    def completed_config(self, splits):
        """The run's config with the label names of the data (when its files name labels and
        data.label-names is empty): a device maps names to ids alike."""
        if not splits.label_names or self.config.data.label_names:
            return self.config
        return dataclasses.replace(self.config, data=dataclasses.replace(self.config.data,
                                                                         label_names=splits.label_names))

    def client_data(self, node_config: Mapping[str, Any], partition_id: int, num_partitions: int) -> ClientData:
        """A device's own train.csv (read without `datasets`), else its simulated partition."""
        data_path = str(node_config.get(msg.DATA_PATH, ""))
        if data_path:
            return device_client_data(data_path, self.config.data.holdout_fraction, self.config.seed,
                                      self.config.data.label_names)
        from fedmoe_app.data import load_client_data  # partitioning needs `datasets` and `flwr_datasets`

        return load_client_data(self.config.data, self.config.seed, partition_id, num_partitions,
                                self.partition_column())

    def encode(self, data: ClientData, tokenizer, max_length: int) -> tuple[EncodedSet, EncodedSet]:
        """Token ids and labels of the training rows and of the held-out rows (a device's
        train.csv tokens are cached on disk)."""
        if data.csv_path is not None:
            from fedmoe_app.token_cache import encode_csv

            encoded = encode_csv(data.csv_path, data.rows, tokenizer, max_length)
        else:
            encoded = encode(data.rows, tokenizer, max_length)
        return encoded.select(data.train_index), encoded.select(data.holdout_index)

    def write_device_data(self, folder, partition, index: int, num_devices: int) -> None:
        """train.csv (the partition) and test.csv (an IID share of the test split, which also
        tells the device every label exists)."""
        test = self.splits().test.shuffle(seed=self.config.seed).shard(num_shards=num_devices, index=index,
                                                                         contiguous=True)
        for name, rows in (("train.csv", partition), ("test.csv", test)):
            write_csv(Path(folder) / name, list(zip(rows["text"][:], rows["label"][:])))

    def test_set(self, max_samples: int, tokenizer, max_length: int) -> EncodedSet:
        """The test split (a seeded subsample of `max_samples` rows), encoded."""
        from fedmoe_app.data import load_test_set

        return encode(load_test_set(self.config.data, self.config.seed, max_samples), tokenizer, max_length)

    def batch_loss(self, data: ClientData, num_labels: int) -> BatchLoss:
        """Cross-entropy, with the label-skew remedies train.* switches on for this node's labels."""
        if self._counted is not data:  # a node's labels are counted once, not every round
            self._counted, self._train_label_counts = data, label_counts(data.train, data.num_labels)
        return classifier_loss(local_task_loss(self.config.train, self._train_label_counts, num_labels))

    def evaluate(self, model: torch.nn.Module, encoded: EncodedSet, batch_size: int) -> dict[str, Any]:
        """Accuracy, loss, per-class recall and the rows scored."""
        batches = self.batches(encoded, batch_size, self.pad_token_id(), shuffle=False, group_by_length=True,
                               length_multiple=model.precision.length_multiple)
        result = evaluate_classifier(model, batches)
        return {msg.ACCURACY: result.accuracy, msg.LOSS: result.loss, msg.NUM_EXAMPLES: result.num_examples,
                msg.RECALL: result.recall}

    def record_fields(self, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
        """Accuracy and loss, and the per-class recall (`global_recall`)."""
        fields = super().record_fields(metrics)
        fields["global_recall"] = list(metrics[msg.RECALL]) if metrics and msg.RECALL in metrics else None
        return fields
