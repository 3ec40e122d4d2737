"""A client's round without Flower: budget, sparse replies, routing statistics."""

import numpy as np
import pytest

from fedmoe_app.client import ClientTask
from fedmoe_app.config import load_config
from fedmoe_app.model import build_model, state_to_numpy
from fedmoe_app.records import held_experts, select_keys
from fedmoe_app.train import RoutingStats


@pytest.fixture(scope="module")
def config(ag_news_dir):
    return load_config(
        "conf/fft_moe.yaml",
        f"model.backbone=tiny-bert data.data-dir={ag_news_dir} data.max-train-rows=300 moe.num-experts=8 moe.expert-hidden=8",
    )


def test_client_trains_only_its_experts_within_budget(config):
    task = ClientTask(config, {"partition-id": 0, "num-partitions": 3})  # 3 nodes: rpi4, nano, orin
    assert task.budget.tier == "rpi4" and task.budget.experts_held == 4 and task.budget.top_k == 1
    glob = state_to_numpy(build_model(config, 4, "moe"))
    subset = [[1, 3, 5, 7], [0, 2, 4, 6]]
    sent = select_keys(glob, subset)
    arrays, metrics, next_experts = task.train(sent, "moe", 1, [1 / 8] * 16)
    assert set(arrays) == set(sent)  # only what it holds comes back
    assert held_experts(list(arrays), 2) == subset
    routed = np.asarray(metrics["routed-tokens"]).reshape(2, 8)
    assert routed[0, [0, 2, 4, 6]].sum() == 0 and routed[1, [1, 3, 5, 7]].sum() == 0
    assert metrics["steps"] == task.budget.local_steps
    assert metrics["num-examples"] == len(task.data.train_index)  # training rows, Flower's convention
    assert metrics["samples-processed"] == task.budget.local_steps * task.budget.batch_size
    # every real token goes to exactly k = 1 expert, in every layer
    assert routed[0].sum() == routed[1].sum() > 0
    assert len(next_experts) == 2 * 4 and all(0 <= e < 8 for e in next_experts)
    assert any(not np.array_equal(arrays[k], sent[k]) for k in sent)


def test_device_tier_and_field_overrides_from_node_config(config):
    task = ClientTask(config, {"partition-id": 0, "num-partitions": 3, "device-tier": "jetson-orin", "local-steps": 2})
    assert (task.budget.tier, task.budget.experts_held, task.budget.local_steps) == ("jetson-orin", 8, 2)
    assert task.describe()["experts-held"] == 8


def test_preferred_experts_rank_by_mean_router_probability():
    stats = RoutingStats.empty(2, 4)
    stats.full_prob_sum[:] = [[1.0, 4.0, 3.0, 2.0], [9.0, 1.0, 1.0, 5.0]]
    stats.tokens = 1
    assert stats.preferred_experts(2) == [[1, 2], [0, 3]]


def test_lora_client_round_trip(ag_news_dir):
    config = load_config("conf/fedavg_lora.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} data.max-train-rows=300")
    task = ClientTask(config, {"partition-id": 2, "num-partitions": 3})
    glob = state_to_numpy(build_model(config, 4, "lora"))
    arrays, metrics, next_experts = task.train(glob, "lora", 1)
    assert set(arrays) == set(glob) and next_experts == [] and "routed-tokens" not in metrics
    result = task.evaluate(arrays, "lora")
    assert result["num-examples"] == len(task.data.holdout) and 0.0 <= result["accuracy"] <= 1.0
