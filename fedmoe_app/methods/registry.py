"""The client halves of the methods, by name (the `strategy` config key names both halves)."""

from __future__ import annotations

from fedmoe_app.config import ConfigError, RunConfig
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


def check_method_for_task(config: RunConfig) -> None:
    """ConfigError if the run's method has no meaning under its task (a method that trains only
    a classifier head, under a task whose model has none)."""
    from fedmoe_app.tasks import task_of

    method, task = method_class(config.strategy), task_of(config)
    if method.adapter == "head" and task.causal_lm:
        allowed = sorted(name for name, cls in METHODS.items() if cls.adapter != "head")
        raise ConfigError(f"config key 'strategy' is {config.strategy!r}, which trains only a classifier head; task "
                          f"'{config.task}' has no head (its LM head stays frozen); allowed: {', '.join(allowed)}")
