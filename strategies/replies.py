"""What the server knows of a node, a train reply once decoded, and the checks every reply
passes before anything in it is used: a reply that fails one is its node's failure, with
the reason, and is never averaged in."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedmoe_app import messages as msg
from fedmoe_app.budgets import DeviceBudget
from fedmoe_app.calibration import ClassStatistics
from fedmoe_app.config import ConfigError
from fedmoe_app.numbers import is_number_in
from fedmoe_app.records import from_record, trained_from
from fedmoe_app.startup import PHASE_METRICS
from fedmoe_app.tasks.base import Metric


@dataclass(frozen=True)
class Node:
    """What the server knows of a node (from its query reply): its stable client id, its
    budget and the number of rows it trains on."""

    node_id: int
    client_id: str
    budget: DeviceBudget
    num_examples: int

    @property
    def tier(self) -> str:
        """The node's device tier."""
        return self.budget.tier


@dataclass
class Reply:
    """A train reply that passed every check, decoded: `arrays` are the tensors the client
    trained (what it was sent plus the updates it sent back)."""

    node: Node
    arrays: dict[str, np.ndarray]
    metrics: MetricRecord
    request: ConfigRecord
    update_rms: float  # root mean square of its updates over every value it trained
    sent_keys: tuple[str, ...] = ()  # the tensors the node was sent (it replies with those it trained)
    gradients: dict[str, np.ndarray] | None = None  # SCAFFOLD: the mean gradient of each tensor of `arrays`


class MalformedReply(ValueError):
    """A reply breaks the message contract; the message says how."""


def examples(reply: Reply) -> int:
    """The local training rows of the client behind a reply."""
    return int(reply.metrics[msg.NUM_EXAMPLES])


def example_weighted(replies: list[Reply], key: str) -> float | None:
    """Example-weighted mean of the train metric `key` over the replies that carry it (None: none does)."""
    replies = [r for r in replies if key in r.metrics]
    if not replies:
        return None
    total = sum(examples(r) for r in replies)
    return sum(float(r.metrics[key]) * examples(r) for r in replies) / max(total, 1)


def train_loss(replies: list[Reply]) -> float:
    """Example-weighted mean task loss of the replies."""
    return example_weighted(replies, msg.TRAIN_LOSS)


def node_from_query(node_id: int, content: RecordDict) -> Node:
    """The Node a query reply describes; MalformedReply if it is not one."""
    try:
        info, budget = content[msg.NODE], content[msg.BUDGET]
        client_id, rows = info[msg.CLIENT_ID], info[msg.NUM_EXAMPLES]
        if not isinstance(client_id, str) or not client_id:
            raise MalformedReply(f"'{msg.CLIENT_ID}' is {client_id!r}; allowed: a non-empty string")
        _check_count(msg.NUM_EXAMPLES, rows)
        return Node(node_id, client_id, DeviceBudget.from_record(dict(budget)), rows)
    except (KeyError, TypeError, ConfigError) as error:
        raise MalformedReply(f"malformed query reply: {error}") from error


# Train metrics every reply carries (numbers >= 0), and those it may carry; a method's own
# are checked by its strategy's `check_reply`.
REQUIRED_TRAIN_METRICS = (msg.TRAIN_LOSS, msg.STEP_SECONDS, msg.PEAK_RSS_MB, msg.BYTES_DOWN, msg.BYTES_UP)
OPTIONAL_TRAIN_METRICS = (msg.SAMPLES_PROCESSED, msg.STEPS, msg.TRAIN_SECONDS, msg.PROXIMAL_TERM, *PHASE_METRICS)


