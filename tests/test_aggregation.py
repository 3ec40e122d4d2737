"""Sparse key-wise aggregation, on small hand-made replies."""

import dataclasses
import json
import re
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import load_config
from fedmoe_app.records import from_record, to_record
from fedmoe_app.names import held_experts, select_keys
from strategies import make_strategy
from strategies.replies import Node
from strategies.core import Contribution, sparse_weighted_average

E0, E1, E2 = (f"layers.0.moe.experts.{e}.w_in.weight" for e in range(3))
ROUTER = "layers.0.moe.router.weight"


def test_expert_nobody_trained_keeps_global_value():
    glob = {E0: np.zeros((2, 2)), E1: np.full((2, 2), 7.0)}
    new = sparse_weighted_average(glob, [Contribution({E0: np.ones((2, 2))}, {E0: 5.0})])
    np.testing.assert_array_equal(new[E1], np.full((2, 2), 7.0))
    np.testing.assert_array_equal(new[E0], np.ones((2, 2)))


def test_partial_holders_weighted():
    glob = {E0: np.zeros(3), E1: np.zeros(3)}
    a = Contribution({E0: np.full(3, 1.0), E1: np.full(3, 10.0)}, {E0: 3.0, E1: 1.0})
    b = Contribution({E0: np.full(3, 5.0)}, {E0: 1.0})
    new = sparse_weighted_average(glob, [a, b])
    np.testing.assert_allclose(new[E0], (3 * 1 + 1 * 5) / 4)  # 2.0
    np.testing.assert_allclose(new[E1], 10.0)  # only a held it


def test_zero_weight_keeps_global():
    glob = {E0: np.full(2, 4.0)}
    new = sparse_weighted_average(glob, [Contribution({E0: np.full(2, 9.0)}, {E0: 0.0})])
    np.testing.assert_array_equal(new[E0], np.full(2, 4.0))


def test_router_rows_of_unheld_experts_not_averaged_in():
    glob = {ROUTER: np.full((4, 2), -1.0)}
    a = Contribution({ROUTER: np.array([[1.0, 1], [2, 2], [9, 9], [9, 9]])}, {ROUTER: np.array([3.0, 1, 0, 0])})
    b = Contribution({ROUTER: np.array([[9.0, 9], [5, 5], [6, 6], [9, 9]])}, {ROUTER: np.array([0.0, 2, 2, 0])})
    new = sparse_weighted_average(glob, [a, b])[ROUTER]
    np.testing.assert_allclose(new[0], [1, 1])  # only a held expert 0
    np.testing.assert_allclose(new[1], [(1 * 2 + 2 * 5) / 3] * 2)  # 4.0
    np.testing.assert_allclose(new[2], [6, 6])  # only b
    np.testing.assert_allclose(new[3], [-1, -1])  # nobody: global


def test_unknown_key_is_an_error():
    with pytest.raises(KeyError, match="bogus"):
        sparse_weighted_average({E0: np.zeros(1)}, [Contribution({"bogus": np.zeros(1)}, {"bogus": 1.0})])


REQUIRED = {"train-loss": 1.0, "step-seconds": 0.1, "peak-rss-mb": 100.0, "bytes-down": 8, "bytes-up": 8}


def reply(node_id, arrays, metrics, request=None):
    """A successful train reply from `node_id` (the metrics every reply has filled in)."""
    message = Mock()
    message.has_error.return_value = False
    message.metadata.src_node_id = node_id
    content = {"arrays": to_record(arrays), "metrics": MetricRecord({**REQUIRED, **metrics})}
    if request is not None:
        content["request"] = ConfigRecord(request)
    message.content = RecordDict(content)
    return message


def node(node_id, tier="rpi4", held=2):
    budget = load_tiers("conf/devices.yaml")[tier].replace(experts_held=held, top_k=1, lora_rank=4)
    return Node(node_id, f"client-{node_id}", budget, 5000)


def aggregate(strategy, replies, server_round=1):
    """`aggregate_train` of replies to a round that sent each replying node the global
    tensors other than experts, and the experts its reply holds (every other node: all)."""
    sent = {n: dict(strategy.global_arrays) for n in strategy.nodes}
    for message in replies:
        if not message.has_error():
            held = held_experts(list(message.content["arrays"].keys()), strategy.num_layers)
            sent[message.metadata.src_node_id] = select_keys(strategy.global_arrays, held)
    strategy.round.sent_arrays = sent
    return strategy.aggregate_train(server_round, replies)


