"""The wire codec (`federation.wire-dtype`): tensors travel in fp32, fp16 or bf16 and are
decoded to float32; clients send updates, the server adds them to its float32 global
model and aggregates in float32. References are NumPy's and torch's own conversions."""

from unittest.mock import Mock

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from fedmoe_app.config import load_config
from fedmoe_app.records import from_record, record_nbytes, to_record, trained_from, updates_from
from strategies import make_strategy
from fedmoe_app.budgets import load_tiers
from strategies.replies import Node

KEY = "backbone.encoder.layer.0.attention.self.query.lora_A.default.weight"


def bf16(a: np.ndarray) -> np.ndarray:
    """torch's own float32 -> bfloat16 -> float32 conversion (the reference)."""
    return torch.from_numpy(np.asarray(a, np.float32)).to(torch.bfloat16).float().numpy()


def fp16(a: np.ndarray) -> np.ndarray:
    """NumPy's own float32 -> float16 -> float32 conversion (the reference)."""
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


REFERENCE = {"fp32": lambda a: np.asarray(a, np.float32), "fp16": fp16, "bf16": bf16}


def sample_arrays(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layers.0.moe.experts.3.w_in.weight": (rng.standard_normal((64, 32)) * 0.02).astype(np.float32),
        "head.weight": rng.standard_normal((4, 16)).astype(np.float32) * np.logspace(-6, 4, 16, dtype=np.float32),
        "transposed": rng.standard_normal((8, 5)).astype(np.float32).T,  # not C-contiguous
        "float64": rng.standard_normal(7),
        "specials": np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30], np.float32),
        "counts": np.arange(6, dtype=np.int64),
    }


@pytest.mark.parametrize("wire", ["fp32", "fp16", "bf16"])
def test_round_trip_matches_numpy_and_torch_conversions(wire):
    arrays = sample_arrays()
    decoded = from_record(to_record(arrays, wire))
    assert set(decoded) == set(arrays)
    for name, array in arrays.items():
        if name == "counts":  # non-float arrays travel untouched
            assert decoded[name].dtype == np.int64
            np.testing.assert_array_equal(decoded[name], array)
            continue
        assert decoded[name].dtype == np.float32 and decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], REFERENCE[wire](array))  # NaN and Inf pass through


def test_16_bit_wire_halves_the_bytes():
    arrays = {f"t{i}": np.random.default_rng(i).standard_normal((256, 128)).astype(np.float32) for i in range(3)}
    n = sum(a.size for a in arrays.values())
    nbytes = {wire: record_nbytes(to_record(arrays, wire)) for wire in ("fp32", "fp16", "bf16")}
    header = 256 * len(arrays)  # at most, for NumPy's .npy header of each array
    assert 4 * n <= nbytes["fp32"] <= 4 * n + header
    assert 2 * n <= nbytes["fp16"] <= 2 * n + header
    assert nbytes["bf16"] == 2 * n  # the raw 16-bit payload, no header
    assert nbytes["fp16"] / nbytes["fp32"] == pytest.approx(0.5, abs=1e-3)


def test_bfloat16_array_survives_flower_serialisation():
    arrays = sample_arrays()
    content = RecordDict({"arrays": to_record(arrays, "bf16"), "config": ConfigRecord({"x": 1})})
    expected = from_record(content["arrays"])
    # Flower's protobuf serde
    proto = ProtoRecordDict.FromString(recorddict_to_proto(content).SerializeToString())
    via_proto = recorddict_from_proto(proto)["arrays"]
    # Flower's object store path (deflate each object, inflate the tree), as messages travel in 1.41
    objects = get_all_nested_objects(content)
    contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
    via_store = inflate_object_from_contents(content.object_id, contents)["arrays"]
    for record in (via_proto, via_store):
        assert record["head.weight"].dtype == "bfloat16"
        assert {a.stype for name, a in record.items() if name != "counts"} == {"raw"}
        decoded = from_record(record)
        for name in arrays:
            np.testing.assert_array_equal(decoded[name], expected[name])


def test_fp16_overflow_names_the_tensor_and_the_config_key():
    arrays = {"head.weight": np.array([1.0, -70000.0], np.float32)}
    with pytest.raises(ValueError, match=r"'head.weight' has max \|value\| 70000.*federation.wire-dtype.*bf16 or fp32"):
        to_record(arrays, "fp16")
    np.testing.assert_array_equal(from_record(to_record(arrays, "bf16"))["head.weight"], bf16(arrays["head.weight"]))
    np.testing.assert_array_equal(from_record(to_record(arrays, "fp32"))["head.weight"], arrays["head.weight"])
    # 65519 rounds to fp16's largest finite value (65504), 65520 to infinity
    assert from_record(to_record({"a": np.array([65519.0], np.float32)}, "fp16"))["a"][0] == 65504.0
    with pytest.raises(ValueError, match="'a' has max"):
        to_record({"a": np.array([65520.0], np.float32)}, "fp16")


