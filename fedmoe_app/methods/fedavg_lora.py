"""FedAvg-LoRA, client half: every client trains LoRA at the one rank lora.rank (FedAvg
averages tensors of one shape), with the task loss alone."""

from __future__ import annotations

from fedmoe_app.config import RunConfig
from fedmoe_app.methods.lora import LoRAClient


class FedAvgLoRAClient(LoRAClient):
    """Homogeneous-rank LoRA."""

    name = "fedavg_lora"

    @classmethod
    def global_rank(cls, config: RunConfig) -> int:
        """lora.rank, the one rank of every model."""
        return config.lora.rank

    def rank(self) -> int:
        """lora.rank, the same on every client."""
        return self.config.lora.rank
