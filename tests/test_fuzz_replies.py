"""Fuzz: hostile and malformed train replies pushed through the server's aggregation. Each
must be counted as its node's failure with a reason, never crash the round, and leave the
global model exactly as the well-formed replies alone make it."""

import random
from unittest.mock import Mock

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import load_config
from fedmoe_app.records import from_record, to_record
from strategies import make_strategy
from strategies.replies import Node

HEAD, E0, E1, ROUTER = "head.weight", "layers.0.moe.experts.0.w_in.weight", "layers.0.moe.experts.1.w_in.weight", \
    "layers.0.moe.router.weight"
GOOD = {  # what the client halves send: (metrics, request)
    "fft_moe": ({"num-examples": 10, "train-loss": 1.0, "step-seconds": 0.1, "peak-rss-mb": 100.0, "bytes-down": 8,
                 "bytes-up": 8, "routed-tokens": [5, 5]}, {"next-experts": [0, 1]}),
    "hfedmoe": ({"num-examples": 10, "train-loss": 1.0, "step-seconds": 0.1, "peak-rss-mb": 100.0, "bytes-down": 8,
                 "bytes-up": 8, "routed-tokens": [5, 5], "expert-usage": [0.5, 0.5], "expert-importance": [0.6, 0.7]},
                {"next-experts": [0, 1]}),
    "ub_smoe": ({"num-examples": 10, "train-loss": 1.0, "step-seconds": 0.1, "peak-rss-mb": 100.0, "bytes-down": 8,
                 "bytes-up": 8, "routed-tokens": [5, 5]}, {}),
    "fedavg_lora": ({"num-examples": 10, "train-loss": 1.0, "step-seconds": 0.1, "peak-rss-mb": 100.0,
                     "bytes-down": 8, "bytes-up": 8}, {}),
    "hetlora": ({"num-examples": 10, "train-loss": 1.0, "step-seconds": 0.1, "peak-rss-mb": 100.0,
                 "bytes-down": 8, "bytes-up": 8}, {"lora-rank": 3}),
    "flexlora": ({"num-examples": 10, "train-loss": 1.0, "step-seconds": 0.1, "peak-rss-mb": 100.0,
                  "bytes-down": 8, "bytes-up": 8}, {}),
}
HOSTILE = 99  # the hostile node's id
LORA_A, LORA_B = "m.lora_A.default.weight", "m.lora_B.default.weight"  # one PEFT LoRA module of rank 6
PAIRED = ("hetlora", "flexlora")  # methods for which a LoRA module's factors travel together


def global_arrays():
    return {HEAD: np.zeros((2, 3), np.float32), E0: np.zeros((2, 3), np.float32), E1: np.zeros((2, 3), np.float32),
            ROUTER: np.zeros((2, 3), np.float32), LORA_A: np.zeros((6, 3), np.float32), LORA_B: np.zeros((2, 6), np.float32)}


def message(node_id, content):
    m = Mock()
    m.has_error.return_value = False
    m.metadata.src_node_id = node_id
    m.content = content
    return m


def good_reply(strategy_name, node_id, move):
    updates = {k: np.full(a.shape, move, np.float32) for k, a in global_arrays().items()}
    metrics, request = GOOD[strategy_name]
    return message(node_id, RecordDict({"arrays": to_record(updates), "metrics": MetricRecord(metrics),
                                        "request": ConfigRecord(request)}))


def hostile_content(strategy_name, rng: random.Random) -> tuple[str, RecordDict]:
    """(kind, content) of one hostile reply, drawn at random."""
    updates = {k: np.full(a.shape, 0.015, np.float32) for k, a in global_arrays().items()}
    metrics, request = dict(GOOD[strategy_name][0]), dict(GOOD[strategy_name][1])
    records: dict = {}
    key = rng.choice(sorted(updates))
    kind = rng.choice(["nan", "inf", "shape", "dtype", "huge", "extra-tensor", "missing-metric", "list-metric",
                       "negative-metric", "nan-metric", "rows", "float-rows", "extra-record", "no-arrays",
                       "routed", "next-experts", "lora-rank", "bf16-stype",
                       *(["unpaired"] if strategy_name in PAIRED else [])])
    if kind in ("nan", "inf"):
        bad = updates[key].copy()
        bad.flat[rng.randrange(bad.size)] = np.nan if kind == "nan" else rng.choice([np.inf, -np.inf])
        updates[key] = bad
    elif kind == "shape":
        updates[key] = np.zeros(rng.choice([(3, 2), (2,), (2, 3, 1), (4, 3)]), np.float32)
    elif kind == "dtype":
        updates[key] = np.zeros((2, 3), rng.choice([np.int32, np.int8, np.uint16, np.bool_]))
    elif kind == "huge":
        updates[key] = np.full((2, 3), rng.choice([1e3, 1e5, -1e4]), np.float32)
    elif kind == "extra-tensor":
        updates[rng.choice(["layers.0.moe.experts.7.w_in.weight", "backbone.embeddings.weight", "x"])] = np.zeros(3, np.float32)
    elif kind == "missing-metric":
        del metrics[rng.choice(sorted(metrics))]
    elif kind == "list-metric":
        metrics[rng.choice(["num-examples", "train-loss", "peak-rss-mb"])] = [1.0, 2.0]
    elif kind == "negative-metric":
        metrics[rng.choice(["num-examples", "train-loss", "step-seconds", "bytes-down"])] = -rng.randint(1, 9)
    elif kind == "nan-metric":
        metrics[rng.choice(["train-loss", "step-seconds", "peak-rss-mb"])] = rng.choice([float("nan"), float("inf")])
    elif kind == "rows":
        metrics["num-examples"] = rng.choice([10**6, 10**12])  # more rows than the node declared: a weight grab
    elif kind == "float-rows":
        metrics["num-examples"] = 10.5
    elif kind == "extra-record":
        records["node"] = ConfigRecord({"client-id": "someone-else"})
    elif kind == "routed":
        metrics["routed-tokens"] = rng.choice([[5], [5, 5, 5], [-1, 3], [1.5, 2.0]])
    elif kind == "next-experts":
        request["next-experts"] = rng.choice([[0, 0], [0, 5], [1], [0, 1, 1], [-1, 0]])
    elif kind == "unpaired":  # one factor of a LoRA module without the other
        del updates[rng.choice([LORA_A, LORA_B])]
    elif kind == "lora-rank":  # more than it trained at, none at all, not an integer
        request["lora-rank"] = rng.choice([5, 99, 0, -1, 2.5, True, "3"])
    content = {"metrics": MetricRecord(metrics), "request": ConfigRecord(request), **records}
    if kind == "bf16-stype":
        content["arrays"] = ArrayRecord({key: Array(dtype="bfloat16", shape=(2, 3), stype="numpy.ndarray", data=b"\0" * 12)})
    elif kind != "no-arrays":
        content["arrays"] = to_record(updates)
    return kind, RecordDict(content)


