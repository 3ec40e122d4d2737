"""Deployment tooling without processes: per-device data folders, certificates, node keys."""

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from flwr.common.config import parse_config_args

from deploy.credentials import write_node_key, write_tls_certificates
from deploy.device_data import split_for_devices
from deploy.local_federation import LocalFederation, NodeSpec, main
from fedmoe_app.client import ClientTask
from fedmoe_app.config import load_config
from fedmoe_app.data import load_client_data
from fedmoe_app.rows import device_client_data, device_train_rows, read_csv


def test_device_folders_hold_the_simulation_partitions(tmp_path, ag_news_dir):
    config = load_config("conf/fft_moe.yaml", "data.alpha=0.1 data.max-train-rows=600", {"FEDMOE_DATA_DIR": str(ag_news_dir)})
    folders = split_for_devices(config, 3, tmp_path)
    assert [f.name for f in folders] == ["device-0", "device-1", "device-2"]
    total_test = 0
    for index, folder in enumerate(folders):
        simulated = load_client_data(config.data, config.seed, index, 3)
        deployed = device_client_data(str(folder), config.data.holdout_fraction, config.seed)
        # same rows, same held-out slice, same label histogram: deployment = simulation client i
        assert list(deployed.train["text"][:]) == list(simulated.train["text"][:])
        assert list(deployed.holdout["label"][:]) == list(simulated.holdout["label"][:])
        assert deployed.group_counts == simulated.group_counts and deployed.num_labels == 4
        total_test += len(read_csv(folder / "test.csv"))
    assert sum(len(read_csv(f / "train.csv")) for f in folders) == 600
    assert total_test == 7600


def test_client_task_reads_tier_and_data_path_from_node_config(tmp_path, ag_news_dir, monkeypatch):
    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path / "cache"))  # its token cache, not the user's
    config = load_config("conf/fft_moe.yaml", "model.backbone=tiny-bert data.max-train-rows=300",
                         {"FEDMOE_DATA_DIR": str(ag_news_dir)})
    folder = split_for_devices(config, 3, tmp_path)[1]
    node = NodeSpec(1, "jetson-nano", folder, port=0)
    node_config = parse_config_args([node.node_config(3)])  # as flower-supernode parses --node-config
    assert node_config["data-path"] == str(folder) and node_config["partition-id"] == 1
    task = ClientTask(config, node_config)
    assert task.budget.tier == "jetson-nano" and task.budget.top_k == 2
    assert len(task.data.train) + len(task.data.holdout) == len(read_csv(folder / "train.csv"))


def test_server_certificate_is_signed_by_the_ca_for_each_host(tmp_path):
    files = write_tls_certificates(tmp_path, ["127.0.0.1", "superlink.lan"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert names.get_values_for_type(x509.DNSName) == ["superlink.lan"]
    key = load_pem_private_key(files.server_key.read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert files.server_key.stat().st_mode & 0o077 == 0  # private keys: owner only


def test_node_key_pair_is_p384_openssh(tmp_path):
    key = write_node_key(tmp_path, "node-0")
    private = load_ssh_private_key(key.private_key.read_bytes(), password=None)
    public = load_ssh_public_key(key.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert key.private_key.stat().st_mode & 0o077 == 0


def test_bad_deployment_input_names_the_field_and_the_allowed_values(tmp_path, capsys):
    with pytest.raises(ValueError, match="mode is 'ssl'; allowed: insecure, tls"):
        LocalFederation(tmp_path, ["rpi4"], [tmp_path], mode="ssl")
    with pytest.raises(ValueError, match="2 tiers but 1 device folders"):
        LocalFederation(tmp_path, ["rpi4", "rpi4"], [tmp_path])
    with pytest.raises(SystemExit):
        main(["--tiers", "rpi4,jetson-xavier", "--work-dir", str(tmp_path)])
    assert "--tiers has ['jetson-xavier']; allowed: rpi4, jetson-nano, jetson-orin" in capsys.readouterr().err
    assert not (tmp_path / "devices").exists()  # refused before anything was written
    with pytest.raises(SystemExit):  # the run would wait for a second node forever
        main(["--tiers", "rpi4", "--work-dir", str(tmp_path)])
    assert "--tiers starts 1 SuperNodes but federation.min-nodes is 2, so no round could start" in capsys.readouterr().err
    assert not (tmp_path / "devices").exists()


def test_instruction_devices_hold_the_simulation_partitions_and_a_node_worker_trains_on_them(
        tmp_path, commonsense_dir, monkeypatch):
    """Device i's train.jsonl holds simulation client i's rows (same held-out slice); a device
    node's train message served by the warm node worker gives the in-process reply."""
    from flwr.app import ConfigRecord, RecordDict

    from fedmoe_app import node_worker
    from fedmoe_app.config import config_to_yaml
    from fedmoe_app.methods import method_class
    from fedmoe_app.model import state_to_numpy
    from fedmoe_app.records import from_record, to_record
    from fedmoe_app.tasks import task_of

    monkeypatch.setenv("FEDMOE_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config("conf/ub_smoe.yaml,conf/instruction.yaml", f"model.backbone=tiny-olmoe data.data-dir="
                         f"{commonsense_dir} data.max-train-rows=90 data.alpha=0.1 eval.max-length=64")
    task = task_of(config)
    config = task.completed_config(task.splits())  # as the server sends it: the groups every client counts
    task = task_of(config)
    assert config.instruction.groups == ("ARC-Challenge", "ARC-Easy", "boolq", "openbookqa")
    folders = split_for_devices(config, 3, tmp_path / "devices")
    for index, folder in enumerate(folders):
        simulated = task.client_data({"partition-id": index, "num-partitions": 3}, index, 3)
        deployed = task.client_data({"data-path": str(folder)}, 0, 1)
        assert deployed.rows == simulated.rows and deployed.holdout_index == simulated.holdout_index
        assert deployed.group_counts == simulated.group_counts and sum(deployed.group_counts) == len(deployed.rows)
    assert sum(device_train_rows(str(f), config.data.holdout_fraction) for f in folders) == sum(
        len(task.client_data({"partition-id": i, "num-partitions": 3}, i, 3).train_index) for i in range(3))
    arrays = state_to_numpy(method_class("ub_smoe").global_model(config, 0))
    content = RecordDict({"arrays": to_record(arrays), "config": ConfigRecord(
        {"run-config": config_to_yaml(config), "server-round": 1})})
    node = {"device-tier": "rpi4", "data-path": str(folders[0])}
    try:
        local = node_worker.handle("train", content, {**node, "warm-worker": False})
        served = node_worker.handle("train", content, node)
    finally:
        node_worker.stop()
    assert served["metrics"]["train-loss"] == pytest.approx(local["metrics"]["train-loss"], rel=1e-5)
    assert from_record(served["arrays"]).keys() == from_record(local["arrays"]).keys()
