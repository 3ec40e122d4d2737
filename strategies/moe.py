"""The server half shared by methods with sparse MoE layers (fft_moe, hfedmoe, ub_smoe).

- Each node receives the routers, the head and only the experts it holds. Round 1 spreads
  subsets so every expert is held by some node; afterwards a node holds the subset it
  asked for (its client half ranks the experts on its own data). Subsets are kept by
  client id, so a node that restarts keeps its own.
- Backbone experts' LoRAs are global at the largest rank of the tiers; a node receives
  their first `lora-rank` ranks (rows of A, columns of B) and its reply is averaged into
  those ranks only (elementwise weights, zero elsewhere): unlike HetLoRA's zero-padding,
  a node that trained fewer ranks does not pull the others toward zero. (ub_smoe gives
  every node every expert at the global rank: `subset_of`, `rank_for`.)
- Router rows are averaged as changes centred over the rows a node held: a softmax over
  the held experts does not change when all their rows move by one vector, so such a shift
  carries no information from the node's data, yet averaged with other nodes' rows (other
  subsets) it would move the global logits. Each node's change to its held rows has its
  mean row removed before it is added to the global rows it received.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe_app.methods.moe import NEXT_EXPERTS, ROUTED_TOKENS
from fedmoe_app.config import RunConfig
from fedmoe_app.records import unflatten
from fedmoe_app.names import held_experts, router_layer, select_keys
from fedmoe_app.routing import utilisation
from strategies.base import SparseStrategy
from strategies.core import Contribution, sparse_weighted_average
from strategies.ranks import rank_axis, truncated, zero_padded
from strategies.replies import MalformedReply, Node, Reply

class ExpertSubsetStrategy(SparseStrategy):
    """Sparse MoE layers with personalised, budget-sized expert subsets."""

    method_metrics = (ROUTED_TOKENS,)
    method_requests = (NEXT_EXPERTS,)

    def __init__(self, config: RunConfig, num_layers: int, **hooks) -> None:
        super().__init__(config, num_layers, **hooks)
        self.subsets: dict[str, list[list[int]]] = {}  # client id -> experts per layer it holds
        self.spread_cursor = 0

    def subset_of(self, node: Node) -> list[list[int]]:
        """The experts per layer `node` holds; new clients get the next experts in turn."""
        if node.client_id not in self.subsets:
            num_experts, held = self.config.moe.num_experts, min(node.budget.experts_held, self.config.moe.num_experts)
            experts = sorted((self.spread_cursor + i) % num_experts for i in range(held))
            self.spread_cursor = (self.spread_cursor + held) % num_experts
            self.subsets[node.client_id] = [list(experts) for _ in range(self.num_layers)]
        return self.subsets[node.client_id]

    def rank_for(self, node: Node) -> int:
        """The rank of the backbone experts' LoRAs `node` trains (default: its tier's lora-rank)."""
        return node.budget.lora_rank

    def arrays_for(self, node: Node, server_round: int) -> dict[str, np.ndarray]:
        """The routers, the head and the experts the node holds (backbone experts' LoRAs at
        `rank_for` the node)."""
        return truncated(select_keys(self.global_arrays, self.subset_of(node)), self.rank_for(node))

    def check_reply(self, reply: Reply) -> None:
        """Routed tokens: L x M counts >= 0; the experts asked for next round, if any:
        per layer as many as the node holds, distinct, each in [0, M)."""
        num_experts = self.config.moe.num_experts
        routed = reply.metrics.get(ROUTED_TOKENS)
        if not (isinstance(routed, list) and len(routed) == self.num_layers * num_experts
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in routed)):
            raise MalformedReply(f"metric '{ROUTED_TOKENS}' is not {self.num_layers} x {num_experts} counts >= 0")
        requested = reply.request.get(NEXT_EXPERTS)
        if requested is None:
            return
        held = min(reply.node.budget.experts_held, num_experts)
        layers = [requested[i * held:(i + 1) * held] for i in range(self.num_layers)] if isinstance(requested, list) else []
        if not (isinstance(requested, list) and len(requested) == self.num_layers * held
                and all(len(set(layer)) == held and all(isinstance(e, int) and 0 <= e < num_experts for e in layer)
                        for layer in layers)):
            raise MalformedReply(f"request '{NEXT_EXPERTS}' is not {held} distinct experts in [0, {num_experts}) "
                                 f"for each of {self.num_layers} layers")

    def round_metrics(self, replies: list[Reply]) -> dict[str, Any]:
        """The round's expert utilisation per layer (share of routed tokens per expert), over
        all replies and over each tier's (a strong tier routing every token to every expert
        would hide how a weak tier's few experts per token spread)."""
        usage = self.utilisation(replies)
        by_tier = {tier: self.utilisation([r for r in replies if r.node.tier == tier]).tolist()
                   for tier in sorted({r.node.tier for r in replies})}
        return {"expert_utilisation": usage.tolist() if usage is not None else None,
                "expert_utilisation_by_tier": by_tier}

    def utilisation(self, replies: list[Reply]) -> np.ndarray | None:
        """[L, M] share of routed tokens per expert over the replies, or None without replies."""
        return utilisation([unflatten(r.metrics[ROUTED_TOKENS], self.num_layers) for r in replies])

    def held_by(self, reply: Reply) -> list[list[int]]:
        """The experts per layer the replying node held: those it was sent (its reply holds
        the ones it trained, which may be fewer)."""
        return held_experts(list(reply.sent_keys or reply.arrays), self.num_layers)

    def contribution_of(self, reply: Reply) -> dict[str, np.ndarray]:
        """The trained tensors, router rows as the received rows plus their centred change."""
        held = self.held_by(reply)
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

    def aggregate(self, replies: list[Reply]) -> dict[str, np.ndarray]:
        """The sparse weighted average, each reply's LoRA tensors of a lower rank than the
        global one counting in their first ranks only."""
        contributions = []
        for reply in replies:
            arrays, weights = self.contribution_of(reply), self.weights_for(reply)
            for key, array in list(arrays.items()):
                full = self.global_arrays[key]
                if rank_axis(key) is None or array.shape == full.shape:
                    continue
                arrays[key], mask = zero_padded(array, full.shape, rank_axis(key))
                weights[key] = mask * weights.get(key, 0.0)
            contributions.append(Contribution(arrays, weights))
        return sparse_weighted_average(self.global_arrays, contributions)

    def update_state(self, replies: list[Reply]) -> None:
        """Each node's next subset: what it asked for."""
        for reply in replies:
            requested = reply.request.get(NEXT_EXPERTS)
            if requested:
                subset = np.asarray(requested, dtype=int).reshape(self.num_layers, -1)
                self.subsets[reply.node.client_id] = [sorted(row.tolist()) for row in subset]

    def state_dict(self) -> dict[str, Any]:
        """The base state, every client's subset and the spread cursor."""
        return {**super().state_dict(), "subsets": {c: [list(layer) for layer in s] for c, s in self.subsets.items()},
                "spread_cursor": self.spread_cursor}

    @staticmethod
    def saved_matrix(state: dict[str, Any], key: str, current: np.ndarray) -> np.ndarray:
        """The [L, M] matrix saved under `key`, checked against the shape of this run's `current`."""
        saved = np.asarray(state[key], dtype=np.float64)
        if saved.shape != current.shape:
            raise ValueError(f"saved {key} has shape {saved.shape}; this run's is {current.shape}")
        return saved

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`."""
        super().load_state_dict(state)
        self.subsets = {client: [list(map(int, layer)) for layer in subset] for client, subset in state["subsets"].items()}
        self.spread_cursor = int(state["spread_cursor"])
