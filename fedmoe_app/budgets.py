"""Device tiers and per-client compute budgets (conf/devices.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import yaml

from fedmoe_app import messages as msg
from fedmoe_app.config import ConfigError, RunConfig, all_method_sections, resolve_path
from fedmoe_app.numbers import is_number_in


@dataclass(frozen=True)
class TierField:
    """One field of a device tier (conf/devices.yaml): its kebab-case key, its type (int or
    float), an inclusive upper bound if it has one (every field is > 0), whether it is capped
    at the experts the node holds, and who registered it."""

    key: str
    kind: type
    maximum: float | None = None
    capped_by_held: bool = False
    owner: str = "core"

    @property
    def name(self) -> str:
        """The field's attribute name on a DeviceBudget (`experts_held`)."""
        return self.key.replace("-", "_")


TIER_FIELDS: dict[str, TierField] = {}  # attribute name -> field, core first, then the methods' in registration order


def register_tier_field(field: TierField) -> None:
    """Make `field` a field of every device tier (a method's `<name>_config.py` calls this for
    the budget only it reads, such as HFedMoE's experts-trained)."""
    TIER_FIELDS[field.name] = field


for _field in (
        TierField("experts-held", int),  # experts per layer the node holds: receives, routes to and may train
        TierField("top-k", int, capped_by_held=True),  # adapter experts per token
        TierField("active-experts", int, capped_by_held=True),  # backbone experts per token (K of moe.num-experts)
        TierField("batch-size", int),
        TierField("max-length", int),
        TierField("local-steps", int),
        TierField("lora-rank", int),  # LoRA rank of rank-heterogeneous LoRA clients and backbone-expert LoRAs
        TierField("ram-gb", float)):
    register_tier_field(_field)


def _tier_fields() -> dict[str, TierField]:
    """Every registered tier field, the methods' included (their config modules imported)."""
    all_method_sections()
    return TIER_FIELDS


@dataclass(frozen=True)
class DeviceBudget:
    """What one client may spend per round: its tier and a value per tier field, read as
    attributes (`budget.batch_size`, `budget.experts_trained`)."""

    tier: str
    values: Mapping[str, int | float]  # attribute name -> value, for every TierField

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values")
        if values is None or name not in values:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return values[name]

    def replace(self, **changes: int | float) -> "DeviceBudget":
        """A copy with some fields changed (attribute names)."""
        unknown = sorted(set(changes) - set(self.values))
        if unknown:
            raise AttributeError(f"DeviceBudget has no fields {unknown}")
        return DeviceBudget(self.tier, {**self.values, **changes})

    def to_record(self) -> dict[str, Any]:
        """The budget as a message carries it: kebab-case keys, `tier` included."""
        return {"tier": self.tier, **{_key(name): value for name, value in self.values.items()}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "DeviceBudget":
        """The budget of a `to_record` mapping; ConfigError naming the field if one is
        missing, unknown or of the wrong type."""
        tier = record.get("tier")
        if not isinstance(tier, str) or not tier:
            raise ConfigError(f"budget field 'tier' is {tier!r}; allowed: a tier name")
        return cls(tier, _checked_fields(f"device tier '{tier}'", {k: v for k, v in record.items() if k != "tier"}))


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _checked_fields(where: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The tier fields of a kebab-case mapping, each of its field's type, > 0 and within its
    maximum."""
    fields = _tier_fields()
    given = {k.replace("-", "_"): v for k, v in values.items()}
    missing = [f"{f.key} ({f.owner})" if f.owner != "core" else f.key for f in fields.values() if f.name not in given]
    unknown = [_key(f) for f in given if f not in fields]
    if missing or unknown:
        raise ConfigError(f"{where}: missing {missing}, unknown {unknown}; "
                          f"fields: {', '.join(f.key for f in fields.values())}")
    checked = {}
    for name, field in fields.items():
        value = given[name]
        if not is_number_in(value) or (field.kind is int and value != int(value)):
            raise ConfigError(f"{where}: field '{field.key}' is {value!r}; "
                              f"allowed: {'a number' if field.kind is float else 'an integer'}")
        if value <= 0:
            raise ConfigError(f"{where}: field '{field.key}' is {value!r}; allowed: > 0")
        if field.maximum is not None and value > field.maximum:
            raise ConfigError(f"{where}: field '{field.key}' is {value!r}; allowed: (0, {field.maximum:g}]")
        checked[name] = field.kind(value)
    return checked


@lru_cache(maxsize=8)
def load_tiers(path: str) -> dict[str, DeviceBudget]:
    """Read the tiers of a devices file into DeviceBudgets."""
    data = yaml.safe_load(resolve_path(path).read_text()) or {}
    tiers = {}
    for name, values in (data.get("tiers") or {}).items():
        tiers[name] = DeviceBudget(name, _checked_fields(f"device tier '{name}' in {path}", values or {}))
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
    overrides = {f.key: _number(node_config[f.key]) for f in _tier_fields().values() if f.key in node_config}
    values = _checked_fields(f"node_config of tier '{tier}'", {
        **{_key(name): value for name, value in tiers[tier].values.items()}, **overrides})
    held = min(values["experts_held"], config.moe.num_experts)
    capped = {name: min(values[name], held) for name, f in _tier_fields().items() if f.capped_by_held}
    return DeviceBudget(tier, {**values, "experts_held": held, **capped})
