"""Local training of an adapter model: the loop asks the task for the loss of a batch
(fedmoe_app/tasks) and the method's client half (fedmoe_app.methods) for its loss terms
and hooks; it names neither."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
from tqdm import tqdm

from fedmoe_app.model import AdapterModel, trainable_parameters
from fedmoe_app.system import synchronize

if TYPE_CHECKING:
    from fedmoe_app.methods.base import ClientMethod
    from fedmoe_app.tasks.base import BatchLoss


@dataclass
class TrainResult:
    """What one round of local training produced."""

    num_examples: int
    steps: int
    loss: float
    step_seconds: float
    proximal_term: float  # mean over the steps of the proximal term's value (0 when mu is 0)


class ProximalTerm:
    """FedProx's (mu / 2) ||w - w_global||^2 over `params` (the tensors a client trains; a
    sparse method's model holds only its experts), w_global being their values when the
    round's training began. Kept off the autograd graph: its gradient mu (w - w_global) is
    added to the parameters' gradients after backward, and its values are summed on the
    parameters' device (no synchronisation per step)."""

    def __init__(self, params: list[torch.nn.Parameter], mu: float) -> None:
        self.params, self.mu = params, mu
        self.anchor = [p.detach().clone() for p in params]
        self.value_sum = torch.zeros((), dtype=torch.float64, device=params[0].device if params else None)

    @torch.no_grad()
    def add_gradient(self) -> None:
        """Add mu (w - w_global) to each parameter's gradient (the gradient itself where
        backward left none), and add the term's current value to `value_sum`."""
        drift = torch._foreach_sub([p.detach() for p in self.params], self.anchor)
        norms = torch._foreach_norm(drift, dtype=torch.float32)
        self.value_sum += (self.mu / 2) * torch.stack(norms).double().square().sum()
        for p, d in zip(self.params, drift):
            if p.grad is None:
                p.grad = d.mul_(self.mu)
            else:
                p.grad.add_(d, alpha=self.mu)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's tensors are on."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def train_local(
    model: AdapterModel,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    weight_decay: float,
    method: ClientMethod,
    batch_loss: BatchLoss,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Train the model's trainable tensors with AdamW at rate `lr` for `steps` batches (on
    the model's device, in the model's precision; fp16 with loss scaling): the task's loss of
    the batch (`batch_loss`, fedmoe_app/tasks) plus the method's loss terms and, with
    `proximal_mu` > 0, FedProx's proximal term; backward, the method's gradient hook, the
    step, the method's observation of it. The loss reported is the task loss trained on
    (weighted by rows)."""
    device = model_device(model)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    proximal = ProximalTerm(params, proximal_mu) if proximal_mu > 0 else None
    scaler = torch.amp.GradScaler(device.type, enabled=model.precision.name == "fp16")
    model.train()
    examples, loss_sum, seconds, done = 0, 0.0, 0.0, 0
    for batch in tqdm(batches, total=steps, desc="local steps", leave=False, disable=not sys.stderr.isatty()):
        start = time.perf_counter()
        batch = to_device(batch, device)
        task = batch_loss(model, batch)  # in the model's precision
        total = task + method.loss_terms(model)
        model.trace.stop()  # a block recomputed in backward (gradient checkpointing) adds no routes
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)  # the hook sees true gradients, also under fp16 loss scaling
        if proximal is not None:
            proximal.add_gradient()
        method.after_backward(model)
        scaler.step(optimizer)
        scaler.update()
        synchronize(device)
        seconds += time.perf_counter() - start
        method.after_step(model)
        rows = len(batch["input_ids"])
        examples += rows
        loss_sum += task.item() * rows
        done += 1
    model.train(False)
    return TrainResult(
        num_examples=examples,
        steps=done,
        loss=loss_sum / examples if examples else math.nan,
        step_seconds=seconds / done if done else math.nan,
        proximal_term=(proximal.value_sum.item() if proximal else 0.0) / done if done else math.nan,
    )
