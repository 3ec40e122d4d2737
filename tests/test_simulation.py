"""End to end: real `flwr run` simulations (local SuperLink, Ray backend) of each strategy."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedmoe_app.results import load_adapter

REPO = Path(__file__).resolve().parent.parent
FLWR = Path(sys.executable).parent / "flwr"

CONNECTION = """
[superlink]
default = "local-simulation"

[superlink.local-simulation]
address = ":local:"
options.num-supernodes = 3
options.backend.client-resources.num-cpus = 1
options.backend.client-resources.num-gpus = 0.0
"""

TINY = (
    "model.backbone=tiny-bert rounds=2 data.max-train-rows=300 data.alpha=0.5 eval.test-samples=200 "
    "moe.num-experts=4 moe.expert-hidden=16 train.lr=0.01"
)


def stop_superlink(flwr_home: Path) -> None:
    """Kill the local SuperLink (and its children) that `flwr run` started for this home."""
    found = subprocess.run(["pgrep", "-f", f"flower-superlink.*{flwr_home}"], capture_output=True, text=True)
    for pid in found.stdout.split():
        try:
            os.killpg(os.getpgid(int(pid)), signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            os.kill(int(pid), signal.SIGTERM)


@pytest.fixture(scope="module")
def flwr_env(tmp_path_factory):
    """A private FLWR_HOME with a 3-node simulation connection, on ports of its own."""
    home = tmp_path_factory.mktemp("flwr-home")
    (home / "config.toml").write_text(CONNECTION)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT="39191",
        FLWR_LOCAL_CONTROL_API_PORT="39193",
        PATH=f"{FLWR.parent}{os.pathsep}{os.environ['PATH']}",
    )
    yield env
    stop_superlink(home)


def flwr_run(env, config_file, overrides, results_dir, data_dir, timeout=900):
    """`flwr run . local-simulation` with our run config; returns the completed process."""
    run_config = (
        f"config='{config_file}' overrides='{overrides}' "
        f"results-dir='{results_dir}' data-dir='{data_dir}'"
    )
    return subprocess.run(
        [str(FLWR), "run", ".", "local-simulation", "--stream", "--run-config", run_config],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )


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
@pytest.mark.parametrize("strategy", ["fft_moe", "fedavg_lora"])
def test_simulation_tiny_bert(flwr_env, tmp_path, ag_news_dir, strategy):
    overrides = f"{TINY} run-name={strategy}"
    done = flwr_run(flwr_env, f"conf/{strategy}.yaml", overrides, tmp_path, ag_news_dir)
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
    else:
        assert any("lora_A" in k for k in arrays) and not any(".moe." in k for k in arrays)
    assert "fedmoe: done" in done.stdout + done.stderr


@pytest.mark.slow
def test_simulation_minilm_one_round(flwr_env, tmp_path, ag_news_dir):
    overrides = (
        "model.backbone=minilm rounds=1 data.max-train-rows=300 eval.test-samples=200 "
        "moe.num-experts=4 run-name=minilm"
    )
    flwr_run(flwr_env, "conf/fft_moe.yaml", overrides, tmp_path, ag_news_dir)
    summary = check_results(tmp_path / "minilm", rounds=1, num_labels=4)
    assert summary["backbone"] == "minilm"


@pytest.mark.slow
def test_bad_config_stops_the_run_with_a_named_error(flwr_env, tmp_path, ag_news_dir):
    done = flwr_run(flwr_env, "conf/fft_moe.yaml", "data.partitioner=random", tmp_path, ag_news_dir, timeout=300)
    output = done.stdout + done.stderr
    assert "data.partitioner" in output and "iid, dirichlet, pathological" in output
    assert not any(tmp_path.iterdir())
