"""LoRA tensors of several ranks on one server: which axis of a tensor is its rank, the
first ranks of a global tensor (what a lower-rank node receives), a node's tensor
zero-padded back to the global rank.

Two kinds of LoRA tensors travel: PEFT's on the backbone (`...query.lora_A.default.weight`
[r, in], `...lora_B.default.weight` [out, r]) and backbone experts' (`...moe.experts.7.lora_in_a`
[r, in], `lora_in_b` [out, r], `lora_out_a`, `lora_out_b`). Either way A's rank is its rows
and B's its columns.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from fedmoe_app.names import PEFT_LORA_KEY, lora_pairs

EXPERT_RANK_AXIS = {"lora_in_a": 0, "lora_out_a": 0, "lora_in_b": 1, "lora_out_b": 1}


def rank_axis(key: str) -> int | None:
    """The rank axis of a LoRA tensor's name (0 for A, 1 for B), else None."""
    if ".moe.experts." in key:
        return EXPERT_RANK_AXIS.get(key.rsplit(".", 1)[-1])
    match = PEFT_LORA_KEY.match(key)
    return None if match is None else (0 if match.group("factor") == "A" else 1)


def unpaired_lora(keys) -> list[str]:
    """The PEFT LoRA tensors among `keys` whose module's other factor is not among them."""
    keys = list(keys)
    paired = {key for pair in lora_pairs(keys).values() for key in pair}
    return sorted(key for key in keys if PEFT_LORA_KEY.match(key) and key not in paired)


def first_ranks(array: np.ndarray, axis: int, rank: int) -> np.ndarray:
    """The first `rank` ranks of a LoRA tensor along its rank `axis`."""
    return array[:rank] if axis == 0 else array[:, :rank]


def truncated(arrays: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """`arrays` with every LoRA tensor cut to its first `rank` ranks; the rest as they are."""
    return {key: first_ranks(a, axis, rank) if (axis := rank_axis(key)) is not None else a
            for key, a in arrays.items()}


def zero_padded(array: np.ndarray, shape: tuple[int, ...], axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(`array` zero-padded along its rank `axis` to `shape`, a mask of ones where it has values)."""
    padded, mask = np.zeros(shape, dtype=array.dtype), np.zeros(shape)
    region = (slice(None),) * axis + (slice(0, array.shape[axis]),)
    padded[region], mask[region] = array, 1.0
    return padded, mask
