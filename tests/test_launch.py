"""`make run`'s launcher (fedmoe_app/launch.py): a bad config fails at once with its error
last and a non-zero exit; a run that fails exits non-zero with its error last; Ctrl-C
stops the run on the SuperLink, marks its results stopped, and `resume=` finishes it."""

import json
import signal
import subprocess
import sys
import time

import pytest

from bench.simulation import LocalSimulation
from fedmoe_app.config import APP_DIR

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


@pytest.mark.slow
def test_ctrl_c_stops_the_run_and_resume_finishes_it(simulation, tmp_path, ag_news_dir):
    process = launcher(simulation, f"{TINY} rounds=30 run-name=stopped", tmp_path, ag_news_dir)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if "round  2/30" in line:
            process.send_signal(signal.SIGINT)  # what Ctrl-C in `make run` sends
            break
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, "".join(lines)[-3000:] + output[-3000:]
    assert 'make run OVERRIDES="resume=stopped"' in last_line(output)
    run_dir = tmp_path / "stopped"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "stopped" and 2 <= status["last_round"] < 30
    run_id = next(word for line in lines for word in line.split() if word.isdigit() and len(word) > 8)
    listed = subprocess.run([str(sys.executable.rsplit("/", 1)[0] + "/flwr"), "ls", "local-simulation", "--run-id", run_id,
                             "--format", "json"], cwd=APP_DIR, env=simulation.env, capture_output=True, text=True)
    assert json.loads(listed.stdout)["runs"][0]["status"] == "finished:stopped"  # stopped on the SuperLink, not just the log
    time.sleep(2)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "stopped"  # nothing ran on to overwrite it
    resumed = launcher(simulation, "resume=stopped", tmp_path, ag_news_dir)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output[-3000:]
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(31))
    assert json.loads((run_dir / "status.json").read_text())["status"] == "complete"
