"""FedAvg-LoRA: PEFT LoRA of one rank on every client, averaged by examples (FedAvg)."""

from __future__ import annotations

from strategies.base import Reply, SparseStrategy, examples
from strategies.core import Weight


class FedAvgLoRA(SparseStrategy):
    """The LoRA baseline the MoE methods are compared against."""

    name = "fedavg_lora"
    adapter = "lora"

    def weights_for(self, reply: Reply) -> dict[str, Weight]:
        rows = float(examples(reply))
        return {key: rows for key in reply.arrays}
