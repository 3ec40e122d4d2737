"""What a node tells the server when asked (a query message): its tier, budget and data size.

On a device the answer needs neither torch nor a tokenizer: the budget comes from the
devices file and node_config, the data size from counting the rows of its train.csv.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedmoe_app.budgets import DeviceBudget, resolve_budget
from fedmoe_app.config import RunConfig
from fedmoe_app.rows import device_train_rows, holdout_size


def describe(budget: DeviceBudget, num_examples: int) -> dict[str, Any]:
    """What the server needs to tailor messages to a node that trains on `num_examples` rows."""
    return {
        "device-tier": budget.tier,
        "experts-held": budget.experts_held,
        "top-k": budget.top_k,
        "lora-rank": budget.lora_rank,
        "num-examples": num_examples,
    }


def query_answer(config: RunConfig, node_config: Mapping[str, Any]) -> dict[str, Any]:
    """`describe` of this node: a device (`data-path`) counts its train.csv; a simulated
    node (`partition-id`, `num-partitions`) sizes its partition."""
    budget = resolve_budget(node_config, config)
    data_path = str(node_config.get("data-path", ""))
    if data_path:
        return describe(budget, device_train_rows(data_path, config.data.holdout_fraction))
    from fedmoe_app.data import load_partition  # simulation: partitioning needs `datasets`

    num_rows = len(load_partition(config.data, config.seed, int(node_config.get("partition-id", 0)),
                                  int(node_config.get("num-partitions", 1))))
    return describe(budget, num_rows - holdout_size(num_rows, config.data.holdout_fraction))
