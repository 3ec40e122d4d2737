"""The round loop under node failures, on an in-process fake Grid: a node that dies is
counted and named, the round completes with the replies it has (or keeps the global model
below `federation.min-reply-fraction`), a node that comes back takes part again, and the
sample is drawn from the nodes connected when the round starts, training and evaluation
each asking only their configured fraction."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import Error
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import load_config
from fedmoe_app.node import describe
from fedmoe_app.records import from_record, to_record, updates_from
from strategies import make_strategy

KEY = "backbone.encoder.layer.0.attention.self.query.lora_A.default.weight"
SUPERLINK_NODE_ID = 1  # error replies made by the SuperLink carry its id, not the dead node's
TIERS = {11: "rpi4", 12: "jetson-nano", 13: "jetson-orin", 14: "jetson-orin"}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, SUPERLINK_NODE_ID
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


class FakeGrid:
    """Connected nodes answer each message at once; `dead` nodes get the SuperLink's
    'node unavailable' error, `silent` nodes never answer."""

    def __init__(self, node_ids):
        self.connected = list(node_ids)
        self.dead, self.silent, self.garbage = set(), set(), set()
        self.sent: list[tuple[str, int]] = []  # (message type, node id)

    def get_node_ids(self):
        return list(self.connected)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for i, message in enumerate(messages):
            node_id = message.metadata.dst_node_id
            message.metadata.__dict__["_message_id"] = f"{len(self.sent)}-{i}"
            self.sent.append((message.metadata.message_type, node_id))
            if node_id in self.silent:
                continue
            if node_id in self.dead:
                error = Message(Error(code=5, reason="Node Unavailable"), reply_to=message)
                error.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(error)
                continue
            content = self.answer(node_id, message)
            if node_id in self.garbage and message.metadata.message_type == MessageType.TRAIN:
                content["arrays"] = to_record({KEY: np.full(2, np.nan, np.float32)})
            replies.append(Message(content, reply_to=message))
        return replies

    @staticmethod
    def answer(node_id, message):
        kind = message.metadata.message_type
        if kind == MessageType.QUERY:
            answer = describe({"client-id": f"client-{node_id}"}, load_tiers("conf/devices.yaml")[TIERS[node_id]], 10)
            return RecordDict({name: ConfigRecord(record) for name, record in answer.items()})
        metrics = {"num-examples": 10, "train-loss": 1.0, "step-seconds": 0.1, "bytes-down": 8, "bytes-up": 8,
                   "peak-rss-mb": 100.0 + node_id}
        if kind == MessageType.EVALUATE:
            return RecordDict({"metrics": MetricRecord({"num-examples": 10, "loss": 1.0, "accuracy": 0.5})})
        received = from_record(message.content["arrays"])
        trained = {KEY: received[KEY] + node_id}  # each node moves the tensor by its id
        arrays = to_record(updates_from(trained, received))  # and replies with the move, as the ClientApp does
        return RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics), "request": ConfigRecord({})})


def run(grid, overrides="", rounds=1, on_round=None):
    config = load_config("conf/fedavg_lora.yaml", f"rounds={rounds} eval.every=100 {overrides}")
    records = []

    def log_round(record):
        records.append(record)
        if on_round:
            on_round(record)

    strategy = make_strategy(config, num_layers=1, on_round=log_round)
    result = strategy.start(grid, to_record({KEY: np.zeros(2, np.float32)}), num_rounds=rounds)
    return from_record(result.arrays)[KEY], records


def test_dead_node_is_counted_and_the_round_completes_with_the_others():
    grid = FakeGrid([11, 12, 13])
    grid.dead = {13}
    value, records = run(grid, "federation.min-nodes=3")
    round_one = records[1]
    assert round_one["num_replies"] == 2
    assert round_one["failures"] == 1  # its query: tier still unknown, so not sent train or evaluate
    assert {f["node_id"] for f in round_one["failed_nodes"]} == {"13"}
    assert all("Node Unavailable" in f["reason"] for f in round_one["failed_nodes"])
    np.testing.assert_allclose(value, (11 + 12) / 2)  # equal examples: the mean of the two moves


def test_silent_node_is_a_timeout_failure_named_with_its_tier():
    grid = FakeGrid([11, 12, 13])
    value, records = run(grid, "federation.min-nodes=3", rounds=2,
                         on_round=lambda r: grid.silent.add(12) if r["round"] == 1 else None)
    assert records[1]["failures"] == 0 and records[1]["num_replies"] == 3
    assert records[2]["num_replies"] == 2
    failed = [f for f in records[2]["failed_nodes"]]
    assert failed[0] == {"node_id": "12", "client_id": "client-12", "tier": "jetson-nano", "reason": failed[0]["reason"]}
    assert "round-timeout" in failed[0]["reason"]
    np.testing.assert_allclose(value, (11 + 12 + 13) / 3 + (11 + 13) / 2)  # each round adds the replies' mean move


def test_too_few_replies_keep_the_global_model():
    grid = FakeGrid([11, 12, 13])
    grid.dead = {12, 13}
    value, records = run(grid, "federation.min-nodes=3 federation.min-reply-fraction=0.5")
    assert records[1]["num_replies"] == 1  # 1 of 3 < ceil(0.5 * 3)
    np.testing.assert_array_equal(value, 0.0)


def test_restarted_node_takes_part_again():
    grid = FakeGrid([11, 12, 13])

    def kill_then_restart(record):
        if record["round"] == 1:  # node 13 died during round 1 ...
            grid.dead = {13}
        if record["round"] == 2:  # ... and comes back (same id, as with registered keys)
            grid.dead = set()

    # the dead node is already known, so round 2 only fails its train message
    _, records = run(grid, "federation.min-nodes=3", rounds=3, on_round=kill_then_restart)
    assert [r["num_replies"] for r in records[1:]] == [3, 2, 3]
    assert [r["failures"] for r in records[1:]] == [0, 1, 0]
    train_round_three = [n for kind, n in grid.sent[-4:] if kind == MessageType.TRAIN]
    assert 13 in train_round_three


def test_sample_covers_nodes_that_connected_while_waiting():
    grid = FakeGrid([11, 12])
    joined = []

    def connect_later():
        if not joined:  # first call: 2 nodes; a third joins while the server waits for min-nodes
            joined.append(True)
            return [11, 12]
        return [11, 12, 14]

    grid.get_node_ids = connect_later
    _, records = run(grid, "federation.min-nodes=3 federation.fraction-train=1.0")
    assert records[1]["num_replies"] == 3


def test_training_and_evaluation_ask_only_their_sampled_fraction():
    grid = FakeGrid([11, 12, 13, 14])
    run(grid, "federation.min-nodes=1 federation.fraction-train=0.5 federation.fraction-evaluate=0.25")
    sent = lambda kind: [n for k, n in grid.sent if k == kind]  # noqa: E731
    assert len(sent(MessageType.QUERY)) == 4  # every node's budget is learnt once, up front
    assert len(sent(MessageType.TRAIN)) == 2  # ceil(0.5 * 4)
    assert len(sent(MessageType.EVALUATE)) == 1  # ceil(0.25 * 4), not every known node


def test_flowers_own_round_loop_runs_a_fedmoe_strategy():
    """The Strategy contract: Flower's `Strategy.start` drives configure / aggregate alone."""
    from flwr.serverapp.strategy import Strategy

    grid = FakeGrid([11, 12, 13])
    grid.dead = {13}
    config = load_config("conf/fedavg_lora.yaml", "federation.min-nodes=3 rounds=2 eval.every=2")
    strategy = make_strategy(config, num_layers=1)
    strategy.discover(grid, [11, 12, 13])
    result = Strategy.start(strategy, grid, to_record({KEY: np.zeros(2, np.float32)}), num_rounds=2)
    np.testing.assert_allclose(from_record(result.arrays)[KEY], 2 * (11 + 12) / 2)  # two rounds of the mean move
    assert result.train_metrics_clientapp[2]["num-examples"] == 20
    assert result.evaluate_metrics_clientapp[2]["accuracy-mean"] == 0.5
    assert [f["node_id"] for f in strategy.round.failures] == ["13"]  # the dead node, named, in round 2
    evaluated = [n for kind, n in grid.sent if kind == MessageType.EVALUATE]
    assert sorted(evaluated) == [11, 12]  # in round 2 only: eval.every holds under Flower's loop too


