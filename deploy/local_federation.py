"""A real Flower deployment on this machine: one SuperLink and N SuperNodes as separate
processes on 127.0.0.1, the app run against them with `flwr run . <connection>`.

Each SuperNode gets the node_config a real device would have: `partition-id`,
`num-partitions`, its `device-tier`, and a `data-path` folder with its own files (split by
`device_data`, with the simulation's partitioner). Two modes:

- insecure: plain HTTP, any SuperNode may join (development only);
- tls: the SuperLink serves TLS with a certificate from `credentials`, SuperNode
  authentication is on, and each node's public key is registered with
  `flwr supernode register` before the node starts.

Every process started here (and its children: SuperExec, ServerApp, ClientApps) is stopped
when the federation closes, also on an error or Ctrl-C.

Usage: python -m deploy.local_federation --mode tls --tiers rpi4,jetson-nano,jetson-orin
       --config conf/fft_moe.yaml [--overrides "rounds=2"] [--data-dir DIR] [--results-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
from flwr.cli.flower_config import write_superlink_connection
from flwr.cli.typing import SuperLinkConnection

from deploy.credentials import NodeKey, TlsFiles, write_node_key, write_tls_certificates
from deploy.device_data import split_for_devices
from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import APP_DIR, load_config, run_config_string
from fedmoe_app.launch import flwr_json, started_run_id

MODES = ("insecure", "tls")
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


class DeploymentError(RuntimeError):
    """A deployment process did not start, or the run did not complete."""


@dataclass
class NodeSpec:
    """One SuperNode: its tier, its data folder, its key (tls mode) and its local API port."""

    index: int
    tier: str
    data_path: Path
    port: int
    key: NodeKey | None = None
    node_id: int | None = None  # known in advance only when its key is registered (tls)

    def node_config(self, num_nodes: int) -> str:
        """The `--node-config` string of this node."""
        return (
            f'partition-id={self.index} num-partitions={num_nodes} '
            f'device-tier="{self.tier}" data-path="{self.data_path}"'
        )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def stop_process_tree(pid: int, kill: bool = False, grace_s: float = 10.0) -> None:
    """Stop a process and all its descendants (SIGTERM, then SIGKILL after `grace_s`)."""
    try:
        root = psutil.Process(pid)
        tree = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        tree = []
    for proc in tree:
        try:
            proc.kill() if kill else proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(tree, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def _stop_tree(process: subprocess.Popen, kill: bool = False, grace_s: float = 10.0) -> None:
    """Stop a started process with its descendants, and reap it."""
    stop_process_tree(process.pid, kill, grace_s)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


class LocalFederation:
    """SuperLink + SuperNodes on 127.0.0.1; use as a context manager (stops everything)."""

    def __init__(self, work_dir: Path, tiers: list[str], device_dirs: list[Path], mode: str = "tls",
                 flwr_home: Path | None = None, connection: str | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode is {mode!r}; allowed: {', '.join(MODES)}")
        if len(tiers) != len(device_dirs):
            raise ValueError(f"{len(tiers)} tiers but {len(device_dirs)} device folders; give one folder per node")
        self.work_dir = work_dir.resolve()
        self.mode = mode
        self.flwr_home = (flwr_home or self.work_dir / "flwr-home").resolve()
        self.connection = connection or f"local-deployment-{mode}"
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.nodes = [NodeSpec(i, tier, Path(d).resolve(), free_port()) for i, (tier, d) in enumerate(zip(tiers, device_dirs))]
        self.processes: dict[str, subprocess.Popen] = {}
        self.tls: TlsFiles | None = None
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    # ---- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the SuperLink, register the node keys (tls), start every SuperNode, and wait
        until all of them are online."""
        if self.mode == "tls":
            credentials = self.work_dir / "credentials"
            self.tls = write_tls_certificates(credentials, [HOST, "localhost"])
            for node in self.nodes:
                node.key = write_node_key(credentials / "nodes", f"node-{node.index}")
        self._write_connection()
        self._start_superlink()
        self._wait_for_port(self.port, "superlink", timeout_s)
        for node in self.nodes:
            if node.key is not None:
                node.node_id = self.register(node.key.public_key)
            self.start_node(node.index)
        self.wait_online(len(self.nodes), timeout_s)

    def stop(self) -> None:
        """Stop every process started here, and their children."""
        for name in reversed(list(self.processes)):
            _stop_tree(self.processes.pop(name))

    # ---- processes ----------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        with (self.log_dir / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=APP_DIR,
                                       start_new_session=True)
        self.processes[name] = process
        return process

    def _start_superlink(self) -> None:
        args = [str(BIN / "flower-superlink"), "--host", HOST, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls is None:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                     "--ssl-keyfile", str(self.tls.server_key), "--enable-supernode-auth"]
        self._spawn("superlink", args)

    def supernode_args(self, node: NodeSpec, private_key: Path | None = None) -> list[str]:
        """The `flower-supernode` command line of `node` (optionally with another key)."""
        args = [str(BIN / "flower-supernode"), "--superlink", f"{HOST}:{self.port}", "--port", str(node.port),
                "--node-config", node.node_config(len(self.nodes))]
        if self.tls is None:
            return args + ["--insecure"]
        key = private_key or (node.key.private_key if node.key else None)
        return args + ["--root-certificates", str(self.tls.ca_cert), "--auth-supernode-private-key", str(key)]

    def start_node(self, index: int) -> subprocess.Popen:
        """Start SuperNode `index` (again, after `kill_node`)."""
        return self._spawn(f"supernode-{index}", self.supernode_args(self.nodes[index]))

    def kill_node(self, index: int) -> None:
        """Kill SuperNode `index` and its ClientApp at once (SIGKILL), as a power cut would."""
        _stop_tree(self.processes.pop(f"supernode-{index}"), kill=True)

    def run_node(self, args: list[str], name: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
        """Run a SuperNode command line to its end (for one that should be refused)."""
        with (self.log_dir / f"{name}.log").open("wb") as log:
            return subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=APP_DIR,
                                  timeout=timeout_s)

    # ---- the flwr CLI -------------------------------------------------------------------
    def _write_connection(self) -> None:
        # flwr's own writer keeps the file's other connections; it reads FLWR_HOME from the
        # environment, so point it at ours for the call.
        previous = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = str(self.flwr_home)
        try:
            write_superlink_connection(SuperLinkConnection(
                name=self.connection, address=f"{HOST}:{self.port}",
                root_certificates=str(self.tls.ca_cert) if self.tls else None,
                insecure=self.tls is None,
            ))
        finally:
            if previous is None:
                os.environ.pop("FLWR_HOME")
            else:
                os.environ["FLWR_HOME"] = previous

    def flwr(self, *args: str, timeout_s: float = 60.0) -> dict:
        """Run a `flwr` CLI command against this federation; its JSON answer."""
        return flwr_json(*args, env=self.env, timeout_s=timeout_s)

    def register(self, public_key: Path) -> int:
        """Register a SuperNode public key on the SuperLink; the node id it will have."""
        answer = self.flwr("supernode", "register", str(public_key), self.connection)
        if not answer.get("success"):
            raise DeploymentError(f"registering {public_key} failed: {answer}")
        return int(answer["node-id"])

    def online_nodes(self) -> list[int]:
        """Ids of the SuperNodes the SuperLink sees online."""
        answer = self.flwr("supernode", "ls", self.connection)
        return [int(n["node-id"]) for n in answer.get("nodes", []) if n.get("status") == "online"]

    def wait_online(self, count: int, timeout_s: float = 120.0) -> list[int]:
        """Wait until at least `count` SuperNodes are online; their ids."""
        deadline = time.time() + timeout_s
        while len(online := self.online_nodes()) < count:
            if time.time() > deadline:
                raise DeploymentError(f"{len(online)} of {count} SuperNodes online after {timeout_s:.0f} s; "
                                      f"see the logs in {self.log_dir}")
            self._check_alive()
            time.sleep(1)
        return online

    def _check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise DeploymentError(f"{name} exited with code {process.returncode}; see {self.log_dir / name}.log")

    def _wait_for_port(self, port: int, name: str, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            self._check_alive()
            with socket.socket() as s:
                if s.connect_ex((HOST, port)) == 0:
                    return
            time.sleep(0.5)
        raise DeploymentError(f"{name} is not listening on {HOST}:{port} after {timeout_s:.0f} s")

    def run_app(self, run_config: str, on_line: Callable[[str], None], timeout_s: float = 3600.0) -> dict:
        """`flwr run . <connection> --stream` with `run_config`; every output line goes to
        `on_line`. Returns the run's `flwr ls` record; raises if it did not complete."""
        args = [str(BIN / "flwr"), "run", ".", self.connection, "--stream", "--run-config", run_config]
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env,
                                   cwd=APP_DIR, start_new_session=True)
        self.processes["flwr-run"] = process
        # `flwr run --stream` may go quiet for long; a timer, not the read loop, enforces the limit.
        watchdog = threading.Timer(timeout_s, _stop_tree, args=(process,))
        started = time.time()
        watchdog.start()
        run_id = None
        try:
            assert process.stdout is not None
            for line in process.stdout:
                on_line(line.rstrip("\n"))
                run_id = run_id or started_run_id(line)
            process.wait()
        finally:
            watchdog.cancel()
        self.processes.pop("flwr-run")
        if time.time() - started >= timeout_s:
            raise DeploymentError(f"the run took longer than {timeout_s:.0f} s; `flwr run` was stopped")
        if run_id is None:
            raise DeploymentError(f"`flwr run` did not start a run (exit code {process.returncode})")
        runs = self.flwr("ls", self.connection, "--run-id", run_id).get("runs", [])
        if not runs or runs[0]["status"] != "finished:completed":
            raise DeploymentError(f"run {run_id} did not complete: {runs[0]['status'] if runs else 'unknown'}")
        return runs[0]


