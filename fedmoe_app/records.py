"""Conversions between NumPy/torch tensors and Flower records; tensor-name helpers."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord

EXPERT_KEY = re.compile(r"^layers\.(\d+)\.moe\.experts\.(\d+)\.")
ROUTER_KEY = re.compile(r"^layers\.(\d+)\.moe\.router\.weight$")


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord holding `arrays` under their names."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of an ArrayRecord by name."""
    return {name: array.numpy() for name, array in record.items()}


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor data an ArrayRecord carries."""
    return sum(len(array.data) for array in record.values())


def expert_of(key: str) -> tuple[int, int] | None:
    """(layer, expert) of an expert tensor's name, else None."""
    match = EXPERT_KEY.match(key)
    return (int(match.group(1)), int(match.group(2))) if match else None


def router_layer(key: str) -> int | None:
    """The layer of a router weight's name, else None."""
    match = ROUTER_KEY.match(key)
    return int(match.group(1)) if match else None


def held_experts(keys: Sequence[str], num_layers: int) -> list[list[int]]:
    """Per layer, the experts whose tensors appear in `keys` (sorted)."""
    held: list[set[int]] = [set() for _ in range(num_layers)]
    for key in keys:
        found = expert_of(key)
        if found:
            held[found[0]].add(found[1])
    return [sorted(layer) for layer in held]


def select_keys(arrays: Mapping[str, np.ndarray], subset: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    """`arrays` without the expert tensors outside `subset` (experts per layer)."""
    wanted = {(layer, e) for layer, experts in enumerate(subset) for e in experts}
    return {k: a for k, a in arrays.items() if expert_of(k) is None or expert_of(k) in wanted}


def flatten(matrix: np.ndarray) -> list[float]:
    """A [L, M] matrix as a flat list (for MetricRecord / ConfigRecord)."""
    return [float(x) for x in np.asarray(matrix).reshape(-1)]


def unflatten(values: Sequence[float], num_layers: int) -> np.ndarray:
    """Inverse of `flatten` for L rows."""
    return np.asarray(values, dtype=np.float64).reshape(num_layers, -1)
