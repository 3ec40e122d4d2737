"""The heterogeneous-rank LoRA baselines: HetLoRA (zero-padding, ||B A||_F-weighted
aggregation, truncation, rank self-pruning) on hand-made replies and a tiny model, and
FlexLoRA (averaged products, truncated SVD) against numpy's SVD."""

import dataclasses

import numpy as np
import pytest
import torch

from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import load_config
from fedmoe_app.methods import method_class
from fedmoe_app.methods.hetlora import HetLoRAClient, lora_factors, pruning_penalty, tail_start
from fedmoe_app.model import state_to_numpy
from fedmoe_app.records import from_record
from strategies import make_strategy
from strategies.flexlora import svd_factors
from strategies.replies import Node
from tests.test_aggregation import reply

A, B = "m.lora_A.default.weight", "m.lora_B.default.weight"  # one LoRA module: A [r, 3], B [2, r]
HEAD = "head.weight"


def lora_node(node_id, rank, rows=5000):
    budget = load_tiers("conf/devices.yaml")["jetson-orin"].replace(lora_rank=rank)
    return Node(node_id, f"client-{node_id}", budget, rows)


def strategy_with(name, nodes, global_arrays, overrides=""):
    strategy = make_strategy(load_config(f"conf/{name}.yaml", overrides), num_layers=1)
    strategy.nodes = {n.node_id: n for n in nodes}
    strategy.global_arrays = global_arrays
    strategy.round.sent_arrays = {n.node_id: strategy.arrays_for(n, 1) for n in nodes}
    return strategy


def updates(trained, sent):
    """What a node sends for `trained` values: trained minus what it was sent."""
    return {k: (a - sent[k]).astype(np.float32) for k, a in trained.items()}


RNG = np.random.default_rng(0)
GLOBAL = {A: RNG.normal(size=(16, 3)).astype(np.float32), B: RNG.normal(size=(2, 16)).astype(np.float32),
          HEAD: np.zeros(2, np.float32)}


