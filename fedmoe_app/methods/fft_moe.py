"""FFT-MoE (arXiv 2508.18663), client half.

- The node trains the experts it received (its personalised subset), routing each token
  to its budget's top-k, and the shared router and head.
- Loss: task + a_bal * load balancing over the held experts + a_het * w_n * KL(client
  routing || global usage sent by the server) + a_z * router z-loss, each averaged over
  layers; w_n grows with the node's label skew and shrinks with its budget (DESIGN 5.1).
- It asks to hold next round the experts its router prefers on its data (highest mean
  probability over all M experts), as many as its budget holds.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from fedmoe_app.config import LossConfig
from fedmoe_app.losses import heterogeneity_loss, heterogeneity_weight, load_balancing_loss, router_z_loss
from fedmoe_app.methods.moe import MoEClient
from fedmoe_app.model import AdapterModel
from fedmoe_app.moe import RouterOutput


GLOBAL_USAGE = "global-usage"  # train message config: the global expert usage, flattened [L * M]


class FFTMoEClient(MoEClient):
    """Personalised expert subsets with heterogeneity-aware routing losses."""

    name = "fft_moe"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.global_usage = self.layer_matrix(GLOBAL_USAGE)
        self.het_weight = heterogeneity_weight(self.group_counts, self.budget.experts_held, self.config.moe.num_experts)

    def loss_terms(self, model: AdapterModel) -> torch.Tensor:
        """Load balancing, heterogeneity-aware routing and z-loss terms (`auxiliary_loss`)."""
        return auxiliary_loss(model.trace.routes, self.config.loss, self.het_weight, self.global_usage)


def auxiliary_loss(
    routes: Sequence[RouterOutput],
    loss: LossConfig,
    het_weight: float = 0.0,
    global_usage: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted routing losses, each averaged over layers: a_bal * L_bal +
    a_het * w_n * L_het (needs `global_usage` [L, M]) + a_z * L_z."""
    if not routes:
        return torch.zeros(())
    device = routes[0].logits.device
    total = torch.zeros((), device=device)
    if loss.balance > 0:
        total = total + loss.balance * torch.stack([load_balancing_loss(r) for r in routes]).mean()
    if loss.heterogeneity > 0 and het_weight > 0 and global_usage is not None:
        het = torch.stack([heterogeneity_loss(r, global_usage[i]) for i, r in enumerate(routes)])
        total = total + loss.heterogeneity * het_weight * het.mean()
    if loss.z_loss > 0:
        total = total + loss.z_loss * torch.stack([router_z_loss(r) for r in routes]).mean()
    return total
