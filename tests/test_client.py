"""A client's round without Flower: budget, sparse replies, routing statistics, and the
client halves of methods (what the training loop asks of them, the models they build)."""


import numpy as np
import pytest
import torch

from fedmoe_app.budgets import DeviceBudget, load_tiers
from fedmoe_app.client import ClientTask
from fedmoe_app.config import load_config
from fedmoe_app.methods.base import ClientMethod
from fedmoe_app.methods.fedavg_lora import FedAvgLoRAClient
from fedmoe_app.methods.fft_moe import FFTMoEClient
from fedmoe_app.methods.lora import LoRAClient
from fedmoe_app.model import build_model, state_to_numpy
from fedmoe_app.rows import label_counts
from fedmoe_app.names import lora_rank_of
from fedmoe_app.names import held_experts, select_keys
from fedmoe_app.routing import RoutingStats, expert_shares, utilisation
from fedmoe_app.train import train_local
from fedmoe_app.tasks.classification import classifier_loss


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
    arrays, metrics, request, _ = task.train(sent, {"server-round": 1, "global-usage": [1 / 8] * 16})
    assert set(arrays) == set(sent)  # only what it holds comes back
    assert held_experts(list(arrays), 2) == subset
    routed = np.asarray(metrics["routed-tokens"]).reshape(2, 8)
    assert routed[0, [0, 2, 4, 6]].sum() == 0 and routed[1, [1, 3, 5, 7]].sum() == 0
    assert metrics["steps"] == task.budget.local_steps
    assert metrics["num-examples"] == len(task.data.train_index)  # training rows, Flower's convention
    assert metrics["samples-processed"] == task.budget.local_steps * task.budget.batch_size
    # every real token goes to exactly k = 1 expert, in every layer
    assert routed[0].sum() == routed[1].sum() > 0
    next_experts = request["next-experts"]
    assert len(next_experts) == 2 * 4 and all(0 <= e < 8 for e in next_experts)
    assert any(not np.array_equal(arrays[k], sent[k]) for k in sent)


def test_device_tier_and_field_overrides_from_node_config(config):
    task = ClientTask(config, {"partition-id": 0, "num-partitions": 3, "device-tier": "jetson-orin", "local-steps": 2})
    assert (task.budget.tier, task.budget.experts_held, task.budget.local_steps) == ("jetson-orin", 8, 2)
    answer = task.describe()
    assert DeviceBudget.from_record(answer["budget"]) == task.budget  # the budget travels as one object
    assert answer["node"] == {"client-id": "partition-0", "num-examples": len(task.data.train_index)}


def test_a_budget_record_names_the_bad_field():
    record = load_tiers("conf/devices.yaml")["rpi4"].to_record()
    with pytest.raises(ValueError, match="device tier 'rpi4': field 'top-k' is 'two'"):
        DeviceBudget.from_record({**record, "top-k": "two"})
    with pytest.raises(ValueError, match=r"missing \['lora-rank'\]"):
        DeviceBudget.from_record({k: v for k, v in record.items() if k != "lora-rank"})
    # a field a method registers (methods/<name>_config.py) is a tier field like the rest, named with its owner
    with pytest.raises(ValueError, match=r"missing \['compute-share \(ub_smoe\)'\]"):
        DeviceBudget.from_record({k: v for k, v in record.items() if k != "compute-share"})
    assert DeviceBudget.from_record(record).compute_share == 0.125 and record["experts-trained"] == 1


def test_a_moe_client_asks_for_the_experts_with_the_highest_mean_router_probability(config):
    budget = load_tiers("conf/devices.yaml")["rpi4"].replace(experts_held=2)
    method = FFTMoEClient(config, budget, [5, 5, 5, 5], {})
    method.routing = RoutingStats.empty(2, 4)
    method.routing.full_prob_sum[:] = [[1.0, 4.0, 3.0, 2.0], [9.0, 1.0, 1.0, 5.0]]
    method.routing.tokens = 1
    metrics, request = method.report()
    assert request == {"next-experts": [1, 2, 0, 3]} and metrics == {"routed-tokens": [0] * 8}


def test_expert_shares_and_utilisation_by_hand():
    np.testing.assert_allclose(expert_shares(np.array([[6, 2, 0], [0, 0, 0]])), [[0.75, 0.25, 0], [0, 0, 0]])
    np.testing.assert_allclose(utilisation([np.array([[6, 2, 0]]), np.array([[0, 6, 2]])]), [[6 / 16, 8 / 16, 2 / 16]])
    assert utilisation([]) is None


def test_lora_client_round_trip(ag_news_dir):
    config = load_config("conf/fedavg_lora.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} data.max-train-rows=300")
    task = ClientTask(config, {"partition-id": 2, "num-partitions": 3})
    glob = state_to_numpy(build_model(config, 4, "lora"))
    arrays, metrics, request, _ = task.train(glob, {"server-round": 1})
    assert set(arrays) == set(glob) and request == {} and "routed-tokens" not in metrics
    result = task.evaluate(arrays, {"server-round": 1})
    assert result["num-examples"] == len(task.data.holdout_index) and 0.0 <= result["accuracy"] <= 1.0


