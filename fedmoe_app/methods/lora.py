"""The client half shared by LoRA methods: a PEFT LoRA at the method's rank."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.model import lora_rank_of


class LoRAClient(ClientMethod):
    """LoRA on the backbone at `rank()`: by default the rank of the node's tier
    (devices.yaml `lora-rank`), as heterogeneous-rank methods need."""

    adapter = "lora"

    def rank(self) -> int:
        """The LoRA rank this node trains at."""
        return self.budget.lora_rank

    def model_options(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """LoRA at `rank()`; the received LoRA tensors must have that rank."""
        received = lora_rank_of(arrays)
        if received is not None and received != self.rank():
            raise ValueError(f"received LoRA tensors of rank {received}; {self.name or 'this method'} trains "
                             f"at rank {self.rank()} on tier '{self.budget.tier}'")
        return {"lora_rank": self.rank()}
