"""The client half shared by LoRA methods: a PEFT LoRA at the method's rank."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedmoe_app.budgets import max_lora_rank
from fedmoe_app.config import RunConfig
from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.model import AdapterModel, build_model
from fedmoe_app.names import lora_rank_of


class LoRAClient(ClientMethod):
    """LoRA on the backbone at `rank()`: by default the rank of the node's tier
    (devices.yaml `lora-rank`), as heterogeneous-rank methods need; the global model at
    `global_rank` (default: the largest tier rank)."""

    adapter = "lora"

    @classmethod
    def global_rank(cls, config: RunConfig) -> int:
        """The rank of the global LoRA (default: the largest lora-rank of the tiers)."""
        return max_lora_rank(config)

    @classmethod
    def lora_alpha(cls, config: RunConfig, rank: int) -> float:
        """PEFT's lora_alpha for a LoRA of `rank` (its scale is alpha / rank; default: lora.alpha)."""
        return config.lora.alpha

    @classmethod
    def global_model(cls, config: RunConfig, num_labels: int) -> AdapterModel:
        """The server's model: LoRA at `global_rank`, with `lora_alpha` at that rank."""
        rank = cls.global_rank(config)
        return build_model(config, num_labels, cls.adapter, lora_rank=rank, lora_alpha=cls.lora_alpha(config, rank))

    def rank(self) -> int:
        """The LoRA rank this node trains at."""
        return self.budget.lora_rank

    def model_options(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """LoRA at `rank()`; the received LoRA tensors must have that rank."""
        received = lora_rank_of(arrays)
        if received is not None and received != self.rank():
            raise ValueError(f"received LoRA tensors of rank {received}; {self.name or 'this method'} trains "
                             f"at rank {self.rank()} on tier '{self.budget.tier}'")
        return {"lora_rank": self.rank(), "lora_alpha": self.lora_alpha(self.config, self.rank())}
