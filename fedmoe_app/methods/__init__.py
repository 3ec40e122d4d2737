"""Each method's client half (fedmoe_app/methods/<name>.py) and, where it has one, its own
config section and message keys (fedmoe_app/methods/<name>_config.py, which imports no
torch: a device's query process reads the run's config without it). The registry of client
halves (`METHODS`, `method_class`, `check_method_for_task`: registry.py) loads on first use.
"""

from __future__ import annotations

from typing import Any

REGISTRY_NAMES = ("METHODS", "method_class", "check_method_for_task")


def __getattr__(name: str) -> Any:
    if name in REGISTRY_NAMES:
        from fedmoe_app.methods import registry  # the client halves import torch and the model

        return getattr(registry, name)
    raise AttributeError(f"module 'fedmoe_app.methods' has no attribute {name!r}")
