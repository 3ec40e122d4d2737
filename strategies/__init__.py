"""Strategy registry: the `strategy` config key names one of these (and its client half in
fedmoe_app.methods, under the same name)."""

from typing import Callable

from fedmoe_app.config import ConfigError, RunConfig
from strategies.base import SparseStrategy
from strategies.fedavg_lora import FedAvgLoRA
from strategies.fft_moe import FFTMoE
from strategies.head_only import HeadOnly

STRATEGIES: dict[str, type[SparseStrategy]] = {cls.name: cls for cls in (FFTMoE, FedAvgLoRA, HeadOnly)}


def make_strategy(config: RunConfig, num_layers: int, on_round: Callable[[dict], None] | None = None) -> SparseStrategy:
    """The strategy named by `config.strategy`; `on_round` gets every round's record."""
    if config.strategy not in STRATEGIES:
        raise ConfigError(
            f"config key 'strategy' is {config.strategy!r}; allowed: {', '.join(sorted(STRATEGIES))}"
        )
    return STRATEGIES[config.strategy](config, num_layers, on_round=on_round)
