"""Shared fixtures: the AG News copy beside the repository, tiny model configs."""

from pathlib import Path

import pytest

from bench.in_process import InProcessGrid  # noqa: F401  (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
AG_NEWS_DIR = REPO.parent / "shared" / "data" / "ag_news"
COMMONSENSE_DIR = REPO.parent / "shared" / "data" / "commonsense"


@pytest.fixture(scope="session")
def ag_news_dir() -> Path:
    """The local AG News copy (train.csv, test.csv); tests that need it skip without it."""
    if not (AG_NEWS_DIR / "train.csv").is_file():
        pytest.skip(f"AG News not found at {AG_NEWS_DIR}")
    return AG_NEWS_DIR


@pytest.fixture(scope="session")
def commonsense_dir() -> Path:
    """The local commonsense instruction data (train.jsonl, test/); tests that need it skip without it."""
    if not (COMMONSENSE_DIR / "train.jsonl").is_file():
        pytest.skip(f"commonsense data not found at {COMMONSENSE_DIR}")
    return COMMONSENSE_DIR


@pytest.fixture
def server_identity():
    """The task identity a ServerApp process has (Flower needs it to build messages)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def local_training_setup(conf: str, overrides: str, num_batches: int):
    """(client task, its method, a fresh global model, that model's state, `num_batches`
    batches of 8 unshuffled rows) of partition 0 of 3, fp32, seed 0: the pieces a test of
    `train_local` needs."""
    import torch

    from fedmoe_app.client import ClientTask
    from fedmoe_app.config import load_config
    from fedmoe_app.model import state_to_numpy

    config = load_config(conf, f"data.max-train-rows=200 train.precision=fp32 {overrides}")
    torch.manual_seed(0)
    client = ClientTask(config, {"partition-id": 0, "num-partitions": 3})
    method = client.method({})
    model = method.global_model(config, 4)
    batches = list(client.task.batches(client.train_set, 8, client.tokenizer.pad_token_id, shuffle=False,
                                       num_batches=num_batches))
    return client, method, model, state_to_numpy(model), batches
