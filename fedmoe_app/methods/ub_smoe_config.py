"""UB-SMoE's own config section (`ub-smoe:`, defaults in conf/ub_smoe.yaml), device-tier field and message keys."""

from __future__ import annotations

from dataclasses import dataclass

from fedmoe_app.budgets import TierField, register_tier_field
from fedmoe_app.config import ConfigError, MethodSection, register_method_section

MODULATION = "modulation"  # train message config: the server's routing modulation phi, flattened [L * M]


@dataclass(frozen=True)
class UBSMoEConfig:
    """UB-SMoE's switches and coefficients (DESIGN 5.3; section `ub-smoe:`, defaults in conf/ub_smoe.yaml)."""

    dmr: bool  # Dynamic Modulated Routing (false: plain top-K, the ablation)
    pseudo_gradient: bool  # Universal Pseudo-Gradient for experts a batch left idle (false: the ablation)
    candidates: float  # N_p = min(M, ceil(candidates * K)) experts per token whose logits are modulated
    momentum: float  # zeta: share of the old modulation phi kept each round
    phi_min: float  # the bounds the clients' regulariser keeps phi in
    phi_max: float
    bound_weight: float  # lam of the bound regulariser


def check_config(ub: UBSMoEConfig) -> None:
    """ConfigError naming the first key of the section out of its range."""
    if not ub.candidates >= 1:
        raise ConfigError(f"config key 'ub-smoe.candidates' is {ub.candidates}; allowed: >= 1 (N_p is at least K)")
    if not 0.0 <= ub.momentum < 1.0:
        raise ConfigError(f"config key 'ub-smoe.momentum' is {ub.momentum}; allowed: [0, 1)")
    if not ub.phi_min <= 0.0 <= ub.phi_max:
        raise ConfigError(f"config keys 'ub-smoe.phi-min' and 'ub-smoe.phi-max' are {ub.phi_min}, {ub.phi_max}; "
                          "allowed: phi-min <= 0 <= phi-max")
    if not ub.bound_weight >= 0:
        raise ConfigError(f"config key 'ub-smoe.bound-weight' is {ub.bound_weight}; allowed: >= 0")


# The share of the full model's compute a client affords (the paper's beta): it runs
# K = max(1, floor(moe.eval-top-k * compute-share)) experts per token.
register_tier_field(TierField("compute-share", float, maximum=1.0, owner="ub_smoe"))
register_method_section(MethodSection("ub_smoe", "ub-smoe", UBSMoEConfig, check_config, "conf/ub_smoe.yaml"))