def test_fft_moe_weights_experts_by_rows_times_routing_share_and_head_by_rows():
    config = load_config("conf/fft_moe.yaml", "moe.num-experts=3")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    strategy.global_arrays = {
        E0: np.zeros(2, np.float32), E1: np.zeros(2, np.float32), E2: np.full(2, 7, np.float32),
        ROUTER: np.zeros((3, 2), np.float32), "head.weight": np.zeros(2, np.float32),
    }
    r1 = reply(1, {E0: np.full(2, 1, np.float32), E1: np.full(2, 2, np.float32),
                   ROUTER: np.array([[1, 1], [3, 3], [9, 9]], np.float32),
                   "head.weight": np.full(2, 1, np.float32)},
               {"num-examples": 30, "train-loss": 1.0, "routed-tokens": [6, 2, 0]}, {"next-experts": [0, 2]})
    r2 = reply(2, {E1: np.full(2, 4, np.float32), ROUTER: np.full((3, 2), 3, np.float32),
                   "head.weight": np.full(2, 4, np.float32)},
               {"num-examples": 10, "train-loss": 2.0, "routed-tokens": [0, 6, 0]}, {"next-experts": [1, 2]})
    arrays, metrics = aggregate(strategy, [r1, r2])
    new = from_record(arrays)
    # node 1: 30 rows, routing share [0.75, 0.25, 0]; node 2: 10 rows, share [0, 1, 0]
    np.testing.assert_allclose(new[E0], 1.0)
    np.testing.assert_allclose(new[E1], (7.5 * 2 + 10 * 4) / 17.5)  # 3.14: weights 30 x 0.25 and 10 x 1
    np.testing.assert_allclose(new[E2], 7.0)  # nobody held it
    # router rows: changes centred over the held rows. Node 1 held rows 0, 1: changes (1, 3)
    # minus their mean 2 = (-1, 1); node 2 held row 1 only: its change minus itself = 0.
    # Row 2: nobody held it, the global row is kept.
    np.testing.assert_allclose(new[ROUTER], [[-1, -1], [(7.5 * 1 + 10 * 0) / 17.5] * 2, [0, 0]], rtol=1e-6)
    np.testing.assert_allclose(new["head.weight"], (30 * 1 + 10 * 4) / 40)  # 1.75, by training rows
    assert metrics["train-loss"] == pytest.approx((30 * 1 + 10 * 2) / 40)
    # next round: each node holds what it asked for
    assert strategy.subsets == {"client-1": [[0, 2]], "client-2": [[1, 2]]}
    assert set(strategy.arrays_for(strategy.nodes[1], 2)) == {E0, E2, ROUTER, "head.weight"}


def test_fft_moe_router_rows_ignore_a_shift_shared_by_the_held_rows():
    # A softmax over the held experts is the same when all their rows move by one vector:
    # such a change is not averaged into the global router.
    config = load_config("conf/fft_moe.yaml", "moe.num-experts=4")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    start = np.arange(8, dtype=np.float32).reshape(4, 2)
    strategy.global_arrays = {ROUTER: start.copy(), E0: np.zeros(2, np.float32), E1: np.zeros(2, np.float32),
                              E2: np.zeros(2, np.float32)}
    shift = np.array([5.0, -2.0], np.float32)
    moved = np.zeros((4, 2), np.float32)  # replies carry updates: trained minus received
    moved[[0, 1]] = shift  # node 1 holds experts 0, 1 and moved both rows by `shift`
    r1 = reply(1, {ROUTER: moved, E0: np.zeros(2, np.float32), E1: np.zeros(2, np.float32)},
               {"num-examples": 10, "train-loss": 1.0, "routed-tokens": [5, 5, 0, 0]})
    informative = np.zeros((4, 2), np.float32)
    informative[1] = [1.0, 1.0]  # node 2 holds experts 1, 2 and raised row 1 against row 2
    r2 = reply(2, {ROUTER: informative, E1: np.zeros(2, np.float32), E2: np.zeros(2, np.float32)},
               {"num-examples": 10, "train-loss": 1.0, "routed-tokens": [0, 5, 5, 0]})
    arrays, _ = aggregate(strategy, [r1, r2])
    expected = start.copy()
    # node 2's change centred: +0.5 on row 1, -0.5 on row 2; node 1's shift centres to 0
    expected[1] += 0.5 * 0.5  # row 1: nodes 1 and 2 at equal weight (10 rows x share 0.5)
    expected[2] -= 0.5  # row 2: node 2 alone
    np.testing.assert_allclose(from_record(arrays)[ROUTER], expected, rtol=1e-6)


