"""HetLoRA (arXiv 2401.06432), client half.

- A node trains PEFT LoRA at the rank it received: its tier's lora-rank at first, lower
  once it has pruned itself. Every LoRA, a node's and the server's, is scaled by
  lora.alpha / lora.rank, the scale fedavg_lora trains with (PEFT's lora_alpha set to
  alpha * rank / lora.rank), so the first r ranks of the global LoRA mean the same update on
  a rank-r node as in the server's model (with PEFT's usual alpha / r a rank-4 node would
  apply the global ranks 4x as strongly as the server's rank-16 model).
- Rank self-pruning: the loss gains `lam * sum over LoRA modules of ||B[:, p:]||_F ||A[p:, :]||_F`,
  the norm of each module's tail ranks from p = floor(gamma * r) (`hetlora.decay` gamma,
  `hetlora.prune-weight` lam), computed on the live factors so its gradient does pull the
  tail toward zero. If after the round's training the tails' total is below what the node
  received, the tail is not worth its cost: the node asks to train at p (never below
  `hetlora.min-rank`) from the next round on (request `lora-rank`); with prune-weight 0 nothing is pruned.
  Our reading of the paper's rule, which compares the tail norm with its value a round
  earlier: the value received is that value after aggregation, and a node needs no memory
  of its own across rounds.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

from fedmoe_app.config import RunConfig
from fedmoe_app.methods.hetlora_config import LORA_RANK
from fedmoe_app.methods.lora import LoRAClient
from fedmoe_app.model import AdapterModel, trainable_state
from fedmoe_app.names import lora_pairs, lora_rank_of


def tail_start(rank: int, decay: float, min_rank: int = 1) -> int:
    """p = max(min_rank, floor(decay * rank)): the first rank of the tail that self-pruning
    would cut (p = rank: nothing left to cut)."""
    return min(rank, max(min_rank, math.floor(decay * rank + 1e-9)))


def pruning_penalty(factors: list[tuple[torch.Tensor, torch.Tensor]], start: int) -> torch.Tensor:
    """sum over LoRA modules (A [r, in], B [out, r]) of ||B[:, start:]||_F * ||A[start:, :]||_F."""
    return sum((torch.linalg.norm(b[:, start:]) * torch.linalg.norm(a[start:]) for a, b in factors),
               torch.zeros(()))


def lora_factors(model: AdapterModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (A, B) parameters of every PEFT LoRA module of the model."""
    state = trainable_state(model)
    return [(state[a], state[b]) for a, b in lora_pairs(list(state)).values()]


class HetLoRAClient(LoRAClient):
    """Heterogeneous-rank LoRA with rank self-pruning."""

    name = "hetlora"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.received_rank = self.budget.lora_rank
        self.factors: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.tail_received = 0.0  # the penalty's norm product on the factors received

    def rank(self) -> int:
        """The rank received (the tier's lora-rank until the node prunes)."""
        return self.received_rank

    @classmethod
    def lora_alpha(cls, config: RunConfig, rank: int) -> float:
        """alpha * rank / lora.rank: the scale is lora.alpha / lora.rank at every rank."""
        return config.lora.alpha * rank / config.lora.rank

    def model_options(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """LoRA at the rank received, at most the tier's lora-rank."""
        received = lora_rank_of(arrays)
        if received is not None:
            if received > self.budget.lora_rank:
                raise ValueError(f"received LoRA tensors of rank {received}; tier '{self.budget.tier}' trains at "
                                 f"rank {self.budget.lora_rank} at most")
            self.received_rank = received
        return super().model_options(arrays)

    def tail(self) -> int:
        """Where this node's tail ranks start (`tail_start` of its rank)."""
        return tail_start(self.rank(), self.config.hetlora.decay, self.config.hetlora.min_rank)

    def prunable(self) -> bool:
        """Whether this node prunes at all: the regulariser is on and it has a tail to cut."""
        return self.config.hetlora.prune_weight > 0 and self.tail() < self.rank()

    def build_model(self, arrays: Mapping[str, np.ndarray]) -> AdapterModel:
        """The LoRA model holding `arrays`; notes its factors and their tail norm as received."""
        model = super().build_model(arrays)
        self.factors = lora_factors(model)
        with torch.no_grad():
            self.tail_received = float(pruning_penalty(self.factors, self.tail()))
        return model

    def loss_terms(self, model: AdapterModel) -> torch.Tensor | float:
        """The self-pruning regulariser lam * sum ||B_tail|| ||A_tail|| (0 once at min-rank)."""
        if not self.prunable():
            return 0.0
        return self.config.hetlora.prune_weight * pruning_penalty(self.factors, self.tail())

    def next_rank(self) -> int:
        """The rank to train at next round: pruned to max(min-rank, p) if the tail shrank."""
        start = self.tail()
        with torch.no_grad():
            tail_now = float(pruning_penalty(self.factors, start))
        if self.prunable() and tail_now < self.tail_received:
            return start
        return self.rank()

    def report(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The rank it asks to train at next round."""
        return {}, {LORA_RANK: self.next_rank()}