def send_round(global_arrays, delta, wire):
    """One round through the codec: values down, the client's change up as an update; what
    the server reconstructs, and what the client had trained."""
    received = from_record(to_record(global_arrays, wire))
    trained = {k: (received[k] + delta[k]).astype(np.float32) for k in received}
    reply = from_record(to_record(updates_from(trained, received), wire))
    return trained_from(global_arrays, reply), trained, received


@pytest.mark.parametrize("wire,rel", [("fp32", 0.0), ("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_server_adds_the_update_to_its_float32_global_model(wire, rel):
    rng = np.random.default_rng(1)
    global_arrays = {KEY: (rng.standard_normal((32, 16)) * 0.02).astype(np.float32)}
    delta = {KEY: (rng.uniform(1e-4, 2e-4, (32, 16)) * rng.choice([-1, 1], (32, 16))).astype(np.float32)}
    server, trained, received = send_round(global_arrays, delta, wire)
    update = trained[KEY].astype(np.float64) - received[KEY]
    expected = global_arrays[KEY] + update  # the float32 global model moved by the client's change
    assert server[KEY].dtype == np.float32
    # only the update is rounded by the wire (plus float32 rounding of the sum)
    bound = rel * np.abs(update) + 2.0**-23 * np.abs(expected)
    assert np.all(np.abs(server[KEY] - expected) <= bound)


def test_bf16_update_keeps_a_small_change_that_values_would_lose():
    weight = np.array([0.02], np.float32)
    for change in (1e-4, 4e-5):
        server, trained, received = send_round({KEY: weight}, {KEY: np.array([change], np.float32)}, "bf16")
        # sent as an update, the change arrives to within 2^-8 of itself ...
        assert abs((server[KEY] - weight)[0] - change) <= change * 2.0**-8
        # ... sent as a value it would not: bf16 steps by 1.2e-4 near 0.02 (8-bit mantissa)
        value_moved = bf16(trained[KEY]) - weight
        assert abs(value_moved[0] - change) > 0.3 * change
    assert bf16(trained[KEY])[0] == received[KEY][0]  # 4e-5: as a value the change vanishes entirely


@pytest.fixture
def task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 7, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def reply(node_id, updates, wire, examples):
    message = Mock()
    message.has_error.return_value = False
    message.metadata.src_node_id = node_id
    message.content = RecordDict({"arrays": to_record(updates, wire),
                                  "metrics": MetricRecord({"num-examples": examples, "train-loss": 1.0, "step-seconds": 0.1,
                                                           "peak-rss-mb": 1.0, "bytes-down": 8, "bytes-up": 8})})
    return message


def test_strategy_sends_values_in_the_wire_dtype_and_aggregates_updates_in_float32(task_identity):
    strategy = make_strategy(load_config("conf/fedavg_lora.yaml", "federation.wire-dtype=bf16"), num_layers=1)
    strategy.nodes = {n: Node(n, f"client-{n}", load_tiers("conf/devices.yaml")["rpi4"], 100) for n in (1, 2)}
    strategy.global_arrays = {KEY: np.full(4, 0.02, np.float32)}
    strategy.round.sent_arrays = {n: strategy.arrays_for(strategy.nodes[n], 1) for n in (1, 2)}
    down = strategy._message(strategy.nodes[1], 1, MessageType.TRAIN, ConfigRecord(), strategy.round.sent_arrays[1])
    assert down.content["arrays"][KEY].dtype == "bfloat16"
    np.testing.assert_array_equal(from_record(down.content["arrays"])[KEY], bf16(strategy.global_arrays[KEY]))
    u1, u2 = np.full(4, 1e-4, np.float32), np.full(4, -3e-4, np.float32)
    arrays, _ = strategy.aggregate_train(1, [reply(1, {KEY: u1}, "bf16", 1), reply(2, {KEY: u2}, "bf16", 3)])
    new = from_record(arrays)[KEY]
    assert new.dtype == np.float32 and strategy.global_arrays[KEY].dtype == np.float32
    expected = 0.02 + (1 * bf16(u1) + 3 * bf16(u2)) / 4  # global + example-weighted mean of the sent updates
    np.testing.assert_allclose(new, expected, rtol=0, atol=2e-9)
