"""The node worker: a device's train and evaluate messages served by one long-lived
process, with the same replies as in the ClientApp process, and a clean end."""

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bench import cold_start
from fedmoe_app import node_worker
from fedmoe_app.records import from_record
from tests.test_cold_start import TINY, device_folder


@pytest.fixture
def worker_env(tmp_path, monkeypatch):
    """An empty fedmoe cache folder for this test; its worker is stopped afterwards."""
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path / "fedmoe-cache"))
    yield tmp_path
    node_worker.stop()


@pytest.fixture(scope="module")
def round_one(tmp_path_factory):
    """The train and evaluate message contents a server sends an rpi4 node in round 1,
    and that node's node_config."""
    root = tmp_path_factory.mktemp("worker-messages")
    device = device_folder(root / "device")
    env = cold_start._fresh_cache_env(root / "fedmoe-cache")
    cold_start.write_messages("conf/fft_moe.yaml", TINY, str(device_folder(root / "ag_news")), "rpi4",
                              str(device), root, env, warm_worker=False)
    contents = {kind: cold_start._message(kind, root)[0].content for kind in ("train", "evaluate")}
    return contents, {"device-tier": "rpi4", "data-path": str(device)}


def test_warm_worker_setting_defaults_to_devices_and_names_bad_values():
    assert node_worker.wants_worker({"data-path": "/srv/data"}) is True
    assert node_worker.wants_worker({"partition-id": 0}) is False
    assert node_worker.wants_worker({"data-path": "/srv/data", "warm-worker": "false"}) is False
    assert node_worker.wants_worker({"warm-worker": True}) is True
    with pytest.raises(ValueError, match="warm-worker='yes'.*allowed: true, false"):
        node_worker.wants_worker({"warm-worker": "yes"})
    with pytest.raises(ValueError, match="worker-idle-seconds=0.*> 0"):
        node_worker.idle_seconds({"worker-idle-seconds": 0})
    with pytest.raises(ValueError, match="worker-idle-seconds='nan'"):
        node_worker.idle_seconds({"worker-idle-seconds": "nan"})
    assert node_worker.idle_seconds({"worker-idle-seconds": "60"}) == 60.0


def test_worker_replies_equal_the_in_process_replies(worker_env, round_one):
    contents, node = round_one
    local = node_worker.handle("train", contents["train"], {**node, "warm-worker": False})
    served = node_worker.handle("train", contents["train"], node)  # starts the worker
    assert node_worker.socket_path().exists()
    assert local["request"]["next-experts"] == served["request"]["next-experts"]
    assert served["metrics"]["train-loss"] == pytest.approx(local["metrics"]["train-loss"], rel=1e-6)
    local_updates, served_updates = from_record(local["arrays"]), from_record(served["arrays"])
    assert local_updates.keys() == served_updates.keys()
    for key in local_updates:
        np.testing.assert_allclose(served_updates[key], local_updates[key], rtol=1e-5, atol=1e-7)
    evaluated = node_worker.handle("evaluate", contents["evaluate"], node)
    assert evaluated["metrics"]["num-examples"] == 8


def test_a_failing_message_reports_the_workers_error_and_the_worker_goes_on(worker_env, round_one):
    contents, node = round_one
    broken = type(contents["train"])({"config": contents["train"]["config"]})  # no arrays
    with pytest.raises(RuntimeError, match="node worker failed on a train message(.|\n)*KeyError(.|\n)*arrays"):
        node_worker.handle("train", broken, node)
    assert node_worker.handle("evaluate", contents["evaluate"], node)["metrics"]["num-examples"] == 8


def test_worker_exits_when_idle_or_when_its_supernode_is_gone(worker_env, tmp_path):
    sock = node_worker.socket_path()
    idle = subprocess.Popen([sys.executable, "-m", "fedmoe_app.node_worker", "--socket", str(sock),
                             "--idle-seconds", "1"], cwd=node_worker.APP_DIR)
    assert idle.wait(timeout=120) == 0 and not sock.exists()
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    orphan = subprocess.Popen([sys.executable, "-m", "fedmoe_app.node_worker", "--socket", str(sock),
                               "--watch-pid", str(parent.pid)], cwd=node_worker.APP_DIR)
    deadline = time.monotonic() + 120
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert orphan.poll() is None
    parent.kill()
    parent.wait()
    assert orphan.wait(timeout=30) == 0 and not sock.exists()
    assert not node_worker.stop()


def test_socket_folder_open_to_others_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(node_worker.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = node_worker.socket_path().parent
    assert folder.stat().st_mode & 0o077 == 0
    folder.chmod(0o755)
    with pytest.raises(PermissionError, match="chmod 700"):
        node_worker.socket_path()


def test_a_broken_connection_does_not_end_the_worker(worker_env, round_one):
    contents, node = round_one
    node_worker.handle("evaluate", contents["evaluate"], node)  # starts the worker
    half = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    half.connect(str(node_worker.socket_path()))
    half.sendall(node_worker._FRAME.pack(10, 1000) + b"{")  # a ClientApp dying mid-message
    half.close()
    garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    garbage.connect(str(node_worker.socket_path()))
    garbage.sendall(node_worker._FRAME.pack(3, 0) + b"{x]")
    garbage.close()
    assert node_worker.handle("evaluate", contents["evaluate"], node)["metrics"]["num-examples"] == 8
    assert "dropped a connection" in node_worker.log_path(node_worker.socket_path()).read_text()


def test_a_clientapp_process_handing_over_to_the_worker_imports_no_torch(tmp_path):
    env = cold_start._fresh_cache_env(tmp_path / "fedmoe-cache")
    cold_start.write_messages("conf/fft_moe.yaml", TINY, str(device_folder(tmp_path / "ag_news")), "rpi4",
                              str(device_folder(tmp_path / "device")), tmp_path, env, warm_worker=True)
    try:
        first = cold_start._run_child("train", tmp_path, env)  # starts the worker
        second = cold_start._run_child("train", tmp_path, env)
    finally:
        cold_start._stop_worker(env)
    for out in (first, second):
        assert out["reply"]["metrics"]["steps"] == 8
        assert "torch" not in out["modules"] and "transformers" not in out["modules"]
    phases = second["phases"]
    assert 0 < phases["handler"] <= phases["imports"] <= phases["data"] <= phases["model"] <= phases["first_step"] <= phases["reply"]
    # the second process finds the modules and data loaded in the worker: its imports are
    # flwr's and the handover, and it reads no data
    first_metrics, second_metrics = first["reply"]["metrics"], second["reply"]["metrics"]
    assert second_metrics["data-seconds"] == 0 < first_metrics["data-seconds"]
    assert second_metrics["import-seconds"] < first_metrics["import-seconds"]
