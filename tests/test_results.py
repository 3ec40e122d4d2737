"""results.py / plots.py: the results directory of a run, on hand-made round records."""

import json
import math
import os

import numpy as np
import pytest

from fedmoe_app.results import RunResults, best_round, load_adapter, this_process

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TIERS = ("rpi4", "jetson-orin")
CONFIG_YAML = "strategy: fft_moe\nrounds: 3\nmoe:\n  num-experts: 4  # comment kept\n"


def make_rounds(num_rounds=3, num_layers=2, num_experts=4, experts=True):
    """Round 0 (global eval only) then `num_rounds` full round records."""
    rng = np.random.default_rng(0)
    rounds = [{"round": 0, "wall_time_s": 0.5, "global_accuracy": 0.25, "global_loss": 1.39}]
    for r in range(1, num_rounds + 1):
        utilisation = rng.dirichlet(np.ones(num_experts), size=num_layers).tolist() if experts else None
        rounds.append({
            "round": r,
            "wall_time_s": 10.0 * r,
            "global_accuracy": None if r == 1 else 0.3 + 0.1 * r,
            "global_loss": None if r == 1 else 1.2 - 0.1 * r,
            "client_accuracy": {tier: 0.3 + 0.1 * r + 0.02 * i for i, tier in enumerate(TIERS)},
            "client_accuracy_mean": 0.31 + 0.1 * r,
            "client_accuracy_worst": 0.3 + 0.1 * r,
            "train_loss": 1.0 / r,
            "expert_utilisation": utilisation,
            "bytes_down": {"101": 1000 * r, "102": 2000},
            "bytes_up": {"101": 900, "102": 1800},
            "step_seconds": {tier: 0.1 * (i + 1) for i, tier in enumerate(TIERS)},
            "num_replies": 2,
            "failures": 0,
        })
    return rounds


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5000, (path, len(data))


def test_config_written_verbatim(tmp_path):
    results = RunResults(tmp_path / "a" / "run", CONFIG_YAML)
    assert results.run_dir == tmp_path / "a" / "run"
    assert (results.run_dir / "config.yaml").read_text() == CONFIG_YAML


