"""Head calibration (CCVR, calibration.method: ccvr): the moments clients send, their pooling,
the virtual features and the refit, checked against numpy and a row-by-row recomputation; the
server's checks of a calibrate reply; and a whole run of every strategy on an in-process grid."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from conftest import InProcessGrid
from fedmoe_app import messages as msg
from fedmoe_app.calibration import (ClassStatistics, calibrated_head, fit_head, pooled, statistics_of,
                                    virtual_features)
from fedmoe_app.client import ClientTask
from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import ConfigError, RunConfig, defaults, load_config
from fedmoe_app.methods import method_class
from fedmoe_app.model import load_state, num_layers, state_to_numpy
from fedmoe_app.records import from_record, to_record
from strategies import STRATEGIES, make_strategy
from strategies.replies import MalformedReply, Node, decode_statistics

NUM_NODES = 3


def test_statistics_are_numpys_per_class_mean_and_covariance():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    labels[labels == 2] = 0
    labels[7] = 2  # class 2 has one row: its covariance is zero; class 3 has none
    stats = statistics_of(features, labels, 4)
    assert stats.count.tolist() == [np.sum(labels == c) for c in range(4)]
    for c in (0, 1):
        np.testing.assert_allclose(stats.mean[c], features[labels == c].mean(0))
        np.testing.assert_allclose(stats.cov[c], np.cov(features[labels == c], rowvar=False))
    np.testing.assert_allclose(stats.mean[2], features[7])
    assert not stats.cov[2].any() and not stats.mean[3].any() and not stats.cov[3].any()


def test_pooled_moments_are_those_of_all_rows():
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(60, 4)) + 3.0, rng.integers(0, 3, 60)
    cuts = [0, 1, 9, 30, 60]  # parts of 1, 8, 21 and 30 rows: some lack classes, one has a single row
    parts = [statistics_of(features[a:b], labels[a:b], 3) for a, b in zip(cuts, cuts[1:])]
    whole, merged = statistics_of(features, labels, 3), pooled(parts)
    np.testing.assert_allclose(merged.count, whole.count)
    np.testing.assert_allclose(merged.mean, whole.mean, atol=1e-12)
    np.testing.assert_allclose(merged.cov, whole.cov, atol=1e-12)


def test_virtual_features_follow_the_moments_and_skip_empty_classes():
    mean = np.array([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [-3.0, 1.0, 2.0]])
    singular = np.outer([1.0, 2.0, 0.0], [1.0, 2.0, 0.0])  # rank 1: no Cholesky factor
    cov = np.stack([np.diag([1.0, 0.25, 4.0]), np.zeros((3, 3)), singular])
    x, y = virtual_features(ClassStatistics(np.array([10.0, 0.0, 5.0]), mean, cov), 20000, seed=0)
    assert x.shape == (40000, 3) and sorted(set(y.tolist())) == [0, 2] and (y == 0).sum() == 20000
    for c in (0, 2):
        np.testing.assert_allclose(x[y == c].mean(0), mean[c], atol=0.05)
        np.testing.assert_allclose(np.cov(x[y == c], rowvar=False), cov[c], atol=0.1)
    same, _ = virtual_features(ClassStatistics(np.array([10.0, 0.0, 5.0]), mean, cov), 20000, seed=0)
    np.testing.assert_array_equal(x, same)


def test_fit_head_separates_classes_and_starts_from_the_head_given():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(-2.0, 1.0, (200, 2)), rng.normal(2.0, 1.0, (200, 2))]).astype(np.float32)
    y = np.repeat([0, 1], 200)
    weight, bias = np.array([[1.0, 1.0], [-1.0, -1.0]], np.float32), np.zeros(2, np.float32)  # every row wrong
    assert ((x @ weight.T + bias).argmax(1) == y).mean() < 0.05
    untouched = fit_head(weight, bias, x, y, steps=0, lr=0.1)
    np.testing.assert_array_equal(untouched[0], weight)
    fitted_w, fitted_b = fit_head(weight, bias, x, y, steps=200, lr=0.1)
    assert ((x @ fitted_w.T + fitted_b).argmax(1) == y).mean() > 0.95


def calibrate_content(count, mean, cov) -> RecordDict:
    arrays = {msg.FEATURE_COUNT: np.asarray(count, np.float32), msg.FEATURE_MEAN: np.asarray(mean, np.float32),
              msg.FEATURE_COV: np.asarray(cov, np.float32)}
    return RecordDict({msg.ARRAYS: ArrayRecord({k: v for k, v in to_record(arrays).items()})})


@pytest.mark.parametrize("change, error", [
    ({"mean": np.full((2, 3), np.nan)}, "holds NaN"),
    ({"mean": np.zeros((2, 4))}, "allowed: float \\(2, 3\\)"),
    ({"count": [5.0, 6.0]}, "summing to <= 10"),
    ({"count": [1.5, 2.0]}, "whole numbers"),
    ({"count": [-1.0, 2.0]}, "whole numbers"),
    ({"cov": np.stack([np.triu(np.ones((3, 3)))] * 2)}, "not symmetric"),
])
def test_a_malformed_calibrate_reply_is_refused(change, error):
    node = Node(1, "client-1", load_tiers(defaults(RunConfig).devices.file)["rpi4"], num_examples=10)
    good = {"count": [4.0, 6.0], "mean": np.zeros((2, 3)), "cov": np.stack([np.eye(3)] * 2)}
    decoded = decode_statistics(node, calibrate_content(**good), 2, 3)
    assert decoded.count.tolist() == [4.0, 6.0]
    with pytest.raises(MalformedReply, match=error):
        decode_statistics(node, calibrate_content(**{**good, **change}), 2, 3)
    extra = calibrate_content(**good)
    extra[msg.METRICS] = extra[msg.ARRAYS]
    with pytest.raises(MalformedReply, match="holds only"):
        decode_statistics(node, extra, 2, 3)


def test_calibration_settings_are_checked():
    with pytest.raises(ConfigError, match="'calibration.method' is 'ccv'; allowed: none, ccvr"):
        load_config("conf/fft_moe.yaml", "calibration.method=ccv")
    with pytest.raises(ConfigError, match="'calibration.virtual-per-class' must be >= 1"):
        load_config("conf/fft_moe.yaml", "calibration.virtual-per-class=0")
    with pytest.raises(ConfigError, match="'calibration.lr' is 0.0; allowed: > 0"):
        load_config("conf/fft_moe.yaml", "calibration.lr=0")


class FailingCalibrateGrid(InProcessGrid):
    """Node 101 raises on calibrate messages (as a node that dies then)."""

    def answer(self, message):
        if message.metadata.message_type == msg.CALIBRATE and message.metadata.dst_node_id == 101:
            raise RuntimeError("node lost")
        return super().answer(message)


def tiny_config(strategy, data_dir, method):
    return load_config(f"conf/{strategy}.yaml", (
        f"model.backbone=tiny-bert data.data-dir={data_dir} data.max-train-rows=240 moe.num-experts=4 "
        f"moe.expert-hidden=8 rounds=1 eval.client=false federation.min-nodes={NUM_NODES} "
        f"federation.wire-dtype=fp32 train.precision=fp32 calibration.method={method} calibration.steps=40"))


def run(config, grid):
    records = []
    strategy = make_strategy(config, num_layers(config), on_round=records.append)
    arrays = state_to_numpy(method_class(config.strategy).global_model(config, 4))
    result = strategy.start(grid, to_record(arrays), num_rounds=config.rounds)
    return from_record(result.arrays), records[-1]


def expected_moments(config, arrays, partition):
    """A node's moments recomputed row by row (no padding) with the global model."""
    task = ClientTask(config, {"partition-id": partition, "num-partitions": NUM_NODES})
    model = method_class(config.strategy).global_model(config, 4)
    load_state(model, arrays)
    model.eval()
    with torch.no_grad():
        features = np.stack([model.features(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0].numpy()
                             for ids in task.train_set.input_ids])
    return statistics_of(features, np.array(task.train_set.labels), 4)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_calibrated_run_refits_only_the_head_from_every_nodes_moments(strategy, ag_news_dir, server_identity):
    plain, _ = run(tiny_config(strategy, ag_news_dir, "none"), InProcessGrid(NUM_NODES))
    config = tiny_config(strategy, ag_news_dir, "ccvr")
    calibrated, record = run(config, InProcessGrid(NUM_NODES))
    assert set(calibrated) == set(plain)
    for key in (k for k in plain if not k.startswith("head.")):
        np.testing.assert_array_equal(calibrated[key], plain[key], err_msg=key)
    parts = [expected_moments(config, plain, p) for p in range(NUM_NODES)]
    weight, bias = calibrated_head(plain["head.weight"], plain["head.bias"], parts, config.calibration.virtual_per_class,
                                   config.calibration.steps, config.calibration.lr, seed=config.seed)
    # The moments recomputed row by row differ from the batched ones in their last bits; the
    # refit (40 Adam steps on features drawn with them) carries that to ~1e-4 in a few weights
    # (heads are ~0.3 in size: a wrong refit is off by 1e-2 or more).
    np.testing.assert_allclose(calibrated["head.weight"], weight, atol=5e-4)
    np.testing.assert_allclose(calibrated["head.bias"], bias, atol=5e-4)
    assert not np.allclose(calibrated["head.weight"], plain["head.weight"], atol=1e-3)
    assert record["calibration"] == {"nodes": NUM_NODES, "rows_by_class": pooled(parts).count.astype(int).tolist()}
    assert "calibration" in record["phase_seconds"] and record["failures"] == 0


