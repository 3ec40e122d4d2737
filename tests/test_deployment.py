"""End to end: a real deployment on loopback. A SuperLink and SuperNodes run as separate
processes, each node with its own tier and data folder, and `flwr run . <connection>` runs
the app against them, with TLS and SuperNode authentication: a node with an unregistered
key is refused and a node killed mid-run rejoins. (`make deploy-local`, TLS and insecure:
tests/test_readme.py.)"""

import json
import socket

import psutil
import pytest

from deploy.credentials import write_node_key
from deploy.device_data import split_for_devices
from deploy.local_federation import HOST, LocalFederation, NodeSpec, free_port
from fedmoe_app.config import run_config_string
from fedmoe_app.budgets import load_tiers
from fedmoe_app.config import load_config

TINY = (
    "model.backbone=tiny-bert data.max-train-rows=300 data.alpha=0.5 eval.test-samples=100 "
    "moe.num-experts=8 moe.expert-hidden=16 train.lr=0.01"
)


@pytest.fixture(autouse=True)
def token_cache_dir(tmp_path, monkeypatch):
    """The ClientApps cache their token ids here (inherited through every process), not in
    the user's cache."""
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path / "fedmoe-cache"))
    return tmp_path / "fedmoe-cache" / "tokens"


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def federation_for(tmp_path, ag_news_dir, config_file, overrides, tiers, mode):
    config = load_config(config_file, overrides, {"FEDMOE_DATA_DIR": str(ag_news_dir)})
    device_dirs = split_for_devices(config, len(tiers), tmp_path / "devices")
    return LocalFederation(tmp_path / "work", tiers, device_dirs, mode)


def all_pids(federation):
    """Every process the federation started, with its children, right now."""
    pids = set()
    for process in federation.processes.values():
        root = psutil.Process(process.pid)
        pids |= {root.pid} | {p.pid for p in root.children(recursive=True)}
    return pids


def assert_all_stopped(pids, ports):
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left running: {alive}"
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex((HOST, port)) != 0, f"port {port} still open"


@pytest.mark.slow
def test_tls_deployment_refuses_strangers_and_survives_a_dead_node(tmp_path, ag_news_dir):
    tiers = ["rpi4", "jetson-nano", "jetson-orin"]
    # min-nodes=3: round 2 waits for the killed node to come back
    overrides = f"{TINY} rounds=2 federation.min-nodes=3 run-name=tls"
    federation = federation_for(tmp_path, ag_news_dir, "conf/fft_moe.yaml", overrides, tiers, "tls")
    lines = []

    def kill_and_restart(line):
        lines.append(line)
        if "fedmoe: round  0/2" in line:  # round 1's train messages are on their way
            federation.kill_node(1)
        if "fedmoe: round  1/2" in line:
            federation.start_node(1)

    with federation:
        # A node whose key was never registered is refused, and the three others are online.
        stranger = write_node_key(tmp_path / "stranger", "stranger")
        spec = NodeSpec(9, "rpi4", federation.nodes[0].data_path, free_port())
        refused = federation.run_node(federation.supernode_args(spec, stranger.private_key) + ["--max-retries", "1"], "stranger")
        assert refused.returncode != 0
        assert "Failed to activate SuperNode" in (federation.log_dir / "stranger.log").read_text()
        assert sorted(federation.online_nodes()) == sorted(n.node_id for n in federation.nodes)

        pids = all_pids(federation)
        run = federation.run_app(
            run_config_string("conf/fft_moe.yaml", overrides, str(tmp_path / "results"), str(ag_news_dir)),
            on_line=kill_and_restart, timeout_s=900,
        )
        pids |= all_pids(federation)
    assert run["status"] == "finished:completed", "\n".join(lines[-40:])

    run_dir = tmp_path / "results" / "tls"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter.safetensors", "accuracy.png"):
        assert (run_dir / name).is_file(), f"missing {name}"
    records = records_of(run_dir)
    killed = str(federation.nodes[1].node_id)
    by_node = lambda record: {c["node_id"]: c for c in record["clients"].values()}  # noqa: E731 (keyed by client id)
    # round 1: the killed node's failure is named and counted; the others' replies make the round
    assert records[1]["num_replies"] == 2 and killed not in by_node(records[1])
    assert [f["tier"] for f in records[1]["failed_nodes"] if f["node_id"] == killed] == ["jetson-nano"]
    # round 2: the restarted node (same registered key, same id) trains again, under its own client id
    assert records[2]["num_replies"] == 3 and by_node(records[2])[killed]["tier"] == "jetson-nano"
    assert len(records[2]["clients"]) == 3 and all(len(client_id) == 32 for client_id in records[2]["clients"])
    # each node trained with its own tier's budget, as reported in its reply
    budgets = load_tiers("conf/devices.yaml")
    for node in federation.nodes:
        client = by_node(records[2])[str(node.node_id)]
        budget = budgets[node.tier]
        assert client["tier"] == node.tier
        assert client["steps"] == budget.local_steps and client["batch_size"] == budget.batch_size
        assert client["experts_held"] == min(budget.experts_held, 8) and client["top_k"] == budget.top_k
        assert client["max_length"] == budget.max_length and client["peak_rss_mb"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failures_total"] >= 1
    assert set(summary["memory_by_tier"]) == set(tiers)
    assert summary["memory_by_tier"]["rpi4"]["ram_mb"] == pytest.approx(4 * 2**30 / 1e6, abs=0.1)
    assert_all_stopped(pids, [federation.port] + [n.port for n in federation.nodes])


@pytest.mark.slow
def test_every_process_stops_when_the_caller_fails(tmp_path, ag_news_dir):
    federation = federation_for(tmp_path, ag_news_dir, "conf/fft_moe.yaml", TINY, ["rpi4"], "insecure")
    with pytest.raises(RuntimeError, match="caller failed"):
        with federation:
            pids = all_pids(federation)
            assert len(federation.online_nodes()) == 1
            raise RuntimeError("caller failed")
    assert_all_stopped(pids, [federation.port, federation.nodes[0].port])
