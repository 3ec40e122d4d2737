"""FlexLoRA, server half (the client half: fedmoe_app/methods/flexlora.py).

- Each node trains PEFT LoRA at its tier's rank r_k with PEFT's scale alpha / r_k, so its
  update to a module's weight is `dW_k = (alpha / r_k) B_k A_k`.
- Aggregation: per module, `dW = sum_k p_k dW_k` over the replies (p_k: the node's share of
  the round's training rows; a module no reply holds keeps its global product), then its
  SVD `dW = U S V^T`. The global LoRA (rank r_max, the largest tier rank) is the rank-r_max
  truncation, and a node of rank r_k receives the best rank-r_k approximation of dW (the
  first r_k singular triplets, Eckart-Young), as factors with `(alpha / r_k) B A = U_r S_r V_r^T`.
- How the singular values are split: all of them go to B, `B = (r / alpha) U_r S_r`,
  `A = V_r^T`. A's rows are then orthonormal, never zero: a direction whose singular value
  is 0 (fewer replies than ranks, a module nobody moved) arrives as a fresh LoRA does (B = 0,
  A nonzero) and can still learn. A square-root split would zero both of its factors, and
  a LoRA with A = B = 0 gets no gradient in either.
- The head is averaged by training rows.
- A server optimiser (federation.server-optimizer) steps the products, before the SVD.
The server keeps only the top r_max singular triplets between rounds: no node receives
more, and FlexLoRA averages what the nodes hold, not changes, so the rest is never needed.
"""

from __future__ import annotations

import numpy as np

from fedmoe_app.budgets import max_lora_rank
from fedmoe_app.names import lora_pairs
from strategies.base import SparseStrategy
from strategies.core import Contribution, sparse_weighted_average
from strategies.ranks import rank_axis, truncated, unpaired_lora
from strategies.replies import MalformedReply, Node, Reply, examples


def svd_factors(product: np.ndarray, rank: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(A [rank, in], B [out, rank]) with `(alpha / rank) B A` the best rank-`rank`
    approximation of `product` [out, in]: B = (rank / alpha) U_r S_r, A = V_r^T (ranks past
    the product's own are zero in B and zero rows in A)."""
    u, s, vt = np.linalg.svd(product.astype(np.float64), full_matrices=False)
    kept = min(rank, s.shape[0])
    a = np.zeros((rank, product.shape[1]))
    b = np.zeros((product.shape[0], rank))
    a[:kept] = vt[:kept]
    b[:, :kept] = (rank / alpha) * u[:, :kept] * s[:kept]
    return a.astype(np.float32), b.astype(np.float32)


class FlexLoRA(SparseStrategy):
    """Heterogeneous-rank LoRA: averaged full products, redistributed by truncated SVD."""

    name = "flexlora"
    keeps_parameterisation = False  # its LoRA factors come from a new SVD every round

    def global_rank(self) -> int:
        """r_max: the rank of the global LoRA."""
        return max_lora_rank(self.config)

    def arrays_for(self, node: Node, server_round: int) -> dict[str, np.ndarray]:
        """The global tensors, LoRA as the node's rank-r_k factors: the first r_k ranks, B
        rescaled by r_k / r_max for the node's scale alpha / r_k."""
        rank = min(node.budget.lora_rank, self.global_rank())
        arrays = truncated(self.global_arrays, rank)
        scale = rank / self.global_rank()
        return {key: a * np.float32(scale) if rank_axis(key) == 1 else a for key, a in arrays.items()}

    def check_reply(self, reply: Reply) -> None:
        """Both factors of every LoRA module it sends (a product needs both)."""
        unpaired = unpaired_lora(reply.arrays)
        if unpaired:
            raise MalformedReply(f"tensor '{unpaired[0]}' came without the other factor of its LoRA module")

    def product(self, arrays: dict[str, np.ndarray], a_key: str, b_key: str) -> np.ndarray:
        """A module's update (alpha / r) B A, r the rank of its factors."""
        a, b = arrays[a_key].astype(np.float64), arrays[b_key].astype(np.float64)
        return (self.config.lora.alpha / a.shape[0]) * (b @ a)

    def to_average_space(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Non-LoRA tensors as they are; each LoRA module as its product, named by the module."""
        pairs = lora_pairs(list(arrays))
        lora_keys = {key for pair in pairs.values() for key in pair}
        space = {key: a for key, a in arrays.items() if key not in lora_keys}
        space.update({module: self.product(arrays, *pair) for module, pair in pairs.items()})
        return space

    def from_average_space(self, averaged: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global tensors: each module's factors from the SVD of its averaged product."""
        pairs = lora_pairs(list(self.global_arrays))
        result = {key: a for key, a in averaged.items() if key not in pairs}
        for module, (a_key, b_key) in pairs.items():
            result[a_key], result[b_key] = svd_factors(averaged[module], self.global_rank(), self.config.lora.alpha)
        return result

    def aggregate(self, replies: list[Reply]) -> dict[str, np.ndarray]:
        """Non-LoRA tensors by training rows; each LoRA module's product by training rows."""
        contributions = []
        for reply in replies:
            rows = float(examples(reply))
            arrays = self.to_average_space(reply.arrays)  # check_reply: both factors of a module or neither
            contributions.append(Contribution(arrays, {key: rows for key in arrays}))
        return sparse_weighted_average(self.to_average_space(self.global_arrays), contributions)
