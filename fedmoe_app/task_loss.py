"""The local task loss: cross-entropy over the head's logits, and the two label-skew
remedies that change it during local training (never evaluation), each a config switch:

- Logit adjustment (`train.logit-adjustment` tau; Menon et al., "Long-tail learning via
  logit adjustment", ICLR 2021; FedLC's remedy in federated form): cross-entropy of
  `logits + tau * log(prior)`, the prior being the client's own share of each label among
  its training rows. With tau = 1 this is the balanced softmax: the client learns what the
  classes look like, not how often it sees them, so its head does not drag the global one
  toward its own label mix. A class the client lacks gets the prior PRIOR_FLOOR, which
  leaves it out of the local softmax in effect (log 1e-8 = -18.4).
- Restricted softmax (`train.restricted-softmax` alpha; FedRS, Li & Zhan, KDD 2021): the
  logits of the classes the client has no training row of are scaled by alpha in [0, 1]
  before the softmax, so the client pushes them down less (alpha = 1: off).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from fedmoe_app.config import TrainConfig

PRIOR_FLOOR = 1e-8
TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def local_task_loss(train: TrainConfig, label_counts: Sequence[int], num_classes: int) -> TaskLoss:
    """loss(logits [B, num_classes], labels [B]): the mean training loss of a client whose
    training rows hold `label_counts` of classes 0, 1, ... (classes past them: none; a
    device's own files may lack the last labels), with the remedies `train` switches on."""
    tau, alpha = train.logit_adjustment, train.restricted_softmax
    if tau == 0 and alpha == 1:
        return F.cross_entropy
    if len(label_counts) > num_classes:
        raise ValueError(f"label counts of {len(label_counts)} classes for a head of {num_classes}")
    label_counts = list(label_counts) + [0] * (num_classes - len(label_counts))
    total = max(sum(label_counts), 1)
    offset = torch.tensor([tau * math.log(max(c / total, PRIOR_FLOOR)) for c in label_counts])
    scale = torch.tensor([1.0 if c > 0 else alpha for c in label_counts])

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        adjusted = logits.float() * scale.to(logits.device) + offset.to(logits.device)
        return F.cross_entropy(adjusted, labels)

    return loss
