"""Local training and evaluation of an AdapterClassifier, with routing statistics."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fedmoe_app.config import LossConfig
from fedmoe_app.losses import heterogeneity_loss, load_balancing_loss, router_z_loss
from fedmoe_app.model import AdapterClassifier, trainable_parameters
from fedmoe_app.moe import RouterOutput
from fedmoe_app.system import synchronize


@dataclass
class RoutingStats:
    """Routing of every real token seen, per layer and expert, summed over batches."""

    routed_tokens: np.ndarray  # [L, M] routing slots each expert received
    gate_prob_sum: np.ndarray  # [L, M] sum over tokens of the (held-subset) gate probability
    full_prob_sum: np.ndarray  # [L, M] sum over tokens of softmax over all M router logits
    tokens: int = 0

    @classmethod
    def empty(cls, num_layers: int, num_experts: int) -> "RoutingStats":
        """Zero statistics for L layers of M experts."""
        zeros = lambda dtype: np.zeros((num_layers, num_experts), dtype=dtype)  # noqa: E731
        return cls(zeros(np.int64), zeros(np.float64), zeros(np.float64))

    def add(self, routes: Sequence[RouterOutput]) -> None:
        """Accumulate one forward pass's routing."""
        with torch.no_grad():
            for layer, route in enumerate(routes):
                self.routed_tokens[layer] += route.tokens_per_expert.cpu().numpy()
                self.gate_prob_sum[layer] += route.probs.float().sum(0).cpu().numpy()
                self.full_prob_sum[layer] += torch.softmax(route.logits.float(), -1).sum(0).cpu().numpy()
            self.tokens += routes[0].probs.shape[0]

    @property
    def gate_prob(self) -> np.ndarray:
        """[L, M] mean gate probability per expert."""
        return self.gate_prob_sum / max(self.tokens, 1)

    @property
    def full_prob(self) -> np.ndarray:
        """[L, M] mean unrestricted router probability per expert."""
        return self.full_prob_sum / max(self.tokens, 1)

    def preferred_experts(self, count: int) -> list[list[int]]:
        """Per layer, the `count` experts with the highest mean router probability on this
        client's data (FFT-MoE's personalised subset for the next round), sorted."""
        return [sorted(np.argsort(-row, kind="stable")[:count].tolist()) for row in self.full_prob]


@dataclass
class TrainResult:
    """What one round of local training produced."""

    num_examples: int
    steps: int
    loss: float
    step_seconds: float
    routing: RoutingStats | None


def auxiliary_loss(
    routes: Sequence[RouterOutput],
    loss: LossConfig,
    het_weight: float = 0.0,
    global_usage: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted routing losses, each averaged over layers: a_bal * L_bal +
    a_het * w_n * L_het (needs `global_usage` [L, M]) + a_z * L_z."""
    if not routes:
        return torch.zeros(())
    total = torch.zeros((), device=routes[0].logits.device)
    if loss.balance > 0:
        total = total + loss.balance * torch.stack([load_balancing_loss(r) for r in routes]).mean()
    if loss.heterogeneity > 0 and het_weight > 0 and global_usage is not None:
        het = torch.stack([heterogeneity_loss(r, global_usage[i]) for i, r in enumerate(routes)])
        total = total + loss.heterogeneity * het_weight * het.mean()
    if loss.z_loss > 0:
        total = total + loss.z_loss * torch.stack([router_z_loss(r) for r in routes]).mean()
    return total


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's tensors are on."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _routing_stats(model: AdapterClassifier) -> RoutingStats | None:
    moes = model.moe_layers
    return RoutingStats.empty(len(moes), moes[0].num_experts) if moes else None


def train_local(
    model: AdapterClassifier,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    weight_decay: float,
    loss: LossConfig,
    het_weight: float = 0.0,
    global_usage: torch.Tensor | None = None,
) -> TrainResult:
    """Train the model's trainable tensors with AdamW for `steps` batches (on the model's
    device, in the model's precision; fp16 with loss scaling)."""
    device = model_device(model)
    global_usage = global_usage.to(device) if global_usage is not None else None
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=model.precision.name == "fp16")
    stats = _routing_stats(model)
    model.train()
    examples, loss_sum, seconds, done = 0, 0.0, 0.0, 0
    for batch in tqdm(batches, total=steps, desc="local steps", leave=False, disable=not sys.stderr.isatty()):
        start = time.perf_counter()
        batch = to_device(batch, device)
        logits = model(batch["input_ids"], batch["attention_mask"])  # in the model's precision
        task = F.cross_entropy(logits, batch["labels"])
        total = task + auxiliary_loss(model.trace.routes, loss, het_weight, global_usage)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        seconds += time.perf_counter() - start
        if stats is not None:
            stats.add(model.trace.routes)
        examples += len(batch["labels"])
        loss_sum += task.item() * len(batch["labels"])
        done += 1
    model.train(False)
    return TrainResult(
        num_examples=examples,
        steps=done,
        loss=loss_sum / examples if examples else math.nan,
        step_seconds=seconds / done if done else math.nan,
        routing=stats,
    )


@dataclass
class EvalResult:
    """Loss and accuracy of a model on a dataset."""

    num_examples: int
    loss: float
    accuracy: float
    routing: RoutingStats | None


@torch.no_grad()
def evaluate(model: AdapterClassifier, batches: Iterable[dict[str, torch.Tensor]]) -> EvalResult:
    """Mean cross-entropy and accuracy over `batches` (on the model's device, in its precision)."""
    model.train(False)
    device = model_device(model)
    stats = _routing_stats(model)
    examples, correct, loss_sum = 0, 0, 0.0
    for batch in batches:
        batch = to_device(batch, device)
        logits = model(batch["input_ids"], batch["attention_mask"])
        loss_sum += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        examples += len(batch["labels"])
        if stats is not None:
            stats.add(model.trace.routes)
    if examples == 0:
        return EvalResult(0, math.nan, math.nan, stats)
    return EvalResult(examples, loss_sum / examples, correct / examples, stats)
