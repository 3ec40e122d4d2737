"""The results directory of one run: results/<run-name>/.

Files:
    config.yaml           the resolved run config, as given
    metrics.jsonl         one JSON object per round (the record below), appended as the run goes
    summary.json          the run's headline numbers: the primary metric's final, best (and best_round,
                          among trained rounds) and initial values, costs, memory
    adapter.safetensors   the final global adapter weights (+ string metadata)
    checkpoint.safetensors  the state after the last complete round (fedmoe_app/checkpoint.py)
    status.json           running (last round, the ServerApp's host and pid) | complete | failed (error) | stopped (reason)
    labels.json           label id -> name, when the data names its labels
    accuracy.png          global and per-tier accuracy by round (best round marked), test and training loss
    expert_utilisation.png  routed-token shares per expert (MoE methods); see plots.py

The round record (one line of metrics.jsonl):
    round: int                          1..R (round 0 = before training, only global eval fields)
    wall_time_s: float                  seconds since the run started
    phase_seconds: dict[str, float]     wall seconds of this round's phases: train (send, wait,
                                        aggregate), calibration, client_eval, server_eval (those that ran)
    (built as strategies/rounds.py's RoundRecord; the evaluation fields are named by the run's task)
    global_accuracy: float | None       server-side accuracy of the global model on the test split (classification),
                                        or multiple-choice accuracy, the mean over benchmarks (instruction)
                                        (None if not evaluated this round)
    global_loss: float | None           the test rows' mean cross-entropy (instruction: per output token)
    global_recall: list[float] | None   (classification) per class (label id order): share of its test rows predicted right
    global_perplexity: float | None     (instruction) exp(global_loss)
    global_accuracy_by_benchmark: dict[str, float] | None
                                        (instruction) benchmark -> its multiple-choice accuracy
    global_test_rows: int | None        test rows scored (eval.test-samples; after the last round
                                        eval.final-test-samples; instruction: per benchmark)
    client_accuracy: dict[str, float]   tier name -> mean personalised accuracy (the task's primary metric)
                                        of that tier's clients on their held-out slices ({} if none)
    client_accuracy_mean: float | None  example-weighted over all clients
    client_accuracy_worst: float | None
    train_loss: float | None
    lr: float | None                    the local learning rate the server sent this round (train.lr-schedule)
    proximal_term: float | None         (train.proximal-mu > 0) example-weighted mean over the clients of their
                                        FedProx term (mu / 2) ||w - w_global||^2, averaged over local steps
    <the strategy's own fields>         its `round_metrics` (strategies/<name>.py documents them), e.g. the
                                        MoE strategies' expert_utilisation ([layer][expert] share of routed
                                        tokens, rows sum to 1) and expert_utilisation_by_tier
    bytes_down: dict[str, int]          client id -> bytes sent to it this round
    bytes_up: dict[str, int]            client id -> bytes received from it
    step_seconds: dict[str, float]      tier -> mean seconds per local step
    peak_rss_mb: dict[str, float]       tier -> largest peak resident memory of a client process
    server_peak_rss_mb: float           peak resident memory of the ServerApp process so far
    clients: dict[str, dict]            client id (stable across restarts) -> node_id, tier, the
                                        budget (its device-tier fields: budgets.TIER_FIELDS,
                                        the methods' included), num_examples (local
                                        training rows), samples_processed (batch x steps), steps, step_seconds,
                                        train_seconds (whole local round), peak_rss_mb,
                                        bytes_down, bytes_up, startup_seconds, import_seconds,
                                        data_seconds, model_seconds (deployment start-up)
    calibration: dict | None            (last round, calibration.method on) nodes (that reported
                                        feature moments) and rows_by_class (pooled), before evaluation
    num_replies: int
    failures: int                       failed messages (or malformed replies); failed_nodes names them
                                        (node_id, client_id, tier, reason)

Non-finite floats (NaN, inf) are written as null, so every line stays valid JSON.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedmoe_app import plots

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
STATUS_FILE = "status.json"
LABELS_FILE = "labels.json"
ADAPTER_FILE = "adapter.safetensors"
ACCURACY_PLOT = "accuracy.png"
UTILISATION_PLOT = "expert_utilisation.png"


def to_json_safe(value: Any) -> Any:
    """`value` with NaN/inf floats as None and NumPy scalars/arrays as plain Python values."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    return value


