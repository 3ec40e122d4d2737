"""Client faults injected on purpose (config `faults`), to test that a run survives them:
in each round a seeded draw picks `faults.share` of the simulated clients (at least one
when the share is above 0), and each picked client, by a seeded draw of `faults.kinds`:
- `raise`: fails with an error, as a crashing client does;
- `hang`: answers nothing until past federation.round-timeout, then fails;
- `garbage`: replies with NaN updates, as a broken or hostile client might.
The server counts each as that node's failure with its reason. Only simulated clients
(node_config `partition-id` / `num-partitions`) are picked.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any, Mapping

import numpy as np

from fedmoe_app import messages as msg
from fedmoe_app.config import RunConfig

HANG_MARGIN_SECONDS = 2.0


class InjectedFault(RuntimeError):
    """A fault injected on purpose (config `faults`)."""


def fault_of(config: RunConfig, node_config: Mapping[str, Any], server_round: int) -> str | None:
    """The fault this client injects in `server_round` (None for none); the same on every
    process, so a test can count what a run had to survive."""
    if config.faults.share <= 0 or msg.NUM_PARTITIONS not in node_config:
        return None
    partition, partitions = int(node_config.get(msg.PARTITION_ID, 0)), int(node_config[msg.NUM_PARTITIONS])
    picked = random.Random(f"faults-{config.seed}-{server_round}").sample(
        range(partitions), max(1, math.ceil(config.faults.share * partitions)))
    if partition not in picked:
        return None
    return random.Random(f"faults-{config.seed}-{server_round}-{partition}").choice(list(config.faults.kinds))


def before_training(fault: str | None, config: RunConfig) -> None:
    """Raise, or hang past the round timeout and then raise, as `fault` says."""
    if fault == "raise":
        raise InjectedFault("injected fault: raise (config faults)")
    if fault == "hang":
        time.sleep(config.federation.round_timeout + HANG_MARGIN_SECONDS)
        raise InjectedFault("injected fault: hang past federation.round-timeout (config faults)")


def garbled(updates: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`updates` with every value NaN (the `garbage` fault)."""
    return {name: np.full_like(u, np.nan) for name, u in updates.items()}
