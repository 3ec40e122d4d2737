"""The server optimiser (federation.server-optimizer): the same model as Flower's own
FedAvgM / FedAdam / FedYogi on dense replies; by hand on sparse ones; saved and resumed."""

from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from fedmoe_app.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedmoe_app.config import load_config
from fedmoe_app.records import from_record
from strategies import make_strategy
from tests.test_aggregation import aggregate, node, reply

KEYS = ("head.weight", "head.bias")
SHAPES = {"head.weight": (4, 6), "head.bias": (4,)}
ROWS = (30, 10, 20)


def trained_sets(rounds=3, seed=0):
    """Per round, each of three clients' trained tensors (dense: every client holds every key)."""
    rng = np.random.default_rng(seed)
    return [[{k: rng.normal(size=SHAPES[k]).astype(np.float32) for k in KEYS} for _ in ROWS] for _ in range(rounds)]


def flower_reply(arrays, rows):
    message = Mock()
    message.has_error.return_value = False
    message.has_content.return_value = True
    message.content = RecordDict({"arrays": ArrayRecord({k: Array(a.copy()) for k, a in arrays.items()}),
                                  "metrics": MetricRecord({"num-examples": rows})})
    return message


def run_flower(strategy, start, rounds):
    """The global model after each round of Flower's `strategy` on `rounds` of replies."""
    current, models = {k: a.copy() for k, a in start.items()}, []
    for server_round, trained in enumerate(rounds, start=1):
        if isinstance(strategy, FedAvgM):
            if strategy.current_arrays is None:  # what its configure_train sets in the first round
                strategy.current_arrays = ArrayRecord({k: Array(a.copy()) for k, a in current.items()})
        else:
            strategy.current_arrays = current  # what configure_train sets
        arrays, _ = strategy.aggregate_train(server_round, [flower_reply(t, n) for t, n in zip(trained, ROWS)])
        current = {k: np.asarray(a.numpy(), dtype=np.float32) for k, a in arrays.items()}
        models.append(current)
    return models


def ours(overrides, start):
    strategy = make_strategy(load_config("conf/head_only.yaml", overrides), num_layers=1)
    strategy.nodes = {i: node(i) for i in range(1, len(ROWS) + 1)}
    strategy.global_arrays = {k: a.copy() for k, a in start.items()}
    return strategy


def run_ours(strategy, rounds, first_round=1):
    models = []
    for server_round, trained in enumerate(rounds, start=first_round):
        replies = [reply(i, {k: t[k] - strategy.global_arrays[k] for k in t}, {"num-examples": n})
                   for i, (t, n) in enumerate(zip(trained, ROWS), start=1)]
        arrays, _ = aggregate(strategy, replies, server_round)
        strategy.global_arrays = from_record(arrays)
        models.append(strategy.global_arrays)
    return models


@pytest.mark.parametrize("name, flower, overrides", [
    ("avgm", lambda: FedAvgM(server_learning_rate=0.7, server_momentum=0.9),
     "federation.server-lr=0.7 federation.server-momentum=0.9"),
    ("adam", lambda: FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
     "federation.server-lr=0.1 federation.server-momentum=0.9 federation.server-beta2=0.99 federation.server-tau=0.001"),
    ("yogi", lambda: FedYogi(eta=0.05, beta_1=0.8, beta_2=0.95, tau=1e-2),
     "federation.server-lr=0.05 federation.server-momentum=0.8 federation.server-beta2=0.95 federation.server-tau=0.01"),
])
def test_agrees_with_flowers_strategy_on_dense_replies(name, flower, overrides):
    start = {k: a for k, a in trained_sets(1, seed=7)[0][0].items()}
    rounds = trained_sets(3)
    expected = run_flower(flower(), start, rounds)
    got = run_ours(ours(f"federation.server-optimizer={name} {overrides}", start), rounds)
    for round_expected, round_got in zip(expected, got):
        for key in KEYS:
            np.testing.assert_allclose(round_got[key], round_expected[key], rtol=1e-4, atol=1e-5)
    # and the optimiser did something: not FedAvg's model
    fedavg = run_ours(ours("", start), rounds)
    assert not np.allclose(got[-1]["head.weight"], fedavg[-1]["head.weight"], atol=1e-3)


@pytest.mark.parametrize("name, flower", [("avgm", lambda: FedAvgM().server_learning_rate),
                                           ("adam", lambda: FedAdam().eta), ("yogi", lambda: FedYogi().eta)])
