"""The local learning rate of each round (train.lr-schedule): what the server sends with a
train message, so a resumed run and every device follow the same schedule."""

from __future__ import annotations

import math

from fedmoe_app.config import TrainConfig


def round_lr(train: TrainConfig, server_round: int, num_rounds: int) -> float:
    """The learning rate of round `server_round` (1..num_rounds): during the first
    `warmup-rounds` rounds lr * r / (warmup-rounds + 1); then `constant` keeps lr, `cosine`
    and `linear` decay from lr (the first round after warm-up) towards lr-min, which a round
    after the last would get (so the last round still trains: its rate is one step above it)."""
    warmup = train.warmup_rounds
    if server_round <= warmup:
        return train.lr * server_round / (warmup + 1)
    progress = min(max((server_round - warmup - 1) / (num_rounds - warmup), 0.0), 1.0)
    if train.lr_schedule == "cosine":
        return train.lr_min + (train.lr - train.lr_min) * (1 + math.cos(math.pi * progress)) / 2
    if train.lr_schedule == "linear":
        return train.lr - (train.lr - train.lr_min) * progress
    return train.lr
