"""The local task loss and its label-skew remedies (logit adjustment, FedRS), by hand."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedmoe_app.config import TrainConfig, defaults
from fedmoe_app.task_loss import local_task_loss

LOGITS = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 1.0, 3.0, -2.0]])
LABELS = torch.tensor([0, 1])
COUNTS = (30, 10, 0, 0)  # the client has no row of classes 2 and 3


def by_hand(logits, labels):
    """Mean of -log softmax(logits)[label], written out."""
    total = 0.0
    for row, label in zip(logits.tolist(), labels.tolist()):
        total += -(row[label] - math.log(sum(math.exp(z) for z in row)))
    return total / len(labels)


def loss(tau=0.0, alpha=1.0, counts=COUNTS):
    return local_task_loss(defaults(TrainConfig, logit_adjustment=tau, restricted_softmax=alpha), counts, 4)


def test_off_is_plain_cross_entropy():
    assert loss() is F.cross_entropy


def test_logit_adjustment_adds_tau_log_prior():
    prior = [0.75, 0.25, 1e-8, 1e-8]  # absent classes at the floor
    adjusted = [[z + 0.5 * math.log(p) for z, p in zip(row, prior)] for row in LOGITS.tolist()]
    assert loss(tau=0.5)(LOGITS, LABELS).item() == pytest.approx(by_hand(torch.tensor(adjusted), LABELS), rel=1e-5)


def test_balanced_softmax_does_not_push_down_absent_classes():
    logits = LOGITS.clone().requires_grad_(True)
    loss(tau=1.0)(logits, LABELS).backward()
    assert logits.grad[:, 2:].abs().max().item() < 1e-6
    plain = LOGITS.clone().requires_grad_(True)
    F.cross_entropy(plain, LABELS).backward()
    assert plain.grad[:, 2:].min().item() > 1e-3  # plain cross-entropy does


def test_restricted_softmax_scales_the_absent_classes_logits():
    scaled = [[z * (1.0 if c < 2 else 0.5) for c, z in enumerate(row)] for row in LOGITS.tolist()]
    assert loss(alpha=0.5)(LOGITS, LABELS).item() == pytest.approx(by_hand(torch.tensor(scaled), LABELS), rel=1e-5)
    # alpha = 0: an absent class's logit is 0 whatever the model says, so it gets no gradient
    logits = LOGITS.clone().requires_grad_(True)
    loss(alpha=0.0)(logits, LABELS).backward()
    assert logits.grad[:, 2:].abs().max().item() == 0.0


def test_both_together():
    prior = [0.75, 0.25, 1e-8, 1e-8]
    both = [[z * (1.0 if c < 2 else 0.5) + 0.3 * math.log(p) for c, (z, p) in enumerate(zip(row, prior))]
            for row in LOGITS.tolist()]
    assert loss(tau=0.3, alpha=0.5)(LOGITS, LABELS).item() == pytest.approx(by_hand(torch.tensor(both), LABELS), rel=1e-5)


def test_a_client_with_every_class_is_not_restricted():
    counts = (1, 1, 1, 1)
    assert loss(alpha=0.2, counts=counts)(LOGITS, LABELS).item() == pytest.approx(by_hand(LOGITS, LABELS), rel=1e-5)
    # uniform prior: the adjustment is a constant shift, which softmax ignores
    assert loss(tau=1.0, counts=counts)(LOGITS, LABELS).item() == pytest.approx(by_hand(LOGITS, LABELS), rel=1e-5)


def test_counts_of_fewer_classes_than_the_head_are_absent_classes():
    """A device whose files hold labels 0 and 1 only knows two counts; the head has four."""
    assert loss(tau=0.5, alpha=0.5, counts=(30, 10))(LOGITS, LABELS).item() == pytest.approx(
        loss(tau=0.5, alpha=0.5)(LOGITS, LABELS).item())


def test_bf16_logits_are_adjusted_in_float32():
    value = loss(tau=1.0)(LOGITS.bfloat16(), LABELS)
    assert value.dtype == torch.float32
