"""HetLoRA's own config section (`hetlora:`, defaults in conf/hetlora.yaml) and message keys."""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe_app.config import ConfigError, MethodSection, register_method_section

LORA_RANK = "lora-rank"  # train reply request: the rank a node asks to train at next round (after self-pruning)


@dataclass(frozen=True)
class HetLoRAConfig:
    """HetLoRA's rank self-pruning (section `hetlora:`, defaults in conf/hetlora.yaml)."""

    decay: float  # gamma: a node whose tail ranks shrank prunes its rank to floor(gamma * rank)
    prune_weight: float  # lam of the self-pruning regulariser ||B_tail|| ||A_tail||
    min_rank: int  # no node prunes below this rank


def check_config(section: HetLoRAConfig) -> None:
    """ConfigError naming the first key of the section out of its range."""
    if not 0.0 < section.decay < 1.0:
        raise ConfigError(f"config key 'hetlora.decay' is {section.decay}; allowed: (0, 1)")
    if not section.prune_weight >= 0:
        raise ConfigError(f"config key 'hetlora.prune-weight' is {section.prune_weight}; allowed: >= 0")
    if section.min_rank < 1:
        raise ConfigError(f"config key 'hetlora.min-rank' is {section.min_rank}; allowed: >= 1")


register_method_section(MethodSection("hetlora", "hetlora", HetLoRAConfig, check_config, "conf/hetlora.yaml"))
