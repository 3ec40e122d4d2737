"""The one sparse, key-wise weighted average every strategy aggregates with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

# A weight is a scalar for the whole tensor, a vector over the tensor's first axis (rows),
# e.g. one weight per router row = per expert, or an array of the tensor's shape (one
# weight per element, e.g. zero outside the ranks a low-rank client trained).
Weight = float | np.ndarray


@dataclass
class Contribution:
    """One client's trained tensors and the weight of each in the average."""

    arrays: Mapping[str, np.ndarray]
    weights: Mapping[str, Weight]


def _broadcast(weight: Weight, array: np.ndarray) -> np.ndarray:
    weight = np.asarray(weight, dtype=np.float64)
    if weight.ndim == 0 or weight.shape == array.shape:
        return weight
    if weight.shape[0] != array.shape[0]:
        raise ValueError(f"row weights of length {weight.shape[0]} for a tensor of shape {array.shape}")
    return weight.reshape(weight.shape + (1,) * (array.ndim - 1))


def sparse_weighted_average(
    global_arrays: Mapping[str, np.ndarray], contributions: Sequence[Contribution]
) -> dict[str, np.ndarray]:
    """New global arrays: each key (and each row, for row weights) is the weighted average
    over the contributions that hold it with positive weight; where none does, the global
    value is kept. Keys not in `global_arrays` are an error."""
    numerators: dict[str, np.ndarray] = {}
    denominators: dict[str, np.ndarray] = {}
    for contribution in contributions:
        for key, array in contribution.arrays.items():
            if key not in global_arrays:
                raise KeyError(f"a reply holds '{key}', which the global model does not have")
            if array.shape != global_arrays[key].shape:
                raise ValueError(f"'{key}' has shape {array.shape}, global {global_arrays[key].shape}")
            weight = _broadcast(contribution.weights.get(key, 0.0), array)
            numerators[key] = numerators.get(key, 0.0) + weight * array.astype(np.float64)
            denominators[key] = denominators.get(key, 0.0) + weight
    result = dict(global_arrays)
    for key, numerator in numerators.items():
        denominator = np.broadcast_to(denominators[key], numerator.shape)
        current = global_arrays[key].astype(np.float64)
        averaged = np.divide(numerator, denominator, out=current.copy(), where=denominator > 0)
        result[key] = averaged.astype(global_arrays[key].dtype)
    return result
