"""End to end: real `flwr run` simulations (local SuperLink, Ray backend) of each strategy.
(MiniLM, Ctrl-C and resume through `make run`: tests/test_readme.py.)"""

import json
from pathlib import Path

import pytest

from bench.simulation import LocalSimulation
from fedmoe_app.results import load_adapter
from strategies import STRATEGIES

# Two rounds on a random backbone must beat chance: a constant rate, as a decaying one would
# halve the second round's (the schedules are tested in test_drift.py).
TINY = (
    "model.backbone=tiny-bert rounds=2 data.max-train-rows=300 data.alpha=0.5 eval.test-samples=200 "
    "moe.num-experts=4 moe.expert-hidden=16 train.lr=0.01 train.lr-schedule=constant"
)


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """A private Flower home simulating 3 nodes, on free ports; its SuperLink stops after."""
    with LocalSimulation(tmp_path_factory.mktemp("flwr-home"), num_supernodes=3) as sim:
        yield sim


def check_results(run_dir: Path, rounds: int, num_labels: int) -> dict:
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter.safetensors", "accuracy.png"):
        assert (run_dir / name).is_file(), f"missing {name} in {run_dir}"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(rounds + 1))
    for record in records[1:]:
        assert record["num_replies"] == 3 and record["failures"] == 0
        assert all(v > 0 for v in record["bytes_up"].values())
        assert set(record["step_seconds"]) <= {"rpi4", "jetson-nano", "jetson-orin"}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_global_accuracy"] > 1.0 / num_labels + 0.05, summary  # beats chance
    return summary


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_simulation_tiny_bert(simulation, tmp_path, ag_news_dir, strategy):
    # head_only also calibrates its head after the last round: the ClientApp's calibrate action, through Flower
    overrides = f"{TINY} run-name={strategy}" + (" calibration.method=ccvr" if strategy == "head_only" else "")
    done = simulation.run(f"conf/{strategy}.yaml", overrides, tmp_path, ag_news_dir, timeout_s=900)
    run_dir = tmp_path / strategy
    assert run_dir.is_dir(), done.stdout[-4000:] + done.stderr[-4000:]
    check_results(run_dir, rounds=2, num_labels=4)
    arrays, metadata = load_adapter(run_dir / "adapter.safetensors")
    assert metadata["strategy"] == strategy
    if strategy == "fft_moe":
        assert (run_dir / "expert_utilisation.png").is_file()
        assert sum(1 for k in arrays if ".moe.experts." in k and k.endswith("w_in.weight")) == 2 * 4
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        utilisation = records[-1]["expert_utilisation"]
        assert len(utilisation) == 2 and all(abs(sum(row) - 1) < 1e-6 for row in utilisation)
    elif strategy == "hfedmoe":  # backbone experts: LoRAs only (the frozen slices never travel), at the largest rank
        ranks = {a.shape[0] for k, a in arrays.items() if k.endswith(".lora_in_a")}
        assert ranks == {16} and sum(1 for k in arrays if k.endswith(".lora_in_a")) == 2 * 4
        assert not any(k.endswith("w_in.weight") for k in arrays)
    elif strategy == "ub_smoe":  # every node holds every expert; the server's modulation moves
        assert sum(1 for k in arrays if k.endswith(".lora_in_a")) == 2 * 4
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        assert len(last["utilisation"]) == 2 and any(phi != 0 for row in last["modulation"] for phi in row)
    elif strategy in ("fedavg_lora", "hetlora", "flexlora"):  # the global LoRA: lora.rank, or the largest tier rank
        ranks = {a.shape[0] for k, a in arrays.items() if ".lora_A." in k}
        assert ranks == ({8} if strategy == "fedavg_lora" else {16}) and not any(".moe." in k for k in arrays)
    else:
        assert set(arrays) >= {"head.weight", "head.bias"}
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        assert last["calibration"]["nodes"] == 3 and sum(last["calibration"]["rows_by_class"]) > 0
    assert "fedmoe: done" in done.stdout + done.stderr


@pytest.mark.slow
def test_bad_config_stops_the_run_with_a_named_error(simulation, tmp_path, ag_news_dir):
    done = simulation.run("conf/fft_moe.yaml", "data.partitioner=random", tmp_path, ag_news_dir, timeout_s=300)
    output = done.stdout + done.stderr
    assert "data.partitioner" in output and "iid, dirichlet, pathological" in output
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_simulation_instruction_tuning_of_a_native_moe_decoder(simulation, tmp_path, commonsense_dir):
    """UB-SMoE on a tiny OLMoE through `flwr run`: the commonsense data partitioned by benchmark,
    the global held-out loss falling, option accuracy per benchmark in the records, the
    personalised evaluation reported by every client."""
    overrides = (f"run-name=lm data.data-dir={commonsense_dir} model.backbone=tiny-olmoe rounds=2 "
                 "data.max-train-rows=90 eval.test-samples=4 eval.final-test-samples=4 eval.max-length=96 "
                 "instruction.benchmarks=[ARC-Easy,boolq,piqa] train.lr=0.01")
    done = simulation.run("conf/ub_smoe.yaml,conf/instruction.yaml", overrides, tmp_path, timeout_s=900)
    run_dir = tmp_path / "lm"
    assert (run_dir / "summary.json").is_file(), done.stdout[-4000:] + done.stderr[-4000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["num_replies"] for r in records] == [0, 3, 3] and not any(r["failures"] for r in records)
    assert records[-1]["global_loss"] < records[0]["global_loss"]
    assert set(records[-1]["global_accuracy_by_benchmark"]) == {"ARC-Easy", "boolq", "piqa"}
    assert len(records[-1]["client_accuracy"]) >= 1 and records[-1]["client_accuracy_mean"] is not None
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "instruction" and summary["final_global_perplexity"] > 1
    arrays, _ = load_adapter(run_dir / "adapter.safetensors")
    assert sum(1 for k in arrays if k.endswith(".lora_in_a")) == 2 * 8 and not any(k.startswith("head.") for k in arrays)
    assert "global acc" in done.stdout + done.stderr and "ppl" in done.stdout + done.stderr
