"""Head-only FedAvg, client half: only the linear head on the frozen encoder trains."""

from __future__ import annotations

from fedmoe_app.methods.base import ClientMethod


class HeadOnlyClient(ClientMethod):
    """The task loss on the head; nothing else."""

    name = "head_only"  # adapter: the base's 'head'