def test_the_tiers_lora_rank_reaches_the_lora_model(ag_news_dir):
    config = load_config("conf/fedavg_lora.yaml", "model.backbone=tiny-bert lora.rank=8")
    tiers = load_tiers(config.devices.file)
    for tier in ("rpi4", "jetson-orin"):  # ranks 4 and 16 in devices.yaml
        per_tier = LoRAClient(config, tiers[tier], [], {})  # heterogeneous-rank methods' default
        arrays = state_to_numpy(build_model(config, 4, "lora", lora_rank=tiers[tier].lora_rank))
        model = per_tier.build_model(arrays)
        assert lora_rank_of(state_to_numpy(model)) == tiers[tier].lora_rank
        homogeneous = FedAvgLoRAClient(config, tiers[tier], [], {})  # FedAvg-LoRA: one rank for all
        assert lora_rank_of(state_to_numpy(homogeneous.build_model(state_to_numpy(build_model(config, 4, "lora"))))) == 8
    with pytest.raises(ValueError, match="received LoRA tensors of rank 8; .* trains at rank 4 on tier 'rpi4'"):
        LoRAClient(config, tiers["rpi4"], [], {}).build_model(state_to_numpy(build_model(config, 4, "lora")))


class RecordingMethod(ClientMethod):
    """A client half that records what the loop asks of it, and in which order."""

    adapter = "head"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.grad_seen = [], []

    def loss_terms(self, model):
        self.calls.append("loss_terms")
        return 100.0 * model.head.bias.sum()  # a term whose gradient is known: 100 per bias entry

    def after_backward(self, model):
        self.calls.append("after_backward")
        self.grad_seen.append(model.head.bias.grad.clone())
        model.head.weight.grad.zero_()  # a gradient edit: the weight must not move

    def after_step(self, model):
        self.calls.append("after_step")


def test_the_loop_is_loss_terms_backward_hook_step_observe(ag_news_dir):
    from fedmoe_app.batches import encode, iterate_batches
    from fedmoe_app.data import load_splits
    from fedmoe_app.backbones import load_tokenizer

    config = load_config("conf/head_only.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} "
                         "data.max-train-rows=40 train.precision=fp32")
    budget = load_tiers(config.devices.file)["rpi4"]
    tokenizer = load_tokenizer(config.model.backbone)
    rows = encode(load_splits(config.data, 0).train, tokenizer, 16)
    batches = list(iterate_batches(rows, 4, tokenizer.pad_token_id, shuffle=False, num_batches=2))
    method = RecordingMethod(config, budget, [], {})
    model = method.build_model(state_to_numpy(build_model(config, 4, "head")))
    weight = model.head.weight.detach().clone()
    train_local(model, batches, 2, 1e-2, 0.0, method, classifier_loss())
    assert method.calls == ["loss_terms", "after_backward", "after_step"] * 2
    # the task's bias gradient sums to 0 over classes (softmax); the method's term adds 100 each
    assert all(torch.allclose(g.sum(), torch.tensor(400.0), atol=1e-3) for g in method.grad_seen)
    assert torch.equal(model.head.weight, weight)  # the hook's edit held through the step


def test_client_id_is_stable_and_named_by_node_config(tmp_path, monkeypatch):
    from fedmoe_app.node import CLIENT_ID_FILE, client_id

    assert client_id({"partition-id": 3, "num-partitions": 10}) == "partition-3"
    assert client_id({"client-id": "pi-kitchen", "data-path": str(tmp_path)}) == "pi-kitchen"
    first = client_id({"data-path": str(tmp_path)})  # a device: made once, kept in its data folder
    assert len(first) == 32 and (tmp_path / CLIENT_ID_FILE).read_text().strip() == first
    monkeypatch.chdir(tmp_path.parent)  # a restart, from another working directory, a relative path
    assert client_id({"data-path": tmp_path.name}) == first
    other = tmp_path / "other-device"
    other.mkdir()
    assert client_id({"data-path": str(other)}) != first


@pytest.mark.parametrize("alpha, absent_rows_move", [(0.0, False), (1.0, True)])
def test_restricted_softmax_reaches_local_training(ag_news_dir, alpha, absent_rows_move):
    """FedRS with alpha 0: the head rows of the classes the client lacks get no gradient, so
    local training leaves them as received; without it (alpha 1) they are pushed down."""
    config = load_config("conf/head_only.yaml", f"model.backbone=tiny-bert data.data-dir={ag_news_dir} "
                         "data.max-train-rows=300 data.partitioner=pathological data.classes-per-partition=2 "
                         f"train.restricted-softmax={alpha}")
    task = ClientTask(config, {"partition-id": 0, "num-partitions": 4})
    absent = [c for c, n in enumerate(label_counts(task.data.train, 4)) if n == 0]
    assert len(absent) == 2
    glob = state_to_numpy(build_model(config, 4, "head"))
    arrays, _, _, _ = task.train(glob, {"server-round": 1})
    for key in ("head.weight", "head.bias"):
        moved = not np.array_equal(arrays[key][absent], glob[key][absent])
        assert moved == absent_rows_move, key
        assert not np.array_equal(arrays[key], glob[key])  # the present classes' rows trained
