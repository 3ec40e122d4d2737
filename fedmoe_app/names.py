"""The tensor-name schema, written once: what a trainable tensor's name says it is.

Every trainable tensor has a stable name, so a message can carry any subset of them:
- adapter or backbone experts, one entry per expert: `layers.3.moe.experts.7.w_in.weight`,
  `layers.3.moe.experts.7.lora_in_a` (the MoE of the model's 3rd MoE layer);
- routers: `layers.3.moe.router.weight`;
- the classification head: `head.weight`, `head.bias`;
- PEFT LoRA on the backbone: `backbone.<module path>.lora_A.default.weight` [r, in] and
  `...lora_B.default.weight` [out, r].
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

EXPERT_KEY = re.compile(r"^layers\.(\d+)\.moe\.experts\.(\d+)\.")
ROUTER_KEY = re.compile(r"^layers\.(\d+)\.moe\.router\.weight$")
PEFT_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>A|B)\.[^.]+\.weight$")  # A [r, in], B [out, r]
HEAD_WEIGHT = "head.weight"


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


def lora_pairs(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """PEFT LoRA module name -> (its A key, its B key), for the modules with both among `keys`."""
    factors: dict[str, dict[str, str]] = {}
    for key in keys:
        match = PEFT_LORA_KEY.match(key)
        if match:
            factors.setdefault(match.group("module"), {})[match.group("factor")] = key
    return {module: (f["A"], f["B"]) for module, f in sorted(factors.items()) if len(f) == 2}


def num_labels_of(arrays: Mapping[str, np.ndarray]) -> int:
    """The number of classes of a model's trainable tensors (the rows of its head; 0 without one)."""
    return arrays[HEAD_WEIGHT].shape[0] if HEAD_WEIGHT in arrays else 0


def lora_rank_of(arrays: Mapping[str, np.ndarray]) -> int | None:
    """The rank of the PEFT LoRA tensors among `arrays` (rows of a lora_A), or None if none."""
    ranks = {a.shape[0] for name, a in arrays.items() if PEFT_LORA_KEY.match(name) and ".lora_A." in name}
    if len(ranks) > 1:
        raise ValueError(f"LoRA tensors of several ranks {sorted(ranks)} in one model")
    return ranks.pop() if ranks else None


def expert_rank_of(arrays: Mapping[str, np.ndarray]) -> int:
    """The LoRA rank of the backbone experts among `arrays` (rows of a lora_in_a)."""
    ranks = {a.shape[0] for name, a in arrays.items() if name.endswith(".lora_in_a")}
    if len(ranks) != 1:
        raise ValueError(f"backbone experts' LoRAs of ranks {sorted(ranks)}; a model needs exactly one rank")
    return ranks.pop()
