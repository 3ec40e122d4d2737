"""A Flower simulation driven from Python: `flwr run . local-simulation` with a private
FLWR_HOME, its own ports and its own number of virtual SuperNodes.

`flwr run` starts a local SuperLink that outlives the command; LocalSimulation stops it
when the context closes, so benchmarks and tests leave nothing running and never touch
the user's own SuperLink (`make run`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from deploy.local_federation import free_port, stop_process_tree
from fedmoe_app.config import run_config_string
from fedmoe_app.config import APP_DIR

FLWR = Path(sys.executable).parent / "flwr"
CONNECTION = "local-simulation"


def gpu_share(cpus_per_client: int) -> float:
    """The share of the GPUs each simulated client gets: all of them split over as many
    clients as the CPUs run at once (0 without a GPU; Ray then hides GPUs from clients)."""
    if not torch.cuda.is_available():
        return 0.0
    return min(1.0, torch.cuda.device_count() * cpus_per_client / (os.cpu_count() or 1))


def connection_toml(num_supernodes: int, cpus_per_client: int = 1, gpus_per_client: float = 0.0) -> str:
    """A Flower config.toml whose default connection simulates `num_supernodes` nodes."""
    return (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        'address = ":local:"\n'
        f"options.num-supernodes = {num_supernodes}\n"
        f"options.backend.client-resources.num-cpus = {cpus_per_client}\n"
        f"options.backend.client-resources.num-gpus = {gpus_per_client}\n"
    )


class LocalSimulation:
    """A private Flower home for simulated runs; use as a context manager (stops the SuperLink).
    Clients share the GPUs when there are any (`gpu_share`)."""

    def __init__(self, flwr_home: Path, num_supernodes: int, cpus_per_client: int = 1) -> None:
        self.flwr_home = Path(flwr_home)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        toml = connection_toml(num_supernodes, cpus_per_client, gpu_share(cpus_per_client))
        (self.flwr_home / "config.toml").write_text(toml)
        self.env = dict(os.environ)
        self.env.update(
            FLWR_HOME=str(self.flwr_home),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
            FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
            PATH=f"{FLWR.parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )

    def __enter__(self) -> "LocalSimulation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def run(self, config: str, overrides: str, results_dir: Path | str, data_dir: Path | str = "",
            timeout_s: float = 3600.0) -> subprocess.CompletedProcess:
        """Run the app once (`config` file + `overrides`); the completed `flwr run` process,
        its output captured. The run's results are in `results_dir/<run-name>/`."""
        run_config = run_config_string(config, overrides, str(results_dir), str(data_dir))
        return subprocess.run(
            [str(FLWR), "run", ".", CONNECTION, "--stream", "--run-config", run_config],
            cwd=APP_DIR, env=self.env, capture_output=True, text=True, timeout=timeout_s,
        )

    def stop(self) -> None:
        """Stop the local SuperLink `flwr run` started for this home, with its children."""
        home = str(self.flwr_home)
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if "flower-superlink" in cmdline and home in cmdline:
                stop_process_tree(process.pid)
