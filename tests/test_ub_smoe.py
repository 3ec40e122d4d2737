"""UB-SMoE: K_c per tier, Dynamic Modulated Routing (the routing, the bound regulariser,
the server's phi update) and the Universal Pseudo-Gradient, against values computed by
hand; the aggregation of hand-made replies."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import ConfigError, load_config
from fedmoe_app.methods.ub_smoe import (UBSMoEClient, active_experts, bound_penalty, candidate_count,
                                        pseudo_gradient)
from fedmoe_app.model import build_model, state_to_numpy
from fedmoe_app.moe import TopKRouter
from fedmoe_app.records import from_record
from fedmoe_app.names import expert_of
from fedmoe_app.train import train_local
from fedmoe_app.tasks.classification import classifier_loss
from strategies import make_strategy
from strategies.ub_smoe import modulation_target, utilisation_and_target
from tests.test_aggregation import aggregate, node, reply


def test_active_experts_per_tier_is_the_floor_of_k_max_times_the_compute_share_and_at_least_one():
    tiers = load_tiers("conf/devices.yaml")
    assert {t: active_experts(b.compute_share, 16) for t, b in tiers.items()} == {
        "rpi4": 2, "jetson-nano": 8, "jetson-orin": 16}  # 16 * 0.125, 16 * 0.5, 16 * 1.0
    assert active_experts(0.05, 16) == 1  # floor(0.8) = 0, raised to 1
    assert active_experts(0.3, 8) == 2  # floor(2.4)
    assert active_experts(0.3, 10) == 3  # floor(3.0000000000000004) and floor(2.9999999999999996) alike
    config = load_config("conf/ub_smoe.yaml", "moe.eval-top-k=8")  # K_max = 8
    client = UBSMoEClient(config, tiers["rpi4"], [1, 1], {})
    assert client.experts_per_token() == 1 and client.rho() == pytest.approx(1 - 1 / 16)
    assert candidate_count(2, 16, 2.0) == 4 and candidate_count(8, 16, 2.5) == 16 and candidate_count(3, 16, 1.5) == 5


def test_modulated_routing_adds_phi_to_the_candidates_logits_only():
    router = TopKRouter(2, 4)
    with torch.no_grad():  # logits of the token x = (1, 0): the first column
        router.weight.copy_(torch.tensor([[3.0, 0], [2.5, 0], [1.0, 0], [0.0, 0]]))
    x, held = torch.tensor([[1.0, 0.0]]), torch.ones(4, dtype=torch.bool)
    assert router(x, held, top_k=1).topk_index.tolist() == [[0]]
    router.modulate(torch.tensor([-1.0, 0.0, 2.0, 5.0]), candidates=2)
    route = router(x, held, top_k=1, renormalize=False)
    # candidates: experts 0 and 1 (largest logits); modulated 3 - 1 = 2, 2.5 + 0; experts 2, 3 keep 1, 0
    expected = torch.softmax(torch.tensor([2.0, 2.5, 1.0, 0.0]), dim=0)
    assert route.topk_index.tolist() == [[1]]
    torch.testing.assert_close(route.probs[0], expected)
    torch.testing.assert_close(route.logits[0], torch.tensor([3.0, 2.5, 1.0, 0.0]))  # raw logits are kept
    route.topk_weight.sum().backward()  # phi is trained: the chosen gate's gradient reaches the candidates' phi
    p = expected
    torch.testing.assert_close(router.modulation.grad, torch.tensor([-p[1] * p[0], p[1] * (1 - p[1]), 0.0, 0.0]))


def test_bound_penalty_by_hand_and_its_gradient_pulls_phi_inside():
    phi = torch.tensor([-2.0, 0.0, 1.5, 0.9], requires_grad=True)
    penalty = bound_penalty(phi, -1.0, 1.0)
    assert penalty.item() == pytest.approx(1.0 ** 2 + 0.5 ** 2)
    penalty.backward()
    torch.testing.assert_close(phi.grad, torch.tensor([-2.0, 0.0, 1.0, 0.0]))  # d/dphi: -2 * 1, 0, 2 * 0.5, 0


def test_phi_update_by_hand():
    # one layer, M = 4; node a (30 rows, K = 1) routed 6 tokens: 4 to expert 0, 2 to expert 1;
    # node b (10 rows, K = 2) routed 5 tokens: slots 5 to expert 0, 3 to expert 2, 2 to expert 3
    routed = [np.array([[4.0, 2, 0, 0]]), np.array([[5.0, 0, 3, 2]])]
    usage, target = utilisation_and_target(routed, [1, 2], [30.0, 10.0])
    p = [0.75, 0.25]
    by_hand = p[0] * np.array([4, 2, 0, 0]) / 6 + p[1] * np.array([5, 0, 3, 2]) / 5
    np.testing.assert_allclose(usage[0], by_hand)
    assert target[0] == pytest.approx((0.75 * 1 + 0.25 * 2) / 4)  # 0.3125
    np.testing.assert_allclose(modulation_target(usage, target)[0], np.tanh(0.3125 / (by_hand + 1e-6) - 1))
    even = [np.array([[2.0, 2, 2, 2]]), np.array([[4.0, 4, 4, 4]])]  # every expert exactly on target
    np.testing.assert_allclose(modulation_target(*utilisation_and_target(even, [1, 2], [30.0, 10.0])), 0.0, atol=1e-5)

    config = load_config("conf/ub_smoe.yaml", "moe.num-experts=4 moe.eval-top-k=4 ub-smoe.momentum=0.6")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: ub_node(1, "rpi4"), 2: ub_node(2, "jetson-nano")}  # K = floor(4 * 0.125) -> 1, 4 * 0.5 = 2
    strategy.phi = np.full((1, 4), 0.5)
    strategy.global_arrays = {"head.weight": np.zeros(2, np.float32)}
    replies = [reply(1, {"head.weight": np.ones(2, np.float32)}, {"num-examples": 30, "routed-tokens": [4, 2, 0, 0]}),
               reply(2, {"head.weight": np.ones(2, np.float32)}, {"num-examples": 10, "routed-tokens": [5, 0, 3, 2]})]
    aggregate(strategy, replies)
    np.testing.assert_allclose(strategy.phi[0], 0.6 * 0.5 + 0.4 * np.tanh(0.3125 / (by_hand + 1e-6) - 1))
    assert strategy.config_for(strategy.nodes[1], 2)["modulation"] == pytest.approx(strategy.phi[0].tolist())
    assert strategy.phi[0, 3] > 0.5 > strategy.phi[0, 0]  # the neglected expert is pushed up, the over-used one down
    by_tier = strategy.round_metrics(strategy.round.replies)["expert_utilisation_by_tier"]
    np.testing.assert_allclose(by_tier["rpi4"], [[4 / 6, 2 / 6, 0, 0]])
    np.testing.assert_allclose(by_tier["jetson-nano"], [[0.5, 0, 0.3, 0.2]])


def ub_node(node_id, tier):
    found = node(node_id, tier)
    return dataclasses.replace(found, budget=load_tiers("conf/devices.yaml")[tier])


def test_without_dmr_phi_is_neither_updated_nor_sent():
    config = load_config("conf/ub_smoe.yaml", "moe.num-experts=4 ub-smoe.dmr=false")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: ub_node(1, "rpi4")}
    strategy.global_arrays = {"head.weight": np.zeros(2, np.float32)}
    aggregate(strategy, [reply(1, {"head.weight": np.ones(2, np.float32)}, {"num-examples": 30, "routed-tokens": [4, 2, 0, 0]})])
    assert strategy.config_for(strategy.nodes[1], 2) == {} and not strategy.phi.any()
    usage = strategy.round_metrics(strategy.round.replies)["utilisation"]  # still measured: the ablation's figure
    np.testing.assert_allclose(usage, [[4 / 6, 2 / 6, 0, 0]])  # K = 1: each token one slot


def test_replies_without_training_rows_leave_phi_as_it_was():
    config = load_config("conf/ub_smoe.yaml", "moe.num-experts=4")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: ub_node(1, "rpi4")}
    strategy.global_arrays = {"head.weight": np.zeros(2, np.float32)}
    strategy.phi = np.full((1, 4), 0.25)
    aggregate(strategy, [reply(1, {"head.weight": np.ones(2, np.float32)}, {"num-examples": 0, "routed-tokens": [4, 2, 0, 0]})])
    np.testing.assert_array_equal(strategy.phi, 0.25)
    assert strategy.round_metrics(strategy.round.replies)["utilisation"] is None


def test_pseudo_gradient_rule_on_a_small_case():
    grad = torch.tensor([[[1.0, 2.0]], [[3.0, -1.0]], [[0.0, 0.0]], [[0.0, 0.0]]])  # [E=4, 1, 2]
    routed = torch.tensor([3, 1, 0, 0])
    mean_prob = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = pseudo_gradient(grad, routed, mean_prob, rho=0.5)
    mixed = 0.75 * torch.tensor([1.0, 2.0]) + 0.25 * torch.tensor([3.0, -1.0])  # (1.5, 1.25)
    torch.testing.assert_close(out[:2], grad[:2])  # experts with tokens keep their real gradient
    torch.testing.assert_close(out[2, 0], 0.5 * 0.2 * mixed)
    torch.testing.assert_close(out[3, 0], 0.5 * 0.1 * mixed)
    torch.testing.assert_close(pseudo_gradient(grad, torch.zeros(4, dtype=torch.long), mean_prob, 0.5), grad)


@pytest.fixture(scope="module")
def tiny_config():
    return load_config("conf/ub_smoe.yaml", "model.backbone=tiny-bert moe.num-experts=8 moe.eval-top-k=8 train.precision=fp32")


def one_step(config, tier, phi=None):
    """(method, idle experts per layer of the step, gradients of lora_in_b per layer, arrays before, after)."""
    budget = load_tiers("conf/devices.yaml")[tier]
    method = UBSMoEClient(config, budget, [5, 5, 5, 5], {"modulation": phi} if phi is not None else {})
    model = build_model(config, 4, "moe")  # every expert, the global rank: what a node is sent
    model = method.build_model(state_to_numpy(model))
    for slot in model.layers:  # B = 0 would give A no gradient: start from a trained-looking LoRA
        torch.nn.init.normal_(slot.moe.experts.lora_in_b, std=0.1)
    before = state_to_numpy(model)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 5000, (2, 6)), "attention_mask": torch.ones(2, 6, dtype=torch.long),
             "labels": torch.tensor([0, 1])}
    seen = {}
    original = method.after_backward

    def spy(model):
        seen["raw"] = [slot.moe.experts.lora_out_b.grad.clone() for slot in model.layers]
        original(model)
        seen["grads"] = [slot.moe.experts.lora_out_b.grad.clone() for slot in model.layers]
        seen["routes"] = list(model.trace.routes)

    method.after_backward = spy
    train_local(model, [batch], 1, 0.01, 0.0, method, classifier_loss())
    return method, seen, before, state_to_numpy(model)


@pytest.mark.parametrize("backbone", ["tiny-bert", "tiny-mixtral"])  # a MoE-fied FFN, a native MoE model's experts
def test_idle_experts_get_the_pseudo_gradient_and_move_and_are_sent(backbone):
    config = load_config("conf/ub_smoe.yaml", f"model.backbone={backbone} moe.num-experts=8 moe.eval-top-k=8 "
                                              "train.precision=fp32")
    method, seen, before, after = one_step(config, "rpi4")  # K = floor(8 * 0.125) = 1 of 8, rho = 7 / 8
    assert method.experts_per_token() == 1
    for layer, (raw, grad, route) in enumerate(zip(seen["raw"], seen["grads"], seen["routes"])):
        routed = route.tokens_per_expert
        idle = routed == 0
        assert idle.any() and (~idle).any()
        share = routed.float() / routed.sum()
        mixed = (share[:, None, None] * raw).sum(0)
        mean_prob = route.probs.detach().mean(0)
        for e in range(8):
            expected = raw[e] if routed[e] > 0 else (7 / 8) * mean_prob[e] * mixed
            torch.testing.assert_close(grad[e], expected, msg=f"layer {layer} expert {e}")
    reply = method.trained_arrays(after)
    assert {expert_of(k) for k in reply if expert_of(k)} == {(l, e) for l in range(2) for e in range(8)}
    assert all(not np.array_equal(before[k], after[k]) for k in reply if k.endswith("lora_out_b"))


def test_without_pseudo_gradients_idle_experts_stay_and_are_not_sent(tiny_config):
    config = dataclasses.replace(tiny_config, method=dataclasses.replace(tiny_config.ub_smoe, pseudo_gradient=False))
    method, seen, before, after = one_step(config, "rpi4")
    routed = {(l, e) for l, route in enumerate(seen["routes"]) for e in range(8) if route.tokens_per_expert[e] > 0}
    for layer, grad in enumerate(seen["grads"]):
        for e in range(8):
            assert bool(grad[e].abs().sum() > 0) == ((layer, e) in routed)
    reply = method.trained_arrays(after)
    assert {expert_of(k) for k in reply if expert_of(k)} == routed
    assert "layers.0.moe.router.weight" in reply and "head.weight" in reply


def test_a_node_trains_its_own_phi_within_bounds_and_does_not_send_it(tiny_config):
    phi = [0.3] * 16  # 2 layers x 8 experts
    method, seen, before, after = one_step(tiny_config, "rpi4", phi=phi)
    assert "layers.0.moe.router.modulation" in after  # trained on the node
    assert not np.allclose(after["layers.0.moe.router.modulation"], 0.3)
    assert not any("modulation" in k for k in method.trained_arrays(after))
    # the step routed by modulated logits: each token's N_p = ceil(2 * 1) = 2 largest logits + 0.3
    route = seen["routes"][0]
    logits = route.logits.detach().float()
    top2 = torch.topk(logits, 2, dim=-1).indices
    modulated = logits + torch.zeros_like(logits).scatter(1, top2, 0.3)
    torch.testing.assert_close(route.probs.detach(), torch.softmax(modulated, dim=-1))
    assert route.topk_index.shape[1] == 1


def test_ub_smoe_sends_every_expert_at_the_global_rank_and_averages_experts_over_those_that_trained_them():
    config = load_config("conf/ub_smoe.yaml", "moe.num-experts=2 moe.experts=backbone")
    strategy = make_strategy(config, num_layers=1)
    e0, e1 = "layers.0.moe.experts.0.lora_in_a", "layers.0.moe.experts.1.lora_in_a"
    strategy.nodes = {1: ub_node(1, "rpi4"), 2: ub_node(2, "jetson-orin")}
    strategy.global_arrays = {e0: np.zeros((16, 3), np.float32), e1: np.zeros((16, 3), np.float32),
                              "head.weight": np.zeros(2, np.float32)}
    sent = strategy.arrays_for(strategy.nodes[1], 1)
    assert {k: a.shape for k, a in sent.items()} == {e0: (16, 3), e1: (16, 3), "head.weight": (2,)}  # rpi4's rank is 4
    r1 = reply(1, {e0: np.full((16, 3), 1, np.float32), "head.weight": np.ones(2, np.float32)},
               {"num-examples": 30, "routed-tokens": [6, 0]})
    r2 = reply(2, {e0: np.full((16, 3), 5, np.float32), e1: np.full((16, 3), 2, np.float32),
                   "head.weight": np.full(2, 3, np.float32)}, {"num-examples": 10, "routed-tokens": [4, 4]})
    strategy.round.sent_arrays = {1: dict(strategy.global_arrays), 2: dict(strategy.global_arrays)}
    new = from_record(strategy.aggregate_train(1, [r1, r2])[0])
    np.testing.assert_allclose(new[e0], (30 * 1 + 10 * 5) / 40)
    np.testing.assert_allclose(new[e1], 2.0)  # node 1 did not train expert 1: node 2's alone
    np.testing.assert_allclose(new["head.weight"], (30 + 30) / 40)


def test_ub_smoe_config_is_validated():
    with pytest.raises(ConfigError, match="ub-smoe.candidates"):
        load_config("conf/ub_smoe.yaml", "ub-smoe.candidates=0.5")
    with pytest.raises(ConfigError, match="ub-smoe.momentum"):
        load_config("conf/ub_smoe.yaml", "ub-smoe.momentum=1")
    with pytest.raises(ConfigError, match="phi-min"):
        load_config("conf/ub_smoe.yaml", "ub-smoe.phi-min=0.5")
    assert math.isclose(load_config("conf/ub_smoe.yaml").ub_smoe.momentum, 0.7)
