"""Local training of an adapter model: the loop asks the task for the loss of a batch
(fedmoe_app/tasks) and the method's client half (fedmoe_app.methods) for its loss terms
and hooks; it names neither."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from fedmoe_app.model import AdapterModel, trainable_parameters, trainable_state
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
    mean_gradients: dict[str, np.ndarray] | None = None  # with a control variate: the client's next c_i


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


class ControlVariate:
    """SCAFFOLD's client half. After backward it adds the server's correction c - c_i
    (tensors named as the model's trainable state; absent ones are zero) to the gradients,
    and it sums the gradients of the local objective (task loss and the method's terms,
    before any correction) over the steps: their mean is the client's next c_i, which the
    server keeps (strategies/control_variates.py)."""

    def __init__(self, model: AdapterModel, correction: Mapping[str, np.ndarray]) -> None:
        self.model = model
        self.params = trainable_parameters(model)
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.steps = 0
        self.offsets = self._per_parameter(correction) if correction else None

    @torch.no_grad()
    def _per_parameter(self, named: Mapping[str, np.ndarray]) -> list[torch.Tensor]:
        """Named tensors laid out as the parameters (zero where none is named); KeyError for a
        name the model does not train, ValueError for a shape that is not the tensor's."""
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = torch.zeros_like(p)
        views = trainable_state(self.model, gradients=True)
        for name, array in named.items():
            if name not in views:
                raise KeyError(f"a correction for '{name}', which this model does not train")
            if tuple(array.shape) != tuple(views[name].shape):
                raise ValueError(f"the correction for '{name}' has shape {tuple(array.shape)}; "
                                 f"the tensor's is {tuple(views[name].shape)}")
            views[name].copy_(torch.as_tensor(array))
        laid_out = [p.grad for p in self.params]
        for p, grad in zip(self.params, saved):
            p.grad = grad
        return laid_out

    @torch.no_grad()
    def add_gradient(self, count: bool = True) -> None:
        """Add this step's gradients to the sums (unless `count` is false: a skipped fp16
        step), then the correction to the gradients (the correction is the gradient of a
        parameter backward did not reach)."""
        present = [i for i, p in enumerate(self.params) if p.grad is not None]
        if count:
            if present:
                torch._foreach_add_([self.sums[i] for i in present], [self.params[i].grad.float() for i in present])
            self.steps += 1
        if self.offsets is None:
            return
        if present:
            torch._foreach_add_([self.params[i].grad for i in present], [self.offsets[i] for i in present])
        for p, offset in zip(self.params, self.offsets):
            if p.grad is None:
                p.grad = offset.clone()

    @torch.no_grad()
    def mean_gradients(self) -> dict[str, np.ndarray]:
        """The mean over the counted steps of each trainable tensor's gradient, by name (float32)."""
        saved = [p.grad for p in self.params]
        for p, total in zip(self.params, self.sums):
            p.grad = (total / max(self.steps, 1)).to(p.dtype)
        named = {name: g.float().cpu().numpy().copy() for name, g in trainable_state(self.model, gradients=True).items()}
        for p, grad in zip(self.params, saved):
            p.grad = grad
        return named


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
    correction: Mapping[str, np.ndarray] | None = None,
) -> TrainResult:
    """Train the model's trainable tensors with AdamW at rate `lr` for `steps` batches (on
    the model's device, in the model's precision; fp16 with loss scaling): the task's loss of
    the batch (`batch_loss`, fedmoe_app/tasks) plus the method's loss terms and, with
    `proximal_mu` > 0, FedProx's proximal term; backward, with `correction` (SCAFFOLD's
    c - c_i, possibly empty; None = off) the control variate's, the method's gradient hook,
    the step, the method's observation of it. The loss reported is the task loss trained on
    (weighted by rows); with a correction, also the mean gradient of the local objective."""
    device = model_device(model)
    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    proximal = ProximalTerm(params, proximal_mu) if proximal_mu > 0 else None
    control = ControlVariate(model, correction) if correction is not None else None
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
        if control is not None:
            control.add_gradient(count=not scaler.is_enabled() or _finite(params))
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
        mean_gradients=control.mean_gradients() if control is not None else None,
    )


def _finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every gradient of `params` is finite (an fp16 step the scaler will skip is not)."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads, dtype=torch.float32))).all())
