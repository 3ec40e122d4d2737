"""FedAvg-LoRA, server half (the client half: fedmoe_app/methods/fedavg_lora.py): PEFT LoRA
of one rank on every client, averaged by training rows (FedAvg), the sparse core's default."""

from __future__ import annotations

from strategies.base import SparseStrategy


class FedAvgLoRA(SparseStrategy):
    """The LoRA baseline the MoE methods are compared against."""

    name = "fedavg_lora"
