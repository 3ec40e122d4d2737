"""ClientMethod: the client half of a method, and everything method-specific on a client.

A method is one name with two halves: its server strategy (`strategies/<name>.py`) and its
client half (`fedmoe_app/methods/<name>.py`). The client task and the training loop name no
method; they ask the client half, which lives for one message, for:
- `build_model`: the model this node trains or evaluates, from its budget and the arrays it
  received (kind of adapter, held experts, top-k, rank);
- `loss_terms`: what it adds to the task loss after each forward pass;
- `after_backward`: gradient edits before the optimiser step;
- `after_step`: what it observes after each step (e.g. routing statistics);
- `report`: the metrics and the requests for the next round that go into the reply;
- `trained_arrays`: which of the model's trainable tensors the reply carries.
The loop is: task loss + `loss_terms`, backward, `after_backward`, optimiser step, `after_step`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from fedmoe_app.budgets import DeviceBudget
from fedmoe_app.config import RunConfig
from fedmoe_app.model import AdapterModel, build_model, load_state
from fedmoe_app.names import num_labels_of


class ClientMethod:
    """The client half of a method: by default the task loss alone, no hooks, nothing to
    report. A subclass says what makes its method different."""

    name = ""
    adapter = "head"  # the adapters its models carry: moe | lora | head

    def __init__(self, config: RunConfig, budget: DeviceBudget, group_counts: Sequence[int],
                 server: Mapping[str, Any]) -> None:
        self.config = config
        self.budget = budget
        # rows per value of the task's partition key (per class, or per benchmark): the node's data skew
        self.group_counts = list(group_counts)
        self.server = server  # the config entries the server sent with this message

    @classmethod
    def global_model(cls, config: RunConfig, num_labels: int) -> AdapterModel:
        """The server's model: every expert, full rank, the evaluation top-k."""
        return build_model(config, num_labels, cls.adapter)

    def model_options(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Keyword arguments of `build_model` for this node (default: none)."""
        return {}

    def build_model(self, arrays: Mapping[str, np.ndarray]) -> AdapterModel:
        """This node's model, holding `arrays`."""
        model = build_model(self.config, num_labels_of(arrays), self.adapter, **self.model_options(arrays))
        load_state(model, arrays)
        return model

    def loss_terms(self, model: AdapterModel) -> torch.Tensor | float:
        """What the method adds to the task loss of the forward pass just done (default: 0)."""
        return 0.0

    def after_backward(self, model: AdapterModel) -> None:
        """Edit gradients before the optimiser step (default: nothing)."""

    def after_step(self, model: AdapterModel) -> None:
        """Observe the step just taken (default: nothing)."""

    def report(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(metrics, requests for the next round) this method adds to its train reply."""
        return {}, {}

    def trained_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tensors the reply carries, of the model's trainable `arrays` (default: all)."""
        return arrays
