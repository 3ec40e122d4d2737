"""SCAFFOLD's control variates (Karimireddy et al. 2020), held by the server for every
method that keeps its tensors' parameterisation from round to round
(`train.drift-correction: scaffold`).

A client's control variate c_i is the mean gradient of its local objective over its last
round of training, which it reports beside its update (SCAFFOLD's option II estimates the
same mean from the update, (x - y_i) / (K lr), which holds for SGD only: our clients train
with AdamW). The server keeps every client's latest c_i and weights, so clients keep no
state: a node that restarts, or a SuperNode that runs each message in a fresh process,
loses nothing. The global c is the average of all clients' latest c_i, each tensor (and
row, and rank) weighted as the method weighs that client's update (`weights_for`), so a
sparse method's expert is averaged over the clients that hold it. A client receives
c - c_i for the tensors it is sent and has a c_i for (none before its first reply), which
its training loop adds to its gradients (fedmoe_app.train.ControlVariate).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from strategies.core import Contribution, Weight, sparse_weighted_average
from strategies.ranks import first_ranks, rank_axis, zero_padded
from strategies.replies import Reply

PREFIX = "control-variates"  # checkpoint tensors: <PREFIX>/<i>/value/<key>, <PREFIX>/<i>/weight/<key>


class ControlVariates:
    """Every client's latest control variate c_i and its weights, by client id."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, np.ndarray]] = {}
        self.weights: dict[str, dict[str, np.ndarray]] = {}

    def update(self, replies: list[Reply], weights_for: Callable[[Reply], Mapping[str, Weight]]) -> None:
        """Each replying client's c_i: the mean gradients of its reply, weighted as `weights_for` weighs it."""
        for reply in replies:
            weights = weights_for(reply)
            self.values[reply.node.client_id] = dict(reply.gradients)
            self.weights[reply.node.client_id] = {k: np.asarray(weights.get(k, 0.0), np.float64) for k in reply.gradients}

    def global_variate(self, global_arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """c: per tensor the weighted average of the clients' c_i in the global tensor's shape
        (a lower-rank c_i counts in its ranks only); zero where no client has one."""
        contributions = []
        for client_id, values in self.values.items():
            arrays, weights = {}, {}
            for key, value in values.items():
                full, weight = global_arrays[key], self.weights[client_id][key]
                if value.shape != full.shape:
                    value, mask = zero_padded(value, full.shape, rank_axis(key))
                    weight = mask * weight  # a LoRA tensor's weight is one number (as in strategies/moe.py)
                arrays[key], weights[key] = value, weight
            contributions.append(Contribution(arrays, weights))
        keys = {key for values in self.values.values() for key in values}
        zeros = {key: np.zeros_like(global_arrays[key], dtype=np.float32) for key in keys}
        return sparse_weighted_average(zeros, contributions)

    def correction_for(self, client_id: str, sent: Mapping[str, np.ndarray],
                       variate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """c - c_i for the tensors `sent` to the client that it has a c_i for, in the shapes sent
        (c cut to the ranks sent; a c_i of other ranks cut or zero-padded to them); empty before
        the client's first reply. `variate`: c, from `global_variate`."""
        mine = self.values.get(client_id, {})
        correction = {}
        for key, array in sent.items():
            if key not in mine or key not in variate:
                continue
            correction[key] = (_fitted(variate[key], array.shape, key) - _fitted(mine[key], array.shape, key)).astype(np.float32)
        return correction

    def state_arrays(self) -> tuple[list[str], dict[str, np.ndarray]]:
        """(client ids, tensors) for a checkpoint: client i's c_i and weights under
        `<PREFIX>/<i>/value/<key>` and `<PREFIX>/<i>/weight/<key>`."""
        clients = sorted(self.values)
        arrays = {}
        for i, client_id in enumerate(clients):
            for key, value in self.values[client_id].items():
                arrays[f"{PREFIX}/{i}/value/{key}"] = value
                arrays[f"{PREFIX}/{i}/weight/{key}"] = self.weights[client_id][key]
        return clients, arrays

    def load_state_arrays(self, clients: list[str], arrays: Mapping[str, np.ndarray]) -> None:
        """Continue from `state_arrays` (tensors of other owners in `arrays` are ignored)."""
        self.values = {client_id: {} for client_id in clients}
        self.weights = {client_id: {} for client_id in clients}
        for name, array in arrays.items():
            if not name.startswith(PREFIX + "/"):
                continue
            index, kind, key = name[len(PREFIX) + 1:].split("/", 2)
            array = np.asarray(array)
            if kind == "weight" and array.size == 1:
                array = array.reshape(())  # a checkpoint keeps a number as one element; any shape of it weighs alike
            (self.values if kind == "value" else self.weights)[clients[int(index)]][key] = array


def _fitted(array: np.ndarray, shape: tuple[int, ...], key: str) -> np.ndarray:
    """`array` in `shape`: as it is, or a LoRA tensor cut or zero-padded along its rank axis."""
    if array.shape == shape:
        return array
    axis = rank_axis(key)
    if axis is None:
        raise ValueError(f"'{key}' has shape {array.shape}, wanted {shape}, and is no LoRA tensor")
    if array.shape[axis] > shape[axis]:
        return first_ranks(array, axis, shape[axis])
    return zero_padded(array, shape, axis)[0]
