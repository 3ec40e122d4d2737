"""Soak: 20 rounds with injected client faults in every round (config `faults`: a client
raises, hangs past the round timeout, or replies NaN updates). The run completes, every
fault is counted as its node's failure with its reason, nothing else is lost, and the
global model stays finite."""

import numpy as np
import pytest

from conftest import InProcessGrid
from fedmoe_app.config import load_config
from fedmoe_app.faults import fault_of
from fedmoe_app.methods import method_class
from fedmoe_app.model import num_layers, state_to_numpy
from fedmoe_app.records import from_record, to_record
from strategies import make_strategy

ROUNDS, NODES = 20, 4
REASONS = {"raise": "InjectedFault: injected fault: raise", "hang": "no reply within federation.round-timeout",
           "garbage": "malformed reply: tensor"}


@pytest.mark.slow
def test_soak_twenty_rounds_with_faults_in_every_round(ag_news_dir, server_identity):
    config = load_config("conf/fft_moe.yaml", (
        f"model.backbone=tiny-bert data.data-dir={ag_news_dir} data.max-train-rows=400 moe.num-experts=4 "
        f"moe.expert-hidden=8 rounds={ROUNDS} eval.client=false eval.every=5 eval.test-samples=50 "
        "federation.min-nodes=4 federation.round-timeout=6 faults.share=0.25"))
    records = []
    strategy = make_strategy(config, num_layers(config), on_round=records.append)
    grid = InProcessGrid(NODES)
    initial = state_to_numpy(method_class("fft_moe").global_model(config, 4))
    result = strategy.start(grid, to_record(initial), num_rounds=ROUNDS)
    assert [r["round"] for r in records] == list(range(ROUNDS + 1))  # the run completed
    injected = {kind: 0 for kind in REASONS}
    for record in records[1:]:
        faults = {p: fault_of(config, {"partition-id": p, "num-partitions": NODES}, record["round"]) for p in range(NODES)}
        faulty = {f"partition-{p}": kind for p, kind in faults.items() if kind}
        assert len(faulty) == 1  # a fault in every round
        for kind in faulty.values():
            injected[kind] += 1
        failed = {f["client_id"]: f["reason"] for f in record["failed_nodes"]}
        assert set(failed) == set(faulty), record["round"]  # every fault counted, nothing else failed
        for client, kind in faulty.items():
            assert REASONS[kind] in failed[client], (record["round"], failed[client])
        assert set(record["clients"]) == {f"partition-{p}" for p in range(NODES)} - set(faulty)  # the others all counted
    assert all(injected.values()), injected  # each kind of fault happened
    final = from_record(result.arrays)
    assert all(np.isfinite(a).all() for a in final.values())
    assert any(not np.array_equal(final[k], initial[k]) for k in final)  # and it learnt
