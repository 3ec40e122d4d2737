"""`make run`'s launcher (fedmoe_app/launch.py): a bad config fails at once with its error
last and a non-zero exit; a run that fails exits non-zero with its error last. (Ctrl-C and
`resume=` through `make run`: tests/test_readme.py.)"""

import dataclasses
import subprocess
import sys
import time

import pytest

from bench.simulation import LocalSimulation
from fedmoe_app.config import APP_DIR, load_config, parse_overrides
from fedmoe_app.launch import pinned_paths

TINY = "model.backbone=tiny-bert data.max-train-rows=300 eval.test-samples=100 moe.num-experts=4 moe.expert-hidden=8"


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    with LocalSimulation(tmp_path_factory.mktemp("flwr-home"), num_supernodes=3) as sim:
        yield sim


def launcher(simulation, overrides, results_dir, data_dir, **popen):
    args = [sys.executable, "-m", "fedmoe_app.launch", "--overrides", overrides, "--results-dir", str(results_dir),
            "--data-dir", str(data_dir)]
    return subprocess.Popen(args, cwd=APP_DIR, env=simulation.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def last_line(output: str) -> str:
    return [line for line in output.splitlines() if line.strip()][-1]


def test_a_bad_config_fails_at_once_with_its_error_last(simulation, tmp_path, ag_news_dir):
    started = time.time()
    process = launcher(simulation, "rounds=two", tmp_path, ag_news_dir)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert last_line(output) == "fedmoe: error: config key 'rounds' must be an integer, got 'two'"
    assert time.time() - started < 60 and not any(tmp_path.iterdir())  # no run started, nothing written


@pytest.mark.slow
def test_a_failing_run_exits_non_zero_with_its_error_last(simulation, tmp_path, ag_news_dir):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the results folder should go\n")
    process = launcher(simulation, f"{TINY} rounds=1 run-name=fails", blocker / "results", ag_news_dir)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 1, output[-3000:]
    line = last_line(output)
    assert line.startswith("fedmoe: error: run ") and "ended finished:failed" in line and "NotADirectoryError" in line, line


def test_the_run_gets_absolute_results_and_data_folders():
    """The ServerApp runs from Flower's copy of the app: relative folders are pinned to what
    the launcher checked; a path with spaces stays one override."""
    config = load_config("conf/fft_moe.yaml", 'results-dir=out data.data-dir="my data"')
    pinned = pinned_paths(config)
    assert parse_overrides(pinned) == {"results-dir": str(APP_DIR / "out"), "data": {"data-dir": str(APP_DIR / "my data")}}
    resumed = dataclasses.replace(config, resume="earlier")
    assert parse_overrides(pinned_paths(resumed)) == {"results-dir": str(APP_DIR / "out")}