@pytest.mark.parametrize("strategy_name", ["fft_moe", "fedavg_lora", "head_only"])
def test_clients_weigh_by_the_rows_they_hold_not_the_samples_they_processed(strategy_name):
    # The audit's case: a jetson-orin client with 9 training rows processes 12 x 32 = 384
    # samples, an rpi4 client with 1,974 rows (nearly all one class) processes 8 x 8 = 64.
    config = load_config(f"conf/{strategy_name}.yaml", "moe.num-experts=2")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    strategy.global_arrays = {"head.weight": np.zeros(2, np.float32)}
    routing = strategy_name == "fft_moe"  # only FFT-MoE's clients report routing
    orin = reply(1, {"head.weight": np.full(2, 1, np.float32)},
                 {"num-examples": 9, "samples-processed": 384, **({"routed-tokens": [300, 84]} if routing else {})})
    rpi4 = reply(2, {"head.weight": np.full(2, 0, np.float32)},
                 {"num-examples": 1974, "samples-processed": 64, **({"routed-tokens": [64, 0]} if routing else {})})
    arrays, metrics = aggregate(strategy, [orin, rpi4])
    np.testing.assert_allclose(from_record(arrays)["head.weight"], 9 / (9 + 1974), rtol=1e-6)
    assert metrics["num-examples"] == 1983


def test_fft_moe_round_one_spreads_subsets_over_all_experts():
    config = load_config("conf/fft_moe.yaml", "moe.num-experts=8")
    strategy = make_strategy(config, num_layers=2)
    nodes = [node(1, held=2), node(2, held=4), node(3, held=2)]
    held = set()
    for n in nodes:
        subset = strategy.subset_of(n)
        assert len(subset) == 2 and all(len(layer) == n.budget.experts_held for layer in subset)
        held |= set(subset[0])
    assert held == set(range(8))


def test_fedavg_lora_weights_everything_by_examples():
    config = load_config("conf/fedavg_lora.yaml")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    key = "backbone.encoder.layer.0.attention.self.query.lora_A.default.weight"
    strategy.global_arrays = {key: np.zeros(2, np.float32)}
    r1 = reply(1, {key: np.full(2, 1, np.float32)}, {"num-examples": 1, "train-loss": 0.5})
    r2 = reply(2, {key: np.full(2, 5, np.float32)}, {"num-examples": 3, "train-loss": 0.5})
    arrays, _ = aggregate(strategy, [r1, r2])
    np.testing.assert_allclose(from_record(arrays)[key], 4.0)


def test_failed_reply_is_counted_and_skipped():
    config = load_config("conf/fedavg_lora.yaml")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1)}
    strategy.global_arrays = {E0: np.zeros(2, np.float32)}
    failed = Mock()
    failed.has_error.return_value = True
    failed.metadata.src_node_id = 1
    failed.error.reason = "node died"
    assert aggregate(strategy, [failed]) == (None, None)
    assert strategy.round.failures == [{"node_id": "1", "client_id": "client-1", "tier": "rpi4", "reason": "node died"}]