def decode_train_reply(node: Node, content: RecordDict, sent: Mapping[str, np.ndarray],
                       method_metrics: tuple[str, ...] = (), method_requests: tuple[str, ...] = (),
                       with_gradients: bool = False) -> Reply:
    """A train reply checked against what was `sent` to its node: it holds arrays, metrics
    (and an optional request); its tensors are floats, among those sent, in their shapes,
    finite; its rows are an integer from 0 to what the node declared; its metrics numbers;
    no metric or request is one that neither every method nor this one (`method_metrics`,
    `method_requests`, whose values its strategy checks) sends; `with_gradients` (SCAFFOLD):
    it holds a gradient, checked alike, for exactly the tensors it trained. MalformedReply otherwise."""
    allowed = (msg.ARRAYS, msg.METRICS, msg.REQUEST, *((msg.GRADIENTS,) if with_gradients else ()))
    for name in content:
        if name not in allowed:
            raise MalformedReply(f"it holds record '{name}'; allowed: {', '.join(allowed)}")
    if msg.ARRAYS not in content or msg.METRICS not in content:
        raise MalformedReply(f"it holds {sorted(content)}; a train reply needs '{msg.ARRAYS}' and '{msg.METRICS}'")
    metrics, request = content[msg.METRICS], content.get(msg.REQUEST, ConfigRecord())
    known = {msg.NUM_EXAMPLES, *REQUIRED_TRAIN_METRICS, *OPTIONAL_TRAIN_METRICS, *method_metrics}
    unknown = sorted(set(metrics) - known) or sorted(f"request '{k}'" for k in set(request) - set(method_requests))
    if unknown:
        raise MalformedReply(f"it holds {unknown[0]!r}, which this method's clients do not send")
    _check_count(msg.NUM_EXAMPLES, metrics.get(msg.NUM_EXAMPLES), most=node.num_examples)
    for key in REQUIRED_TRAIN_METRICS:
        _check_number(key, metrics.get(key))
    for key in OPTIONAL_TRAIN_METRICS:
        if key in metrics:
            _check_number(key, metrics[key])
    updates = _tensors(content, msg.ARRAYS, sent)
    gradients = None
    if with_gradients:
        if msg.GRADIENTS not in content:
            raise MalformedReply(f"it holds no '{msg.GRADIENTS}' (train.drift-correction is scaffold)")
        gradients = _tensors(content, msg.GRADIENTS, sent)
        if set(gradients) != set(updates):
            different = sorted(set(gradients) ^ set(updates))[0]
            raise MalformedReply(f"its {msg.GRADIENTS} and its {msg.ARRAYS} differ at tensor '{different}'")
    return Reply(node, trained_from(sent, updates), metrics, request, _rms(updates), tuple(sent), gradients)


