"""HFedMoE's own config section (`hfedmoe:`, defaults in conf/hfedmoe.yaml), device-tier field and message keys."""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe_app.budgets import TierField, register_tier_field
from fedmoe_app.config import ConfigError, MethodSection, register_method_section

# Train reply metrics: per-expert usage u_c(e) (mean gate probability) and importance s_c(e), flattened [L * M].
EXPERT_USAGE = "expert-usage"
EXPERT_IMPORTANCE = "expert-importance"


@dataclass(frozen=True)
class HFedMoEConfig:
    """HFedMoE's coefficients (DESIGN 5.2; section `hfedmoe:`, defaults in conf/hfedmoe.yaml)."""

    importance_mix: float  # lam in s_b(e) = lam * mean_i G_e(x_i) + (1 - lam) * max_i G_e(x_i)
    ib_beta: float  # beta of the information-bottleneck penalty in I_b(e)
    usage_threshold: float  # tau: a client's expert update counts if its usage u_c(e) >= tau
    gate_weights: str  # normalised (alpha(c) summing to one) | raw (the paper's alpha(c))


def check_config(section: HFedMoEConfig) -> None:
    """ConfigError naming the first key of the section out of its range."""
    if not 0.0 <= section.importance_mix <= 1.0:
        raise ConfigError(f"config key 'hfedmoe.importance-mix' is {section.importance_mix}; allowed: [0, 1]")
    for key in ("ib_beta", "usage_threshold"):
        if not getattr(section, key) >= 0:
            raise ConfigError(f"config key 'hfedmoe.{key.replace('_', '-')}' is {getattr(section, key)}; allowed: >= 0")


# Backbone experts a client trains per batch (the paper's C), of those its batch routed to.
register_tier_field(TierField("experts-trained", int, capped_by_held=True, owner="hfedmoe"))
register_method_section(MethodSection("hfedmoe", "hfedmoe", HFedMoEConfig, check_config, "conf/hfedmoe.yaml",
                                      {"hfedmoe.gate-weights": ("normalised", "raw")}))
