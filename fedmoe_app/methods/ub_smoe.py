"""UB-SMoE (arXiv 2605.16690, DESIGN 5.3), client half.

A node holds every backbone expert, each with a LoRA of the one global rank, and runs
`K_c = max(1, floor(K_max * beta_c))` of them per token: beta_c its tier's compute-share,
K_max the global model's experts per token (moe.eval-top-k). Its budget is compute, not
memory: a low tier computes K_c / M of the FFN.
- Dynamic Modulated Routing (`ub-smoe.dmr`): each token's N_p = min(M, ceil(candidates *
  K_c)) experts with the largest router logits get the server's modulation phi added to
  their logits before the softmax and top-K_c (`TopKRouter.modulate`). The node trains its
  own copy of phi with the task, kept inside [phi-min, phi-max] by the bound regulariser
  `lam * (|relu(phi_min - phi)|^2 + |relu(phi - phi_max)|^2)`; the server's phi is what
  the next round starts from (phi is not sent back: the server computes it from routing).
- Universal Pseudo-Gradient (`ub-smoe.pseudo-gradient`), *our formulation* (the paper's
  formula is not public): after backward, an expert i that received no tokens in the batch
  gets `g_i = rho_c * Pbar_i * sum_j w_j g_j`, j over the experts that did, w_j = j's share
  of the batch's routing slots, Pbar_i = i's mean router probability over the batch's
  tokens, rho_c = 1 - K_c / M (no pseudo-gradient for a node that runs every expert). Valid
  because every expert's LoRA tensors have one shape. The AdamW step then moves the idle
  experts along the direction their router would have mixed them in. AdamW normalises
  each element by its running magnitude, so rho_c * Pbar_i sets how much an idle expert's
  pseudo-gradient weighs against its real gradients of other batches, less the size of
  its step: an expert idle in every batch still takes steps of about lr.
The reply carries the routers, the head and every expert that received a real or pseudo
gradient, and the routed-token counts the server computes utilisation from.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from fedmoe_app.config import RunConfig
from fedmoe_app.methods.moe import MoEClient
from fedmoe_app.methods.ub_smoe_config import MODULATION
from fedmoe_app.model import AdapterModel
from fedmoe_app.names import expert_of

MODULATION_KEY = ".moe.router.modulation"  # the node's own copy of phi: trained, never sent


def active_experts(compute_share: float, k_max: int) -> int:
    """K_c = max(1, floor(K_max * beta_c)) experts per token for compute share beta_c."""
    return max(1, math.floor(k_max * compute_share + 1e-9))


def max_active_experts(config: RunConfig) -> int:
    """K_max: the global model's experts per token (moe.eval-top-k, at most moe.num-experts)."""
    return min(config.moe.eval_top_k, config.moe.num_experts)


def candidate_count(k: int, num_experts: int, candidates: float) -> int:
    """N_p = min(M, ceil(candidates * K)): the experts per token whose logits are modulated."""
    return min(num_experts, math.ceil(candidates * k - 1e-9))


def bound_penalty(phi: torch.Tensor, phi_min: float, phi_max: float) -> torch.Tensor:
    """|relu(phi_min - phi)|^2 + |relu(phi - phi_max)|^2 (squared L2 norms over phi's entries)."""
    return F.relu(phi_min - phi).pow(2).sum() + F.relu(phi - phi_max).pow(2).sum()


def pseudo_gradient(grad: torch.Tensor, routed: torch.Tensor, mean_prob: torch.Tensor, rho: float) -> torch.Tensor:
    """The gradients of one stacked expert tensor `grad` [E, ...] with each idle expert's
    (routed [E] == 0) set to `rho * mean_prob[i] * sum_j w_j grad[j]`, w_j = routed[j] /
    sum(routed) over the experts with tokens. Unchanged if no expert had tokens."""
    total = routed.sum()
    if total == 0:
        return grad
    share = (routed / total).to(grad.dtype)
    mixed = torch.tensordot(share, grad, dims=1)  # sum_j w_j g_j (idle experts have w = 0)
    idle = routed == 0
    pseudo = rho * mean_prob.to(grad.dtype)[:, None] * mixed.reshape(1, -1)
    out = grad.clone()
    out[idle] = pseudo[idle].reshape((-1, *grad.shape[1:]))
    return out


class UBSMoEClient(MoEClient):
    """Compute-budgeted top-K_c routing with DMR and pseudo-gradients."""

    name = "ub_smoe"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phi = self.layer_matrix(MODULATION)
        self.trained: set[tuple[int, int]] = set()  # (layer, expert) that received a real or pseudo gradient

    def experts_per_token(self) -> int:
        """K_c from the tier's compute-share."""
        return active_experts(self.budget.compute_share, max_active_experts(self.config))

    def rho(self) -> float:
        """rho_c = 1 - K_c / M: how much of the expert pool a token leaves idle."""
        return 1.0 - self.experts_per_token() / self.config.moe.num_experts

    def build_model(self, arrays: Mapping[str, np.ndarray]) -> AdapterModel:
        """The node's model; with DMR on and a phi received, every router modulated by it."""
        model = super().build_model(arrays)
        if self.config.ub_smoe.dmr and self.phi is not None:
            count = candidate_count(self.experts_per_token(), self.config.moe.num_experts, self.config.ub_smoe.candidates)
            for layer, moe in enumerate(model.moe_layers):
                moe.router.modulate(self.phi[layer], count)
        return model

    def loss_terms(self, model: AdapterModel) -> torch.Tensor | float:
        """The bound regulariser on each layer's phi (0 without DMR)."""
        ub = self.config.ub_smoe
        phis = [moe.router.modulation for moe in model.moe_layers if moe.router.modulation is not None]
        if not phis or ub.bound_weight == 0:
            return 0.0
        return ub.bound_weight * sum(bound_penalty(phi, ub.phi_min, ub.phi_max) for phi in phis)

    def after_backward(self, model: AdapterModel) -> None:
        """Pseudo-gradients for the experts the batch left idle (with the switch on and K_c < M);
        notes which experts were trained."""
        pseudo = self.config.ub_smoe.pseudo_gradient and self.rho() > 0
        for layer, (moe, route) in enumerate(zip(model.moe_layers, model.trace.routes)):
            routed = route.tokens_per_expert[moe.held]  # [E] slots per held expert
            trained = routed > 0
            if pseudo and bool(trained.any()):
                mean_prob = route.probs.detach()[:, moe.held].mean(dim=0)
                for param in moe.experts.parameters():
                    if param.grad is not None:
                        param.grad = pseudo_gradient(param.grad, routed, mean_prob, self.rho())
                trained = torch.ones_like(trained)
            self.trained.update((layer, moe.held[i]) for i in torch.nonzero(trained).squeeze(1).tolist())

    def trained_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The routers, the head and the experts that received a gradient (not the node's phi)."""
        return {key: a for key, a in arrays.items()
                if MODULATION_KEY not in key and (expert_of(key) is None or expert_of(key) in self.trained)}

    def report(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The routed-token counts; no request (a node holds every expert)."""
        metrics, _ = super().report()
        return metrics, {}