def test_hetlora_truncates_pads_and_weights_by_the_frobenius_norm_of_b_a():
    nodes = [lora_node(1, 4), lora_node(2, 16)]
    strategy = strategy_with("hetlora", nodes, dict(GLOBAL))
    sent1 = strategy.round.sent_arrays[1]
    np.testing.assert_array_equal(sent1[A], GLOBAL[A][:4])
    np.testing.assert_array_equal(sent1[B], GLOBAL[B][:, :4])
    a1, b1 = RNG.normal(size=(4, 3)).astype(np.float32), RNG.normal(size=(2, 4)).astype(np.float32)
    a2, b2 = RNG.normal(size=(16, 3)).astype(np.float32), RNG.normal(size=(2, 16)).astype(np.float32)
    t1 = {A: a1, B: b1, HEAD: np.full(2, 1, np.float32)}
    t2 = {A: a2, B: b2, HEAD: np.full(2, 4, np.float32)}
    r1 = reply(1, updates(t1, sent1), {"num-examples": 30}, {"lora-rank": 4})
    r2 = reply(2, updates(t2, strategy.round.sent_arrays[2]), {"num-examples": 10}, {"lora-rank": 16})
    new = from_record(strategy.aggregate_train(1, [r1, r2])[0])
    w1, w2 = np.linalg.norm(b1.astype(np.float64) @ a1), np.linalg.norm(b2.astype(np.float64) @ a2)
    padded_a1 = np.vstack([a1, np.zeros((12, 3))])  # zero-padded to rank 16: the zeros count
    padded_b1 = np.hstack([b1, np.zeros((2, 12))])
    np.testing.assert_allclose(new[A], (w1 * padded_a1 + w2 * a2) / (w1 + w2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[B], (w1 * padded_b1 + w2 * b2) / (w1 + w2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new[HEAD], (30 * 1 + 10 * 4) / 40)


def test_hetlora_uses_the_pruned_rank_next_round_and_rejects_a_rank_it_did_not_train():
    nodes = [lora_node(1, 8), lora_node(2, 16)]
    strategy = strategy_with("hetlora", nodes, dict(GLOBAL))
    same = {A: np.zeros((8, 3), np.float32), B: np.zeros((2, 8), np.float32), HEAD: np.zeros(2, np.float32)}
    r1 = reply(1, same, {"num-examples": 30}, {"lora-rank": 7})
    r2 = reply(2, {A: np.zeros((16, 3), np.float32), B: np.zeros((2, 16), np.float32)}, {"num-examples": 10},
               {"lora-rank": 17})  # above its rank
    strategy.aggregate_train(1, [r1, r2])
    assert [f["node_id"] for f in strategy.round.failures] == ["2"]
    assert "lora-rank" in strategy.round.failures[0]["reason"]
    sent = strategy.arrays_for(nodes[0], 2)
    assert sent[A].shape == (7, 3) and sent[B].shape == (2, 7)
    assert strategy.round_metrics([]) == {"lora_ranks": {}}
    restored = make_strategy(strategy.config, num_layers=1)
    restored.load_state_dict(strategy.state_dict())
    assert restored.rank_for(nodes[0]) == 7 and restored.rank_for(nodes[1]) == 16


@pytest.mark.parametrize("name", ["hetlora", "flexlora"])
def test_a_reply_with_one_factor_of_a_lora_module_is_the_nodes_failure(name):
    nodes = [lora_node(1, 4), lora_node(2, 4)]
    strategy = strategy_with(name, nodes, dict(GLOBAL))
    whole = {A: np.ones((4, 3), np.float32), B: np.ones((2, 4), np.float32)}
    r1 = reply(1, whole, {"num-examples": 30}, {"lora-rank": 4} if name == "hetlora" else None)
    r2 = reply(2, {A: np.ones((4, 3), np.float32)}, {"num-examples": 10}, {"lora-rank": 4} if name == "hetlora" else None)
    arrays, _ = strategy.aggregate_train(1, [r1, r2])  # must not raise
    assert [f["node_id"] for f in strategy.round.failures] == ["2"]
    assert "without the other factor" in strategy.round.failures[0]["reason"]
    assert arrays is not None


@pytest.fixture(scope="module")
def tiny_config():
    return load_config("conf/hetlora.yaml", "model.backbone=tiny-bert train.precision=fp32 hetlora.decay=0.5")


def hetlora_client(config, rank, tier="jetson-orin"):
    budget = load_tiers("conf/devices.yaml")[tier]
    model = method_class("hetlora").global_model(config, 4)
    sent = {k: a[:rank] if ".lora_A." in k else a[:, :rank] if ".lora_B." in k else a
            for k, a in state_to_numpy(model).items()}
    for k in sent:  # a trained-looking LoRA (B = 0 would give A no gradient)
        if ".lora_B." in k:
            sent[k] = np.random.default_rng(1).normal(scale=0.1, size=sent[k].shape).astype(np.float32)
    method = HetLoRAClient(config, budget, [5, 5, 5, 5], {})
    return method, method.build_model(sent)


def test_hetlora_scales_every_rank_alike_and_its_regulariser_carries_gradients_to_the_tail_only(tiny_config):
    method, model = hetlora_client(tiny_config, rank=8)
    assert method.rank() == 8
    lora_layer = model.backbone.encoder.layer[0].attention.self.query
    scale = tiny_config.lora.alpha / tiny_config.lora.rank  # fedavg_lora's scale, at every rank
    assert lora_layer.scaling["default"] == pytest.approx(scale)
    server = method_class("hetlora").global_model(tiny_config, 4).backbone.encoder.layer[0].attention.self.query
    assert server.lora_A["default"].weight.shape[0] == 16 and server.scaling["default"] == pytest.approx(scale)
    start = tail_start(8, 0.5)
    assert start == 4
    loss = method.loss_terms(model)
    factors = lora_factors(model)
    by_hand = sum(torch.linalg.norm(b[:, 4:]) * torch.linalg.norm(a[4:]) for a, b in factors)
    assert loss.item() == pytest.approx(tiny_config.hetlora.prune_weight * by_hand.item(), rel=1e-6)
    loss.backward()
    assert len(factors) == 2 * 2  # query and value of 2 layers
    for a, b in factors:
        assert a.grad[start:].abs().sum() > 0 and b.grad[:, start:].abs().sum() > 0
        assert a.grad[:start].abs().sum() == 0 and b.grad[:, :start].abs().sum() == 0


def test_hetlora_prunes_when_the_regulariser_shrank_the_tail_and_keeps_its_rank_otherwise(tiny_config):
    method, model = hetlora_client(tiny_config, rank=8)
    assert method.next_rank() == 8  # nothing trained: the tail is as received
    optimiser = torch.optim.SGD([p for pair in method.factors for p in pair], lr=1.0)
    for _ in range(5):  # the regulariser alone, scaled up: the tails shrink
        optimiser.zero_grad()
        (100 * method.loss_terms(model)).backward()
        optimiser.step()
    with torch.no_grad():
        assert float(pruning_penalty(method.factors, 4)) < method.tail_received
    assert method.report() == ({}, {"lora-rank": 4})  # floor(0.5 * 8)
    method, model = hetlora_client(tiny_config, rank=8)
    with torch.no_grad():
        for a, b in method.factors:
            b[:, 4:] *= 2  # the task grew the tail
    assert method.next_rank() == 8
    config = dataclasses.replace(tiny_config, method=dataclasses.replace(tiny_config.hetlora, min_rank=6))
    method, model = hetlora_client(config, rank=8)
    with torch.no_grad():
        for a, b in method.factors:
            b[:, 4:] = 0
    assert method.next_rank() == 6  # never below min-rank
    method, _ = hetlora_client(config, rank=6)
    assert method.loss_terms(_) == 0.0 and method.next_rank() == 6


def test_hetlora_client_refuses_a_rank_above_its_tier(tiny_config):
    budget = load_tiers("conf/devices.yaml")["rpi4"]  # lora-rank 4
    method = HetLoRAClient(tiny_config, budget, [5, 5], {})
    arrays = state_to_numpy(method_class("hetlora").global_model(tiny_config, 4))  # rank 16
    with pytest.raises(ValueError, match="rank 16.*at most"):
        method.build_model(arrays)


def test_flexlora_truncation_is_numpys_best_rank_r_approximation_with_orthonormal_a():
    product = RNG.normal(size=(6, 5))
    u, s, vt = np.linalg.svd(product)
    for rank in (1, 2, 3):
        a, b = svd_factors(product, rank, alpha=16.0)
        best = u[:, :rank] @ np.diag(s[:rank]) @ vt[:rank]
        np.testing.assert_allclose((16.0 / rank) * b.astype(np.float64) @ a, best, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm((16.0 / rank) * b.astype(np.float64) @ a - product),
                                   np.sqrt((s[rank:] ** 2).sum()), rtol=1e-4)  # Eckart-Young error
        np.testing.assert_allclose(a.astype(np.float64) @ a.T, np.eye(rank), atol=1e-6)
    a, b = svd_factors(np.zeros((6, 5)), 3, 16.0)  # nothing to approximate: B = 0, A still nonzero
    assert not b.any() and np.linalg.matrix_rank(a) == 3


def test_flexlora_reconstructs_exactly_when_every_rank_is_full_and_sends_each_node_its_best_approximation():
    # r_max = 16 (devices.yaml); a module of [2, 3] has full rank 2, so rank-2 nodes hold it whole
    nodes = [lora_node(1, 2), lora_node(2, 2)]
    strategy = strategy_with("flexlora", nodes, dict(GLOBAL))
    alpha = strategy.config.lora.alpha
    t1 = {A: RNG.normal(size=(2, 3)).astype(np.float32), B: RNG.normal(size=(2, 2)).astype(np.float32), HEAD: np.ones(2, np.float32)}
    t2 = {A: RNG.normal(size=(2, 3)).astype(np.float32), B: RNG.normal(size=(2, 2)).astype(np.float32), HEAD: np.ones(2, np.float32)}
    r1 = reply(1, updates(t1, strategy.round.sent_arrays[1]), {"num-examples": 30})
    r2 = reply(2, updates(t2, strategy.round.sent_arrays[2]), {"num-examples": 10})
    new = from_record(strategy.aggregate_train(1, [r1, r2])[0])
    average = 0.75 * (alpha / 2) * t1[B].astype(np.float64) @ t1[A] + 0.25 * (alpha / 2) * t2[B].astype(np.float64) @ t2[A]
    np.testing.assert_allclose((alpha / 16) * new[B].astype(np.float64) @ new[A], average, rtol=1e-4, atol=1e-5)
    strategy.global_arrays = new
    for node in nodes:  # a node's own scale alpha / 2: its LoRA is the averaged product, exactly
        sent = strategy.arrays_for(node, 2)
        assert sent[A].shape == (2, 3) and sent[B].shape == (2, 2)
        np.testing.assert_allclose((alpha / 2) * sent[B].astype(np.float64) @ sent[A], average, rtol=1e-4, atol=1e-5)
    low = lora_node(3, 1)  # a rank-1 node gets numpy's best rank-1 approximation
    u, s, vt = np.linalg.svd(average)
    sent = strategy.arrays_for(low, 2)
    np.testing.assert_allclose(alpha * sent[B].astype(np.float64) @ sent[A], s[0] * np.outer(u[:, 0], vt[0]),
                               rtol=1e-4, atol=1e-5)


def test_flexlora_and_hetlora_global_models_hold_the_largest_tier_rank():
    config = load_config("conf/flexlora.yaml", "model.backbone=tiny-bert")
    arrays = state_to_numpy(method_class("flexlora").global_model(config, 4))
    assert {a.shape[0] for k, a in arrays.items() if ".lora_A." in k} == {16}
    fedavg = state_to_numpy(method_class("fedavg_lora").global_model(load_config("conf/fedavg_lora.yaml", "model.backbone=tiny-bert"), 4))
    assert {a.shape[0] for k, a in fedavg.items() if ".lora_A." in k} == {8}  # lora.rank


def test_flexlora_server_optimiser_steps_the_averaged_products():
    """With federation.server-optimizer=avgm, x <- x - eta (mu v + g) acts on the module's
    product dW (g = dW - its average this round), not on its SVD factors."""
    nodes = [lora_node(1, 2), lora_node(2, 2)]
    strategy = strategy_with("flexlora", nodes, dict(GLOBAL),
                             "federation.server-optimizer=avgm federation.server-lr=0.5 federation.server-momentum=0.9")
    alpha = strategy.config.lora.alpha
    product = (alpha / 16) * GLOBAL[B].astype(np.float64) @ GLOBAL[A]
    momentum = np.zeros_like(product)
    for server_round in (1, 2):
        trained = [{A: RNG.normal(size=(2, 3)).astype(np.float32), B: RNG.normal(size=(2, 2)).astype(np.float32)}
                   for _ in nodes]
        replies = [reply(n.node_id, updates(t, strategy.round.sent_arrays[n.node_id]), {"num-examples": 10})
                   for n, t in zip(nodes, trained)]
        average = sum(0.5 * (alpha / 2) * t[B].astype(np.float64) @ t[A] for t in trained)
        momentum = 0.9 * momentum + (product - average)
        product = product - 0.5 * momentum
        new = from_record(strategy.aggregate_train(server_round, replies)[0])
        np.testing.assert_allclose((alpha / 16) * new[B].astype(np.float64) @ new[A], product, rtol=1e-4, atol=1e-5)
        strategy.global_arrays = new
        strategy.round.sent_arrays = {n.node_id: strategy.arrays_for(n, server_round + 1) for n in nodes}