def main(argv: list[str] | None = None) -> int:
    """Command line: split the data per device, start the federation, run the app, stop all."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="tls")
    parser.add_argument("--tiers", default="rpi4,jetson-nano,jetson-orin", help="one tier per SuperNode, comma-separated")
    parser.add_argument("--config", default="conf/fft_moe.yaml")
    parser.add_argument("--overrides", default="")
    parser.add_argument("--data-dir", default="", help="dataset folder to split into per-device folders")
    parser.add_argument("--results-dir", default=str(APP_DIR / "results"))
    parser.add_argument("--work-dir", type=Path, default=APP_DIR / ".deploy", help="logs, keys, device data")
    args = parser.parse_args(argv)
    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]

    environ = {**os.environ, "FEDMOE_DATA_DIR": args.data_dir} if args.data_dir else dict(os.environ)
    config = load_config(args.config, args.overrides, environ)
    known = load_tiers(config.devices.file)
    unknown = [t for t in tiers if t not in known]
    if unknown or not tiers:
        parser.error(f"--tiers has {unknown or 'no tiers'}; allowed: {', '.join(known)} (from {config.devices.file})")
    if len(tiers) < config.federation.min_nodes:
        parser.error(f"--tiers starts {len(tiers)} SuperNodes but federation.min-nodes is {config.federation.min_nodes}, "
                     f"so no round could start; give at least {config.federation.min_nodes} tiers or lower federation.min-nodes")
    device_dirs = split_for_devices(config, len(tiers), args.work_dir / "devices")
    flwr_home = Path(os.environ["FLWR_HOME"]) if "FLWR_HOME" in os.environ else None
    print(f"fedmoe deploy: {args.mode}, {len(tiers)} SuperNodes ({', '.join(tiers)}); logs in {args.work_dir / 'logs'}", flush=True)
    # Ctrl-C or a SIGTERM from `make` / CI: unwind through `with`, which stops every process.
    # (SIGINT is restored explicitly: shells start background jobs with it ignored.)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with LocalFederation(args.work_dir, tiers, device_dirs, args.mode, flwr_home) as federation:
            print(f"fedmoe deploy: SuperLink on {HOST}:{federation.port}, connection '{federation.connection}'", flush=True)
            run = federation.run_app(run_config_string(args.config, args.overrides, args.results_dir, args.data_dir),
                                     on_line=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("fedmoe deploy: interrupted; all processes stopped", file=sys.stderr)
        return 130
    except DeploymentError as error:
        print(f"fedmoe deploy: {error}; all processes stopped", file=sys.stderr)
        return 1
    print(f"fedmoe deploy: run {run['run-id']} {run['status']}, {run['elapsed']:.0f} s; all processes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
