"""HFedMoE: expert scores and top-C training on a client, usage-filtered and
importance-weighted aggregation on the server, all against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import ConfigError, load_config
from fedmoe_app.methods.hfedmoe import HFedMoEClient, expert_scores, selected_experts
from fedmoe_app.model import build_model, state_to_numpy
from fedmoe_app.records import from_record
from fedmoe_app.names import expert_of
from fedmoe_app.train import train_local
from fedmoe_app.tasks.classification import classifier_loss
from strategies import make_strategy
from tests.test_aggregation import aggregate, node, reply

PROBS = [[0.5, 0.5, 0.0], [0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.4, 0.0, 0.6]]


def test_importance_and_information_bottleneck_scores_by_hand():
    lam, beta = 0.3, 0.5
    importance, ib = expert_scores(torch.tensor(PROBS), lam, beta)
    for e in range(3):
        column = [row[e] for row in PROBS]
        p = sum(column) / 4
        s = lam * p + (1 - lam) * max(column)
        penalty = sum(g * math.log(g / p) for g in column if g > 0) / 4
        assert importance[e].item() == pytest.approx(s, rel=1e-6)
        assert ib[e].item() == pytest.approx(s - beta * penalty, rel=1e-6)
    # expert 0: mean 0.5, max 0.9 -> s = 0.15 + 0.63 = 0.78
    assert importance[0].item() == pytest.approx(0.78)


def test_only_the_top_c_routed_experts_by_ib_score_are_selected():
    ib = torch.tensor([0.9, 0.1, 0.5, 0.7, 0.8])
    routed = torch.tensor([False, True, True, True, True])  # expert 0 scores best but got no token
    assert selected_experts(ib, routed, 2).tolist() == [False, False, False, True, True]
    assert selected_experts(ib, routed, 9).tolist() == [False, True, True, True, True]  # at most those routed


@pytest.fixture(scope="module")
def config():
    return load_config("conf/hfedmoe.yaml", "model.backbone=tiny-bert moe.num-experts=8 train.precision=fp32")


def test_only_the_selected_experts_receive_gradients_and_move(config):
    budget = load_tiers("conf/devices.yaml")["jetson-orin"].replace(experts_held=8, active_experts=4,
                                 experts_trained=2)
    method = HFedMoEClient(config, budget, [5, 5, 5, 5], {})
    model = build_model(config, 4, "moe", top_k=4)
    for slot in model.layers:  # B = 0 would give A no gradient: start from a trained-looking LoRA
        torch.nn.init.normal_(slot.moe.experts.lora_in_b, std=0.1)
    before = state_to_numpy(model)
    torch.manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 5000, (4, 10)), "attention_mask": torch.ones(4, 10, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2, 3])}
    seen = {}
    original = method.after_backward

    def spy(model):
        original(model)
        seen["grads"] = [slot.moe.experts.lora_in_a.grad.clone() for slot in model.layers]
        seen["routes"] = list(model.trace.routes)

    method.after_backward = spy
    train_local(model, [batch], 1, 0.01, 0.0, method, classifier_loss())
    after = state_to_numpy(model)
    selected = set()
    for layer, (grad, route) in enumerate(zip(seen["grads"], seen["routes"])):
        _, ib = expert_scores(route.probs, config.hfedmoe.importance_mix, config.hfedmoe.ib_beta)
        chosen = selected_experts(ib, route.tokens_per_expert > 0, 2)
        assert int(chosen.sum()) == 2
        selected |= {(layer, e) for e in range(8) if chosen[e]}
        for e in range(8):
            moved = any(not np.array_equal(before[k], after[k]) for k in before
                        if k.startswith(f"layers.{layer}.moe.experts.{e}."))
            assert bool(grad[e].abs().sum() > 0) == bool(chosen[e]) == moved, (layer, e)
    assert not np.array_equal(before["head.weight"], after["head.weight"])
    reply = method.trained_arrays(after)  # what it trained: the selected experts, routers, head
    assert {expert_of(k) for k in reply if expert_of(k)} == selected
    assert {k for k in reply if not expert_of(k)} == {k for k in after if not expert_of(k)}
    metrics, request = method.report()
    usage = np.asarray(metrics["expert-usage"]).reshape(2, 8)
    np.testing.assert_allclose(usage.sum(axis=1), 1.0, rtol=1e-5)  # a mean of softmaxes over the held experts
    assert len(request["next-experts"]) == 2 * 8


U1, S1 = [0.6, 0.4, 0.0], [0.8, 0.5, 0.0]  # node 1 holds experts 0, 1
U2, S2 = [0.0, 0.005, 0.995], [0.0, 0.1, 0.9]  # node 2 holds experts 1, 2 and barely uses 1
E = [f"layers.0.moe.experts.{e}.lora_in_b" for e in range(3)]
ROUTER = "layers.0.moe.router.weight"


def hfedmoe_round(gate_weights):
    config = load_config("conf/hfedmoe.yaml", f"moe.num-experts=3 hfedmoe.usage-threshold=0.01 "
                                              f"hfedmoe.gate-weights={gate_weights}")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    strategy.global_arrays = {**{k: np.zeros((2, 4), np.float32) for k in E},
                              ROUTER: np.zeros((3, 2), np.float32), "head.weight": np.zeros(2, np.float32)}
    r1 = reply(1, {E[0]: np.full((2, 4), 1, np.float32), E[1]: np.full((2, 4), 2, np.float32),
                   ROUTER: np.array([[1, 1], [3, 3], [0, 0]], np.float32), "head.weight": np.full(2, 1, np.float32)},
               {"num-examples": 30, "routed-tokens": [6, 2, 0], "expert-usage": U1, "expert-importance": S1},
               {"next-experts": [0, 1]})
    r2 = reply(2, {E[1]: np.full((2, 4), 8, np.float32), E[2]: np.full((2, 4), 5, np.float32),
                   ROUTER: np.array([[0, 0], [2, 2], [4, 4]], np.float32), "head.weight": np.full(2, 4, np.float32)},
               {"num-examples": 10, "routed-tokens": [0, 1, 7], "expert-usage": U2, "expert-importance": S2},
               {"next-experts": [1, 2]})
    arrays, _ = aggregate(strategy, [r1, r2])
    return from_record(arrays)


def test_a_node_that_trained_fewer_experts_than_it_held_is_averaged_on_what_it_trained():
    config = load_config("conf/hfedmoe.yaml", "moe.num-experts=3")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    strategy.global_arrays = {**{k: np.zeros((2, 4), np.float32) for k in E},
                              ROUTER: np.zeros((3, 2), np.float32), "head.weight": np.zeros(2, np.float32)}
    strategy.round.sent_arrays = {1: {k: strategy.global_arrays[k] for k in (E[0], E[1], ROUTER, "head.weight")},
                                  2: {k: strategy.global_arrays[k] for k in (E[1], E[2], ROUTER, "head.weight")}}
    r1 = reply(1, {E[0]: np.full((2, 4), 1, np.float32), ROUTER: np.array([[1, 1], [3, 3], [0, 0]], np.float32),
                   "head.weight": np.full(2, 1, np.float32)},  # held experts 0 and 1, trained 0 only
               {"num-examples": 30, "routed-tokens": [6, 2, 0], "expert-usage": U1, "expert-importance": S1})
    r2 = reply(2, {E[1]: np.full((2, 4), 8, np.float32), E[2]: np.full((2, 4), 5, np.float32),
                   ROUTER: np.array([[0, 0], [2, 2], [4, 4]], np.float32), "head.weight": np.full(2, 4, np.float32)},
               {"num-examples": 10, "routed-tokens": [0, 1, 7], "expert-usage": [0.0, 0.5, 0.5],
                "expert-importance": S2})
    arrays, _ = strategy.aggregate_train(1, [r1, r2])
    new = from_record(arrays)
    np.testing.assert_allclose(new[E[1]], 8.0)  # node 1 held expert 1 but did not train it: node 2's alone
    # node 1's router rows 0, 1 (held) centred: (-1, 1), weight alpha = 0.6 * 0.8 / 3 (S_1 = {0}, what it trained)
    a1, a2 = 0.6 * 0.8 / 3, (0.5 * 0.1 + 0.5 * 0.9) / 3
    np.testing.assert_allclose(new[ROUTER], [[-1, -1], [(a1 * 1 + a2 * -1) / (a1 + a2)] * 2, [1, 1]], rtol=1e-6)


def test_hfedmoe_averages_experts_over_nodes_that_used_them_and_gates_by_importance():
    new = hfedmoe_round("normalised")
    np.testing.assert_allclose(new[E[0]], 1.0)
    np.testing.assert_allclose(new[E[1]], 2.0)  # node 2's usage 0.005 < tau: its 8 is left out
    np.testing.assert_allclose(new[E[2]], 5.0)
    np.testing.assert_allclose(new["head.weight"], (30 * 1 + 10 * 4) / 40)
    # alpha: node 1 (0.6 * 0.8 + 0.4 * 0.5) / 3 = 0.68 / 3; node 2 (0.005 * 0.1 + 0.995 * 0.9) / 3 = 0.896 / 3.
    # Router rows as centred changes: node 1 rows 0, 1 change (1, 3) - 2 = (-1, 1); node 2 rows 1, 2: (2, 4) - 3 = (-1, 1)
    a1, a2 = 0.68 / 3, (0.005 * 0.1 + 0.995 * 0.9) / 3
    np.testing.assert_allclose(new[ROUTER], [[-1, -1], [(a1 * 1 + a2 * -1) / (a1 + a2)] * 2, [1, 1]], rtol=1e-6)


def test_hfedmoe_raw_gate_weights_are_the_papers_unnormalised_sum():
    new = hfedmoe_round("raw")
    a1, a2 = 0.68 / 3, (0.005 * 0.1 + 0.995 * 0.9) / 3
    np.testing.assert_allclose(new[ROUTER], [[-a1] * 2, [a1 * 1 + a2 * -1] * 2, [a2] * 2], rtol=1e-6)
    np.testing.assert_allclose(new[E[1]], 2.0)  # experts as in the normalised form


def test_the_budget_names_the_tier_and_field(tmp_path):
    good = (tmp_path / "ok.yaml")
    text = open("conf/devices.yaml").read()
    for bad, message in [("compute-share: 1.0", "compute-share' is 1.5; allowed: \\(0, 1\\]"),
                         ("experts-trained: 8", "experts-trained' is 0; allowed: > 0")]:
        value = "compute-share: 1.5" if "compute" in bad else "experts-trained: 0"
        good.write_text(text.replace(bad, value))
        with pytest.raises(ConfigError, match=f"device tier 'jetson-orin' in .*: field '{message}"):
            load_tiers(str(good))
