"""Strategy registry: the `strategy` config key names one of these (and its client half in
fedmoe_app.methods, under the same name)."""

from typing import Callable

from fedmoe_app.checkpoint import Checkpoint
from fedmoe_app.config import RunConfig
from fedmoe_app.methods import method_class
from strategies.base import SparseStrategy
from strategies.fedavg_lora import FedAvgLoRA
from strategies.fft_moe import FFTMoE
from strategies.flexlora import FlexLoRA
from strategies.head_only import HeadOnly
from strategies.hetlora import HetLoRA
from strategies.hfedmoe import HFedMoE
from strategies.ub_smoe import UBSMoE

STRATEGIES: dict[str, type[SparseStrategy]] = {cls.name: cls for cls in (
    FFTMoE, HFedMoE, UBSMoE, FedAvgLoRA, HetLoRA, FlexLoRA, HeadOnly)}


def make_strategy(config: RunConfig, num_layers: int, on_round: Callable[[dict], None] | None = None,
                  on_checkpoint: Callable[[Checkpoint], None] | None = None) -> SparseStrategy:
    """The strategy named by `config.strategy`; `on_round` gets every round's record,
    `on_checkpoint` the run's state after every round."""
    method_class(config.strategy)  # the one check of the name (both halves are registered under it)
    return STRATEGIES[config.strategy](config, num_layers, on_round=on_round, on_checkpoint=on_checkpoint)
