"""Local training and evaluation of an AdapterClassifier; the training loop asks a
method's client half (fedmoe_app.methods) for its loss terms and hooks."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fedmoe_app.model import AdapterClassifier, trainable_parameters
from fedmoe_app.system import synchronize
from fedmoe_app.task_loss import TaskLoss

if TYPE_CHECKING:
    from fedmoe_app.methods.base import ClientMethod


@dataclass
class TrainResult:
    """What one round of local training produced."""

    num_examples: int
    steps: int
    loss: float
    step_seconds: float


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's tensors are on."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def train_local(
    model: AdapterClassifier,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    weight_decay: float,
    method: ClientMethod,
    task_loss: TaskLoss = F.cross_entropy,
) -> TrainResult:
    """Train the model's trainable tensors with AdamW for `steps` batches (on the model's
    device, in the model's precision; fp16 with loss scaling): the task loss (`task_loss`
    of the logits and labels; fedmoe_app.task_loss) plus the method's loss terms, backward,
    the method's gradient hook, the step, the method's observation of it. The loss reported
    is the task loss trained on."""
    device = model_device(model)
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=model.precision.name == "fp16")
    model.train()
    examples, loss_sum, seconds, done = 0, 0.0, 0.0, 0
    for batch in tqdm(batches, total=steps, desc="local steps", leave=False, disable=not sys.stderr.isatty()):
        start = time.perf_counter()
        batch = to_device(batch, device)
        logits = model(batch["input_ids"], batch["attention_mask"])  # in the model's precision
        task = task_loss(logits, batch["labels"])
        total = task + method.loss_terms(model)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)  # the hook sees true gradients, also under fp16 loss scaling
        method.after_backward(model)
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        seconds += time.perf_counter() - start
        method.after_step(model)
        examples += len(batch["labels"])
        loss_sum += task.item() * len(batch["labels"])
        done += 1
    model.train(False)
    return TrainResult(
        num_examples=examples,
        steps=done,
        loss=loss_sum / examples if examples else math.nan,
        step_seconds=seconds / done if done else math.nan,
    )


@dataclass
class EvalResult:
    """Loss, accuracy and per-class recall of a model on a dataset."""

    num_examples: int
    loss: float
    accuracy: float
    recall: list[float]  # per class of the head: the share of its rows predicted right (NaN: no row of it)


@torch.no_grad()
def evaluate(model: AdapterClassifier, batches: Iterable[dict[str, torch.Tensor]]) -> EvalResult:
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
