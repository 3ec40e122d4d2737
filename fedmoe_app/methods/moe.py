"""The client half shared by methods with sparse MoE adapters: the held experts (those
received), the budget's top-k, and routing statistics reported with every train reply."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedmoe_app import messages as msg
from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.model import AdapterClassifier, num_layers
from fedmoe_app.records import held_experts
from fedmoe_app.routing import RoutingStats


class MoEClient(ClientMethod):
    """MoE adapters holding the experts received, routing each token to the budget's top-k."""

    adapter = "moe"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.routing: RoutingStats | None = None  # of the steps taken so far

    def model_options(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """The experts received (per layer) and the budget's top-k."""
        return {"held": held_experts(list(arrays), num_layers(self.config)), "top_k": self.budget.top_k}

    def after_step(self, model: AdapterClassifier) -> None:
        """Count the routing of the step's tokens."""
        if self.routing is None:
            moes = model.moe_layers
            self.routing = RoutingStats.empty(len(moes), moes[0].num_experts)
        self.routing.add(model.trace.routes)

    def report(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The routing slots each expert received, per layer."""
        if self.routing is None:
            return {}, {}
        return {msg.ROUTED_TOKENS: [int(x) for x in self.routing.routed_tokens.reshape(-1)]}, {}
