"""What a node tells the server when asked (a query message): who it is, its budget, and
how many rows it trains on.

On a device the answer needs neither torch nor a tokenizer: the budget comes from the
devices file and node_config, the data size from counting the rows of its train.csv.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Mapping

from fedmoe_app import messages as msg
from fedmoe_app.budgets import DeviceBudget, resolve_budget
from fedmoe_app.config import RunConfig
from fedmoe_app.rows import device_train_rows, holdout_size

CLIENT_ID_FILE = ".fedmoe-client-id"


def partition_of(node_config: Mapping[str, Any]) -> tuple[int, int]:
    """(partition id, number of partitions) of a simulated node (0, 1 when not given)."""
    return int(node_config.get(msg.PARTITION_ID, 0)), int(node_config.get(msg.NUM_PARTITIONS, 1))


def client_id(node_config: Mapping[str, Any]) -> str:
    """This node's stable name, the same after the node restarts (Flower's node id is not):
    node_config `client-id` if set; on a device the id kept in its data folder (a random
    one, made at the first query, in `.fedmoe-client-id`); in simulation `partition-<id>`."""
    if node_config.get(msg.NODE_CLIENT_ID):
        return str(node_config[msg.NODE_CLIENT_ID])
    data_path = str(node_config.get(msg.DATA_PATH, ""))
    if data_path:
        return _kept_id(Path(data_path))
    return f"partition-{partition_of(node_config)[0]}"


def _kept_id(folder: Path) -> str:
    """The id in `folder`/.fedmoe-client-id, made (randomly) the first time it is asked for."""
    path = folder / CLIENT_ID_FILE
    if not path.is_file():
        temporary = folder / f".{CLIENT_ID_FILE}.{os.getpid()}.tmp"
        temporary.write_text(uuid.uuid4().hex + "\n")
        try:
            os.link(temporary, path)  # the first of racing processes wins; the others read its id
        except FileExistsError:
            pass
        finally:
            temporary.unlink()
    return path.read_text().strip()


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
    data_path = str(node_config.get(msg.DATA_PATH, ""))
    if data_path:  # a device's query process imports no torch: its rows are counted, not read
        return describe(node_config, budget, device_train_rows(data_path, config.data.holdout_fraction))
    from fedmoe_app.data import partition_of_split  # simulation: partitioning needs `datasets`
    from fedmoe_app.tasks import task_of

    task = task_of(config)
    num_rows = len(partition_of_split(task.splits().train, config.data, config.seed, *partition_of(node_config),
                                      task.partition_column()))
    return describe(node_config, budget, num_rows - holdout_size(num_rows, config.data.holdout_fraction))