def test_a_node_lost_during_calibration_is_counted_and_the_others_refit_the_head(ag_news_dir, server_identity):
    config = tiny_config("head_only", ag_news_dir, "ccvr")
    plain, _ = run(tiny_config("head_only", ag_news_dir, "none"), InProcessGrid(NUM_NODES))
    calibrated, record = run(config, FailingCalibrateGrid(NUM_NODES))
    parts = [expected_moments(config, plain, p) for p in (1, 2)]
    weight, _ = calibrated_head(plain["head.weight"], plain["head.bias"], parts, config.calibration.virtual_per_class,
                                config.calibration.steps, config.calibration.lr, seed=config.seed)
    np.testing.assert_allclose(calibrated["head.weight"], weight, atol=1e-4)
    assert record["calibration"]["nodes"] == 2 and record["failures"] == 1
    assert "node lost" in record["failed_nodes"][0]["reason"]


def test_the_bench_measure_on_a_finished_run_equals_a_calibrated_run(ag_news_dir, server_identity, tmp_path):
    import json

    from safetensors.numpy import save_file

    from bench.calibration import calibrate_run
    from fedmoe_app.config import config_to_yaml
    from fedmoe_app.server import GlobalEvaluator

    plain_config = tiny_config("fft_moe", ag_news_dir, "none")
    plain, _ = run(plain_config, InProcessGrid(NUM_NODES))
    (tmp_path / "config.yaml").write_text(config_to_yaml(plain_config))
    save_file(plain, str(tmp_path / "adapter.safetensors"))
    (tmp_path / "summary.json").write_text(json.dumps({"final_global_accuracy": 0.25, "final_global_recall": [1, 0, 0, 0]}))
    measured = calibrate_run(tmp_path, NUM_NODES)

    config = tiny_config("fft_moe", ag_news_dir, "ccvr")
    calibrated, _ = run(config, InProcessGrid(NUM_NODES))
    scored = GlobalEvaluator(config, method_class("fft_moe").global_model(config, 4))(config.rounds, to_record(calibrated))
    assert measured["test_rows"] == scored["num-examples"] == config.eval.final_test_samples
    assert abs(measured["calibrated_accuracy"] - scored["accuracy"]) <= 1 / measured["test_rows"]
    assert measured["accuracy"] == 0.25 and len(measured["calibrated_recall"]) == 4


def test_the_calibration_report_pairs_by_seed():
    from bench.calibration import table

    def run_(before, after, recall_after):
        return {"accuracy": before, "recall": [before, 0.1], "calibrated_accuracy": after,
                "calibrated_recall": recall_after}

    measured = {"fft_moe": {0: run_(0.70, 0.86, [0.9, 0.8]), 1: run_(0.72, 0.88, [0.9, 0.6])},
                "head_only": {0: run_(0.78, 0.87, [0.9, 0.7]), 1: run_(0.80, 0.86, [0.9, 0.7])}}
    text = "\n".join(table(measured))
    # fft_moe: gains +16, +16; lowest recall 10 before, 80 and 60 after (mean 70, std 14.1)
    assert "| fft_moe | 2 | 71.0 ± 1.4 | 87.0 ± 1.4 | +16.0 (" in text and "| 10.0 ± 0.0 | 70.0 ± 14.1 |" in text
    # calibrated fft_moe - head_only: -1, +2 -> mean +0.5
    assert "| fft_moe | head_only | +0.5 (" in text and "seeds -1.0, +2.0)" in text
