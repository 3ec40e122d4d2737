"""`make run`: a federated run that fails when it fails and stops when it is stopped.

1. The configuration and the data are checked here, before any client trains (seconds):
   a bad key, value, tier or data file ends the command with its error and exit code 2.
2. The app runs with `flwr run . <connection> --stream`; its log goes to the console.
3. Exit code 0 only if the run completed; otherwise 1, and the last line printed is the
   run's error. Ctrl-C stops the run on the SuperLink (not just the log stream), waits for
   the ServerApp to end, marks the run's results folder stopped after its last checkpoint
   (status.json) and says how to resume the run; exit code 130.

Usage: python -m fedmoe_app.launch [--config conf/fft_moe.yaml] [--overrides "rounds=3"]
       [--results-dir results] [--data-dir DIR] [--connection local-simulation]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from fedmoe_app.config import (APP_DIR, DEFAULT_CONFIG_FILE, ConfigError, RunConfig, config_from_run_config,
                               resolve_path, run_config_string)
from fedmoe_app.rows import DataError

FLWR = Path(sys.executable).parent / "flwr"
ERROR_EXIT, FAILED_EXIT, STOPPED_EXIT = 2, 1, 130
STOP_WAIT_SECONDS = 60.0


def checked_config(run_config: dict[str, str]) -> RunConfig:
    """The run's configuration, with its tiers and data checked (a resumed run's own);
    ConfigError or DataError naming what is wrong."""
    from fedmoe_app.budgets import check_mix
    from fedmoe_app.methods import check_method_for_task
    from fedmoe_app.server import resumed_run
    from fedmoe_app.tasks import task_of

    config = config_from_run_config(run_config, os.environ)
    if config.resume:
        config, _ = resumed_run(config)
    check_mix(config)
    check_method_for_task(config)
    task_of(config).splits()
    return config


def named_run(config: RunConfig, overrides: str) -> tuple[str, str]:
    """(run name, overrides naming it): a new run without `run-name` gets
    <strategy>-<date>-<time> here, so this process knows its results folder."""
    if config.resume:
        return config.resume, overrides
    if config.run_name:
        return config.run_name, overrides
    name = f"{config.strategy}-{time.strftime('%Y%m%d-%H%M%S')}"
    return name, f"{overrides} run-name={name}".strip()


def pinned_paths(config: RunConfig) -> str:
    """Overrides naming the checked run's results and data folders as absolute paths: the
    ServerApp runs from Flower's copy of the app, where a relative path would mean another
    folder. (A resumed run's data folder is its own config.yaml's.)"""
    paths = {"results-dir": str(resolve_path(config.results_dir))}
    if config.data.data_dir and not config.resume:
        paths["data.data-dir"] = str(resolve_path(config.data.data_dir))
    return " ".join(f"{key}={json.dumps(path)}" for key, path in paths.items())


def flwr_json(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0) -> dict:
    """The JSON answer of a `flwr` CLI command (success false and the output if it gave none)."""
    done = subprocess.run([str(FLWR), *args, "--format", "json"], env=env, cwd=APP_DIR,
                          capture_output=True, text=True, timeout=timeout_s)
    try:
        return json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        return {"success": False, "error-message": done.stdout + done.stderr}


def started_run_id(line: str) -> str | None:
    """The run id in `flwr run`'s line announcing it, else None."""
    match = re.search(r"Successfully started run (\d+)", line)
    return match.group(1) if match else None


def run_status(run_id: str, connection: str) -> str:
    """The SuperLink's status of run `run_id` (e.g. finished:completed), or 'unknown'."""
    runs = flwr_json("ls", connection, "--run-id", run_id).get("runs", [])
    return runs[0]["status"] if runs else "unknown"


def last_error(lines: list[str]) -> str:
    """The most telling error line of a run's log: the last exception raised (`XError: ...`),
    else the last ERROR line that is not Flower's exit code."""
    texts = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in lines]
    for text in reversed(texts):
        if match := re.search(r"\b[A-Z]\w*(Error|Exception): .*", text):
            return match.group(0)
    for text in reversed(texts):
        if "ERROR" in text and "Exit Code" not in text:
            return text
    return "no error line in the log; see it above"