def _tensors(content: RecordDict, name: str, sent: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Record `name` of a reply, decoded: float tensors, each among those `sent`, in its shape,
    finite; MalformedReply otherwise."""
    try:
        tensors = from_record(content[name])
    except (ValueError, TypeError) as error:
        raise MalformedReply(f"its {name} cannot be decoded: {error}") from error
    where = "" if name == msg.ARRAYS else f" of {name}"
    for key, tensor in tensors.items():
        if key not in sent:
            raise MalformedReply(f"tensor '{key}'{where} was not sent to this node")
        if not np.issubdtype(tensor.dtype, np.floating):
            raise MalformedReply(f"tensor '{key}'{where} has dtype {tensor.dtype}; allowed: a float dtype")
        if tensor.shape != sent[key].shape:
            raise MalformedReply(f"tensor '{key}'{where} has shape {tensor.shape}; the one sent {sent[key].shape}")
        if not np.isfinite(tensor).all():
            raise MalformedReply(f"tensor '{key}'{where} holds NaN or Inf")
    return tensors


def check_eval_metrics(content: RecordDict, expected: Sequence[Metric]) -> tuple[int, dict[str, float]]:
    """(rows, the `expected` metrics' values) of an evaluate reply; MalformedReply if the rows
    are not a count or (with rows) a metric is not a number in its range."""
    if msg.METRICS not in content:
        raise MalformedReply(f"it holds {sorted(content)}; an evaluate reply needs '{msg.METRICS}'")
    metrics = content[msg.METRICS]
    rows = _check_count(msg.NUM_EXAMPLES, metrics.get(msg.NUM_EXAMPLES))
    values = {}
    for metric in expected:
        value = metrics.get(metric.name)
        if rows and not metric.check(value):
            raise MalformedReply(f"metric '{metric.name}' is {value!r}; allowed: a number in "
                                 f"[{metric.low:g}, {metric.high:g}]")
        values[metric.name] = float(value) if rows else math.nan
    return rows, values


def decode_statistics(node: Node, content: RecordDict, num_classes: int, dim: int) -> ClassStatistics:
    """The per-class feature moments of a calibrate reply: counts [C] of whole numbers summing
    to at most the rows the node declared, a mean [C, D] and symmetric covariances [C, D, D],
    all finite. MalformedReply otherwise."""
    if set(content) != {msg.ARRAYS}:
        raise MalformedReply(f"it holds {sorted(content)}; a calibrate reply holds only '{msg.ARRAYS}'")
    try:
        arrays = from_record(content[msg.ARRAYS])
    except (ValueError, TypeError) as error:
        raise MalformedReply(f"its arrays cannot be decoded: {error}") from error
    shapes = {msg.FEATURE_COUNT: (num_classes,), msg.FEATURE_MEAN: (num_classes, dim),
              msg.FEATURE_COV: (num_classes, dim, dim)}
    if set(arrays) != set(shapes):
        raise MalformedReply(f"it holds tensors {sorted(arrays)}; allowed: {sorted(shapes)}")
    for key, shape in shapes.items():
        if arrays[key].shape != shape or not np.issubdtype(arrays[key].dtype, np.floating):
            raise MalformedReply(f"tensor '{key}' is {arrays[key].dtype} {arrays[key].shape}; allowed: float {shape}")
        if not np.isfinite(arrays[key]).all():
            raise MalformedReply(f"tensor '{key}' holds NaN or Inf")
    count = arrays[msg.FEATURE_COUNT].astype(np.float64)
    if (count < 0).any() or (count != np.round(count)).any() or count.sum() > node.num_examples:
        raise MalformedReply(f"tensor '{msg.FEATURE_COUNT}' is {count.tolist()}; allowed: whole numbers >= 0 "
                             f"summing to <= {node.num_examples} (the rows the node declared)")
    cov = arrays[msg.FEATURE_COV].astype(np.float64)
    if not np.allclose(cov, cov.transpose(0, 2, 1), atol=1e-5):
        raise MalformedReply(f"tensor '{msg.FEATURE_COV}' is not symmetric")
    return ClassStatistics(count, arrays[msg.FEATURE_MEAN].astype(np.float64), cov)


def _rms(updates: Mapping[str, np.ndarray]) -> float:
    """Root mean square over every value of `updates` (comparable across replies that hold
    different tensors)."""
    size = sum(u.size for u in updates.values())
    return math.sqrt(sum(float(np.dot(u.ravel(), u.ravel())) for u in updates.values()) / size) if size else 0.0


def outliers(rms: Mapping[int, float], ratio: float) -> dict[int, str]:
    """Node id -> reason, for updates whose RMS exceeds `ratio` times the median of the
    others' (needs 3 or more replies; `ratio` 0 checks nothing)."""
    found = {}
    if ratio <= 0 or len(rms) < 3:
        return found
    for node_id, value in rms.items():
        median = float(np.median([v for n, v in rms.items() if n != node_id]))
        if value > ratio * median:
            found[node_id] = (f"update RMS {value:.3g} is over federation.max-update-ratio ({ratio:g}) times "
                              f"the median of the round's other replies ({median:.3g})")
    return found


def _check_number(key: str, value: Any) -> None:
    if not is_number_in(value, 0.0):
        raise MalformedReply(f"metric '{key}' is {value!r}; allowed: a finite number >= 0")


def _check_count(key: str, value: Any, most: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0 or (most is not None and value > most):
        limit = f" and <= {most} (the rows the node declared)" if most is not None else ""
        raise MalformedReply(f"metric '{key}' is {value!r}; allowed: an integer >= 0{limit}")
    return value