def test_rounds_logged_one_line_each_in_order(tmp_path):
    results = RunResults(tmp_path / "run", CONFIG_YAML)
    rounds = make_rounds()
    for record in rounds:
        results.log_round(record)
    lines = (results.run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(rounds)
    assert [json.loads(line) for line in lines] == rounds
    assert results.rounds() == rounds


def test_non_finite_floats_logged_as_null(tmp_path):
    results = RunResults(tmp_path / "run", CONFIG_YAML)
    results.log_round({"round": 1, "train_loss": float("nan"), "client_accuracy": {"rpi4": math.inf},
                       "expert_utilisation": [[np.float32("nan"), 1.0]], "global_loss": np.float64(0.5)})
    results.log_round({"round": 2, "train_loss": 0.5})
    lines = (results.run_dir / "metrics.jsonl").read_text().splitlines()
    assert "NaN" not in lines[0] and "Infinity" not in lines[0]
    first = json.loads(lines[0])
    assert first["train_loss"] is None and first["client_accuracy"] == {"rpi4": None}
    assert first["expert_utilisation"] == [[None, 1.0]] and first["global_loss"] == 0.5
    assert [r["round"] for r in results.rounds()] == [1, 2]


def test_finished_run_is_never_overwritten(tmp_path):
    results = RunResults(tmp_path / "run", CONFIG_YAML)
    results.log_round(make_rounds()[0])
    with pytest.raises(FileExistsError, match="metrics.jsonl"):
        RunResults(tmp_path / "run", "other: config\n")
    assert (tmp_path / "run" / "config.yaml").read_text() == CONFIG_YAML
    assert len(results.rounds()) == 1


def test_summary_round_trips(tmp_path):
    results = RunResults(tmp_path / "run", CONFIG_YAML)
    summary = {"strategy": "fft_moe", "final_global_accuracy": 0.9, "best_global_accuracy": None,
               "final_client_accuracy_by_tier": {"rpi4": 0.8, "jetson-orin": 0.85}, "bytes_up_total": 12345}
    path = results.write_summary(summary)
    assert path == results.run_dir / "summary.json"
    assert json.loads(path.read_text()) == summary
    assert results.write_summary({"loss": float("nan")}).read_text().strip() == '{\n  "loss": null\n}'


def test_adapter_round_trips_exactly(tmp_path):
    results = RunResults(tmp_path / "run", CONFIG_YAML)
    rng = np.random.default_rng(1)
    arrays = {
        "layers.0.moe.router.weight": rng.standard_normal((4, 8)).astype(np.float32),
        "layers.0.moe.experts.3.w_in.weight": rng.standard_normal((8, 16)).astype(np.float32).T,  # not contiguous
        "classifier.bias": rng.standard_normal(4).astype(np.float64),
        "step": np.array([7], dtype=np.int64),
        "half": rng.standard_normal((2, 3)).astype(np.float16),
    }
    metadata = {"strategy": "fft_moe", "backbone": "tiny-bert"}
    path = results.save_adapter(arrays, metadata)
    assert path == results.run_dir / "adapter.safetensors"
    loaded, loaded_metadata = load_adapter(path)
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(loaded[name], array)
    assert loaded_metadata == metadata


def test_write_plots_with_experts(tmp_path):
    results = RunResults(tmp_path / "run", CONFIG_YAML)
    for record in make_rounds():
        results.log_round(record)
    written = results.write_plots()
    assert written == [results.run_dir / "accuracy.png", results.run_dir / "expert_utilisation.png"]
    for path in written:
        assert_png(path)


def test_write_plots_without_experts_writes_accuracy_only(tmp_path):
    results = RunResults(tmp_path / "run", CONFIG_YAML)
    for record in make_rounds(experts=False):
        results.log_round(record)
    assert results.write_plots() == [results.run_dir / "accuracy.png"]
    assert_png(results.run_dir / "accuracy.png")
    assert not (results.run_dir / "expert_utilisation.png").exists()


def test_the_best_round_is_the_first_highest_global_accuracy_after_training_began():
    rounds = [{"round": 0, "global_accuracy": 0.95}, {"round": 1, "global_accuracy": 0.6},
              {"round": 2, "global_accuracy": None}, {"round": 3, "global_accuracy": 0.8},
              {"round": 4, "global_accuracy": float("nan")}, {"round": 5, "global_accuracy": 0.8}]
    assert best_round(rounds) == (3, 0.8)  # round 0 (before training), None and NaN are not candidates
    assert best_round(rounds[:1]) is None
    losses = [{"round": 0, "global_loss": 0.1}, {"round": 1, "global_loss": 0.5}, {"round": 2, "global_loss": 0.4},
              {"round": 3, "global_loss": 0.4}]
    assert best_round(losses, "loss", higher_is_better=False) == (2, 0.4)


@pytest.mark.parametrize("num_rounds,num_layers,num_experts", [(1, 2, 4), (8, 6, 16)])
def test_plots_single_round_and_large_grid(tmp_path, num_rounds, num_layers, num_experts):
    results = RunResults(tmp_path / "run", CONFIG_YAML)
    for record in make_rounds(num_rounds, num_layers, num_experts)[1:]:  # no round 0: a lone round
        results.log_round(record)
    for path in results.write_plots():
        assert_png(path)


def test_a_stopped_run_stays_stopped_and_counts_the_rounds_its_server_still_completes(tmp_path):
    results = RunResults(tmp_path / "run", "rounds: 8\n")
    results.set_status("running", last_round=2, rounds=8, server=this_process())
    assert results.status()["server"]["pid"] == os.getpid() and results.writer_running()
    results.set_status("stopped", reason="Ctrl-C", last_round=2, rounds=8)
    results.set_status("running", last_round=3, rounds=8, server=this_process())  # the ServerApp had not ended yet
    assert results.status() == {"status": "stopped", "reason": "Ctrl-C", "last_round": 3, "rounds": 8}
    results.set_status("complete", last_round=8, rounds=8)
    assert results.status()["status"] == "stopped" and results.status()["last_round"] == 8
