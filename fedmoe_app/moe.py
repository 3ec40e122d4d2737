"""Sparse Mixture-of-Experts: a top-k router over a held expert subset and sparse dispatch.

The router and the dispatch make no assumption about what an expert is: any module that
maps [n, d] -> [n, d] works, so the same code serves adapter experts (FFT-MoE) and
backbone experts (slices of a frozen FFN, HFedMoE / UB-SMoE).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    """Routing of N tokens over M experts."""

    logits: torch.Tensor  # [N, M] raw router logits s = W_R x
    probs: torch.Tensor  # [N, M] softmax over the held experts, 0 for the others
    topk_index: torch.Tensor  # [N, k] chosen experts
    topk_weight: torch.Tensor  # [N, k] their gate weights
    held_mask: torch.Tensor  # [M] bool, the experts this client holds

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """[M] number of routing slots each expert received."""
        return torch.bincount(self.topk_index.reshape(-1), minlength=self.logits.shape[-1])


class TopKRouter(nn.Module):
    """Linear router `W_R x`, softmax restricted to the held experts, top-k."""

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(
        self, x: torch.Tensor, held_mask: torch.Tensor, top_k: int, renormalize: bool = True
    ) -> RouterOutput:
        """Route tokens `x` [N, d] to `top_k` of the held experts."""
        logits = F.linear(x, self.weight)
        masked = logits.masked_fill(~held_mask, float("-inf"))
        probs = torch.softmax(masked.float(), dim=-1).to(x.dtype)
        topk_weight, topk_index = torch.topk(probs, top_k, dim=-1)
        if renormalize:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, topk_index, topk_weight, held_mask)


class BottleneckExpert(nn.Module):
    """Adapter expert: a two-layer bottleneck FFN d -> h -> d."""

    def __init__(self, hidden_size: int, expert_hidden: int, init_scale: float = 0.01) -> None:
        super().__init__()
        self.w_in = nn.Linear(hidden_size, expert_hidden)
        self.w_out = nn.Linear(expert_hidden, hidden_size)
        nn.init.normal_(self.w_out.weight, std=init_scale)
        nn.init.zeros_(self.w_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the expert to tokens `x` [n, d]."""
        return self.w_out(F.gelu(self.w_in(x)))


class SparseMoE(nn.Module):
    """Top-k mixture over the experts a client holds, computed sparsely.

    `experts` maps a global expert index to its module; only those are built and held.
    Each expert runs on exactly the tokens routed to it, so expert compute scales with
    k, not with M.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        experts: dict[int, nn.Module],
        top_k: int,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        if not experts:
            raise ValueError("a SparseMoE needs at least one held expert")
        if not 1 <= top_k <= len(experts):
            raise ValueError(f"top_k={top_k} must be in [1, {len(experts)}] (experts held)")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.router = TopKRouter(hidden_size, num_experts)
        self.experts = nn.ModuleDict({str(e): experts[e] for e in sorted(experts)})
        held_mask = torch.zeros(num_experts, dtype=torch.bool)
        held_mask[sorted(experts)] = True
        self.register_buffer("held_mask", held_mask, persistent=False)

    @property
    def held(self) -> list[int]:
        """Global indices of the held experts."""
        return [int(e) for e in self.experts]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """Mix the top-k experts' outputs for tokens `x` [N, d]."""
        route = self.router(x, self.held_mask, self.top_k, self.renormalize)
        flat_expert = route.topk_index.reshape(-1)
        order = torch.argsort(flat_expert, stable=True)  # slots grouped by expert
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        token_of_slot = order // self.top_k
        weight_of_slot = route.topk_weight.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of_slot[start : start + count]
            expert_out = self.experts[str(expert_id)](x[tokens])
            out.index_add_(0, tokens, expert_out * weight_of_slot[start : start + count, None])
            start += count
        return out, route
