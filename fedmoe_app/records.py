"""Conversions between NumPy/torch tensors and Flower records (tensor names: fedmoe_app/names.py).

The wire codec lives here and nowhere else: tensors travel in `federation.wire-dtype`
(fp32 | fp16 | bf16) and are decoded to float32; clients send updates (trained minus
received), servers send values.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

WIRE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": None}  # bf16: no NumPy dtype
BF16 = "bfloat16"  # the dtype string of a bf16 Array
RAW_STYPE = "raw"  # an Array's data is its elements' bytes, little-endian, C order, no header


def gradient_wire_dtype(wire_dtype: str) -> str:
    """The dtype gradients travel in (SCAFFOLD's control variates): the wire dtype, but bf16
    for fp16, whose range (6e-5 is its smallest normal number) would flush small gradients."""
    return "bf16" if wire_dtype == "fp16" else wire_dtype


def to_record(arrays: Mapping[str, np.ndarray], wire_dtype: str = "fp32") -> ArrayRecord:
    """An ArrayRecord holding `arrays` under their names, float arrays in `wire_dtype`
    (fp32 | fp16 | bf16); other arrays as they are."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire dtype {wire_dtype!r}; allowed: {', '.join(WIRE_DTYPES)}")
    return ArrayRecord({name: _encode(name, a, wire_dtype) for name, a in arrays.items()})


def _encode(name: str, array: np.ndarray, wire_dtype: str) -> Array:
    """One tensor as a flwr Array in `wire_dtype` (a float array) or unchanged (any other)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return Array(np.ascontiguousarray(array))
    if wire_dtype == "bf16":
        # torch rounds to nearest even; the 16-bit pattern travels raw under dtype 'bfloat16'
        tensor = torch.from_numpy(np.require(array, np.float32, ["C", "W"])).to(torch.bfloat16)
        _check_range(name, array, torch.isinf(tensor).numpy(), wire_dtype)
        data = tensor.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
        return Array(dtype=BF16, shape=tuple(array.shape), stype=RAW_STYPE, data=data)
    with np.errstate(over="ignore"):
        encoded = np.ascontiguousarray(array, dtype=WIRE_DTYPES[wire_dtype])
    _check_range(name, array, np.isinf(encoded), wire_dtype)
    return Array(encoded)


def _check_range(name: str, array: np.ndarray, encoded_inf: np.ndarray, wire_dtype: str) -> None:
    """Raise ValueError if a finite value of `array` is infinite once encoded in `wire_dtype`."""
    overflow = encoded_inf & np.isfinite(array)
    if overflow.any():
        largest = float(np.max(np.abs(array[np.isfinite(array)])))
        hint = "; bf16 or fp32 keep float32's range" if wire_dtype == "fp16" else ""
        raise ValueError(
            f"tensor '{name}' has max |value| {largest:.6g}, beyond the finite range of {wire_dtype} "
            f"(config key federation.wire-dtype){hint}"
        )


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The arrays of an ArrayRecord by name, float arrays (any wire dtype) as float32."""
    return {name: _decode(array) for name, array in record.items()}


def _decode(array: Array) -> np.ndarray:
    """One flwr Array as NumPy: float32 if it holds floats, else as it is."""
    if array.dtype == BF16:
        if array.stype != RAW_STYPE:
            raise ValueError(f"a bfloat16 Array must have stype '{RAW_STYPE}', got '{array.stype}'")
        bits = np.frombuffer(array.data, dtype="<u2").astype(np.uint32) << 16  # bf16 = top half of float32
        return bits.view(np.float32).reshape(array.shape)
    decoded = array.numpy()
    return decoded.astype(np.float32, copy=False) if np.issubdtype(decoded.dtype, np.floating) else decoded


def updates_from(trained: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What a client sends up: each trained tensor minus the tensor it received, float32."""
    missing = sorted(set(trained) - set(received))
    if missing:
        raise KeyError(f"trained tensor '{missing[0]}' was not received, so it has no update")
    return {name: np.subtract(a, received[name], dtype=np.float32) for name, a in trained.items()}


def trained_from(global_arrays: Mapping[str, np.ndarray], updates: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the server averages: a reply's trained tensors, its float32 global tensors plus
    its decoded updates. A tensor the global model lacks, or holds in another shape, is
    passed through unchanged, for the aggregation core to reject."""
    return {
        name: np.add(global_arrays[name], u, dtype=np.float32)
        if name in global_arrays and global_arrays[name].shape == u.shape else u
        for name, u in updates.items()
    }


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of tensor data an ArrayRecord carries."""
    return sum(len(array.data) for array in record.values())


def flatten(matrix: np.ndarray) -> list[float]:
    """A [L, M] matrix as a flat list (for MetricRecord / ConfigRecord)."""
    return [float(x) for x in np.asarray(matrix).reshape(-1)]


def unflatten(values: Sequence[float], num_layers: int) -> np.ndarray:
    """Inverse of `flatten` for L rows."""
    return np.asarray(values, dtype=np.float64).reshape(num_layers, -1)
