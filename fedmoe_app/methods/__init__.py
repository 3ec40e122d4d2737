"""The client halves of the methods, by name (the `strategy` config key names both halves)."""

from __future__ import annotations

from fedmoe_app.config import ConfigError
from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.methods.fedavg_lora import FedAvgLoRAClient
from fedmoe_app.methods.fft_moe import FFTMoEClient
from fedmoe_app.methods.flexlora import FlexLoRAClient
from fedmoe_app.methods.head_only import HeadOnlyClient
from fedmoe_app.methods.hetlora import HetLoRAClient
from fedmoe_app.methods.hfedmoe import HFedMoEClient
from fedmoe_app.methods.ub_smoe import UBSMoEClient

METHODS: dict[str, type[ClientMethod]] = {cls.name: cls for cls in (
    FFTMoEClient, HFedMoEClient, UBSMoEClient, FedAvgLoRAClient, HetLoRAClient, FlexLoRAClient, HeadOnlyClient)}


def method_class(name: str) -> type[ClientMethod]:
    """The client half of method `name`."""
    if name not in METHODS:
        raise ConfigError(f"config key 'strategy' is {name!r}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]