def test_start_returns_flowers_result_with_every_rounds_metrics():
    grid = FakeGrid([11, 12])
    config = load_config("conf/fedavg_lora.yaml", "rounds=2 federation.min-nodes=2")
    strategy = make_strategy(config, num_layers=1)
    evaluated = []
    result = strategy.start(grid, to_record({KEY: np.zeros(2, np.float32)}), num_rounds=2,
                            evaluate_fn=lambda rnd, arrays: evaluated.append(rnd) or MetricRecord({"accuracy": 0.1, "loss": 1.0}))
    assert evaluated == [0, 1, 2] and sorted(result.evaluate_metrics_serverapp) == [0, 1, 2]
    assert sorted(result.train_metrics_clientapp) == [1, 2]
    np.testing.assert_allclose(from_record(result.arrays)[KEY], 2 * (11 + 12) / 2)


def test_a_malformed_reply_is_a_failure_with_its_reason_in_the_round_record():
    grid = FakeGrid([11, 12, 13])
    grid.garbage = {12}
    value, records = run(grid, "federation.min-nodes=3")
    assert records[1]["num_replies"] == 2 and "client-12" not in records[1]["clients"]
    assert records[1]["failed_nodes"] == [{"node_id": "12", "client_id": "client-12", "tier": "jetson-nano",
                                           "reason": "malformed reply: tensor '" + KEY + "' holds NaN or Inf"}]
    np.testing.assert_allclose(value, (11 + 13) / 2)  # the NaN never reaches the global model


def test_the_same_clients_under_other_node_ids_are_drawn_alike():
    draws = []
    for ids in ([11, 12, 13, 14], [940, 730, 520, 310]):  # clients 11-14 behind other (reordered) node ids
        client_of = dict(zip(ids, [11, 12, 13, 14]))
        grid = FakeGrid(ids)
        grid.answer = lambda node_id, message, c=client_of: FakeGrid.answer(c[node_id], message)
        config = load_config("conf/fedavg_lora.yaml", "federation.min-nodes=1 federation.fraction-train=0.5")
        strategy = make_strategy(config, num_layers=1)
        strategy.discover(grid, grid.get_node_ids())
        draws.append([[strategy.nodes[n].client_id for n in strategy._draw(grid.get_node_ids(), 0.5)] for _ in range(5)])
    assert draws[0] == draws[1]