def test_server_lr_zero_is_flowers_default(name, flower):
    assert ours(f"federation.server-optimizer={name}", {}).optimizer.lr == flower()


def test_avg_is_the_weighted_average():
    start = {k: np.zeros(SHAPES[k], np.float32) for k in KEYS}
    rounds = trained_sets(1)
    got = run_ours(ours("", start), rounds)[0]
    for key in KEYS:
        expected = sum(n * t[key] for t, n in zip(rounds[0], ROWS)) / sum(ROWS)
        np.testing.assert_allclose(got[key], expected, rtol=1e-5, atol=1e-6)


def test_element_no_reply_held_keeps_its_value_and_momentum():
    strategy = ours("federation.server-optimizer=avgm federation.server-lr=1.0 federation.server-momentum=0.5",
                    {"head.weight": np.zeros(2, np.float32), "head.bias": np.zeros(1, np.float32)})
    opt = strategy.optimizer
    current = {"e0": np.zeros(2), "e1": np.zeros(2)}
    # round 1: both change by +1 -> momentum m = -1, x = 0 - (-1) = 1
    current = opt.step(current, {"e0": np.ones(2), "e1": np.ones(2)})
    np.testing.assert_allclose(current["e0"], 1.0)
    # round 2: e0 changes by +2, e1 is not held (its aggregate is its global value)
    current = opt.step(current, {"e0": np.full(2, 3.0), "e1": current["e1"]})
    np.testing.assert_allclose(current["e0"], 1 + (0.5 * 1 + 2))  # m = 0.5 * -1 - 2 = -2.5
    np.testing.assert_allclose(current["e1"], 1.0)  # no move from old momentum
    np.testing.assert_allclose(opt.moments["m"]["e1"], -1.0)  # kept for when it is trained again
    # round 3: e1 changes by +1 again -> m = 0.5 * -1 - 1 = -1.5
    current = opt.step(current, {"e0": current["e0"], "e1": np.full(2, 2.0)})
    np.testing.assert_allclose(current["e1"], 1 + 1.5)


def test_adam_counts_steps_per_element():
    strategy = ours("federation.server-optimizer=adam federation.server-lr=0.1 federation.server-momentum=0.9 "
                    "federation.server-beta2=0.99 federation.server-tau=0.001",
                    {"head.weight": np.zeros(2, np.float32), "head.bias": np.zeros(1, np.float32)})
    opt = strategy.optimizer
    x = {"w": np.zeros(2)}
    x = opt.step(x, {"w": np.array([1.0, 0.0])})  # element 1 not changed: no step
    np.testing.assert_array_equal(opt.moments["t"]["w"], [1, 0])
    d = 1.0
    m, v = 0.1 * d, 0.01 * d * d
    lr = 0.1 * np.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)  # Flower's correction with t = 1
    np.testing.assert_allclose(x["w"], [lr * m / (np.sqrt(v) + 1e-3), 0.0], rtol=1e-6)


def test_moments_are_saved_with_the_checkpoint_and_a_resumed_run_continues_alike(tmp_path):
    overrides = "federation.server-optimizer=adam federation.server-lr=0.1"
    start = {k: np.zeros(SHAPES[k], np.float32) for k in KEYS}
    rounds = trained_sets(4)
    whole = run_ours(ours(overrides, start), rounds)
    first = ours(overrides, start)
    run_ours(first, rounds[:2])
    save_checkpoint(tmp_path, Checkpoint(2, first.name, first.global_arrays, first.state_dict(), first.state_arrays()))
    saved = load_checkpoint(tmp_path)
    assert set(saved.arrays) == set(KEYS)  # the moments are not model tensors
    assert set(saved.strategy_arrays) == {f"{m}/{k}" for m in ("m", "v", "t") for k in KEYS}
    resumed = ours(overrides, saved.arrays)
    resumed.load_state_dict(saved.strategy_state)
    resumed.load_state_arrays(saved.strategy_arrays, saved.arrays)
    rest = run_ours(resumed, rounds[2:], first_round=3)
    for key in KEYS:
        np.testing.assert_array_equal(rest[-1][key], whole[-1][key])


def test_moments_of_another_optimiser_are_refused():
    strategy = ours("federation.server-optimizer=avgm", {"head.weight": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="'v'"):
        strategy.load_state_arrays({"v/head.weight": np.zeros(2, np.float32)}, strategy.global_arrays)
