"""A run's checkpoint: what the server needs to continue a run after it stopped.

After every round the server writes results/<run-name>/checkpoint.safetensors: the global
arrays as tensors, the strategy's own tensors (its server optimiser's moments) as tensors
named STRATEGY_PREFIX + name, and in the file's metadata (JSON text) the round, the
strategy's name and its state (`state_dict`, which holds its random generator). One file,
written to a temporary name, flushed to disk and renamed over the last one, so a crash at
any moment leaves the previous complete round or this one, never a mix. Never pickle.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from fedmoe_app.config import ConfigError

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedmoe-checkpoint-1"
STRATEGY_PREFIX = "@strategy/"  # no model tensor's name starts with '@'


@dataclass
class Checkpoint:
    """The state of a run after round `server_round`."""

    server_round: int
    strategy: str
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, Any]
    strategy_arrays: dict[str, np.ndarray] = field(default_factory=dict)


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` into `run_dir` atomically; returns its path."""
    path = Path(run_dir) / CHECKPOINT_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    metadata = {
        "format": FORMAT,
        "server_round": str(checkpoint.server_round),
        "strategy": checkpoint.strategy,
        "strategy_state": json.dumps(checkpoint.strategy_state, allow_nan=False),
    }
    tensors = {**checkpoint.arrays, **{STRATEGY_PREFIX + k: a for k, a in checkpoint.strategy_arrays.items()}}
    save_file({k: np.ascontiguousarray(a) for k, a in tensors.items()}, str(temporary), metadata=metadata)
    with open(temporary, "rb") as f:
        os.fsync(f.fileno())
    os.replace(temporary, path)
    return path


def checkpoint_round(run_dir: Path) -> int:
    """The round of the checkpoint in `run_dir` (0 if it has none); reads only its header."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="numpy") as f:
        return int((f.metadata() or {}).get("server_round", 0))


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """The checkpoint in `run_dir`; ConfigError if there is none or it is not one of ours."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"run folder '{run_dir}' has no {CHECKPOINT_FILE}: it finished no round, or is not a fedmoe run")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
        arrays = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ConfigError(f"checkpoint '{path}' cannot be read: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ConfigError(f"checkpoint '{path}' has format {metadata.get('format')!r}; allowed: {FORMAT}")
    strategy_arrays = {k[len(STRATEGY_PREFIX):]: a for k, a in arrays.items() if k.startswith(STRATEGY_PREFIX)}
    model_arrays = {k: a for k, a in arrays.items() if not k.startswith(STRATEGY_PREFIX)}
    return Checkpoint(int(metadata["server_round"]), metadata["strategy"], model_arrays,
                      json.loads(metadata["strategy_state"]), strategy_arrays)
