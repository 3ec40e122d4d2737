"""The tasks, by name (the `task` config key): what a row is, the model's output, the loss
and the metrics (fedmoe_app/tasks/base.py)."""

from __future__ import annotations

from fedmoe_app.config import ConfigError, RunConfig
from fedmoe_app.tasks.base import Metric, Task
from fedmoe_app.tasks.classification import ClassificationTask
from fedmoe_app.tasks.instruction import InstructionTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (ClassificationTask, InstructionTask)}


def task_of(config: RunConfig) -> Task:
    """The task `config.task` names, for this configuration."""
    if config.task not in TASKS:
        raise ConfigError(f"config key 'task' is {config.task!r}; allowed: {', '.join(TASKS)}")
    return TASKS[config.task](config)


__all__ = ["Metric", "Task", "TASKS", "task_of"]
