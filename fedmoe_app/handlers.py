"""What a ClientApp does with a train or evaluate message, as functions of the message's
content and the node's node_config, so that the ClientApp process or a node worker
(`fedmoe_app.node_worker`) can run them alike."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict

from fedmoe_app import faults
from fedmoe_app import messages as msg
from fedmoe_app.client import client_task
from fedmoe_app.records import from_record, gradient_wire_dtype, record_nbytes, to_record, updates_from


def train_reply(content: RecordDict, node_config: Mapping[str, Any], origin: float | None = None) -> RecordDict:
    """Train the received tensors on local data; the reply holds the updates of only what
    was trained (trained minus received), in the run's wire dtype. `origin`: when the
    process that received the message started (see `startup.begin_message`)."""
    config = content[msg.CONFIG]
    task = client_task(config[msg.RUN_CONFIG], node_config, origin)
    fault = faults.fault_of(task.config, node_config, int(config[msg.SERVER_ROUND]))
    faults.before_training(fault, task.config)
    received = from_record(content[msg.ARRAYS])
    correction = from_record(content[msg.CORRECTION]) if msg.CORRECTION in content else None
    arrays, metrics, request, gradients = task.train(received, config, correction)
    updates = updates_from(arrays, received)
    wire = task.config.federation.wire_dtype
    reply = RecordDict({msg.ARRAYS: to_record(faults.garbled(updates) if fault == "garbage" else updates, wire)})
    if gradients is not None:
        reply[msg.GRADIENTS] = to_record(gradients, gradient_wire_dtype(wire))
    metrics[msg.BYTES_DOWN] = sum(record_nbytes(content[name]) for name in (msg.ARRAYS, msg.CORRECTION) if name in content)
    metrics[msg.BYTES_UP] = sum(record_nbytes(reply[name]) for name in (msg.ARRAYS, msg.GRADIENTS) if name in reply)
    reply[msg.METRICS], reply[msg.REQUEST] = MetricRecord(metrics), ConfigRecord(request)
    return reply


def evaluate_reply(content: RecordDict, node_config: Mapping[str, Any], origin: float | None = None) -> RecordDict:
    """Evaluate the personalised model on this node's held-out slice."""
    config = content[msg.CONFIG]
    task = client_task(config[msg.RUN_CONFIG], node_config, origin)
    return RecordDict({msg.METRICS: MetricRecord(task.evaluate(from_record(content[msg.ARRAYS]), config))})


def calibrate_reply(content: RecordDict, node_config: Mapping[str, Any], origin: float | None = None) -> RecordDict:
    """Per-class moments of the global model's head-input features on local training rows
    (head calibration), in float32 whatever the wire dtype: a covariance needs the precision."""
    config = content[msg.CONFIG]
    task = client_task(config[msg.RUN_CONFIG], node_config, origin)
    stats = task.feature_statistics(from_record(content[msg.ARRAYS]))
    arrays = {msg.FEATURE_COUNT: stats.count, msg.FEATURE_MEAN: stats.mean, msg.FEATURE_COV: stats.cov}
    return RecordDict({msg.ARRAYS: to_record(arrays, "fp32")})


HANDLERS: dict[str, Callable[..., RecordDict]] = {MessageType.TRAIN: train_reply, MessageType.EVALUATE: evaluate_reply,
                                                  msg.CALIBRATE: calibrate_reply}
