"""Classifier calibration with virtual representations (CCVR, Luo et al., NeurIPS 2021),
`calibration.method: ccvr`: after the last round every node reports, per class, the count,
mean and covariance of the head's input features under the global model on its training
rows; the server pools them into the statistics of all nodes' rows, draws the same number
of virtual features of every class from a Gaussian with those moments, and refits the
global head on them. Under extreme label skew the averaged head is what loses a class
held by few nodes (the features still separate it); a head refitted on class-balanced
virtual features does not see that skew.

What a node sends is its class-conditional feature moments, not its rows: C x (1 + D + D^2)
numbers (D = the backbone's hidden size), about 2.4 MB in float32 for 4 classes and D = 384.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from fedmoe_app.model import AdapterClassifier
from fedmoe_app.train import model_device, to_device


@dataclass
class ClassStatistics:
    """Per class c: rows counted [C], feature mean [C, D] and unbiased covariance [C, D, D]
    (zero where a class has fewer than two rows)."""

    count: np.ndarray
    mean: np.ndarray
    cov: np.ndarray


def statistics_of(features: np.ndarray, labels: np.ndarray, num_classes: int) -> ClassStatistics:
    """The per-class moments of `features` [N, D] with labels [N] in 0..num_classes-1."""
    features = np.asarray(features, dtype=np.float64)
    dim = features.shape[1]
    count = np.zeros(num_classes)
    mean = np.zeros((num_classes, dim))
    cov = np.zeros((num_classes, dim, dim))
    for c in range(num_classes):
        rows = features[labels == c]
        count[c] = len(rows)
        if len(rows):
            mean[c] = rows.mean(0)
        if len(rows) > 1:
            centred = rows - mean[c]
            cov[c] = centred.T @ centred / (len(rows) - 1)
    return ClassStatistics(count, mean, cov)


def pooled(parts: Iterable[ClassStatistics]) -> ClassStatistics:
    """The moments of the union of the rows the `parts` were computed on."""
    parts = list(parts)
    count = sum(p.count for p in parts)
    safe = np.maximum(count, 1)[:, None]
    mean = sum(p.count[:, None] * p.mean for p in parts) / safe
    # sum over rows of x x^T, per part: (n - 1) cov + n mean mean^T
    second = sum((np.maximum(p.count - 1, 0))[:, None, None] * p.cov
                 + p.count[:, None, None] * np.einsum("ci,cj->cij", p.mean, p.mean) for p in parts)
    scatter = second - count[:, None, None] * np.einsum("ci,cj->cij", mean, mean)
    cov = np.where((count > 1)[:, None, None], scatter / np.maximum(count - 1, 1)[:, None, None], 0.0)
    return ClassStatistics(count, mean, cov)


@torch.no_grad()
def feature_statistics(model: AdapterClassifier, batches: Iterable[dict[str, torch.Tensor]],
                       num_classes: int) -> ClassStatistics:
    """The per-class moments of the head's input features of `model` over `batches`."""
    model.eval()
    device = model_device(model)
    features, labels = [], []
    for batch in batches:
        batch = to_device(batch, device)
        features.append(model.features(batch["input_ids"], batch["attention_mask"]).double().cpu())
        labels.append(batch["labels"].cpu())
    if not features:
        return statistics_of(np.zeros((0, model.head.in_features)), np.zeros(0, dtype=np.int64), num_classes)
    return statistics_of(torch.cat(features).numpy(), torch.cat(labels).numpy(), num_classes)


def virtual_features(stats: ClassStatistics, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` draws from N(mean_c, cov_c) for every class with rows; (features [N, D], labels [N])."""
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for c in np.flatnonzero(stats.count > 0):
        cov = stats.cov[c]
        # A class with fewer rows than dimensions has a singular covariance: a jitter of a
        # millionth of its mean variance makes it positive definite. Cholesky, unlike an
        # eigendecomposition, is continuous in the covariance, so moments that differ in the
        # last bits (other hardware, other summation order) draw nearly the same features.
        jitter = 1e-6 * max(float(np.trace(cov)) / len(cov), 1e-12)
        factor = np.linalg.cholesky(cov + jitter * np.eye(len(cov)))
        features.append(stats.mean[c] + rng.standard_normal((per_class, len(cov))) @ factor.T)
        labels.append(np.full(per_class, c))
    return np.concatenate(features).astype(np.float32), np.concatenate(labels)


def fit_head(weight: np.ndarray, bias: np.ndarray, features: np.ndarray, labels: np.ndarray, steps: int,
             lr: float) -> tuple[np.ndarray, np.ndarray]:
    """A linear head [C, D], [C] trained from (`weight`, `bias`) with full-batch Adam on the
    cross-entropy of (`features`, `labels`) for `steps` steps."""
    w = torch.tensor(weight, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(bias, dtype=torch.float32, requires_grad=True)
    x, y = torch.as_tensor(features, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.long)
    optimizer = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(x @ w.T + b, y).backward()
        optimizer.step()
    return w.detach().numpy(), b.detach().numpy()


def calibrated_head(weight: np.ndarray, bias: np.ndarray, parts: Iterable[ClassStatistics], per_class: int,
                    steps: int, lr: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The global head refitted on `per_class` virtual features per class drawn from the
    pooled moments of the nodes' `parts` (the server's half of CCVR)."""
    features, labels = virtual_features(pooled(parts), per_class, seed)
    return fit_head(weight, bias, features, labels, steps, lr)
