"""HFedMoE (arXiv 2601.00583, DESIGN 5.2), client half.

Per batch and layer, with G_e(x_i) the gate probability of expert e for the batch's real
token i (softmax over the held experts; the tokens are the units routed):
- importance `s_b(e) = lam * mean_i G_e(x_i) + (1 - lam) * max_i G_e(x_i)`;
- information-bottleneck score `I_b(e) = s_b(e) - beta * (1/B) sum_i G_e(x_i) log(G_e(x_i) / p_e)`,
  `p_e = mean_j G_e(x_j)` (terms with G = 0 are 0);
- only the top `experts-trained` (C) experts by I_b among those the batch routed to are
  updated: the others' gradients are zeroed, and since AdamW's momentum would still move
  them, their tensors are put back after the step. Forward routing stays top-K.
The reply carries the experts selected in at least one batch (what the node trained), the
routers and the head, and reports each expert's usage u_c(e) (mean G_e over the node's
tokens) and importance s_c(e) (mean s_b(e) over its batches); the node asks to hold next
round the experts most important to its data.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedmoe_app.methods.hfedmoe_config import EXPERT_IMPORTANCE, EXPERT_USAGE
from fedmoe_app.methods.moe import MoEClient
from fedmoe_app.model import AdapterModel
from fedmoe_app.records import flatten
from fedmoe_app.names import expert_of


def expert_scores(probs: torch.Tensor, importance_mix: float, ib_beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(importance s_b [M], information-bottleneck score I_b [M]) of one batch's gate
    probabilities `probs` [B, M]."""
    probs = probs.detach().float()
    mean = probs.mean(dim=0)
    importance = importance_mix * mean + (1 - importance_mix) * probs.max(dim=0).values
    ratio = torch.where(probs > 0, probs / mean.clamp_min(torch.finfo(torch.float32).tiny), torch.ones_like(probs))
    information = (probs * torch.log(ratio)).mean(dim=0)
    return importance, importance - ib_beta * information


def selected_experts(ib_score: torch.Tensor, routed: torch.Tensor, count: int) -> torch.Tensor:
    """[M] bool: the `count` experts with the highest `ib_score` among those `routed` [M] bool."""
    score = ib_score.masked_fill(~routed, float("-inf"))
    chosen = torch.topk(score, min(count, int(routed.sum()))).indices
    return torch.zeros_like(routed).index_fill(0, chosen, True)


class HFedMoEClient(MoEClient):
    """Top-K routing, gradients to the top-C experts by information-bottleneck score."""

    name = "hfedmoe"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.importance_sum: np.ndarray | None = None  # [L, M] sum of s_b over batches
        self.usage_sum: np.ndarray | None = None  # [L, M] sum of G_e over tokens
        self.batches = 0
        self.tokens = 0
        self.frozen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, kept rows, their values)
        self.trained: set[tuple[int, int]] = set()  # (layer, expert) selected in some batch

    def after_backward(self, model: AdapterModel) -> None:
        """Score the batch's experts per layer, keep the gradients of the top C, record
        usage and importance."""
        hf = self.config.hfedmoe
        routes = model.trace.routes
        if self.importance_sum is None:
            self.importance_sum = np.zeros((len(routes), routes[0].probs.shape[1]))
            self.usage_sum = np.zeros_like(self.importance_sum)
        self.frozen = []
        for layer, (moe, route) in enumerate(zip(model.moe_layers, routes)):
            importance, ib_score = expert_scores(route.probs, hf.importance_mix, hf.ib_beta)
            chosen = selected_experts(ib_score, route.tokens_per_expert > 0, self.budget.experts_trained)
            self.trained.update((layer, int(e)) for e in torch.nonzero(chosen).squeeze(1).tolist())
            untrained = ~chosen[moe.held]  # [E] local experts left alone this batch
            for param in moe.experts.parameters():
                if param.grad is not None:
                    param.grad[untrained] = 0
                self.frozen.append((param, untrained, param.detach()[untrained].clone()))
            self.importance_sum[layer] += importance.cpu().numpy()
            self.usage_sum[layer] += route.probs.detach().float().sum(dim=0).cpu().numpy()
        self.batches += 1
        self.tokens += routes[0].probs.shape[0]

    def after_step(self, model: AdapterModel) -> None:
        """Put back the experts not selected (AdamW's momentum and decay moved them), then
        count the routing."""
        with torch.no_grad():
            for param, rows, values in self.frozen:
                param[rows] = values
        self.frozen = []
        super().after_step(model)

    def trained_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The routers, the head and the experts selected in at least one batch."""
        return {key: a for key, a in arrays.items() if expert_of(key) is None or expert_of(key) in self.trained}

    def importance(self) -> np.ndarray:
        """[L, M] mean importance s_b(e) over the batches trained."""
        return self.importance_sum / max(self.batches, 1)

    def usage(self) -> np.ndarray:
        """[L, M] u_c(e): mean gate probability of each expert over the tokens trained on."""
        return self.usage_sum / max(self.tokens, 1)

    def preference(self) -> np.ndarray:
        """Importance: the experts that matter most to this node's data."""
        return self.importance()

    def report(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Routing counts and next experts (MoEClient), usage and importance per expert."""
        metrics, request = super().report()
        if self.importance_sum is not None:
            metrics[EXPERT_USAGE] = flatten(self.usage())
            metrics[EXPERT_IMPORTANCE] = flatten(self.importance())
        return metrics, request
