"""The server's step from the round's aggregate to the new global model
(`federation.server-optimizer`), with the math of Flower's strategies:

- `avg` (FedAvg): the aggregate is the new model.
- `avgm` (FedAvgM): with the pseudo-gradient g = x - aggregate, momentum
  `v <- mu v + g` and `x <- x - eta v` (PyTorch's SGD convention, as Flower's FedAvgM).
- `adam` (FedAdam): with the change d = aggregate - x, `m <- b1 m + (1 - b1) d`,
  `v <- b2 v + (1 - b2) d^2`, `x <- x + eta_t m / (sqrt(v) + tau)`, where
  `eta_t = eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1))` as Flower writes it (t: the step).
- `yogi` (FedYogi): m as adam, `v <- v - (1 - b2) d^2 sign(v - d^2)`,
  `x <- x + eta m / (sqrt(v) + tau)` (no bias correction, as Flower).

Sparse, where Flower's strategies are dense: the step is taken key by key, element by
element, where this round's aggregate changed the model. An element no reply held (an
expert nobody trained this round, a router row nobody held) keeps its value and its
moments: momentum from earlier rounds does not move what nobody trained. Each element
counts its own steps t (for adam's correction). Where every element changes every round,
as with Flower's dense strategies on trained replies, t is the round and both give the same
model (Flower's momentum would also move an element whose average did not change, and its
correction counts rounds that updated nothing).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedmoe_app.config import FederationConfig

# Flower's default eta of each (FedAvgM's server_learning_rate, FedAdam's and FedYogi's eta):
# federation.server-lr 0 means it.
FLOWER_LR = {"avg": 1.0, "avgm": 1.0, "adam": 0.1, "yogi": 0.01}
# The state each optimiser keeps per key: first moment (momentum), second moment, steps taken.
STATE = {"avg": (), "avgm": ("m",), "adam": ("m", "v", "t"), "yogi": ("m", "v")}


class ServerOptimizer:
    """The server's step, with its moments per key (float32, saved with the checkpoint)."""

    def __init__(self, federation: FederationConfig) -> None:
        self.name = federation.server_optimizer
        self.lr = federation.server_lr or FLOWER_LR[self.name]
        self.momentum = federation.server_momentum
        self.beta2 = federation.server_beta2
        self.tau = federation.server_tau
        self.moments: dict[str, dict[str, np.ndarray]] = {name: {} for name in STATE[self.name]}

    def step(self, current: Mapping[str, np.ndarray], aggregate: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The new global arrays from the round's `aggregate` of `current` (same keys and
        shapes; the aggregate's dtype is kept)."""
        if self.name == "avg":
            return dict(aggregate)
        stepped = dict(aggregate)
        for key, new in aggregate.items():
            x = current[key].astype(np.float64)
            change = new.astype(np.float64) - x
            moved = change != 0  # where the round's aggregate changed the model
            if moved.any():
                stepped[key] = self._step_key(key, x, change, moved).astype(new.dtype)
        return stepped

    def _moment(self, name: str, key: str, like: np.ndarray) -> np.ndarray:
        return self.moments[name].get(key, np.zeros(like.shape, dtype=np.float32)).astype(np.float64)

    def _step_key(self, key: str, x: np.ndarray, change: np.ndarray, moved: np.ndarray) -> np.ndarray:
        m = self._moment("m", key, x)
        if self.name == "avgm":
            m = np.where(moved, self.momentum * m - change, m)  # the pseudo-gradient is -change
            new = np.where(moved, x - self.lr * m, x)
        else:
            m = np.where(moved, self.momentum * m + (1 - self.momentum) * change, m)
            v = self._moment("v", key, x)
            square = change ** 2
            if self.name == "adam":
                v = np.where(moved, self.beta2 * v + (1 - self.beta2) * square, v)
                t = self._moment("t", key, x) + moved
                self.moments["t"][key] = t.astype(np.float32)
                lr = self.lr * np.sqrt(1 - self.beta2 ** (t + 1)) / (1 - self.momentum ** (t + 1))
            else:
                v = np.where(moved, v - (1 - self.beta2) * square * np.sign(v - square), v)
                lr = self.lr
            self.moments["v"][key] = v.astype(np.float32)
            new = np.where(moved, x + lr * m / (np.sqrt(v) + self.tau), x)
        self.moments["m"][key] = m.astype(np.float32)
        return new

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The moments as flat named arrays ('<moment>/<key>'), for the checkpoint."""
        return {f"{name}/{key}": array for name, arrays in self.moments.items() for key, array in arrays.items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray], global_arrays: Mapping[str, np.ndarray]) -> None:
        """Continue from `state_arrays`, checked against this run's optimiser and global arrays."""
        moments: dict[str, dict[str, np.ndarray]] = {name: {} for name in STATE[self.name]}
        for flat, array in arrays.items():
            name, _, key = flat.partition("/")
            if name not in moments:
                raise ValueError(f"the checkpoint holds server-optimizer state '{name}', which "
                                 f"federation.server-optimizer {self.name!r} does not keep")
            if key not in global_arrays or global_arrays[key].shape != array.shape:
                raise ValueError(f"the checkpoint's server-optimizer state '{flat}' does not match the global model")
            moments[name][key] = np.asarray(array, dtype=np.float32)
        self.moments = moments
