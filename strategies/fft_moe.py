"""FFT-MoE (arXiv 2508.18663), server half (the client half: fedmoe_app/methods/fft_moe.py):
personalised expert subsets (strategies/moe.py), expert-wise aggregation.

- Expert e is averaged over the nodes that held it, each weighted by its training rows
  times the share of its routing slots (in that layer) that went to e: a node's data, spread
  over the experts it used. Router rows likewise (a node's rows for experts it did not hold
  get weight 0); the head by training rows. Not by samples processed (batch x steps): a
  strong device with 9 rows would outweigh a weak one with 2,000.
- The server broadcasts the global expert usage that the heterogeneity-aware loss pulls
  each client's routing toward; it is a momentum average of the routed-token shares
  (starting uniform), so an expert unused in one round is not written off at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe_app.methods.fft_moe import GLOBAL_USAGE
from fedmoe_app.methods.moe import ROUTED_TOKENS
from fedmoe_app.config import RunConfig
from fedmoe_app.records import flatten, unflatten
from fedmoe_app.names import expert_of, router_layer
from fedmoe_app.routing import expert_shares
from strategies.core import Weight
from strategies.moe import ExpertSubsetStrategy
from strategies.replies import Node, Reply, examples


class FFTMoE(ExpertSubsetStrategy):
    """Sparse MoE adapters with personalised, budget-sized expert subsets."""

    name = "fft_moe"

    def __init__(self, config: RunConfig, num_layers: int, **hooks) -> None:
        super().__init__(config, num_layers, **hooks)
        num_experts = config.moe.num_experts
        self.global_usage = np.full((num_layers, num_experts), 1.0 / num_experts)

    def config_for(self, node: Node, server_round: int) -> dict:
        """The global expert usage the heterogeneity-aware loss pulls routing toward."""
        return {GLOBAL_USAGE: flatten(self.global_usage)}

    def weights_for(self, reply: Reply) -> dict[str, Weight]:
        """Experts by training rows x routing share, router rows likewise per row, the rest by rows."""
        rows = float(examples(reply))
        share = expert_shares(unflatten(reply.metrics[ROUTED_TOKENS], self.num_layers))
        weights: dict[str, Weight] = {}
        for key in reply.arrays:
            expert, layer = expert_of(key), router_layer(key)
            if expert is not None:
                weights[key] = rows * float(share[expert])
            elif layer is not None:
                weights[key] = rows * share[layer]  # one weight per router row
            else:
                weights[key] = rows
        return weights

    def update_state(self, replies: list[Reply]) -> None:
        """Each node's next subset (what it asked for) and the global usage."""
        super().update_state(replies)
        usage = self.utilisation(replies)
        if usage is not None:
            momentum = self.config.moe.usage_momentum
            self.global_usage = momentum * self.global_usage + (1 - momentum) * usage

    def state_dict(self) -> dict[str, Any]:
        """The subsets' state and the global usage."""
        return {**super().state_dict(), "global_usage": self.global_usage.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` of a run with the same layers and experts."""
        usage = self.saved_matrix(state, "global_usage", self.global_usage)
        super().load_state_dict(state)
        self.global_usage = usage
