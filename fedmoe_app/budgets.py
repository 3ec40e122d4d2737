"""Device tiers and per-client compute budgets (conf/devices.yaml)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import yaml

from fedmoe_app import messages as msg
from fedmoe_app.config import ConfigError, RunConfig, resolve_path


@dataclass(frozen=True)
class DeviceBudget:
    """What one client may spend per round."""

    tier: str
    experts_held: int  # experts per layer the node holds: receives, routes to and may train
    top_k: int  # adapter experts per token
    active_experts: int  # backbone experts per token (K of moe.num-experts)
    experts_trained: int  # backbone experts trained per batch (HFedMoE's C)
    compute_share: float  # share of the full model's compute the device affords (UB-SMoE's beta)
    batch_size: int
    max_length: int
    local_steps: int
    lora_rank: int
    ram_gb: float

    def to_record(self) -> dict[str, Any]:
        """The budget as a message carries it: kebab-case keys, `tier` included."""
        return {"tier": self.tier, **{_key(f): getattr(self, f) for f in BUDGET_FIELDS}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "DeviceBudget":
        """The budget of a `to_record` mapping; ConfigError naming the field if one is
        missing, unknown or of the wrong type."""
        tier = record.get("tier")
        if not isinstance(tier, str) or not tier:
            raise ConfigError(f"budget field 'tier' is {tier!r}; allowed: a tier name")
        return cls(tier=tier, **_checked_fields(f"device tier '{tier}'", {k: v for k, v in record.items() if k != "tier"}))


BUDGET_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceBudget) if f.name != "tier")
FLOAT_FIELDS = ("compute_share", "ram_gb")


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _checked_fields(where: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The budget fields of a kebab-case mapping, each of its field's type and >= 1 (ram-gb > 0,
    compute-share in (0, 1])."""
    given = {k.replace("-", "_"): v for k, v in values.items()}
    missing = [_key(f) for f in BUDGET_FIELDS if f not in given]
    unknown = [_key(f) for f in given if f not in BUDGET_FIELDS]
    if missing or unknown:
        raise ConfigError(f"{where}: missing {missing}, unknown {unknown}; fields: {', '.join(map(_key, BUDGET_FIELDS))}")
    checked = {}
    for name in BUDGET_FIELDS:
        value, kind = given[name], float if name in FLOAT_FIELDS else int
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (kind is int and value != int(value))):
            raise ConfigError(f"{where}: field '{_key(name)}' is {value!r}; allowed: {'a number' if kind is float else 'an integer'}")
        if value <= 0:
            raise ConfigError(f"{where}: field '{_key(name)}' is {value!r}; allowed: > 0")
        if name == "compute_share" and value > 1:
            raise ConfigError(f"{where}: field '{_key(name)}' is {value!r}; allowed: (0, 1]")
        checked[name] = kind(value)
    return checked


@lru_cache(maxsize=8)
def load_tiers(path: str) -> dict[str, DeviceBudget]:
    """Read the tiers of a devices file into DeviceBudgets."""
    data = yaml.safe_load(resolve_path(path).read_text()) or {}
    tiers = {}
    for name, values in (data.get("tiers") or {}).items():
        tiers[name] = DeviceBudget(tier=name, **_checked_fields(f"device tier '{name}' in {path}", values or {}))
    if not tiers:
        raise ConfigError(f"devices file {path} defines no tiers")
    return tiers


def tiers_for_population(num_partitions: int, mix: Mapping[str, float]) -> list[str]:
    """Tier of each partition id: counts by largest remainder of the mix, in mix order."""
    total = sum(mix.values())
    if total <= 0:
        raise ConfigError("config key 'devices.simulation-mix' must have positive shares")
    exact = {tier: num_partitions * share / total for tier, share in mix.items()}
    counts = {tier: int(value) for tier, value in exact.items()}
    by_remainder = sorted(mix, key=lambda t: (-(exact[t] - counts[t]), list(mix).index(t)))
    for tier in by_remainder[: num_partitions - sum(counts.values())]:
        counts[tier] += 1
    return [tier for tier in mix for _ in range(counts[tier])]


def check_mix(config: RunConfig) -> None:
    """Fail early if the simulation mix names a tier the devices file lacks."""
    tiers = load_tiers(config.devices.file)
    for tier in config.devices.simulation_mix:
        if tier not in tiers:
            raise ConfigError(
                f"config key 'devices.simulation-mix' names unknown tier '{tier}'; "
                f"allowed: {', '.join(tiers)}"
            )


def max_lora_rank(config: RunConfig) -> int:
    """The largest lora-rank of the device tiers: the global rank of backbone experts' LoRAs
    (each node trains their first `lora-rank` ranks)."""
    return max(budget.lora_rank for budget in load_tiers(config.devices.file).values())


def _number(value: Any) -> Any:
    """A node_config value as a number when it is one written as text ('4', '0.5'); else as it is."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def resolve_budget(node_config: Mapping[str, Any], config: RunConfig) -> DeviceBudget:
    """The budget of this node: `device-tier` from node_config (deployment) or from
    `partition-id` by the simulation mix, then per-field node_config overrides
    (`top-k=1`, `batch-size=4`, ...); experts held are capped at moe.num-experts, experts
    per token and experts trained at the experts held."""
    tiers = load_tiers(config.devices.file)
    tier = node_config.get(msg.DEVICE_TIER)
    if tier is None:
        if msg.PARTITION_ID not in node_config or msg.NUM_PARTITIONS not in node_config:
            raise ConfigError(
                f"node_config needs '{msg.DEVICE_TIER}', or '{msg.PARTITION_ID}' and '{msg.NUM_PARTITIONS}'"
            )
        population = tiers_for_population(int(node_config[msg.NUM_PARTITIONS]), config.devices.simulation_mix)
        tier = population[int(node_config[msg.PARTITION_ID])]
    if tier not in tiers:
        raise ConfigError(f"node_config '{msg.DEVICE_TIER}' is '{tier}'; allowed: {', '.join(tiers)}")
    overrides = {_key(f): _number(node_config[_key(f)]) for f in BUDGET_FIELDS if _key(f) in node_config}
    budget = DeviceBudget(tier=tier, **_checked_fields(f"node_config of tier '{tier}'", {
        **{_key(f): getattr(tiers[tier], f) for f in BUDGET_FIELDS}, **overrides}))
    held = min(budget.experts_held, config.moe.num_experts)
    return dataclasses.replace(budget, experts_held=held, top_k=min(budget.top_k, held),
                               active_experts=min(budget.active_experts, held),
                               experts_trained=min(budget.experts_trained, held))
