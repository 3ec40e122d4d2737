"""Head-only FedAvg: the frozen encoder with only the linear classifier trained and averaged.

The floor every adapter method must clear: what federated learning gets from the
pretrained features alone.
"""

from __future__ import annotations

from strategies.fedavg_lora import FedAvgLoRA


class HeadOnly(FedAvgLoRA):
    """FedAvg of the classification head; no adapters."""

    name = "head_only"
    adapter = "head"
