"""UB-SMoE (arXiv 2605.16690, DESIGN 5.3), server half (the client half:
fedmoe_app/methods/ub_smoe.py).

- Every node holds every backbone expert, each LoRA at the one global rank (the largest
  lora-rank of the tiers); its budget is K_c experts per token, from its compute-share.
- Aggregation (strategies/moe.py's expert-wise average): expert e is the data-size-weighted
  average over the nodes that trained it (their replies hold it); routers and head by
  training rows (router rows as centred changes, which changes nothing where every row is
  held, as here).
- Dynamic Modulated Routing (`ub-smoe.dmr`): from the routed-token counts a_ci of the
  replies, per layer, utilisation `u_i = sum_c p_c a_ci / n_c` (p_c the node's share of the
  round's training rows, n_c its routed tokens = sum_i a_ci / K_c), target
  `u* = sum_c p_c K_c / M`, `phi~_i = tanh(u* / (u_i + eps) - 1)`,
  `phi <- zeta * phi + (1 - zeta) * phi~`, phi sent to every node with its next message.
  DESIGN writes the target as mean(K_c) / M; we weight the mean by p_c as u is weighted,
  so that routing spread evenly over the experts (every u_i equal) is exactly on target
  (phi~ = 0); with equal data shares the two are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe_app.methods.moe import ROUTED_TOKENS
from fedmoe_app.methods.ub_smoe_config import MODULATION
from fedmoe_app.budgets import max_lora_rank
from fedmoe_app.config import RunConfig
from fedmoe_app.methods.ub_smoe import active_experts, max_active_experts
from fedmoe_app.records import flatten, unflatten
from strategies.moe import ExpertSubsetStrategy
from strategies.replies import Node, Reply, examples

EPS = 1e-6


def utilisation_and_target(routed: list[np.ndarray], active: list[int], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(u [L, M], u* [L]): each expert's share of tokens routed to it, over nodes weighted by
    `weights` (p_c, normalised here), from each node's routed slots `routed` [L, M] and its
    experts per token `active` (K_c); and the target K-weighted mean over M."""
    p = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    num_experts = routed[0].shape[1]
    usage = np.zeros_like(routed[0], dtype=np.float64)
    target = np.zeros(routed[0].shape[0])
    for share, slots, k in zip(p, routed, active):
        tokens = slots.sum(axis=1, keepdims=True) / k  # n_c per layer
        usage += share * np.divide(slots, tokens, out=np.zeros_like(usage), where=tokens > 0)
        target += share * k * (tokens[:, 0] > 0) / num_experts
    return usage, target


def modulation_target(usage: np.ndarray, target: np.ndarray) -> np.ndarray:
    """phi~ = tanh(u* / (u + eps) - 1): positive for experts below the target, negative above."""
    return np.tanh(target[:, None] / (usage + EPS) - 1.0)


class UBSMoE(ExpertSubsetStrategy):
    """Backbone experts under per-node compute budgets, with DMR and pseudo-gradients."""

    name = "ub_smoe"
    method_requests = ()

    def __init__(self, config: RunConfig, num_layers: int, **hooks) -> None:
        super().__init__(config, num_layers, **hooks)
        self.phi = np.zeros((num_layers, config.moe.num_experts))

    def subset_of(self, node: Node) -> list[list[int]]:
        """Every expert, in every layer."""
        return [list(range(self.config.moe.num_experts))] * self.num_layers

    def rank_for(self, node: Node) -> int:
        """The one global rank."""
        return max_lora_rank(self.config)

    def config_for(self, node: Node, server_round: int) -> dict:
        """The modulation phi (with DMR on)."""
        return {MODULATION: flatten(self.phi)} if self.config.ub_smoe.dmr else {}

    def utilisation_of(self, replies: list[Reply]) -> tuple[np.ndarray, np.ndarray] | None:
        """(u, u*) of the replies' routing, or None without replies holding training rows."""
        if sum(examples(r) for r in replies) <= 0:
            return None
        k_max = max_active_experts(self.config)
        return utilisation_and_target(
            [unflatten(r.metrics[ROUTED_TOKENS], self.num_layers) for r in replies],
            [active_experts(r.node.budget.compute_share, k_max) for r in replies],
            [float(examples(r)) for r in replies])

    def update_state(self, replies: list[Reply]) -> None:
        """With DMR on, phi's momentum step toward phi~ of the replies' utilisation."""
        found = self.utilisation_of(replies)
        if self.config.ub_smoe.dmr and found is not None:
            zeta = self.config.ub_smoe.momentum
            self.phi = zeta * self.phi + (1 - zeta) * modulation_target(*found)

    def round_metrics(self, replies: list[Reply]) -> dict[str, Any]:
        """Routed-token shares per expert (as every MoE strategy), plus `utilisation` (this
        round's u, [layer][expert]) and `modulation` (the phi sent next round, [layer][expert])."""
        found = self.utilisation_of(replies)
        usage = found[0].tolist() if found is not None else None
        return {**super().round_metrics(replies), "utilisation": usage, "modulation": self.phi.tolist()}

    def state_dict(self) -> dict[str, Any]:
        """The base state and phi."""
        return {**super().state_dict(), "phi": self.phi.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` of a run with the same layers and experts."""
        phi = self.saved_matrix(state, "phi", self.phi)
        super().load_state_dict(state)
        self.phi = phi