def mark_stopped(run_dir: Path, run_id: str) -> None:
    """Say in the run's status.json that it was stopped after its last checkpoint (where a
    resume continues), keeping what it wrote; a ServerApp still running reads this and ends
    after the round in progress."""
    from fedmoe_app.checkpoint import checkpoint_round
    from fedmoe_app.results import RunResults

    if not run_dir.is_dir():
        return
    results = RunResults.at(run_dir)
    status = results.status()
    results.set_status("stopped", reason=f"Ctrl-C: run {run_id} stopped by the user", last_round=checkpoint_round(run_dir),
                       rounds=status.get("rounds"), server=status.get("server"))


def wait_for_server_exit(run_dir: Path, deadline: float) -> bool:
    """Wait until the ServerApp process writing `run_dir` has ended (or `deadline`); whether it has."""
    from fedmoe_app.results import RunResults

    results = RunResults.at(run_dir)
    while results.writer_running():
        if time.time() > deadline:
            return False
        time.sleep(0.5)
    return True


def launch(config_file: str, overrides: str, results_dir: str, data_dir: str, connection: str) -> int:
    """Check, run and watch one run (see the module docstring); the exit code. Relative
    `results_dir` and `data_dir` are relative to the working directory."""
    results_dir, data_dir = (str(Path(d).expanduser().resolve()) if d else "" for d in (results_dir, data_dir))
    run_config = {"config": config_file, "overrides": overrides, "results-dir": results_dir, "data-dir": data_dir}
    try:
        config = checked_config(run_config)
    except (ConfigError, DataError) as error:
        print(f"fedmoe: error: {error}", file=sys.stderr)
        return ERROR_EXIT
    name, overrides = named_run(config, overrides)
    overrides = f"{overrides} {pinned_paths(config)}".strip()
    run_dir = resolve_path(config.results_dir) / name
    args = [str(FLWR), "run", ".", connection, "--stream",
            "--run-config", run_config_string(config_file, overrides, results_dir, data_dir)]
    # Unbuffered: writing into our pipe, `flwr` would otherwise hold its log lines back in
    # blocks, and the console (and a Ctrl-C sent on seeing round 1) would lag the run.
    process = subprocess.Popen(args, cwd=APP_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               start_new_session=True)  # Ctrl-C reaches this process only; it stops the run
    run_id, tail = None, deque(maxlen=200)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n"))
            run_id = run_id or started_run_id(line)
        process.wait()
    except KeyboardInterrupt:
        return _stop(process, run_id, connection, run_dir, name)
    if run_id is None:
        print(f"fedmoe: error: `flwr run` started no run (exit code {process.returncode}): {last_error(list(tail))}",
              file=sys.stderr)
        return FAILED_EXIT
    status = run_status(run_id, connection)
    if status != "finished:completed":
        print(f"fedmoe: error: run {run_id} ended {status}: {last_error(list(tail))}", file=sys.stderr)
        return FAILED_EXIT
    print(f"fedmoe: run {run_id} completed; results in {run_dir}")
    return 0


def _stop(process: subprocess.Popen, run_id: str | None, connection: str, run_dir: Path, name: str) -> int:
    """Ctrl-C: stop the run on the SuperLink, wait for the ServerApp to end, mark the results
    stopped, end the log stream."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut this short
    deadline = time.time() + STOP_WAIT_SECONDS
    # The SuperLink first: a ServerApp told to stop by its results folder alone could end
    # cleanly before the SuperLink hears of it, and the run would be listed as completed.
    if run_id is not None:
        flwr_json("stop", run_id, connection)
        while not run_status(run_id, connection).startswith("finished") and time.time() < deadline:
            time.sleep(1)
    ended = not run_dir.is_dir() or wait_for_server_exit(run_dir, deadline)
    mark_stopped(run_dir, run_id or "?")
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    still = "" if ended else " (its ServerApp is still in a round and ends after it)"
    print(f"\nfedmoe: run {run_id or '(not started)'} stopped on the SuperLink{still}; what it wrote is kept in "
          f"{run_dir} (status.json: stopped). Continue it with: make run OVERRIDES=\"resume={name}\"", file=sys.stderr)
    return STOPPED_EXIT


def main(argv: list[str] | None = None) -> int:
    """Command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG_FILE)
    parser.add_argument("--overrides", default="")
    parser.add_argument("--results-dir", default="")
    parser.add_argument("--data-dir", default="")
    parser.add_argument("--connection", default="local-simulation")
    args = parser.parse_args(argv)
    return launch(args.config, args.overrides, args.results_dir, args.data_dir, args.connection)


if __name__ == "__main__":
    sys.exit(main())
