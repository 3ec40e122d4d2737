"""Routing statistics: what a client counts while it trains, and what the server derives
from the counts its clients report (expert shares, utilisation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fedmoe_app.moe import RouterOutput


@dataclass
class RoutingStats:
    """Routing of every real token seen, per layer and expert, summed over batches."""

    routed_tokens: np.ndarray  # [L, M] routing slots each expert received
    full_prob_sum: np.ndarray  # [L, M] sum over tokens of softmax over all M router logits
    tokens: int = 0

    @classmethod
    def empty(cls, num_layers: int, num_experts: int) -> "RoutingStats":
        """Zero statistics for L layers of M experts."""
        zeros = lambda dtype: np.zeros((num_layers, num_experts), dtype=dtype)  # noqa: E731
        return cls(zeros(np.int64), zeros(np.float64))

    def add(self, routes: Sequence[RouterOutput]) -> None:
        """Accumulate one forward pass's routing."""
        with torch.no_grad():
            for layer, route in enumerate(routes):
                self.routed_tokens[layer] += route.tokens_per_expert.cpu().numpy()
                self.full_prob_sum[layer] += torch.softmax(route.logits.float(), -1).sum(0).cpu().numpy()
            self.tokens += routes[0].logits.shape[0]

    @property
    def full_prob(self) -> np.ndarray:
        """[L, M] mean unrestricted router probability per expert."""
        return self.full_prob_sum / max(self.tokens, 1)


def expert_shares(routed_tokens: np.ndarray) -> np.ndarray:
    """[L, M] share of each layer's routing slots that went to each expert (0 for a layer
    that routed nothing)."""
    routed = np.asarray(routed_tokens, dtype=np.float64)
    slots = routed.sum(axis=1, keepdims=True)
    return np.divide(routed, slots, out=np.zeros_like(routed), where=slots > 0)


def utilisation(routed_tokens: Sequence[np.ndarray]) -> np.ndarray | None:
    """[L, M] share of routed tokens per expert over several clients' counts, or None
    when there are none."""
    if not routed_tokens:
        return None
    return expert_shares(np.sum(routed_tokens, axis=0))
