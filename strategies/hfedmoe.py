"""HFedMoE (arXiv 2601.00583, DESIGN 5.2), server half (the client half:
fedmoe_app/methods/hfedmoe.py): expert subsets as in strategies/moe.py, then

- expert e: the data-size-weighted average over the nodes whose usage u_c(e) (mean gate
  probability on their data) is at least tau (`hfedmoe.usage-threshold`); a node that used
  an expert less than that does not move it, and with no such node the global value stays;
- router (gate) of each layer: its rows for the experts a node held weighted by
  `alpha(c) = sum_{e in S_c} u_c(e) s_c(e) / |S_global|`, S_c the experts the node trained
  (those in its reply), s_c their importance, |S_global| = M. `hfedmoe.gate-weights: normalised` (default) divides by
  the sum of the alphas, a convex combination of the nodes' routers; `raw` is the paper's
  sum `sum_c alpha(c) W_c`, whose weights do not sum to one (a u * s product is at most 1,
  so it shrinks the router toward zero every round, flattening the gates; kept to compare);
- head: by training rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe_app.methods.hfedmoe_config import EXPERT_IMPORTANCE, EXPERT_USAGE
from fedmoe_app.methods.moe import ROUTED_TOKENS
from fedmoe_app.records import unflatten
from fedmoe_app.names import expert_of, held_experts, router_layer
from strategies.core import Weight
from strategies.moe import ExpertSubsetStrategy
from strategies.replies import MalformedReply, Reply, examples


class HFedMoE(ExpertSubsetStrategy):
    """Usage-filtered expert averaging and importance-weighted gate averaging."""

    name = "hfedmoe"
    method_metrics = (ROUTED_TOKENS, EXPERT_USAGE, EXPERT_IMPORTANCE)

    def check_reply(self, reply: Reply) -> None:
        """Besides routing counts and next experts: usage and importance, L x M numbers in [0, 1]."""
        super().check_reply(reply)
        size = self.num_layers * self.config.moe.num_experts
        for key in (EXPERT_USAGE, EXPERT_IMPORTANCE):
            values = reply.metrics.get(key)
            if not (isinstance(values, list) and len(values) == size and all(
                    isinstance(x, float) and 0.0 <= x <= 1.0 for x in values)):
                raise MalformedReply(f"metric '{key}' is not {self.num_layers} x {self.config.moe.num_experts} "
                                     "numbers in [0, 1]")

    def gate_weights(self, reply: Reply) -> np.ndarray:
        """[L] alpha(c) of each layer's router: the sum over the experts it trained (S_c) of
        u_c(e) s_c(e), over M."""
        usage = unflatten(reply.metrics[EXPERT_USAGE], self.num_layers)
        importance = unflatten(reply.metrics[EXPERT_IMPORTANCE], self.num_layers)
        trained = held_experts(list(reply.arrays), self.num_layers)
        return np.array([(usage[i, rows] * importance[i, rows]).sum() / self.config.moe.num_experts
                         for i, rows in enumerate(trained)])

    def weights_for(self, reply: Reply) -> dict[str, Weight]:
        """Experts by training rows where u_c(e) >= tau (else 0); router rows the node held
        by alpha(c); the rest by training rows."""
        rows = float(examples(reply))
        usage = unflatten(reply.metrics[EXPERT_USAGE], self.num_layers)
        tau = self.config.hfedmoe.usage_threshold
        alpha = self.gate_weights(reply)
        held = self.held_by(reply)
        weights: dict[str, Weight] = {}
        for key in reply.arrays:
            expert, layer = expert_of(key), router_layer(key)
            if expert is not None:
                weights[key] = rows if usage[expert] >= tau else 0.0
            elif layer is not None:
                row_weights = np.zeros(self.config.moe.num_experts)
                row_weights[held[layer]] = alpha[layer]
                weights[key] = row_weights
            else:
                weights[key] = rows
        return weights

    def aggregate(self, replies: list[Reply]) -> dict[str, np.ndarray]:
        """The weighted averages; with gate-weights `raw`, each router row is then scaled
        by the sum of its alphas (so it is the sum of alpha(c) W_c)."""
        result = super().aggregate(replies)
        if self.config.hfedmoe.gate_weights == "raw":
            totals: dict[str, Any] = {}
            for reply in replies:
                for key, weight in self.weights_for(reply).items():
                    if router_layer(key) is not None:
                        totals[key] = totals.get(key, 0.0) + weight
            for key, total in totals.items():
                scaled = result[key].astype(np.float64)
                scaled[total > 0] *= total[total > 0, None]
                result[key] = scaled.astype(result[key].dtype)
        return result
