"""FlexLoRA, client half: PEFT LoRA at the node's tier rank (devices.yaml `lora-rank`),
PEFT's usual scale lora.alpha / rank, the task loss alone. What it receives is the
server's truncated SVD of the averaged products at that rank (strategies/flexlora.py)."""

from __future__ import annotations

from fedmoe_app.methods.lora import LoRAClient


class FlexLoRAClient(LoRAClient):
    """Heterogeneous-rank LoRA, redistributed by SVD."""

    name = "flexlora"
