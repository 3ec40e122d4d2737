"""Auxiliary routing losses, each over one layer's RouterOutput."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from fedmoe_app.moe import RouterOutput


def load_balancing_loss(route: RouterOutput) -> torch.Tensor:
    """Switch load-balancing loss over the held subset S: `|S| * sum_{i in S} f_i * P_i`.

    f_i is the share of routing slots (tokens x k) sent to expert i, P_i the mean router
    probability of i. It equals 1 when routing is uniform over S.
    """
    held = route.held_mask
    slots = route.topk_index.numel()
    f = route.tokens_per_expert.to(route.probs.dtype) / max(slots, 1)
    p = route.probs.mean(dim=0)
    return held.sum() * (f[held] * p[held]).sum()


def router_z_loss(route: RouterOutput) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the held experts' logits."""
    logits = route.logits[:, route.held_mask].float()
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def heterogeneity_loss(
    route: RouterOutput, global_usage: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """KL(P_n || P_global) over the held subset (our formulation, DESIGN 5.1).

    P_n is the client's mean routing distribution in this batch; P_global the global
    expert usage broadcast by the server, restricted to the held experts and renormalised.
    Scale it with `heterogeneity_weight`.
    """
    held = route.held_mask
    p_client = route.probs.mean(dim=0)[held].clamp_min(eps)
    p_global = global_usage.to(p_client)[held].clamp_min(eps)
    p_global = p_global / p_global.sum()
    return (p_client * (p_client.log() - p_global.log())).sum()


def heterogeneity_weight(label_counts: Sequence[int], experts_held: int, num_experts: int) -> float:
    """w_n = label_skew * (2 - budget), our formulation of FFT-MoE's heterogeneity weight.

    label_skew = 1 - H(labels) / log(C) is 0 for balanced data and 1 for a single class;
    budget = experts_held / num_experts. The weight grows with skew and shrinks with budget.
    """
    total = sum(label_counts)
    if total == 0 or len(label_counts) < 2:
        return 0.0
    entropy = -sum(c / total * math.log(c / total) for c in label_counts if c > 0)
    skew = 1.0 - entropy / math.log(len(label_counts))
    return skew * (2.0 - experts_held / num_experts)