def round_of(strategy_name, replies):
    """(strategy, new global arrays) after one aggregation of `replies` from nodes 1-3 and 99."""
    strategy = make_strategy(load_config(f"conf/{strategy_name}.yaml", "moe.num-experts=2"), num_layers=1)
    budget = load_tiers("conf/devices.yaml")["rpi4"].replace(experts_held=2)
    strategy.nodes = {n: Node(n, f"client-{n}", budget, 100) for n in (1, 2, 3, HOSTILE)}
    strategy.global_arrays = global_arrays()
    strategy.round.sent_arrays = {n: global_arrays() for n in strategy.nodes}
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, from_record(arrays)


@pytest.mark.parametrize("strategy_name", sorted(GOOD))
def test_fuzz_hostile_replies_are_rejected_and_change_nothing(strategy_name):
    goods = [good_reply(strategy_name, 1, 0.01), good_reply(strategy_name, 2, 0.02), good_reply(strategy_name, 3, 0.015)]
    _, reference = round_of(strategy_name, goods)
    rng = random.Random(f"fuzz-{strategy_name}")
    kinds = {}
    for _ in range(120):  # x 6 strategies: 720 hostile replies
        kind, content = hostile_content(strategy_name, rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        strategy, new = round_of(strategy_name, goods + [message(HOSTILE, content)])  # must not raise
        assert [f["node_id"] for f in strategy.round.failures] == [str(HOSTILE)], kind
        assert strategy.round.failures[0]["reason"].startswith(("malformed reply", "rejected reply")), kind
        assert [r.node.node_id for r in strategy.round.replies] == [1, 2, 3], kind
        for key in reference:
            np.testing.assert_array_equal(new[key], reference[key], err_msg=f"{kind} moved {key}")
    assert len(kinds) >= 15  # (nearly) every kind of hostility was drawn


def test_fuzz_hostile_causal_lm_evaluate_replies_are_failures_and_change_nothing():
    """Personalised evaluations of the instruction task: accuracy in [0, 1], loss >= 0, rows a
    count; a hostile one is its node's failure and the aggregate is the good ones' alone."""
    strategy = make_strategy(load_config("conf/ub_smoe.yaml,conf/instruction.yaml", "moe.num-experts=2"), num_layers=1)
    budget = load_tiers("conf/devices-llm.yaml")["rpi4"]
    strategy.nodes = {n: Node(n, f"client-{n}", budget, 100) for n in (1, 2, HOSTILE)}
    good = [message(1, RecordDict({"metrics": MetricRecord({"num-examples": 10, "accuracy": 0.5, "loss": 2.0})})),
            message(2, RecordDict({"metrics": MetricRecord({"num-examples": 30, "accuracy": 0.3, "loss": 3.0})}))]
    rng = random.Random("fuzz-causal-lm-eval")
    for _ in range(60):
        metrics = {"num-examples": 10, "accuracy": 0.9, "loss": 1.0}
        key = rng.choice(["accuracy", "loss", "num-examples"])
        metrics[key] = rng.choice([float("nan"), float("inf"), -1.0, 1.5 if key == "accuracy" else -0.5, [0.5],
                                   *([10**15 + 0.5, 2.0] if key == "num-examples" else [])])
        if rng.random() < 0.2:
            del metrics[rng.choice(sorted(metrics))]
        strategy.round.eval_messages, strategy.round.failures = [], []
        record = strategy.aggregate_evaluate(1, good + [message(HOSTILE, RecordDict({"metrics": MetricRecord(metrics)}))])
        assert [f["node_id"] for f in strategy.round.failures] == [str(HOSTILE)], metrics
        assert record["accuracy-mean"] == pytest.approx((10 * 0.5 + 30 * 0.3) / 40) and record["accuracy-worst"] == 0.3
