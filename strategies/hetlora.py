"""HetLoRA (arXiv 2401.06432), server half (the client half: fedmoe_app/methods/hetlora.py).

- The global LoRA has the largest rank of the tiers, r_max. A node receives its first r_k
  ranks (rows of A, columns of B): its tier's lora-rank until it prunes itself, then the
  rank it asked for (kept by client id, saved with the run).
- Aggregation, the paper's sparsity-weighted form: each reply's LoRA modules are zero-padded
  to r_max, and every module is the average of the padded replies weighted by that reply's
  `||B_k A_k||_F` for the module (the padded zeros count: a node that trained fewer ranks
  pulls the higher ranks toward zero in proportion to its weight, as in the paper). A
  module whose every reply has B_k A_k = 0 keeps its global value. The head is averaged by
  training rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedmoe_app.methods.hetlora_config import LORA_RANK
from fedmoe_app.budgets import max_lora_rank
from fedmoe_app.config import RunConfig
from fedmoe_app.names import lora_pairs
from strategies.base import SparseStrategy
from strategies.core import Contribution, Weight, sparse_weighted_average
from strategies.ranks import truncated, unpaired_lora, zero_padded
from strategies.replies import MalformedReply, Node, Reply, examples


class HetLoRA(SparseStrategy):
    """Heterogeneous-rank LoRA: zero-padding, sparsity-weighted aggregation, truncation, self-pruning."""

    name = "hetlora"
    method_requests = (LORA_RANK,)

    def __init__(self, config: RunConfig, num_layers: int, **hooks) -> None:
        super().__init__(config, num_layers, **hooks)
        self.ranks: dict[str, int] = {}  # client id -> the rank it asked for after pruning

    def rank_for(self, node: Node) -> int:
        """The rank `node` trains at: what it asked for, else its tier's lora-rank (at most r_max)."""
        return min(self.ranks.get(node.client_id, node.budget.lora_rank), max_lora_rank(self.config))

    def arrays_for(self, node: Node, server_round: int) -> dict[str, np.ndarray]:
        """The global tensors, LoRA cut to the node's first `rank_for` ranks."""
        return truncated(self.global_arrays, self.rank_for(node))

    def check_reply(self, reply: Reply) -> None:
        """Both factors of every LoRA module it sends; the rank asked for: an integer from
        hetlora.min-rank to the rank the node trained at."""
        unpaired = unpaired_lora(reply.arrays)
        if unpaired:
            raise MalformedReply(f"tensor '{unpaired[0]}' came without the other factor of its LoRA module")
        rank = reply.request.get(LORA_RANK)
        trained = self.rank_for(reply.node)
        lowest = min(self.config.hetlora.min_rank, trained)
        if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool) and lowest <= rank <= trained):
            raise MalformedReply(f"request '{LORA_RANK}' is {rank!r}; allowed: an integer from {lowest} to {trained}")

    def contribution(self, reply: Reply) -> Contribution:
        """The reply's LoRA modules zero-padded to r_max, each weighted by ||B_k A_k||_F; the
        rest by training rows."""
        rows = float(examples(reply))
        arrays = dict(reply.arrays)
        weights: dict[str, Weight] = {key: rows for key in arrays}
        for a_key, b_key in lora_pairs(list(arrays)).values():
            a, b = arrays[a_key], arrays[b_key]
            norm = float(np.linalg.norm(b.astype(np.float64) @ a.astype(np.float64)))
            arrays[a_key] = zero_padded(a, self.global_arrays[a_key].shape, 0)[0]
            arrays[b_key] = zero_padded(b, self.global_arrays[b_key].shape, 1)[0]
            weights[a_key] = weights[b_key] = norm
        return Contribution(arrays, weights)

    def aggregate(self, replies: list[Reply]) -> dict[str, np.ndarray]:
        """The sparse weighted average of the padded, norm-weighted contributions."""
        return sparse_weighted_average(self.global_arrays, [self.contribution(r) for r in replies])

    def update_state(self, replies: list[Reply]) -> None:
        """Each node's rank for the next round: what it asked for."""
        for reply in replies:
            rank = reply.request.get(LORA_RANK)
            if rank is not None:
                self.ranks[reply.node.client_id] = int(rank)

    def round_metrics(self, replies: list[Reply]) -> dict[str, Any]:
        """`lora_ranks`: each replying node's client id -> the rank it trains at next round."""
        return {"lora_ranks": {r.node.client_id: self.rank_for(r.node) for r in replies}}

    def state_dict(self) -> dict[str, Any]:
        """The base state and every client's rank."""
        return {**super().state_dict(), "ranks": dict(self.ranks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict`."""
        super().load_state_dict(state)
        self.ranks = {client: int(rank) for client, rank in state["ranks"].items()}
