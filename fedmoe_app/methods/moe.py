"""The client half shared by methods with sparse MoE layers (adapter or backbone experts):
the held experts (those received), the budget's experts per token, the LoRA rank received
(backbone experts), routing statistics reported with every train reply, and the experts
the node asks to hold next round."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.model import AdapterModel, num_layers
from fedmoe_app.names import expert_rank_of, held_experts
from fedmoe_app.records import unflatten
from fedmoe_app.routing import RoutingStats


# Train reply: the routing slots each expert received, flattened [L * M] (metric); the experts a
# node asks to hold next round, [L * experts-held] (request).
ROUTED_TOKENS = "routed-tokens"
NEXT_EXPERTS = "next-experts"


class MoEClient(ClientMethod):
    """MoE layers holding the experts received, routing each token to the budget's experts
    per token: `top-k` adapter experts, or `active-experts` backbone experts."""

    adapter = "moe"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routing: RoutingStats | None = None  # of the steps taken so far

    def layer_matrix(self, key: str) -> torch.Tensor | None:
        """The [L, M] matrix the server sent under `key` (flattened), or None if it sent none."""
        values = self.server.get(key)
        return torch.tensor(unflatten(values, num_layers(self.config)), dtype=torch.float32) if values else None

    def experts_per_token(self) -> int:
        """K: the budget's top-k for adapter experts, its active-experts for backbone experts."""
        return self.budget.active_experts if self.config.moe.experts == "backbone" else self.budget.top_k

    def model_options(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The experts received (per layer), K, and for backbone experts the LoRA rank received."""
        options = {"held": held_experts(list(arrays), num_layers(self.config)), "top_k": self.experts_per_token()}
        if self.config.moe.experts == "backbone":
            options["lora_rank"] = expert_rank_of(arrays)
        return options

    def after_step(self, model: AdapterModel) -> None:
        """Count the routing of the step's tokens."""
        if self.routing is None:
            moes = model.moe_layers
            self.routing = RoutingStats.empty(len(moes), moes[0].num_experts)
        self.routing.add(model.trace.routes)

    def preference(self) -> np.ndarray:
        """[L, M] how much this node wants each expert next round (default: its mean router
        probability over all M experts on its data)."""
        return self.routing.full_prob

    def report(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The routing slots each expert received, per layer; the experts to hold next round
        (the budget's experts-held with the highest `preference`)."""
        if self.routing is None:
            return {}, {}
        held = self.budget.experts_held
        preferred = [sorted(np.argsort(-row, kind="stable")[:held].tolist()) for row in self.preference()]
        return ({ROUTED_TOKENS: [int(x) for x in self.routing.routed_tokens.reshape(-1)]},
                {NEXT_EXPERTS: [e for layer in preferred for e in layer]})
