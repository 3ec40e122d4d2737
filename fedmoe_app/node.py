"""What a node tells the server when asked (a query message): who it is, its budget, and
how many rows it trains on.

On a device the answer needs neither torch nor a tokenizer: the budget comes from the
devices file and node_config, the data size from counting the rows of its train.csv.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping

from fedmoe_app import messages as msg
from fedmoe_app.budgets import DeviceBudget, resolve_budget
from fedmoe_app.config import RunConfig
from fedmoe_app.rows import device_train_rows, holdout_size


def client_id(node_config: Mapping[str, Any]) -> str:
    """This node's stable name, the same after the node restarts (Flower's node id is not):
    node_config `client-id` if set; on a device `<hostname>:<data-path>`; in simulation
    `partition-<partition-id>`."""
    if node_config.get("client-id"):
        return str(node_config["client-id"])
    data_path = str(node_config.get("data-path", ""))
    if data_path:
        return f"{socket.gethostname()}:{os.path.abspath(data_path)}"
    return f"partition-{int(node_config.get('partition-id', 0))}"


def describe(node_config: Mapping[str, Any], budget: DeviceBudget, num_examples: int) -> dict[str, dict[str, Any]]:
    """The records of a query reply for a node that trains on `num_examples` rows."""
    return {
        msg.NODE: {msg.CLIENT_ID: client_id(node_config), msg.NUM_EXAMPLES: num_examples},
        msg.BUDGET: budget.to_record(),
    }


def query_answer(config: RunConfig, node_config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`describe` of this node: a device (`data-path`) counts its train.csv; a simulated
    node (`partition-id`, `num-partitions`) sizes its partition."""
    budget = resolve_budget(node_config, config)
    data_path = str(node_config.get("data-path", ""))
    if data_path:
        return describe(node_config, budget, device_train_rows(data_path, config.data.holdout_fraction))
    from fedmoe_app.data import load_partition  # simulation: partitioning needs `datasets`

    num_rows = len(load_partition(config.data, config.seed, int(node_config.get("partition-id", 0)),
                                  int(node_config.get("num-partitions", 1))))
    return describe(node_config, budget, num_rows - holdout_size(num_rows, config.data.holdout_fraction))