class RunResults:
    """results/<run-name>/ of one run: config.yaml, metrics.jsonl, summary.json, adapter.safetensors, plots."""

    def __init__(self, run_dir: Path, config_yaml: str) -> None:
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        if self.metrics_path.exists():
            raise FileExistsError(f"{self.metrics_path} already exists: choose another run-name, or resume "
                                  f"it with resume={self.run_dir.name}; a run is never overwritten")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(config_yaml)

    @classmethod
    def at(cls, run_dir: Path) -> "RunResults":
        """The results folder of an existing run, as it is."""
        results = cls.__new__(cls)
        results.run_dir = Path(run_dir)
        results.metrics_path = results.run_dir / METRICS_FILE
        return results

    @classmethod
    def resume(cls, run_dir: Path, last_round: int) -> "RunResults":
        """The results of a stopped run, to continue after round `last_round`: the round
        records after it (written after its last checkpoint) are dropped."""
        results = cls.at(run_dir)
        (results.run_dir / STATUS_FILE).unlink(missing_ok=True)  # it said stopped or failed; it runs again
        kept = [r for r in read_rounds(results.run_dir) if r["round"] <= last_round]
        _write_atomically(results.metrics_path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))
        return results

    def set_status(self, status: str, **details: Any) -> str:
        """Write status.json: `running` (with the last complete round), `complete`, `failed`
        or `stopped` (with a reason), so a folder says whether its run finished. A run the
        user stopped stays `stopped`; a round its ServerApp completes before it ends still
        moves `last_round` on. Returns the status written."""
        folder = os.open(self.run_dir, os.O_RDONLY)
        try:  # read and write as one step: the ServerApp and `make run`'s Ctrl-C both write here
            fcntl.flock(folder, fcntl.LOCK_EX)
            current = self.status()
            if current.pop("status", None) == "stopped" and status != "stopped":
                status, details = "stopped", {**current, "last_round": details.get("last_round", current.get("last_round"))}
            _write_atomically(self.run_dir / STATUS_FILE,
                              json.dumps(to_json_safe({"status": status, **details}), indent=2) + "\n")
        finally:
            os.close(folder)  # releases the lock
        return status

    def writer_running(self) -> bool:
        """Whether the ServerApp process that last wrote this run (status.json's `server`)
        still runs; False when it ran on another machine (it cannot be seen from here)."""
        server = self.status().get("server") or {}
        if server.get("host") != socket.gethostname() or "pid" not in server:
            return False
        try:
            process = psutil.Process(server["pid"])
            return process.create_time() == server.get("started") and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def log_round(self, record: dict) -> None:
        """Append one round record to metrics.jsonl, on disk before returning."""
        line = json.dumps(to_json_safe(record), allow_nan=False)
        with open(self.metrics_path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rounds(self) -> list[dict]:
        """The round records logged so far, in order."""
        return read_rounds(self.run_dir)

    def write_labels(self, names: tuple[str, ...]) -> None:
        """labels.json: the name of each label id, when the data named its labels."""
        _write_atomically(self.run_dir / LABELS_FILE, json.dumps({str(i): n for i, n in enumerate(names)}, indent=2) + "\n")

    def status(self) -> dict:
        """status.json as written last ({} if none yet)."""
        path = self.run_dir / STATUS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def last_round(self) -> int:
        """The last round recorded so far (0 if none)."""
        rounds = self.rounds()
        return rounds[-1]["round"] if rounds else 0

    def write_summary(self, summary: dict) -> Path:
        """Write summary.json; returns its path."""
        path = self.run_dir / SUMMARY_FILE
        path.write_text(json.dumps(to_json_safe(summary), indent=2, sort_keys=True, allow_nan=False) + "\n")
        return path

    def save_adapter(self, arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> Path:
        """Write the adapter weights and their metadata to adapter.safetensors; returns its path."""
        path = self.run_dir / ADAPTER_FILE
        tensors = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
        save_file(tensors, str(path), metadata={str(k): str(v) for k, v in metadata.items()})
        return path

    def write_plots(self) -> list[Path]:
        """Plot metrics.jsonl into the run dir; returns the PNG paths written."""
        rounds = self.rounds()
        title = self.run_dir.name
        written = [plots.plot_accuracy(rounds, self.run_dir / ACCURACY_PLOT, title, best_round(rounds))]
        utilisation = plots.plot_expert_utilisation(rounds, self.run_dir / UTILISATION_PLOT, title)
        if utilisation is not None:
            written.append(utilisation)
        return written


def _write_atomically(path: Path, text: str) -> None:
    """Replace `path` by `text`: a crash leaves the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def this_process() -> dict:
    """This process's host, id and start time (status.json's `server`: the process writing a run)."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}


def best_round(rounds: list[dict], metric: str = "accuracy", higher_is_better: bool = True) -> tuple[int, float] | None:
    """(round, value) of the best global `metric` after training began (round >= 1; the
    first of equals), or None if no trained round has a finite value."""
    found = [(r["round"], r[f"global_{metric}"]) for r in rounds
             if r["round"] >= 1 and r.get(f"global_{metric}") is not None and math.isfinite(r[f"global_{metric}"])]
    if not found:
        return None
    sign = 1 if higher_is_better else -1
    return max(found, key=lambda found_round: (sign * found_round[1], -found_round[0]))


def read_rounds(run_dir: Path) -> list[dict]:
    """The round records in a run directory's metrics.jsonl, in order ([] if none yet)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_adapter(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The arrays and metadata of an adapter.safetensors file."""
    arrays = load_file(str(path))
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata() or {}
    return arrays, dict(metadata)