@pytest.mark.parametrize("bad_arrays,bad_metrics,reason", [
    ({"layers.9.unknown.weight": np.ones(2, np.float32)}, {}, "tensor 'layers.9.unknown.weight' was not sent to this node"),
    ({"head.weight": np.ones(3, np.float32)}, {}, r"tensor 'head.weight' has shape \(3,\); the one sent \(2,\)"),
    ({"head.weight": np.ones(2, np.int32)}, {}, "tensor 'head.weight' has dtype int32; allowed: a float dtype"),
    ({"head.weight": np.ones(2, np.float32)}, {"num-examples": 10**9}, r"metric 'num-examples' is 1000000000; .* <= 5000"),
    ({"head.weight": np.ones(2, np.float32)}, {"train-loss": float("nan")}, "metric 'train-loss' is nan"),
    ({"head.weight": np.ones(2, np.float32)}, {"step-seconds": [0.1, 0.2]}, r"metric 'step-seconds' is \[0.1, 0.2\]"),
    ({"head.weight": np.array([1.0, np.nan], np.float32)}, {}, "tensor 'head.weight' holds NaN or Inf"),
    ({"head.weight": np.array([np.inf, 0.0], np.float32)}, {}, "holds NaN or Inf"),
    ({"head.weight": np.ones(2, np.float32)}, {"num-examples": -4}, "metric 'num-examples' is -4"),
])
def test_a_malformed_reply_is_its_nodes_failure_and_is_not_averaged(bad_arrays, bad_metrics, reason):
    config = load_config("conf/fedavg_lora.yaml")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    strategy.global_arrays = {"head.weight": np.zeros(2, np.float32)}
    good = reply(1, {"head.weight": np.full(2, 3, np.float32)}, {"num-examples": 10, "train-loss": 0.5})
    bad = reply(2, bad_arrays, {"num-examples": 10, "train-loss": 0.5, **bad_metrics})
    arrays, metrics = aggregate(strategy, [good, bad])
    np.testing.assert_allclose(from_record(arrays)["head.weight"], 3.0)  # the good reply alone
    assert metrics["num-examples"] == 10
    failures = strategy.round.failures
    assert [f["node_id"] for f in failures] == ["2"]
    assert re.search(reason, failures[0]["reason"]) and failures[0]["reason"].startswith("malformed reply")


def test_every_method_has_a_server_half_and_a_client_half_of_one_name():
    from fedmoe_app.methods import METHODS
    from strategies import STRATEGIES

    assert set(STRATEGIES) == set(METHODS)


