"""FFT-MoE (arXiv 2508.18663), server half (the client half: fedmoe_app/methods/fft_moe.py):
personalised expert subsets, expert-wise aggregation.

- Each node receives the routers, the head and only the experts it holds. Round 1 spreads
  subsets so every expert is held by some node; afterwards a node holds the subset it
  asked for (its top experts by mean router probability on its own data). Subsets are
  kept by client id, so a node that restarts keeps its own.
- Expert e is averaged over the nodes that held it, each weighted by its training rows
  times the share of its routing slots (in that layer) that went to e: a node's data, spread
  over the experts it used. Router rows likewise (a node's rows for experts it did not hold
  get weight 0); the head by training rows. Not by samples processed (batch x steps): a
  strong device with 9 rows would outweigh a weak one with 2,000.
- Router rows are averaged as changes centred over the rows a node held: a softmax over
  the held experts does not change when all their rows move by one vector, so such a shift
  carries no information from the node's data, yet averaged with other nodes' rows (other
  subsets) it would move the global logits. Each node's change to its held rows has its
  mean row removed before it is added to the global rows it received.
- The server broadcasts the global expert usage that the heterogeneity-aware loss pulls
  each client's routing toward; it is a momentum average of the routed-token shares
  (starting uniform), so an expert unused in one round is not written off at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe_app import messages as msg
from fedmoe_app.config import RunConfig
from fedmoe_app.records import expert_of, flatten, held_experts, router_layer, select_keys, unflatten
from fedmoe_app.routing import expert_shares, utilisation
from strategies.base import SparseStrategy
from strategies.core import Weight
from strategies.replies import MalformedReply, Node, Reply, examples


class FFTMoE(SparseStrategy):
    """Sparse MoE adapters with personalised, budget-sized expert subsets."""

    name = "fft_moe"
    method_metrics = (msg.ROUTED_TOKENS,)
    method_requests = (msg.NEXT_EXPERTS,)

    def __init__(self, config: RunConfig, num_layers: int, **hooks) -> None:
        super().__init__(config, num_layers, **hooks)
        num_experts = config.moe.num_experts
        self.subsets: dict[str, list[list[int]]] = {}  # client id -> experts per layer it holds
        self.spread_cursor = 0
        self.global_usage = np.full((num_layers, num_experts), 1.0 / num_experts)

    def subset_of(self, node: Node) -> list[list[int]]:
        """The experts per layer `node` holds; new clients get the next experts in turn."""
        if node.client_id not in self.subsets:
            num_experts, held = self.config.moe.num_experts, min(node.budget.experts_held, self.config.moe.num_experts)
            experts = sorted((self.spread_cursor + i) % num_experts for i in range(held))
            self.spread_cursor = (self.spread_cursor + held) % num_experts
            self.subsets[node.client_id] = [list(experts) for _ in range(self.num_layers)]
        return self.subsets[node.client_id]

    def arrays_for(self, node: Node, server_round: int) -> dict[str, np.ndarray]:
        """The routers, the head and the experts the node holds."""
        return select_keys(self.global_arrays, self.subset_of(node))

    def config_for(self, node: Node, server_round: int) -> dict:
        """The global expert usage the heterogeneity-aware loss pulls routing toward."""
        return {msg.GLOBAL_USAGE: flatten(self.global_usage)}

    def check_reply(self, reply: Reply) -> None:
        """Routed tokens: L x M counts >= 0; the experts asked for next round, if any:
        per layer as many as the node holds, distinct, each in [0, M)."""
        num_experts = self.config.moe.num_experts
        routed = reply.metrics.get(msg.ROUTED_TOKENS)
        if not (isinstance(routed, list) and len(routed) == self.num_layers * num_experts
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in routed)):
            raise MalformedReply(f"metric '{msg.ROUTED_TOKENS}' is not {self.num_layers} x {num_experts} counts >= 0")
        requested = reply.request.get(msg.NEXT_EXPERTS)
        if requested is None:
            return
        held = min(reply.node.budget.experts_held, num_experts)
        layers = [requested[i * held:(i + 1) * held] for i in range(self.num_layers)] if isinstance(requested, list) else []
        if not (isinstance(requested, list) and len(requested) == self.num_layers * held
                and all(len(set(layer)) == held and all(isinstance(e, int) and 0 <= e < num_experts for e in layer)
                        for layer in layers)):
            raise MalformedReply(f"request '{msg.NEXT_EXPERTS}' is not {held} distinct experts in [0, {num_experts}) "
                                 f"for each of {self.num_layers} layers")

    def round_metrics(self, replies: list[Reply]) -> dict[str, Any]:
        """The round's expert utilisation per layer (share of routed tokens per expert)."""
        usage = self.utilisation(replies)
        return {"expert_utilisation": usage.tolist() if usage is not None else None}

    def utilisation(self, replies: list[Reply]) -> np.ndarray | None:
        """[L, M] share of routed tokens per expert over the replies, or None without replies."""
        return utilisation([unflatten(r.metrics[msg.ROUTED_TOKENS], self.num_layers) for r in replies])

    def weights_for(self, reply: Reply) -> dict[str, Weight]:
        """Experts by training rows x routing share, router rows likewise per row, the rest by rows."""
        rows = float(examples(reply))
        share = expert_shares(unflatten(reply.metrics[msg.ROUTED_TOKENS], self.num_layers))
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

    def contribution_of(self, reply: Reply) -> dict[str, np.ndarray]:
        """The trained tensors, router rows as the received rows plus their centred change."""
        held = held_experts(list(reply.arrays), self.num_layers)
        arrays = dict(reply.arrays)
        for key, trained in reply.arrays.items():
            layer = router_layer(key)
            if layer is None or not held[layer]:
                continue
            rows = held[layer]
            change = trained[rows] - self.global_arrays[key][rows]
            centred = trained.copy()
            centred[rows] = self.global_arrays[key][rows] + change - change.mean(axis=0, keepdims=True)
            arrays[key] = centred
        return arrays

    def update_state(self, replies: list[Reply]) -> None:
        """Each node's next subset (what it asked for) and the global usage."""
        for reply in replies:
            requested = reply.request.get(msg.NEXT_EXPERTS)
            if requested:
                subset = np.asarray(requested, dtype=int).reshape(self.num_layers, -1)
                self.subsets[reply.node.client_id] = [sorted(row.tolist()) for row in subset]
        usage = self.utilisation(replies)
        if usage is not None:
            momentum = self.config.moe.usage_momentum
            self.global_usage = momentum * self.global_usage + (1 - momentum) * usage

    def state_dict(self) -> dict[str, Any]:
        """The base state, every client's subset, the spread cursor and the global usage."""
        return {**super().state_dict(), "subsets": {c: [list(layer) for layer in s] for c, s in self.subsets.items()},
                "spread_cursor": self.spread_cursor, "global_usage": self.global_usage.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict` of a run with the same layers and experts."""
        super().load_state_dict(state)
        usage = np.asarray(state["global_usage"], dtype=np.float64)
        if usage.shape != self.global_usage.shape:
            raise ValueError(f"saved global usage has shape {usage.shape}; this run's is {self.global_usage.shape}")
        self.subsets = {client: [list(map(int, layer)) for layer in subset] for client, subset in state["subsets"].items()}
        self.spread_cursor = int(state["spread_cursor"])
        self.global_usage = usage
