"""Head-only FedAvg, server half (the client half: fedmoe_app/methods/head_only.py): the
frozen encoder with only the linear classifier trained and averaged by training rows.

The floor every adapter method must clear: what federated learning gets from the
pretrained features alone.
"""

from __future__ import annotations

from strategies.base import SparseStrategy


class HeadOnly(SparseStrategy):
    """FedAvg of the classification head; no adapters."""

    name = "head_only"