def _fft_moe_after_one_round():
    config = load_config("conf/fft_moe.yaml", "moe.num-experts=3")
    strategy = make_strategy(config, num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    strategy.global_arrays = {E0: np.zeros(2, np.float32), E1: np.zeros(2, np.float32), E2: np.zeros(2, np.float32),
                              ROUTER: np.zeros((3, 2), np.float32)}
    strategy._draw(range(10), 0.5)  # the generator has moved
    r1 = reply(1, {E0: np.ones(2, np.float32)}, {"num-examples": 5, "train-loss": 1.0, "routed-tokens": [4, 0, 0]},
               {"next-experts": [0, 2]})
    r2 = reply(2, {E1: np.ones(2, np.float32)}, {"num-examples": 5, "train-loss": 1.0, "routed-tokens": [0, 4, 4]},
               {"next-experts": [1, 2]})
    aggregate(strategy, [r1, r2])
    return config, strategy


def test_resume_strategy_state_survives_json_and_continues_the_same():
    config, strategy = _fft_moe_after_one_round()
    state = json.loads(json.dumps(strategy.state_dict()))  # JSON-able: what a checkpoint holds
    fresh = make_strategy(config, num_layers=1)
    fresh.load_state_dict(state)
    fresh.nodes = dict(strategy.nodes)  # a resumed server learns its nodes again
    assert fresh.subsets == strategy.subsets == {"client-1": [[0, 2]], "client-2": [[1, 2]]}
    np.testing.assert_array_equal(fresh.global_usage, strategy.global_usage)
    # usage: uniform 1/3 moved half way to the routed shares [4, 4, 4] / 12 = 1/3 each
    np.testing.assert_allclose(fresh.global_usage, np.full((1, 3), 1 / 3))
    assert fresh._draw(range(10), 0.5) == strategy._draw(range(10), 0.5)  # the same draws follow
    assert fresh.spread_cursor == strategy.spread_cursor


def test_a_restarted_node_keeps_its_experts_by_client_id_not_node_id():
    _, strategy = _fft_moe_after_one_round()
    restarted = dataclasses.replace(strategy.nodes[1], node_id=77)  # Flower gives it a new node id
    assert strategy.subset_of(restarted) == [[0, 2]]
    stranger = dataclasses.replace(strategy.nodes[1], node_id=78, client_id="client-9")
    assert strategy.subset_of(stranger) == [[0, 1]]  # a new client: the next experts in turn


def test_a_strategy_may_replace_the_sparse_average():
    from strategies.fedavg_lora import FedAvgLoRA

    class KeepFirst(FedAvgLoRA):  # e.g. a method whose replies change shapes
        def aggregate(self, replies):
            return dict(replies[0].arrays)

    strategy = KeepFirst(load_config("conf/fedavg_lora.yaml"), num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    strategy.global_arrays = {"head.weight": np.zeros(2, np.float32)}
    r1 = reply(1, {"head.weight": np.full(2, 3, np.float32)}, {"num-examples": 1, "train-loss": 0.5})
    r2 = reply(2, {"head.weight": np.full(2, 9, np.float32)}, {"num-examples": 1, "train-loss": 0.5})
    arrays, _ = aggregate(strategy, [r1, r2])
    np.testing.assert_allclose(from_record(arrays)["head.weight"], 3.0)


@pytest.mark.parametrize("bad_metrics,bad_request,reason", [
    ({"routed-tokens": [1, 2]}, None, "'routed-tokens' is not 1 x 3 counts"),
    ({"routed-tokens": [1, -2, 0]}, None, "'routed-tokens' is not 1 x 3 counts"),
    ({}, None, "'routed-tokens' is not"),
    ({"routed-tokens": [1, 2, 0]}, {"next-experts": [0, 0]}, "'next-experts' is not 2 distinct experts in \\[0, 3\\)"),
    ({"routed-tokens": [1, 2, 0]}, {"next-experts": [0, 7]}, "'next-experts' is not 2 distinct"),
    ({"routed-tokens": [1, 2, 0]}, {"next-experts": [0, 1, 2]}, "'next-experts' is not 2 distinct"),
])
def test_a_malformed_fft_moe_reply_is_its_nodes_failure(bad_metrics, bad_request, reason):
    strategy = make_strategy(load_config("conf/fft_moe.yaml", "moe.num-experts=3"), num_layers=1)
    strategy.nodes = {1: node(1), 2: node(2)}
    strategy.global_arrays = {E0: np.zeros(2, np.float32), E1: np.zeros(2, np.float32), E2: np.zeros(2, np.float32)}
    good = reply(1, {E0: np.ones(2, np.float32)}, {"num-examples": 10, "routed-tokens": [4, 0, 0]}, {"next-experts": [0, 1]})
    bad = reply(2, {E1: np.ones(2, np.float32)}, {"num-examples": 10, **bad_metrics}, bad_request)
    arrays, _ = aggregate(strategy, [good, bad])
    np.testing.assert_allclose(from_record(arrays)[E1], 0.0)  # the bad reply's expert is not averaged in
    assert [f["node_id"] for f in strategy.round.failures] == ["2"]
    assert re.search(reason, strategy.round.failures[0]["reason"])
    assert "client-2" not in strategy.subsets or strategy.subsets["client-2"] != [[0, 0]]


def test_an_update_far_larger_than_the_rounds_others_is_rejected():
    strategy = make_strategy(load_config("conf/fedavg_lora.yaml", "federation.max-update-ratio=10"), num_layers=1)
    strategy.nodes = {n: node(n) for n in (1, 2, 3, 4)}
    strategy.global_arrays = {"head.weight": np.zeros(4, np.float32)}
    moves = {1: 0.01, 2: 0.02, 3: 0.015, 4: 5.0}  # node 4: 333x the median of the others
    arrays, _ = aggregate(strategy, [reply(n, {"head.weight": np.full(4, m, np.float32)}, {"num-examples": 10})
                                     for n, m in moves.items()])
    np.testing.assert_allclose(from_record(arrays)["head.weight"], (0.01 + 0.02 + 0.015) / 3, rtol=1e-6)
    assert [f["node_id"] for f in strategy.round.failures] == ["4"]
    assert "update RMS 5 is over federation.max-update-ratio (10)" in strategy.round.failures[0]["reason"]
